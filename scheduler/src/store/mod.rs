//! The durable store behind the scheduler. Everything the scheduler knows lives here, so a
//! restart loses nothing. [`Store`] is the seam: SQLite implements it today; a PostgreSQL
//! backend implements the same trait and `open` picks it by URL scheme.

mod sqlite;

use std::path::Path;
use std::sync::Arc;

use crate::jobs::{Backwards, Job, JobState, VmState};
use crate::labels::Shape;
use crate::redact::JitFingerprint;
use crate::secret::Secret;
use hopper_api::{Migration, MigrationMode, MigrationReport, NoticeKind, SendOrder};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("cannot open store: {0}")]
    Open(String),
}

/// A job as one event (webhook or reconciliation) sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobUpdate {
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    pub repository: String,
    pub installation_id: Option<u64>,
    pub labels: Vec<String>,
    /// The state the event asks for; applied only if it moves the job forward.
    pub target: JobState,
    pub conclusion: Option<String>,
    pub shape: Option<Shape>,
    pub image: Option<String>,
    pub reason: Option<String>,
}

/// What an update did to its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobChange {
    Created(JobState),
    Moved {
        from: JobState,
        to: JobState,
    },
    Unchanged(JobState),
    /// Out of order: the job is already further along; nothing changed.
    Refused(Backwards),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// This `X-GitHub-Delivery` was seen before; nothing changed.
    Duplicate,
    Recorded(Option<JobChange>),
}

pub use hopper_api::host::{Host, HostState, NewHost};

/// A runner registered with GitHub for one job.
#[derive(Clone, Debug)]
pub struct RunnerGrant {
    pub runner_id: u64,
    pub runner_name: String,
    pub jit_config: Secret,
}

/// A job handed to a host, with the secret it needs to start the runner.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub job: Job,
    pub jit_config: Secret,
    pub net_slot: u32,
    /// A local job's script (see `localjobs::Submission::run`).
    pub script: Option<String>,
}

