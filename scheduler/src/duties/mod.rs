//! The scheduler's background duties, each a loop in its own module:
//! - `placement`: queued jobs onto hosts with room; each placed job's runner registration is
//!   its own task (`registration`) with a deadline, so a slow GitHub delays only that job;
//! - `evacuation`: running jobs on reclaiming hosts get a target and a migration mode;
//! - `lost_hosts`: hosts that stopped heartbeating are marked lost, with their jobs;
//! - `reconcile`: catches up with GitHub's view of the jobs (deliveries get lost), then
//!   `runner_cleanup` removes the runner registrations of finished jobs;
//! - `prune`: forgets delivery ids older than GitHub lets users redeliver.
//!
//! Each round runs as its own task, so a round that panics is logged and the loop goes on.
//! Every await on GitHub has a deadline: the client's connection timeouts bound each attempt,
//! but its retries with backoff can add up to minutes. Store calls have none: SQLite's busy
//! timeout bounds them, and a blocking call could not be cancelled anyway.

pub mod evacuation;
mod lost_hosts;
mod placement;
mod prune;
mod reconcile;
mod registration;
mod runner_cleanup;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::server::AppState;

/// The longest one GitHub operation of a duty (a job looked up, a runner removed) may take,
/// its retries included: a read timeout and a retry or two.
const GITHUB_CALL_DEADLINE: Duration = Duration::from_secs(60);

/// The periods and deadlines of the duties that the command line sets.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub reconcile_interval: Duration,
    /// How long one job's runner registration may take before the job goes back to the queue.
    pub registration_timeout: Duration,
}

/// Starts every duty in `tasks`.
pub fn spawn_all(tasks: &mut JoinSet<()>, state: &Arc<AppState>, timing: Timing) {
    tasks.spawn(lost_hosts::run(state.clone()));
    tasks.spawn(evacuation::run(state.clone()));
    tasks.spawn(prune::run(state.clone()));
    tasks.spawn(placement::run(state.clone(), timing.registration_timeout));
    tasks.spawn(reconcile::run(state.clone(), timing.reconcile_interval));
}

/// Runs one round of a duty as its own task: a round that panics is logged, and the duty's
/// loop goes on with the next one.
async fn round(duty: &'static str, work: impl Future<Output = ()> + Send + 'static) {
    if let Err(e) = tokio::spawn(work).await {
        tracing::error!(duty, error = %e, "a round of this duty failed; the next one runs as planned");
    }
}

/// `work`'s result, or `None` with a warning naming `what` when it takes longer than `limit`
/// (it is then dropped, which cancels it).
async fn within<T>(limit: Duration, what: &str, work: impl Future<Output = T>) -> Option<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(done) => Some(done),
        Err(_) => {
            tracing::warn!(
                deadline_s = limit.as_secs_f64(),
                "{what}: no answer before the deadline; given up"
            );
            None
        }
    }
}
