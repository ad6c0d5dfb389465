//! The life of one assignment: private disk, network, VMM, guest agent, JIT config, job
//! command, status reports, log uploads, power-off and clean-up. One task per job; several run
//! at once, and a stop (SIGTERM, evacuation) reaches every one through its cancellation token.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitStatus as ProcessStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hopper_agent::{ClientError, Exec, ExitStatus};
use hopper_api::{Assignment, LogName, Secret, VmState};
use tokio_util::sync::CancellationToken;

use super::client::{Reported, SchedulerClient};
use super::jobdir::{JobDir, JobRecord};
use super::logs::{self, Follower};
use super::netslot::NetSlots;
use super::resources::{ResourceError, VmResources};
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

/// What every job task shares.
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
    #[error(transparent)]
    Resources(#[from] ResourceError),
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
    #[error("the runner host was stopped while the job ran; its VM was stopped")]
    Stopped,
}

/// Runs an assignment to its end and reports `running`, then `finished` or `failed`.
pub async fn supervise(ctx: Arc<JobContext>, a: Assignment, stop: CancellationToken) {
    let id = a.job.id;
    let dir = JobDir::new(&ctx.data_dir, id);
    let started = Instant::now();
    let record = JobRecord {
        job_id: id,
        runner_name: a.runner_name.clone(),
    };
    // The directory comes before the `starting` report: once that is in, the scheduler stops
    // handing the job out, and a restarted daemon learns of the job only from this directory.
    let (outcome, resources) = match VmResources::create(dir.clone(), &record) {
        Ok(mut resources) => {
            report(&ctx, id, VmState::Starting, None).await;
            let logs = Follower::start(
                ctx.client.clone(),
                ctx.token.clone(),
                dir.clone(),
                id,
                logs::FOLLOW_PERIOD,
            );
            let outcome = run(&ctx, &a, &mut resources, &stop).await;
            logs.stop().await;
            (outcome, Some(resources))
        }
        Err(e) => (Err(e.into()), None),
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
    // The disk, sockets and network go before the final report: `finished` means the host is
    // free.
    if let Some(Err(e)) = resources.map(VmResources::release) {
        tracing::error!(job = id, dir = %dir.work.display(), "cannot remove the job directory: {e}");
    }
    match state {
        VmState::Finished => tracing::info!(job = id, after = ?started.elapsed(), "{message}"),
        _ => tracing::warn!(job = id, after = ?started.elapsed(), "job failed: {message}"),
    }
    report_final(&ctx, &dir, id, state, &message).await;
}

/// Boots the job's VM and runs the job in it; the VMM is gone when this returns.
async fn run(
    ctx: &JobContext,
    a: &Assignment,
    resources: &mut VmResources,
    stop: &CancellationToken,
) -> Result<ExitStatus, JobError> {
    let dir = resources.dir().clone();
    let (image, disk) = (ctx.images.rootfs.clone(), dir.disk());
    blocking(move || hopper_vmm::disk_copy::private_copy(&image, &disk))
        .await
        .map_err(JobError::Disk)?;
    let net = resources.attach_network(&ctx.net)?;
    let mut vm = Vm::spawn(&ctx.images, a.shape, &dir, net, ctx.dns)?;
    let outcome = tokio::select! {
        outcome = drive(ctx, a, &dir, &mut vm) => outcome,
        _ = stop.cancelled() => Err(JobError::Stopped),
    };
    if let Err(e) = vm.kill().await {
        tracing::error!(job = a.job.id, pid = vm.pid(), "cannot kill the VMM: {e}");
    }
    outcome
}

/// From the VMM's start to the guest's power-off.
async fn drive(
    ctx: &JobContext,
    a: &Assignment,
    dir: &JobDir,
    vm: &mut Vm,
) -> Result<ExitStatus, JobError> {
    let boot = Instant::now();
    let mut agent = vm.connect_agent(ctx.agent_timeout).await?;
    tracing::info!(job = a.job.id, pid = vm.pid(), ready_after = ?boot.elapsed(), "guest agent ready");
    dir.note(&format!(
        "guest agent ready {:.2}s after the VMM started",
        boot.elapsed().as_secs_f64()
    ));
    let jit = a.jit_config.clone();
    let job_timeout = ctx.job_timeout;
    let cmd = Exec::new([GUEST_RUN_JOB, GUEST_JIT_CONFIG])
        .env("HOPPER_JOB_ID", a.job.id.to_string())
        .env("HOPPER_RUNNER_NAME", a.runner_name.clone())
        .env("HOPPER_JOB_LABELS", a.job.labels.join(" "))
        .env("HOPPER_REPOSITORY", a.job.repository.clone());
    let handed = blocking(move || {
        let written = agent.write_file(GUEST_JIT_CONFIG, Some(0o600), jit.expose().as_bytes());
        (agent, written)
    });
    let (mut agent, written) = handed.await;
    written.map_err(JobError::JitConfig)?;
    report(ctx, a.job.id, VmState::Running, None).await;
    // The agent's calls block; a stop kills the VMM, which ends them.
    let (mut agent, result) = blocking(move || {
        agent.set_timeout(Some(job_timeout));
        let result = agent.exec(&cmd);
        (agent, result)
    })
    .await;
    match result {
        Ok(out) => {
            dir.append(LogName::Job, &out.stdout);
            dir.append(LogName::Job, &out.stderr);
            // Ask politely; a guest that does not comply is cut off by the caller.
            let asked = blocking(move || {
                agent.set_timeout(Some(Duration::from_secs(10)));
                agent.shutdown(false)
            });
            if let Err(e) = asked.await {
                tracing::warn!(job = a.job.id, "power-off request failed: {e}");
            }
            if vm.wait_timeout(POWEROFF_GRACE).await.is_none() {
                tracing::warn!(
                    job = a.job.id,
                    "guest did not power off within {POWEROFF_GRACE:?}; killing its VMM"
                );
            }
            Ok(out.exit)
        }
        Err(ClientError::Timeout(t)) => Err(JobError::Timeout(t)),
        Err(cause) => {
            // The channel broke mid-job: the guest rebooted (panic=-1), powered off, or its
            // VMM died. Whatever the VMM's own status, the job did not complete.
            let vmm = match vm.wait_timeout(Duration::from_secs(5)).await {
                Some(s) => describe(s),
                None => "still running, killed".to_string(),
            };
            Err(JobError::GuestStopped { vmm, cause })
        }
    }
}

/// Runs blocking work (the disk copy, agent calls) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the disk copy and agent calls do not panic")
}

