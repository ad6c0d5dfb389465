//! `up --demo`. `job`: once a runner host is up, one local job (`hopper-1cpu-1gb`) goes the
//! whole way (queued, assigned, its microVM, the job command, the host's reports, the log
//! upload), and its job log is shown. `evacuate`: a job that prints each step of a SHA-256
//! chain runs on one runner host; that host gets a spot termination notice through the chaos
//! API; the job's VM moves to another host while it runs, the first host is killed when its
//! notice runs out, and the job completes as if nothing happened, which its log shows.
//! The watcher (`watch.rs`) shows the steps; the demo waits through it, so what it prints
//! comes after them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hopper_api::{Migration, MigrationResult};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::watch::{ended, handover, Watcher};
use super::Progress;
use crate::api::{interrupt_host, ApiError};
use crate::config::Demo;
use crate::joblogs::LogName;
use crate::jobs::{Job, JobState, VmState};
use crate::localjobs::{self, Submission};
use crate::server::AppState;

const REPOSITORY: &str = "local/demo";
/// The evacuation demo's job: this many steps, a second apart, so that it outlives the
/// notice of its first host.
const STEPS: u32 = 150;
/// AWS's spot notice: time for a pre-copy of a 1 GiB guest (`duties::evacuation::mode_for`).
const NOTICE_S: u64 = 120;
/// How long the job runs where it started before its host gets the notice.
const HEAD_START: Duration = Duration::from_secs(5);
/// Where the job's hash chain starts.
const SEED: &str = "hopper";

/// What `up` passes to a demo.
pub struct Shared {
    pub state: Arc<AppState>,
    pub watcher: Watcher,
    pub progress: Progress,
    /// The runner hosts chaos killed, by id.
    pub killed: watch::Receiver<Vec<String>>,
}

pub async fn run(kind: Demo, cx: Shared, timeout: Duration) -> anyhow::Result<()> {
    let demo = async {
        match kind {
            Demo::Job => job(cx).await,
            Demo::Evacuate => evacuate(cx).await,
        }
    };
    tokio::time::timeout(timeout, demo)
        .await
        .with_context(|| format!("the demo did not end within {timeout:?} (--demo-timeout)"))?
}

async fn job(cx: Shared) -> anyhow::Result<()> {
    let Shared {
        state,
        mut watcher,
        progress,
        ..
    } = cx;
    progress.line("demo: waiting for the runner host");
    watcher
        .until(|alive, _| (!alive.is_empty()).then_some(()))
        .await;
    let submitted = Instant::now();
    let id = submit(&state, &progress, None, "").await?;
    let job = watcher
        .until(|_, jobs| jobs.iter().find(|j| j.id == id && ended(j)).cloned())
        .await;
    let took = submitted.elapsed();
    show_log(&state, id, &progress).await?;
    succeeded(&job)?;
    progress.line(format!(
        "demo: job {id} succeeded, {:.1} s from submission to its end",
        took.as_secs_f64()
    ));
    Ok(())
}