/// What a host's long-poll hands out next; each is repeated until the host acts on it (a
/// status report, a migration report, a notice report).
#[derive(Clone, Debug)]
pub enum HostOrder {
    Run(Assignment),
    Receive {
        migration: u64,
        job: Job,
        net_slot: u32,
    },
    Send(SendOrder),
    Interrupt {
        notice_s: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationReportError {
    #[error("no migration {0} involves this host")]
    NotYours(u64),
    #[error("a migration's {0} report comes from its other host")]
    WrongSide(&'static str),
    #[error("migration {id} is {result}: it cannot become {report}")]
    Conflict {
        id: u64,
        result: &'static str,
        report: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostHost {
    pub host_id: String,
    pub name: String,
    pub jobs: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("job {0} is not assigned to this host")]
    NotYours(u64),
    #[error("VM state {new} cannot follow {old}")]
    VmBackwards {
        old: &'static str,
        new: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The scheduler's storage. Every method is one transaction: it either happens entirely or
/// not at all. Methods are blocking; async callers use `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Records a delivery id and applies its job update atomically. A delivery id seen before
    /// changes nothing.
    fn record_delivery(
        &self,
        delivery_id: &str,
        event: &str,
        update: Option<&JobUpdate>,
    ) -> Result<DeliveryOutcome, StoreError>;
    /// Applies an update found by reconciliation (no delivery id).
    fn apply_update(&self, update: &JobUpdate) -> Result<JobChange, StoreError>;
    /// Stores a job submitted in local mode under the next local job id (above
    /// `jobs::LOCAL_JOB_ID_BASE`; `update.id` and `update.run_id` are replaced by it), with
    /// the script its VM runs instead of a runner, and returns it.
    fn create_local_job(&self, update: &JobUpdate, script: Option<&str>)
        -> Result<Job, StoreError>;
    fn job(&self, id: u64) -> Result<Option<Job>, StoreError>;
    /// Jobs in arrival order, optionally of one state.
    fn jobs(&self, state: Option<JobState>) -> Result<Vec<Job>, StoreError>;
    /// Jobs whose last change was at or after `since_ms`, oldest change first.
    fn jobs_updated_since(&self, since_ms: i64) -> Result<Vec<Job>, StoreError>;
    fn job_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError>;
    /// Moves a queued job to `assigned` on a host with its runner. False (nothing changed) when
    /// the job is no longer queued or the host is no longer active.
    fn assign(&self, job_id: u64, host_id: &str, grant: &RunnerGrant) -> Result<bool, StoreError>;
    /// The host's next order: a chaos notice, a VM to send, a VM to receive, then the oldest
    /// job assigned to it that it has not acknowledged with a report.
    fn order_for(&self, host_id: &str) -> Result<Option<HostOrder>, StoreError>;
    /// A host's notice: `Reclaim` makes it reclaiming (its jobs are moved away), `AtRisk` at
    /// risk (nothing new is placed there). Clears a pending chaos notice. `None` for a lost host.
    fn record_notice(
        &self,
        host_id: &str,
        kind: NoticeKind,
        deadline: Option<i64>,
    ) -> Result<Option<Host>, StoreError>;
    /// An operator's drain: reclaiming without a deadline. `None` if unknown or lost.
    fn drain(&self, host_id: &str) -> Result<Option<Host>, StoreError>;
    /// A chaos notice for the host's next long-poll. `None` if unknown or not taking jobs.
    fn interrupt(&self, host_id: &str, notice_s: u64) -> Result<Option<Host>, StoreError>;
    /// Running jobs on reclaiming hosts with no migration under way, each with the hosts a
    /// migration of it already failed to.
    fn jobs_to_evacuate(&self) -> Result<Vec<(Job, Vec<String>)>, StoreError>;
    /// Orders a running job's VM moved to host `to` (which then counts it as used). `None`
    /// when the job is no longer running where it was, already moving, or `to` takes no jobs.
    fn start_migration(
        &self,
        job_id: u64,
        to: &str,
        mode: MigrationMode,
    ) -> Result<Option<Migration>, StoreError>;
    /// A report from the source or the target of a migration; a commit (or the source's word
    /// that it sent the VM) makes the job the target's. Also says whether this report ended it.
    fn report_migration(
        &self,
        host_id: &str,
        id: u64,
        report: &MigrationReport,
    ) -> Result<(Migration, bool), MigrationReportError>;
    /// Fails migrations whose target or source did not take its order since `started_before`.
    fn expire_migrations(&self, started_before: i64) -> Result<Vec<Migration>, StoreError>;
    /// Reclaiming hosts with no job left become evacuated; returns their ids.
    fn finish_evacuations(&self) -> Result<Vec<String>, StoreError>;
    /// Replaces a job's reason (what an operator reads about it).
    fn set_reason(&self, job_id: u64, reason: Option<&str>) -> Result<(), StoreError>;
    /// A host's report on the VM of one of its jobs; returns the job afterwards.
    fn report_vm(
        &self,
        host_id: &str,
        job_id: u64,
        vm: VmState,
        message: Option<&str>,
    ) -> Result<Job, ReportError>;
    /// For a log upload by a host: the fingerprint of the JIT config handed out with the job,
    /// to redact it from the log. `NotYours` when the job is not assigned to `host_id`;
    /// `Ok(None)` for a job assigned before fingerprints were kept.
    fn jit_fingerprint(
        &self,
        host_id: &str,
        job_id: u64,
    ) -> Result<Option<JitFingerprint>, ReportError>;
    /// Stores a new host with id `id` (from [`new_host_id`]).
    fn enroll_host(&self, id: &str, host: &NewHost, token_hash: &[u8]) -> Result<Host, StoreError>;
    fn host_by_token(&self, token_hash: &[u8]) -> Result<Option<Host>, StoreError>;
    /// Records a heartbeat; a lost host that heartbeats again becomes active (its lost jobs
    /// stay lost).
    fn heartbeat(&self, host_id: &str) -> Result<(), StoreError>;
    fn hosts(&self) -> Result<Vec<Host>, StoreError>;
    fn host(&self, id: &str) -> Result<Option<Host>, StoreError>;
    /// Marks active hosts whose last heartbeat is before `cutoff_ms` lost, and their jobs.
    fn mark_lost(&self, cutoff_ms: i64) -> Result<Vec<LostHost>, StoreError>;
    /// Marks one active host lost now, and its jobs, because it was stopped on purpose (its
    /// jobs are gone with it; it is active again if it heartbeats). `None` if it was not active.
    fn mark_stopped(&self, host_id: &str) -> Result<Option<LostHost>, StoreError>;
    /// Finished jobs whose GitHub runner has not been removed yet.
    fn runners_to_remove(&self) -> Result<Vec<Job>, StoreError>;
    fn runner_removed(&self, job_id: u64) -> Result<(), StoreError>;
    /// Forgets delivery ids received before `before_ms`; returns how many.
    fn prune_deliveries(&self, before_ms: i64) -> Result<u64, StoreError>;
}

/// A new host's id. Made before the host is stored, so that its certificate (which names it)
/// is signed first and a refused request stores nothing.
pub fn new_host_id() -> String {
    format!("h-{:016x}", rand::random::<u64>())
}

/// Opens the store named by `database` (a URL) or, without one, SQLite in `data_dir`.
pub fn open(database: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match database {
        None => {
            std::fs::create_dir_all(data_dir).map_err(|e| {
                StoreError::Open(format!("cannot create {}: {e}", data_dir.display()))
            })?;
            Ok(Arc::new(SqliteStore::open(&data_dir.join("hopper.db"))?))
        }
        Some(url) => {
            if let Some(path) = url.strip_prefix("sqlite://") {
                if path.is_empty() {
                    return Err(StoreError::Open("sqlite:// URL without a path".into()));
                }
                Ok(Arc::new(SqliteStore::open(Path::new(path))?))
            } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Err(StoreError::Open(
                    "PostgreSQL is not implemented yet; use sqlite://PATH or --data-dir".into(),
                ))
            } else {
                Err(StoreError::Open(
                    "unsupported database URL: expected sqlite://PATH".into(),
                ))
            }
        }
    }
}
