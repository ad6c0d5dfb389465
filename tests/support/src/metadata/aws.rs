//! AWS's instance metadata service in IMDSv2-only mode: a session token from
//! `PUT /latest/api/token` (its TTL header required, 1–21600 s) on every request, 401 without a
//! live one; the spot instance action and the rebalance recommendation 404 until announced.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{serve, Common, Fault, Request, GARBAGE};

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

#[derive(Default)]
struct State {
    /// Live tokens and when each expires.
    tokens: Mutex<Vec<(String, Instant)>>,
    issued: AtomicUsize,
    unauthorized: AtomicUsize,
    instance_action: Mutex<Option<String>>,
    rebalance: Mutex<Option<String>>,
}

pub struct Imds {
    pub url: String,
    pub common: Arc<Common>,
    st: Arc<State>,
}

/// An RFC 3339 time to the second, as AWS writes them.
pub fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t).replace_nanosecond(0).unwrap();
    t.format(&Rfc3339).unwrap()
}

impl Imds {
    pub async fn start() -> Imds {
        let common = Arc::new(Common::default());
        let st = Arc::new(State::default());
        let (c, s) = (common.clone(), st.clone());
        let url = serve(common.clone(), move |req| {
            let (c, s) = (c.clone(), s.clone());
            async move { handle(&c, &s, req) }
        })
        .await;
        Imds { url, common, st }
    }

    /// The two-minute warning: `action` is terminate, stop or hibernate.
    pub fn set_instance_action(&self, action: &str, time: SystemTime) {
        let body = json!({ "action": action, "time": rfc3339(time) }).to_string();
        self.set_instance_action_body(&body);
    }

    /// Whatever body a test wants the instance action to have.
    pub fn set_instance_action_body(&self, body: &str) {
        *self.st.instance_action.lock().unwrap() = Some(body.to_string());
    }

    pub fn clear_instance_action(&self) {
        *self.st.instance_action.lock().unwrap() = None;
    }

    pub fn set_rebalance(&self, notice_time: SystemTime) {
        let body = json!({ "noticeTime": rfc3339(notice_time) }).to_string();
        *self.st.rebalance.lock().unwrap() = Some(body);
    }

    pub fn clear_rebalance(&self) {
        *self.st.rebalance.lock().unwrap() = None;
    }

    /// Every token issued so far stops working, as if its TTL had run out.
    pub fn expire_tokens(&self) {
        self.st.tokens.lock().unwrap().clear();
    }

    pub fn tokens_issued(&self) -> usize {
        self.st.issued.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing, unknown or expired token.
    pub fn unauthorized(&self) -> usize {
        self.st.unauthorized.load(Ordering::SeqCst)
    }
}

fn handle(common: &Common, st: &State, req: Request) -> Response {
    let path = req.uri.path();
    if path == "/latest/api/token" {
        if req.method != Method::PUT {
            return common.refuse(&req, StatusCode::METHOD_NOT_ALLOWED, "token: PUT only");
        }
        let ttl = req.header(TTL_HEADER).and_then(|v| v.parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=21600).contains(t)) else {
            return common.refuse(
                &req,
                StatusCode::BAD_REQUEST,
                "token TTL header missing or out of 1-21600",
            );
        };
        let token = format!("AQAE{}", hex::encode(rand::random::<[u8; 24]>()));
        let expires = Instant::now() + Duration::from_secs(ttl);
        st.tokens.lock().unwrap().push((token.clone(), expires));
        st.issued.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::OK, token).into_response();
    }
    if req.method != Method::GET {
        return common.refuse(&req, StatusCode::METHOD_NOT_ALLOWED, "metadata: GET only");
    }
    let live = req.header(TOKEN_HEADER).is_some_and(|t| {
        let now = Instant::now();
        st.tokens
            .lock()
            .unwrap()
            .iter()
            .any(|(k, exp)| k == t && *exp > now)
    });
    if !live {
        if req.header(TOKEN_HEADER).is_none() {
            return common.refuse(
                &req,
                StatusCode::UNAUTHORIZED,
                "no session token (IMDSv2 only)",
            );
        }
        st.unauthorized.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let slot = match path {
        "/latest/meta-data/spot/instance-action" => &st.instance_action,
        "/latest/meta-data/events/recommendations/rebalance" => &st.rebalance,
        _ => return not_found(),
    };
    if common.fault() == Fault::Garbage {
        return (StatusCode::OK, GARBAGE).into_response();
    }
    match slot.lock().unwrap().clone() {
        Some(body) => (StatusCode::OK, [("content-type", "text/plain")], body).into_response(),
        None => not_found(),
    }
}

fn not_found() -> Response {
    let page = "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<html><head><title>404 - Not Found</title></head><body><h1>404 - Not Found</h1></body></html>";
    (StatusCode::NOT_FOUND, [("content-type", "text/html")], page).into_response()
}
