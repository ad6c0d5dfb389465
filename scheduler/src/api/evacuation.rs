//! Evacuation routes: a host reports its cloud's notice and how its part of a migration goes;
//! an operator drains a host, or (chaos) gives it a notice as its cloud would.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use hopper_api::evacuation::{MAX_ADDRESS_BYTES, MAX_NOTICE_S};
use hopper_api::host::MAX_MESSAGE_BYTES;
use hopper_api::{Migration, MigrationReport, MigrationResult, NoticeKind, NoticeReport};
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::Operator;
use super::hosts::AuthHost;
use super::{parse_json, ApiError, ErrorBody};
use crate::server::AppState;
use crate::store::{Host, HostState, MigrationReportError};

/// Report a termination notice
///
/// `reclaim`: the host goes away at `deadline`; nothing new is placed there and every running
/// job is moved to another host. `at_risk`: nothing new is placed there. Acknowledges a chaos
/// notice (`interrupt` order).
#[utoipa::path(
    post,
    path = "/api/v1/host/notice",
    tag = "host",
    operation_id = "reportNotice",
    security(("hostToken" = [])),
    request_body = NoticeReport,
    responses(
        (status = 200, description = "The host afterwards", body = Host),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 409, description = "The host is lost", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn notice(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
    body: Bytes,
) -> Result<Json<Host>, ApiError> {
    let report: NoticeReport = parse_json(&body)?;
    if report.source.is_empty() || report.source.len() > 64 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "source must be 1 to 64 bytes",
        ));
    }
    let (id, kind, deadline) = (host.id.clone(), report.kind, report.deadline);
    let after = state
        .store(move |s| s.record_notice(&id, kind, deadline))
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "the host is lost"))?;
    match kind {
        NoticeKind::Reclaim => {
            tracing::warn!(host = %host.id, name = %host.name, source = %report.source, deadline = ?deadline, "termination notice: evacuating the host")
        }
        NoticeKind::AtRisk => {
            tracing::warn!(host = %host.id, name = %host.name, source = %report.source, "the host is at risk: no new jobs go there")
        }
    }
    state.evacuation_wake.notify_one();
    Ok(Json(after))
}

/// Report on a migration
///
/// The target: `listening` (with its address), `committed` (the VM runs there: the job is the
/// target's from now on), or `failed`. The source: `sending`, `sent` (with what it took), or
/// `failed`. Before a commit a failure leaves the job on the source, and it gets another
/// target while its host lives.
#[utoipa::path(
    post,
    path = "/api/v1/host/migrations/{id}",
    tag = "host",
    operation_id = "reportMigration",
    security(("hostToken" = [])),
    params(("id" = u64, Path, description = "The migration's id")),
    request_body = MigrationReport,
    responses(
        (status = 200, description = "The migration afterwards", body = Migration),
        (status = 400, description = "Invalid id or body, or a report of the other side", body = ErrorBody),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 404, description = "No migration of this host", body = ErrorBody),
        (status = 409, description = "The migration is past that point", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn report(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Migration>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "migration id must be a number"))?;
    let report: MigrationReport = parse_json(&body)?;
    let too_long = match &report {
        MigrationReport::Listening { address } => {
            address.is_empty() || address.len() > MAX_ADDRESS_BYTES
        }
        MigrationReport::Failed { message } => message.len() > MAX_MESSAGE_BYTES,
        _ => false,
    };
    if too_long {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("an address of 1 to {MAX_ADDRESS_BYTES} bytes, a message of at most {MAX_MESSAGE_BYTES}"),
        ));
    }
    let host_id = host.id.clone();
    let reported = {
        let r = report.clone();
        state
            .store(move |s| s.report_migration(&host_id, id, &r))
            .await
    };
    let (m, ended) = reported.map_err(|e| match e {
        MigrationReportError::NotYours(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        MigrationReportError::WrongSide(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        MigrationReportError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        MigrationReportError::Store(e) => e.into(),
    })?;
    if ended && m.result == MigrationResult::Succeeded {
        // The target uploads its logs from empty: what the source sent so far stays.
        let job = m.job_id;
        if let Err(e) = state.logs(move |l| l.seal(job)).await {
            tracing::error!(
                migration = id,
                job,
                "cannot keep the logs from the source: {e}"
            );
        }
    }
    // Metrics count a success once its pause is known (the source's `sent`), and a failure
    // when it happens.
    match &report {
        MigrationReport::Listening { .. } => state.assignments.notify_waiters(),
        MigrationReport::Committed if ended => {
            tracing::info!(migration = id, from = %m.from, to = %m.to, "the job's VM runs on its new host")
        }
        MigrationReport::Sent { stats } if m.result == MigrationResult::Succeeded => {
            state
                .metrics
                .migration_ended(true, Some(stats.paused_ms as f64 / 1000.0));
            tracing::info!(migration = id, from = %m.from, to = %m.to, paused_ms = stats.paused_ms, total_ms = stats.total_ms, bytes = stats.bytes, "migration succeeded");
        }
        MigrationReport::Failed { message } if ended => {
            tracing::warn!(migration = id, from = %m.from, to = %m.to, host = %host.id, "migration failed: {message}");
            state.metrics.migration_ended(false, None);
            state.evacuation_wake.notify_one();
        }
        _ => {}
    }
    Ok(Json(m))
}

/// `POST /api/v1/hosts/{id}/interrupt`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Interrupt {
    /// Seconds until the host goes away, 1 to 86400.
    #[schema(minimum = 1, maximum = 86400)]
    pub notice_s: u64,
}

