//! GitHub App client: App JWT (RS256, by octocrab), installation tokens (cached by octocrab per
//! installation and re-minted 30 s before expiry), JIT runner configs, runner removal, and the
//! listings reconciliation needs. Every call backs off on 5xx, rate limits and `Retry-After`;
//! every connection has connect, read and write timeouts (installation clients share the App
//! client's connections, and so its timeouts).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes_body::collect;
use http::{HeaderMap, Method, StatusCode};
use octocrab::models::{AppId, InstallationId};
use octocrab::Octocrab;
use serde::Deserialize;
use serde_json::json;

use crate::jobs::Job;
use crate::secret::Secret;
use crate::store::RunnerGrant;

const MAX_ATTEMPTS: u32 = 5;
/// GitHub's largest page, and how many pages of one listing reconciliation reads.
const PAGE_SIZE: usize = 100;
const MAX_PAGES: usize = 50;
/// Longest single wait; a longer `Retry-After` is cut to this and the call retried anyway.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for a connection to GitHub (TCP and TLS): a healthy API connects in well
/// under a second, so this only ends connections to an address that swallows packets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while GitHub answers (or takes our request's bytes) before the request is
/// given up and retried: long enough for GitHub's slow listings, short enough that a stalled
/// connection does not hold a call forever.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("invalid GitHub App private key: {0}")]
    Key(String),
    #[error("invalid GitHub API URL: {0}")]
    Url(String),
    #[error("job {0} has no installation id; cannot act for it")]
    NoInstallation(u64),
    #[error("repository name {0:?} is not owner/name")]
    BadRepository(String),
    #[error("job {0} has {1} labels; a runner takes 1 to 100")]
    BadLabels(u64, usize),
    #[error("GitHub request {what} failed: {detail}")]
    Request { what: String, detail: String },
    #[error("GitHub answered {status} to {what}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
    },
    #[error("unexpected GitHub response to {what}: {detail}")]
    Decode { what: String, detail: String },
}

/// Where JIT runners are registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerScope {
    Repository,
    Organization,
}

pub struct GitHub {
    app: Octocrab,
    /// One client per installation, shared: octocrab's token cache lives in the client and a
    /// clone starts with its own copy, so clones would each mint tokens.
    installations: tokio::sync::Mutex<HashMap<u64, Arc<Octocrab>>>,
    scope: RunnerScope,
    runner_group_id: u64,
}

impl std::fmt::Debug for GitHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHub")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A job as GitHub's REST API shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct RemoteJob {
    pub id: u64,
    pub run_id: u64,
    #[serde(default)]
    pub run_attempt: Option<u32>,
    pub status: String,
    pub conclusion: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Deleted, or GitHub no longer knows it (JIT runners remove themselves after their job).
    Gone,
    /// GitHub says the runner is running a job (422); try again later.
    Busy,
}

mod bytes_body {
    use http_body_util::BodyExt;

    pub async fn collect(
        resp: http::Response<http_body_util::combinators::BoxBody<bytes::Bytes, octocrab::Error>>,
    ) -> Result<(http::StatusCode, http::HeaderMap, bytes::Bytes), octocrab::Error> {
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }
}

