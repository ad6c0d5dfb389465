//! Snapshot and restore with Hopper's VMM, in a test host: a 2-vCPU guest runs
//! hopper-workload (a memory buffer rewritten through a SHA-256 chain; progress lines on its
//! disk and over a TCP connection to a server on its host; a digest at the end, all of it
//! depending only on its arguments) while its other vCPU spins, and is snapshotted, stopped
//! and restored in a new VMM process 20 times in a row. After every restore the disk holds a
//! prefix of what an undisturbed run writes, the guest's uptime and clock go on, and its
//! timers work; at the end the digest, the progress file on its disk and the bytes its host
//! received are exactly those of an undisturbed (native) run. Damaged snapshots, and a
//! snapshot whose guest needs a CPU feature the host lacks, are refused and start nothing.

use anyhow::{ensure, Context, Result};
use hopper_tests::workload::{guest_progress, received, start_receiver};
use hopper_tests::{
    boot_guest, restore_guest, Expected, GuestVmm, MicrovmGuest, MicrovmOptions, TestHost, Workload,
};
use hopper_vmm::persist::MachineState;
use hopper_vmm::snapshot::format;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(60);
const CYCLES: usize = 20;
/// A progress line every ~0.3 s in the test host's guest (1000 steps at about 6,000 steps/s
/// beside the spinning vCPU, then 100 ms of sleep). The 20 cycles take about 110 of the 240
/// lines (measured), so the run outlasts them with room to spare, and its sleeps, not only
/// its speed, set how long it is.
const WORKLOAD: Workload = Workload {
    mib: 64,
    steps: 240_000,
    every: 1000,
    pace_ms: 100,
};
const DONE: Duration = Duration::from_secs(300);
/// The guest's network: its TAP, the host's end (the server's address) and the guest's.
const NET_VMM_ARGS: &str = "--tap hsnap0 --host-ip 172.16.0.1/30 --allow-host-port 9000";
const NET_CMDLINE: &str = "hopper.ip=172.16.0.2/30 hopper.gw=172.16.0.1";
const SERVER: &str = "172.16.0.1:9000";
const RECEIVED: &str = "/tmp/received";

/// Uptime (s), wall clock (s) and the number of progress lines on the guest's disk, which
/// must be a prefix of the undisturbed run's.
fn observe(
    host: &TestHost,
    vm: &MicrovmGuest,
    expected: &Expected,
    when: &str,
) -> Result<(f64, u64, usize)> {
    let out = vm.sh(host, "cut -d' ' -f1 /proc/uptime; date +%s")?;
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [uptime, clock] = fields[..] else {
        anyhow::bail!("unexpected observation {out:?}");
    };
    let lines = expected.check(
        &format!("the guest's progress file {when}"),
        &guest_progress(host, vm)?,
        false,
    )?;
    Ok((uptime.parse()?, clock.parse()?, lines))
}

/// Snapshots `vm` into `dir` through its control socket; `resume` lets it run on.
fn snapshot(host: &TestHost, vm: &MicrovmGuest, dir: &str, resume: bool) -> Result<String> {
    let api = vm
        .api_socket
        .as_deref()
        .context("a Hopper guest has a control socket")?;
    let flag = if resume { "--resume" } else { "" };
    Ok(host.sh(&format!(
        "hopper-runner vm snapshot --socket {api} --to {dir} {flag}"
    ))?)
}

#[test]
fn snapshots_restore_in_a_new_process_and_the_guest_goes_on() -> Result<()> {
    hopper_tests::again_if_a_host_broke(
        snapshots_restore_in_a_new_process_and_the_guest_goes_on_run,
    )
}

