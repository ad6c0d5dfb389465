//! Live migration between test hosts with Hopper's VMM: a 2-vCPU guest running the
//! deterministic workload (memory rewritten at a high rate, progress appended to its disk) is
//! migrated host A → B → A … while it runs (the first hops pre-copy, the last ones post-copy:
//! handed over at once, the rest pulled and pushed while it runs on the target). It ends
//! with the undisturbed run's digest and
//! progress file, its uptime and boot id go on (no restart), and the disk arrives
//! byte-identical. A target host killed mid-migration leaves the VM running on the source;
//! a source host killed after the handover does not stop the VM on the target. A source
//! without the fleet's certificate cannot push a VM. A source VMM killed during a post-copy
//! stops the VM on the target with the reason. One hop, with a guest that writes all the
//! time and a pause target it can never meet, gets the guest throttled and ends within the
//! round limit.

use anyhow::{ensure, Context, Result};
use hopper_tests::tls::Fleet;
use hopper_tests::workload::{guest_progress, Workload};
use hopper_tests::{
    boot_guest, receive_guest, GuestVmm, MicrovmGuest, MicrovmOptions, TestHost, TestHostOptions,
};
use std::time::Duration;

/// The port `vm receive` listens on in every test host (forwarded from this machine).
const PORT: u16 = 7700;
const HOPS: usize = 10;
/// Hops from this one on are post-copy.
const POSTCOPY_FROM: usize = 7;
/// The hop whose pause target (0 ms) cannot be met: it runs the most rounds allowed, and
/// the guest, which writes all the time meanwhile, gets throttled.
const THROTTLED_HOP: usize = 3;
const THROTTLED_ROUNDS: u32 = 12;
/// The hops at which the guest is made quiet so that its disk can be compared (one of
/// each kind).
const DISK_CHECK_HOPS: [usize; 2] = [5, 8];
const EXIT: Duration = Duration::from_secs(120);
const READY: Duration = Duration::from_secs(120);
/// Paced to about 200 steps (0.8 MiB of rewritten pages) a second, a fraction of what a test
/// host's emulated network carries, so that each hop converges in a few rounds (a guest
/// that writes faster gets throttled: see the migration benchmark). A run of about 7
/// minutes, which outlasts the hops (each 20–30 s here) and the failure cases.
const WORKLOAD: Workload = Workload {
    mib: 64,
    steps: 80_000,
    every: 100,
    pace_ms: 500,
};

fn boot_host(name: &str) -> Result<TestHost> {
    Ok(TestHost::boot(TestHostOptions {
        name: Some(name.into()),
        forwards: vec![PORT],
        ..Default::default()
    })?)
}

/// One test host, with its runner identity installed.
struct Runner {
    host: TestHost,
    tls: String,
}

impl Runner {
    /// Where another test host reaches this one's `vm receive`.
    fn address(&self) -> String {
        let port = self
            .host
            .forwarded_port(PORT)
            .expect("test hosts forward the migration port");
        format!("10.0.2.2:{port}")
    }
}

/// The guest's uptime (s) and boot id: a restarted guest has a new boot id.
fn identity(host: &TestHost, vm: &MicrovmGuest) -> Result<(f64, String)> {
    let out = vm.sh(
        host,
        "cut -d' ' -f1 /proc/uptime; cat /proc/sys/kernel/random/boot_id",
    )?;
    let mut lines = out.lines();
    let uptime = lines.next().context("no uptime")?.parse()?;
    Ok((uptime, lines.next().context("no boot id")?.to_string()))
}

