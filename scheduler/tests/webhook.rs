//! The webhook endpoint of the real binary, fed with real example payloads from
//! `@octokit/webhooks-examples`, signed as GitHub signs them.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{examples_of, metric, sign, workflow_job, Scheduler, WEBHOOK_SECRET};
use serde_json::Value;

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[test]
fn github_published_signature_vector() {
    // docs.github.com "Validating webhook deliveries": the test helper signs as GitHub does.
    assert_eq!(
        sign("It's a Secret to Everybody", b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[tokio::test]
async fn hopper_jobs_are_stored_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);

    // ping, and an unrelated event: 2xx, no job.
    let ping = &examples_of("ping")[0];
    assert_eq!(s.deliver("ping", "d-ping", &body(ping)).await.status(), 200);
    let push = &examples_of("push")[0];
    assert_eq!(s.deliver("push", "d-push", &body(push)).await.status(), 200);

    // The real example as is (runs-on ubuntu-latest) is not Hopper's.
    for (i, ex) in examples_of("workflow_job").iter().enumerate() {
        let resp = s
            .deliver("workflow_job", &format!("d-orig-{i}"), &body(ex))
            .await;
        assert_eq!(resp.status(), 200, "example {i}");
    }
    assert!(
        s.jobs().await.is_empty(),
        "non-Hopper jobs must not be queued"
    );

    // Relabelled to Hopper's labels: queued.
    let queued = workflow_job(
        "queued",
        7001,
        &["self-hosted", "hopper-4cpu-8gb", "hopper-ubuntu-24.04"],
    );
    assert_eq!(
        s.deliver("workflow_job", "d-q-7001", &body(&queued))
            .await
            .status(),
        200
    );
    let job = s.job(7001).await.expect("job stored");
    assert_eq!(job["state"], "queued");
    assert_eq!(job["run_id"], queued["workflow_job"]["run_id"]);
    assert_eq!(job["repository"], queued["repository"]["full_name"]);
    assert_eq!(job["labels"], queued["workflow_job"]["labels"]);
    assert_eq!(
        job["shape"],
        serde_json::json!({"vcpus": 4, "memory_gb": 8})
    );
    assert_eq!(job["image"], "ubuntu-24.04");
    assert_eq!(s.jobs().await.len(), 1);

    // Unknown shape: visible as unschedulable with a reason and a log line, not dropped.
    let bad = workflow_job("queued", 7002, &["hopper-3cpu"]);
    assert_eq!(
        s.deliver("workflow_job", "d-q-7002", &body(&bad))
            .await
            .status(),
        200
    );
    let job = s.job(7002).await.expect("unschedulable job kept");
    assert_eq!(job["state"], "unschedulable");
    assert!(job["reason"].as_str().unwrap().contains("hopper-3cpu"));
    assert!(s.log_text().contains("cannot be scheduled"));

    let m = s.metrics().await;
    assert_eq!(metric(&m, "hopper_jobs{state=\"queued\"}"), 1.0);
    assert_eq!(metric(&m, "hopper_jobs{state=\"unschedulable\"}"), 1.0);
    assert!(metric(&m, "hopper_webhook_deliveries_received_total") >= 4.0);
}

#[tokio::test]
async fn bad_deliveries_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    let b = body(&workflow_job("queued", 8001, &["hopper"]));

    let missing = s.deliver_signed("workflow_job", "d1", &b, None).await;
    assert_eq!(missing.status(), 401);
    let wrong_secret = sign("not-the-secret", &b);
    assert_eq!(
        s.deliver_signed("workflow_job", "d2", &b, Some(&wrong_secret))
            .await
            .status(),
        401
    );
    // Signature of another body.
    let other = sign(WEBHOOK_SECRET, b"{}");
    assert_eq!(
        s.deliver_signed("workflow_job", "d3", &b, Some(&other))
            .await
            .status(),
        401
    );
    assert_eq!(
        s.deliver_signed("workflow_job", "d4", &b, Some("sha256=nothex"))
            .await
            .status(),
        401
    );

    // Signed but malformed JSON, or a workflow_job missing its fields: 400.
    let junk = b"{\"action\": \"queued\", ";
    assert_eq!(s.deliver("workflow_job", "d5", junk).await.status(), 400);
    assert_eq!(
        s.deliver("workflow_job", "d6", b"{\"action\":\"queued\"}")
            .await
            .status(),
        400
    );
    assert_eq!(s.deliver("ping", "d7", b"[1, 2").await.status(), 400);

    // Missing headers.
    let resp = s
        .client()
        .post(format!("{}/webhook", s.url))
        .header("x-hub-signature-256", sign(WEBHOOK_SECRET, &b))
        .body(b.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    assert!(s.jobs().await.is_empty());
    // The rejected delivery ids were not recorded: the good delivery under id d1 still counts.
    assert_eq!(s.deliver("workflow_job", "d1", &b).await.status(), 200);
    assert_eq!(s.job(8001).await.unwrap()["state"], "queued");

    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "hopper_webhook_deliveries_rejected_total{reason=\"signature_missing\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "hopper_webhook_deliveries_rejected_total{reason=\"signature_mismatch\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "hopper_webhook_deliveries_rejected_total{reason=\"signature_malformed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "hopper_webhook_deliveries_rejected_total{reason=\"malformed\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "hopper_webhook_deliveries_rejected_total{reason=\"missing_header\"}"
        ),
        1.0
    );
    assert!(!s.log_text().contains(WEBHOOK_SECRET));
}

#[tokio::test]
async fn redelivery_has_no_second_effect() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    let a = body(&workflow_job("queued", 9001, &["hopper"]));
    assert_eq!(s.deliver("workflow_job", "same-id", &a).await.status(), 200);
    let r = s.deliver("workflow_job", "same-id", &a).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "duplicate");
    // Even a different body under a seen delivery id is not applied.
    let b = body(&workflow_job("queued", 9002, &["hopper"]));
    assert_eq!(s.deliver("workflow_job", "same-id", &b).await.status(), 200);
    let ids: Vec<u64> = s
        .jobs()
        .await
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![9001]);
    let m = s.metrics().await;
    assert_eq!(metric(&m, "hopper_webhook_deliveries_duplicate_total"), 2.0);
    assert_eq!(metric(&m, "hopper_webhook_deliveries_received_total"), 1.0);
}

