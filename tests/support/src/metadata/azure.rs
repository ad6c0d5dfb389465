//! Azure's instance metadata service, the parts termination notices use: Scheduled Events
//! (`/metadata/scheduledevents`, GET the document, POST `StartRequests` to approve events) and
//! the VM's name. `Metadata: true` and an `api-version` are required (400 without), as Azure
//! requires them.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{serve, Common, Fault, Request, GARBAGE};

#[derive(Default)]
struct State {
    vm_name: String,
    incarnation: Mutex<u64>,
    events: Mutex<Vec<Value>>,
    acknowledged: Mutex<Vec<String>>,
}

pub struct ScheduledEvents {
    pub url: String,
    pub common: Arc<Common>,
    st: Arc<State>,
}

impl ScheduledEvents {
    /// A stand-in for the VM named `vm_name`.
    pub async fn start(vm_name: &str) -> ScheduledEvents {
        let common = Arc::new(Common::default());
        let st = Arc::new(State {
            vm_name: vm_name.to_string(),
            ..State::default()
        });
        let (c, s) = (common.clone(), st.clone());
        let url = serve(common.clone(), move |req| {
            let (c, s) = (c.clone(), s.clone());
            async move { handle(&c, &s, req) }
        })
        .await;
        ScheduledEvents { url, common, st }
    }

    /// Schedules an event (Freeze, Reboot, Redeploy, Preempt, Terminate) for `resources`, not
    /// before `not_before` (None: blank); returns its EventId.
    pub fn schedule(
        &self,
        event_type: &str,
        resources: &[&str],
        not_before: Option<SystemTime>,
    ) -> String {
        let id = uuid();
        let not_before = not_before.map(httpdate::fmt_http_date).unwrap_or_default();
        self.add(json!({
            "EventId": id,
            "EventStatus": "Scheduled",
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": resources,
            "NotBefore": not_before,
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }));
        id
    }

    /// Adds an event as given, whatever it holds.
    pub fn add(&self, event: Value) {
        self.st.events.lock().unwrap().push(event);
        *self.st.incarnation.lock().unwrap() += 1;
    }

    pub fn clear_events(&self) {
        self.st.events.lock().unwrap().clear();
        *self.st.incarnation.lock().unwrap() += 1;
    }

    /// The EventIds approved through StartRequests, in order.
    pub fn acknowledged(&self) -> Vec<String> {
        self.st.acknowledged.lock().unwrap().clone()
    }
}

fn uuid() -> String {
    let h = hex::encode(rand::random::<[u8; 16]>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn bad_request(common: &Common, req: &Request, why: &str) -> Response {
    common.refuse(req, StatusCode::BAD_REQUEST, why)
}

fn handle(common: &Common, st: &State, req: Request) -> Response {
    if req.header("metadata") != Some("true") {
        return bad_request(
            common,
            &req,
            "Bad request. Required metadata header not specified",
        );
    }
    if req.query("api-version").is_none() {
        return bad_request(
            common,
            &req,
            "Bad request. api-version was not specified in the request",
        );
    }
    match (req.method.as_str(), req.uri.path()) {
        ("GET", "/metadata/instance/compute/name") => st.vm_name.clone().into_response(),
        ("GET", "/metadata/scheduledevents") => {
            if common.fault() == Fault::Garbage {
                return (StatusCode::OK, GARBAGE).into_response();
            }
            let doc = json!({
                "DocumentIncarnation": *st.incarnation.lock().unwrap(),
                "Events": st.events.lock().unwrap().clone(),
            });
            Json(doc).into_response()
        }
        ("POST", "/metadata/scheduledevents") => approve(common, st, &req),
        _ => (StatusCode::NOT_FOUND, "Not Found").into_response(),
    }
}

/// `{"StartRequests": [{"EventId": …}]}`: each named event starts now.
fn approve(common: &Common, st: &State, req: &Request) -> Response {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let Some(starts) = body["StartRequests"].as_array() else {
        return bad_request(common, req, "no StartRequests array");
    };
    let mut events = st.events.lock().unwrap();
    for start in starts {
        let id = start["EventId"].as_str().unwrap_or_default();
        let Some(ev) = events.iter_mut().find(|e| e["EventId"] == id) else {
            // A client may well name an event that ended meanwhile: no violation.
            return (StatusCode::BAD_REQUEST, "unknown EventId").into_response();
        };
        ev["EventStatus"] = "Started".into();
        ev["NotBefore"] = "".into();
        st.acknowledged.lock().unwrap().push(id.to_string());
    }
    *st.incarnation.lock().unwrap() += 1;
    StatusCode::OK.into_response()
}
