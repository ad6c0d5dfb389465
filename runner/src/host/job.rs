//! The life of one assignment: private disk, network, VMM, guest agent, JIT config, job
//! command, status reports, log uploads, power-off and clean-up. One task per job; several run
//! at once, and a stop (SIGTERM) reaches every one through its cancellation token. A job whose
//! host is evacuated gets its send orders on a channel: its VM moves to the target while the
//! job command runs, and the task ends once the target runs it (see `receive` for the other
//! side).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitStatus as ProcessStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use hopper_agent::{AgentClient, ClientError, Exec, ExecOutput, ExitStatus};
use hopper_api::{
    Assignment, LogName, MigrationMode, MigrationReport, MigrationStats, Secret, SendOrder, VmState,
};
use hopper_vmm::control::{self, Request};
use hopper_vmm::migration::{MigrateOptions, TlsFiles};
use std::os::unix::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::{ApiError, Reported, SchedulerClient};
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
/// Where a local job's script goes in the guest (see `Assignment::run`).
pub const GUEST_SCRIPT: &str = "/run/hopper-job.sh";
/// How long a guest gets to power off after the job before its VMM is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// Final reports are retried this long, so a scheduler restart does not leave a job `running`.
const REPORT_RETRY_FOR: Duration = Duration::from_secs(300);
/// How long a VM that left mid-migration may take to say whether it was handed over.
const HANDOVER_WAIT: Duration = Duration::from_secs(30);

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
    /// This host's migration identity (certificate, key, fleet CA).
    pub tls: TlsFiles,
    /// Where other hosts reach this one (a target's listener is reported at this address).
    pub address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error("cannot copy the root disk: {0}")]
    Disk(std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot hand the JIT config (or the job's script) to the guest agent: {0}")]
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

/// How a job's VM left this host.
pub enum Ended {
    /// The job command ended with this status; the VM is off.
    Finished(ExitStatus),
    /// The VM runs on another host now, which reports the job from here on.
    Moved,
}

/// Runs an assignment to its end and reports `running`, then `finished` or `failed`, unless
/// the VM moves to another host on an order from `sends`.
pub async fn supervise(
    ctx: Arc<JobContext>,
    a: Assignment,
    mut sends: mpsc::Receiver<SendOrder>,
    stop: CancellationToken,
) {
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
            let outcome = run(&ctx, &a, &mut resources, &mut sends, &stop).await;
            logs.stop().await;
            (outcome, Some(resources))
        }
        Err(e) => (Err(e.into()), None),
    };
    end(&ctx, &dir, id, started, resources, outcome).await;
}

/// The job's end on this host: it finished here (final report), or its VM moved on (the
/// target reports from now on). Either way its resources here go.
pub async fn end(
    ctx: &JobContext,
    dir: &JobDir,
    id: u64,
    started: Instant,
    resources: Option<VmResources>,
    outcome: Result<Ended, JobError>,
) {
    let outcome = match outcome {
        Ok(Ended::Finished(status)) => Ok(status),
        Ok(Ended::Moved) => {
            dir.note("the VM moved to another host, which runs the job on");
            if let Some(Err(e)) = resources.map(VmResources::release) {
                tracing::error!(job = id, dir = %dir.work.display(), "cannot remove the job directory: {e}");
            }
            tracing::info!(job = id, after = ?started.elapsed(), "the job's VM moved to another host");
            return;
        }
        Err(e) => Err(e),
    };
    finish(ctx, dir, id, started, resources, outcome).await;
}

/// The end of a job on its last host: the resources go, the final report is made.
async fn finish(
    ctx: &JobContext,
    dir: &JobDir,
    id: u64,
    started: Instant,
    resources: Option<VmResources>,
    outcome: Result<ExitStatus, JobError>,
) {
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
    report_final(ctx, dir, id, state, &message).await;
}

/// Boots the job's VM and runs the job in it, or sends it away; the VMM is gone when this
/// returns.
async fn run(
    ctx: &JobContext,
    a: &Assignment,
    resources: &mut VmResources,
    sends: &mut mpsc::Receiver<SendOrder>,
    stop: &CancellationToken,
) -> Result<Ended, JobError> {
    let dir = resources.dir().clone();
    let (image, disk) = (ctx.images.rootfs.clone(), dir.disk());
    blocking(move || hopper_vmm::disk_copy::private_copy(&image, &disk))
        .await
        .map_err(JobError::Disk)?;
    let net = resources.attach_network(&ctx.net, a.net_slot)?;
    let mut vm = Vm::spawn(&ctx.images, a.shape, &dir, net, ctx.dns)?;
    let work = drive(ctx, a, &dir, &mut vm);
    let outcome = until_done_or_moved(ctx, a.job.id, &dir, sends, stop, work).await;
    if let Err(e) = vm.kill().await {
        tracing::error!(job = a.job.id, pid = vm.pid(), "cannot kill the VMM: {e}");
    }
    outcome
}

/// Runs `work` (the job in its VM) while carrying out send orders; whichever ends first ends
/// the job here. The caller kills the VMM afterwards.
pub async fn until_done_or_moved(
    ctx: &JobContext,
    job: u64,
    dir: &JobDir,
    sends: &mut mpsc::Receiver<SendOrder>,
    stop: &CancellationToken,
    work: impl std::future::Future<Output = Result<ExitStatus, JobError>>,
) -> Result<Ended, JobError> {
    let in_flight = AtomicBool::new(false);
    let moved = evacuate(ctx, job, dir, sends, &in_flight);
    tokio::pin!(moved);
    tokio::select! {
        outcome = work => match outcome {
            // The VM went away during a migration: handed over, or lost on the way.
            Err(JobError::GuestStopped { .. }) if in_flight.load(Ordering::Relaxed) => {
                match tokio::time::timeout(HANDOVER_WAIT, &mut moved).await {
                    Ok(()) => Ok(Ended::Moved),
                    Err(_) => outcome.map(Ended::Finished),
                }
            }
            outcome => outcome.map(Ended::Finished),
        },
        () = &mut moved => Ok(Ended::Moved),
        _ = stop.cancelled() => Err(JobError::Stopped),
    }
}

