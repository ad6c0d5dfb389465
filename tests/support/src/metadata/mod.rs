//! Stand-ins for the clouds' instance metadata services: each a separate HTTP server in the test
//! process speaking one cloud's documented protocol for termination notices (AWS IMDSv2, GCP's
//! metadata server, Azure Scheduled Events), headers and tokens checked as the cloud checks
//! them. Controls let a test announce what the cloud would, and make the service misbehave or
//! vanish ([`Fault`]). Requests a real service would refuse are refused here too and recorded
//! as violations.

pub mod aws;
pub mod azure;
pub mod gcp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};

pub use aws::Imds;
pub use azure::ScheduledEvents;
pub use gcp::GcpMetadata;

/// What a misbehaving metadata service does instead of its job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// The notice endpoints answer 200 with a body no cloud sends (a proxy's error page).
    Garbage,
    /// Every request is answered 500.
    ServerError,
    /// New connections are closed at once; requests on connections already open are never
    /// answered.
    Unreachable,
}

/// What a garbage answer says.
pub const GARBAGE: &str = "<html><body><h1>502 Bad Gateway</h1></body></html>";

/// One request as a stand-in's handler gets it.
pub struct Request {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn query(&self, name: &str) -> Option<String> {
        self.uri.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_string())
        })
    }
}

/// What every stand-in keeps besides its cloud's state.
#[derive(Default)]
pub struct Common {
    fault: Mutex<Fault>,
    violations: Mutex<Vec<String>>,
    requests: Mutex<Vec<String>>,
}

impl Common {
    pub fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Records a request the real service would refuse, and returns the refusal.
    pub fn refuse(&self, req: &Request, status: StatusCode, why: &str) -> Response {
        self.violations
            .lock()
            .unwrap()
            .push(format!("{} {}: {why}", req.method, req.uri));
        (status, why.to_string()).into_response()
    }

    /// Requests the real service would have refused.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Every request answered so far, as "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves `handle` on a port of 127.0.0.1 with `common`'s faults applied; returns the base URL.
async fn serve<F, Fut>(common: Arc<Common>, handle: F) -> String
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let gate = Gate {
        inner: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        common: common.clone(),
    };
    let url = format!("http://{}", gate.inner.local_addr().unwrap());
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (common, handle) = (common.clone(), handle.clone());
            async move {
                let req = Request {
                    method,
                    uri,
                    headers,
                    body,
                };
                match common.fault() {
                    Fault::Unreachable => std::future::pending::<Response>().await,
                    Fault::ServerError => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response()
                    }
                    Fault::None | Fault::Garbage => {
                        let line = format!("{} {}", req.method, req.uri);
                        common.requests.lock().unwrap().push(line);
                        handle(req).await
                    }
                }
            }
        },
    );
    tokio::spawn(async move { axum::serve(gate, app).await.unwrap() });
    url
}

/// The listener, which drops new connections while the service is unreachable.
struct Gate {
    inner: TcpListener,
    common: Arc<Common>,
}

impl Listener for Gate {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Ok((io, addr)) = self.inner.accept().await else {
                continue;
            };
            if self.common.fault() != Fault::Unreachable {
                return (io, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
