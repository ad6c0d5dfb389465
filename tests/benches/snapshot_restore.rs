//! Snapshot and restore with Hopper's VMM against QEMU's own save/restore (live migration
//! into a file, then a new QEMU started with `-incoming` from it), in one nested test host,
//! the same guest booted to its agent, alternating the two:
//!
//!   cargo bench -p hopper-tests --bench snapshot_restore     (HOPPER_BENCH_ROUNDS=3 by default)
//!
//! For a 256 MiB and a 2 GiB guest, medians of: the time to save, the bytes saved, and the
//! restore latency, from the test host starting the new VMM process (its own start
//! included) from the saved state until the guest's agent answers a ping over its virtio
//! console. That includes one agent round trip, which in the emulated test host is slow
//! (tens of ms), noisy, and the same for both VMMs; so each restored guest is then pinged
//! `PINGS` more times, in the same way, and the latency less the median of those round
//! trips is reported as "restore → guest runs".
//!
//! A guest-side ticker on the serial console, stamped in the test host, was tried as a
//! direct measure and dropped: QEMU's restored guest wrote nothing more to its serial port
//! after `-incoming`, so it would not have measured both VMMs alike.
//!
//! Hopper's restore is measured twice a round: with a copy of the snapshot's disk (the
//! default: the snapshot stays restorable) and taking the disk (`--take-disk`: moved, no
//! copy), which is what QEMU's restore does (it resumes on the disk the VM had).
//!
//! Hopper's restore logs where its own time went (state read, checks, memory mapped, VM
//! created, disk copied, devices and vCPUs made, state restored); each round prints that
//! line. Nested figures: only the ratios mean anything.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use hopper_tests::bench::{self, median};
use hopper_tests::{
    boot_guest, restore_guest, GuestVmm, MicrovmGuest, MicrovmOptions, TestHost, TestHostOptions,
};

const SIZES_MIB: [u32; 2] = [256, 2048];
const READY: Duration = Duration::from_secs(120);
/// Agent round trips measured on each restored guest.
const PINGS: usize = 5;
/// QEMU's monitor, inside the test host.
const MONITOR: &str = "127.0.0.1:4444";

#[derive(Default)]
struct Samples {
    save_ms: Vec<f64>,
    saved_mib: Vec<f64>,
    /// Restore until the agent answered.
    ready_ms: Vec<f64>,
    /// The median agent round trip on each restored guest.
    round_trip_ms: Vec<f64>,
}

impl Samples {
    /// Records a restored guest: its restore latency and, measured now, its agent round trip.
    fn restored(&mut self, host: &TestHost, vm: &MicrovmGuest) -> Result<()> {
        let stamps = host.sh(&format!(
            "for i in $(seq {PINGS}); do t0=$(cut -d' ' -f1 /proc/uptime); \
             hopper-agent call --unix {} --timeout 30; t1=$(cut -d' ' -f1 /proc/uptime); \
             echo $t0 $t1; done",
            vm.socket
        ))?;
        let mut trips = Vec::new();
        for line in stamps.lines() {
            let t: Vec<f64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            let [t0, t1] = t[..] else {
                bail!("unexpected timing output {stamps:?}");
            };
            trips.push((t1 - t0) * 1000.0);
        }
        if trips.len() != PINGS {
            bail!("unexpected timing output {stamps:?}");
        }
        self.ready_ms.push(vm.ready_after.as_secs_f64() * 1000.0);
        self.round_trip_ms.push(median(&trips));
        vm.kill(host)?;
        Ok(())
    }

    fn running_ms(&self) -> Vec<f64> {
        self.ready_ms
            .iter()
            .zip(&self.round_trip_ms)
            .map(|(r, t)| r - t)
            .collect()
    }
}

fn guest(vmm: GuestVmm, memory_mib: u32) -> MicrovmOptions {
    MicrovmOptions {
        vmm,
        name: format!("{vmm:?}{memory_mib}").to_lowercase(),
        memory_mib,
        cpus: 1,
        ready_timeout: READY,
        ..Default::default()
    }
}

