//! The whole job path: a signed `workflow_job` delivery reaches the real scheduler, which gets
//! a JIT config from a GitHub stand-in and assigns the job to `hopper-runner host` running in a
//! test host; the runner boots a microVM from the test image, hands the JIT config to the
//! guest, runs the job command and reports back; the VM and its disk are gone afterwards.
//! Its speed is measured by `cargo bench -p hopper-tests --bench job_path`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use sha2::{Digest, Sha256};

#[path = "common/e2e.rs"]
mod e2e;

use e2e::{Setup, DATA};

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

/// One scheduler and one test host serve the job path's checks in turn (one boot, several
/// checks): each check ends with nothing left behind on the host, which is where the next one
/// starts. The runner restart and the daemon's stop go last.
#[test]
fn job_path_one_job_four_at_once_a_crash_a_killed_vmm_a_restart_and_a_stop() -> anyhow::Result<()> {
    hopper_tests::again_if_a_host_broke(|| {
        let s = Setup::start("e2e", 4, 4096)?;
        queued_job_runs_in_a_microvm_and_leaves_nothing_behind(&s).context("one job")?;
        four_jobs_at_once_then_a_crashing_guest_is_failed(&s).context("four jobs, then a crash")?;
        a_killed_vmm_leaves_nothing_behind(&s).context("a killed VMM")?;
        runner_restart_fails_the_interrupted_job_and_cleans_up(&s).context("a runner restart")?;
        sigterm_stops_the_running_job_and_leaves_nothing(&s).context("SIGTERM")?;
        Ok(())
    })
}

fn queued_job_runs_in_a_microvm_and_leaves_nothing_behind(s: &Setup) -> anyhow::Result<()> {
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
    assert_ran_with_its_jit_config(s, id)?;
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
    s.assert_nothing_left("after the job")?;
    s.assert_no_secrets_logged()?;
    s.github.assert_no_violations();
    println!("e2e: one job, queued delivery to the host's `finished` report: {took:.2?}");
    Ok(())
}

