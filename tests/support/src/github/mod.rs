//! A GitHub API stand-in: a separate HTTP server in the test process speaking GitHub's REST
//! protocol. It accepts only operations that exist in GitHub's OpenAPI description
//! (`@octokit/openapi`), checks request bodies against the description's schemas, verifies the
//! App JWT's RS256 signature with the App's public key, and checks installation tokens.

mod auth;
mod schema;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use jsonwebtoken::DecodingKey;
use serde_json::{json, Value};

pub use auth::{app_key, forged_jwt_rejected};
use auth::{bearer, verify_app_jwt};
use schema::{match_template, resolve, validate};

use crate::fixtures::openapi;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The OpenAPI path template the request matched.
    pub template: String,
    pub path: String,
    pub body: Value,
}

/// A job as the stand-in's Actions API lists it.
#[derive(Debug, Clone)]
pub struct RemoteJob {
    pub id: u64,
    pub run_id: u64,
    pub repository: String,
    pub status: String,
    pub labels: Vec<String>,
}

pub struct GhState {
    pub app_id: u64,
    decoding: DecodingKey,
    pub installation_id: u64,
    /// Issued installation tokens.
    pub tokens: Mutex<Vec<String>>,
    pub requests: Mutex<Vec<Recorded>>,
    /// Anything a real GitHub would have refused.
    pub violations: Mutex<Vec<String>>,
    pub jit_configs: Mutex<Vec<String>>,
    pub deleted_runners: Mutex<Vec<u64>>,
    /// Answer this many generate-jitconfig calls with 503 + Retry-After first.
    pub fail_jit: AtomicU32,
    /// Repositories ("owner/name") whose generate-jitconfig calls are checked and recorded like
    /// any other, then never answered: a GitHub that stopped responding mid-request.
    pub hang_jit: Mutex<Vec<String>>,
    pub repositories: Mutex<Vec<String>>,
    pub jobs: Mutex<Vec<RemoteJob>>,
    next_runner: AtomicU64,
}

pub struct StandIn {
    pub url: String,
    pub state: Arc<GhState>,
}

impl StandIn {
    pub async fn start(app_id: u64, installation_id: u64) -> StandIn {
        let decoding = DecodingKey::from_rsa_pem(app_key().1.as_bytes()).unwrap();
        // Parse the OpenAPI document before serving, outside any request's time budget.
        let _ = openapi();
        let state = Arc::new(GhState {
            app_id,
            decoding,
            installation_id,
            tokens: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            jit_configs: Mutex::new(Vec::new()),
            deleted_runners: Mutex::new(Vec::new()),
            fail_jit: AtomicU32::new(0),
            hang_jit: Mutex::new(Vec::new()),
            repositories: Mutex::new(Vec::new()),
            jobs: Mutex::new(Vec::new()),
            next_runner: AtomicU64::new(1000),
        });
        let st = state.clone();
        let app = Router::new().fallback(move |m: Method, u: Uri, h: HeaderMap, b: Bytes| {
            let st = st.clone();
            async move { handle(&st, m, u, h, b).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        StandIn { url, state }
    }

    pub fn requests_to(&self, template: &str) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.template == template)
            .cloned()
            .collect()
    }

    pub fn assert_no_violations(&self) {
        let v = self.state.violations.lock().unwrap();
        assert!(v.is_empty(), "requests GitHub would refuse: {v:#?}");
    }
}

fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        axum::Json(json!({ "message": msg, "documentation_url": "https://docs.github.com/rest" })),
    )
        .into_response()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// RFC 3339 UTC time for a Unix time (civil-from-days).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn example(name: &str) -> Value {
    openapi()["components"]["examples"][name]["value"].clone()
}

