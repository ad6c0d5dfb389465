//! Client of the scheduler's host API (scheduler/README.md, "Host API"): enrollment,
//! heartbeat, long-polled assignments, VM status reports, job log uploads and certificate
//! renewal. Every call has a deadline, so a scheduler that stops answering holds up no task
//! forever.

use std::time::Duration;

use hopper_api::host::DEFAULT_POLL_WAIT_S;
use hopper_api::{
    CertificateRequest, Enrolled, IssuedCertificate, LogName, MigrationReport, NewHost,
    NoticeReport, Order, Secret, StatusReport, VmState,
};
use reqwest::{Client, RequestBuilder, Response, StatusCode};

/// How long the scheduler may hold an assignment request open.
pub const POLL_WAIT: Duration = Duration::from_secs(DEFAULT_POLL_WAIT_S);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for calls that are not long polls or uploads.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for a log upload: some MiB, perhaps over a slow link.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("cannot reach the scheduler at {url}: {cause}")]
    Transport { url: String, cause: String },
    /// The token is not (or no longer) known to the scheduler.
    #[error("the scheduler refused the host token ({0})")]
    Unauthorized(String),
    #[error("the scheduler answered {status} to {what}: {message}")]
    Status {
        what: String,
        status: StatusCode,
        message: String,
    },
    #[error("the scheduler's answer to {what} is not what this runner understands: {cause}")]
    Body { what: String, cause: String },
}

/// The outcome of a status report the caller may need to tell apart.
#[derive(Debug, PartialEq, Eq)]
pub enum Reported {
    Accepted,
    /// 409: the job is already past this state (e.g. reported before a restart).
    AlreadyPast,
    /// 404: the job is not (or no longer) this host's.
    NotOurs,
}

#[derive(Clone)]
pub struct SchedulerClient {
    base: String,
    http: Client,
}

impl SchedulerClient {
    pub fn new(base: &str) -> Result<Self, ApiError> {
        let url_ok = reqwest::Url::parse(base)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if !url_ok {
            return Err(ApiError::BadUrl(base.to_string()));
        }
        let base = base.trim_end_matches('/').to_string();
        let http = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // Long polls and uploads set their own, longer limit.
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| ApiError::Transport {
                url: base.clone(),
                cause: chain(&e),
            })?;
        Ok(Self { base, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, what: &str, req: RequestBuilder) -> Result<Response, ApiError> {
        let resp = req.send().await.map_err(|e| ApiError::Transport {
            url: self.base.clone(),
            cause: chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // Error bodies are `{"error": "..."}`; they never echo secrets back.
        let message = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::Unauthorized(message));
        }
        Err(ApiError::Status {
            what: what.to_string(),
            status,
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        what: &str,
        resp: Response,
    ) -> Result<T, ApiError> {
        resp.json().await.map_err(|e| ApiError::Body {
            what: what.into(),
            cause: chain(&e),
        })
    }

    pub async fn enroll(
        &self,
        enroll_secret: &Secret,
        info: &NewHost,
    ) -> Result<Enrolled, ApiError> {
        let what = "enrollment";
        let req = self
            .http
            .post(format!("{}/api/v1/hosts/enroll", self.base))
            .bearer_auth(enroll_secret.expose())
            .json(info);
        Self::json(what, self.send(what, req).await?).await
    }

    pub async fn heartbeat(&self, token: &Secret) -> Result<(), ApiError> {
        let req = self
            .http
            .post(format!("{}/api/v1/host/heartbeat", self.base))
            .bearer_auth(token.expose());
        self.send("heartbeat", req).await.map(drop)
    }

    /// A new certificate for the key of `csr` (PEM) from the fleet CA.
    pub async fn renew_certificate(
        &self,
        token: &Secret,
        csr: String,
    ) -> Result<IssuedCertificate, ApiError> {
        let what = "certificate renewal";
        let req = self
            .http
            .post(format!("{}/api/v1/host/certificate", self.base))
            .bearer_auth(token.expose())
            .json(&CertificateRequest { csr });
        Self::json(what, self.send(what, req).await?).await
    }

    /// Waits up to [`POLL_WAIT`] for the next order. An order comes again until the host acts
    /// on it (reports), so callers must treat orders idempotently.
    pub async fn next_order(&self, token: &Secret) -> Result<Option<Order>, ApiError> {
        let what = "order poll";
        let req = self
            .http
            .get(format!(
                "{}/api/v1/host/assignment?wait={}",
                self.base,
                POLL_WAIT.as_secs()
            ))
            .timeout(POLL_WAIT + CALL_TIMEOUT)
            .bearer_auth(token.expose());
        let resp = self.send(what, req).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Self::json(what, resp).await.map(Some)
    }

    pub async fn report(
        &self,
        token: &Secret,
        job: u64,
        vm_state: VmState,
        message: Option<&str>,
    ) -> Result<Reported, ApiError> {
        let req = self
            .http
            .post(format!("{}/api/v1/host/jobs/{job}/status", self.base))
            .bearer_auth(token.expose())
            .json(&StatusReport::new(vm_state, message));
        match self.send("status report", req).await {
            Ok(_) => Ok(Reported::Accepted),
            Err(ApiError::Status {
                status: StatusCode::CONFLICT,
                ..
            }) => Ok(Reported::AlreadyPast),
            Err(ApiError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(Reported::NotOurs),
            Err(e) => Err(e),
        }
    }

    pub async fn report_notice(
        &self,
        token: &Secret,
        notice: &NoticeReport,
    ) -> Result<(), ApiError> {
        let req = self
            .http
            .post(format!("{}/api/v1/host/notice", self.base))
            .bearer_auth(token.expose())
            .json(notice);
        self.send("notice report", req).await.map(drop)
    }

    pub async fn report_migration(
        &self,
        token: &Secret,
        migration: u64,
        report: &MigrationReport,
    ) -> Result<(), ApiError> {
        let req = self
            .http
            .post(format!("{}/api/v1/host/migrations/{migration}", self.base))
            .bearer_auth(token.expose())
            .json(report);
        self.send("migration report", req).await.map(drop)
    }

    /// Replaces one of the job's logs at the scheduler with `body`.
    pub async fn upload_log(
        &self,
        token: &Secret,
        job: u64,
        log: LogName,
        body: Vec<u8>,
    ) -> Result<(), ApiError> {
        let req = self
            .http
            .put(format!(
                "{}/api/v1/host/jobs/{job}/logs/{}",
                self.base,
                log.as_str()
            ))
            .timeout(UPLOAD_TIMEOUT)
            .bearer_auth(token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send("log upload", req).await.map(drop)
    }
}

/// A reqwest error with its causes ("connection refused" is only in the chain), as one line.
pub(super) fn chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(SchedulerClient::new("http://10.0.2.2:8080/").is_ok());
        assert!(SchedulerClient::new("https://hopper.example.com").is_ok());
        for bad in ["10.0.2.2:8080", "ftp://x", "http://", "hopper"] {
            assert!(
                matches!(SchedulerClient::new(bad), Err(ApiError::BadUrl(_))),
                "{bad}"
            );
        }
    }
}