fn four_jobs_at_once_then_a_crashing_guest_is_failed(s: &Setup) -> anyhow::Result<()> {
    // Counts the host's VMMs every 100 ms, to show the four jobs overlapped.
    s.host.sh(
        "(while :; do grep -l -- --agent-sock[e]t /proc/[0-9]*/cmdline 2>/dev/null | wc -l >>/tmp/vmm-count; \
         sleep 0.1; done </dev/null >/dev/null 2>&1 & echo $! >/tmp/vmm-count.pid)",
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
        assert_ran_with_its_jit_config(s, id)?;
    }
    let counts = s
        .host
        .sh("kill $(cat /tmp/vmm-count.pid) && cat /tmp/vmm-count")?;
    let peak = counts
        .split_whitespace()
        .filter_map(|n| n.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    ensure!(peak == 4, "at most {peak} VMs ran at once, not 4");
    s.assert_nothing_left("after the job")?;

    // The guest's kernel panics mid-job; with panic=-1 it reboots and the VMM exits 0, but
    // the job command never answered: the job is failed, not finished.
    let crash = 7_100_100;
    let crash_labels = ["hopper-1cpu-1gb", "e2e-crash-guest"];
    s.queue(crash, &crash_labels)?;
    wait_failed(
        s,
        crash,
        Duration::from_secs(240),
        "guest stopped before the job command finished",
    )?;
    let console = String::from_utf8_lossy(
        &s.host
            .read_file(&format!("{DATA}/logs/{crash}/console.log"))?,
    )
    .into_owned();
    ensure!(
        console.contains("Kernel panic"),
        "no panic on the guest console:\n{console}"
    );
    s.assert_nothing_left("after the job")?;
    s.assert_no_secrets_logged()?;
    s.github.assert_no_violations();
    Ok(())
}

fn runner_restart_fails_the_interrupted_job_and_cleans_up(s: &Setup) -> anyhow::Result<()> {
    let id = 7_200_001;
    s.queue(id, &["hopper-1cpu-1gb", "e2e-sleep-600"])?;
    // Kill the daemon while the job runs: its directory, TAP and firewall table stay behind,
    // and its VMM too unless the broken console pipe ended it.
    wait_running(s, id)?;
    s.kill_runner()?;
    let left = s.leftovers()?;
    ensure!(
        left.dirs == 1 && left.taps == 1 && left.tables == 1,
        "the job's directory, TAP and firewall table should outlive the daemon: {left:?}"
    );

    s.start_runner()?;
    wait_failed(
        s,
        id,
        Duration::from_secs(120),
        "runner host restarted while the job ran",
    )?;
    s.assert_nothing_left(&format!("after the restart ({} VMMs before it)", left.vmms))?;
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

/// Waits until job `id`'s VM is done and checks that the host reported it failed, the job is
/// failed, and its reason says `why`.
fn wait_failed(s: &Setup, id: u64, timeout: Duration, why: &str) -> anyhow::Result<()> {
    let job = s.wait_vm_done(id, timeout)?;
    ensure!(
        job["vm_state"] == "failed" && job["state"] == "failed",
        "job {id} is not failed: {job:#}"
    );
    let reason = job["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains(why), "job {id}'s reason: {reason}");
    Ok(())
}

/// Waits until job `id`'s VM runs the job command.
fn wait_running(s: &Setup, id: u64) -> anyhow::Result<()> {
    s.scheduler.wait_for(
        "the job's VM to run the job",
        Duration::from_secs(180),
        || {
            let job = s.scheduler.get_json(&format!("/api/v1/jobs/{id}"))?;
            Ok((job["vm_state"] == "running").then_some(()))
        },
    )?;
    Ok(())
}

/// A VMM that dies by SIGKILL (nothing of its own cleanup runs) still leaves no TAP, firewall
/// table or work directory once the daemon has noticed: the daemon owns them, not the VMM.
fn a_killed_vmm_leaves_nothing_behind(s: &Setup) -> anyhow::Result<()> {
    let id = 7_150_001;
    s.queue(id, &["hopper-1cpu-1gb", "e2e-sleep-600"])?;
    wait_running(s, id)?;
    let left = s.leftovers()?;
    ensure!(
        left.vmms == 1 && left.dirs == 1 && left.taps == 1 && left.tables == 1,
        "a running job should have one of each: {left:?}"
    );
    s.host
        .sh(&format!("kill -9 $(cat {DATA}/jobs/{id}/vmm.pid)"))?;
    wait_failed(
        s,
        id,
        Duration::from_secs(60),
        "guest stopped before the job command finished",
    )?;
    s.assert_nothing_left("after the VMM was killed")?;
    Ok(())
}

/// SIGTERM to the daemon with a job running: the job's VM is stopped, the job reported failed
/// with the reason, everything of it removed, and the daemon exits 0.
fn sigterm_stops_the_running_job_and_leaves_nothing(s: &Setup) -> anyhow::Result<()> {
    let id = 7_300_001;
    s.queue(id, &["hopper-1cpu-1gb", "e2e-sleep-600"])?;
    wait_running(s, id)?;
    s.host.sh("kill -TERM $(cat /tmp/runner-host-0.pid)")?;
    wait_failed(
        s,
        id,
        Duration::from_secs(90),
        "runner host was stopped while the job ran",
    )?;
    s.wait_nothing_left("after SIGTERM", Duration::from_secs(30))?;
    let gone = s.host.sh(
        // A zombie (its parent may not reap it) has an empty command line: it counts as gone.
        "p=$(cat /tmp/runner-host-0.pid); for i in $(seq 100); do \
         [ -n \"$(tr -d '\\0' </proc/$p/cmdline 2>/dev/null)\" ] || { echo gone; exit 0; }; \
         sleep 0.2; done; echo running",
    )?;
    ensure!(
        gone.trim() == "gone",
        "the daemon still runs 20 s after SIGTERM\n{}",
        s.runner_log()
    );
    let log = s.runner_log();
    ensure!(log.contains("runner host stopped"), "{log}");
    s.assert_no_secrets_logged()?;
    Ok(())
}