fn describe(status: ProcessStatus) -> String {
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("ended by {status}"),
    }
}

/// A report whose loss is harmless: a later report moves the job past it.
async fn report(ctx: &JobContext, job: u64, state: VmState, message: Option<&str>) {
    if let Err(e) = ctx.client.report(&ctx.token, job, state, message).await {
        tracing::warn!(job, state = ?state, "status report failed: {e}");
    }
}

/// The job's logs, then its last report, retried: without the report the job would stay
/// `running`.
pub async fn report_final(ctx: &JobContext, dir: &JobDir, job: u64, state: VmState, message: &str) {
    // First: an operator who sees the job end looks for its logs next.
    logs::upload_all(&ctx.client, &ctx.token, dir, job).await;
    let deadline = Instant::now() + REPORT_RETRY_FOR;
    let mut wait = Duration::from_secs(1);
    loop {
        match ctx
            .client
            .report(&ctx.token, job, state, Some(message))
            .await
        {
            Ok(Reported::Accepted) => return,
            Ok(other) => {
                tracing::info!(job, state = ?state, "scheduler did not take the report: {other:?}");
                return;
            }
            Err(e) if Instant::now() + wait < deadline => {
                tracing::warn!(job, state = ?state, "status report failed, retrying in {wait:?}: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                tracing::error!(job, state = ?state, "giving up on the status report: {e}");
                return;
            }
        }
    }
}
