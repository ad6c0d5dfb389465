//! `up --demo`: once a runner host is up, one local job (`hopper-1cpu-1gb`) goes the whole
//! way (queued, assigned, its microVM, the job command, the host's reports, the log upload),
//! and its job log is shown. The watcher (`watch.rs`) shows the steps; the demo waits through
//! it, so what it prints comes after them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::watch::Watcher;
use super::Progress;
use crate::joblogs::LogName;
use crate::jobs::{Job, JobState};
use crate::localjobs::{self, Submission};
use crate::server::AppState;

const REPOSITORY: &str = "local/demo";

pub async fn run(
    state: &Arc<AppState>,
    watcher: Watcher,
    progress: Progress,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(timeout, demo(state, watcher, progress))
        .await
        .with_context(|| format!("the demo did not end within {timeout:?} (--demo-timeout)"))?
}

async fn demo(
    state: &Arc<AppState>,
    mut watcher: Watcher,
    progress: Progress,
) -> anyhow::Result<()> {
    progress.line("demo: waiting for the runner host");
    watcher
        .until(|alive, _| (!alive.is_empty()).then_some(()))
        .await;
    let labels = vec![format!("{}-1cpu-1gb", state.label_prefix)];
    let submitted = Instant::now();
    let job = localjobs::submit(
        state,
        Submission {
            labels: labels.clone(),
            repository: REPOSITORY.into(),
            run: None,
        },
    )
    .await?;
    progress.line(format!(
        "demo: submitted job {} ({}), as POST /api/v1/jobs does",
        job.id,
        labels.join(", ")
    ));
    let id = job.id;
    let job = watcher
        .until(|_, jobs| jobs.iter().find(|j| j.id == id && ended(j)).cloned())
        .await;
    let took = submitted.elapsed();
    // Uploaded by the host before its final report; what GET /api/v1/jobs/{id}/logs/job serves.
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
    if job.state == JobState::Completed && job.conclusion.as_deref() == Some("success") {
        progress.line(format!(
            "demo: job {id} succeeded, {:.1} s from submission to its end",
            took.as_secs_f64()
        ));
        Ok(())
    } else {
        bail!(
            "demo job {id} ended {}: {}",
            job.state.as_str(),
            job.reason.as_deref().unwrap_or("no reason given")
        )
    }
}

/// A local job is over when completed (its VM finished), failed or lost.
fn ended(job: &Job) -> bool {
    matches!(
        job.state,
        JobState::Completed | JobState::Failed | JobState::Lost
    )
}
