// Shared by several test crates (tests and benches), each using part of it.
#![allow(dead_code)]

//! What the job-path tests and benchmark share: the scheduler with a GitHub App whose API is
//! the stand-in the scheduler's tests use too (hopper-test-support: it only serves operations
//! of GitHub's OpenAPI description and checks the App JWT and installation tokens), real
//! `workflow_job` payloads, and a runner host enrolled from a test host.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use hopper_test_support::fixtures::octokit_dir;
use hopper_test_support::github::{app_key, RemoteJob, StandIn};
use hopper_tests::scheduler::runner_tap_prefix;
/// The runner hosts' data directories inside the test host.
pub use hopper_tests::scheduler::{runner_data_dir as data_dir, RUNNER_DATA as DATA};
use hopper_tests::{SchedulerProcess, TestHost, TestHostOptions};
use serde_json::Value;

const APP_ID: u64 = 4242;
const INSTALLATION_ID: u64 = 42;
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-5b7d";
const ENROLL_SECRET: &str = "e2e-enroll-secret-8c2a";

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
/// What the host's jobs left behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub vmms: usize,
    pub dirs: usize,
    pub taps: usize,
    pub tables: usize,
}

pub struct Setup {
    _rt: tokio::runtime::Runtime,
    pub github: StandIn,
    pub scheduler: SchedulerProcess,
    pub host: TestHost,
    vcpus: u32,
    memory_mb: u32,
    /// Extra arguments of each runner host daemon in the test host (one daemon per entry).
    runners: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Setup {
    pub fn start(name: &str, vcpus: u32, memory_mb: u32) -> anyhow::Result<Setup> {
        Self::start_fleet(name, vcpus, memory_mb, &[String::new()])
    }

    /// Like [`Setup::start`], with one runner host daemon per entry of `runners` (its extra
    /// arguments) in the one test host, each with `vcpus` and `memory_mb` of its own; they
    /// reach each other at 127.0.0.1.
    pub fn start_fleet(
        name: &str,
        vcpus: u32,
        memory_mb: u32,
        runners: &[String],
    ) -> anyhow::Result<Setup> {
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
            // A migrating guest is in memory twice for a moment (source and target).
            memory_mib: 1024 + 1024 * runners.len() as u32,
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
            runners: runners.to_vec(),
            _dir: dir,
        };
        for i in 0..runners.len() {
            setup.start_runner_n(i)?;
        }
        setup
            .scheduler
            .wait_for(
                "the runner hosts to enroll",
                Duration::from_secs(60),
                || {
                    let hosts = setup.scheduler.get_json("/api/v1/hosts")?;
                    Ok(hosts
                        .as_array()
                        .is_some_and(|h| h.len() == runners.len())
                        .then_some(()))
                },
            )
            .with_context(|| setup.runner_log())?;
        Ok(setup)
    }

    /// Starts `hopper-runner host` in the test host (again, after [`Setup::kill_runner`]).
    pub fn start_runner(&self) -> anyhow::Result<()> {
        self.start_runner_n(0)
    }

    /// Starts runner host `i`, named `runner-<i>`.
    pub fn start_runner_n(&self, i: usize) -> anyhow::Result<()> {
        // Files for stdout/stderr: the agent's exec returns once nothing holds its pipes.
        self.host.sh(&format!(
            "mkdir -p {data} && (hopper-runner host --scheduler {url} --enroll-secret-file \
             /etc/hopper-enroll-secret --data-dir {data} --images /guest --vcpus {vcpus} \
             --memory-mb {memory_mb} --agent-timeout 150 --name runner-{i} --address 127.0.0.1 \
             --tap-prefix {prefix} {extra} </dev/null >>/tmp/runner-host-{i}.log 2>&1 & \
             echo $! >/tmp/runner-host-{i}.pid)",
            data = data_dir(i),
            url = self.scheduler.url_from_test_host(),
            vcpus = self.vcpus,
            memory_mb = self.memory_mb,
            prefix = runner_tap_prefix(i),
            extra = self.runners[i],
        ))?;
        Ok(())
    }

    /// SIGKILLs the runner host daemon (its VMMs keep running, as after a daemon crash).
    pub fn kill_runner(&self) -> anyhow::Result<()> {
        self.host.sh("kill -9 $(cat /tmp/runner-host-0.pid)")?;
        Ok(())
    }

    /// The daemons' logs; when the test host cannot be asked (its kernel died, say), the end
    /// of the host's own console instead, which the harness keeps outside it.
    pub fn runner_log(&self) -> String {
        let mut out = String::new();
        for i in 0..self.runners.len() {
            match self.host.read_file(&format!("/tmp/runner-host-{i}.log")) {
                Ok(log) => out.push_str(&format!(
                    "--- runner host {i} log ---\n{}",
                    String::from_utf8_lossy(&log)
                )),
                Err(e) => {
                    return format!(
                        "--- runner host {i} log unreadable: {e}\n--- test host console ---\n{}",
                        self.host.console_tail()
                    )
                }
            }
        }
        out
    }