/// Interrupt a host (chaos)
///
/// The host gets a termination notice by its long-poll exactly as from its cloud, and acts on
/// it as on one: it reports it, and its jobs are moved. In local mode, a runner host that
/// `hopper-scheduler up` started is killed when the notice runs out.
#[utoipa::path(
    post,
    path = "/api/v1/hosts/{id}/interrupt",
    tag = "operator",
    operation_id = "interruptHost",
    security(("operatorToken" = [])),
    params(("id" = String, Path, description = "The host's id")),
    request_body = Interrupt,
    responses(
        (status = 202, description = "The notice waits for the host's next long-poll", body = Host),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 409, description = "The host has a notice already, or is lost", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn interrupt(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(host_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    let req: Interrupt = parse_json(&body)?;
    let after = interrupt_host(&state, &host_id, req.notice_s).await?;
    Ok((StatusCode::ACCEPTED, Json(after)))
}

/// What `POST /api/v1/hosts/{id}/interrupt` does once its body is read, for `up --demo
/// evacuate` too: the host gets a chaos notice, and in local mode whoever kills hosts hears of
/// it. Returns the host afterwards.
pub async fn interrupt_host(
    state: &AppState,
    host_id: &str,
    notice_s: u64,
) -> Result<Host, ApiError> {
    if notice_s == 0 || notice_s > MAX_NOTICE_S {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("notice_s must be 1 to {MAX_NOTICE_S}"),
        ));
    }
    let host = existing(state, host_id).await?;
    let id = host.id.clone();
    let after = state
        .store(move |s| s.interrupt(&id, notice_s))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "the host is {}: only a host taking jobs gets a notice",
                    host.state.as_str()
                ),
            )
        })?;
    tracing::warn!(host = %host.id, name = %host.name, notice_s, "chaos: the host gets a termination notice");
    if let Some(kill) = &state.chaos_kill {
        let _ = kill.send((host.id.clone(), std::time::Duration::from_secs(notice_s)));
    }
    state.assignments.notify_waiters();
    Ok(after)
}

/// Drain a host
///
/// For maintenance: nothing new is placed on the host and its running jobs are moved to other
/// hosts (pre-copy: there is no deadline). The host is `evacuated` once none is left. A host
/// already reclaiming or evacuated is answered as it is.
#[utoipa::path(
    post,
    path = "/api/v1/hosts/{id}/drain",
    tag = "operator",
    operation_id = "drainHost",
    security(("operatorToken" = [])),
    params(("id" = String, Path, description = "The host's id")),
    responses(
        (status = 202, description = "Draining", body = Host),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 409, description = "The host is lost", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn drain(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(host_id): Path<String>,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    let host = existing(&state, &host_id).await?;
    if host.state == HostState::Lost {
        return Err(ApiError::new(StatusCode::CONFLICT, "the host is lost"));
    }
    let id = host.id.clone();
    let after = state
        .store(move |s| s.drain(&id))
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "the host is lost"))?;
    tracing::info!(host = %host.id, name = %host.name, "draining the host");
    state.evacuation_wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(after)))
}

async fn existing(state: &AppState, host_id: &str) -> Result<Host, ApiError> {
    let id = host_id.to_string();
    state
        .store(move |s| s.host(&id))
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no host {host_id}")))
}
