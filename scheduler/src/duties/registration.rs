//! One placed job's runner registration (GitHub's JIT config, or a local config) and the
//! assignment that records it, as a task of its own with a deadline. The registrations in
//! flight, and the jobs waiting to retry one, are what placement rounds leave alone.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::jobs::Job;
use crate::labels::DEFAULT_SHAPE;
use crate::server::AppState;
use crate::store::RunnerGrant;

/// After a registration failed or ran past its deadline, wait this long before trying that job
/// again.
const RETRY_DELAY: Duration = Duration::from_secs(30);

/// Room on a host held for a job whose runner is being registered.
#[derive(Debug, Clone)]
pub(super) struct Room {
    pub host_id: String,
    pub vcpus: u32,
    pub memory_mb: u64,
}

/// What a placement round must leave alone.
pub(super) struct Held {
    /// Jobs with a registration in flight or waiting to retry one.
    pub jobs: HashSet<u64>,
    /// Room reserved for the registrations in flight.
    pub rooms: Vec<Room>,
}

/// Shared by the placement rounds and the registration tasks.
#[derive(Default)]
pub(super) struct Registrations(Mutex<Book>);

#[derive(Default)]
struct Book {
    in_flight: HashMap<u64, Room>,
    retry_at: HashMap<u64, Instant>,
}

impl Registrations {
    fn book(&self) -> MutexGuard<'_, Book> {
        // No code panics while holding it, and the maps stay consistent if one did.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn held(&self) -> Held {
        let mut book = self.book();
        let now = Instant::now();
        book.retry_at.retain(|_, at| *at > now);
        Held {
            jobs: book
                .in_flight
                .keys()
                .chain(book.retry_at.keys())
                .copied()
                .collect(),
            rooms: book.in_flight.values().cloned().collect(),
        }
    }

    /// Reserves the job's room on the host until the returned guard is dropped.
    pub(super) fn start(
        self: &Arc<Self>,
        state: &Arc<AppState>,
        job: &Job,
        host_id: &str,
    ) -> InFlight {
        let shape = job.shape.unwrap_or(DEFAULT_SHAPE);
        let room = Room {
            host_id: host_id.to_string(),
            vcpus: u32::from(shape.vcpus()),
            memory_mb: shape.memory_mib(),
        };
        self.book().in_flight.insert(job.id, room);
        InFlight {
            registrations: self.clone(),
            state: state.clone(),
            job_id: job.id,
        }
    }
}

/// A registration in flight. Dropped however its task ends (a panic included), it releases
/// its job and room and wakes placement to use them.
pub(super) struct InFlight {
    registrations: Arc<Registrations>,
    state: Arc<AppState>,
    job_id: u64,
}

impl InFlight {
    /// Keeps the job out of placement for `RETRY_DELAY` once this registration ends.
    fn retry_later(&self) {
        let at = Instant::now() + RETRY_DELAY;
        self.registrations.book().retry_at.insert(self.job_id, at);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.registrations.book().in_flight.remove(&self.job_id);
        self.state.placement_wake.notify_one();
    }
}

/// Registers a runner for the job placed on `host_id`, within `deadline`, and records the
/// assignment. When the registration fails or runs past its deadline, the job stays queued and
/// is tried again after `RETRY_DELAY`.
pub(super) async fn register(
    state: Arc<AppState>,
    job: Job,
    host_id: String,
    flight: InFlight,
    deadline: Duration,
) {
    let runner_name = format!("hopper-{}-{:04x}", job.id, rand::random::<u16>());
    let registered = tokio::time::timeout(deadline, state.runners.register(&job, &runner_name));
    let grant = match registered.await {
        Ok(Ok(grant)) => grant,
        Ok(Err(e)) => {
            tracing::error!(job = job.id, repository = %job.repository, error = %e, retry_in_s = RETRY_DELAY.as_secs(), "cannot get a runner config; the job stays queued");
            flight.retry_later();
            return;
        }
        Err(_) => {
            // Cancelled mid-request, GitHub may have registered a runner we never hear of; no
            // VM gets its config, and GitHub removes a JIT runner that never connects.
            tracing::warn!(job = job.id, repository = %job.repository, deadline_s = deadline.as_secs_f64(), retry_in_s = RETRY_DELAY.as_secs(), "no runner config within the registration deadline; the job is back in the queue");
            flight.retry_later();
            return;
        }
    };
    record(&state, &job, host_id, grant).await;
}

async fn record(state: &AppState, job: &Job, host_id: String, grant: RunnerGrant) {
    let (job_id, host, g) = (job.id, host_id.clone(), grant.clone());
    match state.store(move |s| s.assign(job_id, &host, &g)).await {
        Ok(true) => {
            let waited = (crate::now_ms() - job.created_at).max(0) as f64 / 1000.0;
            state.metrics.queued_to_assigned(waited);
            tracing::info!(job = job.id, host = %host_id, runner = %grant.runner_name, runner_id = grant.runner_id, "job assigned");
            state.assignments.notify_waiters();
        }
        Ok(false) => {
            // The job moved on (completed, cancelled) or its host was lost while we asked for
            // the runner; if the job is still queued, a later round places it again.
            tracing::info!(
                job = job.id,
                host = %host_id,
                "job left the queue or its host was lost during placement; removing its unused runner"
            );
            let what = format!("removing job {}'s unused runner", job.id);
            let removed = super::within(
                super::GITHUB_CALL_DEADLINE,
                &what,
                state.runners.remove(job, grant.runner_id),
            );
            if let Some(Err(e)) = removed.await {
                tracing::warn!(job = job.id, error = %e, "cannot remove unused runner");
            }
        }
        Err(e) => tracing::error!(job = job.id, error = %e, "cannot record assignment"),
    }
}
