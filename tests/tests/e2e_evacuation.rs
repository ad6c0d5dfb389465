//! Spot evacuation end to end: the real scheduler with the GitHub stand-in, three runner host
//! daemons in one test host (each with its own data directory, TAP prefix and cloud metadata
//! stand-in), and a job running the deterministic workload. A termination notice on the job's
//! host, from the AWS metadata stand-in or the chaos API, moves the job's VM to another host
//! while the job runs; the source host is killed once the VM is off it; the job completes
//! with the digest of an undisturbed run, and its record shows each move. With nowhere to go
//! the job says so and runs on, and it moves as soon as a host comes back.
//! Its speed is measured by `cargo bench -p hopper-tests --bench job_evacuation`.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context};
use hopper_test_support::metadata::aws::Imds;
use hopper_tests::workload::Workload;
use serde_json::Value;

#[path = "common/e2e.rs"]
mod e2e;

use e2e::Setup;

const HOSTS: usize = 3;
/// About a minute of work: 40 progress lines, 1.5 s apart.
const WORK: Workload = Workload {
    mib: 64,
    steps: 400,
    every: 10,
    pace_ms: 1500,
};
const NO_CAPACITY: &str = "host reclaimed, no capacity to evacuate to";

fn label(w: &Workload) -> String {
    format!(
        "e2e-workload-{}-{}-{}-{}",
        w.mib, w.steps, w.every, w.pace_ms
    )
}

/// Checks that the job ended on its last host with the digest of an undisturbed run.
fn assert_completed_undisturbed(s: &Setup, id: u64, digest: &str) -> anyhow::Result<Value> {
    let job = s.wait_vm_done(id, Duration::from_secs(240))?;
    ensure!(
        job["vm_state"] == "finished",
        "job {id} ended {}: {}\n{}",
        job["vm_state"],
        job["reason"],
        s.runner_log()
    );
    let log = s
        .scheduler
        .get_text(&format!("/api/v1/jobs/{id}/logs/job"))?;
    ensure!(
        log.contains(&format!("hopper-run-job: workload digest {digest}")),
        "job {id}'s log does not show the undisturbed digest {digest}:\n{log}"
    );
    Ok(job)
}

#[test]
fn a_notice_moves_the_running_job_which_completes_undisturbed() -> anyhow::Result<()> {
    let expected = WORK.expected()?;
    hopper_tests::again_if_a_host_broke(|| {
        let rt = tokio::runtime::Runtime::new()?;
        let imds: Vec<Imds> = (0..HOSTS).map(|_| rt.block_on(Imds::start())).collect();
        let runners: Vec<String> = imds
            .iter()
            .map(|m| {
                format!(
                    "--notice-source aws --metadata-url {}",
                    m.url.replace("127.0.0.1", "10.0.2.2")
                )
            })
            .collect();
        let s = Setup::start_fleet("evacuation", 2, 2048, &runners)?;
        aws_notice_moves_the_job(&s, &imds, &expected.digest).context("an AWS notice")?;
        chaos_twice_with_a_wait_for_capacity(&s, &expected.digest)
            .context("the chaos API, twice")?;
        a_target_killed_mid_migration(&s, &expected.digest).context("a target killed")?;
        s.wait_nothing_left("after the jobs", Duration::from_secs(60))?;
        s.assert_no_secrets_logged()
    })
}

/// An AWS spot notice with two minutes to go: pre-copy; the source is killed as soon as the VM
/// is off it, long before its deadline.
fn aws_notice_moves_the_job(s: &Setup, imds: &[Imds], digest: &str) -> anyhow::Result<()> {
    let id = 8_000_001;
    let labels = ["hopper-1cpu-1gb", label(&WORK).leak()];
    s.queue(id, &labels)?;
    s.wait_job(id, "the job to run", |j| j["vm_state"] == "running")?;
    // Some of the work done where it started.
    std::thread::sleep(Duration::from_secs(10));
    let (from, from_id) = s.host_of(id)?;
    let noticed = Instant::now();
    imds[from].set_instance_action("terminate", SystemTime::now() + Duration::from_secs(120));
    let job = s.wait_moves(id, 1)?;
    let moved_after = noticed.elapsed();
    let m = &job["migrations"][0];
    ensure!(m["from"] == from_id.as_str(), "moved from {}", m["from"]);
    ensure!(
        m["mode"] == "precopy",
        "a 2-minute notice gets {}",
        m["mode"]
    );
    let (to, _) = s.host_of(id)?;
    ensure!(to != from, "the job is still on runner-{from}");
    // The source is done once it has reported what the move took.
    let job = s.wait_job(id, "the source's report", |j| {
        j["migrations"][0]["paused_ms"].is_u64()
    })?;
    let m = &job["migrations"][0];
    ensure!(m["bytes"].as_u64() > Some(0), "no bytes sent: {m}");
    println!(
        "AWS notice on runner-{from}: the job runs on runner-{to} {:.1}s later (guest paused {} ms)",
        moved_after.as_secs_f64(),
        m["paused_ms"]
    );
    // The cloud takes the source; nothing of the job was left there to lose.
    let hosts = s.scheduler.get_json("/api/v1/hosts")?;
    let source = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == from_id.as_str())
        .unwrap();
    ensure!(source["state"] == "reclaiming" || source["state"] == "evacuated");
    s.host
        .sh(&format!("kill -9 $(cat /tmp/runner-host-{from}.pid)"))?;
    let job = assert_completed_undisturbed(s, id, digest)?;
    ensure!(job["migrations"].as_array().unwrap().len() == 1);
    s.complete(id, &labels)?;
    // A fresh instance takes the killed host's place for the next check.
    imds[from].clear_instance_action();
    s.replace_runner(from)
}

