//! The OpenAPI document's frame (info, tags, security schemes) and its route. Its paths and
//! schemas come from the handlers' `#[utoipa::path]` attributes and the API types.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hopper scheduler API",
        version = "1",
        description = "GitHub webhook intake, the host API used by runner hosts (hopper-runner \
                       host), and the operator API (jobs, their logs, hosts, metrics; read-only \
                       except job submission in local mode). Host endpoints take \
                       `Authorization: Bearer <token>` where the token comes from enrollment; \
                       enrollment takes `Authorization: Bearer <enrollment secret>`; the \
                       operator API takes `Authorization: Bearer <operator token>` \
                       (--operator-token-file) except /healthz and this document."
    ),
    tags(
        (name = "github", description = "GitHub App webhook intake"),
        (name = "host", description = "For runner hosts: enrollment, heartbeats, assignments, \
                                       VM status reports, log uploads, certificate renewal"),
        (name = "operator", description = "Jobs, their logs, hosts, health and metrics; the \
                                           operator token except for /healthz and this \
                                           document"),
    ),
    modifiers(&SecuritySchemes)
)]
struct Base;

/// The document before the routes add their paths and schemas.
pub fn base() -> utoipa::openapi::OpenApi {
    Base::openapi()
}

/// The schemes the host and operator APIs' `security` names.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("hostToken", bearer("The token returned by enrollment"));
        components.add_security_scheme(
            "enrollmentSecret",
            bearer("The shared enrollment secret (`--enroll-secret-file`)"),
        );
        components.add_security_scheme(
            "operatorToken",
            bearer(
                "The operator token (`--operator-token-file`; `up` keeps one in \
                 `<data-dir>/operator-token`)",
            ),
        );
    }
}

