//! Bearer credentials: the operator token (operator API), the enrollment secret (enrollment)
//! and host tokens (`hosts::AuthHost`, the rest of the host API). The webhook is signed
//! instead (`webhook::signature`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ErrorBody;
use crate::secret::Secret;
use crate::server::AppState;

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// SHA-256 of a token: how host tokens are stored and how secrets are compared.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `given` is `secret`. Digests are compared, in constant time, so neither the secret's
/// content nor its length leaks through timing.
pub fn is_secret(given: &str, secret: &Secret) -> bool {
    token_hash(given).ct_eq(&token_hash(secret.expose())).into()
}

/// Proof that a request carries the operator token (`--operator-token-file`). Every operator
/// handler takes it as its first argument, so a request without it is refused before anything
/// else of it is read; the OpenAPI document's `operatorToken` marks the same handlers.
pub struct Operator;

impl FromRequestParts<Arc<AppState>> for Operator {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Response> {
        let refuse = |error: &str| {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(ErrorBody {
                    error: error.into(),
                }),
            )
                .into_response()
        };
        // Off rather than open: a scheduler started without the flag must not serve job logs
        // (which may hold secrets) to whoever reaches its public webhook listener.
        let Some(token) = &state.operator_token else {
            return Err(refuse(
                "the operator API is off: start the scheduler with --operator-token-file",
            ));
        };
        match bearer(&parts.headers) {
            None => Err(refuse(
                "missing operator token: send Authorization: Bearer <token>, the token in \
                 --operator-token-file (up: <data-dir>/operator-token)",
            )),
            Some(given) if is_secret(given, token) => Ok(Operator),
            Some(_) => Err(refuse("wrong operator token")),
        }
    }
}
