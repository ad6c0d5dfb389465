//! The store's side of evacuations: host notices, migration records and the orders they give
//! the two hosts of a move, and the fleet-wide guest network slots that let a VM keep its
//! address wherever it goes.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{get_job, host_by_id, HostOrder, MigrationReportError, StoreError};
use crate::now_ms;
use crate::store::Host;
use hopper_api::{
    Job, Migration, MigrationMode, MigrationReport, MigrationResult, NoticeKind, SendOrder,
};

/// /30 networks in the fleet's guest range (a /16).
pub const NET_SLOTS: u32 = 1 << 14;
const OPEN: &str = "('preparing', 'listening', 'sending')";
const COLUMNS: &str = "id, job_id, from_host, to_host, mode, result, paused_ms, total_ms, bytes, \
     message, started_at, ended_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Migration> {
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
    };
    let mode: String = r.get(4)?;
    let result: String = r.get(5)?;
    Ok(Migration {
        id: r.get::<_, i64>(0)? as u64,
        job_id: r.get::<_, i64>(1)? as u64,
        from: r.get(2)?,
        to: r.get(3)?,
        mode: match mode.as_str() {
            "precopy" => MigrationMode::Precopy,
            "postcopy" => MigrationMode::Postcopy,
            other => return Err(bad(format!("migration mode {other}"))),
        },
        result: MigrationResult::parse(&result)
            .ok_or_else(|| bad(format!("migration result {result}")))?,
        paused_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        total_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        bytes: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        message: r.get(9)?,
        started_at: r.get(10)?,
        ended_at: r.get(11)?,
    })
}

fn get(conn: &Connection, id: u64) -> Result<Option<(u64, Migration)>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM migrations WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id as i64], |r| {
            Ok((r.get::<_, i64>(1)? as u64, from_row(r)?))
        })
        .optional()?)
}

/// A migration is part of its job's record, so its changes are the job's (what
/// `jobs_updated_since` finds).
fn touch_job(tx: &Transaction<'_>, job_id: u64, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE jobs SET updated_at = ?2 WHERE id = ?1",
        params![job_id as i64, now],
    )?;
    Ok(())
}

/// A job's migrations, oldest first.
pub fn of_job(conn: &Connection, job_id: u64) -> Result<Vec<Migration>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM migrations WHERE job_id = ?1 ORDER BY id");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([job_id as i64], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The lowest guest network slot no live job holds, `None` when all are taken.
pub fn free_net_slot(tx: &Transaction<'_>) -> Result<Option<u32>, StoreError> {
    let slot: i64 = tx.query_row(
        "WITH used AS (SELECT net_slot AS s FROM jobs WHERE net_slot IS NOT NULL \
           AND state IN ('assigned', 'running') \
           AND coalesce(vm_state, '') NOT IN ('finished', 'failed')) \
         SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM used WHERE s = 0) THEN 0 \
           ELSE (SELECT min(s + 1) FROM used WHERE s + 1 NOT IN (SELECT s FROM used)) END",
        [],
        |r| r.get(0),
    )?;
    Ok(u32::try_from(slot).ok().filter(|s| *s < NET_SLOTS))
}

pub fn order_for(conn: &Connection, host_id: &str) -> Result<Option<HostOrder>, StoreError> {
    let interrupt: Option<i64> = conn
        .prepare_cached("SELECT interrupt_s FROM hosts WHERE id = ?1")?
        .query_row([host_id], |r| r.get(0))
        .optional()?
        .flatten();
    if let Some(notice_s) = interrupt {
        return Ok(Some(HostOrder::Interrupt {
            notice_s: notice_s as u64,
        }));
    }
    let send = conn
        .prepare_cached(
            "SELECT id, job_id, address, mode FROM migrations \
             WHERE from_host = ?1 AND result = 'listening' ORDER BY id LIMIT 1",
        )?
        .query_row([host_id], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })
        .optional()?;
    if let Some((migration, job_id, to, mode)) = send {
        let mode = match mode.as_str() {
            "postcopy" => MigrationMode::Postcopy,
            _ => MigrationMode::Precopy,
        };
        return Ok(Some(HostOrder::Send(SendOrder {
            migration,
            job_id,
            to,
            mode,
        })));
    }
    let receive = conn
        .prepare_cached(
            "SELECT m.id, m.job_id, coalesce(j.net_slot, 0) FROM migrations m \
             JOIN jobs j ON j.id = m.job_id \
             WHERE m.to_host = ?1 AND m.result = 'preparing' ORDER BY m.id LIMIT 1",
        )?
        .query_row([host_id], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, u32>(2)?,
            ))
        })
        .optional()?;
    let Some((migration, job_id, net_slot)) = receive else {
        return Ok(None);
    };
    let job = get_job(conn, job_id)?
        .ok_or_else(|| StoreError::Corrupt(format!("migration {migration} of no job")))?;
    Ok(Some(HostOrder::Receive {
        migration,
        job,
        net_slot,
    }))
}