/// Starts `vm migrate` for `vm` (in `from`) towards `to`, where `vm receive` waits as guest
/// `name`; returns the command's output and the (not yet ready) guest on `to`.
fn start_migration(
    from: &Runner,
    vm: &MicrovmGuest,
    to: &Runner,
    name: &str,
    how: How,
) -> Result<(String, MicrovmGuest)> {
    let target = receive_guest(&to.host, name, PORT, &to.tls)?;
    let api = vm
        .api_socket
        .as_deref()
        .context("Hopper guests have an API socket")?;
    let options = match how {
        How::Postcopy | How::PostcopyBackground => " --postcopy".to_string(),
        // The test hosts have one CPU (one stream by default): exercise several.
        How::Precopy => " --streams 3".to_string(),
        How::Throttled => format!(" --max-downtime-ms 0 --max-rounds {THROTTLED_ROUNDS}"),
        How::Background => String::new(),
    };
    let command = format!(
        "hopper-runner vm migrate --socket {api} --to {} {}{options}",
        to.address(),
        from.tls,
    );
    let out = if matches!(how, How::Background | How::PostcopyBackground) {
        from.host.sh(&format!(
            "({command} >/tmp/migrate.out 2>&1 </dev/null; echo $? >/tmp/migrate.status) \
             >/dev/null 2>&1 </dev/null &"
        ))?
    } else {
        let out = from.host.exec(&["sh", "-c", &command])?;
        let reply = String::from_utf8_lossy(&out.stdout).into_owned();
        if !(out.exit.success() && reply.contains(r#""ok":true"#)) {
            let target_log = to.host.sh(&format!("cat {}/vmm.log", target.dir))?;
            anyhow::bail!(
                "migration to {name} failed ({}): {reply}{}\ntarget's log:\n{target_log}",
                out.exit,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        reply
    };
    Ok((out, target))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Precopy,
    /// Pre-copy towards a pause target that cannot be met.
    Throttled,
    Postcopy,
    /// Pre-copy, with the command left running in the background.
    Background,
    PostcopyBackground,
}

/// Migrates `vm` from `from` to `to` as guest `name` and waits until it answers there.
fn hop(
    from: &Runner,
    vm: &MicrovmGuest,
    to: &Runner,
    name: &str,
    how: How,
) -> Result<MicrovmGuest> {
    let (reply, target) = start_migration(from, vm, to, name, how)?;
    println!("{name}: {}", reply.trim());
    let summary: serde_json::Value = serde_json::from_str(reply.trim())
        .with_context(|| format!("the migration's reply is not JSON: {reply}"))?;
    let figure = |name: &str| summary["migration"][name].as_u64().unwrap_or_default();
    match how {
        // Handed over before any copy round; the command returns once all has arrived.
        How::Postcopy => ensure!(
            figure("rounds") == 0,
            "a post-copy ran pre-copy rounds: {reply}"
        ),
        // It may still hand over early, in a round during which no page changed (the
        // throttle holds the vCPUs most of the time).
        How::Throttled => ensure!(
            (2..=u64::from(THROTTLED_ROUNDS)).contains(&figure("rounds"))
                && figure("throttle_percent") >= 20,
            "a pre-copy that cannot converge was not throttled within the round limit: {reply}"
        ),
        _ => {}
    }
    ensure!(
        vm.wait_exit(&from.host, EXIT)? == 0,
        "the source VMM did not end cleanly after the handover"
    );
    target.wait_ready(&to.host, READY)?;
    Ok(target)
}

fn sha256(host: &TestHost, path: &str) -> Result<String> {
    let out = host.sh(&format!("sha256sum {path}"))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn a_running_guest_moves_between_hosts_and_finishes_its_work() -> Result<()> {
    hopper_tests::again_if_a_host_broke(
        a_running_guest_moves_between_hosts_and_finishes_its_work_run,
    )
}

fn a_running_guest_moves_between_hosts_and_finishes_its_work_run() -> Result<()> {
    let fleet = Fleet::new("Hopper test fleet")?;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| boot_host("mig-a"));
        let b = s.spawn(|| boot_host("mig-b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut runners = Vec::new();
    for host in [a?, b?] {
        let tls = fleet.runner()?.install(&host, "runner")?;
        runners.push(Runner { host, tls });
    }
    let expected = WORKLOAD.expected()?;

    let mut vm = boot_guest(
        &runners[0].host,
        &MicrovmOptions {
            vmm: GuestVmm::Hopper,
            name: "mig0".into(),
            cpus: 2,
            memory_mib: 512,
            ..Default::default()
        },
    )?;
    WORKLOAD.start(&runners[0].host, &vm, None)?;
    std::thread::sleep(Duration::from_secs(3));
    let (mut uptime, boot_id) = identity(&runners[0].host, &vm)?;

    for n in 1..=HOPS {
        let (from, to) = (&runners[(n - 1) % 2], &runners[n % 2]);
        let quiet = DISK_CHECK_HOPS.contains(&n);
        let how = match n {
            THROTTLED_HOP => How::Throttled,
            n if n >= POSTCOPY_FROM => How::Postcopy,
            _ => How::Precopy,
        };
        if how == How::Throttled {
            // Random pages rewritten without pause, besides the paced workload.
            vm.sh(
                &from.host,
                "sh -c 'while :; do head -c 1048576 /dev/urandom >/dev/shm/churn; done' \
                 </dev/null >/dev/null 2>&1 & echo $! >/tmp/churn.pid",
            )?;
        }
        if quiet {
            // Nothing writes the disk during this hop, so both copies must be equal.
            vm.sh(
                &from.host,
                "killall -STOP hopper-workload && sync && sleep 1",
            )?;
        }
        let source_disk = format!("{}/rootfs.ext4", vm.dir);
        vm = hop(from, &vm, to, &format!("mig{n}"), how)?;
        if quiet {
            let sent = sha256(&from.host, &source_disk)?;
            let arrived = sha256(&to.host, &format!("{}/rootfs.ext4", vm.dir))?;
            ensure!(sent == arrived, "hop {n}: the disk differs after migration");
            vm.sh(&to.host, "killall -CONT hopper-workload")?;
        }
        if how == How::Throttled {
            vm.sh(&to.host, "kill $(cat /tmp/churn.pid) && rm /dev/shm/churn")?;
        }
        let (u, id) = identity(&to.host, &vm)?;
        ensure!(id == boot_id, "hop {n}: the guest rebooted (new boot id)");
        ensure!(
            u >= uptime,
            "hop {n}: uptime went back from {uptime} to {u}"
        );
        uptime = u;
        // The workload goes on, and what it wrote so far is the undisturbed run's.
        let lines = expected.check("progress", &guest_progress(&to.host, &vm)?, false)?;
        println!("hop {n}: uptime {u:.1} s, {lines} progress lines");
    }
    // After an even number of hops the VM is back on A.
    let [a, b] = &runners[..] else { unreachable!() };

    // The target dies mid-migration: the migration fails and the VM runs on at the source.
    let (_, _) = start_migration(a, &vm, b, "doomed", How::Background)?;
    // Meanwhile its control socket answers, and says so.
    await_state(a, &vm, "migrating")?;
    std::thread::sleep(Duration::from_secs(2));
    b.host.kill();
    let status = a.host.sh(
        "n=0; while [ ! -s /tmp/migrate.status ]; do n=$((n+1)); [ $n -lt 600 ] || break; \
         sleep 0.1; done; cat /tmp/migrate.status /tmp/migrate.out",
    )?;
    println!("migration to a dying target: {}", status.trim());
    ensure!(
        !status.starts_with('0') && status.contains("the VM runs on here"),
        "the migration to a killed target did not fail cleanly: {status}"
    );
    let before = expected.check("progress", &guest_progress(&a.host, &vm)?, false)?;
    std::thread::sleep(Duration::from_secs(3));
    let after = expected.check("progress", &guest_progress(&a.host, &vm)?, false)?;
    ensure!(
        after > before,
        "the workload stopped on the source after a failed migration"
    );
    await_state(a, &vm, "running")?;

    // A fresh target; the source dies right after the handover; the VM finishes there.
    let c = boot_host("mig-c")?;
    let c = Runner {
        tls: fleet.runner()?.install(&c, "runner")?,
        host: c,
    };
    vm = hop(a, &vm, &c, "final", How::Precopy)?;
    a.host.kill();
    WORKLOAD.hurry(&c.host, &vm)?;
    let digest = WORKLOAD.wait_done(&c.host, &vm, Duration::from_secs(900))?;
    ensure!(
        digest == expected.digest,
        "digest {digest}, the undisturbed run's is {}",
        expected.digest
    );
    expected.check("progress", &guest_progress(&c.host, &vm)?, true)?;
    let (_, id) = identity(&c.host, &vm)?;
    ensure!(id == boot_id, "the guest rebooted on the last host");

    // An outsider (a certificate from another CA) cannot push a VM into a runner.
    let outsider = Fleet::new("Not the fleet")?
        .runner()?
        .install(&c.host, "outsider")?;
    let name = "intruded";
    let target = receive_guest(&c.host, name, PORT, &c.tls)?;
    let out = c.host.exec(&[
        "sh",
        "-c",
        &format!(
            "hopper-runner vm migrate --socket {} --to 127.0.0.1:{PORT} {outsider}",
            vm.api_socket.as_deref().unwrap()
        ),
    ])?;
    let reply = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.exit.success() && reply.contains("the VM runs on here"),
        "a migration with a foreign certificate was not refused: {reply}"
    );
    let log = c.host.sh(&format!("cat {}/vmm.log", target.dir))?;
    ensure!(
        log.contains("refused migration connection"),
        "the target did not log the refusal: {log}"
    );
    target.kill(&c.host)?;
    vm.sh(&c.host, "true")?;

    // The source dies during a post-copy (here a second VM on the same host): the VM cannot
    // go on without what only the source held, so the target stops it, with the reason,
    // rather than hang or run on with holes.
    let (_, orphan) = start_migration(&c, &vm, &c, "orphan", How::PostcopyBackground)?;
    c.host.sh(&format!(
        "n=0; until grep -q 'migration handover' {}/vmm.log; do n=$((n+1)); \
         [ $n -lt 600 ] || exit 1; sleep 0.05; done",
        vm.dir
    ))?;
    vm.kill(&c.host)?;
    let code = orphan.wait_exit(&c.host, EXIT)?;
    let log = c.host.sh(&format!("cat {}/vmm.log", orphan.dir))?;
    ensure!(
        code != 0 && log.contains("the post-copy broke") && !log.contains("post-copy complete"),
        "the target of a post-copy whose source died (exit {code}):\n{log}"
    );
    Ok(())
}

/// Waits until `vm status` says `vm` is in `state` (10 s at most).
fn await_state(on: &Runner, vm: &MicrovmGuest, state: &str) -> Result<()> {
    let api = vm
        .api_socket
        .as_deref()
        .context("Hopper guests have an API socket")?;
    let out = on.host.exec(&[
        "sh",
        "-c",
        &format!(
            "n=0; until hopper-runner vm status --socket {api} | grep -q '\"state\":\"{state}\"'; do \
             n=$((n+1)); [ $n -lt 200 ] || {{ hopper-runner vm status --socket {api}; exit 1; }}; \
             sleep 0.05; done"
        ),
    ])?;
    ensure!(
        out.exit.success(),
        "the VM's status never said {state}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
