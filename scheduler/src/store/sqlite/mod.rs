//! SQLite implementation of [`Store`]: one connection behind a mutex (SQLite serialises writers
//! anyway), WAL journal, schema migrations tracked in `PRAGMA user_version`.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

mod evacuation;

use super::{
    Assignment, DeliveryOutcome, Host, HostOrder, HostState, JobChange, JobUpdate, LostHost,
    MigrationReportError, NewHost, ReportError, RunnerGrant, Store, StoreError,
};
use crate::jobs::{transition, Job, JobState, Transition, VmState, LOCAL_JOB_ID_BASE};
use crate::labels::Shape;
use crate::now_ms;
use crate::redact::JitFingerprint;
use crate::secret::Secret;
use hopper_api::{Migration, MigrationMode, MigrationReport, NoticeKind};

/// Ordered schema migrations; entry N brings the schema from version N to N+1. Append only.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    received_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    run_attempt INTEGER NOT NULL,
    repository TEXT NOT NULL,
    installation_id INTEGER,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    conclusion TEXT,
    vcpus INTEGER,
    memory_gb INTEGER,
    image TEXT,
    reason TEXT,
    host_id TEXT REFERENCES hosts(id),
    runner_id INTEGER,
    runner_name TEXT,
    jit_config TEXT,
    vm_state TEXT,
    runner_removed INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    assigned_at INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs(state, created_at, id);
CREATE INDEX jobs_by_host ON jobs(host_id, state);
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    vcpus INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    labels TEXT NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL
);
"#,
    // What log redaction needs of a job's JIT config (see redact.rs), kept after the config
    // itself is dropped.
    "ALTER TABLE jobs ADD COLUMN jit_fingerprint TEXT;",
    // `up` follows jobs by their last change.
    "CREATE INDEX jobs_by_update ON jobs(updated_at);",
    // Evacuation: a job's guest network, a host's notice deadline and pending chaos notice,
    // and each move of a job's VM.
    r#"
ALTER TABLE jobs ADD COLUMN net_slot INTEGER;
ALTER TABLE jobs ADD COLUMN script TEXT;
ALTER TABLE hosts ADD COLUMN deadline INTEGER;
ALTER TABLE hosts ADD COLUMN interrupt_s INTEGER;
CREATE TABLE migrations (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    from_host TEXT NOT NULL REFERENCES hosts(id),
    to_host TEXT NOT NULL REFERENCES hosts(id),
    mode TEXT NOT NULL,
    result TEXT NOT NULL,
    address TEXT,
    paused_ms INTEGER,
    total_ms INTEGER,
    bytes INTEGER,
    message TEXT,
    started_at INTEGER NOT NULL,
    ended_at INTEGER
);
CREATE INDEX migrations_by_job ON migrations(job_id, id);
CREATE INDEX migrations_by_result ON migrations(result);
"#,
];

const JOB_COLUMNS: &str = "id, run_id, run_attempt, repository, installation_id, labels, state, \
     conclusion, vcpus, memory_gb, image, reason, host_id, runner_id, runner_name, vm_state, \
     created_at, assigned_at, updated_at";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
        // WAL + NORMAL: a committed delivery survives a crash of the process; only an OS crash
        // can lose the last few commits.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    /// In-memory store for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        let mut conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn with_tx<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(StoreError::from)?;
        let out = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    /// Row counts, for tests that check nothing was written.
    pub fn row_counts(&self) -> Result<(u64, u64), StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let d = conn.query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0))?;
        let j = conn.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))?;
        Ok((d, j))
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Open(format!(
            "database schema version {version} is newer than this binary knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Job> {
    let labels: String = r.get(5)?;
    let state: String = r.get(6)?;
    let vcpus: Option<u64> = r.get(8)?;
    let memory_gb: Option<u64> = r.get(9)?;
    let vm: Option<String> = r.get(15)?;
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
    };
    Ok(Job {
        id: r.get::<_, i64>(0)? as u64,
        run_id: r.get::<_, i64>(1)? as u64,
        run_attempt: r.get(2)?,
        repository: r.get(3)?,
        installation_id: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        labels: serde_json::from_str(&labels).map_err(|e| bad(format!("labels: {e}")))?,
        state: JobState::parse(&state).ok_or_else(|| bad(format!("job state {state}")))?,
        conclusion: r.get(7)?,
        shape: match vcpus.zip(memory_gb) {
            Some((vcpus, memory_gb)) => {
                Some(Shape::new(vcpus, memory_gb).map_err(|e| bad(e.to_string()))?)
            }
            None => None,
        },
        image: r.get(10)?,
        reason: r.get(11)?,
        host_id: r.get(12)?,
        runner_id: r.get::<_, Option<i64>>(13)?.map(|v| v as u64),
        runner_name: r.get(14)?,
        vm_state: match vm {
            None => None,
            Some(v) => Some(VmState::parse(&v).ok_or_else(|| bad(format!("vm state {v}")))?),
        },
        created_at: r.get(16)?,
        assigned_at: r.get(17)?,
        updated_at: r.get(18)?,
        migrations: Vec::new(),
    })
}