async fn evacuate(cx: Shared) -> anyhow::Result<()> {
    let Shared {
        state,
        mut watcher,
        progress,
        killed,
    } = cx;
    progress.line("demo: waiting for two runner hosts");
    watcher
        .until(|alive, _| (alive.len() >= 2).then_some(()))
        .await;
    let what = format!(": {STEPS} steps of a SHA-256 chain, one a second, each printed");
    let id = submit(&state, &progress, Some(script(STEPS)), &what).await?;
    let running = watcher
        .until(|_, jobs| {
            jobs.iter()
                .find(|j| j.id == id && (j.vm_state == Some(VmState::Running) || ended(j)))
                .cloned()
        })
        .await;
    still_running(&running, "before it ran")?;
    let started = Instant::now();
    watcher
        .until(|_, _| (started.elapsed() >= HEAD_START).then_some(()))
        .await;

    let from = running.host_id.context("a running job without a host")?;
    let from_name = host_name(&state, &from).await?;
    progress.line(format!(
        "demo: job {id} runs on {from_name}, which now gets a {NOTICE_S} s termination notice \
         as a spot host gets from its cloud (POST /api/v1/hosts/{from}/interrupt)"
    ));
    let noticed = Instant::now();
    interrupt_host(&state, &from, NOTICE_S)
        .await
        .map_err(|ApiError(status, msg)| {
            anyhow!("cannot interrupt {from_name}: {msg} ({status})")
        })?;
    let moved = watcher
        .until(|_, jobs| {
            jobs.iter()
                .find(|j| j.id == id && (ended(j) || j.migrations.iter().any(is_success)))
                .cloned()
        })
        .await;
    still_running(&moved, "before it moved")?;
    let to = moved.host_id.context("a moved job without a host")?;
    let to_name = host_name(&state, &to).await?;
    progress.line(format!(
        "demo: job {id} goes on running on {to_name}, {:.1} s after the notice; {from_name} \
         is killed when its notice runs out",
        noticed.elapsed().as_secs_f64()
    ));

    // The job may end before its first host does, or after.
    let (mut source_killed, mut done) = (false, None::<Job>);
    while !source_killed || done.is_none() {
        let event = watcher
            .until(|_, jobs| {
                if !source_killed && killed.borrow().contains(&from) {
                    return Some(None);
                }
                let end = jobs.iter().find(|j| j.id == id && ended(j));
                end.filter(|_| done.is_none()).cloned().map(Some)
            })
            .await;
        match event {
            None => source_killed = true,
            Some(job) => done = Some(job),
        }
    }
    let job = done.expect("the loop ends with the job's end");
    let log = show_log(&state, id, &progress).await?;
    succeeded(&job)?;
    let moves: Vec<&Migration> = job.migrations.iter().filter(|m| is_success(m)).collect();
    let [m] = moves[..] else {
        bail!("job {id} moved {} times: {:?}", moves.len(), job.migrations);
    };
    if m.from != from || job.host_id.as_deref() != Some(to.as_str()) {
        bail!(
            "job {id} moved from {} to {}, then ended on {:?}",
            m.from,
            m.to,
            job.host_id
        );
    }
    check_log(log.as_deref().unwrap_or_default(), STEPS)
        .map_err(|e| anyhow!("job {id}'s log shows a disturbed run: {e}"))?;
    progress.line(format!(
        "demo: job {id} completed on {to_name} after one move off {from_name} ({}: {}); its \
         {STEPS} steps ran once each, in order, in one boot of its VM, to the expected hash: \
         it never restarted",
        m.mode.as_str(),
        handover(m).unwrap_or_else(|| "its pause not reported".into())
    ));
    Ok(())
}

/// Submits the demo's job as `POST /api/v1/jobs` does, and says so (`what` describes it).
async fn submit(
    state: &AppState,
    progress: &Progress,
    run: Option<String>,
    what: &str,
) -> anyhow::Result<u64> {
    let labels = vec![format!("{}-1cpu-1gb", state.label_prefix)];
    let submission = Submission {
        labels: labels.clone(),
        repository: REPOSITORY.into(),
        run,
    };
    let job = localjobs::submit(state, submission).await?;
    progress.line(format!(
        "demo: submitted job {} ({}), as POST /api/v1/jobs does{what}",
        job.id,
        labels.join(", ")
    ));
    Ok(job.id)
}

/// Prints the job's log as `GET /api/v1/jobs/{id}/logs/job` serves it (uploaded by the host
/// before its final report), and returns it.
async fn show_log(
    state: &AppState,
    id: u64,
    progress: &Progress,
) -> anyhow::Result<Option<String>> {
    let log = state
        .logs(move |l| l.read(id, LogName::Job))
        .await?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    match &log {
        Some(text) => {
            let end = if text.ends_with('\n') { "" } else { "\n" };
            super::print(&format!(
                "---- job {id}: log (GET /api/v1/jobs/{id}/logs/job) ----\n{text}{end}---- end of log ----\n"
            ));
        }
        None => progress.line(format!("demo: job {id} has no job log")),
    }
    Ok(log)
}

fn succeeded(job: &Job) -> anyhow::Result<()> {
    if job.state == JobState::Completed && job.conclusion.as_deref() == Some("success") {
        return Ok(());
    }
    bail!(
        "demo job {} ended {}: {}",
        job.id,
        job.state.as_str(),
        job.reason.as_deref().unwrap_or("no reason given")
    )
}

