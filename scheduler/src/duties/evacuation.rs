//! Evacuation: every running job on a reclaiming host gets a target (best fit among hosts that
//! take jobs, not one that failed it before) and a mode that fits the time left; the two hosts
//! learn their parts through their long-polls. Orders nobody takes in time fail, so the job
//! gets another target while the source lives. A reclaiming host with no job left becomes
//! `evacuated`.

use std::sync::Arc;
use std::time::Duration;

use hopper_api::{Job, MigrationMode};

use super::round;
use crate::labels::DEFAULT_SHAPE;
use crate::now_ms;
use crate::placement;
use crate::server::AppState;

/// Said of a job that cannot leave its reclaimed host.
pub const NO_CAPACITY: &str = "host reclaimed, no capacity to evacuate to";
/// How long the hosts of a migration have to take their orders (get ready, start sending).
const ORDER_DEADLINE: Duration = Duration::from_secs(60);
const PERIOD: Duration = Duration::from_secs(1);
/// What a pre-copy is assumed to move per second on a busy host, and the margin kept for
/// the rounds a busy guest needs: a notice shorter than the estimate gets a post-copy.
const PRECOPY_MIB_PER_S: u64 = 100;
const PRECOPY_MARGIN: Duration = Duration::from_secs(20);

pub async fn run(state: Arc<AppState>) {
    loop {
        round("evacuation", evacuate(state.clone())).await;
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = state.evacuation_wake.notified() => {}
        }
    }
}

/// Pre-copy keeps the VM whole on the source until the handover, so it is the choice when
/// time allows: no deadline (a drain), or one later than two passes over its memory plus a
/// margin. Otherwise post-copy, which leaves the source at once.
pub fn mode_for(memory_mib: u64, time_left: Option<Duration>) -> MigrationMode {
    let Some(left) = time_left else {
        return MigrationMode::Precopy;
    };
    let passes = Duration::from_secs(2 * memory_mib / PRECOPY_MIB_PER_S);
    if left >= passes + PRECOPY_MARGIN {
        MigrationMode::Precopy
    } else {
        MigrationMode::Postcopy
    }
}

async fn evacuate(state: Arc<AppState>) {
    if let Err(e) = try_evacuate(&state).await {
        tracing::error!("evacuation round failed: {e}");
    }
}

async fn try_evacuate(state: &AppState) -> Result<(), crate::store::StoreError> {
    let cutoff = now_ms() - ORDER_DEADLINE.as_millis() as i64;
    for m in state.store(move |s| s.expire_migrations(cutoff)).await? {
        state.metrics.migration_ended(false, None);
        tracing::warn!(migration = m.id, from = %m.from, to = %m.to, "migration given up: {}", m.message.as_deref().unwrap_or(""));
    }
    let todo = state.store(|s| s.jobs_to_evacuate()).await?;
    for (job, failed_targets) in todo {
        // Each migration started reserves room on its target: look again for the next job.
        let hosts = state.store(|s| s.hosts()).await?;
        let Some(source) = hosts.iter().find(|h| job.host_id.as_deref() == Some(&h.id)) else {
            continue;
        };
        let mut exclude = failed_targets;
        exclude.push(source.id.clone());
        let Some(target) = placement::target_for(&job, &hosts, &exclude) else {
            no_capacity(state, &job).await?;
            continue;
        };
        let left = source
            .deadline
            .map(|d| Duration::from_millis(d.saturating_sub(now_ms()).max(0) as u64));
        let memory = job.shape.unwrap_or(DEFAULT_SHAPE).memory_mib();
        let mode = mode_for(memory, left);
        let id = job.id;
        let started = state
            .store(move |s| s.start_migration(id, &target, mode))
            .await?;
        if let Some(m) = started {
            tracing::info!(job = id, migration = m.id, from = %m.from, to = %m.to, mode = mode.as_str(), seconds_left = left.map(|l| l.as_secs()), "evacuating the job");
            if job.reason.as_deref() == Some(NO_CAPACITY) {
                state.store(move |s| s.set_reason(id, None)).await?;
            }
            state.assignments.notify_waiters();
        }
    }
    for host in state.store(|s| s.finish_evacuations()).await? {
        tracing::info!(host = %host, "host evacuated: no job left on it");
    }
    Ok(())
}

/// Said once per job, in its record and the log: never a silent loss.
async fn no_capacity(state: &AppState, job: &Job) -> Result<(), crate::store::StoreError> {
    if job.reason.as_deref() == Some(NO_CAPACITY) {
        return Ok(());
    }
    tracing::warn!(job = job.id, host = ?job.host_id, "{NO_CAPACITY}: the job runs on until its host goes");
    let id = job.id;
    state
        .store(move |s| s.set_reason(id, Some(NO_CAPACITY)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_notices_get_a_postcopy() {
        let s = Duration::from_secs;
        assert_eq!(mode_for(1024, None), MigrationMode::Precopy);
        // A 2-minute spot notice leaves time for a pre-copy of a 1 GiB guest...
        assert_eq!(mode_for(1024, Some(s(120))), MigrationMode::Precopy);
        // ...GCP's 30 seconds do not.
        assert_eq!(mode_for(1024, Some(s(30))), MigrationMode::Postcopy);
        assert_eq!(mode_for(8 * 1024, Some(s(120))), MigrationMode::Postcopy);
        assert_eq!(mode_for(1024, Some(s(0))), MigrationMode::Postcopy);
    }
}
