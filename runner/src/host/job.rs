//! The life of one assignment: private disk, VMM, guest agent, JIT config, job command,
//! status reports, log uploads, power-off and clean-up. Runs on its own thread; several run at
//! once.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitStatus as ProcessStatus;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hopper_agent::{ClientError, Exec, ExitStatus};

use super::api::{Assignment, Reported, SchedulerClient, VmState};
use super::jobdir::{JobDir, JobRecord, Log};
use super::logs::{self, Follower};
use super::netslot::NetSlots;
use super::secret::Secret;
use super::vm::{Images, Vm, VmError};

/// Where the guest finds the JIT config (a tmpfs in the guest images; mode 0600).
pub const GUEST_JIT_CONFIG: &str = "/run/hopper-jitconfig";
/// The image's job entry point: given the JIT config's path, it starts the runner
/// (`run.sh --jitconfig …` in a production image) and exits with the runner's status.
pub const GUEST_RUN_JOB: &str = "/usr/bin/hopper-run-job";
/// How long a guest gets to power off after the job before its VMM is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// Final reports are retried this long, so a scheduler restart does not leave a job `running`.
const REPORT_RETRY_FOR: Duration = Duration::from_secs(300);

/// What every job supervisor shares.
#[derive(Clone)]
pub struct JobContext {
    pub client: SchedulerClient,
    pub token: Secret,
    pub data_dir: PathBuf,
    pub images: Images,
    pub agent_timeout: Duration,
    pub job_timeout: Duration,
    pub net: Arc<NetSlots>,
    /// The nameserver handed to guests, if the host has one they can reach.
    pub dns: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("cannot prepare the job directory {dir}: {cause}")]
    Prepare { dir: String, cause: std::io::Error },
    #[error("no guest network is free on this host")]
    NoNetwork,
    #[error("cannot copy the root disk: {0}")]
    Disk(std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot hand the JIT config to the guest agent: {0}")]
    JitConfig(ClientError),
    #[error(
        "the guest stopped before the job command finished (VMM {vmm}; agent channel: {cause})"
    )]
    GuestStopped { vmm: String, cause: ClientError },
    #[error("the job did not finish within {0:?}")]
    Timeout(Duration),
}

/// Runs an assignment to its end and reports `running`, then `finished` or `failed`.
pub fn supervise(ctx: &JobContext, a: Assignment) {
    let id = a.job.id;
    let dir = JobDir::new(&ctx.data_dir, id);
    let started = Instant::now();
    let record = JobRecord {
        job_id: id,
        runner_name: a.runner_name.clone(),
    };
    // The directory comes before the `starting` report: once that is in, the scheduler stops
    // handing the job out, and a restarted daemon learns of the job only from this directory.
    let outcome = match dir.create(&record) {
        Ok(()) => {
            report(ctx, id, VmState::Starting, None);
            // Stopped as the job ends, before the final upload.
            let _logs = Follower::start(&ctx.client, &ctx.token, &dir, id, logs::FOLLOW_PERIOD);
            execute(ctx, &a, &dir)
        }
        Err(cause) => Err(JobError::Prepare {
            dir: dir.work.display().to_string(),
            cause,
        }),
    };
    let (state, message) = match &outcome {
        Ok(status) if status.success() => (
            VmState::Finished,
            format!("job command ended with {status}"),
        ),
        Ok(status) => (VmState::Failed, format!("job command ended with {status}")),
        Err(e) => (VmState::Failed, e.to_string()),
    };
    dir.note(&message);
    // The disk and sockets go before the final report: `finished` means the host is free.
    if let Err(e) = dir.remove_work() {
        tracing::error!(job = id, dir = %dir.work.display(), "cannot remove the job directory: {e}");
    }
    match state {
        VmState::Finished => tracing::info!(job = id, after = ?started.elapsed(), "{message}"),
        _ => tracing::warn!(job = id, after = ?started.elapsed(), "job failed: {message}"),
    }
    report_final(ctx, &dir, id, state, &message);
}

