//! Prometheus text exposition, hand-written: a few counters and two histograms.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::jobs::JobState;

/// Reasons a delivery is rejected; the `reason` label of `hopper_webhook_rejected_total`.
pub const REJECT_REASONS: &[&str] = &[
    "signature_missing",
    "signature_malformed",
    "signature_mismatch",
    "too_large",
    "malformed",
    "missing_header",
    "store_error",
];

/// Upper bounds (seconds) of the queued-to-assigned latency buckets.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Upper bounds (seconds) of the guest-pause buckets of migrations.
const PAUSE_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Migration results; the `result` label of `hopper_migrations_total`.
pub const MIGRATION_RESULTS: &[&str] = &["succeeded", "failed"];

pub struct Metrics {
    received: AtomicU64,
    duplicates: AtomicU64,
    rejected: [AtomicU64; 7],
    hosts_lost: AtomicU64,
    latency: Mutex<Histogram>,
    migrations: [AtomicU64; 2],
    pauses: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: Default::default(),
            hosts_lost: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new(LATENCY_BUCKETS)),
            migrations: Default::default(),
            pauses: Mutex::new(Histogram::new(PAUSE_BUCKETS)),
        }
    }
}

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (n, bound) in self.counts.iter_mut().zip(self.bounds) {
            if value <= *bound {
                *n += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, w: &mut String, name: &str, help: &str) {
        let _ = writeln!(w, "# HELP {name} {help}");
        let _ = writeln!(w, "# TYPE {name} histogram");
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(w, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(w, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(w, "{name}_sum {}", self.sum);
        let _ = writeln!(w, "{name}_count {}", self.count);
    }
}

impl Metrics {
    pub fn delivery_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub fn delivery_duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub fn delivery_rejected(&self, reason: &str) {
        let i = REJECT_REASONS
            .iter()
            .position(|r| *r == reason)
            .expect("rejection reasons are the listed ones");
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn hosts_lost(&self, n: u64) {
        self.hosts_lost.fetch_add(n, Ordering::Relaxed);
    }

    pub fn queued_to_assigned(&self, seconds: f64) {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        h.observe(seconds);
    }

    /// A migration that ended: `paused_s` is its guest's pause, when it succeeded.
    pub fn migration_ended(&self, succeeded: bool, paused_s: Option<f64>) {
        self.migrations[usize::from(!succeeded)].fetch_add(1, Ordering::Relaxed);
        if let Some(p) = paused_s {
            self.pauses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(p);
        }
    }

    /// Renders everything; job counts come from the store at scrape time.
    pub fn render(&self, job_counts: &[(JobState, u64)]) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "# HELP hopper_webhook_deliveries_received_total Webhook deliveries accepted (signature valid, stored).");
        let _ = writeln!(w, "# TYPE hopper_webhook_deliveries_received_total counter");
        let _ = writeln!(
            w,
            "hopper_webhook_deliveries_received_total {}",
            self.received.load(Ordering::Relaxed)
        );
        let _ = writeln!(w, "# HELP hopper_webhook_deliveries_duplicate_total Redeliveries of a known X-GitHub-Delivery (no effect).");
        let _ = writeln!(
            w,
            "# TYPE hopper_webhook_deliveries_duplicate_total counter"
        );
        let _ = writeln!(
            w,
            "hopper_webhook_deliveries_duplicate_total {}",
            self.duplicates.load(Ordering::Relaxed)
        );
        let _ = writeln!(w, "# HELP hopper_webhook_deliveries_rejected_total Webhook deliveries rejected, by reason.");
        let _ = writeln!(w, "# TYPE hopper_webhook_deliveries_rejected_total counter");
        for (reason, n) in REJECT_REASONS.iter().zip(&self.rejected) {
            let _ = writeln!(
                w,
                "hopper_webhook_deliveries_rejected_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(w, "# HELP hopper_jobs Jobs in the store, by state.");
        let _ = writeln!(w, "# TYPE hopper_jobs gauge");
        for state in JobState::ALL {
            let n = job_counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(w, "hopper_jobs{{state=\"{}\"}} {n}", state.as_str());
        }
        let _ = writeln!(
            w,
            "# HELP hopper_hosts_lost_total Hosts marked lost after missing heartbeats."
        );
        let _ = writeln!(w, "# TYPE hopper_hosts_lost_total counter");
        let _ = writeln!(
            w,
            "hopper_hosts_lost_total {}",
            self.hosts_lost.load(Ordering::Relaxed)
        );
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .render(
                w,
                "hopper_job_queued_to_assigned_seconds",
                "Time from a job's arrival to its assignment to a host.",
            );
        let _ = writeln!(
            w,
            "# HELP hopper_migrations_total Job VM migrations that ended, by result."
        );
        let _ = writeln!(w, "# TYPE hopper_migrations_total counter");
        for (result, n) in MIGRATION_RESULTS.iter().zip(&self.migrations) {
            let _ = writeln!(
                w,
                "hopper_migrations_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        self.pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .render(
                w,
                "hopper_migration_pause_seconds",
                "The guest's pause in successful migrations, as their sources measured it.",
            );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.queued_to_assigned(0.2);
        m.queued_to_assigned(7.0);
        m.delivery_rejected("too_large");
        let text = m.render(&[(JobState::Queued, 3)]);
        assert!(text.contains("hopper_job_queued_to_assigned_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(text.contains("hopper_job_queued_to_assigned_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("hopper_job_queued_to_assigned_seconds_count 2\n"));
        assert!(text.contains("hopper_webhook_deliveries_rejected_total{reason=\"too_large\"} 1\n"));
        assert!(text.contains("hopper_jobs{state=\"queued\"} 3\n"));
        assert!(text.contains("hopper_jobs{state=\"running\"} 0\n"));
        m.migration_ended(true, Some(0.08));
        m.migration_ended(false, None);
        let text = m.render(&[]);
        assert!(text.contains("hopper_migrations_total{result=\"succeeded\"} 1\n"));
        assert!(text.contains("hopper_migrations_total{result=\"failed\"} 1\n"));
        assert!(text.contains("hopper_migration_pause_seconds_bucket{le=\"0.05\"} 0\n"));
        assert!(text.contains("hopper_migration_pause_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("hopper_migration_pause_seconds_count 1\n"));
    }
}