/// The chaos API moves the job A → B with a 2-minute notice (pre-copy), then from B with 30
/// seconds (post-copy) when no host is free: the job says so and runs on; a host that comes
/// back takes it: A → B → C.
fn chaos_twice_with_a_wait_for_capacity(s: &Setup, digest: &str) -> anyhow::Result<()> {
    let id = 8_000_002;
    let labels = ["hopper-1cpu-1gb", label(&WORK).leak()];
    s.queue(id, &labels)?;
    s.wait_job(id, "the job to run", |j| j["vm_state"] == "running")?;
    std::thread::sleep(Duration::from_secs(5));
    let (a, a_id) = s.host_of(id)?;
    s.interrupt(&a_id, 120)?;
    let job = s.wait_moves(id, 1)?;
    ensure!(job["migrations"][0]["mode"] == "precopy");
    let (b, b_id) = s.host_of(id)?;
    ensure!(a != b);
    // The only other host is drained: nowhere to go.
    let c = (0..HOSTS).find(|i| *i != a && *i != b).unwrap();
    let drain = format!("/api/v1/hosts/{}/drain", s.active_host_id(c)?);
    let drained = s.scheduler.post_json(&drain, &serde_json::json!({}))?;
    ensure!(drained == 202, "drain answered {drained}");
    s.interrupt(&b_id, 30)?;
    s.wait_job(id, "the no-capacity reason", |j| j["reason"] == NO_CAPACITY)?;
    ensure!(s.job(id)?["vm_state"] == "running", "the job runs on");
    // Capacity comes back: a new host (runner-<c> enrolled afresh), and the job leaves B.
    s.replace_runner(c)?;
    let job = s.wait_moves(id, 2)?;
    let second = job["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["result"] == "succeeded")
        .unwrap();
    ensure!(
        second["mode"] == "postcopy",
        "a notice of 30 s gets {}",
        second["mode"]
    );
    let (now_on, _) = s.host_of(id)?;
    ensure!(now_on == c, "A → B → C: the job is on runner-{now_on}");
    let job = assert_completed_undisturbed(s, id, digest)?;
    ensure!(job["reason"].is_null(), "reason left: {}", job["reason"]);
    s.complete(id, &labels)?;
    Ok(())
}

/// The target dies while the VM is being sent: the VM runs on at the source, and the job moves
/// to another target and completes there.
fn a_target_killed_mid_migration(s: &Setup, digest: &str) -> anyhow::Result<()> {
    // Fresh hosts in the place of the two evacuated ones: a source and two targets.
    for i in 0..HOSTS {
        if s.active_host_id(i).is_err() {
            s.replace_runner(i)?;
        }
    }
    let id = 8_000_003;
    let labels = ["hopper-1cpu-1gb", label(&WORK).leak()];
    s.queue(id, &labels)?;
    s.wait_job(id, "the job to run", |j| j["vm_state"] == "running")?;
    std::thread::sleep(Duration::from_secs(5));
    let (from, from_id) = s.host_of(id)?;
    s.interrupt(&from_id, 120)?;
    let job = s.wait_job(id, "the VM on its way", |j| {
        j["migrations"][0]["result"] == "sending"
    })?;
    let doomed = job["migrations"][0]["to"].as_str().unwrap().to_string();
    let hosts = s.scheduler.get_json("/api/v1/hosts")?;
    let t: usize = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == doomed.as_str())
        .and_then(|h| h["name"].as_str()?.strip_prefix("runner-")?.parse().ok())
        .context("the target's name")?;
    // The target machine dies: its daemon and the VMM that receives (found by its disk in the
    // daemon's data directory; `[b]`: the pattern does not match this script's own command line).
    let kill = format!(
        "kill -9 $(cat /tmp/runner-host-{t}.pid); \
         for f in $(grep -l -- '{}/jo[b]s/' /proc/[0-9]*/cmdline); do \
           p=${{f#/proc/}}; kill -9 ${{p%/cmdline}}; echo killed VMM ${{p%/cmdline}}; done",
        e2e::data_dir(t)
    );
    let killed = s.host.sh(&kill)?;
    ensure!(
        killed.contains("killed VMM"),
        "no receiving VMM to kill: {killed:?}"
    );
    let job = s.wait_moves(id, 1)?;
    let results: Vec<&str> = job["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["result"].as_str().unwrap())
        .collect();
    ensure!(results == ["failed", "succeeded"], "migrations {results:?}");
    let (now_on, _) = s.host_of(id)?;
    ensure!(
        now_on != from && now_on != t,
        "the job is on runner-{now_on}"
    );
    assert_completed_undisturbed(s, id, digest)?;
    s.complete(id, &labels)?;
    // The dead target's leftovers go with a fresh start of its daemon.
    s.replace_runner(t)
}