fn get_job(tx: &Connection, id: u64) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    let job = tx
        .prepare_cached(&sql)?
        .query_row([id as i64], job_from_row)
        .optional()?;
    job.map(|mut job| {
        job.migrations = evacuation::of_job(tx, id)?;
        Ok(job)
    })
    .transpose()
}

fn host_by_id(conn: &Connection, id: &str) -> Result<Option<Host>, StoreError> {
    let sql = format!("{HOST_SELECT} WHERE h.id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], host_from_row)
        .optional()?)
}

/// Jobs of a list query, each with its migrations.
fn with_migrations(conn: &Connection, jobs: Vec<Job>) -> Result<Vec<Job>, StoreError> {
    jobs.into_iter()
        .map(|mut job| {
            job.migrations = evacuation::of_job(conn, job.id)?;
            Ok(job)
        })
        .collect()
}

/// The oldest job assigned to the host that the host has not acknowledged with a report.
/// `running` too: GitHub may have given the job to another runner before this host started
/// ours; the JIT runner is still wanted, since a job with these labels is waiting for it.
fn assignment_for(conn: &Connection, host_id: &str) -> Result<Option<Assignment>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS}, jit_config, net_slot, script FROM jobs WHERE host_id = ?1 \
         AND state IN ('assigned', 'running') AND vm_state IS NULL AND jit_config IS NOT NULL \
         ORDER BY assigned_at, id LIMIT 1"
    );
    let found = conn
        .prepare_cached(&sql)?
        .query_row([host_id], |r| {
            Ok((
                job_from_row(r)?,
                r.get::<_, String>(19)?,
                r.get::<_, Option<u32>>(20)?,
                r.get::<_, Option<String>>(21)?,
            ))
        })
        .optional()?;
    Ok(found.map(|(job, jit, slot, script)| Assignment {
        job,
        jit_config: Secret::new(jit),
        // Jobs assigned before slots were kept get the first; only one such job can run.
        net_slot: slot.unwrap_or(0),
        script,
    }))
}

