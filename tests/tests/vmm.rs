//! Hopper's VMM booting the stock Debian cloud kernel inside a nested test host: the guest
//! agent answers, the virtio-blk root disk keeps what was written across a reboot, the
//! virtio-net interface reaches an allowed server on the host but neither the host's other
//! services nor the metadata address, the control socket pauses and resumes, and bad input
//! fails cleanly.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use hopper_tests::{
    boot_guest, GuestArtifacts, GuestVmm, MicrovmGuest, MicrovmOptions, TestHost, TestHostOptions,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn stdout(out: &hopper_tests::ExecOutput) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn mem_total_kib(host: &TestHost, vm: &MicrovmGuest) -> Result<u64> {
    let mem = vm.call(host, &["grep", "MemTotal", "/proc/meminfo"])?;
    Ok(stdout(&mem)
        .split_whitespace()
        .nth(1)
        .context("MemTotal")?
        .parse()?)
}

fn hopper_guest(name: &str, cpus: u32, memory_mib: u32) -> MicrovmOptions {
    MicrovmOptions {
        vmm: GuestVmm::Hopper,
        name: name.into(),
        cpus,
        memory_mib,
        ..Default::default()
    }
}

#[test]
fn boots_stock_kernel_with_disk_network_and_agent() -> Result<()> {
    let release = GuestArtifacts::locate()?.release;
    let host = TestHost::boot(TestHostOptions::default())?;

    // Host services: an allowed web server on the guest's gateway address, another one that is
    // not allowed, and a stand-in for the cloud metadata service on 169.254.169.254 that the
    // host itself can reach.
    host.sh("mkdir -p /srv && echo allowed-content >/srv/index.html && \
         ip addr add 169.254.169.254/32 dev lo && \
         httpd -p 169.254.169.254:80 -h /srv && \
         httpd -p 0.0.0.0:9000 -h /srv && \
         wget -q -O - http://169.254.169.254/index.html | grep -q allowed-content")?;

    let mut opts = hopper_guest("hopper0", 2, 512);
    opts.extra_cmdline = "hopper.ip=172.16.0.2/30 hopper.gw=172.16.0.1".into();
    opts.extra_vmm_args = [
        "--tap",
        "hop0",
        "--host-ip",
        "172.16.0.1/30",
        "--allow-host-port",
        "8000",
    ]
    .map(String::from)
    .to_vec();
    let vm = boot_guest(&host, &opts)?;
    println!(
        "hopper VMM boot-to-agent-ready: {:.2} s",
        vm.ready_after.as_secs_f64()
    );

    let uname = vm.call(&host, &["uname", "-r"])?;
    ensure!(stdout(&uname) == release, "guest kernel: {uname:?}");
    let nproc = vm.call(&host, &["nproc"])?;
    ensure!(stdout(&nproc) == "2", "guest sees {} vCPUs", stdout(&nproc));
    let kib = mem_total_kib(&host, &vm)?;
    ensure!((400_000..=524_288).contains(&kib), "guest memory {kib} KiB");
    // The VMM names itself in the ACPI tables (what action.yml checks).
    let oem = vm.call(
        &host,
        &[
            "dd",
            "if=/sys/firmware/acpi/tables/FACP",
            "bs=1",
            "skip=10",
            "count=6",
        ],
    )?;
    ensure!(oem.stdout == b"HOPPER", "FADT OEM ID {:?}", oem.stdout);

    // Network: the allowed port answers; the rest of the host and the metadata address do not.
    host.sh("httpd -p 172.16.0.1:8000 -h /srv")?;
    let fetch = |addr: &str, port: &str| {
        let get = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} {port}");
        vm.call(&host, &["sh", "-c", &get])
    };
    let ok = fetch("172.16.0.1", "8000")?;
    ensure!(
        stdout(&ok).contains("allowed-content"),
        "allowed server: {ok:?}"
    );
    for (addr, port) in [
        ("172.16.0.1", "9000"),
        ("169.254.169.254", "80"),
        ("10.0.2.15", "9000"),
    ] {
        let out = fetch(addr, port)?;
        ensure!(
            !stdout(&out).contains("allowed-content"),
            "guest reached {addr}:{port}: {out:?}"
        );
    }

    // Control socket: pause stops the guest's clock-driven work; resume lets it go on.
    let api = vm
        .api_socket
        .clone()
        .context("Hopper guests have an API socket")?;
    let paused = host.exec(&["hopper-runner", "vm", "pause", "--socket", &api])?;
    ensure!(stdout(&paused).contains("\"paused\""), "pause: {paused:?}");
    let resumed = host.exec(&["hopper-runner", "vm", "resume", "--socket", &api])?;
    ensure!(
        stdout(&resumed).contains("\"running\""),
        "resume: {resumed:?}"
    );
    ensure!(
        vm.call(&host, &["true"])?.exit.success(),
        "guest dead after resume"
    );

    // Disk: a file written before a guest reboot is there after it.
    let write = vm.call(&host, &["sh", "-c", "echo persisted-$(cat /proc/sys/kernel/random/uuid) >/root/marker && sync && cat /root/marker"])?;
    let marker = stdout(&write);
    ensure!(marker.starts_with("persisted-"), "write: {write:?}");
    // The agent replies before the reboot takes effect; the VMM then exits 0.
    let _ = vm.call(
        &host,
        &["sh", "-c", "(sleep 0.5; reboot) >/dev/null 2>&1 &"],
    )?;
    let code = vm.wait_exit(&host, EXIT_TIMEOUT)?;
    ensure!(
        code == 0,
        "VMM exit status after reboot: {code}\n{}",
        vm.console(&host)
    );
    let leftovers = host.sh("ip -o link show | grep -c hop0 || true; ls /tmp/hopper0/*.sock 2>/dev/null | wc -l; nft list tables | grep -c hopper_ || true")?;
    ensure!(
        leftovers.split_whitespace().all(|n| n == "0"),
        "left behind after exit (tap, sockets, firewall tables): {leftovers}"
    );

    let again = MicrovmOptions {
        reuse_disk: true,
        extra_vmm_args: Vec::new(),
        extra_cmdline: String::new(),
        ..opts
    };
    let vm = boot_guest(&host, &again)?;
    let read = vm.call(&host, &["cat", "/root/marker"])?;
    ensure!(
        stdout(&read) == marker,
        "after reboot the disk has {:?}, expected {marker:?}",
        stdout(&read)
    );
    vm.poweroff(&host, EXIT_TIMEOUT)?;
    ensure!(
        vm.wait_exit(&host, EXIT_TIMEOUT)? == 0,
        "VMM exit status after poweroff"
    );
    Ok(())
}

