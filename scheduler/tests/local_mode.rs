//! Local mode, end to end with the real binary: `hopper-scheduler up` (with `--runner none`,
//! the runner host played by the test over HTTP) generates its secrets, takes jobs submitted
//! to `POST /api/v1/jobs` exactly like queued webhooks, runs them with local runner configs
//! that never show, ends them with their VM, and refuses bad submissions; a scheduler with a
//! GitHub App refuses submissions.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::host::HostClient;
use common::{sign, workflow_job, Scheduler, APP_ID, INSTALLATION_ID, UP_DATA_DIR};
use hopper_test_support::github::{app_key, StandIn};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const LOCAL_JOB_ID_BASE: u64 = 9_000_000_000_000_000;

async fn submit(s: &Scheduler, body: &str) -> (u16, Option<String>, Value) {
    let resp = s
        .operator(Method::POST, "/api/v1/jobs")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (status, location, resp.json().await.unwrap())
}

fn secret_in(dir: &Path, name: &str) -> String {
    let path = dir.join(UP_DATA_DIR).join(name);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{name} is not private");
    let secret = std::fs::read_to_string(path).unwrap().trim().to_string();
    assert!(secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()));
    secret
}

#[tokio::test(flavor = "multi_thread")]
async fn up_runs_submitted_jobs_with_local_runner_configs_that_never_show() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Scheduler::up(dir.path(), &["--runner", "none"]);
    let data = dir.path().join(UP_DATA_DIR);
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let enroll_secret = secret_in(dir.path(), "enroll-secret");
    let webhook_secret = secret_in(dir.path(), "webhook-secret");
    let operator_token = secret_in(dir.path(), "operator-token");
    assert_ne!(enroll_secret, webhook_secret);
    assert_ne!(operator_token, enroll_secret);
    assert_ne!(operator_token, webhook_secret);
    assert_eq!(s.operator_token, operator_token);
    // `up` says where the token is and how to send it, never the token itself.
    let token_file = data.join("operator-token");
    let told = format!(
        "curl -H \"Authorization: Bearer $(cat {})\" -d",
        token_file.display()
    );
    s.wait_for("how to submit a job", WAIT, || async {
        s.stdout_text().contains(&told).then_some(())
    })
    .await;

    // Named like the runner host `up` starts: `up` marks it lost when it stops (below).
    let host = HostClient::enroll_with(&s, &enroll_secret, "hopper-up", 2, 4096).await;

    // A submission becomes a queued job, as a `queued` webhook would make it.
    let (status, location, job) = submit(
        &s,
        r#"{"labels": ["hopper-1cpu-1gb", "self-hosted"], "repository": "local/demo"}"#,
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_u64().unwrap();
    assert!(id > LOCAL_JOB_ID_BASE, "{id}");
    assert_eq!(location, Some(format!("/api/v1/jobs/{id}")));
    assert_eq!(job["run_id"], id);
    assert_eq!(job["run_attempt"], 1);
    assert_eq!(job["repository"], "local/demo");
    assert_eq!(job["installation_id"], Value::Null);
    assert_eq!(job["labels"], json!(["hopper-1cpu-1gb", "self-hosted"]));
    assert_eq!(job["shape"], json!({"vcpus": 1, "memory_gb": 1}));
    assert_eq!(job["image"], "ubuntu-24.04");
    assert!(matches!(job["state"].as_str(), Some("queued" | "assigned")));

    // It is placed on the enrolled host with a local runner config.
    let a = host.assignment(30).await.expect("assignment");
    assert_eq!(a["job"]["id"], id);
    assert_eq!(a["shape"], json!({"vcpus": 1, "memory_gb": 1}));
    let config = a["jit_config"].as_str().unwrap().to_string();
    assert!(config.len() >= 32, "{config}");
    let runner_name = a["runner_name"].as_str().unwrap();
    assert!(runner_name.starts_with(&format!("hopper-{id}-")));
    let assigned = s.job(id).await.unwrap();
    assert_eq!(assigned["state"], "assigned");
    assert_eq!(assigned["host_id"], host.id.as_str());
    assert_eq!(assigned["runner_id"], id);

    // A second submission gets the next id; the repository is optional.
    let (status, _, second) = submit(&s, r#"{"labels": ["hopper"]}"#).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["id"].as_u64(), Some(id + 1));
    assert_eq!(second["repository"], "local/jobs");
    assert_eq!(second["shape"], json!({"vcpus": 2, "memory_gb": 4}));

    // The host runs it; its logs are redacted of the config like a JIT config.
    assert_eq!(host.report(id, "starting").await.status(), 200);
    assert_eq!(host.report(id, "running").await.status(), 200);
    assert_eq!(s.job(id).await.unwrap()["state"], "running");
    let log = format!("hopper-run-job: config {config}\nhopper-run-job: done\n");
    assert_eq!(host.upload_log(id, "job", log.into()).await.status(), 200);
    let served = s
        .operator(Method::GET, &format!("/api/v1/jobs/{id}/logs/job"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(served.contains("[redacted JIT config]"), "{served}");

    // Without GitHub, the VM finishing the job command is the job's end.
    assert_eq!(host.report(id, "finished").await.status(), 200);
    let done = s.job(id).await.unwrap();
    assert_eq!(done["state"], "completed");
    assert_eq!(done["conclusion"], "success");
    assert_eq!(done["vm_state"], "finished");
    assert_eq!(done["reason"], Value::Null);

    // GitHub's jobs are recorded in local mode but not placed: they need GitHub's runners.
    let queued = serde_json::to_vec(&workflow_job("queued", 77, &["hopper-1cpu-1gb"])).unwrap();
    let resp = s
        .deliver_signed(
            "workflow_job",
            "q-77",
            &queued,
            Some(&sign(&webhook_secret, &queued)),
        )
        .await;
    assert_eq!(resp.status(), 200);
    // The second local job holds 2 of 2 vCPUs; after it ends, room is free, and still the
    // GitHub job waits.
    let a2 = host.assignment(30).await.expect("second assignment");
    assert_eq!(a2["job"]["id"].as_u64(), Some(id + 1));
    assert_eq!(host.report(id + 1, "failed").await.status(), 200);
    let failed = s.job(id + 1).await.unwrap();
    assert_eq!(failed["state"], "failed");
    assert_eq!(host.assignment(2).await, None);
    assert_eq!(s.job(77).await.unwrap()["state"], "queued");

    // The runner configs appear in no API answer, log line or progress line.
    let api = format!(
        "{}{}",
        s.get_json("/api/v1/jobs").await,
        s.get_json("/api/v1/hosts").await
    );
    let logs = s.all_logs();
    assert!(logs.contains("local job submitted"), "logs are captured");
    let progress = s
        .wait_for("the job's end on the terminal", WAIT, || async {
            let text = s.stdout_text();
            text.contains(&format!("job {id}: completed success"))
                .then_some(text)
        })
        .await;
    let configs = [config, a2["jit_config"].as_str().unwrap().to_string()];
    for secret in configs.iter().chain([
        &enroll_secret,
        &webhook_secret,
        &operator_token,
        &host.token,
    ]) {
        assert!(!api.contains(secret.as_str()), "secret in API output");
        assert!(!logs.contains(secret.as_str()), "secret in the log");
        assert!(!progress.contains(secret.as_str()), "secret on stdout");
    }

    // A third job is running on the host when `up` is stopped; `up` marks its host lost with
    // it, so nothing is placed on a host that is gone.
    submit(&s, r#"{"labels": ["hopper-1cpu-1gb"]}"#).await;
    let a3 = host.assignment(30).await.expect("third assignment");
    let third = a3["job"]["id"].as_u64().unwrap();
    assert_eq!(host.report(third, "running").await.status(), 200);
    let status = s.terminate();
    assert!(status.success(), "up exited {status}");
    assert!(s.stdout_text().contains("stopped"));
    let s = s.restart();
    let hosts = s.get_json("/api/v1/hosts").await;
    assert_eq!(hosts[0]["state"], "lost", "{hosts}");
    let lost = s.job(third).await.unwrap();
    assert_eq!(lost["state"], "lost");
    assert!(
        lost["reason"].as_str().unwrap().contains("was stopped"),
        "{lost}"
    );
    // The secrets are kept for the next run, and the token still opens the operator API.
    assert_eq!(secret_in(dir.path(), "enroll-secret"), enroll_secret);
    assert_eq!(secret_in(dir.path(), "operator-token"), operator_token);
    // The same host (its token) at the restarted scheduler's new port.
    let host = HostClient {
        url: s.url.clone(),
        ..host
    };
    assert_eq!(host.heartbeat().await, 200);
    s.wait_for("the host to be back", WAIT, || async {
        let hosts = s.get_json("/api/v1/hosts").await;
        (hosts[0]["state"] == "active").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_submissions_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // `serve --local-jobs` without an App is local mode too.
    let s = Scheduler::start(dir.path(), &["--local-jobs"]);
    for (body, says) in [
        (r#"{"labels": ["ubuntu-latest"]}"#, "no Hopper label"),
        (r#"{"labels": ["hopper-3cpu"]}"#, "unknown shape label"),
        (
            r#"{"labels": ["hopper-2cpu-4gb", "hopper-4cpu-8gb"]}"#,
            "more than one shape label",
        ),
        (r#"{"labels": []}"#, "1 to 100 labels"),
        (r#"{"labels": ["hopper", "a b"]}"#, "no spaces"),
        (
            r#"{"labels": ["hopper"], "repository": "x/../y"}"#,
            "owner/name",
        ),
        (r#"{"labels": ["hopper"], "id": 5}"#, "unknown field"),
        (r#"{"labels": "hopper"}"#, "invalid JSON body"),
        ("{", "invalid JSON body"),
    ] {
        let (status, _, answer) = submit(&s, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(says), "{body}: {error}");
    }
    assert_eq!(s.jobs().await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn submission_is_refused_with_a_github_app() {
    let gh = StandIn::start(APP_ID, INSTALLATION_ID).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("app.pem");
    std::fs::write(&key, &app_key().0).unwrap();
    let (app_id, key) = (APP_ID.to_string(), key.display().to_string());
    let s = Scheduler::start(
        dir.path(),
        &[
            "--github-api-url",
            &gh.url,
            "--app-id",
            &app_id,
            "--app-private-key",
            &key,
        ],
    );
    let resp = s
        .operator(Method::POST, "/api/v1/jobs")
        .body(r#"{"labels": ["hopper"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET");
    let answer: Value = resp.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("local mode only"),
        "{answer}"
    );
    assert_eq!(s.jobs().await, Vec::<Value>::new());

    // `up --demo` needs local mode; clap says so before anything starts.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hopper-scheduler"))
        .args(["up", "--demo", "--app-id", "1", "--app-private-key", &key])
        .arg("--data-dir")
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    assert!(!dir.path().join("never").exists());
    gh.assert_no_violations();
}

#[test]
fn up_refuses_bad_runner_host_counts_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("never");
    for (args, says) in [
        (&["--hosts", "0"][..], "1..=8"),
        (&["--hosts", "9"], "1..=8"),
        (
            &["--demo", "evacuate", "--hosts", "1"],
            "--demo evacuate moves a job from one runner host to another: it needs --hosts 2",
        ),
        (
            &["--demo", "evacuate", "--runner", "none"],
            "not --runner none",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hopper-scheduler"))
            .arg("up")
            .args(args)
            .arg("--data-dir")
            .arg(&never)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!never.exists(), "{args:?}");
    }
}

#[tokio::test]
async fn serve_without_an_app_takes_submissions_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheduler::start(dir.path(), &[]);
    let (status, _, answer) = submit(&s, r#"{"labels": ["hopper"]}"#).await;
    assert_eq!(status, 405, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("--local-jobs"),
        "{answer}"
    );
    assert_eq!(s.get_json("/api/v1/jobs").await, serde_json::json!([]));
}
