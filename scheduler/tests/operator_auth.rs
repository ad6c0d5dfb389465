//! The operator API takes the operator token (`--operator-token-file`) on every route but
//! `/healthz` (and the OpenAPI document), and is off without one; the webhook and the host
//! API keep their own credentials and do not take it. The real binary, as in production.

mod common;

use common::host::HostClient;
use common::{workflow_job, Scheduler, ENROLL_SECRET, OPERATOR_TOKEN, WEBHOOK_SECRET};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

const SUBMISSION: &str = r#"{"labels": ["hopper-1cpu-1gb"]}"#;

/// Every operator route, with a job id where it takes one; the POST carries a valid submission.
fn operator_routes(job: u64) -> Vec<(Method, String)> {
    vec![
        (Method::GET, "/api/v1/jobs".into()),
        (Method::POST, "/api/v1/jobs".into()),
        (Method::GET, format!("/api/v1/jobs/{job}")),
        (Method::GET, format!("/api/v1/jobs/{job}/logs")),
        (Method::GET, format!("/api/v1/jobs/{job}/logs/job")),
        (Method::GET, "/api/v1/hosts".into()),
        (Method::GET, "/metrics".into()),
    ]
}

fn request(s: &Scheduler, method: &Method, path: &str) -> RequestBuilder {
    let req = s
        .client()
        .request(method.clone(), format!("{}{path}", s.url));
    if *method == Method::POST {
        req.header("content-type", "application/json")
            .body(SUBMISSION)
    } else {
        req
    }
}

/// Sends `req` and checks it is refused with 401, a bearer challenge and an error saying `why`.
async fn assert_refused(req: RequestBuilder, what: &str, why: &str) {
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{what}");
    let body: Value = resp.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(why), "{what}: {error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_routes_take_the_operator_token_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &["--local-jobs"]);
    // The host API does not take the operator token, and its credentials do not open the
    // operator API.
    let host = HostClient::enroll(&s, "h", 2, 4096).await;
    let impostor = HostClient {
        url: s.url.clone(),
        token: OPERATOR_TOKEN.into(),
        id: host.id.clone(),
        http: s.client(),
    };
    assert_eq!(impostor.heartbeat().await, 401);
    let enroll = s
        .client()
        .post(format!("{}/api/v1/hosts/enroll", s.url))
        .bearer_auth(OPERATOR_TOKEN)
        .body(r#"{"name": "x", "vcpus": 1, "memory_mb": 1024, "address": "a"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(enroll.status(), 401);

    for (method, path) in operator_routes(1) {
        let what = format!("{method} {path}");
        let req = || request(&s, &method, &path);
        assert_refused(req(), &what, "missing operator token").await;
        for wrong in [
            "wrong",
            &OPERATOR_TOKEN[1..],
            &format!("{OPERATOR_TOKEN}x"),
            ENROLL_SECRET,
            WEBHOOK_SECRET,
            &host.token,
        ] {
            assert_refused(req().bearer_auth(wrong), &what, "wrong operator token").await;
        }
        // The right token under another scheme.
        let basic = req().basic_auth("operator", Some(OPERATOR_TOKEN));
        assert_refused(basic, &what, "missing operator token").await;
    }
    // Refused submissions stored nothing.
    assert_eq!(s.jobs().await, Vec::<Value>::new());

    // With the token: a submitted job, placed on the host, with a log to read.
    let resp = request(&s, &Method::POST, "/api/v1/jobs")
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id = resp.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    let a = host.assignment(30).await.expect("assignment");
    assert_eq!(a["job"]["id"], id);
    let log = b"step 1\n".to_vec();
    assert_eq!(host.upload_log(id, "job", log.clone()).await.status(), 200);
    for (method, path) in operator_routes(id) {
        let resp = request(&s, &method, &path)
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await
            .unwrap();
        let want = if method == Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        assert_eq!(resp.status(), want, "{method} {path}");
        if path.ends_with("/logs/job") {
            assert_eq!(resp.bytes().await.unwrap(), log);
        }
    }

    // The webhook takes its signature only.
    let queued = serde_json::to_vec(&workflow_job("queued", 77, &["hopper"])).unwrap();
    let resp = s.deliver("workflow_job", "q-77", &queued).await;
    assert_eq!(resp.status(), 200);
    let unsigned = s
        .client()
        .post(format!("{}/webhook", s.url))
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", "q-78")
        .bearer_auth(OPERATOR_TOKEN)
        .body(queued.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert!(s.job(77).await.is_some());

    // Load balancers check health without credentials; the API's description is public.
    for open in ["/healthz", "/api/v1/openapi.json"] {
        let resp = s.client().get(format!("{}{open}", s.url)).send().await;
        assert_eq!(resp.unwrap().status(), 200, "{open}");
    }

    // The token never reaches the log, at any level.
    let logs = s.all_logs();
    assert!(logs.contains("local job submitted"), "logs are captured");
    assert!(
        !logs.contains(OPERATOR_TOKEN),
        "the operator token in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_operator_token_file_the_operator_api_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start_without_operator_token(dir.path());
    for (method, path) in operator_routes(1) {
        let what = format!("{method} {path}");
        let req = || request(&s, &method, &path);
        assert_refused(
            req(),
            &what,
            "start the scheduler with --operator-token-file",
        )
        .await;
        let bearer = req().bearer_auth(OPERATOR_TOKEN);
        assert_refused(bearer, &what, "the operator API is off").await;
    }
    // The rest serves as before: health, webhooks, enrollment and hosts.
    let health = s.client().get(format!("{}/healthz", s.url)).send().await;
    assert_eq!(health.unwrap().status(), 200);
    let queued = serde_json::to_vec(&workflow_job("queued", 5, &["hopper"])).unwrap();
    assert_eq!(
        s.deliver("workflow_job", "q-5", &queued).await.status(),
        200
    );
    let host = HostClient::enroll(&s, "h", 2, 4096).await;
    assert_eq!(host.heartbeat().await, 200);
    assert!(
        s.log_text().contains("no --operator-token-file"),
        "the operator is warned"
    );
}
