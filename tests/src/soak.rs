//! The test-host soak (`hopper-testhost soak`): test-host sessions in a row, each running what
//! the nested tests run (a guest under each VMM, snapshot and restore, live migration both
//! ways), to measure how often a test host breaks down. A breakdown is the host's fault (it
//! stopped answering, its QEMU died, or it never booted); any other error is a failure of the
//! code under test, counted apart.

use std::fmt;
use std::time::{Duration, Instant};

use crate::microvm::{boot_guest, receive_guest, restore_guest, GuestVmm, MicrovmOptions};
use crate::tls::Fleet;
use crate::workload::{guest_progress, Expected, Workload, GUEST_PROGRESS};
use crate::{HarnessError, MicrovmGuest, TestHost, TestHostOptions};

/// Port of `vm receive` inside the test host (the migrations stay inside one host).
const MIGRATION_PORT: u16 = 7700;
const READY: Duration = Duration::from_secs(120);
const EXIT: Duration = Duration::from_secs(120);
/// Long enough to outlast a session's snapshots and migrations (a line every ~0.3 s, about
/// 100 s in all), short enough that its buffer fills in a second or two.
const WORKLOAD: Workload = Workload {
    mib: 32,
    steps: 300_000,
    every: 1000,
    pace_ms: 100,
};

/// What a session runs; the defaults are those of the nested tests.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// vCPUs of each test host.
    pub host_cpus: u32,
    /// Snapshot/restore cycles per session.
    pub snapshot_cycles: usize,
    /// Limit of each command in the test host: a request that outlives it is a breakdown.
    pub exec_timeout: Duration,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            host_cpus: TestHostOptions::default().cpus,
            snapshot_cycles: 3,
            exec_timeout: TestHostOptions::default().exec_timeout,
        }
    }
}

/// How one session ended.
#[derive(Debug)]
pub enum Outcome {
    Passed,
    /// The test host broke down (or never booted) in this step.
    BrokeDown {
        step: &'static str,
        error: String,
    },
    /// The code under test failed in this step.
    Failed {
        step: &'static str,
        error: String,
    },
}

