//! Restart handling. A daemon that stopped while jobs ran leaves their directories behind, and
//! possibly their VMMs (children of the old daemon, now orphans). This daemon does not adopt
//! them: the job's agent request and its output were in the old process, so it could not tell
//! how the job ends. It kills each VMM, removes the work directory (the logs stay), uploads the
//! logs and reports the job `failed` (GitHub re-runs it on request). Then it removes the guest
//! TAP devices and firewall tables the old daemon's jobs had.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hopper_api::VmState;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

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
    resources::clear_leftovers(ctx.net.prefix())
        .context("cannot remove the previous run's guest networks")?;
    for (dir, job_id, message) in finished {
        report_final(ctx, &dir, job_id, VmState::Failed, message).await;
    }
    Ok(())
}

fn remove_work(dir: &JobDir) -> anyhow::Result<()> {
    dir.remove_work()
        .with_context(|| format!("cannot remove {}", dir.work.display()))
}

/// How long a killed VMM may take to be gone: its memory freed and its TAP let go.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Kills the job's VMM if it still runs, and waits until it has exited (it is another
/// daemon's child, so through a pidfd); true if there was one.
async fn kill_vmm(dir: &JobDir) -> bool {
    let Some(pid) = dir.pid() else { return false };
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return false;
    };
    // Opened before the check, so the check and the kill are about one process even if the
    // pid is reused meanwhile.
    let Ok(pidfd) = pidfd_open(pid, PidfdFlags::NONBLOCK) else {
        return false;
    };
    if !is_vmm_of(pid, dir) {
        return false;
    }
    if let Err(e) = pidfd_send_signal(&pidfd, Signal::KILL) {
        tracing::warn!(
            pid = pid.as_raw_nonzero(),
            "cannot kill the previous run's VMM: {e}"
        );
        return true;
    }
    // A pidfd turns readable once the process has exited, after it closed its files (the
    // TAP among them); /proc's command line empties earlier, while it still holds them.
    let exited = tokio::task::spawn_blocking(move || {
        let timeout = Timespec {
            tv_sec: KILL_WAIT.as_secs() as i64,
            tv_nsec: 0,
        };
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        poll(&mut fds, Some(&timeout)).is_ok_and(|ready| ready == 1)
    })
    .await
    .unwrap_or(false);
    if !exited {
        tracing::warn!(
            pid = pid.as_raw_nonzero(),
            "the previous run's VMM did not exit within {KILL_WAIT:?}"
        );
    }
    true
}

/// Whether `pid` is a VMM of this job directory; checking the command line keeps a reused pid
/// from being killed.
fn is_vmm_of(pid: Pid, dir: &JobDir) -> bool {
    let path = Path::new("/proc").join(pid.as_raw_nonzero().to_string());
    let Ok(cmdline) = fs::read(path.join("cmdline")) else {
        return false;
    };
    let socket = dir.agent_socket();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == socket.as_os_str().as_encoded_bytes())
}