/// Carries out the job's send orders, one at a time; returns once the VM runs on a target.
/// A migration that fails leaves the VM running here, and the next order may come.
async fn evacuate(
    ctx: &JobContext,
    job: u64,
    dir: &JobDir,
    sends: &mut mpsc::Receiver<SendOrder>,
    in_flight: &AtomicBool,
) {
    while let Some(order) = sends.recv().await {
        let m = order.migration;
        report_migration(ctx, m, &MigrationReport::Sending).await;
        tracing::info!(job, migration = m, to = %order.to, mode = order.mode.as_str(), "sending the job's VM");
        dir.note(&format!(
            "moving the VM to {} ({})",
            order.to,
            order.mode.as_str()
        ));
        // The job's logs so far, while they are still this host's to upload: after the
        // handover the target's continue them.
        logs::upload_all(&ctx.client, &ctx.token, dir, job).await;
        in_flight.store(true, Ordering::Relaxed);
        let postcopy = order.mode == MigrationMode::Postcopy;
        let request = Request::Migrate(MigrateOptions::new(order.to, ctx.tls.clone(), postcopy));
        let api = dir.api_socket();
        let answer = blocking(move || control::call(&api, &request)).await;
        let failure = match answer {
            Ok(r) if r.ok => {
                let s = r.migration.unwrap_or_default();
                let stats = MigrationStats {
                    paused_ms: s.downtime_ms,
                    total_ms: s.total_ms,
                    bytes: s.wire_bytes,
                };
                tracing::info!(
                    job,
                    migration = m,
                    paused_ms = s.downtime_ms,
                    total_ms = s.total_ms,
                    bytes = s.wire_bytes,
                    "the VM runs on the target"
                );
                dir.note(&format!(
                    "handed over: guest paused {} ms, {} ms in all, {} bytes sent",
                    s.downtime_ms, s.total_ms, s.wire_bytes
                ));
                report_migration(ctx, m, &MigrationReport::Sent { stats }).await;
                return;
            }
            Ok(r) => r.error.unwrap_or_else(|| "refused".into()),
            Err(e) => format!("the VMM did not answer: {e}"),
        };
        in_flight.store(false, Ordering::Relaxed);
        tracing::warn!(
            job,
            migration = m,
            "migration failed; the VM runs on here: {failure}"
        );
        dir.note(&format!("the move failed, the VM runs on here: {failure}"));
        report_migration(ctx, m, &MigrationReport::Failed { message: failure }).await;
    }
    // The daemon is going away; the job's end comes from elsewhere.
    std::future::pending().await
}

/// A migration report, retried a little: the other side and the scheduler wait for it.
pub async fn report_migration(ctx: &JobContext, migration: u64, report: &MigrationReport) {
    let mut wait = Duration::from_millis(200);
    for _ in 0..6 {
        match ctx
            .client
            .report_migration(&ctx.token, migration, report)
            .await
        {
            Ok(()) => return,
            Err(e @ ApiError::Status { .. }) => {
                tracing::warn!(migration, "the scheduler refused the migration report: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    migration,
                    "migration report failed, retrying in {wait:?}: {e}"
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
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
    // A local job's script runs instead of the image's job entry point.
    let argv = match a.run {
        Some(_) => ["/bin/sh", GUEST_SCRIPT],
        None => [GUEST_RUN_JOB, GUEST_JIT_CONFIG],
    };
    let cmd = Exec::new(argv)
        .env("HOPPER_JOB_ID", a.job.id.to_string())
        .env("HOPPER_RUNNER_NAME", a.runner_name.clone())
        .env("HOPPER_JOB_LABELS", a.job.labels.join(" "))
        .env("HOPPER_REPOSITORY", a.job.repository.clone());
    let script = a.run.clone();
    let handed = blocking(move || {
        let written = agent
            .write_file(GUEST_JIT_CONFIG, Some(0o600), jit.expose().as_bytes())
            .and_then(|()| match &script {
                Some(s) => agent.write_file(GUEST_SCRIPT, Some(0o700), s.as_bytes()),
                None => Ok(()),
            });
        (agent, written)
    });
    let (mut agent, written) = handed.await;
    written.map_err(JobError::JitConfig)?;
    report(ctx, a.job.id, VmState::Running, None).await;
    // The agent's calls block; a stop kills the VMM, which ends them.
    let (agent, result) = blocking(move || {
        agent.set_timeout(Some(job_timeout));
        let result = agent.exec(&cmd);
        (agent, result)
    })
    .await;
    conclude(a.job.id, dir, vm, agent, result).await
}

/// The job command's end: its output into the job log, then the guest powered off (or cut
/// off); or why the command did not end.
pub async fn conclude(
    job: u64,
    dir: &JobDir,
    vm: &mut Vm,
    mut agent: AgentClient<UnixStream>,
    result: Result<ExecOutput, ClientError>,
) -> Result<ExitStatus, JobError> {
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
                tracing::warn!(job, "power-off request failed: {e}");
            }
            if vm.wait_timeout(POWEROFF_GRACE).await.is_none() {
                tracing::warn!(
                    job,
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
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
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
