//! `POST /api/v1/jobs`: job submission, in local mode only (see `localjobs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{parse_json, ApiError};
use crate::localjobs::{self, SubmitError};
use crate::server::AppState;

pub async fn submit(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    if !state.runners.local_mode() {
        // With a GitHub App, jobs come from GitHub; a job made up here would get no runner.
        // Without one, submission is still opt-in: it lets whoever reaches the API run jobs.
        return Ok((
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET")],
            Json(json!({
                "error": "job submission is for local mode only (hopper-scheduler up, or serve \
                          --local-jobs without a GitHub App); with an App, workflows queue jobs \
                          (runs-on: hopper-…)"
            })),
        )
            .into_response());
    }
    let submission = parse_json(&body)?;
    match localjobs::submit(&state, submission).await {
        Ok(job) => Ok((
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/v1/jobs/{}", job.id))],
            Json(job),
        )
            .into_response()),
        Err(SubmitError::Invalid(msg)) => Err(ApiError::new(StatusCode::BAD_REQUEST, msg)),
        Err(SubmitError::Store(e)) => Err(e.into()),
    }
}
