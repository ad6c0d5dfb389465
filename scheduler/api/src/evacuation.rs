//! Moving running jobs off a host: the notice a host reports, the orders the scheduler gives
//! the two hosts of a migration (over their long-polls), what they report back, and the record
//! a job keeps of each move.

use serde::{Deserialize, Serialize};

use crate::host::Assignment;
use crate::job::Job;
use crate::shape::Shape;

/// The longest notice the chaos API gives (a day): longer is no notice.
pub const MAX_NOTICE_S: u64 = 86_400;
/// The longest address a target may report.
pub const MAX_ADDRESS_BYTES: usize = 256;

/// What a host's cloud (or the chaos API) says about its future.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The host goes away at the deadline: every job must move.
    Reclaim,
    /// The cloud may reclaim the host soon (EC2 rebalance recommendation): no new jobs.
    AtRisk,
}

/// `POST /api/v1/host/notice`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NoticeReport {
    pub kind: NoticeKind,
    /// When the host goes away, milliseconds since the epoch (a reclaim's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
    /// Where the notice came from ("aws", "gcp", "azure", "chaos"), for the operator.
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub source: String,
}

/// How the VM moves. Pre-copy copies while the guest runs and hands over last: the guest runs on
/// the source until it runs on the target, so a failure leaves it where it was. Post-copy hands
/// over at once and sends the memory afterwards: the fastest way off a host, but until the copy
/// ends the VM needs both hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    Precopy,
    Postcopy,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
        }
    }
}

/// Get a job's VM from another host: listen, report `listening`, run the VM once it arrives.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReceiveOrder {
    pub migration: u64,
    pub job: Job,
    pub shape: Shape,
    pub runner_name: String,
    /// The job's guest network (see [`Assignment::net_slot`]), the same as on the source.
    pub net_slot: u32,
}

/// Send a job's VM to the target that listens at `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SendOrder {
    pub migration: u64,
    pub job_id: u64,
    /// host:port of the target's listener.
    pub to: String,
    pub mode: MigrationMode,
}

/// A notice given by the chaos API: the host handles it exactly as one from its cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InterruptOrder {
    /// Seconds until the host goes away.
    pub notice_s: u64,
}

/// What a host's long-poll answers: the next thing to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "order", rename_all = "snake_case")]
pub enum Order {
    /// Boot a VM for a new job.
    Run(Assignment),
    Receive(ReceiveOrder),
    Send(SendOrder),
    Interrupt(InterruptOrder),
}

/// `POST /api/v1/host/migrations/{id}`: how a migration goes, from either of its hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum MigrationReport {
    /// Target: waiting for the VM at `address` (host:port).
    Listening {
        #[cfg_attr(feature = "openapi", schema(max_length = 256))]
        address: String,
    },
    /// Source: sending.
    Sending,
    /// Target: the VM runs here; from now on the job is this host's.
    Committed,
    /// Source: handed over; what it took.
    Sent { stats: MigrationStats },
    /// Either side: it did not happen (before a commit the VM runs on at the source).
    Failed {
        #[cfg_attr(feature = "openapi", schema(max_length = 4096))]
        message: String,
    },
}

/// What one migration took, as its source measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationStats {
    /// The guest's pause.
    pub paused_ms: u64,
    pub total_ms: u64,
    /// Bytes on the wire.
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MigrationResult {
    /// Ordered; the target is getting ready.
    Preparing,
    /// The target listens; the source is told to send.
    Listening,
    Sending,
    /// The job runs on the target.
    Succeeded,
    /// It did not happen; the job stayed on the source.
    Failed,
}

impl MigrationResult {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationResult::Preparing => "preparing",
            MigrationResult::Listening => "listening",
            MigrationResult::Sending => "sending",
            MigrationResult::Succeeded => "succeeded",
            MigrationResult::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<MigrationResult> {
        [
            MigrationResult::Preparing,
            MigrationResult::Listening,
            MigrationResult::Sending,
            MigrationResult::Succeeded,
            MigrationResult::Failed,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// Still under way.
    pub fn is_open(self) -> bool {
        !matches!(self, MigrationResult::Succeeded | MigrationResult::Failed)
    }
}

/// One move of a job's VM, as the job's record shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Migration {
    pub id: u64,
    pub job_id: u64,
    /// Source host id.
    pub from: String,
    /// Target host id.
    pub to: String,
    pub mode: MigrationMode,
    pub result: MigrationResult,
    /// The guest's pause, once the source has reported it.
    pub paused_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub bytes: Option<u64>,
    /// Why it failed.
    pub message: Option<String>,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub ended_at: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_reports_are_tagged() {
        let send = Order::Send(SendOrder {
            migration: 3,
            job_id: 7,
            to: "10.0.0.2:4000".into(),
            mode: MigrationMode::Postcopy,
        });
        let v = serde_json::to_value(&send).unwrap();
        assert_eq!(v["order"], "send");
        assert_eq!(v["mode"], "postcopy");
        let back: Order = serde_json::from_value(v).unwrap();
        assert!(matches!(back, Order::Send(s) if s.job_id == 7));

        let r: MigrationReport =
            serde_json::from_str(r#"{"state":"listening","address":"h:1"}"#).unwrap();
        assert_eq!(
            r,
            MigrationReport::Listening {
                address: "h:1".into()
            }
        );
        assert!(serde_json::from_str::<MigrationReport>(r#"{"state":"teleported"}"#).is_err());
    }
}
