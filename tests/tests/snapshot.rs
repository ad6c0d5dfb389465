//! Snapshot and restore with Hopper's VMM, in a test host: a 2-vCPU guest (one vCPU spinning)
//! whose workload counts in memory, appends each count to a file on its disk and sends it over
//! a TCP connection to a server on its host is snapshotted, stopped and restored in a new VMM
//! process, several times in a row. The counting goes on without a gap or a repeat on the disk
//! (memory and disk are from the same moment) and on the connection (which survives every
//! restore), the guest's uptime and clock go on, and its timers work. Damaged snapshots are
//! refused and start nothing.

use anyhow::{ensure, Context, Result};
use hopper_tests::{
    boot_guest, restore_guest, GuestVmm, MicrovmGuest, MicrovmOptions, TestHost, TestHostOptions,
};
use std::time::Duration;

const READY: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(60);
const CYCLES: usize = 5;
/// The guest's network: its TAP, the host's end (the server's address) and the guest's.
const NET_VMM_ARGS: &str = "--tap hsnap0 --host-ip 172.16.0.1/30 --allow-host-port 9000";
const NET_CMDLINE: &str = "hopper.ip=172.16.0.2/30 hopper.gw=172.16.0.1";

fn guest_sh(host: &TestHost, vm: &MicrovmGuest, script: &str) -> Result<String> {
    let out = vm.call(host, &["sh", "-c", script])?;
    ensure!(
        out.exit.success(),
        "guest script failed ({}): {script}\n{}",
        out.exit,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Uptime (s), wall clock (s) and the counts on disk: checks they are 1, 2, …, n.
fn observe(host: &TestHost, vm: &MicrovmGuest) -> Result<(f64, u64, u64)> {
    let out = guest_sh(
        host,
        vm,
        "sync; cut -d' ' -f1 /proc/uptime; date +%s; \
         awk 'NR != $1 {print \"gap at line \" NR \": \" $0; exit 1} END {print NR}' /root/progress",
    )?;
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [uptime, clock, count] = fields[..] else {
        anyhow::bail!("unexpected observation {out:?}");
    };
    Ok((uptime.parse()?, clock.parse()?, count.parse()?))
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
    let host = TestHost::boot(TestHostOptions::default())?;
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
    // The host's server keeps everything the connection brings.
    // (Its input stays open: at end of input nc closes the connection, and the guest's ends.)
    host.sh("(sleep 100000 </dev/null 2>/dev/null | nc -l -p 9000 >/tmp/received 2>/dev/null &)")?;
    // The count lives in the shell's memory; each value goes to the disk and the connection
    // as it is reached. Another loop keeps a vCPU busy.
    guest_sh(
        &host,
        &vm,
        "(while :; do :; done) </dev/null >/dev/null 2>&1 & \
         (i=0; while :; do i=$((i+1)); echo $i >>/root/progress; echo $i; sleep 0.2; done \
          | nc 172.16.0.1 9000) </dev/null >/dev/null 2>&1 &",
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let (mut uptime, mut clock, mut count) = observe(&host, &vm)?;
    ensure!(count > 0, "the workload did not start");

    for cycle in 1..=CYCLES {
        let dir = format!("/tmp/snapshot{cycle}");
        let reply = snapshot(&host, &vm, &dir, false)?;
        ensure!(reply.contains(r#""ok":true"#), "snapshot {cycle}: {reply}");
        ensure!(
            vm.wait_exit(&host, EXIT)? == 0,
            "the VMM did not stop after snapshot {cycle}"
        );
        println!("snapshot {cycle}: {}", reply.trim());

        vm = restore_guest(
            &host,
            &dir,
            &format!("restored{cycle}"),
            NET_VMM_ARGS,
            READY,
        )?;
        println!(
            "restore {cycle}: agent answered {:?} after the VMM started",
            vm.ready_after
        );
        // Timers run: the workload's `sleep 0.2` goes on, and so does a fresh sleep.
        guest_sh(&host, &vm, "sleep 1")?;
        let (u, c, n) = observe(&host, &vm)?;
        ensure!(
            u >= uptime,
            "cycle {cycle}: uptime went back from {uptime} to {u} (rebooted?)"
        );
        ensure!(
            c >= clock,
            "cycle {cycle}: the clock went back from {clock} to {c}"
        );
        ensure!(
            n > count,
            "cycle {cycle}: the workload stopped at {count} (now {n})"
        );
        (uptime, clock, count) = (u, c, n);
    }

    // A snapshot that lets the VM run on.
    let reply = snapshot(&host, &vm, "/tmp/snapshot-live", true)?;
    ensure!(
        reply.contains(r#""state":"running""#),
        "after --resume: {reply}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, n) = observe(&host, &vm)?;
    ensure!(n > count, "the VM did not run on after a --resume snapshot");

    // The connection carried every count, in order, across all the restores.
    let received = host.sh(
        "awk 'NR != $1 {print \"gap at line \" NR \": \" $0; exit 1} END {print NR}' /tmp/received",
    )?;
    let sent: u64 = received.trim().parse()?;
    ensure!(
        sent >= count,
        "the connection carried {sent} counts, the disk has {count}"
    );

    refuses_damaged_snapshots(&host, "/tmp/snapshot1")?;

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
        // A sound snapshot, restored without what it needs (checked after the state is read).
        (
            "no agent socket",
            "cp {good}/vm.state {bad}/",
            "",
            "--agent-socket",
        ),
    ];
    for (what, damage, agent, expected) in cases {
        let bad = "/tmp/damaged";
        let damage = damage.replace("{good}", good).replace("{bad}", bad);
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
        let files = host.sh(
            "ls /tmp/damaged.ext4 /tmp/damaged.sock /tmp/damaged-api.sock 2>/dev/null | wc -l",
        )?;
        // `[d]`: the pattern does not match this command's own command line.
        let processes =
            host.sh("grep -l -- '/tmp/damage[d]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l")?;
        ensure!(
            files.trim() == "0" && processes.trim() == "0",
            "{what}: left behind: {} files, {} processes",
            files.trim(),
            processes.trim()
        );
    }
    Ok(())
}
