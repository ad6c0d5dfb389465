//! The test-host harness end to end: a nested host with KVM, and QEMU microvm guests booted
//! inside it from the project's guest images, driven through the guest agent.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use hopper_tests::{
    boot_guest, GuestArtifacts, HarnessError, MicrovmOptions, TestHost, TestHostOptions,
};

#[test]
fn test_host_boots_guest_images_with_qemu_microvm() -> Result<()> {
    let release = GuestArtifacts::locate()?.release;
    let started = Instant::now();
    let host = TestHost::boot(TestHostOptions::default())?;
    println!(
        "test host ready after {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let kvm = host.exec(&["ls", "-l", "/dev/kvm", "/dev/net/tun"])?;
    ensure!(
        kvm.exit.success(),
        "no /dev/kvm or /dev/net/tun in the test host: {kvm:?}\n{}",
        host.console()
    );
    host.sh("nft add table inet probe && nft list tables | grep -q probe && nft delete table inet probe")?;
    host.sh("hopper-runner --help >/dev/null 2>&1 || test -x /bin/hopper-runner")?;

    // Root disk: stage 1 loads virtio, switch_roots into rootfs.ext4, busybox init starts
    // the agent on /dev/hvc0.
    let opts = MicrovmOptions {
        extra_cmdline: "hopper.ip=172.16.0.2/30 hopper.gw=172.16.0.1".into(),
        ..Default::default()
    };
    let vm = boot_guest(&host, &opts)?;
    println!(
        "qemu microvm (root disk) boot-to-agent-ready: {:.2} s",
        vm.ready_after.as_secs_f64()
    );
    let uname = vm.call(&host, &["uname", "-r"])?;
    ensure!(uname.exit.success(), "uname in the guest: {uname:?}");
    ensure!(
        String::from_utf8_lossy(&uname.stdout).trim() == release,
        "guest kernel {:?}",
        uname.stdout
    );
    let mounts =
        String::from_utf8_lossy(&vm.call(&host, &["cat", "/proc/mounts"])?.stdout).into_owned();
    ensure!(
        mounts.contains("/dev/vda / ext4 rw"),
        "root is not the disk:\n{mounts}"
    );
    let addr = String::from_utf8_lossy(
        &vm.call(&host, &["ip", "-o", "addr", "show", "eth0"])?
            .stdout,
    )
    .into_owned();
    ensure!(addr.contains("172.16.0.2/30"), "eth0: {addr}");
    let status = vm.call(&host, &["sh", "-c", "echo out; echo err >&2; exit 7"])?;
    ensure!(
        status.exit.shell_code() == 7 && status.stdout == b"out\n" && status.stderr == b"err\n",
        "{status:?}"
    );
    // The CLI's --put copies a file in (mode included) before the command runs.
    host.write_file("/tmp/tool", b"#!/bin/sh\necho tool ran\n", 0o755)?;
    let put = host.exec(&[
        "hopper-agent",
        "call",
        "--unix",
        &vm.socket,
        "--put",
        "/tmp/tool",
        "/root/tool",
        "--",
        "/root/tool",
    ])?;
    ensure!(put.exit.success() && put.stdout == b"tool ran\n", "{put:?}");
    vm.poweroff(&host, Duration::from_secs(30))?;

    // No root disk: the agent runs from the initramfs itself.
    let opts = MicrovmOptions {
        name: "vm1".into(),
        root_disk: false,
        ..Default::default()
    };
    let vm = boot_guest(&host, &opts)?;
    println!(
        "qemu microvm (initramfs only) boot-to-agent-ready: {:.2} s",
        vm.ready_after.as_secs_f64()
    );
    let root = vm.call(
        &host,
        &["sh", "-c", "grep ' / ' /proc/mounts | cut -d' ' -f3"],
    )?;
    ensure!(
        String::from_utf8_lossy(&root.stdout).trim() == "rootfs",
        "{root:?}"
    );
    vm.kill(&host)?;
    Ok(())
}

#[test]
fn test_hosts_boot_side_by_side_and_die_like_spot_instances() -> Result<()> {
    let opts = |name: &str| TestHostOptions {
        name: Some(name.into()),
        memory_mib: 1024,
        cpus: 1,
        forwards: vec![8080],
        // Short, so that a request outliving it shows a breakdown soon (below).
        exec_timeout: Duration::from_secs(40),
        ..Default::default()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| TestHost::boot(opts("alpha")));
        let b = s.spawn(|| TestHost::boot(opts("beta")));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a?, b?);
    ensure!(a.sh("hostname")?.trim() == "alpha" && b.sh("hostname")?.trim() == "beta");
    ensure!(a.agent_addr() != b.agent_addr() && a.forwarded_port(8080) != b.forwarded_port(8080));

    // A file goes in with put and comes back intact; the hosts reach each other through the
    // machine running the test (10.0.2.2 from inside) on the forwarded port, here with a
    // second agent on alpha that beta calls.
    let local = std::env::temp_dir().join(format!("hopper-put-{}", std::process::id()));
    std::fs::write(&local, b"payload\n")?;
    a.put(&local, "/tmp/payload")?;
    std::fs::remove_file(&local)?;
    ensure!(a.read_file("/tmp/payload")? == b"payload\n");
    a.sh("hopper-agent serve --listen 0.0.0.0:8080 </dev/null >/dev/null 2>&1 &")?;
    let port = a.forwarded_port(8080).unwrap();
    let got = b.sh(&format!(
        "hopper-agent call --tcp 10.0.2.2:{port} --timeout 30 -- cat /tmp/payload"
    ))?;
    ensure!(got == "payload\n", "b read {got:?} from a");

    a.kill();
    ensure!(!a.is_running());
    let err = a.exec(&["true"]).expect_err("a dead host ran a command");
    ensure!(
        !matches!(err, HarnessError::HostBroke { .. }),
        "a killed host is not a breakdown: {err}"
    );
    let err = err.to_string();
    ensure!(
        err.contains("not running") && err.contains("alpha"),
        "{err}"
    );
    ensure!(b.sh("echo still here")?.trim() == "still here");

    // A request that outlives the limit is the host breaking down (whatever the cause), with
    // QEMU's view of the host's CPUs kept for the post-mortem.
    let err = b
        .exec(&["sleep", "60"])
        .expect_err("sleep 60 beat a 40 s limit");
    ensure!(
        matches!(err, HarnessError::HostBroke { .. }) && err.to_string().contains("CPU #0"),
        "{err}"
    );
    let registers = std::fs::read_to_string(b.log_dir().join("breakdown.txt"))?;
    ensure!(registers.contains("RIP="), "{registers}");
    Ok(())
}
