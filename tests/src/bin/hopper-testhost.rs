//! `hopper-testhost run`: runner hosts for a machine whose own KVM cannot run guests. It
//! boots a nested test host (QEMU software emulation with KVM inside; this crate's harness),
//! starts `hopper-runner host` daemons in it against a scheduler on this machine (one, or
//! `--hosts N`) and streams their logs to stdout until it is stopped; then the test host goes,
//! and with it everything the runners started. `hopper-scheduler up` starts it and may have it
//! kill a daemon (chaos: `kill <i>` on its standard input); progress lines go to stderr.
//!
//! `hopper-testhost soak`: test-host sessions in a row with the nested tests' workloads, to
//! measure how often a test host breaks down (tests/README.md).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hopper_tests::scheduler::{runner_data_dir, runner_tap_prefix, HOST_GATEWAY};
use hopper_tests::soak::{self, SoakOptions};
use hopper_tests::{Exec, GuestArtifacts, TestHost, TestHostOptions};

/// The enrollment secret's path inside the test host.
const SECRET: &str = "/etc/hopper-enroll-secret";
/// Memory the test host needs beside what its runners offer to jobs: its kernel, the
/// initramfs (guest images included) unpacked in RAM, and each job's copy of the root disk.
const HOST_OVERHEAD_MIB: u32 = 1024;
/// The most daemons in one test host (as `hopper-scheduler up --hosts`).
const MAX_HOSTS: u8 = 8;
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
    /// Boot a test host, run `hopper-runner host` daemons in it against a scheduler on this
    /// machine, and stream their logs to stdout until SIGTERM or Ctrl-C (or, with
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
    /// Hostname of the test host, and the first runner host's name at the scheduler; the
    /// others are NAME-1, NAME-2…
    #[arg(long, default_value = "hopper-testhost", value_parser = parse_name)]
    name: String,
    /// How many `hopper-runner host` daemons to run, each with a data directory and TAP
    /// prefix of its own, reaching the others at 127.0.0.1; no cloud gives them notices.
    /// With several, each line of the logs on stdout follows its host's name.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_HOSTS as i64))]
    hosts: u8,
    /// vCPUs each runner host offers to jobs (they share the test host's one emulated CPU).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Memory each runner host offers to jobs, in MiB; the test host gets that for each, and
    /// 1 GiB more.
    #[arg(long, default_value_t = 2048)]
    memory_mb: u32,
    /// Stop when standard input closes as well, and take orders there, a line each: `kill I`
    /// SIGKILLs runner host I (0 is the first) with its VMs, as its cloud would take it (the
    /// others run on). `hopper-scheduler up` holds it open, so the test host goes when `up`
    /// goes, however that ends, and sends `kill` when a chaos notice runs out.
    #[arg(long)]
    until_stdin_closes: bool,
}

impl RunArgs {
    /// Runner host `i`'s name at the scheduler.
    fn host_name(&self, i: usize) -> String {
        match i {
            0 => self.name.clone(),
            i => format!("{}-{i}", self.name),
        }
    }
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
    let stop = stop_flag()?;
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
    let stop = stop_flag()?;
    let orders = if args.until_stdin_closes {
        read_orders(stop.clone())
    } else {
        // No orders ever come.
        mpsc::channel().1
    };
    let secret = std::fs::read(&args.enroll_secret_file).with_context(|| {
        format!(
            "reading the enrollment secret {}",
            args.enroll_secret_file.display()
        )
    })?;
    let opts = TestHostOptions {
        name: Some(args.name.clone()),
        // What every runner host offers (a migrating guest is on two of them for a moment).
        memory_mib: args.memory_mb * u32::from(args.hosts) + HOST_OVERHEAD_MIB,
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
        let names: Vec<String> = (0..args.hosts.into()).map(|i| args.host_name(i)).collect();
        for i in 0..names.len() {
            start_runner(&host, &args, i)?;
        }
        let (what, they) = match names.len() {
            1 => ("hopper-runner host", "it enrolls"),
            _ => ("hopper-runner hosts", "they enroll"),
        };
        say(format!(
            "{what} started in the test host ({}); {they} with the scheduler at \
             http://{HOST_GATEWAY}:{}",
            names.join(", "),
            args.scheduler_port
        ));
        follow(&host, &names, &stop, &orders)?;
    }
    say("stopping the test host");
    drop(host);
    Ok(())
}

/// Set by SIGTERM and SIGINT.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    Ok(stop)
}

