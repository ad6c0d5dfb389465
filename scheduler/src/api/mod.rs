//! HTTP routes: the GitHub webhook, the host API, the operator API (with local mode's job
//! submission) and the OpenAPI document, which is generated from the same handlers; `auth`
//! checks the bearer credentials of the host and operator APIs.

mod auth;
mod evacuation;
mod hosts;
mod openapi;
mod operator;
mod submit;
mod webhook;

pub use evacuation::interrupt_host;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::joblogs::LogName;
use crate::server::AppState;

/// Every route with its description: the router and the OpenAPI document are both made from
/// this list, each route's method and path taken from its handler's `#[utoipa::path]`. Only
/// `routes!` fit in it, so no path is served undocumented (a test checks the methods).
fn routes() -> OpenApiRouter<Arc<AppState>> {
    [
        // The handler reads the body itself with the 25 MiB limit.
        routes!(webhook::receive).layer(DefaultBodyLimit::disable()),
        routes!(operator::healthz),
        routes!(operator::metrics),
        routes!(openapi::serve),
        routes!(operator::jobs, submit::submit),
        routes!(operator::job),
        routes!(operator::job_logs),
        routes!(operator::job_log),
        routes!(operator::hosts),
        routes!(hosts::enroll),
        routes!(hosts::heartbeat),
        routes!(hosts::certificate),
        routes!(hosts::assignment),
        routes!(hosts::report),
        routes!(hosts::upload_log),
        routes!(evacuation::notice),
        routes!(evacuation::report),
        routes!(evacuation::interrupt),
        routes!(evacuation::drain),
    ]
    .into_iter()
    .fold(
        OpenApiRouter::with_openapi(openapi::base()),
        OpenApiRouter::routes,
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    routes().split_for_parts().0.with_state(state)
}

/// The OpenAPI 3.1 description of every route, served at `/api/v1/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: String,
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
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
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