#[tokio::test]
async fn out_of_order_events_never_move_a_job_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    let labels = ["hopper-2cpu-4gb"];
    // completed arrives first, then the late in_progress and queued.
    s.deliver(
        "workflow_job",
        "c1",
        &body(&workflow_job("completed", 10, &labels)),
    )
    .await;
    s.deliver(
        "workflow_job",
        "p1",
        &body(&workflow_job("in_progress", 10, &labels)),
    )
    .await;
    s.deliver(
        "workflow_job",
        "q1",
        &body(&workflow_job("queued", 10, &labels)),
    )
    .await;
    let job = s.job(10).await.unwrap();
    assert_eq!(job["state"], "completed");
    assert_eq!(
        job["conclusion"],
        workflow_job("completed", 10, &labels)["workflow_job"]["conclusion"]
    );

    // in_progress before queued: running stays running.
    s.deliver(
        "workflow_job",
        "p2",
        &body(&workflow_job("in_progress", 11, &labels)),
    )
    .await;
    s.deliver(
        "workflow_job",
        "q2",
        &body(&workflow_job("queued", 11, &labels)),
    )
    .await;
    assert_eq!(s.job(11).await.unwrap()["state"], "running");
    s.deliver(
        "workflow_job",
        "c2",
        &body(&workflow_job("completed", 11, &labels)),
    )
    .await;
    assert_eq!(s.job(11).await.unwrap()["state"], "completed");

    // `waiting` neither creates nor moves a job.
    s.deliver(
        "workflow_job",
        "w3",
        &body(&workflow_job("waiting", 12, &labels)),
    )
    .await;
    assert!(s.job(12).await.is_none());
}

#[tokio::test]
async fn restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    for id in 1..=20u64 {
        let b = body(&workflow_job("queued", id, &["hopper"]));
        assert_eq!(
            s.deliver("workflow_job", &format!("r-{id}"), &b)
                .await
                .status(),
            200
        );
    }
    s.deliver(
        "workflow_job",
        "r-c5",
        &body(&workflow_job("completed", 5, &["hopper"])),
    )
    .await;
    let before = s.jobs().await;
    assert_eq!(before.len(), 20);

    // SIGKILL right after the answers: what was acknowledged must be on disk.
    let s = s.restart();
    let after = s.jobs().await;
    assert_eq!(after, before);
    assert_eq!(s.job(5).await.unwrap()["state"], "completed");
    // Delivery ids survive too: a redelivery after the restart is still a duplicate.
    let r = s
        .deliver(
            "workflow_job",
            "r-3",
            &body(&workflow_job("queued", 3, &["hopper"])),
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "duplicate");
}

#[test]
fn oversized_body_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    let addr = s.url.strip_prefix("http://").unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Announce 26 MiB but send only a few bytes: the answer must come anyway.
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-GitHub-Event: ping\r\n\
         X-GitHub-Delivery: big\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: {}\r\n\r\n{{\"zen\":",
        26 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    drop(conn);
    let m = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(s.metrics());
    assert_eq!(
        metric(
            &m,
            "hopper_webhook_deliveries_rejected_total{reason=\"too_large\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn database_url_selects_the_store_and_bad_config_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("elsewhere.db");
    let url = format!("sqlite://{}", db.display());
    let s = Scheduler::start(dir.path(), &["--database", &url]);
    s.deliver(
        "workflow_job",
        "db-1",
        &body(&workflow_job("queued", 31, &["hopper"])),
    )
    .await;
    assert_eq!(s.job(31).await.unwrap()["state"], "queued");
    assert!(db.is_file(), "--database overrides --data-dir");
    assert!(!dir.path().join("data/hopper.db").exists());
    drop(s);

    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hopper-scheduler"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let secret = dir.path().join("webhook-secret");
    let secret = secret.to_str().unwrap();
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--webhook-secret-file",
        secret,
        "--database",
        "postgres://hopper:pa55word@db/hopper",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("PostgreSQL is not implemented yet"), "{err}");
    assert!(!err.contains("pa55word"), "database password echoed: {err}");
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--webhook-secret-file",
        "/nonexistent/secret",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--webhook-secret-file"));
    let out = run(&[
        "serve",
        "--webhook-secret-file",
        secret,
        "--label-prefix",
        "bad prefix",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid label prefix"));
}
