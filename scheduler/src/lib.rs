//! Hopper's control plane: GitHub App webhook intake, durable job store, placement of jobs on
//! runner hosts with just-in-time runner configs, the host API and the operator API; and the
//! local mode (`up`), which runs all of it and a runner host on one machine without GitHub.

pub mod api;
pub mod config;
pub mod duties;
pub mod fleet_ca;
pub mod github;
pub mod joblogs;
pub mod labels;
pub mod localjobs;
pub mod metrics;
pub mod placement;
pub mod redact;
pub mod runners;
pub mod server;
pub mod store;
pub mod up;
pub mod webhook;

// The vocabulary shared with runner hosts, under the names the scheduler's modules use.
pub use hopper_api::job as jobs;
pub use hopper_api::secret;

/// Milliseconds since the Unix epoch: the store's time unit.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
