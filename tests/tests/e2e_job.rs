//! The whole job path: a signed `workflow_job` delivery reaches the real scheduler, which gets
//! a JIT config from a GitHub stand-in and assigns the job to `hopper-runner host` running in a
//! test host; the runner boots a microVM from the test image, hands the JIT config to the
//! guest, runs the job command and reports back; the VM and its disk are gone afterwards.
//!
//! The GitHub stand-in is the scheduler's own (scheduler/tests/common/github.rs, included
//! below as it is): it only serves operations of GitHub's OpenAPI description and checks the
//! App JWT and installation tokens.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hopper_tests::{SchedulerProcess, TestHost, TestHostOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The npm fixtures fetched by tests/setup.sh (scheduler/tests/fixtures/fetch.sh).
fn octokit_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scheduler/tests/fixtures/node_modules/@octokit");
    assert!(
        dir.join("openapi/package.json").is_file()
            && dir.join("webhooks-examples/package.json").is_file(),
        "test fixtures missing in {}: run tests/setup.sh",
        dir.display()
    );
    dir
}

/// GitHub's REST OpenAPI description, which github.rs takes from its parent module.
fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = octokit_dir().join("openapi/generated/api.github.com.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    })
}

#[path = "../../scheduler/tests/common/github.rs"]
#[allow(dead_code)] // the scheduler's tests use more of it
mod github;

use github::{app_key, RemoteJob, StandIn};

const APP_ID: u64 = 4242;
const INSTALLATION_ID: u64 = 42;
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-5b7d";
const ENROLL_SECRET: &str = "e2e-enroll-secret-8c2a";
/// The runner host's data directory inside the test host.
const DATA: &str = "/var/lib/hopper/runner";

