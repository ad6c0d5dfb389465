//! The real `hopper-scheduler serve` binary as a child process of a test, for end-to-end tests
//! where runner hosts inside test hosts reach it (at 10.0.2.2, QEMU user networking's address
//! of this machine, which leads to 127.0.0.1 here).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::error::tail;
use crate::paths::repo_root;
use crate::HarnessError;

/// The address of the machine running the tests, as seen from inside a test host.
pub const HOST_GATEWAY: &str = "10.0.2.2";
/// The data directory of the first runner host daemon in a test host.
pub const RUNNER_DATA: &str = "/var/lib/hopper/runner";

/// Runner host daemon `i`'s data directory in a test host: [`RUNNER_DATA`] for the first.
pub fn runner_data_dir(i: usize) -> String {
    match i {
        0 => RUNNER_DATA.to_string(),
        i => format!("{RUNNER_DATA}-{i}"),
    }
}

/// Runner host daemon `i`'s TAP prefix: daemons sharing a machine need their own (`hjob`,
/// `hjoba`…); all start with `hjob`, the runner's default, so one count sees every host's
/// devices.
pub fn runner_tap_prefix(i: usize) -> String {
    match i {
        0 => "hjob".into(),
        i => format!("hjob{}", char::from(b'a' + (i - 1) as u8)),
    }
}

/// Builds the release scheduler binary (incremental: cheap when nothing changed) in the same
/// target directory as the running tests and returns its path. It is built as the test run
/// builds the workspace (`cargo test --no-run --workspace`: the same features, so the same
/// artefacts), not alone with `-p`: features resolved for one package differ, and under
/// tests/run.sh that rebuilt the scheduler and half its dependencies (4–5 minutes on 2 cores).
pub fn scheduler_binary() -> Result<PathBuf, HarnessError> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let repo = repo_root();
    let out = Command::new(cargo)
        .current_dir(&repo)
        .args(["test", "--no-run", "--release", "--quiet", "--workspace"])
        .output()
        .map_err(HarnessError::io("running cargo"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: "cargo test --no-run --release --workspace".into(),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        repo.join(target)
    };
    Ok(target.join("release/hopper-scheduler"))
}

/// `X-Hub-Signature-256` as GitHub computes it.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// 16 random bytes in hex: an operator token nobody else knows.
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A running `hopper-scheduler serve`; killed when dropped.
pub struct SchedulerProcess {
    child: Child,
    /// Where it serves, on 127.0.0.1.
    pub url: String,
    pub port: u16,
    pub log: PathBuf,
    webhook_secret: String,
    /// The operator API's token, which the harness writes for each scheduler it starts.
    operator_token: String,
    http: reqwest::blocking::Client,
}

impl SchedulerProcess {
    /// Starts the scheduler with its data in `dir`, listening on 127.0.0.1 (reachable from
    /// test hosts as `http://10.0.2.2:PORT`), with `args` added (GitHub App, enrollment…) and
    /// an operator token of its own, which [`SchedulerProcess::get_json`] sends.
    pub fn start(dir: &Path, webhook_secret: &str, args: &[String]) -> Result<Self, HarnessError> {
        let io = |what: &str| HarnessError::io(format!("{what} in {}", dir.display()));
        std::fs::write(dir.join("webhook-secret"), webhook_secret)
            .map_err(io("writing the webhook secret"))?;
        let operator_token = random_hex().map_err(HarnessError::io("reading /dev/urandom"))?;
        std::fs::write(dir.join("operator-token"), &operator_token)
            .map_err(io("writing the operator token"))?;
        let log = dir.join("scheduler.log");
        let mut child = Command::new(scheduler_binary()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--webhook-secret-file")
            .arg(dir.join("webhook-secret"))
            .arg("--operator-token-file")
            .arg(dir.join("operator-token"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).map_err(io("creating scheduler.log"))?)
            .spawn()
            .map_err(HarnessError::io("starting hopper-scheduler"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(url) = line.trim().strip_prefix("hopper-scheduler listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Command {
                command: "hopper-scheduler serve".into(),
                status: format!("no listening line ({line:?})"),
                output: std::fs::read_to_string(&log).unwrap_or_default(),
            });
        };
        let url = url.to_string();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok(SchedulerProcess {
            child,
            url,
            port,
            log,
            webhook_secret: webhook_secret.to_string(),
            operator_token,
            http: reqwest::blocking::Client::new(),
        })
    }

    /// The scheduler's URL from inside a test host.
    pub fn url_from_test_host(&self) -> String {
        format!("http://{HOST_GATEWAY}:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a webhook delivery signed with the scheduler's secret; returns the HTTP status.
    pub fn deliver(&self, event: &str, delivery: &str, body: &Value) -> Result<u16, HarnessError> {
        let body = serde_json::to_vec(body).expect("JSON serializes");
        let resp = self
            .http
            .post(format!("{}/webhook", self.url))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sign(&self.webhook_secret, &body))
            .body(body)
            .send()
            .map_err(|e| self.error(format!("webhook delivery: {e}")))?;
        Ok(resp.status().as_u16())
    }

    /// GETs an operator API path (e.g. `/api/v1/jobs`) as JSON.
    pub fn get_json(&self, path: &str) -> Result<Value, HarnessError> {
        self.get(path)?
            .json()
            .map_err(|e| self.error(format!("GET {path}: {e}")))
    }

    /// GETs an operator API path that answers plain text (e.g. a job's log).
    pub fn get_text(&self, path: &str) -> Result<String, HarnessError> {
        self.get(path)?
            .text()
            .map_err(|e| self.error(format!("GET {path}: {e}")))
    }

    /// POSTs `body` to an operator API path (e.g. a host's interrupt); returns the status.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<u16, HarnessError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.operator_token)
            .json(body)
            .send()
            .map_err(|e| self.error(format!("POST {path}: {e}")))?;
        Ok(resp.status().as_u16())
    }

    fn get(&self, path: &str) -> Result<reqwest::blocking::Response, HarnessError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.operator_token)
            .send()
            .map_err(|e| self.error(format!("GET {path}: {e}")))?;
        if !resp.status().is_success() {
            return Err(self.error(format!("GET {path}: {}", resp.status())));
        }
        Ok(resp)
    }

    /// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` with the
    /// scheduler's log.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<Option<T>, HarnessError>,
    ) -> Result<T, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f()? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!("timed out after {timeout:?} waiting for {what}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn error(&self, what: String) -> HarnessError {
        HarnessError::Command {
            command: "hopper-scheduler".into(),
            status: what,
            output: tail(&self.log_text(), 30),
        }
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
