//! Removes the runner registrations of finished jobs that are still registered (in local mode
//! it only records local runners as removed). A runner GitHub calls busy is tried next round.

use std::sync::Arc;

use super::{within, GITHUB_CALL_DEADLINE};
use crate::github::Removal;
use crate::server::AppState;

pub(super) async fn remove_finished_runners(state: Arc<AppState>) {
    let finished = state
        .store(|s| s.runners_to_remove())
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "runner cleanup cannot read the store");
            Vec::new()
        });
    for job in finished
        .into_iter()
        .filter(|j| state.runners.can_register(j))
    {
        let Some(runner_id) = job.runner_id else {
            continue;
        };
        let what = format!(
            "removing runner {runner_id} of job {} (the runners after it wait for the next round)",
            job.id
        );
        // As in reconciliation, a GitHub that lets one call pass its deadline ends the pass.
        let Some(removed) = within(
            GITHUB_CALL_DEADLINE,
            &what,
            state.runners.remove(&job, runner_id),
        )
        .await
        else {
            return;
        };
        match removed {
            Ok(Removal::Gone) => {
                let id = job.id;
                if let Err(e) = state.store(move |s| s.runner_removed(id)).await {
                    tracing::error!(job = id, error = %e, "cannot record runner removal");
                }
            }
            Ok(Removal::Busy) => {
                tracing::debug!(job = job.id, runner_id, "runner still busy; removing later")
            }
            Err(e) => tracing::warn!(job = job.id, runner_id, error = %e, "cannot remove runner"),
        }
    }
}
