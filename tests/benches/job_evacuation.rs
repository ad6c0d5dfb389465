//! Spot evacuation's speed: a termination notice (the chaos API, as the cloud's would reach
//! the host) on a runner host with 1 and then 3 running job VMs, until each job runs on the
//! other host, and until the noticed host holds nothing (`evacuated`): the time the notice
//! leaves to spare. With a 120 s notice (pre-copy) and a 30 s one (post-copy). Next to it, what
//! peers offer instead: the job started again from scratch elsewhere (its cold start to a
//! running job, measured in the same run; the work it had done is lost on top).
//!
//!   cargo bench -p hopper-tests --bench job_evacuation     (HOPPER_BENCH_ROUNDS=2 by default)
//!
//! Two runner hosts in one nested test host: only ratios and the notice's share mean anything.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use hopper_tests::bench::{self, median};
use serde_json::Value;

#[path = "../tests/common/e2e.rs"]
mod e2e;

use e2e::Setup;

/// Each job keeps working (and writing memory) for about a minute: long enough to be moved,
/// three at once, before it ends.
const LABELS: [&str; 2] = ["hopper-1cpu-1gb", "e2e-workload-64-600-10-1000"];

struct Round {
    /// Notice to the last job running again on the target.
    all_moved: f64,
    /// Notice to the host holding no job.
    source_free: f64,
    pauses_ms: Vec<f64>,
}

fn main() -> Result<()> {
    let rounds = bench::rounds(2);
    eprintln!("starting the scheduler and two runner hosts in a test host…");
    let none = "--notice-source none".to_string();
    let s = Setup::start_fleet("evac-bench", 4, 4096, &[none.clone(), none])?;
    let mut next_id = 7_400_000;
    let mut cold = Vec::new();
    let mut table = Vec::new();
    for notice_s in [120, 30] {
        for jobs in [1, 3] {
            let mut samples = Vec::new();
            for r in 0..rounds {
                let (round, started) = evacuate(&s, &mut next_id, jobs, notice_s)?;
                cold.extend(started);
                eprintln!(
                    "{notice_s} s notice, {jobs} job(s), round {}/{rounds}: all running elsewhere after {:.2} s, host free after {:.2} s, pauses {:?} ms",
                    r + 1,
                    round.all_moved,
                    round.source_free,
                    round.pauses_ms
                );
                samples.push(round);
            }
            table.push((notice_s, jobs, samples));
        }
    }
    let cold_start = median(&cold);
    println!("\njob_evacuation (two runner hosts in one test host; medians of {rounds} rounds)\n");
    println!("| notice | job VMs | mode | notice → all jobs running again | notice → host free | share of the notice | guest pause |");
    println!("|---|---|---|---|---|---|---|");
    for (notice_s, jobs, samples) in table {
        let moved = median(&samples.iter().map(|r| r.all_moved).collect::<Vec<_>>());
        let free = median(&samples.iter().map(|r| r.source_free).collect::<Vec<_>>());
        let pause = median(
            &samples
                .iter()
                .flat_map(|r| r.pauses_ms.iter().copied())
                .collect::<Vec<_>>(),
        );
        let mode = if notice_s >= 120 {
            "pre-copy"
        } else {
            "post-copy"
        };
        println!(
            "| {notice_s} s | {jobs} | {mode} | {moved:.2} s | {free:.2} s | {:.0} % | {pause:.0} ms |",
            100.0 * free / notice_s as f64
        );
    }
    println!(
        "\nWhat peers do instead: the job starts again from scratch on another host; its cold start (webhook → job running) alone is {cold_start:.2} s here, and the work done before the notice is lost."
    );
    Ok(())
}

/// Starts `jobs` jobs on one host, gives it a notice, and measures until they run elsewhere
/// and the host is free. Also returns each job's cold start (queued → running), the baseline.
fn evacuate(s: &Setup, next_id: &mut u64, jobs: usize, notice_s: u64) -> Result<(Round, Vec<f64>)> {
    let mut ids = Vec::new();
    let mut cold = Vec::new();
    for _ in 0..jobs {
        *next_id += 1;
        let id = *next_id;
        let queued = Instant::now();
        s.queue(id, &LABELS)?;
        s.wait_job(id, "the job to run", |j| j["vm_state"] == "running")?;
        cold.push(queued.elapsed().as_secs_f64());
        ids.push(id);
    }
    let (from, from_id) = s.host_of(ids[0])?;
    for id in &ids {
        ensure!(s.host_of(*id)?.0 == from, "the jobs are on different hosts");
    }
    let noticed = Instant::now();
    s.interrupt(&from_id, notice_s)?;
    let mut moved_at = 0.0;
    let mut pauses = Vec::new();
    for id in &ids {
        s.wait_moves(*id, 1)?;
        moved_at = f64::max(moved_at, noticed.elapsed().as_secs_f64());
    }
    // Free once each source has sent all (a post-copy's source serves pages after the
    // handover) and reported what it took.
    for id in &ids {
        s.wait_job(*id, "the source's report", |j| {
            !last_success(j)["paused_ms"].is_null()
        })?;
    }
    let source_free = noticed.elapsed().as_secs_f64();
    for id in &ids {
        let job = s.wait_vm_done(*id, Duration::from_secs(240))?;
        pauses.push(last_success(&job)["paused_ms"].as_f64().unwrap_or(f64::NAN));
        ensure!(job["vm_state"] == "finished", "job {id} failed: {job:#}");
        s.complete(*id, &LABELS)?;
    }
    // A fresh host replaces the evacuated one, as a new spot instance would.
    s.replace_runner(from)?;
    Ok((
        Round {
            all_moved: moved_at,
            source_free,
            pauses_ms: pauses,
        },
        cold,
    ))
}

fn last_success(job: &Value) -> &Value {
    job["migrations"]
        .as_array()
        .and_then(|m| m.iter().rfind(|m| m["result"] == "succeeded"))
        .unwrap_or(&Value::Null)
}
