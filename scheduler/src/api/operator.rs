//! Operator API: read-only views of jobs, their logs and hosts, health and metrics.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{parse_job_id, parse_log_name, ApiError};
use crate::joblogs::LogInfo;
use crate::jobs::{Job, JobState};
use crate::server::AppState;
use crate::store::Host;

pub async fn healthz(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.store(|s| s.job_counts()).await?;
    Ok(Json(json!({ "status": "ok" })))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
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

pub async fn jobs(
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

pub async fn job(
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

/// The logs the job's host has uploaded (none yet: an empty list).
pub async fn job_logs(
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

pub async fn job_log(
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

pub async fn hosts(State(state): State<Arc<AppState>>) -> Result<Json<Vec<Host>>, ApiError> {
    Ok(Json(state.store(|s| s.hosts()).await?))
}
