//! Local mode as a newcomer runs it: the real `hopper-scheduler up --demo` on this machine,
//! whose KVM cannot run guests, so `up` starts `hopper-testhost`, which boots a test host
//! with `hopper-runner host` inside; the demo job goes from submission through a microVM to
//! `completed`, its log is printed, and everything stops with exit status 0.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use hopper_tests::scheduler::scheduler_binary;
use hopper_tests::{TestHost, TestHostOptions};

/// Test host boot, enrollment and one 1-vCPU, 1 GiB job, with room for a busy machine (the
/// test host's image is built before `up` starts, so that is not in here).
const DEMO_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Every `hlc_` local runner config this run handed out stays out of what people read.
fn assert_no_runner_config(what: &str, text: &str) -> anyhow::Result<()> {
    ensure!(!text.contains("hlc_"), "a local runner config in {what}");
    Ok(())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn up_demo_runs_a_job_through_a_test_host_and_exits_zero() -> anyhow::Result<()> {
    let scheduler = scheduler_binary()?;
    let testhost = env!("CARGO_BIN_EXE_hopper-testhost");
    // The image does not depend on the options; built here, its first build (minutes) is
    // neither in the timeout nor in the time reported.
    TestHost::prepare(&TestHostOptions::default())?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join(".hopper");
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let started = Instant::now();
    let mut up = Command::new(&scheduler)
        .args([
            "up",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--testhost-bin",
            testhost,
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--demo-timeout")
        .arg(format!("{}s", DEMO_TIMEOUT.as_secs()))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .context("starting hopper-scheduler up --demo")?;
    // `up` ends itself after --demo-timeout; this is for a hang beyond that.
    let deadline = started + DEMO_TIMEOUT + Duration::from_secs(5 * 60);
    let status = loop {
        if let Some(status) = up.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            up.kill()?;
            break up.wait()?;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let took = started.elapsed();
    let (out, err) = (read(&stdout), read(&stderr));
    let runner_log = read(&data.join("runner.log"));
    let scheduler_log = read(&data.join("scheduler.log"));
    println!("--- up's stdout ---\n{out}\n--- up's stderr ---\n{err}");
    ensure!(
        status.success(),
        "up --demo exited {status} after {took:.0?}\n--- runner log ---\n{runner_log}\n--- scheduler log ---\n{scheduler_log}"
    );

    // The steps, as the terminal showed them, each once.
    for step in [
        "nested test host",
        "hopper-testhost: test host hopper-up up after",
        "runner host hopper-up (",
        "demo: submitted job 9000000000000",
        ": queued hopper-1cpu-1gb (local/demo)",
        ": assigned to runner host hopper-up",
        ": VM running",
        ": VM finished",
        ": completed success",
        "---- end of log ----",
        "succeeded",
        "] stopped",
    ] {
        let seen = out.matches(step).count();
        ensure!(seen == 1, "{step:?} shown {seen} times on the terminal");
    }
    // The job's log, as the scheduler serves it: the guest ran the job with its config.
    ensure!(out.contains("hopper-run-job: jit config sha256"), "{out}");
    ensure!(out.contains("job command ended with exit code 0"), "{out}");
    // `up` made a private operator token and said where it is, never what it is.
    let token_file = data.join("operator-token");
    let mode = std::fs::metadata(&token_file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "operator-token has mode {mode:o}");
    let token = read(&token_file).trim().to_string();
    ensure!(
        token.len() == 64,
        "operator token of {} characters",
        token.len()
    );
    ensure!(
        out.contains(&format!("Bearer $(cat {})", token_file.display())),
        "{out}"
    );
    for (what, text) in [
        ("up's output", &out),
        ("up's errors", &err),
        ("the runner log", &runner_log),
        ("the scheduler log", &scheduler_log),
    ] {
        assert_no_runner_config(what, text)?;
        ensure!(!text.contains(&token), "the operator token in {what}");
    }
    ensure!(
        runner_log.contains("runner host ready"),
        "the runner log was not kept:\n{runner_log}"
    );
    // The test host is gone with `up`.
    let left: Vec<_> = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|p| read(&p.path().join("cmdline")).contains("testhost.name=hopper-up"))
        .collect();
    ensure!(left.is_empty(), "{} test host processes left", left.len());
    println!("local mode: `hopper-scheduler up --demo` took {took:.1?}");
    Ok(())
}