/// Reads orders from standard input (see `--until-stdin-closes`): the runner hosts to kill,
/// by index, come on the channel; the end of the input sets `stop`.
fn read_orders(stop: Arc<AtomicBool>) -> mpsc::Receiver<usize> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match line.trim().strip_prefix("kill ").map(|i| i.trim().parse()) {
                Some(Ok(i)) => {
                    let _ = tx.send(i);
                }
                _ => say(format!("ignoring the order {line:?}: expected `kill <i>`")),
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    rx
}

/// Runner host `i`'s log and pid files in the test host: [`FILES`], `i`, then `.log` or
/// `.pid`.
const FILES: &str = "/tmp/runner-host-";

fn log_file(i: usize) -> String {
    format!("{FILES}{i}.log")
}

fn pid_file(i: usize) -> String {
    format!("{FILES}{i}.pid")
}

/// Tells, in one exec, for each runner host (`$1` is [`FILES`], then one offset per host):
/// whether it is alive and its log's size on a line, then its log from the offset to that
/// size. Alive first: a runner that ended before the check wrote all it will.
const LOOK: &str = r#"files=$1
shift
i=0
for offset in "$@"; do
	kill -0 "$(cat "$files$i.pid")" 2>/dev/null && alive=1 || alive=0
	size=$(stat -c %s "$files$i.log")
	echo "$alive $size"
	tail -c +$((offset + 1)) "$files$i.log" | head -c $((size - offset))
	i=$((i + 1))
done"#;

/// What [`LOOK`] answers, split: for each host, whether it is alive and its new log bytes.
fn split_look<'a>(mut answer: &'a [u8], offsets: &[u64]) -> anyhow::Result<Vec<(bool, &'a [u8])>> {
    let mut out = Vec::new();
    for offset in offsets {
        let newline = answer
            .iter()
            .position(|b| *b == b'\n')
            .context("the test host's answer ends early")?;
        let header = String::from_utf8_lossy(&answer[..newline]).into_owned();
        let (alive, size) = header
            .split_once(' ')
            .and_then(|(a, s)| Some((a == "1", s.parse::<u64>().ok()?)))
            .with_context(|| format!("the test host answers {header:?}"))?;
        answer = &answer[newline + 1..];
        let new = (size.saturating_sub(*offset) as usize).min(answer.len());
        out.push((alive, &answer[..new]));
        answer = &answer[new..];
    }
    Ok(out)
}

