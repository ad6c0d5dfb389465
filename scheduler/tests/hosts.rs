//! Host API, placement, the GitHub App client and reconciliation, end to end: the real binary,
//! a GitHub stand-in server (JWT and request bodies checked against GitHub's OpenAPI), and
//! hosts played by the test over HTTP.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::app::{setup, Setup};
use common::host::HostClient;
use common::{
    metric, workflow_job, Scheduler, ENROLL_SECRET, INSTALLATION_ID, OPERATOR_TOKEN, WEBHOOK_SECRET,
};
use hopper_test_support::github::{app_key, forged_jwt_rejected, RemoteJob};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

async fn wait_state(s: &Scheduler, id: u64, state: &str) -> Value {
    s.wait_for(&format!("job {id} {state}"), WAIT, || async {
        s.job(id).await.filter(|j| j["state"] == state)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn job_flows_from_webhook_to_host_with_jit_config_and_back() {
    let Setup { s, gh, _dir } = setup(&["--reconcile-interval", "1s"]).await;
    forged_jwt_rejected(&gh.state);
    let http = reqwest::Client::new();

    // Enrollment needs the shared secret and a well-formed body.
    let bad = http
        .post(format!("{}/api/v1/hosts/enroll", s.url))
        .bearer_auth("wrong")
        .json(&json!({"name": "x", "vcpus": 8, "memory_mb": 16384, "address": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let bad = http
        .post(format!("{}/api/v1/hosts/enroll", s.url))
        .bearer_auth(ENROLL_SECRET)
        .json(&json!({"name": "x", "vcpus": 0, "memory_mb": 16384, "address": "a", "csr": common::host::csr(&[]).1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad = http
        .post(format!("{}/api/v1/hosts/enroll", s.url))
        .bearer_auth(ENROLL_SECRET)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(s.get_json("/api/v1/hosts").await, json!([]));

    let host = HostClient::enroll(&s, "spot-1", 8, 16384).await;
    let other = HostClient::enroll(&s, "spot-2", 1, 1024).await;
    assert_eq!(host.heartbeat().await, 200);
    let nobody = http
        .post(format!("{}/api/v1/host/heartbeat", s.url))
        .bearer_auth("hht_unknown")
        .send()
        .await
        .unwrap();
    assert_eq!(nobody.status(), 401);
    assert_eq!(host.assignment(1).await, None);

    // A host waiting in long-poll gets the job as soon as it is placed.
    let poll = tokio::spawn({
        let h = HostClient {
            url: host.url.clone(),
            token: host.token.clone(),
            id: host.id.clone(),
            http: reqwest::Client::new(),
        };
        async move { h.assignment(30).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let labels = ["self-hosted", "hopper-2cpu-4gb", "hopper-ubuntu-24.04"];
    let queued = workflow_job("queued", 501, &labels);
    assert_eq!(
        s.deliver("workflow_job", "q-501", &body(&queued))
            .await
            .status(),
        200
    );
    let a = poll.await.unwrap().expect("assignment");
    assert_eq!(a["job"]["id"], 501);
    assert_eq!(a["job"]["repository"], queued["repository"]["full_name"]);
    assert_eq!(a["shape"], json!({"vcpus": 2, "memory_gb": 4}));
    assert_eq!(a["image"], "ubuntu-24.04");
    let jit = gh.state.jit_configs.lock().unwrap()[0].clone();
    assert_eq!(a["jit_config"], jit.as_str());
    // Until acknowledged, the same assignment comes again (the host may have missed it).
    assert_eq!(host.assignment(1).await.unwrap()["job"]["id"], 501);

    // What GitHub saw: one token request, one JIT request with the job's labels.
    let tokens = gh.requests_to("/app/installations/{installation_id}/access_tokens");
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        tokens[0].path,
        format!("/app/installations/{INSTALLATION_ID}/access_tokens")
    );
    let jits = gh.requests_to("/repos/{owner}/{repo}/actions/runners/generate-jitconfig");
    assert_eq!(jits.len(), 1);
    assert_eq!(
        jits[0].path,
        format!(
            "/repos/{}/actions/runners/generate-jitconfig",
            queued["repository"]["full_name"].as_str().unwrap()
        )
    );
    assert_eq!(jits[0].body["labels"], json!(labels));
    assert_eq!(jits[0].body["name"], a["runner_name"]);
    assert_eq!(jits[0].body["runner_group_id"], 1);

    let job = s.job(501).await.unwrap();
    assert_eq!(job["state"], "assigned");
    assert_eq!(job["host_id"], host.id.as_str());
    let runner_id = job["runner_id"].as_u64().unwrap();

    // VM reports: forward only, only by the job's host.
    assert_eq!(other.report(501, "running").await.status(), 404);
    assert_eq!(host.report(501, "starting").await.status(), 200);
    assert_eq!(
        host.assignment(1).await,
        None,
        "acknowledged assignment is not handed out again"
    );
    assert_eq!(host.report(501, "running").await.status(), 200);
    assert_eq!(s.job(501).await.unwrap()["state"], "running");
    assert_eq!(host.report(501, "starting").await.status(), 409);
    assert_eq!(host.report(999, "running").await.status(), 404);
    let bad = http
        .post(format!("{}/api/v1/host/jobs/501/status", s.url))
        .bearer_auth(&host.token)
        .json(&json!({"vm_state": "exploded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let hosts = s.get_json("/api/v1/hosts").await;
    let h = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == host.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (h["used_vcpus"].as_u64(), h["used_memory_mb"].as_u64()),
        (Some(2), Some(4096))
    );

    // GitHub's in_progress and completed; the VM ends; the runner registration is removed.
    s.deliver(
        "workflow_job",
        "p-501",
        &body(&workflow_job("in_progress", 501, &labels)),
    )
    .await;
    s.deliver(
        "workflow_job",
        "c-501",
        &body(&workflow_job("completed", 501, &labels)),
    )
    .await;
    assert_eq!(host.report(501, "finished").await.status(), 200);
    let done = s.job(501).await.unwrap();
    assert_eq!(done["state"], "completed");
    assert_eq!(done["vm_state"], "finished");
    s.wait_for("runner removal", WAIT, || async {
        gh.state
            .deleted_runners
            .lock()
            .unwrap()
            .contains(&runner_id)
            .then_some(())
    })
    .await;

    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "hopper_job_queued_to_assigned_seconds_count"),
        1.0
    );
    assert_eq!(metric(&m, "hopper_jobs{state=\"completed\"}"), 1.0);

    // No secret in any API answer or log line.
    let api = format!(
        "{}{}",
        s.get_json("/api/v1/jobs").await,
        s.get_json("/api/v1/hosts").await
    );
    let logs = s.all_logs();
    let mut secrets = vec![
        jit,
        host.token.clone(),
        other.token.clone(),
        WEBHOOK_SECRET.to_string(),
        ENROLL_SECRET.to_string(),
        OPERATOR_TOKEN.to_string(),
    ];
    secrets.extend(gh.state.tokens.lock().unwrap().iter().cloned());
    let key_line = app_key().0.lines().nth(1).unwrap().to_string();
    secrets.push(key_line);
    for secret in &secrets {
        assert!(!api.contains(secret.as_str()), "secret in API output");
        assert!(!logs.contains(secret.as_str()), "secret in logs");
    }
    assert!(logs.contains("job assigned"), "logs are being captured");
    gh.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_bin_packs_waits_in_order_and_backs_off_on_5xx() {
    let Setup { s, gh, _dir } = setup(&[]).await;
    // GitHub's first JIT answer is a 503 with Retry-After: the scheduler waits and retries.
    gh.state.fail_jit.store(1, Ordering::SeqCst);
    let host = HostClient::enroll(&s, "small", 4, 8192).await;
    for (id, shape) in [
        (601u64, "hopper-4cpu-8gb"),
        (602, "hopper-4cpu-8gb"),
        (603, "hopper-2cpu-4gb"),
    ] {
        let b = body(&workflow_job("queued", id, &[shape]));
        assert_eq!(
            s.deliver("workflow_job", &format!("q-{id}"), &b)
                .await
                .status(),
            200
        );
    }
    let a = host
        .assignment(30)
        .await
        .expect("first job placed after the retry");
    assert_eq!(a["job"]["id"], 601);
    assert_eq!(gh.state.fail_jit.load(Ordering::SeqCst), 0);
    assert_eq!(
        gh.requests_to("/repos/{owner}/{repo}/actions/runners/generate-jitconfig")
            .len(),
        2
    );
    // The host is full: the others wait, in order.
    host.report(601, "starting").await;
    assert_eq!(host.assignment(2).await, None);
    assert_eq!(s.job(602).await.unwrap()["state"], "queued");
    assert_eq!(s.job(603).await.unwrap()["state"], "queued");
    let queued: Vec<u64> = s
        .get_json("/api/v1/jobs?state=queued")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(queued, vec![602, 603]);

    // The VM ends: the next in line gets the room.
    host.report(601, "finished").await;
    let b = host.assignment(30).await.expect("second job placed");
    assert_eq!(b["job"]["id"], 602);
    host.report(602, "starting").await;
    assert_eq!(s.job(603).await.unwrap()["state"], "queued");
    let bad = s
        .operator(reqwest::Method::GET, "/api/v1/jobs?state=bogus")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    gh.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_host_is_marked_lost_and_its_jobs_reported() {
    let Setup { s, gh, _dir } = setup(&["--host-lost-after", "5s"]).await;
    let host = HostClient::enroll(&s, "doomed", 8, 16384).await;
    s.deliver(
        "workflow_job",
        "q-701",
        &body(&workflow_job("queued", 701, &["hopper"])),
    )
    .await;
    let a = host.assignment(30).await.expect("assignment");
    assert_eq!(a["job"]["id"], 701);
    host.report(701, "running").await;
    // The host now goes silent.
    let job = wait_state(&s, 701, "lost").await;
    assert!(job["reason"]
        .as_str()
        .unwrap()
        .contains("stopped heartbeating"));
    let hosts = s.get_json("/api/v1/hosts").await;
    assert_eq!(hosts[0]["state"], "lost");
    let log = s.log_text();
    assert!(
        log.contains("marked lost") && log.contains("701"),
        "lost host and its jobs are logged"
    );
    assert_eq!(metric(&s.metrics().await, "hopper_hosts_lost_total"), 1.0);
    // GitHub's word still ends the job; a returning host is active again.
    s.deliver(
        "workflow_job",
        "c-701",
        &body(&workflow_job("completed", 701, &["hopper"])),
    )
    .await;
    assert_eq!(s.job(701).await.unwrap()["state"], "completed");
    assert_eq!(host.heartbeat().await, 200);
    assert_eq!(s.get_json("/api/v1/hosts").await[0]["state"], "active");
    gh.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciliation_picks_up_what_webhooks_missed() {
    let Setup { s, gh, _dir } = setup(&["--reconcile-interval", "1s", "--org-runners"]).await;
    let repo = "octo-org/app".to_string();
    gh.state.repositories.lock().unwrap().push(repo.clone());
    {
        let mut jobs = gh.state.jobs.lock().unwrap();
        jobs.push(RemoteJob {
            id: 777,
            run_id: 70,
            repository: repo.clone(),
            status: "queued".into(),
            labels: vec!["hopper-2cpu-4gb".into()],
        });
        jobs.push(RemoteJob {
            id: 778,
            run_id: 70,
            repository: repo.clone(),
            status: "queued".into(),
            labels: vec!["ubuntu-latest".into()],
        });
        jobs.push(RemoteJob {
            id: 779,
            run_id: 71,
            repository: repo.clone(),
            status: "completed".into(),
            labels: vec!["hopper".into()],
        });
        // A run with more queued jobs than one page holds.
        for id in 10_000..10_150 {
            jobs.push(RemoteJob {
                id,
                run_id: 72,
                repository: repo.clone(),
                status: "queued".into(),
                labels: vec!["hopper-16cpu-64gb".into()],
            });
        }
    }
    // 779's queued webhook arrived but its completed one was lost.
    let mut q = workflow_job("queued", 779, &["hopper"]);
    q["repository"]["full_name"] = repo.clone().into();
    s.deliver("workflow_job", "q-779", &body(&q)).await;

    let found = wait_state(&s, 777, "queued").await;
    assert_eq!(found["repository"], repo.as_str());
    assert_eq!(found["installation_id"], INSTALLATION_ID);
    wait_state(&s, 779, "completed").await;
    assert!(s.job(778).await.is_none(), "other labels are not Hopper's");
    s.wait_for("all pages of run 72", WAIT, || async {
        let n = s
            .jobs()
            .await
            .iter()
            .filter(|j| j["id"].as_u64().unwrap() >= 10_000)
            .count();
        (n == 150).then_some(())
    })
    .await;

    // Org-level JIT runners when configured.
    let host = HostClient::enroll(&s, "org-host", 4, 8192).await;
    let a = host.assignment(30).await.expect("reconciled job placed");
    assert_eq!(a["job"]["id"], 777);
    let org = gh.requests_to("/orgs/{org}/actions/runners/generate-jitconfig");
    assert_eq!(org.len(), 1);
    assert_eq!(
        org[0].path,
        "/orgs/octo-org/actions/runners/generate-jitconfig"
    );
    assert!(!gh.requests_to("/app/installations").is_empty());
    gh.assert_no_violations();
}

/// Status, content type and body of a GET.
async fn get_raw(s: &Scheduler, path: &str) -> (u16, String, Vec<u8>) {
    let resp = s.operator(reqwest::Method::GET, path).send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ctype, resp.bytes().await.unwrap().to_vec())
}

/// What the scheduler writes over a JIT config in a log: same length, no part of it.
fn redacted(len: usize) -> Vec<u8> {
    let mut marker = b"[redacted JIT config]".to_vec();
    marker.resize(len, b'*');
    marker
}

#[tokio::test(flavor = "multi_thread")]
async fn job_logs_are_uploaded_by_their_host_redacted_served_and_kept() {
    const MAX: usize = 8 << 20;
    let Setup { s, gh, _dir } = setup(&[]).await;
    let host = HostClient::enroll(&s, "logs", 4, 8192).await;
    // Too small for the job: it cannot be placed there.
    let other = HostClient::enroll(&s, "elsewhere", 1, 1024).await;
    let queued = workflow_job("queued", 801, &["hopper"]);
    s.deliver("workflow_job", "q-801", &body(&queued)).await;
    let a = host.assignment(30).await.expect("assignment");
    assert_eq!(a["job"]["id"], 801);
    let jit = a["jit_config"].as_str().unwrap().to_string();
    // The store drops the JIT config with this report; redaction must not need it.
    assert_eq!(host.report(801, "running").await.status(), 200);

    let console = format!("boot\nrunner started with {jit}\nlogin: {jit}ok\n");
    let resp = host
        .upload_log(801, "console", console.clone().into())
        .await;
    assert_eq!(resp.status(), 200);
    let stored: Value = resp.json().await.unwrap();
    assert_eq!(stored["name"], "console");
    assert_eq!(stored["size"], console.len());
    let job_log = b"step 1\nstep 2: \xff binary is kept\n".to_vec();
    assert_eq!(
        host.upload_log(801, "job", job_log.clone()).await.status(),
        200
    );

    // Operators list the logs and read them; the JIT config does not come back.
    let listed = s.get_json("/api/v1/jobs/801/logs").await;
    let names: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("console"), json!("job")]);
    assert_eq!(listed[1]["size"], job_log.len());
    assert!(listed[0]["updated_at"].as_i64().unwrap() > 0);
    let (status, ctype, text) = get_raw(&s, "/api/v1/jobs/801/logs/console").await;
    assert_eq!((status, ctype.as_str()), (200, "text/plain; charset=utf-8"));
    let marker = String::from_utf8(redacted(jit.len())).unwrap();
    assert_eq!(
        String::from_utf8(text).unwrap(),
        console.replace(&jit, &marker)
    );
    assert_eq!(get_raw(&s, "/api/v1/jobs/801/logs/job").await.2, job_log);

    // Refused uploads store nothing: another host's token, an unknown log, an unknown job, no
    // token.
    let refused = other.upload_log(801, "vmm", b"not mine".to_vec()).await;
    assert_eq!(refused.status(), 404);
    assert_eq!(
        host.upload_log(801, "secrets", b"x".to_vec())
            .await
            .status(),
        400
    );
    assert_eq!(
        host.upload_log(999, "vmm", b"x".to_vec()).await.status(),
        404
    );
    let anonymous = reqwest::Client::new()
        .put(format!("{}/api/v1/host/jobs/801/logs/vmm", s.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(s.get_json("/api/v1/jobs/801/logs").await, listed);
    assert_eq!(get_raw(&s, "/api/v1/jobs/801/logs/vmm").await.0, 404);
    assert_eq!(get_raw(&s, "/api/v1/jobs/801/logs/secrets").await.0, 400);
    assert_eq!(get_raw(&s, "/api/v1/jobs/999/logs").await.0, 404);
    assert_eq!(get_raw(&s, "/api/v1/jobs/999/logs/job").await.0, 404);
    assert_eq!(get_raw(&s, "/api/v1/jobs/x/logs").await.0, 400);
    assert!(!s.dir.join("data/logs/999").exists());

    // Over 8 MiB: the end is kept. The JIT config straddles the cut (10 of its bytes are in
    // the kept end) and is still redacted whole, so no fragment of it survives.
    let mut big = vec![b'a'; 4096];
    big.extend_from_slice(jit.as_bytes());
    big.resize(big.len() + MAX - 10, b'b');
    let resp = host.upload_log(801, "vmm", big).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["size"], MAX);
    let vmm = get_raw(&s, "/api/v1/jobs/801/logs/vmm").await.2;
    assert_eq!(vmm.len(), MAX);
    assert_eq!(vmm[..10], redacted(jit.len())[jit.len() - 10..]);
    assert!(vmm[10..].iter().all(|&b| b == b'b'));

    // A restarted scheduler serves the same logs.
    let listed = s.get_json("/api/v1/jobs/801/logs").await;
    let s = s.restart();
    assert_eq!(s.get_json("/api/v1/jobs/801/logs").await, listed);
    assert_eq!(get_raw(&s, "/api/v1/jobs/801/logs/job").await.2, job_log);
    assert_eq!(get_raw(&s, "/api/v1/jobs/801/logs/vmm").await.2, vmm);
    let logs = s.all_logs();
    assert!(logs.contains("redacted"), "redaction is logged");
    assert!(!logs.contains(&jit), "JIT config in the scheduler's log");
    gh.assert_no_violations();
}
