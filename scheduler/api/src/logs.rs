//! The logs a job leaves: the VM's serial console, the VMM's messages and the job command's
//! output (with the host's notes). Hosts keep them as `<name>.log` and upload them under these
//! names; the scheduler keeps the end of each.

use serde::{Deserialize, Serialize};

/// How much of each log the scheduler keeps: the end, where a failure shows.
pub const MAX_LOG_BYTES: usize = 8 * 1024 * 1024;

/// A job log's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogName {
    /// The VM's serial console.
    Console,
    /// The VMM's own messages.
    Vmm,
    /// The job command's output and the host's notes on the job.
    Job,
}

impl LogName {
    pub const ALL: [LogName; 3] = [LogName::Console, LogName::Vmm, LogName::Job];

    pub fn as_str(self) -> &'static str {
        match self {
            LogName::Console => "console",
            LogName::Vmm => "vmm",
            LogName::Job => "job",
        }
    }

    pub fn parse(s: &str) -> Option<LogName> {
        LogName::ALL.into_iter().find(|n| n.as_str() == s)
    }

    /// The file that holds it, on a host and at the scheduler.
    pub fn file_name(self) -> String {
        format!("{}.log", self.as_str())
    }
}

/// A stored log, as the operator API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogInfo {
    pub name: LogName,
    /// Bytes stored: at most the last 8 MiB (`MAX_LOG_BYTES`) of the upload.
    pub size: u64,
    /// When it was last uploaded, ms since the epoch.
    pub updated_at: i64,
}
