//! The target's part of a migration: make the job's directory, disk path and network (the
//! job's own guest network slot, so the guest keeps its address), start a VMM that listens
//! for the VM, report where, and once the VM runs here take the job over: its agent channel
//! (the job command's reply comes here), logs, reports, and further moves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hopper_api::{MigrationReport, ReceiveOrder, SendOrder};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::job::{self, blocking, report_migration, JobContext, JobError};
use super::jobdir::{JobDir, JobRecord};
use super::logs::{self, Follower};
use super::resources::VmResources;
use super::vm::Vm;
use crate::cli::vm::{LISTENING_ON, RUNS_HERE};

/// How long the VMM may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(30);
/// How long a migration may take from listening to the VM running here; the source fails it
/// sooner when it cannot send.
const ARRIVAL_WAIT: Duration = Duration::from_secs(900);

pub async fn receive(
    ctx: Arc<JobContext>,
    order: ReceiveOrder,
    mut sends: mpsc::Receiver<SendOrder>,
    stop: CancellationToken,
) {
    let (id, m) = (order.job.id, order.migration);
    let dir = JobDir::new(&ctx.data_dir, id);
    let record = JobRecord {
        job_id: id,
        runner_name: order.runner_name.clone(),
    };
    let mut resources = match VmResources::create(dir.clone(), &record) {
        Ok(r) => r,
        Err(e) => return refuse(&ctx, m, e.to_string()).await,
    };
    let (tx, mut said) = mpsc::unbounded_channel();
    let started = resources
        .attach_network(&ctx.net, order.net_slot)
        .map_err(JobError::from)
        .and_then(|net| Ok(Vm::receive(&ctx.tls, &dir, net, tx)?));
    let mut vm = match started {
        Ok(vm) => vm,
        Err(e) => {
            let _ = resources.release();
            return refuse(&ctx, m, e.to_string()).await;
        }
    };
    let arrived = tokio::select! {
        arrived = arrival(&ctx, m, &mut said) => arrived,
        _ = stop.cancelled() => Err("the runner host is stopping".to_string()),
    };
    if let Err(why) = arrived {
        tracing::warn!(job = id, migration = m, "the VM did not arrive: {why}");
        let _ = vm.kill().await;
        let _ = resources.release();
        return refuse(&ctx, m, why).await;
    }
    tracing::info!(job = id, migration = m, "the job's VM runs here");
    dir.note("the VM arrived from another host and runs here");
    report_migration(&ctx, m, &MigrationReport::Committed).await;
    let since = Instant::now();
    let logs = Follower::start(
        ctx.client.clone(),
        ctx.token.clone(),
        dir.clone(),
        id,
        logs::FOLLOW_PERIOD,
    );
    let work = take_over(&ctx, id, &dir, &mut vm);
    let outcome = job::until_done_or_moved(&ctx, id, &dir, &mut sends, &stop, work).await;
    if let Err(e) = vm.kill().await {
        tracing::error!(job = id, pid = vm.pid(), "cannot kill the VMM: {e}");
    }
    logs.stop().await;
    job::end(&ctx, &dir, id, since, Some(resources), outcome).await;
}

/// Reports where the VMM listens, then waits until it runs the VM.
async fn arrival(
    ctx: &JobContext,
    m: u64,
    said: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    let listening = tokio::time::timeout(LISTEN_WAIT, async {
        while let Some(line) = said.recv().await {
            if let Some(addr) = line.strip_prefix(LISTENING_ON) {
                return addr.parse::<std::net::SocketAddr>().ok();
            }
        }
        None
    });
    let port = match listening.await {
        Ok(Some(addr)) => addr.port(),
        Ok(None) => return Err("the receiving VMM exited before it listened".into()),
        Err(_) => {
            return Err(format!(
                "the receiving VMM did not listen within {LISTEN_WAIT:?}"
            ))
        }
    };
    let address = format!("{}:{port}", ctx.address);
    report_migration(ctx, m, &MigrationReport::Listening { address }).await;
    let runs = tokio::time::timeout(ARRIVAL_WAIT, async {
        while let Some(line) = said.recv().await {
            if line == RUNS_HERE {
                return true;
            }
        }
        false
    });
    match runs.await {
        Ok(true) => Ok(()),
        Ok(false) => Err("the migration failed; the receiving VMM exited".into()),
        Err(_) => Err(format!("the VM did not arrive within {ARRIVAL_WAIT:?}")),
    }
}

/// Takes over the job whose command runs in the arrived guest: its reply comes on this host's
/// agent channel.
async fn take_over(
    ctx: &JobContext,
    job: u64,
    dir: &JobDir,
    vm: &mut Vm,
) -> Result<hopper_agent::ExitStatus, JobError> {
    let mut agent = vm.attach_agent(ctx.agent_timeout).await?;
    let timeout = ctx.job_timeout;
    let (agent, result) = blocking(move || {
        agent.set_timeout(Some(timeout));
        let result = agent.resume_exec();
        (agent, result)
    })
    .await;
    job::conclude(job, dir, vm, agent, result).await
}

async fn refuse(ctx: &JobContext, m: u64, message: String) {
    report_migration(ctx, m, &MigrationReport::Failed { message }).await;
}