fn apply(tx: &Transaction<'_>, u: &JobUpdate) -> Result<JobChange, StoreError> {
    let now = now_ms();
    let current: Option<String> = tx
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
        .query_row([u.id as i64], |r| r.get(0))
        .optional()?;
    let Some(current) = current else {
        let labels =
            serde_json::to_string(&u.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.prepare_cached(
            "INSERT INTO jobs (id, run_id, run_attempt, repository, installation_id, labels, \
             state, conclusion, vcpus, memory_gb, image, reason, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13)",
        )?
        .execute(params![
            u.id as i64,
            u.run_id as i64,
            u.run_attempt,
            u.repository,
            u.installation_id.map(|v| v as i64),
            labels,
            u.target.as_str(),
            u.conclusion,
            u.shape.map(|s| s.vcpus()),
            u.shape.map(|s| s.memory_gb()),
            u.image,
            u.reason,
            now,
        ])?;
        return Ok(JobChange::Created(u.target));
    };
    let from = JobState::parse(&current).ok_or_else(|| StoreError::Corrupt(current.clone()))?;
    match transition(from, u.target) {
        Err(backwards) => Ok(JobChange::Refused(backwards)),
        Ok(Transition::Unchanged) => Ok(JobChange::Unchanged(from)),
        Ok(Transition::Forward) => {
            tx.prepare_cached(
                "UPDATE jobs SET state = ?2, conclusion = coalesce(?3, conclusion), \
                 installation_id = coalesce(installation_id, ?4), updated_at = ?5 WHERE id = ?1",
            )?
            .execute(params![
                u.id as i64,
                u.target.as_str(),
                u.conclusion,
                u.installation_id.map(|v| v as i64),
                now
            ])?;
            Ok(JobChange::Moved { from, to: u.target })
        }
    }
}

/// Marks a host lost and its assigned and running jobs with it; `why` ends their reason.
fn lose_host(
    tx: &Transaction<'_>,
    host_id: String,
    name: String,
    why: &str,
) -> Result<LostHost, StoreError> {
    tx.execute("UPDATE hosts SET state = 'lost' WHERE id = ?1", [&host_id])?;
    evacuation::fail_open_of_host(tx, &host_id, &format!("host {name} ({host_id}) {why}"))?;
    let jobs: Vec<u64> = tx
        .prepare("SELECT id FROM jobs WHERE host_id = ?1 AND state IN ('assigned', 'running') ORDER BY id")?
        .query_map([&host_id], |r| r.get::<_, i64>(0).map(|v| v as u64))?
        .collect::<Result<_, _>>()?;
    tx.execute(
        "UPDATE jobs SET state = 'lost', reason = ?2, updated_at = ?3 \
         WHERE host_id = ?1 AND state IN ('assigned', 'running')",
        params![host_id, format!("host {name} ({host_id}) {why}"), now_ms()],
    )?;
    Ok(LostHost {
        host_id,
        name,
        jobs,
    })
}

/// A host's used capacity counts its jobs and the VMs on their way to it.
const HOST_SELECT: &str = "SELECT h.id, h.name, h.vcpus, h.memory_mb, h.labels, h.address, \
     h.state, h.enrolled_at, h.last_heartbeat, \
     coalesce((SELECT sum(j.vcpus) FROM jobs j WHERE (j.host_id = h.id OR j.id IN \
        (SELECT m.job_id FROM migrations m WHERE m.to_host = h.id \
         AND m.result IN ('preparing', 'listening', 'sending'))) \
        AND j.state IN ('assigned', 'running') AND coalesce(j.vm_state, '') NOT IN ('finished', 'failed')), 0), \
     coalesce((SELECT sum(j.memory_gb) FROM jobs j WHERE (j.host_id = h.id OR j.id IN \
        (SELECT m.job_id FROM migrations m WHERE m.to_host = h.id \
         AND m.result IN ('preparing', 'listening', 'sending'))) \
        AND j.state IN ('assigned', 'running') AND coalesce(j.vm_state, '') NOT IN ('finished', 'failed')), 0), \
     h.deadline \
     FROM hosts h";

fn host_from_row(r: &Row<'_>) -> rusqlite::Result<Host> {
    let labels: String = r.get(4)?;
    let state: String = r.get(6)?;
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
    };
    Ok(Host {
        id: r.get(0)?,
        name: r.get(1)?,
        vcpus: r.get(2)?,
        memory_mb: r.get::<_, i64>(3)? as u64,
        labels: serde_json::from_str(&labels).map_err(|e| bad(format!("labels: {e}")))?,
        address: r.get(5)?,
        state: HostState::parse(&state).ok_or_else(|| bad(format!("host state {state}")))?,
        deadline: r.get(11)?,
        enrolled_at: r.get(7)?,
        last_heartbeat: r.get(8)?,
        used_vcpus: r.get(9)?,
        used_memory_mb: r.get::<_, i64>(10)? as u64 * 1024,
    })
}

impl Store for SqliteStore {
    fn record_delivery(
        &self,
        delivery_id: &str,
        event: &str,
        update: Option<&JobUpdate>,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.with_tx(|tx| {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO deliveries (id, event, received_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![delivery_id, event, now_ms()])?;
            if inserted == 0 {
                return Ok(DeliveryOutcome::Duplicate);
            }
            let change = update.map(|u| apply(tx, u)).transpose()?;
            Ok(DeliveryOutcome::Recorded(change))
        })
    }

