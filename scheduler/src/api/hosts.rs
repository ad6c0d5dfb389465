//! Host API: runner hosts enroll with the shared enrollment secret and get a per-host token
//! and a certificate from the fleet CA; with the token they heartbeat, long-poll for
//! assignments, report their VMs, upload their jobs' logs and renew their certificate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hopper_api::host::{DEFAULT_POLL_WAIT_S, MAX_POLL_WAIT_S};
use hopper_api::{
    Assignment, CertificateRequest, Enrolled, InterruptOrder, IssuedCertificate, Order,
    ReceiveOrder, StatusReport,
};
use http_body_util::BodyExt;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{bearer, is_secret, token_hash};
use super::{parse_job_id, parse_json, parse_log_name, ApiError, ErrorBody};
use crate::fleet_ca::CaError;
use crate::joblogs::{LogInfo, LogName, Upload};
use crate::jobs::{Job, VmState};
use crate::labels::DEFAULT_SHAPE;
use crate::secret::Secret;
use crate::server::AppState;
use crate::store::{new_host_id, Host, HostOrder, HostState, NewHost, ReportError};

const DEFAULT_WAIT: Duration = Duration::from_secs(DEFAULT_POLL_WAIT_S);
const MAX_WAIT: Duration = Duration::from_secs(MAX_POLL_WAIT_S);

/// The host a request's bearer token belongs to.
pub struct AuthHost(pub Host);

impl FromRequestParts<Arc<AppState>> for AuthHost {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let unauthorized =
            || ApiError::new(StatusCode::UNAUTHORIZED, "missing or unknown host token");
        let hash = token_hash(bearer(&parts.headers).ok_or_else(unauthorized)?);
        state
            .store(move |s| s.host_by_token(&hash))
            .await?
            .map(AuthHost)
            .ok_or_else(unauthorized)
    }
}

/// Enroll a runner host
///
/// The answer carries the host's certificate for mutual TLS between hosts (live migration),
/// signed by the fleet CA from the request's `csr`. A request that does not parse or whose
/// signature does not hold is refused and nothing is stored.
#[utoipa::path(
    post,
    path = "/api/v1/hosts/enroll",
    tag = "host",
    operation_id = "enrollHost",
    security(("enrollmentSecret" = [])),
    request_body = NewHost,
    responses(
        (status = 201, description = "Enrolled; the token is shown only here", body = Enrolled),
        (status = 400, description = "Invalid body or certificate signing request", body = ErrorBody),
        (status = 401, description = "Wrong enrollment secret", body = ErrorBody),
        (status = 403, description = "Enrollment is off (no `--enroll-secret-file`)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn enroll(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(secret) = &state.enroll_secret else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "enrollment is off: start the scheduler with --enroll-secret-file",
        ));
    };
    if !is_secret(bearer(&headers).unwrap_or_default(), secret) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong enrollment secret",
        ));
    }
    let new: NewHost = parse_json(&body)?;
    new.validate()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    // Signed before anything is stored: a refused request leaves no host behind.
    let id = new_host_id();
    let certificate = state.fleet_ca.sign(&new.csr, &id)?;
    let token = format!("hht_{}", hex::encode(rand::random::<[u8; 32]>()));
    let hash = token_hash(&token);
    let host = state
        .store(move |s| s.enroll_host(&id, &new, &hash))
        .await?;
    tracing::info!(host = %host.id, name = %host.name, vcpus = host.vcpus, memory_mb = host.memory_mb, cert_not_after = certificate.not_after, "host enrolled");
    state.placement_wake.notify_one();
    let heartbeat_interval_s = (state.host_lost_after.as_secs() / 3).max(1);
    Ok((
        StatusCode::CREATED,
        Json(Enrolled {
            host,
            token: Secret::new(token),
            heartbeat_interval_s,
            certificate,
        }),
    )
        .into_response())
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::BadCsr(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            e => ApiError::internal(e),
        }
    }
}