/// Runs `hopper-runner vm run` with `args` in the host and returns (exit status, stderr).
fn run_vm(host: &TestHost, args: &str) -> Result<(i32, String)> {
    let out = host.exec(&[
        "sh",
        "-c",
        &format!("hopper-runner vm run {args} </dev/null >/dev/null"),
    ])?;
    Ok((
        out.exit.shell_code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing_behind() -> Result<()> {
    let host = TestHost::boot(TestHostOptions::default())?;
    host.sh(
        "mkdir -p /bad && head -c 3000000 /dev/urandom >/bad/garbage && : >/bad/empty && \
         cp /guest/rootfs.ext4 /bad/rootfs.ext4 && chmod 000 /bad/rootfs.ext4",
    )?;
    let sockets = "--agent-socket /bad/agent.sock --api-socket /bad/api.sock --tap hopbad0";
    let cases = [
        (
            format!("--kernel /bad/missing {sockets}"),
            "kernel /bad/missing",
        ),
        (format!("--kernel /bad/empty {sockets}"), "is empty"),
        (
            format!("--kernel /bad/garbage {sockets}"),
            "not a bootable bzImage",
        ),
        (
            format!("--kernel /guest/vmlinuz --memory 99999999999 {sockets}"),
            "--memory",
        ),
        (
            format!("--kernel /guest/vmlinuz --memory 1 {sockets}"),
            "--memory",
        ),
        (
            format!("--kernel /guest/vmlinuz --cpus 0 {sockets}"),
            "--cpus",
        ),
        (
            format!("--kernel /guest/vmlinuz --initrd /bad/missing {sockets}"),
            "initrd /bad/missing",
        ),
        (
            "--kernel /guest/vmlinuz --tap bad/name".to_string(),
            "TAP name",
        ),
        (
            "--kernel /guest/vmlinuz --tap hopbad0 --host-ip 300.1.1.1/24".to_string(),
            "IPv4 address",
        ),
    ];
    for (args, expected) in &cases {
        let (code, stderr) = run_vm(&host, args)?;
        ensure!(code != 0, "`vm run {args}` succeeded");
        ensure!(
            stderr.contains(expected),
            "`vm run {args}`: stderr lacks {expected:?}:\n{stderr}"
        );
    }
    // An unreadable rootfs is refused (the test host runs as root, so use a directory).
    let (code, stderr) = run_vm(
        &host,
        &format!("--kernel /guest/vmlinuz --rootfs /bad {sockets}"),
    )?;
    ensure!(
        code != 0 && stderr.contains("rootfs /bad"),
        "rootfs directory: {stderr}"
    );

    let leftovers = host.sh(
        "ls /bad/*.sock 2>/dev/null | wc -l; ip -o link show | grep -c hopbad0 || true; \
         grep -l -- 'hopper-runne[r]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l; \
         nft list tables | grep -c hopper_ || true",
    )?;
    ensure!(
        leftovers.split_whitespace().all(|n| n == "0"),
        "left behind (sockets, tap, processes, firewall tables): {leftovers}"
    );
    Ok(())
}

#[test]
fn guest_larger_than_the_mmio_gap_sees_all_its_memory() -> Result<()> {
    // The VMM refuses guests larger than its host; the test host's own memory is only
    // touched as far as the guests use it.
    let host = TestHost::boot(TestHostOptions {
        memory_mib: 5120,
        ..TestHostOptions::default()
    })?;
    let vm = boot_guest(&host, &hopper_guest("big", 2, 4096))?;
    let kib = mem_total_kib(&host, &vm)?;
    ensure!(kib > 3_900_000, "a 4 GiB guest sees only {kib} KiB");
    // RAM resumes at 4 GiB, above the MMIO gap, and the kernel uses it (memblock allocates
    // top-down, so early allocations already live there).
    let iomem = stdout(&vm.call(&host, &["cat", "/proc/iomem"])?);
    ensure!(
        iomem.contains("100000000-13fffffff : System RAM"),
        "no RAM above 4 GiB:\n{iomem}"
    );
    ensure!(
        !iomem
            .lines()
            .any(|l| l.starts_with("c0000000-") && l.contains("System RAM")),
        "RAM in the MMIO gap:\n{iomem}"
    );
    vm.poweroff(&host, EXIT_TIMEOUT)?;
    ensure!(
        vm.wait_exit(&host, EXIT_TIMEOUT)? == 0,
        "VMM exit status after poweroff"
    );
    Ok(())
}