/// Disk blocks a file really uses, in MiB (the snapshot's memory file is sparse).
fn allocated_mib(host: &TestHost, path: &str) -> Result<f64> {
    let kib: f64 = host
        .sh(&format!("du -k {path} | cut -f1"))?
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// Snapshots a fresh Hopper guest, restores it with a copy of its disk into `s`, then again,
/// taking the snapshot's disk (`--take-disk`, no copy: as QEMU resumes on its own disk),
/// into `taken`.
fn hopper_round(
    host: &TestHost,
    memory_mib: u32,
    s: &mut Samples,
    taken: &mut Samples,
) -> Result<()> {
    let vm = boot_guest(host, &guest(GuestVmm::Hopper, memory_mib))?;
    let dir = "/tmp/bench-snapshot";
    let api = vm
        .api_socket
        .as_deref()
        .context("Hopper guests have a control socket")?;
    let reply = host.sh(&format!(
        "rm -rf {dir} && hopper-runner vm snapshot --socket {api} --to {dir}"
    ))?;
    let reply: serde_json::Value = serde_json::from_str(reply.trim())?;
    let took = reply["snapshot"]["took_ms"]
        .as_f64()
        .with_context(|| format!("no snapshot summary in {reply}"))?;
    vm.wait_exit(host, READY)?;
    s.save_ms.push(took);
    s.saved_mib
        .push(allocated_mib(host, &format!("{dir}/memory"))?);
    for (samples, args) in [(s, ""), (taken, "--take-disk")] {
        let restored = restore_guest(host, dir, "bench-restored", args, READY)?;
        let log = host.sh(&format!(
            "grep 'restored from' {}/vmm.log || true",
            restored.dir
        ))?;
        eprintln!("  Hopper's restore {args}: {}", log.trim());
        samples.restored(host, &restored)?;
    }
    Ok(())
}

fn qemu_round(host: &TestHost, memory_mib: u32, s: &mut Samples) -> Result<()> {
    let file = "/tmp/bench-qemu.state";
    let mut opts = guest(GuestVmm::Qemu, memory_mib);
    opts.extra_vmm_args = vec![format!("-monitor tcp:{MONITOR},server,nowait")];
    let vm = boot_guest(host, &opts)?;
    host.sh(&format!("rm -f {file}"))?;
    // A live migration into a file; QEMU pauses the guest for its last pass and leaves it
    // stopped, as a snapshot does. `info migrate` reports the time it took.
    let status = bench::qemu_migrate(host, MONITOR, &format!("\"exec:cat > {file}\""))?;
    let took = bench::qemu_figure(&status, "total time")
        .with_context(|| format!("no total time in QEMU's migration status:\n{status}"))?;
    vm.kill(host)?;
    let mut again = opts.clone();
    again.reuse_disk = true;
    again.incoming = Some(format!("exec:cat {file}"));
    let restored: MicrovmGuest = boot_guest(host, &again)?;
    s.save_ms.push(took);
    s.saved_mib.push(allocated_mib(host, file)?);
    s.restored(host, &restored)
}

fn main() -> Result<()> {
    let rounds = bench::rounds(3);
    eprintln!("booting a test host…");
    let host = TestHost::boot(TestHostOptions {
        memory_mib: 4096,
        ..Default::default()
    })?;
    // QEMU's emulation translates code the first times it runs; the first restores in a
    // fresh test host were twice as slow as the later ones (measured), for either VMM.
    eprintln!("warm-up round (not counted)…");
    let (mut discarded, mut discarded_too) = (Samples::default(), Samples::default());
    hopper_round(&host, SIZES_MIB[0], &mut discarded, &mut discarded_too)?;
    qemu_round(&host, SIZES_MIB[0], &mut discarded)?;
    let mut table = Vec::new();
    for memory_mib in SIZES_MIB {
        let (mut hopper, mut taken, mut qemu) =
            (Samples::default(), Samples::default(), Samples::default());
        for round in 1..=rounds {
            hopper_round(&host, memory_mib, &mut hopper, &mut taken)?;
            qemu_round(&host, memory_mib, &mut qemu)?;
            let (h, t, q) = (hopper.running_ms(), taken.running_ms(), qemu.running_ms());
            eprintln!(
                "{memory_mib} MiB, round {round}/{rounds}: Hopper save {:.0} ms, {:.1} MiB, \
                 restore → agent {:.0} ms, round trip {:.0} ms, → runs {:.0} ms \
                 (disk taken: {:.0} ms); \
                 QEMU save {:.0} ms, {:.1} MiB, restore → agent {:.0} ms, round trip {:.0} ms, \
                 → runs {:.0} ms",
                hopper.save_ms[round - 1],
                hopper.saved_mib[round - 1],
                hopper.ready_ms[round - 1],
                hopper.round_trip_ms[round - 1],
                h[round - 1],
                t[round - 1],
                qemu.save_ms[round - 1],
                qemu.saved_mib[round - 1],
                qemu.ready_ms[round - 1],
                qemu.round_trip_ms[round - 1],
                q[round - 1],
            );
        }
        table.push((memory_mib, hopper, taken, qemu));
    }
    if table.is_empty() {
        bail!("no sizes measured");
    }
    println!("Snapshot/restore benchmark: {rounds} rounds per size, 1 vCPU, medians");
    println!("| guest | | Hopper | QEMU | Hopper / QEMU |");
    println!("|---|---|---|---|---|");
    for (memory_mib, h, t, q) in &table {
        for (what, hv, qv) in [
            ("save (ms)", median(&h.save_ms), median(&q.save_ms)),
            ("saved (MiB)", median(&h.saved_mib), median(&q.saved_mib)),
            (
                "restore → agent answers (ms)",
                median(&h.ready_ms),
                median(&q.ready_ms),
            ),
            (
                "agent round trip, median (ms)",
                median(&h.round_trip_ms),
                median(&q.round_trip_ms),
            ),
            (
                "restore → guest runs (ms)",
                median(&h.running_ms()),
                median(&q.running_ms()),
            ),
            (
                "restore → guest runs, disk taken (ms)",
                median(&t.running_ms()),
                median(&q.running_ms()),
            ),
        ] {
            println!(
                "| {memory_mib} MiB | {what} | {hv:.0} | {qv:.0} | {:.2} |",
                hv / qv
            );
        }
    }
    Ok(())
}