fn start_runner(host: &TestHost, args: &RunArgs, i: usize) -> anyhow::Result<()> {
    // Output to a file: the agent's exec returns once nothing holds its pipes. setsid: a
    // process group of its own, which its VMMs join, so that a kill takes them too.
    let script = format!(
        "mkdir -p {data} && (setsid hopper-runner host --scheduler http://{HOST_GATEWAY}:{port} \
         --enroll-secret-file {SECRET} --data-dir {data} --images /guest --name {name} \
         --address 127.0.0.1 --tap-prefix {prefix} --notice-source none \
         --vcpus {vcpus} --memory-mb {memory} --agent-timeout {AGENT_TIMEOUT_S} \
         </dev/null >{log} 2>&1 & echo $! >{pid})",
        data = runner_data_dir(i),
        port = args.scheduler_port,
        name = args.host_name(i),
        prefix = runner_tap_prefix(i),
        vcpus = args.vcpus,
        memory = args.memory_mb,
        log = log_file(i),
        pid = pid_file(i),
    );
    let out = host.exec_quiet(&Exec::new(["sh", "-c", &script]))?;
    if !out.exit.success() {
        bail!(
            "cannot start hopper-runner host {} in the test host ({}): {}",
            args.host_name(i),
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// SIGKILLs runner host `i`'s process group: the daemon and its VMMs.
fn kill_runner(host: &TestHost, i: usize) -> anyhow::Result<()> {
    let pid = pid_file(i);
    let argv = ["sh", "-c", r#"kill -9 -"$(cat "$1")""#, "sh", &pid];
    let out = host.exec_quiet(&Exec::new(argv))?;
    if !out.exit.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What `follow` keeps of one runner host.
#[derive(Default)]
struct Followed {
    /// What goes before each of its log lines on stdout (nothing with one host).
    prefix: String,
    /// How much of its log was read, and the start of a line not read whole yet.
    offset: u64,
    partial: Vec<u8>,
    /// Killed on order: its end is no failure.
    killed: bool,
}

impl Followed {
    /// Takes new bytes of its log and writes its whole lines to `out`, each after the prefix;
    /// once it has `ended`, the rest too.
    fn take(&mut self, new: &[u8], ended: bool, out: &mut impl Write) -> std::io::Result<()> {
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(new);
        let whole = match self.partial.iter().rposition(|b| *b == b'\n') {
            Some(end) => end + 1,
            None => 0,
        };
        let mut lines: Vec<u8> = self.partial.drain(..whole).collect();
        if ended && !self.partial.is_empty() {
            lines.append(&mut self.partial);
            lines.push(b'\n');
        }
        for line in lines.split_inclusive(|b| *b == b'\n') {
            out.write_all(self.prefix.as_bytes())?;
            out.write_all(line)?;
        }
        Ok(())
    }
}

/// Copies what the runner hosts log to stdout as it comes, and carries out the kill orders,
/// until `stop`; an error when a runner host not killed, or the test host, ends first.
fn follow(
    host: &TestHost,
    names: &[String],
    stop: &AtomicBool,
    orders: &mpsc::Receiver<usize>,
) -> anyhow::Result<()> {
    let mut hosts: Vec<Followed> = names
        .iter()
        .map(|name| Followed {
            prefix: if names.len() > 1 {
                format!("{name} | ")
            } else {
                String::new()
            },
            ..Default::default()
        })
        .collect();
    let mut stdout = std::io::stdout();
    while !stop.load(Ordering::Relaxed) {
        for i in orders.try_iter() {
            let Some(name) = names.get(i) else {
                say(format!("no runner host {i} to kill"));
                continue;
            };
            match kill_runner(host, i) {
                Ok(()) => say(format!("killed {name} and its VMs")),
                Err(e) => say(format!("cannot kill {name}: {e:#}")),
            }
            hosts[i].killed = true;
        }
        let mut argv = vec![
            "sh".to_string(),
            "-c".into(),
            LOOK.into(),
            "sh".into(),
            FILES.into(),
        ];
        argv.extend(hosts.iter().map(|h| h.offset.to_string()));
        let answer = host.exec_quiet(&Exec::new(argv))?.stdout;
        let offsets: Vec<u64> = hosts.iter().map(|h| h.offset).collect();
        let mut ended = None;
        for ((h, name), (alive, new)) in hosts
            .iter_mut()
            .zip(names)
            .zip(split_look(&answer, &offsets)?)
        {
            h.take(new, !alive, &mut stdout)
                .context("writing the runner hosts' logs to stdout")?;
            if !alive && !h.killed {
                ended = Some(name);
            }
        }
        stdout
            .flush()
            .context("writing the runner hosts' logs to stdout")?;
        if let Some(name) = ended {
            bail!("hopper-runner host {name} ended in the test host; its log says why");
        }
        std::thread::sleep(FOLLOW_PERIOD);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The look script, run by this machine's sh on files like the test host's, and its
    /// answer split again.
    #[test]
    fn a_look_tells_each_host_s_life_and_new_log() {
        let dir = tempfile::tempdir().unwrap();
        let files = format!("{}/runner-host-", dir.path().display());
        std::fs::write(format!("{files}0.log"), "one\ntwo\n").unwrap();
        std::fs::write(format!("{files}0.pid"), std::process::id().to_string()).unwrap();
        std::fs::write(format!("{files}1.log"), "gone\n").unwrap();
        // No process has a pid this high (pid_max is at most 2^22).
        std::fs::write(format!("{files}1.pid"), "99999999").unwrap();
        let out = std::process::Command::new("sh")
            .args(["-c", LOOK, "sh", &files, "4", "0"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let split = split_look(&out.stdout, &[4, 0]).unwrap();
        assert_eq!(split, [(true, &b"two\n"[..]), (false, &b"gone\n"[..])]);
        assert!(split_look(b"1 9\nabc", &[0, 0]).is_err(), "a host missing");
        assert!(split_look(b"yes\n", &[0]).is_err());
    }

    #[test]
    fn log_lines_come_whole_after_their_host_s_name() {
        let mut host = Followed {
            prefix: "h-1 | ".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        host.take(b"a\nb", false, &mut out).unwrap();
        host.take(b"c\nd\ne", false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "h-1 | a\nh-1 | bc\nh-1 | d\n"
        );
        host.take(b"", true, &mut out).unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("h-1 | d\nh-1 | e\n"));
        assert_eq!(host.offset, 8);
    }
}