/// The demo fails when its job ends early (`when`), even with success.
fn still_running(job: &Job, when: &str) -> anyhow::Result<()> {
    if ended(job) {
        bail!(
            "demo job {} ended {} {when}: {}",
            job.id,
            job.state.as_str(),
            job.reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

fn is_success(m: &Migration) -> bool {
    m.result == MigrationResult::Succeeded
}

async fn host_name(state: &AppState, id: &str) -> anyhow::Result<String> {
    let id = id.to_string();
    let lookup = id.clone();
    state
        .store(move |s| s.host(&lookup))
        .await?
        .map(|h| h.name)
        .with_context(|| format!("no host {id}"))
}

/// The evacuation demo's job: the guest's boot id, `steps` links of a SHA-256 chain a
/// second apart, each printed, and the boot id again. A VM that restarted would show another
/// boot id, and a job that started over its steps twice.
fn script(steps: u32) -> String {
    format!(
        r#"echo "boot $(cat /proc/sys/kernel/random/boot_id)"
h={SEED}
i=1
while [ "$i" -le {steps} ]; do
	h=$(echo "$h $i" | sha256sum | cut -d' ' -f1)
	echo "step $i/{steps} $h"
	i=$((i + 1))
	sleep 1
done
echo "boot $(cat /proc/sys/kernel/random/boot_id)"
"#
    )
}

/// The step lines an undisturbed run of `script(steps)` prints.
fn expected_steps(steps: u32) -> Vec<String> {
    let mut h = SEED.to_string();
    (1..=steps)
        .map(|i| {
            h = hex::encode(Sha256::digest(format!("{h} {i}\n")));
            format!("step {i}/{steps} {h}")
        })
        .collect()
}

/// Whether the log shows an undisturbed run: one boot, and each step once, in order, with
/// its link of the chain.
fn check_log(log: &str, steps: u32) -> Result<(), String> {
    let boots: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("boot "))
        .collect();
    match boots[..] {
        [first, last] if !first.is_empty() && first == last => {}
        _ => return Err(format!("boot ids {boots:?}: expected the same one twice")),
    }
    let seen: Vec<&str> = log.lines().filter(|l| l.starts_with("step ")).collect();
    let expected = expected_steps(steps);
    if let Some(n) = (0..seen.len().max(expected.len()))
        .find(|&n| seen.get(n).copied() != expected.get(n).map(String::as_str))
    {
        return Err(format!(
            "step line {}: {:?}, expected {:?}",
            n + 1,
            seen.get(n),
            expected.get(n)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest's shell and this check agree (busybox in the guest, this machine's sh here).
    #[test]
    fn the_job_s_own_run_passes_the_check() {
        let out = std::process::Command::new("sh")
            .args(["-c", &script(2)])
            .output()
            .unwrap();
        assert!(out.status.success());
        let log = String::from_utf8(out.stdout).unwrap();
        assert_eq!(check_log(&log, 2), Ok(()), "{log}");
        assert!(log.contains(&expected_steps(2)[1]), "{log}");
    }

    #[test]
    fn a_restart_or_a_wrong_link_fails_the_check() {
        let steps = expected_steps(3);
        let run = |boots: [&str; 2], lines: &[&str]| {
            let mut log = format!("boot {}\n", boots[0]);
            for l in lines {
                log.push_str(l);
                log.push('\n');
            }
            log.push_str(&format!("boot {}\n", boots[1]));
            check_log(&log, 3)
        };
        let all: Vec<&str> = steps.iter().map(String::as_str).collect();
        assert_eq!(run(["b1", "b1"], &all), Ok(()));
        // Rebooted: another boot id.
        assert!(run(["b1", "b2"], &all).unwrap_err().contains("boot ids"));
        // Started over: a step twice.
        let again = [all[0], all[0], all[1], all[2]];
        assert!(run(["b1", "b1"], &again)
            .unwrap_err()
            .contains("step line 2"));
        // Cut short, or a link of another chain.
        assert!(run(["b1", "b1"], &all[..2])
            .unwrap_err()
            .contains("step line 3"));
        let wrong = format!("step 2/3 {}", "0".repeat(64));
        let forged = [all[0], wrong.as_str(), all[2]];
        assert!(run(["b1", "b1"], &forged)
            .unwrap_err()
            .contains("step line 2"));
    }
}