pub fn record_notice(
    tx: &Transaction<'_>,
    host_id: &str,
    kind: NoticeKind,
    deadline: Option<i64>,
) -> Result<Option<Host>, StoreError> {
    match kind {
        NoticeKind::Reclaim => tx.execute(
            "UPDATE hosts SET state = CASE WHEN state IN ('active', 'at_risk') THEN 'reclaiming' \
             ELSE state END, deadline = ?2, interrupt_s = NULL WHERE id = ?1 AND state != 'lost'",
            params![host_id, deadline],
        )?,
        NoticeKind::AtRisk => tx.execute(
            "UPDATE hosts SET state = CASE state WHEN 'active' THEN 'at_risk' ELSE state END, \
             interrupt_s = NULL WHERE id = ?1 AND state != 'lost'",
            [host_id],
        )?,
    };
    host_by_id(tx, host_id).map(|h| h.filter(|h| h.state != hopper_api::HostState::Lost))
}

pub fn drain(tx: &Transaction<'_>, host_id: &str) -> Result<Option<Host>, StoreError> {
    let n = tx.execute(
        "UPDATE hosts SET state = 'reclaiming' WHERE id = ?1 AND state IN ('active', 'at_risk')",
        [host_id],
    )?;
    if n == 0 {
        return Ok(host_by_id(tx, host_id)?.filter(|h| {
            matches!(
                h.state,
                hopper_api::HostState::Reclaiming | hopper_api::HostState::Evacuated
            )
        }));
    }
    host_by_id(tx, host_id)
}

pub fn interrupt(
    tx: &Transaction<'_>,
    host_id: &str,
    notice_s: u64,
) -> Result<Option<Host>, StoreError> {
    let n = tx.execute(
        "UPDATE hosts SET interrupt_s = ?2 WHERE id = ?1 AND state IN ('active', 'at_risk')",
        params![host_id, notice_s as i64],
    )?;
    if n == 0 {
        return Ok(None);
    }
    host_by_id(tx, host_id)
}

pub fn jobs_to_evacuate(conn: &Connection) -> Result<Vec<(Job, Vec<String>)>, StoreError> {
    let ids: Vec<u64> = conn
        .prepare_cached(&format!(
            "SELECT j.id FROM jobs j JOIN hosts h ON h.id = j.host_id \
             WHERE h.state = 'reclaiming' AND j.state IN ('assigned', 'running') \
             AND j.vm_state = 'running' \
             AND NOT EXISTS (SELECT 1 FROM migrations m WHERE m.job_id = j.id \
               AND m.result IN {OPEN}) \
             ORDER BY j.assigned_at, j.id"
        ))?
        .query_map([], |r| r.get::<_, i64>(0).map(|v| v as u64))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for id in ids {
        let Some(job) = get_job(conn, id)? else {
            continue;
        };
        let failed = job
            .migrations
            .iter()
            .filter(|m| m.result == MigrationResult::Failed)
            .map(|m| m.to.clone())
            .collect();
        out.push((job, failed));
    }
    Ok(out)
}

pub fn start(
    tx: &Transaction<'_>,
    job_id: u64,
    to: &str,
    mode: MigrationMode,
) -> Result<Option<Migration>, StoreError> {
    let from: Option<String> = tx
        .query_row(
            &format!(
                "SELECT j.host_id FROM jobs j WHERE j.id = ?1 \
                 AND j.state IN ('assigned', 'running') AND j.vm_state = 'running' \
                 AND j.host_id != ?2 \
                 AND EXISTS (SELECT 1 FROM hosts h WHERE h.id = ?2 AND h.state = 'active') \
                 AND NOT EXISTS (SELECT 1 FROM migrations m WHERE m.job_id = j.id \
                   AND m.result IN {OPEN})"
            ),
            params![job_id as i64, to],
            |r| r.get(0),
        )
        .optional()?;
    let Some(from) = from else {
        return Ok(None);
    };
    let now = now_ms();
    tx.execute(
        "INSERT INTO migrations (job_id, from_host, to_host, mode, result, started_at) \
         VALUES (?1, ?2, ?3, ?4, 'preparing', ?5)",
        params![job_id as i64, from, to, mode.as_str(), now],
    )?;
    let id = tx.last_insert_rowid() as u64;
    touch_job(tx, job_id, now)?;
    Ok(get(tx, id)?.map(|(_, m)| m))
}

