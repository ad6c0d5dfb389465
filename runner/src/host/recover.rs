//! Restart handling. A daemon that stopped while jobs ran leaves their directories behind, and
//! possibly their VMMs (children of the old daemon, now orphans). This daemon does not adopt
//! them: the job's agent request and its output were in the old process, so it could not tell
//! how the job ends. It kills each VMM, removes the work directory (the logs stay), uploads the
//! logs and reports the job `failed` (GitHub re-runs it on request). Then it removes the guest
//! TAP devices and firewall tables the old daemon's jobs had.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use hopper_api::VmState;

use super::job::{report_final, JobContext};
use super::jobdir::{self, JobDir};
use super::resources;

/// Cleans up every job directory left in the data directory, and the old jobs' networks.
pub async fn recover(ctx: &JobContext) -> anyhow::Result<()> {
    let leftovers = jobdir::leftovers(&ctx.data_dir).context("cannot list the job directories")?;
    let mut finished = Vec::new();
    for dir in leftovers {
        let record = match dir.record() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = %dir.work.display(), "job directory without a readable record ({e}); removing it");
                kill_vmm(&dir).await;
                remove_work(&dir)?;
                continue;
            }
        };
        let job_id = record.job_id;
        let killed = kill_vmm(&dir).await;
        let message = if killed {
            "the runner host restarted while the job ran; its VM was stopped"
        } else {
            "the runner host restarted while the job ran; its VM had already stopped"
        };
        tracing::warn!(job = job_id, runner = %record.runner_name, "{message}");
        dir.note(message);
        remove_work(&dir)?;
        finished.push((dir, job_id, message));
    }
    // Every old VMM is gone: nothing holds the old TAP devices any more.
    resources::clear_leftovers().context("cannot remove the previous run's guest networks")?;
    for (dir, job_id, message) in finished {
        report_final(ctx, &dir, job_id, VmState::Failed, message).await;
    }
    Ok(())
}

fn remove_work(dir: &JobDir) -> anyhow::Result<()> {
    dir.remove_work()
        .with_context(|| format!("cannot remove {}", dir.work.display()))
}

/// Kills the job's VMM if it still runs; true if there was one.
async fn kill_vmm(dir: &JobDir) -> bool {
    let Some(pid) = dir.pid() else { return false };
    if !is_vmm_of(pid, dir) {
        return false;
    }
    // SAFETY: a plain signal to a process checked just above to be this job's VMM.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_vmm_of(pid, dir) && Instant::now() < deadline {
        // Not our child: there is no exit to wait on, only /proc to look at.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Whether `pid` is a VMM of this job directory; checking the command line keeps a reused pid
/// from being killed (a zombie's command line is empty, so it counts as gone).
fn is_vmm_of(pid: u32, dir: &JobDir) -> bool {
    let Ok(cmdline) = fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline")) else {
        return false;
    };
    let socket = dir.agent_socket();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == socket.as_os_str().as_encoded_bytes())
}