/// This document
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operator",
    operation_id = "openapi",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)),
)]
pub async fn serve() -> impl IntoResponse {
    // Made once: the routes it describes are fixed at compile time.
    static JSON: LazyLock<String> = LazyLock::new(|| {
        super::document()
            .to_json()
            .expect("an OpenAPI document serializes")
    });
    ([(header::CONTENT_TYPE, "application/json")], JSON.as_str())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{header, Method, Request, StatusCode};
    use axum::Router;
    use hopper_api::host::{MAX_CSR_BYTES, MAX_MESSAGE_BYTES, MAX_POLL_WAIT_S};
    use hopper_api::shape::{MAX_MEMORY_GB, MAX_VCPUS};
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tower::ServiceExt;

    use crate::api::{document, router};
    use crate::server::AppState;

    /// Every method a route can have but HEAD, which axum answers with the GET handler.
    const METHODS: [Method; 7] = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
    ];

    /// Whether a request reached a handler: when no route matches, axum answers 404 or 405 with
    /// no body, and every handler's 404 or 405 has one.
    async fn handled(app: &Router, method: &Method, path: &str) -> bool {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        !(matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) && body.is_empty())
    }

    /// Each documented operation reaches a handler, and no other method does on a documented
    /// path (one `routes!` naming handlers of different paths would serve each path all of
    /// their methods). Paths nobody documented cannot be served: `routes()` only takes `routes!`.
    #[tokio::test]
    async fn the_router_serves_exactly_the_documented_operations() {
        let app = router(AppState::for_tests());
        let doc = serde_json::to_value(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        // Not vacuous: the document has the routes.
        assert!(paths.contains_key("/webhook") && paths.contains_key("/api/v1/host/assignment"));
        for (path, item) in paths {
            // Any value reaches the handler, which may then refuse it.
            let uri: String = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "1" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            for method in &METHODS {
                let documented = item.get(method.as_str().to_ascii_lowercase()).is_some();
                assert_eq!(
                    handled(&app, method, &uri).await,
                    documented,
                    "{method} {path}: documented {documented}"
                );
            }
        }
    }

    fn refs(v: &Value) -> Vec<&str> {
        match v {
            Value::Object(m) => m
                .iter()
                .flat_map(|(k, v)| match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => vec![r.as_str()],
                    _ => refs(v),
                })
                .collect(),
            Value::Array(a) => a.iter().flat_map(refs).collect(),
            _ => vec![],
        }
    }

    #[tokio::test]
    async fn the_served_document_is_openapi_3_1_with_the_api_types() {
        let req = Request::get("/api/v1/openapi.json")
            .body(Body::empty())
            .unwrap();
        let resp = router(AppState::for_tests()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let doc: Value = serde_json::from_slice(&body).expect("the document is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));

        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "Assignment",
            "StatusReport",
            "NewHost",
            "CertificateRequest",
            "IssuedCertificate",
            "Job",
            "Host",
            "LogInfo",
            "Error",
        ] {
            assert!(schemas.contains_key(name), "no schema {name}");
        }
        for r in refs(&doc) {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {r}");
        }
        // A `Secret` goes over the wire as its plain value.
        let prop = |schema: &str, field: &str| &schemas[schema]["properties"][field];
        assert_eq!(prop("Assignment", "jit_config")["type"], "string");
        assert_eq!(prop("Enrolled", "token")["type"], "string");
        // Limits the schema attributes can only give as literals.
        assert_eq!(
            prop("StatusReport", "message")["maxLength"],
            MAX_MESSAGE_BYTES
        );
        assert_eq!(prop("NewHost", "csr")["maxLength"], MAX_CSR_BYTES);
        assert_eq!(
            prop("CertificateRequest", "csr")["maxLength"],
            MAX_CSR_BYTES
        );
        assert_eq!(prop("Shape", "vcpus")["maximum"], MAX_VCPUS);
        assert_eq!(prop("Shape", "memory_gb")["maximum"], MAX_MEMORY_GB);
        let poll = &doc["paths"]["/api/v1/host/assignment"]["get"];
        assert_eq!(poll["parameters"][0]["name"], "wait");
        assert_eq!(poll["parameters"][0]["schema"]["maximum"], MAX_POLL_WAIT_S);

        // Host calls take the host token, enrollment the enrollment secret, everything else
        // but the webhook (signed instead), the health check and this document the operator
        // token: a new route is an operator route unless listed here.
        let schemes = &doc["components"]["securitySchemes"];
        for (path, item) in doc["paths"].as_object().unwrap() {
            let want = match path.as_str() {
                "/api/v1/hosts/enroll" => json!([{ "enrollmentSecret": [] }]),
                p if p.starts_with("/api/v1/host/") => json!([{ "hostToken": [] }]),
                "/webhook" | "/healthz" | "/api/v1/openapi.json" => Value::Null,
                _ => json!([{ "operatorToken": [] }]),
            };
            for op in item.as_object().unwrap().values() {
                assert_eq!(op["security"], want, "{path}");
            }
            if let Some(scheme) = want[0].as_object().and_then(|s| s.keys().next()) {
                assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}");
            }
        }
    }

    /// The status of `method path` with `authorization` (if any).
    async fn status(app: &Router, method: &str, path: &str, authorization: Option<&str>) -> u16 {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(value) = authorization {
            req = req.header(header::AUTHORIZATION, value);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        resp.status().as_u16()
    }

    /// What the document says is what is enforced: every operation marked `operatorToken`
    /// refuses requests without the token, with another one, and when the operator API is off.
    #[tokio::test]
    async fn operations_that_declare_the_operator_token_require_it() {
        let app = router(AppState::for_tests());
        let mut off = Arc::into_inner(AppState::for_tests()).unwrap();
        off.operator_token = None;
        let off = router(Arc::new(off));
        let doc = serde_json::to_value(document()).unwrap();
        let right = format!("Bearer {}", AppState::TEST_OPERATOR_TOKEN);
        let mut checked = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let uri = path.replace("{id}", "1").replace("{name}", "job");
            for (method, op) in item.as_object().unwrap() {
                if op["security"] != json!([{ "operatorToken": [] }]) {
                    continue;
                }
                let method = method.to_ascii_uppercase();
                for auth in [None, Some("Bearer wrong"), Some("Basic b3A6b3A=")] {
                    assert_eq!(
                        status(&app, &method, &uri, auth).await,
                        401,
                        "{method} {path}"
                    );
                }
                assert_eq!(status(&off, &method, &uri, Some(&right)).await, 401);
                // Past the check the handler answers (here 200, 404 or 400 for a bad body).
                assert_ne!(status(&app, &method, &uri, Some(&right)).await, 401);
                checked.push(format!("{method} {path}"));
            }
        }
        checked.sort();
        assert_eq!(
            checked,
            [
                "GET /api/v1/hosts",
                "GET /api/v1/jobs",
                "GET /api/v1/jobs/{id}",
                "GET /api/v1/jobs/{id}/logs",
                "GET /api/v1/jobs/{id}/logs/{name}",
                "GET /metrics",
                "POST /api/v1/hosts/{id}/drain",
                "POST /api/v1/hosts/{id}/interrupt",
                "POST /api/v1/jobs",
            ]
        );
        for open in ["/healthz", "/api/v1/openapi.json"] {
            assert_eq!(status(&off, "GET", open, None).await, 200, "{open}");
        }
    }
}
