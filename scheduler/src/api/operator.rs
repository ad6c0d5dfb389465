//! Operator API: read-only views of jobs, their logs and hosts, health and metrics. All but
//! the health check take the operator token (`auth::Operator`): job logs may hold secrets, and
//! the scheduler listens where GitHub's webhooks reach it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Operator;
use super::{parse_job_id, parse_log_name, ApiError, ErrorBody};
use crate::joblogs::{LogInfo, LogName};
use crate::jobs::{Job, JobState};
use crate::server::AppState;
use crate::store::Host;

/// The answer of a healthy scheduler.
#[derive(Serialize, ToSchema)]
pub struct Health {
    status: Healthy,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Healthy {
    Ok,
}

/// Liveness and store check
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operator",
    operation_id = "healthz",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 500, description = "The store does not answer", body = ErrorBody),
    ),
)]
pub async fn healthz(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    state.store(|s| s.job_counts()).await?;
    Ok(Json(Health {
        status: Healthy::Ok,
    }))
}

/// Prometheus metrics
///
/// Takes the operator token too: the figures show the fleet's activity and how many forged
/// webhooks were refused. Prometheus sends it with `authorization: {credentials_file: …}`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operator",
    operation_id = "metrics",
    security(("operatorToken" = [])),
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 500, description = "The store does not answer", body = ErrorBody),
    ),
)]
pub async fn metrics(
    _: Operator,
    State(state): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let counts = state.store(|s| s.job_counts()).await?;
    let text = state.metrics.render(&counts);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Jobs in arrival order
#[utoipa::path(
    get,
    path = "/api/v1/jobs",
    tag = "operator",
    operation_id = "listJobs",
    security(("operatorToken" = [])),
    params(("state" = Option<JobState>, Query, description = "Only jobs in this state")),
    responses(
        (status = 200, description = "Jobs", body = Vec<Job>),
        (status = 400, description = "Unknown state", body = ErrorBody),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn jobs(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let filter = match q.get("state") {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("unknown state {s:?}"))
        })?),
    };
    Ok(Json(state.store(move |s| s.jobs(filter)).await?))
}

/// One job
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}",
    tag = "operator",
    operation_id = "getJob",
    security(("operatorToken" = [])),
    params(("id" = u64, Path, description = "GitHub's workflow_job id, or a local job's id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn job(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_job_id(&id)?;
    state
        .store(move |s| s.job(id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))
}

/// The logs the job's host has uploaded
///
/// Empty until the job's host uploads a log (hosts upload them while the job runs and before its
/// final status report).
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/logs",
    tag = "operator",
    operation_id = "listJobLogs",
    security(("operatorToken" = [])),
    params(("id" = u64, Path, description = "GitHub's workflow_job id, or a local job's id")),
    responses(
        (status = 200, description = "Stored logs", body = Vec<LogInfo>),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn job_logs(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<LogInfo>>, ApiError> {
    let id = parse_job_id(&id)?;
    if state.store(move |s| s.job(id)).await?.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    let logs = state
        .logs(move |l| l.list(id))
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(logs))
}

/// One log of a job
///
/// The last 8 MiB of the log as the host last uploaded it, with the job's JIT config redacted.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/logs/{name}",
    tag = "operator",
    operation_id = "getJobLog",
    security(("operatorToken" = [])),
    params(
        ("id" = u64, Path, description = "GitHub's workflow_job id, or a local job's id"),
        ("name" = LogName, Path, description = "Which log"),
    ),
    responses(
        (status = 200, description = "The log's bytes as the job wrote them", body = String, content_type = "text/plain"),
        (status = 400, description = "The id is not a number or the log name is unknown", body = ErrorBody),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 404, description = "The job has no such log", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn job_log(
    _: Operator,
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id)?;
    let name = parse_log_name(&name)?;
    let Some(contents) = state
        .logs(move |l| l.read(id, name))
        .await
        .map_err(ApiError::internal)?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {id} has no {} log", name.as_str()),
        ));
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            // A log is whatever the job printed; a browser must not render it as HTML.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        contents,
    )
        .into_response())
}

/// Enrolled hosts with their usage
#[utoipa::path(
    get,
    path = "/api/v1/hosts",
    tag = "operator",
    operation_id = "listHosts",
    security(("operatorToken" = [])),
    responses(
        (status = 200, description = "Hosts", body = Vec<Host>),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn hosts(
    _: Operator,
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<Host>>, ApiError> {
    Ok(Json(state.store(|s| s.hosts()).await?))
}
