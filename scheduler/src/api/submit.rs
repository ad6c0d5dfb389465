//! `POST /api/v1/jobs`: job submission, in local mode only (see `localjobs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::auth::Operator;
use super::{parse_json, ApiError, ErrorBody};
use crate::jobs::Job;
use crate::localjobs::{self, Submission, SubmitError};
use crate::server::AppState;

/// Submit a job (local mode only)
///
/// Only without a GitHub App (local mode): queues a job exactly as a `workflow_job` `queued`
/// webhook would, with the same label grammar, and answers it. Its id is above
/// 9000000000000000, a range GitHub's ids do not reach. Labels that cannot run are refused with
/// 400 and nothing is stored (a webhook's would be kept as `unschedulable`). The job ends
/// `completed` (conclusion `success`) when its VM finishes the job command successfully,
/// `failed` otherwise. Like the rest of the operator API it takes the operator token. With a
/// GitHub App: 405.
#[utoipa::path(
    post,
    path = "/api/v1/jobs",
    tag = "operator",
    operation_id = "submitJob",
    security(("operatorToken" = [])),
    request_body = Submission,
    responses(
        (status = 201, description = "Queued", body = Job,
         headers(("Location" = String, description = "/api/v1/jobs/{id}"))),
        (status = 400, description = "Invalid body or labels that cannot run", body = ErrorBody),
        (status = 401, description = "Missing or wrong operator token, or the operator API is off (no --operator-token-file)", body = ErrorBody),
        (status = 405, description = "A GitHub App is configured: jobs come from GitHub", body = ErrorBody,
         headers(("Allow" = String, description = "`GET`"))),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn submit(
    _: Operator,
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !state.runners.local_mode() {
        // With a GitHub App, jobs come from GitHub; a job made up here would get no runner.
        // Without one, submission is still opt-in: it lets whoever holds the operator token run
        // jobs on the hosts.
        return Ok((
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET")],
            Json(ErrorBody {
                error: "job submission is for local mode only (hopper-scheduler up, or serve \
                        --local-jobs without a GitHub App); with an App, workflows queue jobs \
                        (runs-on: hopper-…)"
                    .into(),
            }),
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