/// One session: how it ended, and how long each step took.
#[derive(Debug)]
pub struct Session {
    pub outcome: Outcome,
    pub steps: Vec<(&'static str, Duration)>,
    pub elapsed: Duration,
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(name, d)| format!("{name} {:.1}", d.as_secs_f64()))
            .collect();
        let steps = steps.join(", ");
        let secs = self.elapsed.as_secs_f64();
        match &self.outcome {
            Outcome::Passed => write!(f, "ok in {secs:.1} s ({steps})"),
            Outcome::BrokeDown { step, error } => write!(
                f,
                "BREAKDOWN in {step} after {secs:.1} s ({steps}): {}",
                first_line(error)
            ),
            Outcome::Failed { step, error } => write!(
                f,
                "FAILED in {step} after {secs:.1} s ({steps}): {}",
                first_line(error)
            ),
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Runs one session on a fresh test host named `name`. `expected` is the workload's
/// undisturbed run ([`soak_workload`]).
pub fn session(name: &str, opts: &SoakOptions, expected: &Expected) -> Session {
    let started = Instant::now();
    let mut steps = Vec::new();
    let outcome = match run_steps(name, opts, expected, &mut steps) {
        Ok(()) => Outcome::Passed,
        Err((step, e)) if e.is_breakdown() => Outcome::BrokeDown {
            step,
            error: e.to_string(),
        },
        Err((step, e)) => Outcome::Failed {
            step,
            error: e.to_string(),
        },
    };
    Session {
        outcome,
        steps,
        elapsed: started.elapsed(),
    }
}

/// The workload every session's guest runs, run undisturbed natively first.
pub fn soak_workload() -> Result<Expected, HarnessError> {
    WORKLOAD.expected()
}

type StepResult<T> = Result<T, (&'static str, HarnessError)>;

/// Times `f` as step `name`, and names the step on failure.
fn step<T>(
    steps: &mut Vec<(&'static str, Duration)>,
    name: &'static str,
    f: impl FnOnce() -> Result<T, HarnessError>,
) -> StepResult<T> {
    let started = Instant::now();
    let result = f();
    steps.push((name, started.elapsed()));
    result.map_err(|e| (name, e))
}

fn run_steps(
    name: &str,
    opts: &SoakOptions,
    expected: &Expected,
    steps: &mut Vec<(&'static str, Duration)>,
) -> StepResult<()> {
    let host = step(steps, "boot", || {
        TestHost::boot(TestHostOptions {
            name: Some(name.into()),
            cpus: opts.host_cpus,
            exec_timeout: opts.exec_timeout,
            trace: false,
            ..Default::default()
        })
    })?;
    step(steps, "qemu-guest", || qemu_guest(&host))?;
    let vm = step(steps, "hopper-guest", || hopper_guest(&host))?;
    let vm = step(steps, "snapshots", || {
        snapshots(&host, vm, expected, opts.snapshot_cycles)
    })?;
    step(steps, "migrations", || migrations(&host, vm, expected))?;
    Ok(())
}

/// The baseline VMM boots the guest from its disk, runs a command and powers it off.
fn qemu_guest(host: &TestHost) -> Result<(), HarnessError> {
    let vm = boot_guest(
        host,
        &MicrovmOptions {
            vmm: GuestVmm::Qemu,
            name: "soak-qemu".into(),
            ready_timeout: READY,
            ..Default::default()
        },
    )?;
    vm.sh(host, "uname -r")?;
    vm.poweroff(host, EXIT)
}

/// Hopper's VMM boots a 2-vCPU guest whose one vCPU spins and the other runs the workload:
/// the load of the snapshot and migration tests.
fn hopper_guest(host: &TestHost) -> Result<MicrovmGuest, HarnessError> {
    let vm = boot_guest(
        host,
        &MicrovmOptions {
            vmm: GuestVmm::Hopper,
            name: "soak0".into(),
            cpus: 2,
            memory_mib: 512,
            ready_timeout: READY,
            ..Default::default()
        },
    )?;
    vm.sh(host, "(while :; do :; done) </dev/null >/dev/null 2>&1 &")?;
    WORKLOAD.start(host, &vm, None)?;
    // Its first line: from then on the progress file exists in every snapshot.
    let started = Instant::now();
    while !vm
        .call_quiet(host, &["test", "-s", GUEST_PROGRESS])?
        .exit
        .success()
    {
        if started.elapsed() > READY {
            return Err(vm.error(host, format!("no progress line within {READY:?}")));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(vm)
}

/// Snapshot, stop and restore in a new VMM process, `cycles` times; the guest's progress must
/// stay a prefix of the undisturbed run's.
fn snapshots(
    host: &TestHost,
    mut vm: MicrovmGuest,
    expected: &Expected,
    cycles: usize,
) -> Result<MicrovmGuest, HarnessError> {
    for cycle in 1..=cycles {
        let dir = format!("/tmp/soak-snapshot{cycle}");
        let api = api_socket(&vm);
        host.sh(&format!(
            "rm -rf {dir} && hopper-runner vm snapshot --socket {api} --to {dir}"
        ))?;
        if vm.wait_exit(host, EXIT)? != 0 {
            return Err(vm.error(host, format!("the VMM failed after snapshot {cycle}")));
        }
        host.sh(&format!("rm -rf {}", vm.dir))?;
        vm = restore_guest(host, &dir, &format!("soak{cycle}"), "--take-disk", READY)?;
        host.sh(&format!("rm -rf {dir}"))?;
        expected.check(
            "progress after a restore",
            &guest_progress(host, &vm)?,
            false,
        )?;
    }
    Ok(vm)
}

/// A pre-copy migration to a second VMM in the same host, then a post-copy back.
fn migrations(
    host: &TestHost,
    mut vm: MicrovmGuest,
    expected: &Expected,
) -> Result<(), HarnessError> {
    let fleet = Fleet::new("Hopper soak fleet")?;
    let tls = fleet.runner()?.install(host, "runner")?;
    for (name, how) in [("soak-pre", ""), ("soak-post", "--postcopy")] {
        let target = receive_guest(host, name, MIGRATION_PORT, &tls)?;
        let reply = host.sh(&format!(
            "hopper-runner vm migrate --socket {} --to 127.0.0.1:{MIGRATION_PORT} {tls} {how}",
            api_socket(&vm)
        ))?;
        if !reply.contains(r#""ok":true"#) {
            return Err(vm.error(host, format!("the migration to {name} failed: {reply}")));
        }
        if vm.wait_exit(host, EXIT)? != 0 {
            return Err(vm.error(host, "the source VMM failed after the handover".into()));
        }
        target.wait_ready(host, READY)?;
        host.sh(&format!("rm -rf {}", vm.dir))?;
        vm = target;
        expected.check(
            "progress after a migration",
            &guest_progress(host, &vm)?,
            false,
        )?;
    }
    vm.kill(host)
}

fn api_socket(vm: &MicrovmGuest) -> &str {
    vm.api_socket
        .as_deref()
        .expect("guests of Hopper's VMM have a control socket")
}