pub fn report(
    tx: &Transaction<'_>,
    host_id: &str,
    id: u64,
    report: &MigrationReport,
) -> Result<(Migration, bool), MigrationReportError> {
    let (job_id, m) = get(tx, id)?
        .filter(|(_, m)| m.from == host_id || m.to == host_id)
        .ok_or(MigrationReportError::NotYours(id))?;
    let from_source = m.from == host_id;
    let (name, by_source) = match report {
        MigrationReport::Listening { .. } => ("listening", false),
        MigrationReport::Sending => ("sending", true),
        MigrationReport::Committed => ("committed", false),
        MigrationReport::Sent { .. } => ("sent", true),
        MigrationReport::Failed { .. } => ("failed", from_source),
    };
    if by_source != from_source {
        return Err(MigrationReportError::WrongSide(name));
    }
    let conflict = || MigrationReportError::Conflict {
        id,
        result: m.result.as_str(),
        report: name,
    };
    let now = now_ms();
    let set = |result: MigrationResult, ended: Option<i64>| -> Result<(), StoreError> {
        tx.execute(
            "UPDATE migrations SET result = ?2, ended_at = coalesce(?3, ended_at) WHERE id = ?1",
            params![id as i64, result.as_str(), ended],
        )?;
        Ok(())
    };
    let hand_over = |to: &str| -> Result<(), StoreError> {
        tx.execute(
            "UPDATE jobs SET host_id = ?2, updated_at = ?3 WHERE id = ?1",
            params![job_id as i64, to, now],
        )?;
        Ok(())
    };
    match (report, m.result) {
        (MigrationReport::Listening { address }, MigrationResult::Preparing) => {
            set(MigrationResult::Listening, None)?;
            tx.execute(
                "UPDATE migrations SET address = ?2 WHERE id = ?1",
                params![id as i64, address],
            )
            .map_err(StoreError::from)?;
        }
        (MigrationReport::Sending, MigrationResult::Listening) => {
            set(MigrationResult::Sending, None)?
        }
        (MigrationReport::Committed | MigrationReport::Sent { .. }, r) if r.is_open() => {
            set(MigrationResult::Succeeded, Some(now))?;
            hand_over(&m.to)?;
        }
        // The other side's word came first.
        (MigrationReport::Committed, MigrationResult::Succeeded) => {}
        (MigrationReport::Sent { .. }, MigrationResult::Succeeded | MigrationResult::Failed) => {}
        (MigrationReport::Failed { message }, r) if r.is_open() => {
            set(MigrationResult::Failed, Some(now))?;
            tx.execute(
                "UPDATE migrations SET message = ?2 WHERE id = ?1",
                params![id as i64, message],
            )
            .map_err(StoreError::from)?;
        }
        // A late failure of a side that had given up already.
        (MigrationReport::Failed { .. }, MigrationResult::Failed) => {}
        _ => return Err(conflict()),
    }
    if let MigrationReport::Sent { stats } = report {
        tx.execute(
            "UPDATE migrations SET paused_ms = ?2, total_ms = ?3, bytes = ?4 WHERE id = ?1",
            params![
                id as i64,
                stats.paused_ms as i64,
                stats.total_ms as i64,
                stats.bytes as i64
            ],
        )
        .map_err(StoreError::from)?;
    }
    let after = get(tx, id)?
        .map(|(_, m)| m)
        .ok_or(MigrationReportError::NotYours(id))?;
    if after != m {
        touch_job(tx, job_id, now)?;
    }
    let ended = m.result.is_open() && !after.result.is_open();
    Ok((after, ended))
}

fn fail_where(
    tx: &Transaction<'_>,
    condition: &str,
    args: &[&dyn rusqlite::ToSql],
    message: &str,
) -> Result<Vec<Migration>, StoreError> {
    let ids: Vec<i64> = tx
        .prepare(&format!(
            "SELECT id FROM migrations WHERE result IN {OPEN} AND {condition}"
        ))?
        .query_map(args, |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let now = now_ms();
    let mut out = Vec::new();
    for id in ids {
        tx.execute(
            "UPDATE migrations SET result = 'failed', message = ?2, ended_at = ?3 WHERE id = ?1",
            params![id, message, now],
        )?;
        if let Some((job_id, m)) = get(tx, id as u64)? {
            touch_job(tx, job_id, now)?;
            out.push(m);
        }
    }
    Ok(out)
}

pub fn expire(tx: &Transaction<'_>, started_before: i64) -> Result<Vec<Migration>, StoreError> {
    fail_where(
        tx,
        "result IN ('preparing', 'listening') AND started_at < ?1",
        &[&started_before],
        "its hosts did not take their orders in time",
    )
}

/// A host that is lost takes its open migrations with it.
pub fn fail_open_of_host(
    tx: &Transaction<'_>,
    host_id: &str,
    why: &str,
) -> Result<Vec<Migration>, StoreError> {
    fail_where(tx, "(from_host = ?1 OR to_host = ?1)", &[&host_id], why)
}

pub fn finish(tx: &Transaction<'_>) -> Result<Vec<String>, StoreError> {
    let ids: Vec<String> = tx
        .prepare(
            "SELECT h.id FROM hosts h WHERE h.state = 'reclaiming' AND NOT EXISTS \
             (SELECT 1 FROM jobs j WHERE j.host_id = h.id AND j.state IN ('assigned', 'running') \
              AND coalesce(j.vm_state, '') NOT IN ('finished', 'failed'))",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        tx.execute("UPDATE hosts SET state = 'evacuated' WHERE id = ?1", [id])?;
    }
    Ok(ids)
}