async fn handle(
    st: &GhState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let m = method.as_str().to_ascii_lowercase();
    let Some((template, op)) = match_template(&path, &m) else {
        st.violations.lock().unwrap().push(format!(
            "{method} {path}: no such operation in GitHub's OpenAPI"
        ));
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let body_json: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                st.violations
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path}: body is not JSON: {e}"));
                return error(StatusCode::BAD_REQUEST, "Problems parsing JSON");
            }
        }
    };
    if let Some(rb) = op.get("requestBody") {
        let rb = if let Some(r) = rb.get("$ref").and_then(Value::as_str) {
            resolve(openapi(), r).clone()
        } else {
            rb.clone()
        };
        if body_json.is_null() {
            if rb["required"] == json!(true) {
                st.violations
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path}: required body missing"));
                return error(StatusCode::UNPROCESSABLE_ENTITY, "body required");
            }
        } else {
            let mut errs = Vec::new();
            validate(
                &body_json,
                &rb["content"]["application/json"]["schema"],
                "body",
                &mut errs,
            );
            if !errs.is_empty() {
                st.violations
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path}: {errs:?}"));
                return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request");
            }
        }
    }
    st.requests.lock().unwrap().push(Recorded {
        method: method.to_string(),
        template: template.clone(),
        path: path.clone(),
        body: body_json.clone(),
    });

    let app_level = template.starts_with("/app/");
    if app_level {
        if let Err(e) = verify_app_jwt(st, &headers) {
            st.violations
                .lock()
                .unwrap()
                .push(format!("{method} {path}: {e}"));
            return error(
                StatusCode::UNAUTHORIZED,
                "A JSON web token could not be decoded",
            );
        }
    } else {
        let known =
            bearer(&headers).is_some_and(|t| st.tokens.lock().unwrap().iter().any(|k| k == t));
        if !known {
            st.violations
                .lock()
                .unwrap()
                .push(format!("{method} {path}: no valid installation token"));
            return error(StatusCode::UNAUTHORIZED, "Bad credentials");
        }
    }
    let segs: Vec<&str> = path.split('/').collect();
    match template.as_str() {
        "/app/installations/{installation_id}/access_tokens" => {
            if segs[3] != st.installation_id.to_string() {
                return error(StatusCode::NOT_FOUND, "Not Found");
            }
            let token = format!("ghs_{}", hex::encode(rand::random::<[u8; 18]>()));
            st.tokens.lock().unwrap().push(token.clone());
            let mut v = example("installation-token");
            v["token"] = token.into();
            v["expires_at"] = rfc3339(now_s() + 3600).into();
            (StatusCode::CREATED, axum::Json(v)).into_response()
        }
        "/repos/{owner}/{repo}/actions/runners/generate-jitconfig" | "/orgs/{org}/actions/runners/generate-jitconfig" => {
            let hangs = template.starts_with("/repos/") && {
                let repo = format!("{}/{}", segs[2], segs[3]);
                st.hang_jit.lock().unwrap().contains(&repo)
            };
            if hangs {
                std::future::pending::<()>().await;
            }
            if st.fail_jit.load(Ordering::SeqCst) > 0 {
                st.fail_jit.fetch_sub(1, Ordering::SeqCst);
                let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                return r;
            }
            let id = st.next_runner.fetch_add(1, Ordering::SeqCst);
            let jit = format!("jitcfg_{}", hex::encode(rand::random::<[u8; 24]>()));
            st.jit_configs.lock().unwrap().push(jit.clone());
            let mut v = example("runner-jitconfig");
            v["runner"]["id"] = id.into();
            v["runner"]["name"] = body_json["name"].clone();
            v["encoded_jit_config"] = jit.into();
            (StatusCode::CREATED, axum::Json(v)).into_response()
        }
        "/repos/{owner}/{repo}/actions/runners/{runner_id}" | "/orgs/{org}/actions/runners/{runner_id}" => {
            let id: u64 = segs.last().unwrap().parse().unwrap_or(0);
            st.deleted_runners.lock().unwrap().push(id);
            StatusCode::NO_CONTENT.into_response()
        }
        "/app/installations" => {
            axum::Json(json!([{ "id": st.installation_id, "account": { "login": "octo-org" }, "app_id": st.app_id }])).into_response()
        }
        "/installation/repositories" => {
            let repos: Vec<Value> = st.repositories.lock().unwrap().iter().map(|r| json!({ "full_name": r, "name": r.split('/').nth(1) })).collect();
            axum::Json(json!({ "total_count": repos.len(), "repositories": repos })).into_response()
        }
        "/repos/{owner}/{repo}/actions/runs" => {
            let repo = format!("{}/{}", segs[2], segs[3]);
            let want = uri.query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("status=")).unwrap_or("").to_string();
            let mut runs: Vec<u64> = st.jobs.lock().unwrap().iter()
                .filter(|j| j.repository == repo && (want.is_empty() || j.status == want))
                .map(|j| j.run_id).collect();
            runs.dedup();
            let runs: Vec<Value> = runs.into_iter().map(|id| json!({ "id": id, "status": want })).collect();
            axum::Json(json!({ "total_count": runs.len(), "workflow_runs": runs })).into_response()
        }
        "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs" => {
            let run: u64 = segs[6].parse().unwrap_or(0);
            let jobs: Vec<Value> = st.jobs.lock().unwrap().iter().filter(|j| j.run_id == run).map(job_json).collect();
            let total = jobs.len();
            axum::Json(json!({ "total_count": total, "jobs": page(jobs, &uri) })).into_response()
        }
        "/repos/{owner}/{repo}/actions/jobs/{job_id}" => {
            let id: u64 = segs[6].parse().unwrap_or(0);
            match st.jobs.lock().unwrap().iter().find(|j| j.id == id) {
                Some(j) => axum::Json(job_json(j)).into_response(),
                None => error(StatusCode::NOT_FOUND, "Not Found"),
            }
        }
        other => {
            st.violations.lock().unwrap().push(format!("{method} {path}: stand-in does not serve {other}"));
            error(StatusCode::NOT_IMPLEMENTED, "not in stand-in")
        }
    }
}

/// GitHub's pagination: `per_page` (default 30, max 100) and `page` (from 1).
fn page(items: Vec<Value>, uri: &Uri) -> Vec<Value> {
    let param = |name: &str| {
        uri.query().unwrap_or("").split('&').find_map(|kv| {
            kv.strip_prefix(name)?
                .strip_prefix('=')?
                .parse::<usize>()
                .ok()
        })
    };
    let per_page = param("per_page").unwrap_or(30).min(100);
    let page = param("page").unwrap_or(1).max(1);
    items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect()
}

fn job_json(j: &RemoteJob) -> Value {
    json!({
        "id": j.id, "run_id": j.run_id, "run_attempt": 1, "status": j.status,
        "conclusion": if j.status == "completed" { json!("success") } else { Value::Null },
        "labels": j.labels, "name": "build", "runner_id": null, "runner_name": null,
    })
}
