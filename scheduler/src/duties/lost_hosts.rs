//! Marks hosts that stopped heartbeating lost, with their jobs.

use std::sync::Arc;
use std::time::Duration;

use crate::server::AppState;

pub(super) async fn run(state: Arc<AppState>) {
    // A quarter of the allowance: a silent host is marked at most 25 % late.
    let period = (state.host_lost_after / 4).max(Duration::from_millis(250));
    loop {
        tokio::time::sleep(period).await;
        super::round("lost-host watch", mark_lost(state.clone())).await;
    }
}

async fn mark_lost(state: Arc<AppState>) {
    let cutoff = crate::now_ms() - state.host_lost_after.as_millis() as i64;
    match state.store(move |s| s.mark_lost(cutoff)).await {
        Ok(lost) => {
            for host in &lost {
                tracing::warn!(host = %host.host_id, name = %host.name, jobs = ?host.jobs, "host stopped heartbeating: marked lost with its jobs");
            }
            state.metrics.hosts_lost(lost.len() as u64);
        }
        Err(e) => tracing::error!(error = %e, "cannot check for lost hosts"),
    }
}
