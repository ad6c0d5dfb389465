//! Client of the scheduler's host API (scheduler/README.md, "Host API"): enrollment,
//! heartbeat, long-polled assignments, VM status reports and job log uploads.

use std::time::Duration;

use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::jobdir::Log;
use super::secret::Secret;

/// How long the scheduler may hold an assignment request open (it caps `wait` at 60 s).
pub const POLL_WAIT: Duration = Duration::from_secs(25);
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

/// What a host tells the scheduler about itself when it enrolls.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub labels: Vec<String>,
    pub address: String,
}

#[derive(Debug, Deserialize)]
pub struct Enrolled {
    pub host: EnrolledHost,
    pub token: Secret,
    pub heartbeat_interval_s: u64,
}

#[derive(Debug, Deserialize)]
pub struct EnrolledHost {
    pub id: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_gb: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AssignedJob {
    pub id: u64,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub repository: Option<String>,
}

/// A job to run: the VM shape and the runner's single-use JIT config.
#[derive(Debug, Clone, Deserialize)]
pub struct Assignment {
    pub job: AssignedJob,
    pub shape: Shape,
    pub image: String,
    pub runner_name: String,
    pub jit_config: Secret,
}

/// A VM's state as the host reports it; the scheduler only accepts forward moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Starting,
    Running,
    Finished,
    Failed,
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
            // Long polls set their own, longer limit.
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

    fn send(&self, what: &str, req: RequestBuilder) -> Result<Response, ApiError> {
        let resp = req.send().map_err(|e| ApiError::Transport {
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

    pub fn enroll(&self, enroll_secret: &Secret, info: &HostInfo) -> Result<Enrolled, ApiError> {
        let what = "enrollment";
        let req = self
            .http
            .post(format!("{}/api/v1/hosts/enroll", self.base))
            .bearer_auth(enroll_secret.expose())
            .json(info);
        self.send(what, req)?.json().map_err(|e| ApiError::Body {
            what: what.into(),
            cause: chain(&e),
        })
    }

    pub fn heartbeat(&self, token: &Secret) -> Result<(), ApiError> {
        let req = self
            .http
            .post(format!("{}/api/v1/host/heartbeat", self.base))
            .bearer_auth(token.expose());
        self.send("heartbeat", req).map(drop)
    }

    /// Waits up to [`POLL_WAIT`] for an assignment. The same job is handed out again until a
    /// status is reported for it, so callers must treat assignments idempotently.
    pub fn next_assignment(&self, token: &Secret) -> Result<Option<Assignment>, ApiError> {
        let what = "assignment poll";
        let req = self
            .http
            .get(format!(
                "{}/api/v1/host/assignment?wait={}",
                self.base,
                POLL_WAIT.as_secs()
            ))
            .timeout(POLL_WAIT + CALL_TIMEOUT)
            .bearer_auth(token.expose());
        let resp = self.send(what, req)?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json().map(Some).map_err(|e| ApiError::Body {
            what: what.into(),
            cause: chain(&e),
        })
    }

    pub fn report(
        &self,
        token: &Secret,
        job: u64,
        vm_state: VmState,
        message: Option<&str>,
    ) -> Result<Reported, ApiError> {
        let body = match message {
            // The scheduler refuses messages over 4096 bytes; keep the start, on a char boundary.
            Some(m) => serde_json::json!({ "vm_state": vm_state, "message": truncate(m, 4000) }),
            None => serde_json::json!({ "vm_state": vm_state }),
        };
        let req = self
            .http
            .post(format!("{}/api/v1/host/jobs/{job}/status", self.base))
            .bearer_auth(token.expose())
            .json(&body);
        match self.send("status report", req) {
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

    /// Replaces one of the job's logs at the scheduler with `body`.
    pub fn upload_log(
        &self,
        token: &Secret,
        job: u64,
        log: Log,
        body: Body,
    ) -> Result<(), ApiError> {
        let req = self
            .http
            .put(format!(
                "{}/api/v1/host/jobs/{job}/logs/{}",
                self.base,
                log.name()
            ))
            .timeout(UPLOAD_TIMEOUT)
            .bearer_auth(token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send("log upload", req).map(drop)
    }
}

/// A reqwest error with its causes ("connection refused" is only in the chain), as one line.
fn chain(e: &reqwest::Error) -> String {
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

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_parses_the_schedulers_answer_and_hides_the_jit_config() {
        let a: Assignment = serde_json::from_value(serde_json::json!({
            "job": { "id": 7, "labels": ["hopper-1cpu-1gb"], "repository": "o/r", "state": "assigned" },
            "shape": { "vcpus": 1, "memory_gb": 1 },
            "image": "ubuntu-24.04",
            "runner_name": "hopper-7",
            "jit_config": "jitcfg_secret"
        }))
        .unwrap();
        assert_eq!(a.job.id, 7);
        assert_eq!(a.jit_config.expose(), "jitcfg_secret");
        assert!(!format!("{a:?}").contains("jitcfg_secret"));
    }

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

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = "é".repeat(3000);
        let t = truncate(&s, 4000);
        assert!(t.len() <= 4000 && t.chars().all(|c| c == 'é'));
        assert_eq!(truncate("short", 4000), "short");
    }
}