/// Renew this host's certificate
///
/// Signs a new certificate for the key of `csr` (hosts renew once less than half of their
/// certificate's validity is left). Like the one from enrollment it names `hopper-runner` and
/// the host id, whatever the request asks for.
#[utoipa::path(
    post,
    path = "/api/v1/host/certificate",
    tag = "host",
    operation_id = "renewCertificate",
    security(("hostToken" = [])),
    request_body = CertificateRequest,
    responses(
        (status = 200, description = "The new certificate", body = IssuedCertificate),
        (status = 400, description = "Invalid body or certificate signing request", body = ErrorBody),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn certificate(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
    body: Bytes,
) -> Result<Json<IssuedCertificate>, ApiError> {
    let request: CertificateRequest = parse_json(&body)?;
    request
        .validate()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let issued = state.fleet_ca.sign(&request.csr, &host.id)?;
    tracing::info!(host = %host.id, not_after = issued.not_after, "host certificate renewed");
    Ok(Json(issued))
}

/// The answer to a heartbeat.
#[derive(Serialize, ToSchema)]
pub struct Heartbeat {
    /// Always `active`: a lost host that heartbeats is active again.
    state: HostState,
}

/// Heartbeat; a host silent for --host-lost-after is marked lost with its jobs
///
/// A lost host that heartbeats is active again; its lost jobs stay lost.
#[utoipa::path(
    post,
    path = "/api/v1/host/heartbeat",
    tag = "host",
    operation_id = "heartbeat",
    security(("hostToken" = [])),
    responses(
        (status = 200, description = "Recorded", body = Heartbeat),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
) -> Result<Json<Heartbeat>, ApiError> {
    let id = host.id.clone();
    state.store(move |s| s.heartbeat(&id)).await?;
    if host.state == HostState::Lost {
        tracing::warn!(host = %host.id, "lost host is heartbeating again; active again (its lost jobs stay lost)");
        state.placement_wake.notify_one();
    }
    Ok(Json(Heartbeat {
        state: HostState::Active,
    }))
}

/// Long-poll for the host's next order
///
/// In this order: a chaos notice (`interrupt`, acknowledged by the host's notice report); a VM
/// to send to a target that listens (`send`, acknowledged by a `sending` migration report); a VM
/// to receive (`receive`, acknowledged by `listening`); the oldest job assigned to this host
/// that it has not acknowledged with a status report (`run`). Until acknowledged the same order
/// is returned again, so the host must treat orders idempotently (by job or migration id).
/// Counts as a heartbeat.
#[utoipa::path(
    get,
    path = "/api/v1/host/assignment",
    tag = "host",
    operation_id = "nextAssignment",
    security(("hostToken" = [])),
    params(
        // A literal `maximum` (utoipa takes no constants); the OpenAPI test compares it.
        ("wait" = Option<u64>, Query, minimum = 0, maximum = 60,
         description = "Seconds to wait for an assignment (default 25; more than 60 counts as 60)"),
    ),
    responses(
        (status = 200, description = "The next order", body = Order),
        (status = 204, description = "Nothing within the wait"),
        (status = 400, description = "`wait` is not whole seconds", body = ErrorBody),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn assignment(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let wait =
        match q.get("wait") {
            None => DEFAULT_WAIT,
            Some(s) => Duration::from_secs(s.parse::<u64>().map_err(|_| {
                ApiError::new(StatusCode::BAD_REQUEST, "wait must be whole seconds")
            })?)
            .min(MAX_WAIT),
        };
    let deadline = tokio::time::Instant::now() + wait;
    // A waiting host is alive.
    let id = host.id.clone();
    state.store(move |s| s.heartbeat(&id)).await?;
    loop {
        // Register for the wake-up before looking, so an assignment made in between is seen.
        let notified = state.assignments.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let id = host.id.clone();
        if let Some(order) = state.store(move |s| s.order_for(&id)).await? {
            return Ok(Json(order_body(order)).into_response());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// Report the VM of an assigned job
///
/// `running` moves the job to running; `failed` moves it to failed; `finished` frees the host's
/// capacity (GitHub's completed event ends a GitHub job; a local job ends completed). VM states
/// only move forward.
#[utoipa::path(
    post,
    path = "/api/v1/host/jobs/{id}/status",
    tag = "host",
    operation_id = "reportStatus",
    security(("hostToken" = [])),
    params(("id" = u64, Path, description = "The job's id")),
    request_body = StatusReport,
    responses(
        (status = 200, description = "The job afterwards", body = Job),
        (status = 400, description = "Invalid id or body, or a message over 4096 bytes", body = ErrorBody),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 404, description = "Not a job of this host", body = ErrorBody),
        (status = 409, description = "The VM state would move backwards", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn report(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
    Path(job_id): Path<String>,
    body: Bytes,
) -> Result<Json<Job>, ApiError> {
    let job_id = parse_job_id(&job_id)?;
    let report: StatusReport = parse_json(&body)?;
    report
        .check()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let host_id = host.id.clone();
    let vm = report.vm_state;
    let result = state
        .store(move |s| s.report_vm(&host_id, job_id, vm, report.message.as_deref()))
        .await;
    match result {
        Ok(job) => {
            match vm {
                VmState::Failed => {
                    tracing::warn!(job = job_id, host = %host.id, reason = ?job.reason, "host reports the job's VM failed")
                }
                _ => tracing::info!(job = job_id, host = %host.id, vm = vm.as_str(), "VM status"),
            }
            if matches!(vm, VmState::Finished | VmState::Failed) {
                state.placement_wake.notify_one();
            }
            Ok(Json(job))
        }
        Err(e) => Err(e.into()),
    }
}

fn order_body(order: HostOrder) -> Order {
    match order {
        HostOrder::Run(a) => Order::Run(Assignment {
            shape: a.job.shape.unwrap_or(DEFAULT_SHAPE),
            image: a
                .job
                .image
                .clone()
                .unwrap_or_else(|| crate::labels::DEFAULT_IMAGE.into()),
            runner_name: a.job.runner_name.clone().unwrap_or_default(),
            jit_config: a.jit_config,
            net_slot: a.net_slot,
            run: a.script,
            job: a.job,
        }),
        HostOrder::Receive {
            migration,
            job,
            net_slot,
        } => Order::Receive(ReceiveOrder {
            migration,
            shape: job.shape.unwrap_or(DEFAULT_SHAPE),
            runner_name: job.runner_name.clone().unwrap_or_default(),
            net_slot,
            job,
        }),
        HostOrder::Send(send) => Order::Send(send),
        HostOrder::Interrupt { notice_s } => Order::Interrupt(InterruptOrder { notice_s }),
    }
}

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> Self {
        match e {
            // Not 403: whether another host's job exists is none of this host's business.
            ReportError::NotYours(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            ReportError::VmBackwards { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            ReportError::Store(e) => e.into(),
        }
    }
}

/// Upload a log of an assigned job
///
/// Replaces the stored log with the body. Any body size is accepted; only its last 8 MiB are
/// kept (a log's end is where a failure shows). Every occurrence of the JIT config handed out
/// with the job is overwritten, before that cut, with `[redacted JIT config]` padded with `*` to
/// the same length. Only for jobs assigned to this host.
#[utoipa::path(
    put,
    path = "/api/v1/host/jobs/{id}/logs/{name}",
    tag = "host",
    operation_id = "uploadJobLog",
    security(("hostToken" = [])),
    params(
        ("id" = u64, Path, description = "The job's id"),
        ("name" = LogName, Path, description = "Which log"),
    ),
    request_body(content_type = "application/octet-stream", description = "The log's bytes"),
    responses(
        (status = 200, description = "Stored", body = LogInfo),
        (status = 400, description = "Invalid id or log name, or an unreadable body", body = ErrorBody),
        (status = 401, description = "Missing or unknown host token", body = ErrorBody),
        (status = 404, description = "Not a job of this host (nothing is read or stored)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn upload_log(
    State(state): State<Arc<AppState>>,
    AuthHost(host): AuthHost,
    Path((job_id, name)): Path<(String, String)>,
    mut body: Body,
) -> Result<Json<LogInfo>, ApiError> {
    let job_id = parse_job_id(&job_id)?;
    let name = parse_log_name(&name)?;
    // Before the body is read: a refused upload stores nothing.
    let host_id = host.id.clone();
    let fingerprint = state
        .store(move |s| s.jit_fingerprint(&host_id, job_id))
        .await?;
    if fingerprint.is_none() {
        tracing::warn!(
            job = job_id,
            "job assigned before JIT fingerprints were kept: its logs cannot be redacted"
        );
    }
    // Streamed (a `Body` has no size limit): whatever the size, only the end is held.
    let mut upload = Upload::new(fingerprint);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
        })?;
        if let Some(data) = frame.data_ref() {
            upload.push(data);
        }
    }
    let (info, redacted) = state
        .logs(move |l| {
            let (contents, redacted) = upload.finish();
            l.put(job_id, name, &contents).map(|info| (info, redacted))
        })
        .await
        .map_err(ApiError::internal)?;
    if redacted > 0 {
        tracing::warn!(job = job_id, host = %host.id, log = name.as_str(), redacted, "job log contained the job's JIT config; redacted");
    }
    tracing::debug!(job = job_id, host = %host.id, log = name.as_str(), size = info.size, "job log stored");
    Ok(Json(info))
}
