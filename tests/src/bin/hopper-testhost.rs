//! `hopper-testhost run`: a runner host for a machine whose own KVM cannot run guests. It
//! boots a nested test host (QEMU software emulation with KVM inside; this crate's harness),
//! starts `hopper-runner host` in it against a scheduler on this machine and streams the
//! runner's log to stdout until it is stopped; then the test host goes, and with it everything
//! the runner started. `hopper-scheduler up` starts it; progress lines go to stderr.
//!
//! `hopper-testhost soak`: test-host sessions in a row with the nested tests' workloads, to
//! measure how often a test host breaks down (tests/README.md).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hopper_tests::scheduler::HOST_GATEWAY;
use hopper_tests::soak::{self, SoakOptions};
use hopper_tests::{Exec, GuestArtifacts, TestHost, TestHostOptions};

/// Paths inside the test host.
const SECRET: &str = "/etc/hopper-enroll-secret";
const DATA: &str = "/var/lib/hopper/runner";
const LOG: &str = "/tmp/runner-host.log";
const PID: &str = "/tmp/runner-host.pid";
/// Memory the test host needs beside what its runner offers to jobs: its kernel, the
/// initramfs (guest images included) unpacked in RAM, and each job's copy of the root disk.
const HOST_OVERHEAD_MIB: u32 = 1024;
/// Guests boot slowly under emulation, slower still on a busy machine.
const AGENT_TIMEOUT_S: u32 = 300;
const FOLLOW_PERIOD: Duration = Duration::from_millis(500);

#[derive(Parser)]
#[command(
    name = "hopper-testhost",
    about = "A runner host inside a nested QEMU test host, for machines whose KVM cannot run guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a test host, run `hopper-runner host` in it against a scheduler on this machine, and
    /// stream the runner's log to stdout until SIGTERM or Ctrl-C (or, with
    /// --until-stdin-closes, the end of standard input).
    Run(RunArgs),
    /// Boot test-host sessions in a row (or a few at a time), each running guests under both
    /// VMMs, snapshots and migrations, and count the sessions in which the test host broke
    /// down. One line per session on stdout, then `soak: N sessions, K breakdowns, F other
    /// failures`; exits non-zero if any session broke down or failed. SIGINT or SIGTERM lets
    /// the sessions under way end and starts no more.
    Soak(SoakArgs),
}

#[derive(Args)]
struct SoakArgs {
    /// How many test-host sessions to run.
    #[arg(long, default_value_t = 10)]
    sessions: u32,
    /// vCPUs of each test host.
    #[arg(long, default_value_t = TestHostOptions::default().cpus)]
    host_cpus: u32,
    /// Snapshot/restore cycles in each session.
    #[arg(long, default_value_t = SoakOptions::default().snapshot_cycles)]
    snapshot_cycles: usize,
    /// Seconds a command in the test host may take before the host counts as broken down.
    #[arg(long, default_value_t = SoakOptions::default().exec_timeout.as_secs())]
    exec_timeout: u64,
    /// Sessions to run at once (each on its own test host).
    #[arg(long, default_value_t = 1)]
    parallel: u32,
}

#[derive(Default)]
struct Tally {
    ran: u32,
    breakdowns: u32,
    failures: u32,
}

impl Tally {
    fn count(&mut self, outcome: &soak::Outcome) {
        self.ran += 1;
        match outcome {
            soak::Outcome::Passed => {}
            soak::Outcome::BrokeDown { .. } => self.breakdowns += 1,
            soak::Outcome::Failed { .. } => self.failures += 1,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// The scheduler's port on this machine. The test host reaches it as 10.0.2.2:PORT, which
    /// QEMU's user networking leads to 127.0.0.1:PORT here.
    #[arg(long)]
    scheduler_port: u16,
    /// File holding the scheduler's enrollment secret (copied into the test host, mode 0600).
    #[arg(long)]
    enroll_secret_file: PathBuf,
    /// Hostname of the test host, and the runner host's name at the scheduler.
    #[arg(long, default_value = "hopper-testhost", value_parser = parse_name)]
    name: String,
    /// vCPUs the runner host offers to jobs (they share the test host's one emulated CPU).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Memory the runner host offers to jobs, in MiB; the test host gets 1 GiB more.
    #[arg(long, default_value_t = 2048)]
    memory_mb: u32,
    /// Stop when standard input closes as well. `hopper-scheduler up` holds it open, so the
    /// test host goes when `up` goes, however that ends.
    #[arg(long)]
    until_stdin_closes: bool,
}

/// A hostname: it goes on the test host's kernel command line and into a shell command.
fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("invalid name {s:?}: a-z, 0-9 and -, at most 63"))
    }
}

fn say(text: impl std::fmt::Display) {
    eprintln!("hopper-testhost: {text}");
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Soak(args) => soak(args),
    }
}

fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let opts = SoakOptions {
        host_cpus: args.host_cpus,
        snapshot_cycles: args.snapshot_cycles,
        exec_timeout: Duration::from_secs(args.exec_timeout),
    };
    let stop = stop_flag(false)?;
    say("preparing the test host image and the workload's undisturbed run");
    TestHost::prepare(&TestHostOptions::default())?;
    let expected = soak::soak_workload()?;
    let emulator = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .context("running qemu-system-x86_64 --version (run tests/setup.sh)")?;
    let emulator = String::from_utf8_lossy(&emulator.stdout);
    println!(
        "soak: {}, test-host kernel {}, {} vCPU(s) per test host",
        emulator
            .lines()
            .next()
            .unwrap_or("qemu-system-x86_64 (no version)"),
        GuestArtifacts::locate()?.release,
        opts.host_cpus
    );
    // Sessions are numbered in the order they start; lines come in the order they end.
    let next = AtomicU32::new(1);
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|s| {
        for _ in 0..args.parallel.max(1) {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > args.sessions || stop.load(Ordering::Relaxed) {
                    break;
                }
                let session = soak::session(&format!("soak{n}"), &opts, &expected);
                let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                tally.count(&session.outcome);
                println!("session {n}/{}: {session}", args.sessions);
                // The whole error (logs kept under .cache/testhost/run) for the post-mortem.
                if let soak::Outcome::BrokeDown { error, .. }
                | soak::Outcome::Failed { error, .. } = &session.outcome
                {
                    eprintln!("{error}");
                }
            });
        }
    });
    if stop.load(Ordering::Relaxed) {
        say("stopped");
    }
    let Tally {
        ran,
        breakdowns,
        failures,
    } = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    println!("soak: {ran} sessions, {breakdowns} breakdowns, {failures} other failures");
    if breakdowns + failures > 0 {
        bail!("{breakdowns} breakdowns and {failures} other failures in {ran} sessions");
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let stop = stop_flag(args.until_stdin_closes)?;
    let secret = std::fs::read(&args.enroll_secret_file).with_context(|| {
        format!(
            "reading the enrollment secret {}",
            args.enroll_secret_file.display()
        )
    })?;
    let opts = TestHostOptions {
        name: Some(args.name.clone()),
        memory_mib: args.memory_mb + HOST_OVERHEAD_MIB,
        ..Default::default()
    };
    // A stop asked for during these steps is honoured after them: the harness owns QEMU until
    // `boot` returns, and killing this process then would leave QEMU running.
    say("preparing the test host image (the first time, this builds static hopper-runner and hopper-agent: minutes)");
    let started = Instant::now();
    TestHost::prepare(&opts)?;
    say(format!(
        "image ready after {:.0} s; booting the test host (QEMU software emulation, {} MiB)",
        started.elapsed().as_secs_f64(),
        opts.memory_mib
    ));
    let started = Instant::now();
    let host = TestHost::boot(opts)?;
    say(format!(
        "test host {} up after {:.0} s",
        host.name(),
        started.elapsed().as_secs_f64()
    ));
    if !stop.load(Ordering::Relaxed) {
        host.write_file(SECRET, &secret, 0o600)?;
        start_runner(&host, &args)?;
        say(format!(
            "hopper-runner host started in the test host; it enrolls with the scheduler at \
             http://{HOST_GATEWAY}:{}",
            args.scheduler_port
        ));
        follow(&host, &stop)?;
    }
    say("stopping the test host");
    drop(host);
    Ok(())
}

/// Set by SIGTERM, SIGINT and, if asked, the end of standard input.
fn stop_flag(until_stdin_closes: bool) -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    if until_stdin_closes {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while stdin.read(&mut sink).is_ok_and(|n| n > 0) {}
            stop.store(true, Ordering::Relaxed);
        });
    }
    Ok(stop)
}

fn start_runner(host: &TestHost, args: &RunArgs) -> anyhow::Result<()> {
    // Output to a file: the agent's exec returns once nothing holds its pipes.
    let script = format!(
        "mkdir -p {DATA} && (hopper-runner host --scheduler http://{HOST_GATEWAY}:{port} \
         --enroll-secret-file {SECRET} --data-dir {DATA} --images /guest --name {name} \
         --vcpus {vcpus} --memory-mb {memory} --agent-timeout {AGENT_TIMEOUT_S} \
         </dev/null >{LOG} 2>&1 & echo $! >{PID})",
        port = args.scheduler_port,
        name = args.name,
        vcpus = args.vcpus,
        memory = args.memory_mb,
    );
    let out = host.exec_quiet(&Exec::new(["sh", "-c", &script]))?;
    if !out.exit.success() {
        bail!(
            "cannot start hopper-runner host in the test host ({}): {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Copies what the runner host logs to stdout as it comes, until `stop`; an error when the
/// runner host or the test host ends first.
fn follow(host: &TestHost, stop: &AtomicBool) -> anyhow::Result<()> {
    // Alive first, then the log: a runner that ended before the check wrote all it will.
    let script =
        r#"kill -0 "$(cat "$3")" 2>/dev/null; alive=$?; tail -c +"$(($1 + 1))" "$2"; exit $alive"#;
    let mut stdout = std::io::stdout();
    let mut offset: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let argv = ["sh", "-c", script, "sh", &offset.to_string(), LOG, PID];
        let out = host.exec_quiet(&Exec::new(argv))?;
        stdout
            .write_all(&out.stdout)
            .and_then(|()| stdout.flush())
            .context("writing the runner host's log to stdout")?;
        offset += out.stdout.len() as u64;
        if !out.exit.success() {
            bail!("hopper-runner host ended in the test host; its log says why");
        }
        std::thread::sleep(FOLLOW_PERIOD);
    }
    Ok(())
}
