//! Forgets old delivery ids: they only need to outlive GitHub's redelivery window.

use std::sync::Arc;
use std::time::Duration;

use crate::server::AppState;

/// GitHub lets users redeliver deliveries of the past 3 days; ids are kept a bit longer.
const DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const PERIOD: Duration = Duration::from_secs(3600);

pub(super) async fn run(state: Arc<AppState>) {
    loop {
        super::round("delivery pruning", prune(state.clone())).await;
        tokio::time::sleep(PERIOD).await;
    }
}

async fn prune(state: Arc<AppState>) {
    let cutoff = crate::now_ms() - DELIVERY_RETENTION.as_millis() as i64;
    match state.store(move |s| s.prune_deliveries(cutoff)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deliveries = n, "forgot delivery ids older than 7 days"),
        Err(e) => tracing::error!(error = %e, "cannot prune delivery ids"),
    }
}