    /// Queues job `id` the way GitHub does: the stand-in's Actions API lists it, and a signed
    /// delivery announces it.
    pub fn queue(&self, id: u64, labels: &[&str]) -> anyhow::Result<()> {
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
    pub fn complete(&self, id: u64, labels: &[&str]) -> anyhow::Result<()> {
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

    pub fn job(&self, id: u64) -> anyhow::Result<Value> {
        Ok(self.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?)
    }

    /// Waits until the host's final report for job `id` (`finished` or `failed`) is in.
    pub fn wait_vm_done(&self, id: u64, timeout: Duration) -> anyhow::Result<Value> {
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
    pub fn job_log(&self, id: u64) -> anyhow::Result<String> {
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
    pub fn jit_config_of(&self, runner_name: &str) -> anyhow::Result<String> {
        let calls = self
            .github
            .requests_to("/repos/{owner}/{repo}/actions/runners/generate-jitconfig");
        let index = calls
            .iter()
            .position(|r| r.body["name"] == runner_name)
            .with_context(|| format!("no JIT config was generated for runner {runner_name}"))?;
        Ok(self.github.state.jit_configs.lock().unwrap()[index].clone())
    }

    /// What the host's jobs left: VMM processes, job work directories, guest TAP devices and
    /// guest firewall tables.
    pub fn leftovers(&self) -> anyhow::Result<Leftovers> {
        // `[e]`: the pattern does not match this script's own command line.
        let out = self.host.sh(&format!(
            "grep -l -- --agent-sock[e]t /proc/[0-9]*/cmdline 2>/dev/null | wc -l; \
             ls {DATA}*/jobs | grep -vc -e '^$' -e ':$' || true; \
             ls /sys/class/net | grep -c '^hjob' || true; nft list tables | grep -c hopper_hjob || true"
        ))?;
        let n: Vec<usize> = out
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        match n[..] {
            [vmms, dirs, taps, tables] => Ok(Leftovers {
                vmms,
                dirs,
                taps,
                tables,
            }),
            _ => bail!("unexpected output {out:?}"),
        }
    }

    /// Asserts that nothing of a job is left (`what` names the moment in the failure message).
    /// Counts once, so the message shows what the check saw.
    pub fn assert_nothing_left(&self, what: &str) -> anyhow::Result<()> {
        let left = self.leftovers()?;
        ensure!(
            left == Leftovers::default(),
            "{what}: left {left:?}\n{}",
            self.runner_log()
        );
        Ok(())
    }

    /// Waits (up to `timeout`) until nothing of a job is left, for cleanup that follows an
    /// event the test caused.
    pub fn wait_nothing_left(&self, what: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self.leftovers()? != Leftovers::default() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        self.assert_nothing_left(what)
    }

    /// Asserts that no secret of this run appears in the runner host's log.
    pub fn assert_no_secrets_logged(&self) -> anyhow::Result<()> {
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

    /// Waits (up to 4 minutes) until job `id` is as `done` says; returns it.
    pub fn wait_job(
        &self,
        id: u64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.scheduler
            .wait_for(what, Duration::from_secs(240), || {
                let job = self.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?;
                Ok(done(&job).then_some(job))
            })
            .with_context(|| self.runner_log())
    }

    /// Waits until job `id` has moved `n` times; returns it.
    pub fn wait_moves(&self, id: u64, n: usize) -> anyhow::Result<Value> {
        self.wait_job(id, &format!("job {id}'s move number {n}"), |job| {
            job["migrations"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|m| m["result"] == "succeeded").count() == n)
        })
    }

    /// The runner host (`runner-<i>`) that job `id` is on: its index and id.
    pub fn host_of(&self, id: u64) -> anyhow::Result<(usize, String)> {
        let job = self.job(id)?;
        let host_id = job["host_id"].as_str().context("job without a host")?;
        let hosts = self.scheduler.get_json("/api/v1/hosts")?;
        let name = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == host_id)
            .and_then(|h| h["name"].as_str())
            .context("unknown host")?
            .to_string();
        let i = name.trim_start_matches("runner-").parse()?;
        Ok((i, host_id.to_string()))
    }

    /// The id of the active host named `runner-<i>` (a replaced one enrolls afresh).
    pub fn active_host_id(&self, i: usize) -> anyhow::Result<String> {
        let hosts = self.scheduler.get_json("/api/v1/hosts")?;
        hosts
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["name"] == format!("runner-{i}").as_str())
            .find(|h| h["state"] == "active")
            .and_then(|h| h["id"].as_str())
            .map(str::to_string)
            .context("no such active host")
    }

    /// A termination notice for a host through the chaos API.
    pub fn interrupt(&self, host_id: &str, notice_s: u64) -> anyhow::Result<()> {
        let status = self.scheduler.post_json(
            &format!("/api/v1/hosts/{host_id}/interrupt"),
            &serde_json::json!({ "notice_s": notice_s }),
        )?;
        ensure!(status == 202, "interrupt answered {status}");
        Ok(())
    }

    /// Kills runner host `i` and starts a fresh one in its place (empty data directory, so it
    /// enrolls as a new host), as a new spot instance replaces a reclaimed one.
    pub fn replace_runner(&self, i: usize) -> anyhow::Result<()> {
        self.host.sh(&format!(
            "kill -9 $(cat /tmp/runner-host-{i}.pid); sleep 0.5; rm -rf {}",
            data_dir(i)
        ))?;
        self.start_runner_n(i)?;
        self.scheduler
            .wait_for(
                &format!("runner-{i} to enroll again"),
                Duration::from_secs(60),
                || Ok(self.active_host_id(i).ok()),
            )
            .with_context(|| self.runner_log())?;
        Ok(())
    }
}
