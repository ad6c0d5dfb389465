//! Shared test support: the webhook examples, the scheduler binary as a child process, signing.
//! The GitHub stand-in and the fixtures' location are hopper-test-support's.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod app;
pub mod host;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use hopper_test_support::fixtures::octokit_dir;
use serde_json::Value;
use sha2::Sha256;

pub const WEBHOOK_SECRET: &str = "test-webhook-secret-4f1c2a";
pub const ENROLL_SECRET: &str = "test-enroll-secret-9d8e7f";
pub const OPERATOR_TOKEN: &str = "test-operator-token-3b6a1e";
pub const INSTALLATION_ID: u64 = 42;
pub const APP_ID: u64 = 4242;

/// All example payloads of `@octokit/webhooks-examples` for api.github.com, by event name.
pub fn webhook_examples() -> &'static Vec<Value> {
    static EXAMPLES: OnceLock<Vec<Value>> = OnceLock::new();
    EXAMPLES.get_or_init(|| {
        let path = octokit_dir().join("webhooks-examples/api.github.com/index.json");
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

pub fn examples_of(event: &str) -> Vec<Value> {
    webhook_examples()
        .iter()
        .find(|e| e["name"] == event)
        .unwrap_or_else(|| panic!("no {event} examples"))["examples"]
        .as_array()
        .unwrap()
        .clone()
}

/// A real `workflow_job` example with this action (one with an installation if there is),
/// relabelled to `labels`, given `job_id` and installation 42 (the stand-in's).
pub fn workflow_job(action: &str, job_id: u64, labels: &[&str]) -> Value {
    let mut ex = examples_of("workflow_job")
        .into_iter()
        .filter(|e| e["action"] == action)
        .max_by_key(|e| e["installation"].is_object())
        .unwrap_or_else(|| panic!("no workflow_job {action} example"));
    ex["workflow_job"]["id"] = job_id.into();
    ex["workflow_job"]["labels"] = labels.iter().map(|l| Value::from(*l)).collect();
    ex["installation"] =
        serde_json::json!({"id": INSTALLATION_ID, "node_id": "MDIzOkludGVncmF0aW9uNDI="});
    ex
}

/// `X-Hub-Signature-256` computed as GitHub does, independently of the scheduler's code.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The real binary, serving on a free port, with its log in a file.
pub struct Scheduler {
    child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// What it printed after the listening line.
    stdout: Arc<Mutex<String>>,
    /// The operator token, read from its file once the scheduler listens (`up` makes one);
    /// empty when the scheduler has none.
    pub operator_token: String,
    token_file: Option<PathBuf>,
}

/// The data directory of `up` in a test's directory.
pub const UP_DATA_DIR: &str = ".hopper";

impl Scheduler {
    /// Starts `hopper-scheduler serve` with its data in `dir`, the tests' secrets and operator
    /// token, and extra arguments.
    pub fn start(dir: &Path, extra: &[&str]) -> Scheduler {
        let token_file = dir.join("operator-token");
        std::fs::write(&token_file, format!("{OPERATOR_TOKEN}\n")).unwrap();
        let mut args = Self::serve_args(dir);
        args.extend([
            "--operator-token-file".into(),
            token_file.display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir, args, Some(token_file))
    }

    /// Like [`Scheduler::start`] without `--operator-token-file`: the operator API is off.
    pub fn start_without_operator_token(dir: &Path) -> Scheduler {
        Self::spawn(dir, Self::serve_args(dir), None)
    }

    /// Writes the tests' webhook and enrollment secrets into `dir`; `serve`'s arguments with
    /// them.
    fn serve_args(dir: &Path) -> Vec<String> {
        std::fs::write(dir.join("webhook-secret"), format!("{WEBHOOK_SECRET}\n")).unwrap();
        std::fs::write(dir.join("enroll-secret"), ENROLL_SECRET).unwrap();
        vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--webhook-secret-file".into(),
            dir.join("webhook-secret").display().to_string(),
            "--enroll-secret-file".into(),
            dir.join("enroll-secret").display().to_string(),
        ]
    }

    /// Starts `hopper-scheduler up` with its data in `dir/.hopper`, on a free port, with extra
    /// arguments (e.g. `--runner none`). Its own log is `.hopper/scheduler.log`.
    pub fn up(dir: &Path, extra: &[&str]) -> Scheduler {
        let mut args: Vec<String> = vec![
            "up".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.join(UP_DATA_DIR).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let token_file = dir.join(UP_DATA_DIR).join("operator-token");
        Self::spawn(dir, args, Some(token_file))
    }

    /// Runs the binary with `args`; once it listens, reads the operator token from `token_file`.
    fn spawn(dir: &Path, args: Vec<String>, token_file: Option<PathBuf>) -> Scheduler {
        let log = dir.join(format!(
            "scheduler-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_hopper-scheduler"))
            .args(&args)
            .env_clear()
            // Debug level too: secrets must not appear at any level.
            .env(
                "RUST_LOG",
                "debug,hyper=info,h2=info,rustls=info,tower=info",
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning hopper-scheduler");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let rest = Arc::new(Mutex::new(String::new()));
        let more = rest.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut next = String::new();
            while reader.read_line(&mut next).is_ok_and(|n| n > 0) {
                more.lock().unwrap().push_str(&std::mem::take(&mut next));
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let url = match line.trim().strip_prefix("hopper-scheduler listening on ") {
            Some(u) => u.to_string(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "scheduler did not start: {:?}\n{}",
                    line,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let operator_token = token_file
            .as_deref()
            .map(|f| std::fs::read_to_string(f).unwrap().trim_end().to_string())
            .unwrap_or_default();
        Scheduler {
            child,
            url,
            dir: dir.to_path_buf(),
            log,
            args,
            stdout: rest,
            operator_token,
            token_file,
        }
    }

    /// What the process printed on stdout after its listening line, so far.
    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// SIGTERM, as a service manager stops it; returns how it exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.child.wait().unwrap()
    }

    /// SIGKILL, like a crash: nothing gets to flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again with the same arguments (and so the same data directory).
    pub fn restart(mut self) -> Scheduler {
        self.kill();
        let (dir, args, token_file) = (self.dir.clone(), self.args.clone(), self.token_file.take());
        Self::spawn(&dir, args, token_file)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every log this scheduler directory has produced (across restarts; `up` keeps its own
    /// in its data directory).
    pub fn all_logs(&self) -> String {
        let up_log = self.dir.join(UP_DATA_DIR).join("scheduler.log");
        let mut out = std::fs::read_to_string(up_log).unwrap_or_default();
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("scheduler-")
            {
                out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        out
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// Sends a delivery signed with the right secret.
    pub async fn deliver(&self, event: &str, delivery: &str, body: &[u8]) -> reqwest::Response {
        self.deliver_signed(event, delivery, body, Some(&sign(WEBHOOK_SECRET, body)))
            .await
    }

    pub async fn deliver_signed(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        sig: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .client()
            .post(format!("{}/webhook", self.url))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .body(body.to_vec());
        if let Some(sig) = sig {
            req = req.header("x-hub-signature-256", sig);
        }
        req.send().await.unwrap()
    }

    /// A request to the operator API, with the operator token.
    pub fn operator(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.operator_token)
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self
            .operator(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    pub async fn jobs(&self) -> Vec<Value> {
        self.get_json("/api/v1/jobs")
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    pub async fn job(&self, id: u64) -> Option<Value> {
        self.jobs().await.into_iter().find(|j| j["id"] == id)
    }

    pub async fn metrics(&self) -> String {
        self.operator(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls `f` until it returns `Some` or `timeout` passes.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}\n--- scheduler log ---\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A metric's value from Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("metric {name_and_labels} missing in\n{text}"))
}
