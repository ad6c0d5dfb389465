//! Operator API: read-only views of jobs and hosts, health and metrics.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ApiError;
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
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "job id must be a number"))?;
    state
        .store(move |s| s.job(id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))
}

pub async fn hosts(State(state): State<Arc<AppState>>) -> Result<Json<Vec<Host>>, ApiError> {
    Ok(Json(state.store(|s| s.hosts()).await?))
}