    fn apply_update(&self, update: &JobUpdate) -> Result<JobChange, StoreError> {
        self.with_tx(|tx| apply(tx, update))
    }

    fn create_local_job(
        &self,
        update: &JobUpdate,
        script: Option<&str>,
    ) -> Result<Job, StoreError> {
        self.with_tx(|tx| {
            let base = LOCAL_JOB_ID_BASE as i64;
            let last: i64 = tx.query_row(
                "SELECT coalesce(max(id), ?1) FROM jobs WHERE id > ?1",
                [base],
                |r| r.get(0),
            )?;
            let id = last as u64 + 1;
            let numbered = JobUpdate {
                id,
                run_id: id,
                ..update.clone()
            };
            apply(tx, &numbered)?;
            tx.execute(
                "UPDATE jobs SET script = ?2 WHERE id = ?1",
                params![id as i64, script],
            )?;
            get_job(tx, id)?.ok_or_else(|| StoreError::Corrupt(format!("job {id} not stored")))
        })
    }

    fn job(&self, id: u64) -> Result<Option<Job>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        get_job(&conn, id)
    }

    fn jobs(&self, state: Option<JobState>) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR state = ?1 ORDER BY created_at, id"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([state.map(|s| s.as_str())], job_from_row)?;
        with_migrations(&conn, rows.collect::<Result<_, _>>()?)
    }

    fn jobs_updated_since(&self, since_ms: i64) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE updated_at >= ?1 ORDER BY updated_at, id"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([since_ms], job_from_row)?;
        with_migrations(&conn, rows.collect::<Result<_, _>>()?)
    }

    fn job_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (s, n) = row?;
            out.push((JobState::parse(&s).ok_or(StoreError::Corrupt(s))?, n as u64));
        }
        Ok(out)
    }

    fn assign(&self, job_id: u64, host_id: &str, grant: &RunnerGrant) -> Result<bool, StoreError> {
        let fingerprint = serde_json::to_string(&JitFingerprint::of(&grant.jit_config))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_tx(|tx| {
            let now = now_ms();
            let Some(slot) = evacuation::free_net_slot(tx)? else {
                return Ok(false);
            };
            let n = tx.execute(
                "UPDATE jobs SET state = 'assigned', host_id = ?2, runner_id = ?3, \
                 runner_name = ?4, jit_config = ?5, jit_fingerprint = ?6, assigned_at = ?7, \
                 updated_at = ?7, net_slot = ?8 WHERE id = ?1 AND state = 'queued' \
                 AND EXISTS (SELECT 1 FROM hosts WHERE id = ?2 AND state = 'active')",
                params![
                    job_id as i64,
                    host_id,
                    grant.runner_id as i64,
                    grant.runner_name,
                    grant.jit_config.expose(),
                    fingerprint,
                    now,
                    slot
                ],
            )?;
            Ok(n == 1)
        })
    }

    fn order_for(&self, host_id: &str) -> Result<Option<HostOrder>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(order) = evacuation::order_for(&conn, host_id)? {
            return Ok(Some(order));
        }
        Ok(assignment_for(&conn, host_id)?.map(HostOrder::Run))
    }

    fn record_notice(
        &self,
        host_id: &str,
        kind: NoticeKind,
        deadline: Option<i64>,
    ) -> Result<Option<Host>, StoreError> {
        self.with_tx(|tx| evacuation::record_notice(tx, host_id, kind, deadline))
    }

    fn drain(&self, host_id: &str) -> Result<Option<Host>, StoreError> {
        self.with_tx(|tx| evacuation::drain(tx, host_id))
    }

    fn interrupt(&self, host_id: &str, notice_s: u64) -> Result<Option<Host>, StoreError> {
        self.with_tx(|tx| evacuation::interrupt(tx, host_id, notice_s))
    }

    fn jobs_to_evacuate(&self) -> Result<Vec<(Job, Vec<String>)>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        evacuation::jobs_to_evacuate(&conn)
    }

    fn start_migration(
        &self,
        job_id: u64,
        to: &str,
        mode: MigrationMode,
    ) -> Result<Option<Migration>, StoreError> {
        self.with_tx(|tx| evacuation::start(tx, job_id, to, mode))
    }

    fn report_migration(
        &self,
        host_id: &str,
        id: u64,
        report: &MigrationReport,
    ) -> Result<(Migration, bool), MigrationReportError> {
        self.with_tx(|tx| evacuation::report(tx, host_id, id, report))
    }

    fn expire_migrations(&self, started_before: i64) -> Result<Vec<Migration>, StoreError> {
        self.with_tx(|tx| evacuation::expire(tx, started_before))
    }

    fn finish_evacuations(&self) -> Result<Vec<String>, StoreError> {
        self.with_tx(evacuation::finish)
    }

    fn set_reason(&self, job_id: u64, reason: Option<&str>) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE jobs SET reason = ?2 WHERE id = ?1",
                params![job_id as i64, reason],
            )?;
            Ok(())
        })
    }

    fn report_vm(
        &self,
        host_id: &str,
        job_id: u64,
        vm: VmState,
        message: Option<&str>,
    ) -> Result<Job, ReportError> {
        self.with_tx(|tx| {
            let job = get_job(tx, job_id)?
                .filter(|j| j.host_id.as_deref() == Some(host_id))
                .ok_or(ReportError::NotYours(job_id))?;
            if !vm.can_follow(job.vm_state) {
                return Err(ReportError::VmBackwards {
                    old: job.vm_state.map_or("none", VmState::as_str),
                    new: vm.as_str(),
                });
            }
            let now = now_ms();
            // The JIT config is single-use and the host has it now: stop keeping it.
            tx.execute(
                "UPDATE jobs SET vm_state = ?2, jit_config = NULL, updated_at = ?3 WHERE id = ?1",
                params![job_id as i64, vm.as_str(), now],
            )
            .map_err(StoreError::from)?;
            if let Some(target) = vm.job_state(job.is_local()) {
                if transition(job.state, target) == Ok(Transition::Forward) {
                    // Only a local job completes here, and only when its job command succeeded;
                    // the host's message is then no reason for anything.
                    let (reason, conclusion) = match target {
                        JobState::Completed => (None, Some("success")),
                        _ => (message, None),
                    };
                    tx.execute(
                        "UPDATE jobs SET state = ?2, reason = coalesce(?3, reason), \
                         conclusion = coalesce(?4, conclusion) WHERE id = ?1",
                        params![job_id as i64, target.as_str(), reason, conclusion],
                    )
                    .map_err(StoreError::from)?;
                }
            }
            get_job(tx, job_id)?.ok_or(ReportError::NotYours(job_id))
        })
    }

    fn jit_fingerprint(
        &self,
        host_id: &str,
        job_id: u64,
    ) -> Result<Option<JitFingerprint>, ReportError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let found: Option<Option<String>> = conn
            .prepare_cached("SELECT jit_fingerprint FROM jobs WHERE id = ?1 AND host_id = ?2")
            .and_then(|mut stmt| {
                stmt.query_row(params![job_id as i64, host_id], |r| r.get(0))
                    .optional()
            })
            .map_err(StoreError::from)?;
        let stored = found.ok_or(ReportError::NotYours(job_id))?;
        stored
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("jit_fingerprint: {e}")).into())
            })
            .transpose()
    }

    fn enroll_host(&self, id: &str, host: &NewHost, token_hash: &[u8]) -> Result<Host, StoreError> {
        self.with_tx(|tx| {
            let now = now_ms();
            let labels =
                serde_json::to_string(&host.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO hosts (id, name, token_hash, vcpus, memory_mb, labels, address, \
                 state, enrolled_at, last_heartbeat) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
                params![
                    id,
                    host.name,
                    token_hash,
                    host.vcpus,
                    host.memory_mb as i64,
                    labels,
                    host.address,
                    HostState::Active.as_str(),
                    now
                ],
            )?;
            let sql = format!("{HOST_SELECT} WHERE h.id = ?1");
            Ok(tx.query_row(&sql, [id], host_from_row)?)
        })
    }

    fn host_by_token(&self, token_hash: &[u8]) -> Result<Option<Host>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let sql = format!("{HOST_SELECT} WHERE h.token_hash = ?1");
        let host = conn
            .prepare_cached(&sql)?
            .query_row([token_hash], host_from_row)
            .optional()?;
        Ok(host)
    }

    fn heartbeat(&self, host_id: &str) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.prepare_cached(
                "UPDATE hosts SET last_heartbeat = ?2, \
                 state = CASE state WHEN 'lost' THEN 'active' ELSE state END WHERE id = ?1",
            )?
            .execute(params![host_id, now_ms()])?;
            Ok(())
        })
    }

    fn hosts(&self) -> Result<Vec<Host>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let sql = format!("{HOST_SELECT} ORDER BY h.enrolled_at, h.id");
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([], host_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn host(&self, id: &str) -> Result<Option<Host>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        host_by_id(&conn, id)
    }

    fn mark_lost(&self, cutoff_ms: i64) -> Result<Vec<LostHost>, StoreError> {
        self.with_tx(|tx| {
            let stale: Vec<(String, String)> = tx
                .prepare(
                    "SELECT id, name FROM hosts WHERE state != 'lost' AND last_heartbeat < ?1",
                )?
                .query_map([cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            stale
                .into_iter()
                .map(|(host_id, name)| lose_host(tx, host_id, name, "stopped heartbeating"))
                .collect()
        })
    }

    fn mark_stopped(&self, host_id: &str) -> Result<Option<LostHost>, StoreError> {
        self.with_tx(|tx| {
            let name: Option<String> = tx
                .query_row(
                    "SELECT name FROM hosts WHERE id = ?1 AND state != 'lost'",
                    [host_id],
                    |r| r.get(0),
                )
                .optional()?;
            name.map(|name| lose_host(tx, host_id.to_string(), name, "was stopped"))
                .transpose()
        })
    }

    fn runners_to_remove(&self) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE runner_id IS NOT NULL AND runner_removed = 0 \
             AND state IN ('completed', 'lost', 'failed') ORDER BY updated_at, id"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([], job_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn runner_removed(&self, job_id: u64) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE jobs SET runner_removed = 1, jit_config = NULL WHERE id = ?1",
                [job_id as i64],
            )?;
            Ok(())
        })
    }

    fn prune_deliveries(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.with_tx(|tx| {
            let n = tx.execute("DELETE FROM deliveries WHERE received_at < ?1", [before_ms])?;
            Ok(n as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent_and_newer_schemas_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hopper.db");
        SqliteStore::open(&path).unwrap();
        SqliteStore::open(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(SqliteStore::open(&path), Err(StoreError::Open(_))));
    }

    fn local_job(labels: &[&str]) -> JobUpdate {
        JobUpdate {
            id: 0,
            run_id: 0,
            run_attempt: 1,
            repository: "local/demo".into(),
            installation_id: None,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            target: JobState::Queued,
            conclusion: None,
            shape: Some(Shape::new(1, 1).unwrap()),
            image: Some("ubuntu-24.04".into()),
            reason: None,
        }
    }

    #[test]
    fn local_jobs_are_numbered_above_github_ids_and_end_with_their_vm() {
        let store = SqliteStore::in_memory().unwrap();
        let first = store
            .create_local_job(&local_job(&["hopper"]), None)
            .unwrap();
        let second = store
            .create_local_job(&local_job(&["hopper"]), Some("echo hi"))
            .unwrap();
        assert_eq!(first.id, LOCAL_JOB_ID_BASE + 1);
        assert_eq!((second.id, second.run_id), (first.id + 1, first.id + 1));
        assert!(second.is_local() && second.state == JobState::Queued);

        let host = store
            .enroll_host(
                &crate::store::new_host_id(),
                &NewHost {
                    name: "h".into(),
                    vcpus: 2,
                    memory_mb: 2048,
                    labels: vec![],
                    address: "a".into(),
                    // The store keeps no request.
                    csr: String::new(),
                },
                b"hash",
            )
            .unwrap();
        for job in [&first, &second] {
            let grant = RunnerGrant {
                runner_id: job.id,
                runner_name: format!("r{}", job.id),
                jit_config: Secret::new("cfg"),
            };
            assert!(store.assign(job.id, &host.id, &grant).unwrap());
            store
                .report_vm(&host.id, job.id, VmState::Running, None)
                .unwrap();
        }
        let done = store
            .report_vm(&host.id, first.id, VmState::Finished, Some("exit code 0"))
            .unwrap();
        assert_eq!(done.state, JobState::Completed);
        assert_eq!(done.conclusion.as_deref(), Some("success"));
        assert_eq!(done.reason, None);
        let failed = store
            .report_vm(&host.id, second.id, VmState::Failed, Some("exit code 3"))
            .unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(failed.reason.as_deref(), Some("exit code 3"));
    }

    fn enroll(store: &SqliteStore, name: &str) -> crate::store::Host {
        let host = NewHost {
            name: name.into(),
            vcpus: 2,
            memory_mb: 2048,
            labels: vec![],
            address: "a".into(),
            // The store keeps no request.
            csr: String::new(),
        };
        let id = crate::store::new_host_id();
        store.enroll_host(&id, &host, name.as_bytes()).unwrap()
    }

    /// `up` shows a job's moves by the jobs that changed: each step of a migration is one.
    #[test]
    fn each_step_of_a_migration_is_a_change_of_its_job() {
        let store = SqliteStore::in_memory().unwrap();
        let (a, b) = (enroll(&store, "a"), enroll(&store, "b"));
        let job = store
            .create_local_job(&local_job(&["hopper"]), None)
            .unwrap();
        let grant = RunnerGrant {
            runner_id: job.id,
            runner_name: "r".into(),
            jit_config: Secret::new("cfg"),
        };
        assert!(store.assign(job.id, &a.id, &grant).unwrap());
        store
            .report_vm(&a.id, job.id, VmState::Running, None)
            .unwrap();
        // Every change so far a minute old: what is found after is the step's.
        let changed_by = |step: &dyn Fn()| {
            let conn = store.conn.lock().unwrap();
            conn.execute("UPDATE jobs SET updated_at = updated_at - 60000", [])
                .unwrap();
            drop(conn);
            step();
            let since = now_ms() - 30_000;
            let changed = store.jobs_updated_since(since).unwrap();
            changed.iter().map(|j| j.id).collect::<Vec<_>>()
        };
        let m = std::cell::Cell::new(0);
        let started = changed_by(&|| {
            let started = store.start_migration(job.id, &b.id, MigrationMode::Precopy);
            m.set(started.unwrap().unwrap().id);
        });
        assert_eq!(started, [job.id]);
        let report = |host: &str, r: MigrationReport| {
            store.report_migration(host, m.get(), &r).unwrap();
        };
        let listening = MigrationReport::Listening {
            address: "b:1".into(),
        };
        assert_eq!(changed_by(&|| report(&b.id, listening.clone())), [job.id]);
        let failed = MigrationReport::Failed {
            message: "no".into(),
        };
        assert_eq!(changed_by(&|| report(&b.id, failed.clone())), [job.id]);
        // A late word that changes nothing is no change.
        assert_eq!(
            changed_by(&|| report(&a.id, failed.clone())),
            Vec::<u64>::new()
        );

        let expired = changed_by(&|| {
            let again = store.start_migration(job.id, &b.id, MigrationMode::Precopy);
            assert!(again.unwrap().is_some());
            assert_eq!(store.expire_migrations(now_ms() + 1).unwrap().len(), 1);
        });
        assert_eq!(expired, [job.id]);
    }

    #[test]
    fn pruned_delivery_ids_are_forgotten() {
        let store = SqliteStore::in_memory().unwrap();
        assert_eq!(
            store.record_delivery("d1", "ping", None).unwrap(),
            DeliveryOutcome::Recorded(None)
        );
        assert_eq!(
            store.record_delivery("d1", "ping", None).unwrap(),
            DeliveryOutcome::Duplicate
        );
        assert_eq!(store.prune_deliveries(now_ms() - 60_000).unwrap(), 0);
        assert_eq!(store.prune_deliveries(now_ms() + 1).unwrap(), 1);
        assert_eq!(
            store.record_delivery("d1", "ping", None).unwrap(),
            DeliveryOutcome::Recorded(None)
        );
    }
}
