//! Reconciliation, every `--reconcile-interval`: catches what webhooks missed (queued jobs
//! GitHub knows and the store does not, pending jobs GitHub finished), then the runner
//! clean-up. Each GitHub call has a deadline; one that passes ends the pass it is in, as GitHub
//! is then unlikely to answer the next call either, and the next round tries again.

use std::sync::Arc;
use std::time::Duration;

use super::{runner_cleanup, within, GITHUB_CALL_DEADLINE};
use crate::github::GitHub;
use crate::jobs::{Job, JobState};
use crate::server::AppState;
use crate::store::{self, JobChange, JobUpdate};
use crate::webhook::payload::{JobAction, WorkflowJob};

/// The longest the listing of every installation's queued jobs may take: several requests per
/// repository, each with its retries.
const LISTING_DEADLINE: Duration = Duration::from_secs(300);

pub(super) async fn run(state: Arc<AppState>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Some(github) = state.runners.github().cloned() {
            let round = with_github(state.clone(), github);
            super::round("reconciliation", round).await;
        }
        let round = runner_cleanup::remove_finished_runners(state.clone());
        super::round("runner clean-up", round).await;
    }
}

async fn with_github(state: Arc<AppState>, github: Arc<GitHub>) {
    add_missed_jobs(&state, &github).await;
    catch_up_pending_jobs(&state, &github).await;
}

/// Queued jobs GitHub knows and the store does not.
async fn add_missed_jobs(state: &AppState, github: &GitHub) {
    let listed = within(
        LISTING_DEADLINE,
        "reconciliation listing GitHub's queued jobs",
        github.queued_jobs(),
    );
    let remote = match listed.await {
        Some(Ok(remote)) => remote,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "reconciliation cannot list GitHub's queued jobs");
            return;
        }
        None => return,
    };
    for (installation_id, repository, rj) in remote {
        let wj = WorkflowJob {
            action: JobAction::Queued,
            id: rj.id,
            run_id: rj.run_id,
            run_attempt: rj.run_attempt.unwrap_or(1),
            labels: rj.labels,
            conclusion: None,
            repository,
            installation_id: Some(installation_id),
        };
        let Some(update) = crate::webhook::job_update(&state.label_prefix, wj) else {
            continue;
        };
        match state.store(move |s| s.apply_update(&update)).await {
            Ok(JobChange::Created(st)) => {
                tracing::info!(
                    job = rj.id,
                    state = st.as_str(),
                    "reconciliation found a job the webhooks missed"
                );
                state.placement_wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(job = rj.id, error = %e, "cannot store reconciled job"),
        }
    }
}

/// Jobs the store has pending that GitHub has started or finished.
async fn catch_up_pending_jobs(state: &AppState, github: &GitHub) {
    let pending = state
        .store(|s| {
            let mut jobs = Vec::new();
            for st in [JobState::Queued, JobState::Assigned, JobState::Running] {
                jobs.extend(s.jobs(Some(st))?);
            }
            Ok::<_, store::StoreError>(jobs)
        })
        .await;
    let pending = pending.unwrap_or_else(|e| {
        tracing::error!(error = %e, "reconciliation cannot read the store");
        Vec::new()
    });
    // GitHub does not know local jobs (a local-mode data directory served with an App later).
    for job in pending.into_iter().filter(|j| !j.is_local()) {
        let what = format!(
            "reconciliation reading job {} at GitHub (the jobs after it wait for the next round)",
            job.id
        );
        let remote = match within(GITHUB_CALL_DEADLINE, &what, github.job(&job)).await {
            Some(Ok(Some(r))) => r,
            Some(Ok(None)) => continue,
            Some(Err(e)) => {
                tracing::warn!(job = job.id, error = %e, "reconciliation cannot read job");
                continue;
            }
            None => return,
        };
        let target = match remote.status.as_str() {
            "completed" => JobState::Completed,
            "in_progress" => JobState::Running,
            _ => continue,
        };
        let update = moved(&job, target, remote.conclusion);
        if let Ok(JobChange::Moved { from, to }) =
            state.store(move |s| s.apply_update(&update)).await
        {
            tracing::info!(
                job = job.id,
                from = from.as_str(),
                to = to.as_str(),
                "reconciliation caught up with GitHub"
            );
        }
    }
}

/// The stored job moved to `target`, as GitHub reported it.
fn moved(job: &Job, target: JobState, conclusion: Option<String>) -> JobUpdate {
    JobUpdate {
        id: job.id,
        run_id: job.run_id,
        run_attempt: job.run_attempt,
        repository: job.repository.clone(),
        installation_id: job.installation_id,
        labels: job.labels.clone(),
        target,
        conclusion,
        shape: job.shape,
        image: job.image.clone(),
        reason: None,
    }
}
