//! The job path's speed: from a `workflow_job` webhook received by the scheduler to the job's
//! guest agent ready (the host's `running` report), on a runner host with capacity in a test
//! host, against two baselines measured in the same test host: a bare VM boot of the same
//! image (`boot_guest`) and the daemon's own note of VMM start → agent ready inside the path.
//!
//!   cargo bench -p hopper-tests --bench job_path     (HOPPER_BENCH_ROUNDS=5 by default)
//!
//! Goal: the path takes at most 2× the bare boot. Nested figures: only ratios mean anything.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hopper_tests::bench::{self, median};
use hopper_tests::{boot_guest, GuestVmm, MicrovmOptions};

#[path = "../tests/common/e2e.rs"]
mod e2e;

use e2e::Setup;

fn main() -> Result<()> {
    let rounds = bench::rounds(5);
    eprintln!("starting the scheduler and a runner host in a test host…");
    let s = Setup::start("e2e-bench", 2, 2048)?;
    let labels = ["hopper-1cpu-1gb"];
    let (mut path, mut in_path_boot, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    // Round 0 warms caches (first disk copy, first VMM start) and is not counted.
    for i in 0..=rounds {
        let id = 7_300_000 + i as u64;
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
        let (Some(t), true) = (seen, i > 0) else {
            continue;
        };
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
        path.push(t.as_secs_f64());
        in_path_boot.push(secs);
        eprintln!(
            "round {i}/{rounds}: webhook -> agent ready {:.2} s (VMM start -> ready {secs:.2} s)",
            t.as_secs_f64()
        );
    }
    for i in 0..rounds {
        let opts = MicrovmOptions {
            vmm: GuestVmm::Hopper,
            name: format!("bare{i}"),
            memory_mib: 1024,
            cpus: 1,
            ..Default::default()
        };
        let vm = boot_guest(&s.host, &opts)?;
        bare.push(vm.ready_after.as_secs_f64());
        vm.poweroff(&s.host, Duration::from_secs(30))?;
        s.host.sh(&format!("rm -rf {}", vm.dir))?;
    }
    ensure!(!path.is_empty(), "no valid sample of the job path");
    let (p, b, d) = (median(&path), median(&bare), median(&in_path_boot));
    println!("Job path benchmark: {rounds} rounds, 1 vCPU / 1 GiB jobs, medians");
    println!("| | seconds | path / this |");
    println!("|---|---|---|");
    println!("| webhook → guest agent ready (running report) | {p:.2} | |");
    println!(
        "| bare VM boot → agent ready (boot_guest) | {b:.2} | {:.2} |",
        p / b
    );
    println!(
        "| VMM start → agent ready inside the path | {d:.2} | {:.2} |",
        p / d
    );
    Ok(())
}
