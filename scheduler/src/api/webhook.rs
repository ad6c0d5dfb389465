//! `POST /webhook`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, ErrorBody};
use crate::jobs::JobState;
use crate::server::AppState;
use crate::store::{DeliveryOutcome, JobChange};
use crate::webhook::{intake, signature, IntakeError, MAX_BODY_BYTES};

/// The answer to a delivery that was not refused.
#[derive(Serialize, ToSchema)]
pub struct Delivery {
    status: DeliveryStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Stored.
    Accepted,
    /// Seen before (same `X-GitHub-Delivery`); nothing changed.
    Duplicate,
}

fn answer(status: DeliveryStatus) -> Response {
    (StatusCode::OK, Json(Delivery { status })).into_response()
}

fn reject(state: &AppState, status: StatusCode, reason: &'static str, msg: String) -> Response {
    state.metrics.delivery_rejected(reason);
    tracing::info!(reason, %msg, "webhook delivery rejected");
    ApiError(status, msg).into_response()
}

/// GitHub App webhook delivery
///
/// `workflow_job` events queue, start and end jobs; other events are recorded and change
/// nothing. A delivery is handled once: a redelivery has no second effect.
#[utoipa::path(
    post,
    path = "/webhook",
    tag = "github",
    operation_id = "receiveWebhook",
    params(
        ("X-GitHub-Event" = String, Header, description = "The event's name"),
        ("X-GitHub-Delivery" = String, Header, min_length = 1, max_length = 128,
         description = "Deduplication key: a redelivery has no second effect."),
        ("X-Hub-Signature-256" = String, Header, pattern = "^sha256=[0-9a-f]{64}$",
         description = "HMAC-SHA256 of the raw body with the webhook secret."),
    ),
    request_body(content = Object, description = "The event's payload, at most 25 MiB"),
    responses(
        (status = 200, description = "Stored (`accepted`) or already seen (`duplicate`)", body = Delivery),
        (status = 400, description = "Malformed payload or a missing or invalid header", body = ErrorBody),
        (status = 401, description = "Missing or wrong signature", body = ErrorBody),
        (status = 413, description = "Body over 25 MiB", body = ErrorBody),
        (status = 500, description = "The delivery could not be stored", body = ErrorBody),
    ),
)]
pub async fn receive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        // Answer before reading: the body is never buffered.
        return reject(
            &state,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body over {MAX_BODY_BYTES} bytes"),
        );
    }
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let too_large =
                std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                    .any(|e| e.is::<http_body_util::LengthLimitError>());
            return if too_large {
                reject(
                    &state,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("body over {MAX_BODY_BYTES} bytes"),
                )
            } else {
                reject(
                    &state,
                    StatusCode::BAD_REQUEST,
                    "malformed",
                    "cannot read body".into(),
                )
            };
        }
    };
    let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    if let Err(e) = signature::verify(state.webhook_secret.expose().as_bytes(), sig, &bytes) {
        return reject(&state, StatusCode::UNAUTHORIZED, e.reason(), e.to_string());
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (Some(event), Some(delivery)) = (header("x-github-event"), header("x-github-delivery"))
    else {
        return reject(
            &state,
            StatusCode::BAD_REQUEST,
            "missing_header",
            "X-GitHub-Event and X-GitHub-Delivery are required".into(),
        );
    };
    let st = state.clone();
    let (ev, dl) = (event.clone(), delivery.clone());
    let outcome = state
        .store(move |s| intake(s, &st.label_prefix, &dl, &ev, &bytes))
        .await;
    match outcome {
        Ok(DeliveryOutcome::Duplicate) => {
            state.metrics.delivery_duplicate();
            tracing::debug!(%delivery, %event, "redelivery; already handled");
            answer(DeliveryStatus::Duplicate)
        }
        Ok(DeliveryOutcome::Recorded(change)) => {
            state.metrics.delivery_received();
            match change {
                Some(JobChange::Created(to)) | Some(JobChange::Moved { to, .. }) => {
                    tracing::debug!(%delivery, state = to.as_str(), "job updated");
                    if to == JobState::Queued || !to.holds_capacity() {
                        state.placement_wake.notify_one();
                    }
                }
                Some(JobChange::Refused(b)) => {
                    tracing::info!(%delivery, from = b.from.as_str(), to = b.to.as_str(), "out-of-order event ignored");
                }
                Some(JobChange::Unchanged(_)) | None => {}
            }
            answer(DeliveryStatus::Accepted)
        }
        Err(IntakeError::Malformed(e)) => {
            reject(&state, StatusCode::BAD_REQUEST, "malformed", e.to_string())
        }
        Err(IntakeError::BadDeliveryId) => reject(
            &state,
            StatusCode::BAD_REQUEST,
            "missing_header",
            IntakeError::BadDeliveryId.to_string(),
        ),
        Err(IntakeError::Store(e)) => {
            tracing::error!(error = %e, "cannot store delivery");
            reject(
                &state,
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                "cannot store delivery".into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tower::ServiceExt;

    /// `n` chunks of 1 MiB with no length announced (like a chunked upload).
    struct Chunks(usize);

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(vec![b' '; 1 << 20].into()))))
        }
    }

    /// A body without Content-Length is cut off at the limit, not buffered whole.
    #[tokio::test]
    async fn unannounced_oversized_body_is_413() {
        let state = AppState::for_tests();
        let send = |chunks| {
            let req = Request::post("/webhook")
                .header("x-github-event", "ping")
                .body(Body::new(Chunks(chunks)))
                .unwrap();
            crate::api::router(state.clone()).oneshot(req)
        };
        assert_eq!(
            send(26).await.unwrap().status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        // Within the limit the body is read and judged on its signature.
        assert_eq!(send(2).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        let metrics = state.metrics.render(&[]);
        assert!(metrics.contains("reason=\"too_large\"} 1\n"), "{metrics}");
    }
}