fn execute(ctx: &JobContext, a: &Assignment, dir: &JobDir) -> Result<ExitStatus, JobError> {
    hopper_vmm::disk_copy::private_copy(&ctx.images.rootfs, &dir.disk()).map_err(JobError::Disk)?;
    let memory_mib = u64::from(a.shape.memory_gb) * 1024;
    // Held until this function returns, when the VM (and with it its TAP) is gone.
    let net = ctx.net.acquire().ok_or(JobError::NoNetwork)?;
    let mut vm = Vm::spawn(&ctx.images, a.shape.vcpus, memory_mib, dir, &net, ctx.dns)?;
    let boot = Instant::now();
    let mut agent = vm.connect_agent(ctx.agent_timeout)?;
    tracing::info!(job = a.job.id, pid = vm.pid(), ready_after = ?boot.elapsed(), "guest agent ready");
    dir.note(&format!(
        "guest agent ready {:.2}s after the VMM started",
        boot.elapsed().as_secs_f64()
    ));

    agent
        .write_file(
            GUEST_JIT_CONFIG,
            Some(0o600),
            a.jit_config.expose().as_bytes(),
        )
        .map_err(JobError::JitConfig)?;
    report(ctx, a.job.id, VmState::Running, None);
    agent.set_timeout(Some(ctx.job_timeout));
    let cmd = Exec::new([GUEST_RUN_JOB, GUEST_JIT_CONFIG])
        .env("HOPPER_JOB_ID", a.job.id.to_string())
        .env("HOPPER_RUNNER_NAME", a.runner_name.clone())
        .env("HOPPER_JOB_LABELS", a.job.labels.join(" "))
        .env(
            "HOPPER_REPOSITORY",
            a.job.repository.clone().unwrap_or_default(),
        );
    match agent.exec(&cmd) {
        Ok(out) => {
            append_output(dir, &out.stdout, &out.stderr);
            agent.set_timeout(Some(Duration::from_secs(10)));
            // Ask politely; a guest that does not comply is cut off below.
            if let Err(e) = agent.shutdown(false) {
                tracing::warn!(job = a.job.id, "power-off request failed: {e}");
            }
            if vm.wait_timeout(POWEROFF_GRACE).is_none() {
                tracing::warn!(
                    job = a.job.id,
                    "guest did not power off within {POWEROFF_GRACE:?}; killing its VMM"
                );
            }
            let _ = vm.kill();
            Ok(out.exit)
        }
        Err(ClientError::Timeout(t)) => {
            let _ = vm.kill();
            Err(JobError::Timeout(t))
        }
        Err(cause) => {
            // The channel broke mid-job: the guest rebooted (panic=-1), powered off, or its
            // VMM died. Whatever the VMM's own status, the job did not complete.
            let status = vm.wait_timeout(Duration::from_secs(5));
            let vmm = match status {
                Some(s) => describe(s),
                None => {
                    let _ = vm.kill();
                    "still running, killed".to_string()
                }
            };
            Err(JobError::GuestStopped { vmm, cause })
        }
    }
}

fn describe(status: ProcessStatus) -> String {
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("ended by {status}"),
    }
}

fn append_output(dir: &JobDir, stdout: &[u8], stderr: &[u8]) {
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log(Log::Job))
        .and_then(|mut f| {
            f.write_all(stdout)?;
            f.write_all(stderr)
        });
    if let Err(e) = result {
        tracing::warn!(log = %dir.log(Log::Job).display(), "cannot write the job's output: {e}");
    }
}

/// A report whose loss is harmless: a later report moves the job past it.
fn report(ctx: &JobContext, job: u64, state: VmState, message: Option<&str>) {
    if let Err(e) = ctx.client.report(&ctx.token, job, state, message) {
        tracing::warn!(job, state = ?state, "status report failed: {e}");
    }
}

/// The job's logs, then its last report, retried: without the report the job would stay
/// `running`.
pub fn report_final(ctx: &JobContext, dir: &JobDir, job: u64, state: VmState, message: &str) {
    // First: an operator who sees the job end looks for its logs next.
    logs::upload_all(&ctx.client, &ctx.token, dir, job);
    let deadline = Instant::now() + REPORT_RETRY_FOR;
    let mut wait = Duration::from_secs(1);
    loop {
        match ctx.client.report(&ctx.token, job, state, Some(message)) {
            Ok(Reported::Accepted) => return,
            Ok(other) => {
                tracing::info!(job, state = ?state, "scheduler did not take the report: {other:?}");
                return;
            }
            Err(e) if Instant::now() + wait < deadline => {
                tracing::warn!(job, state = ?state, "status report failed, retrying in {wait:?}: {e}");
                thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                tracing::error!(job, state = ?state, "giving up on the status report: {e}");
                return;
            }
        }
    }
}