/// One test host at a time: they emulate their CPUs, and the machine has few cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A real `workflow_job` example from @octokit/webhooks-examples (the queued one with an
/// installation), made into job `id` with `labels`, at the stand-in's installation.
fn workflow_job(action: &str, id: u64, labels: &[&str]) -> Value {
    static EXAMPLES: OnceLock<Value> = OnceLock::new();
    let all = EXAMPLES.get_or_init(|| {
        let path = octokit_dir().join("webhooks-examples/api.github.com/index.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    });
    let mut ex = all
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "workflow_job")
        .unwrap()["examples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "queued" && e["installation"].is_object())
        .expect("a queued workflow_job example")
        .clone();
    ex["action"] = action.into();
    ex["workflow_job"]["id"] = id.into();
    ex["workflow_job"]["labels"] = labels.iter().map(|l| Value::from(*l)).collect();
    ex["workflow_job"]["status"] = action.into();
    if action == "completed" {
        ex["workflow_job"]["conclusion"] = "success".into();
    }
    ex["installation"] =
        serde_json::json!({ "id": INSTALLATION_ID, "node_id": "MDIzOkludGVncmF0aW9uNDI=" });
    ex
}

/// The scheduler with a GitHub App whose API is the stand-in, and a runner host enrolled from
/// a test host.
struct Setup {
    _rt: tokio::runtime::Runtime,
    github: StandIn,
    scheduler: SchedulerProcess,
    host: TestHost,
    vcpus: u32,
    memory_mb: u32,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start(name: &str, vcpus: u32, memory_mb: u32) -> anyhow::Result<Setup> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let github = rt.block_on(StandIn::start(APP_ID, INSTALLATION_ID));
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("app.pem");
        std::fs::write(&key, &app_key().0)?;
        std::fs::write(dir.path().join("enroll-secret"), ENROLL_SECRET)?;
        let args: Vec<String> = vec![
            "--github-api-url".into(),
            github.url.clone(),
            "--app-id".into(),
            APP_ID.to_string(),
            "--app-private-key".into(),
            key.display().to_string(),
            "--enroll-secret-file".into(),
            dir.path().join("enroll-secret").display().to_string(),
        ];
        let scheduler = SchedulerProcess::start(dir.path(), WEBHOOK_SECRET, &args)?;
        let host = TestHost::boot(TestHostOptions {
            name: Some(name.into()),
            ..Default::default()
        })?;
        host.write_file("/etc/hopper-enroll-secret", ENROLL_SECRET.as_bytes(), 0o600)?;
        let setup = Setup {
            _rt: rt,
            github,
            scheduler,
            host,
            vcpus,
            memory_mb,
            _dir: dir,
        };
        setup.start_runner()?;
        setup
            .scheduler
            .wait_for("the runner host to enroll", Duration::from_secs(60), || {
                let hosts = setup.scheduler.get_json("/api/v1/hosts")?;
                Ok(hosts.as_array().is_some_and(|h| h.len() == 1).then_some(()))
            })
            .with_context(|| setup.runner_log())?;
        Ok(setup)
    }

    /// Starts `hopper-runner host` in the test host (again, after [`Setup::kill_runner`]).
    fn start_runner(&self) -> anyhow::Result<()> {
        // Files for stdout/stderr: the agent's exec returns once nothing holds its pipes.
        self.host.sh(&format!(
            "mkdir -p {DATA} && (hopper-runner host --scheduler {url} --enroll-secret-file \
             /etc/hopper-enroll-secret --data-dir {DATA} --images /guest --vcpus {vcpus} \
             --memory-mb {memory_mb} --agent-timeout 150 </dev/null >>/tmp/runner-host.log 2>&1 & \
             echo $! >/tmp/runner-host.pid)",
            url = self.scheduler.url_from_test_host(),
            vcpus = self.vcpus,
            memory_mb = self.memory_mb,
        ))?;
        Ok(())
    }

    /// SIGKILLs the runner host daemon (its VMMs keep running, as after a daemon crash).
    fn kill_runner(&self) -> anyhow::Result<()> {
        self.host.sh("kill -9 $(cat /tmp/runner-host.pid)")?;
        Ok(())
    }

    /// The daemon's log; when the test host cannot be asked (its kernel died, say), the end
    /// of the host's own console instead, which the harness keeps outside it.
    fn runner_log(&self) -> String {
        match self.host.read_file("/tmp/runner-host.log") {
            Ok(log) => format!("--- runner host log ---\n{}", String::from_utf8_lossy(&log)),
            Err(e) => format!(
                "--- runner host log unreadable: {e}\n--- test host console ---\n{}",
                self.host.console_tail()
            ),
        }
    }

    /// Queues job `id` the way GitHub does: the stand-in's Actions API lists it, and a signed
    /// delivery announces it.
    fn queue(&self, id: u64, labels: &[&str]) -> anyhow::Result<()> {
        self.github.state.jobs.lock().unwrap().push(RemoteJob {
            id,
            run_id: id + 1_000_000,
            repository: "Codertocat/Hello-World".into(),
            status: "queued".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        });
        let status = self.scheduler.deliver(
            "workflow_job",
            &format!("queued-{id}"),
            &workflow_job("queued", id, labels),
        )?;
        ensure!(
            status == 200,
            "queued delivery for job {id} answered {status}"
        );
        Ok(())
    }

    /// GitHub's word that the job is done (its runner reported the result).
    fn complete(&self, id: u64, labels: &[&str]) -> anyhow::Result<()> {
        for j in self
            .github
            .state
            .jobs
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|j| j.id == id)
        {
            j.status = "completed".into();
        }
        let status = self.scheduler.deliver(
            "workflow_job",
            &format!("completed-{id}"),
            &workflow_job("completed", id, labels),
        )?;
        ensure!(
            status == 200,
            "completed delivery for job {id} answered {status}"
        );
        Ok(())
    }

    fn job(&self, id: u64) -> anyhow::Result<Value> {
        Ok(self.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?)
    }

    /// Waits until the host's final report for job `id` (`finished` or `failed`) is in.
    fn wait_vm_done(&self, id: u64, timeout: Duration) -> anyhow::Result<Value> {
        self.scheduler
            .wait_for(&format!("job {id}'s VM to end"), timeout, || {
                let job = self.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?;
                Ok(matches!(job["vm_state"].as_str(), Some("finished" | "failed")).then_some(job))
            })
            .with_context(|| self.runner_log())
    }

    /// The job's output as the scheduler serves it to operators, after checking that it is
    /// what the host recorded (the scheduler only blanks out the JIT config, which the job
    /// does not print).
    fn job_log(&self, id: u64) -> anyhow::Result<String> {
        let served = self
            .scheduler
            .get_text(&format!("/api/v1/jobs/{id}/logs/job"))?;
        let on_host = self.host.read_file(&format!("{DATA}/logs/{id}/job.log"))?;
        ensure!(
            served.as_bytes() == on_host,
            "job {id}'s log served by the scheduler differs from the host's:\n{served}"
        );
        Ok(served)
    }

    /// The JIT config the stand-in generated for the runner named `runner_name`.
    fn jit_config_of(&self, runner_name: &str) -> anyhow::Result<String> {
        let calls = self
            .github
            .requests_to("/repos/{owner}/{repo}/actions/runners/generate-jitconfig");
        let index = calls
            .iter()
            .position(|r| r.body["name"] == runner_name)
            .with_context(|| format!("no JIT config was generated for runner {runner_name}"))?;
        Ok(self.github.state.jit_configs.lock().unwrap()[index].clone())
    }

    /// Number of VMM processes in the test host, and job work directories left.
    fn leftovers(&self) -> anyhow::Result<(usize, usize)> {
        // `[e]`: the pattern does not match this script's own command line.
        let out = self.host.sh(&format!(
            "grep -l -- --agent-sock[e]t /proc/[0-9]*/cmdline 2>/dev/null | wc -l; ls {DATA}/jobs | wc -l"
        ))?;
        let n: Vec<usize> = out
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        match n[..] {
            [vmms, dirs] => Ok((vmms, dirs)),
            _ => bail!("unexpected output {out:?}"),
        }
    }

    /// Asserts that no VMM process and no job work directory is left (`what` names them in
    /// the failure message). Counts once, so the message shows what the check saw.
    fn assert_nothing_left(&self, what: &str) -> anyhow::Result<()> {
        let left = self.leftovers()?;
        ensure!(left == (0, 0), "{what} left: {left:?}");
        Ok(())
    }

    /// Asserts that no secret of this run appears in the runner host's log.
    fn assert_no_secrets_logged(&self) -> anyhow::Result<()> {
        let log = self.runner_log();
        ensure!(
            !log.contains(ENROLL_SECRET),
            "enrollment secret in the runner log"
        );
        ensure!(!log.contains("hht_"), "host token in the runner log");
        for jit in self.github.state.jit_configs.lock().unwrap().iter() {
            ensure!(
                !log.contains(jit.as_str()),
                "a JIT config in the runner log"
            );
        }
        Ok(())
    }
}

fn sha256_hex(data: &str) -> String {
    Sha256::digest(data.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a finished job: the guest ran the job command with its own JIT config.
fn assert_ran_with_its_jit_config(s: &Setup, id: u64) -> anyhow::Result<()> {
    let job = s.job(id)?;
    let runner = job["runner_name"]
        .as_str()
        .context("job without runner name")?;
    let jit = s.jit_config_of(runner)?;
    let log = s.job_log(id)?;
    ensure!(
        log.contains(&format!(
            "hopper-run-job: jit config sha256 {}",
            sha256_hex(&jit)
        )),
        "job {id}'s log does not show the SHA-256 of its JIT config:\n{log}"
    );
    ensure!(
        !log.contains(&jit),
        "the JIT config itself is in the job log"
    );
    Ok(())
}

#[test]
fn queued_job_runs_in_a_microvm_and_leaves_nothing_behind() -> anyhow::Result<()> {
    let _serial = serial();
    let s = Setup::start("e2e-one", 2, 2048)?;
    // The guest reaches the outside world through its host's NAT: the job fetches a token
    // from a server on this machine (10.0.2.2 from inside the test host).
    let server = std::net::TcpListener::bind("0.0.0.0:0")?;
    let net_label = format!("e2e-net-check-{}", server.local_addr()?.port());
    let token = format!("outside-{}", std::process::id());
    let reply = format!("HTTP/1.0 200 OK\r\n\r\n{token}\n");
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = server.accept() {
            use std::io::{Read, Write};
            let mut request = [0u8; 512];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    let labels = ["hopper-1cpu-1gb", net_label.as_str()];
    let id = 7_000_001;
    let queued_at = Instant::now();
    s.queue(id, &labels)?;

    let job = s.wait_vm_done(id, Duration::from_secs(240))?;
    let took = queued_at.elapsed();
    ensure!(
        job["vm_state"] == "finished",
        "job did not finish: {job:#}\n{}",
        s.runner_log()
    );
    ensure!(
        job["state"] == "running",
        "the host's `running` report did not move the job: {job:#}"
    );
    assert_ran_with_its_jit_config(&s, id)?;
    let log = s.job_log(id)?;
    ensure!(log.contains("job command ended with exit code 0"), "{log}");
    ensure!(
        log.contains(&format!("hopper-run-job: net check: {token}")),
        "the guest did not reach a server outside its host:\n{log}"
    );
    let console =
        String::from_utf8_lossy(&s.host.read_file(&format!("{DATA}/logs/{id}/console.log"))?)
            .into_owned();
    ensure!(
        console.contains("hopper-init: started"),
        "the VM console was not kept:\n{console}"
    );

    s.complete(id, &labels)?;
    s.scheduler
        .wait_for("the job to be completed", Duration::from_secs(30), || {
            let job = s.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?;
            Ok((job["state"] == "completed").then_some(()))
        })?;
    s.assert_nothing_left("VMM or job directory")?;
    s.assert_no_secrets_logged()?;
    s.github.assert_no_violations();
    println!("e2e: one job, queued delivery to the host's `finished` report: {took:.2?}");
    Ok(())
}

#[test]
fn four_jobs_at_once_then_a_crashing_guest_is_failed() -> anyhow::Result<()> {
    let _serial = serial();
    let s = Setup::start("e2e-four", 4, 4096)?;
    // Counts the host's VMMs every 100 ms, to show the four jobs overlapped.
    s.host.sh(
        "(while :; do grep -l -- --agent-sock[e]t /proc/[0-9]*/cmdline 2>/dev/null | wc -l >>/tmp/vmm-count; \
         sleep 0.1; done </dev/null >/dev/null 2>&1 &)",
    )?;
    let labels = ["hopper-1cpu-1gb"];
    let ids: Vec<u64> = (1..=4).map(|n| 7_100_000 + n).collect();
    for &id in &ids {
        s.queue(id, &labels)?;
    }
    for &id in &ids {
        let job = s.wait_vm_done(id, Duration::from_secs(300))?;
        ensure!(
            job["vm_state"] == "finished",
            "job {id} did not finish: {job:#}\n{}",
            s.runner_log()
        );
        assert_ran_with_its_jit_config(&s, id)?;
    }
    let counts = s.host.sh("cat /tmp/vmm-count")?;
    let peak = counts
        .split_whitespace()
        .filter_map(|n| n.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    ensure!(peak == 4, "at most {peak} VMs ran at once, not 4");
    s.assert_nothing_left("VMM or job directory")?;

    // The guest's kernel panics mid-job; with panic=-1 it reboots and the VMM exits 0, but
    // the job command never answered: the job is failed, not finished.
    let crash = 7_100_100;
    let crash_labels = ["hopper-1cpu-1gb", "e2e-crash-guest"];
    s.queue(crash, &crash_labels)?;
    let job = s.wait_vm_done(crash, Duration::from_secs(240))?;
    ensure!(
        job["vm_state"] == "failed",
        "crashed guest not reported failed: {job:#}"
    );
    ensure!(
        job["state"] == "failed",
        "crashed guest's job is not failed: {job:#}"
    );
    let reason = job["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("guest stopped before the job command finished"),
        "reason: {reason}"
    );
    let console = String::from_utf8_lossy(
        &s.host
            .read_file(&format!("{DATA}/logs/{crash}/console.log"))?,
    )
    .into_owned();
    ensure!(
        console.contains("Kernel panic"),
        "no panic on the guest console:\n{console}"
    );
    s.assert_nothing_left("VMM or job directory")?;
    s.assert_no_secrets_logged()?;
    s.github.assert_no_violations();
    Ok(())
}

#[test]
fn runner_restart_fails_the_interrupted_job_and_cleans_up() -> anyhow::Result<()> {
    let _serial = serial();
    let s = Setup::start("e2e-restart", 2, 2048)?;
    let labels = ["hopper-1cpu-1gb"];
    let id = 7_200_001;
    s.queue(id, &labels)?;
    // Kill the daemon while the job's VM boots: the VMM is left running as an orphan.
    s.scheduler
        .wait_for("the job's VM to start", Duration::from_secs(120), || {
            let job = s.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?;
            Ok((job["vm_state"] == "starting").then_some(()))
        })?;
    s.kill_runner()?;
    let (vmms, dirs) = s.leftovers()?;
    ensure!(
        dirs == 1,
        "the job's directory should outlive the daemon, found {dirs}"
    );

    s.start_runner()?;
    let job = s.wait_vm_done(id, Duration::from_secs(120))?;
    ensure!(
        job["vm_state"] == "failed" && job["state"] == "failed",
        "not failed: {job:#}"
    );
    let reason = job["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("runner host restarted while the job ran"),
        "reason: {reason}"
    );
    s.assert_nothing_left(&format!("VMM ({vmms} before the restart) or job directory"))?;
    // The restarted daemon is the same host: it used its stored token, not a new enrollment.
    let hosts = s.scheduler.get_json("/api/v1/hosts")?;
    ensure!(
        hosts.as_array().map(Vec::len) == Some(1),
        "re-enrolled: {hosts:#}"
    );
    let log = s.runner_log();
    ensure!(log.contains("using stored host credentials"), "{log}");
    s.assert_no_secrets_logged()?;
    Ok(())
}

/// Benchmark: from sending the `queued` delivery to the runner host's `running` report (the
/// guest agent answered and holds the JIT config), against a bare boot of the same VM (same
/// VMM, image and shape, in the same test host) from VMM start to agent ready. Run with
/// `cargo test -p hopper-tests --release --test e2e_job -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_webhook_to_guest_agent_ready() -> anyhow::Result<()> {
    use hopper_tests::{boot_guest, GuestVmm, MicrovmOptions};
    let _serial = serial();
    let s = Setup::start("e2e-bench", 2, 2048)?;
    let labels = ["hopper-1cpu-1gb"];
    let rounds = 5;
    let mut path = Vec::new();
    let mut in_path_boot = Vec::new();
    // Round 0 warms caches (first disk copy, first VMM start) and is not counted.
    for i in 0..=rounds {
        let id = 7_300_000 + i;
        let sent = Instant::now();
        s.queue(id, &labels)?;
        let seen =
            s.scheduler
                .wait_for("the job's running report", Duration::from_secs(180), || {
                    let job = s.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?;
                    Ok(match job["vm_state"].as_str() {
                        Some("running") => Some(Some(sent.elapsed())),
                        // Too quick to see `running`: not a valid sample.
                        Some("finished" | "failed") => Some(None),
                        _ => None,
                    })
                })?;
        let job = s.wait_vm_done(id, Duration::from_secs(120))?;
        ensure!(job["vm_state"] == "finished", "bench job failed: {job:#}");
        if let (Some(t), true) = (seen, i > 0) {
            path.push(t);
            // The daemon's own note: VMM start to agent ready, inside the job path.
            let log = s.job_log(id)?;
            let secs = log
                .lines()
                .find_map(|l| {
                    l.strip_prefix("hopper-runner: guest agent ready ")?
                        .split('s')
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
                .context("no agent-ready note in the job log")?;
            in_path_boot.push(Duration::from_secs_f64(secs));
        }
    }
    let mut bare = Vec::new();
    for i in 0..rounds {
        let opts = MicrovmOptions {
            vmm: GuestVmm::Hopper,
            name: format!("bare{i}"),
            memory_mib: 1024,
            cpus: 1,
            ..Default::default()
        };
        let vm = boot_guest(&s.host, &opts)?;
        bare.push(vm.ready_after);
        vm.poweroff(&s.host, Duration::from_secs(30))?;
        s.host.sh(&format!("rm -rf {}", vm.dir))?;
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    ensure!(!path.is_empty(), "no valid sample of the job path");
    let (p, b, d) = (
        median(&mut path),
        median(&mut bare),
        median(&mut in_path_boot),
    );
    // Two baselines: the harness's boot_guest (its shell polls the console every 10 ms in the
    // emulated host, which slows the guest), and the daemon's own VMM-start-to-ready time.
    println!(
        "bench: webhook -> guest agent ready (running report): median {p:.2?} of {path:.2?}\n\
         bench: bare VM boot -> agent ready (boot_guest):      median {b:.2?} of {bare:.2?}\n\
         bench: VMM start -> agent ready inside the job path:  median {d:.2?} of {in_path_boot:.2?}\n\
         bench: ratio to boot_guest {:.2}, to the in-path boot {:.2}",
        p.as_secs_f64() / b.as_secs_f64(),
        p.as_secs_f64() / d.as_secs_f64()
    );
    Ok(())
}
