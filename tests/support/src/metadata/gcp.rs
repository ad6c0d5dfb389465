//! GCP's metadata server: `Metadata-Flavor: Google` required (403 without), every answer with
//! that header and an ETag, and long polls: `wait_for_change=true` holds the request until the
//! value changes (at once when `last_etag` names an older value) or `timeout_sec` passes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::{serve, Common, Fault, Request, GARBAGE};

const PREEMPTED: &str = "/computeMetadata/v1/instance/preempted";
const MAINTENANCE: &str = "/computeMetadata/v1/instance/maintenance-event";

struct State {
    /// Each value with its version, whose ETag it answers with.
    preempted: watch::Sender<(String, u64)>,
    maintenance: watch::Sender<(String, u64)>,
    salt: u64,
    waiting: AtomicUsize,
}

pub struct GcpMetadata {
    pub url: String,
    pub common: Arc<Common>,
    st: Arc<State>,
}

impl GcpMetadata {
    pub async fn start() -> GcpMetadata {
        let common = Arc::new(Common::default());
        let st = Arc::new(State {
            preempted: watch::Sender::new(("FALSE".into(), 0)),
            maintenance: watch::Sender::new(("NONE".into(), 0)),
            salt: rand::random(),
            waiting: AtomicUsize::new(0),
        });
        let (c, s) = (common.clone(), st.clone());
        let url = serve(common.clone(), move |req| {
            let (c, s) = (c.clone(), s.clone());
            async move { handle(&c, &s, req).await }
        })
        .await;
        GcpMetadata { url, common, st }
    }

    pub fn set_preempted(&self, preempted: bool) {
        set(&self.st.preempted, if preempted { "TRUE" } else { "FALSE" });
    }

    /// NONE, MIGRATE_ON_HOST_MAINTENANCE, TERMINATE_ON_HOST_MAINTENANCE, or anything else.
    pub fn set_maintenance_event(&self, value: &str) {
        set(&self.st.maintenance, value);
    }

    /// Long polls being held now.
    pub fn waiting(&self) -> usize {
        self.st.waiting.load(Ordering::SeqCst)
    }
}

fn set(key: &watch::Sender<(String, u64)>, value: &str) {
    key.send_modify(|(v, version)| {
        if v != value {
            *v = value.to_string();
            *version += 1;
        }
    });
}

/// Counts a held long poll for as long as it is held, however it ends.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(common: &Common, st: &State, req: Request) -> Response {
    if req.header("metadata-flavor") != Some("Google") {
        return common.refuse(
            &req,
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        );
    }
    if req.method != Method::GET {
        return common.refuse(&req, StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    let key = match req.uri.path() {
        PREEMPTED => &st.preempted,
        MAINTENANCE => &st.maintenance,
        _ => return (StatusCode::NOT_FOUND, "Not Found").into_response(),
    };
    let etag = |version: u64| format!("{:016x}", st.salt ^ version);
    let mut changes = key.subscribe();
    if req.query("wait_for_change").as_deref() == Some("true") {
        let current = etag(changes.borrow_and_update().1);
        if req.query("last_etag").is_none_or(|last| last == current) {
            let secs = req.query("timeout_sec").and_then(|s| s.parse().ok());
            let limit = Duration::from_secs(secs.unwrap_or(3600));
            st.waiting.fetch_add(1, Ordering::SeqCst);
            let _held = Held(&st.waiting);
            let _ = tokio::time::timeout(limit, changes.changed()).await;
        }
    }
    let (value, version) = changes.borrow().clone();
    let body = if common.fault() == Fault::Garbage {
        GARBAGE.to_string()
    } else {
        value
    };
    let headers = [
        ("metadata-flavor", "Google".to_string()),
        ("etag", etag(version)),
        ("content-type", "application/text".to_string()),
    ];
    (StatusCode::OK, headers, body).into_response()
}
