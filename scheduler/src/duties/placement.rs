//! Placement: queued jobs onto active hosts with room (`crate::placement::plan`), whenever woken
//! (a new job, freed capacity) and every second. Each placed job's runner registration runs as
//! its own task (`registration`); until it ends, its job is not placed again and the room
//! planned for it stays reserved.

use std::sync::Arc;
use std::time::Duration;

use super::registration::{self, Registrations};
use crate::jobs::JobState;
use crate::server::AppState;
use crate::store::{self, Host};

/// Placement also runs on this tick, so capacity freed by anything is used.
const PLACEMENT_TICK: Duration = Duration::from_secs(1);

pub(super) async fn run(state: Arc<AppState>, registration_timeout: Duration) {
    let registrations = Arc::new(Registrations::default());
    loop {
        tokio::select! {
            _ = state.placement_wake.notified() => {}
            _ = tokio::time::sleep(PLACEMENT_TICK) => {}
        }
        let round = place(state.clone(), registrations.clone(), registration_timeout);
        super::round("placement", round).await;
    }
}

async fn place(state: Arc<AppState>, registrations: Arc<Registrations>, timeout: Duration) {
    // Registrations before the store: one that ends in between has recorded its assignment
    // already, so its job is not placed again (its room may count twice this round: harmless).
    let held = registrations.held();
    let found = state
        .store(|s| Ok::<_, store::StoreError>((s.jobs(Some(JobState::Queued))?, s.hosts()?)))
        .await;
    let (mut queue, mut hosts) = match found {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "placement cannot read the store");
            return;
        }
    };
    // Jobs no runner can be registered for (GitHub's, without an App) take no room.
    queue.retain(|j| !held.jobs.contains(&j.id) && state.runners.can_register(j));
    for room in &held.rooms {
        if let Some(host) = hosts.iter_mut().find(|h| h.id == room.host_id) {
            reserve(host, room.vcpus, room.memory_mb);
        }
    }
    for (job_id, host_id) in crate::placement::plan(&queue, &hosts) {
        let Some(job) = queue.iter().find(|j| j.id == job_id) else {
            continue;
        };
        let flight = registrations.start(&state, job, &host_id);
        tokio::spawn(registration::register(
            state.clone(),
            job.clone(),
            host_id,
            flight,
            timeout,
        ));
    }
}

fn reserve(host: &mut Host, vcpus: u32, memory_mb: u64) {
    host.used_vcpus = host.used_vcpus.saturating_add(vcpus);
    host.used_memory_mb = host.used_memory_mb.saturating_add(memory_mb);
}
