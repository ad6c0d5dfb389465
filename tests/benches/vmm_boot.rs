//! Boot time and memory overhead of Hopper's VMM against QEMU's `-M microvm`, in one nested
//! test host, same kernel, initramfs, root disk and command line, alternating the two VMMs.
//!
//!   cargo bench -p hopper-tests --bench vmm_boot            (HOPPER_BENCH_ROUNDS=5 by default)
//!
//! Reports medians of: VMM start → guest init's first line (boot-to-init), VMM start → guest
//! agent ready, and the VMM's resident memory beyond guest RAM. Absolute figures are nested
//! (KVM inside software emulation) and only the ratios mean anything.

use std::time::Duration;

use anyhow::Result;
use hopper_tests::bench::{self, median};
use hopper_tests::{boot_guest, GuestVmm, MicrovmOptions, TestHost, TestHostOptions};

const GUEST_MIB: u32 = 256;

#[derive(Default)]
struct Samples {
    init: Vec<f64>,
    ready: Vec<f64>,
    overhead_mib: Vec<f64>,
}

fn main() -> Result<()> {
    let rounds = bench::rounds(5);
    eprintln!("booting a test host…");
    let host = TestHost::boot(TestHostOptions::default())?;
    let mut hopper = Samples::default();
    let mut qemu = Samples::default();
    for round in 1..=rounds {
        for (vmm, samples) in [(GuestVmm::Hopper, &mut hopper), (GuestVmm::Qemu, &mut qemu)] {
            let opts = MicrovmOptions {
                vmm,
                name: "bench".into(),
                memory_mib: GUEST_MIB,
                cpus: 1,
                ..Default::default()
            };
            let vm = boot_guest(&host, &opts)?;
            let (_guest, other) = vm.resident_kib(&host, GUEST_MIB)?;
            vm.poweroff(&host, Duration::from_secs(60))?;
            eprintln!(
                "round {round}/{rounds} {vmm:?}: init {:.2} s, agent ready {:.2} s, overhead {:.1} MiB",
                vm.init_after.as_secs_f64(),
                vm.ready_after.as_secs_f64(),
                other as f64 / 1024.0
            );
            samples.init.push(vm.init_after.as_secs_f64());
            samples.ready.push(vm.ready_after.as_secs_f64());
            samples.overhead_mib.push(other as f64 / 1024.0);
        }
    }
    println!("VMM boot benchmark: {rounds} rounds, {GUEST_MIB} MiB guest, 1 vCPU, medians");
    println!("| | Hopper | QEMU microvm | Hopper / QEMU |");
    println!("|---|---|---|---|");
    for (what, h, q) in [
        ("boot to init (s)", median(&hopper.init), median(&qemu.init)),
        (
            "boot to agent ready (s)",
            median(&hopper.ready),
            median(&qemu.ready),
        ),
        (
            "VMM memory beyond guest RAM (MiB)",
            median(&hopper.overhead_mib),
            median(&qemu.overhead_mib),
        ),
    ] {
        println!("| {what} | {h:.2} | {q:.2} | {:.2} |", h / q);
    }
    Ok(())
}