impl GitHub {
    pub fn new(
        api_url: &str,
        app_id: u64,
        private_key_pem: &[u8],
        scope: RunnerScope,
        runner_group_id: u64,
    ) -> Result<Self, GitHubError> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem)
            .map_err(|e| GitHubError::Key(e.to_string()))?;
        let app = Octocrab::builder()
            .base_uri(api_url)
            .map_err(|e| GitHubError::Url(e.to_string()))?
            .app(AppId(app_id), key)
            .set_connect_timeout(Some(CONNECT_TIMEOUT))
            .set_read_timeout(Some(READ_TIMEOUT))
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .build()
            .map_err(|e| GitHubError::Url(e.to_string()))?;
        Ok(GitHub {
            app,
            installations: tokio::sync::Mutex::new(HashMap::new()),
            scope,
            runner_group_id,
        })
    }

    /// The installation's client; octocrab keeps its token and refreshes it 30 s before expiry.
    /// The first token is minted here, under the lock, so concurrent first uses share it.
    async fn installation(&self, id: u64) -> Result<Arc<Octocrab>, GitHubError> {
        let mut map = self.installations.lock().await;
        if let Some(c) = map.get(&id) {
            return Ok(c.clone());
        }
        let mut attempt = 0;
        let (client, _token) = loop {
            attempt += 1;
            match self.app.installation_and_token(InstallationId(id)).await {
                Ok(pair) => break pair,
                Err(e) if retryable(&e) && attempt < MAX_ATTEMPTS => {
                    let wait = exponential(attempt);
                    tracing::warn!(installation = id, error = %describe(&e), wait_ms = wait.as_millis() as u64, "installation token request failed; backing off");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    return Err(GitHubError::Request {
                        what: format!("POST /app/installations/{id}/access_tokens"),
                        detail: describe(&e),
                    })
                }
            }
        };
        let client = Arc::new(client);
        map.insert(id, client.clone());
        Ok(client)
    }

    /// One REST call with backoff. Returns the final status and body; transport errors and
    /// retryable answers are retried up to `MAX_ATTEMPTS` times.
    async fn call(
        &self,
        client: &Octocrab,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, bytes::Bytes), GitHubError> {
        let what = format!("{method} {path}");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = match method {
                Method::POST => client._post(path, body).await,
                Method::DELETE => client._delete(path, body).await,
                _ => client._get(path).await,
            };
            let wait = match sent {
                Ok(resp) => {
                    let (status, headers, bytes) =
                        collect(resp).await.map_err(|e| GitHubError::Request {
                            what: what.clone(),
                            detail: e.to_string(),
                        })?;
                    match retry_wait(status, &headers, &bytes, attempt) {
                        Some(wait) if attempt < MAX_ATTEMPTS => {
                            tracing::warn!(%what, status = status.as_u16(), wait_ms = wait.as_millis() as u64, "GitHub asked to retry; backing off");
                            wait
                        }
                        _ => return Ok((status, bytes)),
                    }
                }
                Err(e) => {
                    if !retryable(&e) || attempt >= MAX_ATTEMPTS {
                        return Err(GitHubError::Request {
                            what,
                            detail: describe(&e),
                        });
                    }
                    let wait = exponential(attempt);
                    tracing::warn!(%what, error = %describe(&e), wait_ms = wait.as_millis() as u64, "GitHub request failed; backing off");
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        client: &Octocrab,
        path: &str,
    ) -> Result<T, GitHubError> {
        let (status, body) = self.call(client, Method::GET, path, None).await?;
        if !status.is_success() {
            return Err(status_error(format!("GET {path}"), status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| GitHubError::Decode {
            what: format!("GET {path}"),
            detail: e.to_string(),
        })
    }

    /// Registers a just-in-time runner for the job (repository level, or organization level
    /// when configured) carrying all the job's labels, so that GitHub can match it.
    pub async fn generate_jitconfig(
        &self,
        job: &Job,
        runner_name: &str,
    ) -> Result<RunnerGrant, GitHubError> {
        let installation = job
            .installation_id
            .ok_or(GitHubError::NoInstallation(job.id))?;
        let (owner, _) = split_repository(&job.repository)?;
        if job.labels.is_empty() || job.labels.len() > 100 {
            return Err(GitHubError::BadLabels(job.id, job.labels.len()));
        }
        let path = match self.scope {
            RunnerScope::Repository => {
                format!(
                    "/repos/{}/actions/runners/generate-jitconfig",
                    job.repository
                )
            }
            RunnerScope::Organization => {
                format!("/orgs/{owner}/actions/runners/generate-jitconfig")
            }
        };
        let body = json!({
            "name": runner_name,
            "runner_group_id": self.runner_group_id,
            "labels": job.labels,
            "work_folder": "_work",
        });
        let client = self.installation(installation).await?;
        let (status, bytes) = self.call(&client, Method::POST, &path, Some(&body)).await?;
        let what = format!("POST {path}");
        if !status.is_success() {
            return Err(status_error(what, status, &bytes));
        }
        #[derive(Deserialize)]
        struct Jit {
            runner: JitRunner,
            encoded_jit_config: String,
        }
        #[derive(Deserialize)]
        struct JitRunner {
            id: u64,
            name: String,
        }
        let jit: Jit = serde_json::from_slice(&bytes).map_err(|e| GitHubError::Decode {
            what,
            detail: e.to_string(),
        })?;
        Ok(RunnerGrant {
            runner_id: jit.runner.id,
            runner_name: jit.runner.name,
            jit_config: Secret::new(jit.encoded_jit_config),
        })
    }

    /// Removes the job's runner registration.
    pub async fn remove_runner(&self, job: &Job, runner_id: u64) -> Result<Removal, GitHubError> {
        let installation = job
            .installation_id
            .ok_or(GitHubError::NoInstallation(job.id))?;
        let (owner, _) = split_repository(&job.repository)?;
        let path = match self.scope {
            RunnerScope::Repository => {
                format!("/repos/{}/actions/runners/{runner_id}", job.repository)
            }
            RunnerScope::Organization => format!("/orgs/{owner}/actions/runners/{runner_id}"),
        };
        let client = self.installation(installation).await?;
        let (status, bytes) = self.call(&client, Method::DELETE, &path, None).await?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(Removal::Gone),
            StatusCode::UNPROCESSABLE_ENTITY => Ok(Removal::Busy),
            s => Err(status_error(format!("DELETE {path}"), s, &bytes)),
        }
    }

    /// Queued jobs of every repository of every installation, with their installation and
    /// repository.
    pub async fn queued_jobs(&self) -> Result<Vec<(u64, String, RemoteJob)>, GitHubError> {
        #[derive(Deserialize)]
        struct Installation {
            id: u64,
        }
        #[derive(Deserialize)]
        struct Repos {
            repositories: Vec<Repo>,
        }
        #[derive(Deserialize)]
        struct Repo {
            full_name: String,
        }
        #[derive(Deserialize)]
        struct Runs {
            workflow_runs: Vec<Run>,
        }
        #[derive(Deserialize)]
        struct Run {
            id: u64,
        }
        #[derive(Deserialize)]
        struct Jobs {
            jobs: Vec<RemoteJob>,
        }
        let installations = self
            .pages(&self.app, "/app/installations?", |v: Vec<Installation>| v)
            .await?;
        let mut out = Vec::new();
        for inst in installations {
            let client = self.installation(inst.id).await?;
            let repos = self
                .pages(&client, "/installation/repositories?", |r: Repos| {
                    r.repositories
                })
                .await?;
            for repo in repos {
                split_repository(&repo.full_name)?;
                // A run with some jobs started is `in_progress` while others still queue.
                for status in ["queued", "in_progress"] {
                    let runs = self
                        .pages(
                            &client,
                            &format!("/repos/{}/actions/runs?status={status}&", repo.full_name),
                            |r: Runs| r.workflow_runs,
                        )
                        .await?;
                    for run in runs {
                        let jobs = self
                            .pages(
                                &client,
                                &format!("/repos/{}/actions/runs/{}/jobs?", repo.full_name, run.id),
                                |j: Jobs| j.jobs,
                            )
                            .await?;
                        out.extend(
                            jobs.into_iter()
                                .filter(|j| j.status == "queued")
                                .map(|j| (inst.id, repo.full_name.clone(), j)),
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every item of a paginated listing: pages of 100 until a short page, at most
    /// `MAX_PAGES`. `query` ends in `?` or `&` so page parameters can follow.
    async fn pages<T, U>(
        &self,
        client: &Octocrab,
        query: &str,
        items: impl Fn(T) -> Vec<U>,
    ) -> Result<Vec<U>, GitHubError>
    where
        T: serde::de::DeserializeOwned,
    {
        let mut out = Vec::new();
        for page in 1..=MAX_PAGES {
            let batch = items(
                self.json(client, &format!("{query}per_page={PAGE_SIZE}&page={page}"))
                    .await?,
            );
            let short = batch.len() < PAGE_SIZE;
            out.extend(batch);
            if short {
                return Ok(out);
            }
        }
        tracing::warn!(
            query,
            "listing longer than {MAX_PAGES} pages; reading the first ones only"
        );
        Ok(out)
    }

    /// GitHub's view of one job, or `None` if GitHub does not know it.
    pub async fn job(&self, job: &Job) -> Result<Option<RemoteJob>, GitHubError> {
        let installation = job
            .installation_id
            .ok_or(GitHubError::NoInstallation(job.id))?;
        split_repository(&job.repository)?;
        let path = format!("/repos/{}/actions/jobs/{}", job.repository, job.id);
        let client = self.installation(installation).await?;
        let (status, bytes) = self.call(&client, Method::GET, &path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(status_error(format!("GET {path}"), status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| GitHubError::Decode {
                what: format!("GET {path}"),
                detail: e.to_string(),
            })
    }
}

/// Checks "owner/name" so it can go into a URL path as is.
pub(crate) fn split_repository(full: &str) -> Result<(&str, &str), GitHubError> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    match full.split_once('/') {
        Some((o, n)) if ok(o) && ok(n) && ![o, n].iter().any(|s| *s == "." || *s == "..") => {
            Ok((o, n))
        }
        _ => Err(GitHubError::BadRepository(full.to_string())),
    }
}

fn status_error(what: String, status: StatusCode, body: &[u8]) -> GitHubError {
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    let message = serde_json::from_slice::<Message>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    GitHubError::Status {
        what,
        status: status.as_u16(),
        message,
    }
}

/// Transport failures, and GitHub's 5xx/429 on the token refresh octocrab does inside a call.
fn retryable(e: &octocrab::Error) -> bool {
    match e {
        octocrab::Error::GitHub { source, .. } => {
            source.status_code.is_server_error()
                || source.status_code == StatusCode::TOO_MANY_REQUESTS
        }
        octocrab::Error::Hyper { .. } | octocrab::Error::Service { .. } => true,
        _ => false,
    }
}

/// octocrab's `Display` for GitHub errors is just "GitHub"; say what GitHub said.
fn describe(e: &octocrab::Error) -> String {
    match e {
        octocrab::Error::GitHub { source, .. } => {
            format!(
                "GitHub answered {}: {}",
                source.status_code.as_u16(),
                source.message
            )
        }
        other => other.to_string(),
    }
}

fn exponential(attempt: u32) -> Duration {
    let base = 250u64 << attempt.min(8);
    Duration::from_millis(base + rand::random::<u64>() % 100).min(MAX_WAIT)
}

/// How long to wait before retrying an answer, or `None` if it should not be retried:
/// 5xx, and 403/429 that are rate limits (with `Retry-After`, an exhausted primary limit, or
/// GitHub's "secondary rate limit" message).
fn retry_wait(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    attempt: u32,
) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
    if status.is_server_error() {
        return Some(
            retry_after
                .map_or_else(|| exponential(attempt), Duration::from_secs)
                .min(MAX_WAIT),
        );
    }
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    if let Some(secs) = retry_after {
        return Some(Duration::from_secs(secs).min(MAX_WAIT));
    }
    if header("x-ratelimit-remaining") == Some("0") {
        let reset = header("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        return Some(Duration::from_secs(reset.saturating_sub(now).max(1)).min(MAX_WAIT));
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    if text.contains("secondary rate limit") {
        // GitHub asks to wait at least a minute when it gives no Retry-After.
        return Some(MAX_WAIT);
    }
    (status == StatusCode::TOO_MANY_REQUESTS).then(|| exponential(attempt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_policy() {
        let none = HeaderMap::new();
        assert_eq!(
            retry_wait(
                StatusCode::SERVICE_UNAVAILABLE,
                &headers(&[("retry-after", "3")]),
                b"",
                1
            ),
            Some(Duration::from_secs(3))
        );
        assert!(retry_wait(StatusCode::BAD_GATEWAY, &none, b"", 1).is_some());
        assert_eq!(
            retry_wait(
                StatusCode::FORBIDDEN,
                &none,
                b"{\"message\":\"Resource not accessible by integration\"}",
                1
            ),
            None
        );
        assert_eq!(
            retry_wait(
                StatusCode::FORBIDDEN,
                &none,
                b"{\"message\":\"You have exceeded a secondary rate limit\"}",
                1
            ),
            Some(MAX_WAIT)
        );
        assert_eq!(
            retry_wait(
                StatusCode::FORBIDDEN,
                &headers(&[("retry-after", "7")]),
                b"",
                1
            ),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_wait(
                StatusCode::FORBIDDEN,
                &headers(&[("retry-after", "7000")]),
                b"",
                1
            ),
            Some(MAX_WAIT)
        );
        assert!(retry_wait(
            StatusCode::FORBIDDEN,
            &headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1")]),
            b"",
            1
        )
        .is_some());
        assert_eq!(retry_wait(StatusCode::NOT_FOUND, &none, b"", 1), None);
        assert_eq!(
            retry_wait(StatusCode::UNPROCESSABLE_ENTITY, &none, b"", 1),
            None
        );
    }

    #[test]
    fn repository_names() {
        assert!(split_repository("octo-org/example.repo_1").is_ok());
        for bad in ["noslash", "a/b/c", "../x", "o/..", "o/", "/r", "o/r?x=1"] {
            assert!(split_repository(bad).is_err(), "{bad}");
        }
    }
}