fn snapshots_restore_in_a_new_process_and_the_guest_goes_on_run() -> Result<()> {
    let expected = WORKLOAD.expected()?;
    let host = TestHost::boot(Default::default())?;
    let mut vm = boot_guest(
        &host,
        &MicrovmOptions {
            vmm: GuestVmm::Hopper,
            name: "snap0".into(),
            cpus: 2,
            memory_mib: 512,
            extra_vmm_args: NET_VMM_ARGS.split(' ').map(String::from).collect(),
            extra_cmdline: NET_CMDLINE.into(),
            ..Default::default()
        },
    )?;
    start_receiver(&host, 9000, RECEIVED)?;
    // The workload keeps one vCPU busy (but for its sleeps), this loop the other.
    vm.sh(&host, "(while :; do :; done) </dev/null >/dev/null 2>&1 &")?;
    WORKLOAD.start(&host, &vm, Some(SERVER))?;
    let started = Instant::now();
    let (mut uptime, mut clock, mut lines) = (0.0, 0, 0);
    // Filling the buffer takes a few seconds before the first line.
    while lines == 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(2));
        (uptime, clock, lines) = observe(&host, &vm, &expected, "before the first snapshot")?;
    }
    ensure!(lines > 0, "the workload wrote no progress within 60 s");

    let mut previous: Option<String> = None;
    for cycle in 1..=CYCLES {
        let cycle_started = Instant::now();
        let dir = format!("/tmp/snapshot{cycle}");
        let reply = snapshot(&host, &vm, &dir, false)?;
        ensure!(reply.contains(r#""ok":true"#), "snapshot {cycle}: {reply}");
        ensure!(
            vm.wait_exit(&host, EXIT)? == 0,
            "the VMM did not stop after snapshot {cycle}"
        );
        // The stopped VMM's directory and the snapshot it was restored from are no longer
        // used: 20 cycles' worth would not fit in the test host's memory.
        host.sh(&format!(
            "rm -rf {} {}",
            vm.dir,
            previous.replace(dir.clone()).unwrap_or_default()
        ))?;
        println!("snapshot {cycle}: {}", reply.trim());

        // Odd cycles move the snapshot's disk into the restored VM rather than copying it
        // (the last one copies: damaged versions of its snapshot are tried at the end).
        let take = cycle % 2 == 1;
        let args = match take {
            true => format!("{NET_VMM_ARGS} --take-disk"),
            false => NET_VMM_ARGS.to_string(),
        };
        vm = restore_guest(&host, &dir, &format!("restored{cycle}"), &args, READY)?;
        let left = host.sh(&format!(
            "test -e {dir}/disk.img && echo kept || echo taken"
        ))?;
        ensure!(
            left.trim() == if take { "taken" } else { "kept" },
            "restore {cycle} (--take-disk: {take}): the snapshot's disk was {}",
            left.trim()
        );
        println!(
            "restore {cycle}: agent answered {:?} after the VMM started",
            vm.ready_after
        );
        // Timers run: the workload's sleeps go on, and so does a fresh sleep.
        vm.sh(&host, "sleep 1")?;
        let (u, c, n) = observe(&host, &vm, &expected, &format!("after restore {cycle}"))?;
        ensure!(
            u >= uptime,
            "cycle {cycle}: uptime went back from {uptime} to {u} (rebooted?)"
        );
        ensure!(
            c >= clock,
            "cycle {cycle}: the clock went back from {clock} to {c}"
        );
        ensure!(
            n > lines,
            "cycle {cycle}: the workload stopped at {lines} progress lines (now {n})"
        );
        println!(
            "cycle {cycle}: {n} progress lines, {:.1} s",
            cycle_started.elapsed().as_secs_f64()
        );
        (uptime, clock, lines) = (u, c, n);
    }

    // A snapshot that lets the VM run on.
    let reply = snapshot(&host, &vm, "/tmp/snapshot-live", true)?;
    ensure!(
        reply.contains(r#""state":"running""#),
        "after --resume: {reply}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, n) = observe(&host, &vm, &expected, "after a --resume snapshot")?;
    ensure!(n > lines, "the VM did not run on after a --resume snapshot");

    // The run ends as an undisturbed one does: same digest, same file on the disk, and the
    // connection carried every line, in order, across all the restores.
    WORKLOAD.hurry(&host, &vm)?;
    let digest = WORKLOAD.wait_done(&host, &vm, DONE)?;
    println!(
        "workload done {:.0} s after it started: digest {digest}",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        digest == expected.digest,
        "digest {digest}, an undisturbed run's is {}",
        expected.digest
    );
    expected.check(
        "the guest's progress file",
        &guest_progress(&host, &vm)?,
        true,
    )?;
    expected.check(
        "what the host received",
        &received(&host, RECEIVED, Duration::from_secs(30))?,
        true,
    )?;

    let good = previous.as_deref().context("no snapshot taken")?;
    refuses_damaged_snapshots(&host, good)?;
    refuses_a_cpu_the_host_lacks(&host, good)?;

    vm.poweroff(&host, EXIT)?;
    ensure!(
        vm.wait_exit(&host, EXIT)? == 0,
        "VMM exit status after poweroff"
    );
    Ok(())
}

/// Damaged copies of the snapshot in `good`, and a sound one restored without what it needs,
/// are refused with a clear error, and the attempt
/// leaves no disk copy, socket or process behind.
fn refuses_damaged_snapshots(host: &TestHost, good: &str) -> Result<()> {
    const AGENT: &str = "--agent-socket /tmp/damaged.sock";
    let cases = [
        (
            "truncated state",
            "head -c 200 {good}/vm.state >{bad}/vm.state",
            AGENT,
            "truncated",
        ),
        (
            "flipped byte",
            "cp {good}/vm.state {bad}/ && printf '\\000' | dd of={bad}/vm.state bs=1 seek=300 conv=notrunc",
            AGENT,
            "checksum mismatch",
        ),
        (
            "other format version",
            "cp {good}/vm.state {bad}/ && printf '\\011' | dd of={bad}/vm.state bs=1 seek=8 conv=notrunc",
            AGENT,
            "format version 9",
        ),
        (
            "truncated memory",
            "cp {good}/vm.state {bad}/ && rm {bad}/memory && \
             dd if=/dev/zero of={bad}/memory bs=4096 count=0 seek=1000",
            AGENT,
            "the memory file is 4096000 bytes",
        ),
        (
            "disk taken by an earlier restore",
            "cp {good}/vm.state {bad}/ && rm {bad}/disk.img",
            AGENT,
            "disk.img is missing",
        ),
        // A sound snapshot, restored without what it needs (checked after the state is read).
        (
            "no agent socket",
            "cp {good}/vm.state {bad}/",
            "",
            "--agent-socket",
        ),
    ];
    for (what, damage, agent, expected) in cases {
        let damage = damage.replace("{good}", good).replace("{bad}", DAMAGED);
        refused(host, what, good, &damage, agent, expected)?;
    }
    Ok(())
}

/// Where [`refused`] puts the snapshot it restores.
const DAMAGED: &str = "/tmp/damaged";

/// A snapshot whose guest was given AVX-512 (as on a host that has it) is refused on this
/// host, whose CPU (QEMU's EPYC model) lacks it, naming the feature, before anything starts.
/// The state file is re-encoded with the VMM's own writer, so that its header and checksum
/// are sound and only the CPU check can refuse it.
fn refuses_a_cpu_the_host_lacks(host: &TestHost, good: &str) -> Result<()> {
    ensure!(
        !host.sh("cat /proc/cpuinfo")?.contains("avx512f"),
        "the test host's CPU offers avx512f, so it cannot play a host that lacks it"
    );
    let path = format!("{good}/vm.state");
    let mut state: MachineState = format::decode(&host.read_file(&path)?, &path)?;
    for vcpu in &mut state.vcpus {
        let leaf7 = vcpu
            .cpuid
            .iter_mut()
            .find(|e| e.function == 7 && e.index == 0)
            .context("the saved CPUID has no leaf 7")?;
        leaf7.ebx |= 1 << 16; // AVX512F
    }
    host.write_file("/tmp/foreign-cpu.state", &format::encode(&state)?, 0o644)?;
    refused(
        host,
        "a CPU feature the host lacks",
        good,
        &format!("cp /tmp/foreign-cpu.state {DAMAGED}/vm.state"),
        "--agent-socket /tmp/damaged.sock",
        "lacks features the snapshot's guest uses: avx512f (leaf 0x7.0 ebx bit 16)",
    )
}

/// Restores a copy of the snapshot in `good` changed by the shell lines `damage` (its memory
/// and disk are linked in first), with `agent` as the agent socket argument, and checks that
/// the restore fails with `expected` in its error and leaves no disk copy, socket or process.
fn refused(
    host: &TestHost,
    what: &str,
    good: &str,
    damage: &str,
    agent: &str,
    expected: &str,
) -> Result<()> {
    let bad = DAMAGED;
    let out = host.exec(&[
        "sh",
        "-c",
        &format!(
            "rm -rf {bad} && mkdir {bad} && ln -s {good}/memory {good}/disk.img {bad}/ && \
             {damage} 2>/dev/null && \
             hopper-runner vm restore --from {bad} --rootfs /tmp/damaged.ext4 \
             {agent} --api-socket /tmp/damaged-api.sock"
        ),
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.exit.success(), "{what}: the restore started");
    ensure!(
        stderr.contains(expected),
        "{what}: error does not say {expected:?}: {stderr}"
    );
    let files = host
        .sh("ls /tmp/damaged.ext4 /tmp/damaged.sock /tmp/damaged-api.sock 2>/dev/null | wc -l")?;
    // `[d]`: the pattern does not match this command's own command line.
    let processes =
        host.sh("grep -l -- '/tmp/damage[d]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l")?;
    ensure!(
        files.trim() == "0" && processes.trim() == "0",
        "{what}: left behind: {} files, {} processes",
        files.trim(),
        processes.trim()
    );
    Ok(())
}
