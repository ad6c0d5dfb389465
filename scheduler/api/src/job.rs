//! Job and VM states, and the rule that they only move forward.

use serde::{Deserialize, Serialize};

use crate::shape::Shape;

/// A job's life in Hopper. GitHub's events and host reports arrive late and out of order, so a
/// state change is only applied when it moves the job forward (see `transition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a host with room.
    Queued,
    /// Names Hopper but its labels cannot be run (unknown shape…); kept so it is visible.
    Unschedulable,
    /// Placed on a host with a JIT runner config; the host has not started it yet.
    Assigned,
    /// GitHub (or the host) says a runner is working on it.
    Running,
    /// Its host stopped heartbeating while the job was on it.
    Lost,
    /// The host could not run its VM.
    Failed,
    /// GitHub says the job is finished (any conclusion).
    Completed,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Unschedulable,
        JobState::Assigned,
        JobState::Running,
        JobState::Lost,
        JobState::Failed,
        JobState::Completed,
    ];

    /// Progress order; states of equal rank cannot replace each other.
    fn rank(self) -> u8 {
        match self {
            JobState::Queued => 0,
            JobState::Unschedulable | JobState::Assigned => 1,
            JobState::Running => 2,
            JobState::Lost | JobState::Failed => 3,
            JobState::Completed => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Unschedulable => "unschedulable",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Lost => "lost",
            JobState::Failed => "failed",
            JobState::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a job in this state holds capacity on its host.
    pub fn holds_capacity(self) -> bool {
        matches!(self, JobState::Assigned | JobState::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    Forward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("job cannot move from {} to {}", from.as_str(), to.as_str())]
pub struct Backwards {
    pub from: JobState,
    pub to: JobState,
}

/// The only way a job's state changes: same state is a no-op, forward is allowed, anything
/// else (a late `queued` after `completed`, `assigned` after `running`…) is refused.
pub fn transition(from: JobState, to: JobState) -> Result<Transition, Backwards> {
    if from == to {
        Ok(Transition::Unchanged)
    } else if to.rank() > from.rank() {
        Ok(Transition::Forward)
    } else {
        Err(Backwards { from, to })
    }
}

/// What the host says about the VM it runs a job in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Starting,
    Running,
    Finished,
    Failed,
}

impl VmState {
    fn rank(self) -> u8 {
        match self {
            VmState::Starting => 0,
            VmState::Running => 1,
            VmState::Finished | VmState::Failed => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Finished => "finished",
            VmState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        [
            VmState::Starting,
            VmState::Running,
            VmState::Finished,
            VmState::Failed,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// VM reports move forward only, like job states.
    pub fn can_follow(self, previous: Option<VmState>) -> bool {
        previous.is_none_or(|p| p == self || self.rank() > p.rank())
    }

    /// The job state a VM report implies for a GitHub job (`local: false`) or a local job.
    pub fn job_state(self, local: bool) -> Option<JobState> {
        match self {
            VmState::Starting => None,
            VmState::Running => Some(JobState::Running),
            // A GitHub job's end is GitHub's to say (a `completed` webhook); the VM ending
            // only frees the host. A local job has no one else to say it: its VM ending with
            // the job command's success is its end.
            VmState::Finished => local.then_some(JobState::Completed),
            VmState::Failed => Some(JobState::Failed),
        }
    }
}

/// Jobs submitted in local mode (`POST /api/v1/jobs`) are numbered from here up. GitHub's
/// workflow_job ids are around 10^10 and grow by about that much a year, so they stay far
/// below; the range also stays below 2^53, so the ids survive JSON readers that use doubles.
pub const LOCAL_JOB_ID_BASE: u64 = 9_000_000_000_000_000;
const _: () = assert!(LOCAL_JOB_ID_BASE < 1 << 53);

/// Whether a job id is in the range of local jobs (see [`LOCAL_JOB_ID_BASE`]).
pub fn is_local_job_id(id: u64) -> bool {
    id > LOCAL_JOB_ID_BASE
}

/// A job as the store keeps it and the operator API shows it. Holds no secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    /// GitHub's workflow_job id, or a local job's id: above 9000000000000000
    /// (`LOCAL_JOB_ID_BASE`).
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    /// "owner/name".
    pub repository: String,
    pub installation_id: Option<u64>,
    pub labels: Vec<String>,
    pub state: JobState,
    pub conclusion: Option<String>,
    pub shape: Option<Shape>,
    pub image: Option<String>,
    /// Why the job is unschedulable or lost or failed.
    pub reason: Option<String>,
    pub host_id: Option<String>,
    pub runner_id: Option<u64>,
    pub runner_name: Option<String>,
    pub vm_state: Option<VmState>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch.
    pub assigned_at: Option<i64>,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
    /// Each move of the job's VM to another host, oldest first.
    #[serde(default)]
    pub migrations: Vec<crate::evacuation::Migration>,
}

impl Job {
    /// Submitted in local mode rather than queued by GitHub.
    pub fn is_local(&self) -> bool {
        is_local_job_id(self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_backwards() {
        use JobState::*;
        assert_eq!(transition(Queued, Assigned), Ok(Transition::Forward));
        assert_eq!(transition(Assigned, Running), Ok(Transition::Forward));
        assert_eq!(transition(Running, Completed), Ok(Transition::Forward));
        assert_eq!(transition(Queued, Completed), Ok(Transition::Forward));
        assert_eq!(transition(Completed, Completed), Ok(Transition::Unchanged));
        assert!(transition(Completed, Queued).is_err());
        assert!(transition(Running, Assigned).is_err());
        assert!(transition(Unschedulable, Assigned).is_err());
        assert!(transition(Lost, Failed).is_err());
        assert!(transition(Lost, Completed).is_ok());
        for a in JobState::ALL {
            for b in JobState::ALL {
                if a != b && transition(a, b).is_ok() {
                    assert!(transition(b, a).is_err(), "{a:?} <-> {b:?}");
                }
            }
        }
    }

    #[test]
    fn vm_forward_only() {
        assert!(VmState::Running.can_follow(Some(VmState::Starting)));
        assert!(!VmState::Starting.can_follow(Some(VmState::Running)));
        assert!(!VmState::Failed.can_follow(Some(VmState::Finished)));
        assert!(VmState::Starting.can_follow(None));
    }

    #[test]
    fn only_a_local_job_ends_with_its_vm() {
        assert_eq!(VmState::Finished.job_state(false), None);
        assert_eq!(VmState::Finished.job_state(true), Some(JobState::Completed));
        for local in [false, true] {
            assert_eq!(VmState::Failed.job_state(local), Some(JobState::Failed));
            assert_eq!(VmState::Running.job_state(local), Some(JobState::Running));
        }
        assert!(!is_local_job_id(LOCAL_JOB_ID_BASE) && is_local_job_id(LOCAL_JOB_ID_BASE + 1));
    }
}
