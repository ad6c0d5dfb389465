//! Evacuation as the scheduler orchestrates it, with the real binary in local mode and runner
//! hosts played by the test over HTTP: a chaos notice reaches the host by its long-poll, its
//! notice report makes it reclaiming, the job's VM gets a target (which reserves the room),
//! the target and the source get their orders in turn, a commit moves the job, the record
//! and the metrics show the move, and the emptied host is evacuated. Then the failures: a
//! drain with no capacity anywhere is said in the job's record, and a target that fails
//! makes way for another.

mod common;

use std::time::Duration;

use common::host::HostClient;
use common::{metric, Scheduler, UP_DATA_DIR};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn submit_body(s: &Scheduler, body: Value) -> reqwest::Response {
    s.operator(Method::POST, "/api/v1/jobs")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn submit(s: &Scheduler) -> u64 {
    let resp = submit_body(s, json!({"labels": ["hopper-1cpu-1gb"]})).await;
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

async fn order(h: &HostClient) -> Option<Value> {
    h.assignment(1).await
}

/// Polls each host until one gets an order of `kind`; returns its index and the order.
async fn first_order(s: &Scheduler, hosts: &[&HostClient], kind: &str) -> (usize, Value) {
    s.wait_for(&format!("a {kind} order"), WAIT, || async {
        for (i, h) in hosts.iter().enumerate() {
            if let Some(o) = order(h).await.filter(|o| o["order"] == kind) {
                return Some((i, o));
            }
        }
        None
    })
    .await
}

async fn post(h: &HostClient, path: &str, body: Value) -> reqwest::Response {
    h.http
        .post(format!("{}{path}", h.url))
        .bearer_auth(&h.token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn migration_report(h: &HostClient, id: u64, body: Value) -> u16 {
    post(h, &format!("/api/v1/host/migrations/{id}"), body)
        .await
        .status()
        .as_u16()
}

async fn host(s: &Scheduler, id: &str) -> Value {
    let hosts = s.get_json("/api/v1/hosts").await;
    hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == id)
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_moves_the_job_and_failures_are_said_or_retried() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::up(dir.path(), &["--runner", "none"]);
    let secret = std::fs::read_to_string(dir.path().join(UP_DATA_DIR).join("enroll-secret"))
        .unwrap()
        .trim()
        .to_string();
    let a = HostClient::enroll_with(&s, &secret, "spot-a", 2, 4096).await;
    let b = HostClient::enroll_with(&s, &secret, "spot-b", 2, 4096).await;

    // A local job may bring a script for its VM to run instead of a runner.
    for bad in ["", "a\0b"] {
        let resp = submit_body(&s, json!({"labels": ["hopper-1cpu-1gb"], "run": bad})).await;
        assert_eq!(resp.status(), 400);
    }
    let big = "#".repeat(64 * 1024 + 1);
    let resp = submit_body(&s, json!({"labels": ["hopper-1cpu-1gb"], "run": big})).await;
    assert_eq!(resp.status(), 400);
    let script = "for i in 1 2 3; do echo step $i; done";
    let resp = submit_body(&s, json!({"labels": ["hopper-1cpu-1gb"], "run": script})).await;
    assert_eq!(resp.status(), 201);
    let job = resp.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    let (i, run) = first_order(&s, &[&a, &b], "run").await;
    let (src, dst) = if i == 0 { (&a, &b) } else { (&b, &a) };
    assert_eq!(run["job"]["id"], job);
    assert_eq!(run["run"], script);
    let slot = run["net_slot"].as_u64().unwrap();
    assert_eq!(src.report(job, "running").await.status(), 200);

    // Chaos: bad requests change nothing; a good one reaches the host by its long-poll.
    let interrupt = |id: &str, body: Value| {
        s.operator(Method::POST, &format!("/api/v1/hosts/{id}/interrupt"))
            .json(&body)
            .send()
    };
    assert_eq!(
        interrupt(&src.id, json!({"notice_s": 0}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        interrupt(&src.id, json!({"notice": 5}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        interrupt("h-nope", json!({"notice_s": 5}))
            .await
            .unwrap()
            .status(),
        404
    );
    let unauthenticated = s
        .client()
        .post(format!("{}/api/v1/hosts/{}/interrupt", s.url, src.id))
        .json(&json!({"notice_s": 120}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(order(src).await, None, "nothing changed yet");
    assert_eq!(
        interrupt(&src.id, json!({"notice_s": 120}))
            .await
            .unwrap()
            .status(),
        202
    );
    let notice = order(src).await.expect("the chaos notice");
    assert_eq!(notice, json!({"order": "interrupt", "notice_s": 120}));
    assert_eq!(host(&s, &src.id).await["state"], "active");

    // The host reports it as it would its cloud's; the job gets a target with room.
    let deadline = chrono_ms() + 120_000;
    let reported = post(
        src,
        "/api/v1/host/notice",
        json!({"kind": "reclaim", "deadline": deadline, "source": "chaos"}),
    )
    .await;
    assert_eq!(reported.status(), 200);
    let reported: Value = reported.json().await.unwrap();
    assert_eq!(reported["state"], "reclaiming");
    assert_eq!(reported["deadline"], deadline);
    let receive = s
        .wait_for("the target's order", WAIT, || async {
            order(dst).await.filter(|o| o["order"] == "receive")
        })
        .await;
    assert_eq!(receive["job"]["id"], job);
    assert_eq!(receive["net_slot"], slot, "the guest keeps its network");
    assert_eq!(receive["shape"], json!({"vcpus": 1, "memory_gb": 1}));
    let m = receive["migration"].as_u64().unwrap();
    assert_eq!(host(&s, &dst.id).await["used_vcpus"], 1, "room reserved");
    // The interrupt was acknowledged; the source has nothing to do until the target listens.
    assert_eq!(order(src).await, None);

    // Each side reports its own part only.
    let listening = json!({"state": "listening", "address": "10.9.9.9:4567"});
    assert_eq!(migration_report(src, m, listening.clone()).await, 400);
    assert_eq!(migration_report(dst, m + 100, listening.clone()).await, 404);
    assert_eq!(
        migration_report(dst, m, json!({"state": "teleported"})).await,
        400
    );
    assert_eq!(migration_report(dst, m, listening).await, 200);
    let send = order(src).await.expect("the source's order");
    assert_eq!(
        send,
        json!({"order": "send", "migration": m, "job_id": job, "to": "10.9.9.9:4567", "mode": "precopy"})
    );
    assert_eq!(
        migration_report(src, m, json!({"state": "sending"})).await,
        200
    );
    assert_eq!(order(src).await, None);
    let up = src
        .upload_log(job, "console", b"booted on a\n".to_vec())
        .await;
    assert_eq!(up.status(), 200);
    assert_eq!(
        migration_report(dst, m, json!({"state": "committed"})).await,
        200
    );
    // One console log: the source's part, then what the target uploads from empty.
    assert_eq!(
        dst.upload_log(job, "console", b"on b\n".to_vec())
            .await
            .status(),
        200
    );
    let console = s
        .operator(Method::GET, &format!("/api/v1/jobs/{job}/logs/console"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(console, "booted on a\non b\n");
    let moved = s.job(job).await.unwrap();
    assert_eq!(moved["host_id"], dst.id.as_str());
    assert_eq!(moved["state"], "running");
    let stats = json!({"paused_ms": 42, "total_ms": 3100, "bytes": 123456});
    assert_eq!(
        migration_report(src, m, json!({"state": "sent", "stats": stats})).await,
        200
    );
    // Too late for a failure: the VM runs on the target.
    assert_eq!(
        migration_report(src, m, json!({"state": "failed", "message": "x"})).await,
        409
    );
    let record = &s.job(job).await.unwrap()["migrations"];
    assert_eq!(record.as_array().unwrap().len(), 1);
    assert_eq!(record[0]["from"], src.id.as_str());
    assert_eq!(record[0]["to"], dst.id.as_str());
    assert_eq!(record[0]["mode"], "precopy");
    assert_eq!(record[0]["result"], "succeeded");
    assert_eq!(record[0]["paused_ms"], 42);
    assert_eq!(record[0]["bytes"], 123456);
    s.wait_for("the source to be evacuated", WAIT, || async {
        (host(&s, &src.id).await["state"] == "evacuated").then_some(())
    })
    .await;
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "hopper_migrations_total{result=\"succeeded\"}"),
        1.0
    );
    assert_eq!(metric(&text, "hopper_migration_pause_seconds_count"), 1.0);
    // The job is the target's: it reports, and the source may not.
    assert_eq!(src.report(job, "finished").await.status(), 404);
    assert_eq!(dst.report(job, "finished").await.status(), 200);
    assert_eq!(s.job(job).await.unwrap()["state"], "completed");
    // `up` showed each step on its terminal, in order; it did not start these hosts, so it
    // kills none of them.
    let src_name = host(&s, &src.id).await["name"]
        .as_str()
        .unwrap()
        .to_string();
    let dst_name = host(&s, &dst.id).await["name"]
        .as_str()
        .unwrap()
        .to_string();
    let terminal = s
        .wait_for("the job's end on the terminal", WAIT, || async {
            let text = s.stdout_text();
            text.contains(&format!("job {job}: completed success"))
                .then_some(text)
        })
        .await;
    assert_in_order(
        &terminal,
        &[
            format!(
                "chaos: {src_name} gets a 120 s notice; `up` did not start it, so nothing kills it"
            ),
            format!("runner host {src_name} got a termination notice: it goes in "),
            format!("job {job}: moving from {src_name} to {dst_name} (precopy, migration {m})"),
            format!("job {job}: moved to {dst_name}"),
            "guest paused 42 ms (3.1 s and 0.1 MiB in all)".into(),
            format!("runner host {src_name} is evacuated"),
            format!("job {job}: completed success"),
        ],
    );
    assert!(!terminal.contains("killed"), "{terminal}");

    // A drain with nowhere to go: said in the job's record, and the job runs on.
    let job2 = submit(&s).await;
    let (_, run) = first_order(&s, &[dst], "run").await;
    assert_eq!(run["job"]["id"], job2);
    assert_eq!(dst.report(job2, "running").await.status(), 200);
    let drained = s
        .operator(Method::POST, &format!("/api/v1/hosts/{}/drain", dst.id))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 202);
    s.wait_for("the no-capacity reason", WAIT, || async {
        let j = s.job(job2).await.unwrap();
        (j["reason"] == "host reclaimed, no capacity to evacuate to").then_some(())
    })
    .await;
    assert_eq!(s.job(job2).await.unwrap()["state"], "running");

    // Capacity arrives; the first target fails, the job goes to the other.
    let c = HostClient::enroll_with(&s, &secret, "spot-c", 2, 4096).await;
    let d = HostClient::enroll_with(&s, &secret, "spot-d", 2, 4096).await;
    let (i, receive) = first_order(&s, &[&c, &d], "receive").await;
    let (bad, good) = if i == 0 { (&c, &d) } else { (&d, &c) };
    let m1 = receive["migration"].as_u64().unwrap();
    assert_eq!(
        migration_report(bad, m1, json!({"state": "failed", "message": "no KVM"})).await,
        200
    );
    let receive = s
        .wait_for("another target", WAIT, || async {
            order(good).await.filter(|o| o["order"] == "receive")
        })
        .await;
    let m2 = receive["migration"].as_u64().unwrap();
    assert_ne!(m1, m2);
    assert_eq!(order(bad).await, None, "a failed target is not asked again");
    assert_eq!(
        migration_report(
            good,
            m2,
            json!({"state": "listening", "address": "10.9.9.8:1"})
        )
        .await,
        200
    );
    assert_eq!(
        order(dst).await.unwrap()["mode"],
        "precopy",
        "a drain has no deadline"
    );
    assert_eq!(
        migration_report(good, m2, json!({"state": "committed"})).await,
        200
    );
    let j = s.job(job2).await.unwrap();
    assert_eq!(j["host_id"], good.id.as_str());
    assert_eq!(j["reason"], Value::Null, "the no-capacity reason is gone");
    let results: Vec<&str> = j["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["failed", "succeeded"]);
    assert_eq!(
        j["migrations"][0]["message"], "no KVM",
        "the failure says why"
    );
    let text = s.metrics().await;
    assert_eq!(
        metric(&text, "hopper_migrations_total{result=\"failed\"}"),
        1.0
    );
}

/// Each of `lines` is in `text`, after the one before.
fn assert_in_order(text: &str, lines: &[String]) {
    let mut from = 0;
    for line in lines {
        match text[from..].find(line.as_str()) {
            Some(at) => from += at + line.len(),
            None => panic!("{line:?} is not shown after what comes before it:\n{text}"),
        }
    }
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
