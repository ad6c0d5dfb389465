//! Webhook intake benchmark: starts the real `hopper-scheduler` binary (SQLite store in a temp
//! dir) and sends it signed `workflow_job` deliveries from this process over HTTP/1.1
//! keep-alive connections. Reports deliveries/s and latency percentiles.
//!
//! cargo bench -p hopper-scheduler --bench webhook_throughput -- [--deliveries N] [--concurrency C]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "bench-webhook-secret";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("numeric argument"))
        .unwrap_or(default)
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Real example payloads, relabelled: per job a queued, in_progress and completed delivery.
fn deliveries(n: usize) -> Vec<(String, Vec<u8>, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/node_modules/@octokit/webhooks-examples/api.github.com/index.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("{path}: {e}; run tests/setup.sh (or scheduler/tests/fixtures/fetch.sh) first")
    });
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    let examples = all.iter().find(|e| e["name"] == "workflow_job").unwrap()["examples"]
        .as_array()
        .unwrap();
    let by_action = |a: &str| examples.iter().find(|e| e["action"] == a).unwrap().clone();
    let actions = [
        by_action("queued"),
        by_action("in_progress"),
        by_action("completed"),
    ];
    (0..n)
        .map(|i| {
            let mut e = actions[i % 3].clone();
            e["workflow_job"]["id"] = (1_000_000 + i as u64 / 3).into();
            e["workflow_job"]["labels"] =
                serde_json::json!(["hopper-4cpu-8gb", "hopper-ubuntu-24.04"]);
            e["installation"] = serde_json::json!({"id": 1});
            let body = serde_json::to_vec(&e).unwrap();
            let sig = sign(&body);
            (format!("bench-{i}"), body, sig)
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

fn main() {
    let n = arg("--deliveries", 30_000);
    let concurrency = arg("--concurrency", 16);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopper-scheduler"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--webhook-secret-file")
        .arg(dir.path().join("secret"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning hopper-scheduler");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!(
        "{}/webhook",
        line.trim()
            .strip_prefix("hopper-scheduler listening on ")
            .expect("listening line")
    );

    let warmup = deliveries(600)
        .into_iter()
        .map(|(id, b, s)| (format!("warm-{id}"), b, s))
        .collect::<Vec<_>>();
    let work = deliveries(n);
    // The client runs on one thread so the scheduler keeps the other core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (elapsed, mut latencies) = rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()
            .unwrap();
        run(&client, &url, Arc::new(warmup), concurrency).await;
        let start = Instant::now();
        let lat = run(&client, &url, Arc::new(work), concurrency).await;
        (start.elapsed(), lat)
    });
    let _ = child.kill();
    let _ = child.wait();
    latencies.sort();
    println!("webhook intake, SQLite store (WAL), {n} signed workflow_job deliveries, {concurrency} connections");
    println!(
        "  throughput: {:.0} deliveries/s",
        n as f64 / elapsed.as_secs_f64()
    );
    for (name, p) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)] {
        println!(
            "  {name}: {:.2} ms",
            percentile(&latencies, p).as_secs_f64() * 1000.0
        );
    }
    println!(
        "  max: {:.2} ms",
        latencies.last().unwrap().as_secs_f64() * 1000.0
    );
}

/// Sends every delivery with `concurrency` workers; returns each request's latency.
async fn run(
    client: &reqwest::Client,
    url: &str,
    work: Arc<Vec<(String, Vec<u8>, String)>>,
    concurrency: usize,
) -> Vec<Duration> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, work, next) =
            (client.clone(), url.to_string(), work.clone(), next.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((id, body, sig)) = work.get(i) else {
                    break;
                };
                let t = Instant::now();
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-github-event", "workflow_job")
                    .header("x-github-delivery", id)
                    .header("x-hub-signature-256", sig)
                    .body(body.clone())
                    .send()
                    .await
                    .expect("request");
                let status = resp.status();
                let _ = resp.bytes().await;
                lat.push(t.elapsed());
                assert_eq!(status, 200, "delivery {id}");
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}
