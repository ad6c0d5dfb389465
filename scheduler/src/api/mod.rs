//! HTTP routes: the GitHub webhook, the host API, the operator API (with local mode's job
//! submission) and the OpenAPI document.

mod hosts;
mod operator;
mod submit;
mod webhook;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use crate::joblogs::LogName;
use crate::server::AppState;

/// The OpenAPI 3.1 description of every route below (kept by hand; a test checks that each
/// documented path is served and each served path is documented).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/webhook",
            // The handler reads the body itself with the 25 MiB limit.
            post(webhook::receive).layer(DefaultBodyLimit::disable()),
        )
        .route("/healthz", get(operator::healthz))
        .route("/metrics", get(operator::metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/jobs", get(operator::jobs).post(submit::submit))
        .route("/api/v1/jobs/{id}", get(operator::job))
        .route("/api/v1/jobs/{id}/logs", get(operator::job_logs))
        .route("/api/v1/jobs/{id}/logs/{name}", get(operator::job_log))
        .route("/api/v1/hosts", get(operator::hosts))
        .route("/api/v1/hosts/enroll", post(hosts::enroll))
        .route("/api/v1/host/heartbeat", post(hosts::heartbeat))
        .route("/api/v1/host/assignment", get(hosts::assignment))
        .route("/api/v1/host/jobs/{id}/status", post(hosts::report))
        .route("/api/v1/host/jobs/{id}/logs/{name}", put(hosts::upload_log))
        .with_state(state)
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
        .into_response()
}

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError(status, msg.into())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// The `{id}` of a job path.
pub fn parse_job_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "job id must be a number"))
}

/// The `{name}` of a job log path.
pub fn parse_log_name(name: &str) -> Result<LogName, ApiError> {
    LogName::parse(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown log {name:?}: expected console, vmm or job"),
        )
    })
}

/// Parses a JSON body with a clear 400 on failure (axum's extractor answers 422 with text).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}
