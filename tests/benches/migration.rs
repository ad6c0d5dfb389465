//! Live migration with Hopper's VMM against QEMU's, between the same two nested test hosts,
//! with the same guest (512 MiB, 2 vCPUs, a root disk) running the same workload (64 MiB
//! rewritten continuously, progress appended to its disk):
//!
//!   cargo bench -p hopper-tests --bench migration     (HOPPER_BENCH_ROUNDS=1 by default,
//!                                                      after a warm-up round not counted)
//!
//! Per system, medians of: the guest's pause (QEMU's "downtime"; Hopper's from pausing the
//! guest to the target's word that it runs it), the total migration time, and the bytes
//! sent (memory and disk). Neither side has shared storage: QEMU copies the disk with its
//! block migration (`migrate -b`), Hopper with its own block tracking. Both run with their
//! defaults (QEMU: 300 ms downtime limit, no compression, plain TCP; Hopper: 100 ms target,
//! zstd where it pays, mutual TLS). Since Hopper always encrypts, QEMU is also measured with
//! mutual TLS (`tls-creds-x509` with the same certificates, otherwise its defaults): the
//! like-for-like peer. Hopper's post-copy (`--postcopy`: handed over at once,
//! the rest pulled on fault and pushed while the guest runs on the target) is measured too;
//! its total time runs until the last page and block arrived. QEMU's post-copy is not
//! compared: QEMU 7.2 refuses it together with block migration.
//! Nested figures: only the ratios mean anything.

use std::time::Duration;

use anyhow::{Context, Result};
use hopper_tests::bench::{self, median};
use hopper_tests::tls::Fleet;
use hopper_tests::workload::Workload;
use hopper_tests::{
    boot_guest, receive_guest, GuestVmm, MicrovmGuest, MicrovmOptions, TestHost, TestHostOptions,
};

const PORT: u16 = 7700;
/// QEMU's monitor, inside each test host.
const MONITOR: &str = "127.0.0.1:4444";
const READY: Duration = Duration::from_secs(300);
/// How long the workload runs before the migration starts.
const WARM_UP: Duration = Duration::from_secs(10);
/// The migration test's workload (about 0.8 MiB of pages rewritten a second, a fraction of
/// what the test hosts' emulated network carries, so QEMU's pre-copy, which does not throttle
/// by default, converges too), long enough to run throughout a migration.
const WORKLOAD: Workload = Workload {
    mib: 64,
    steps: 100_000,
    every: 100,
    pace_ms: 500,
};

#[derive(Default)]
struct Samples {
    downtime_ms: Vec<f64>,
    total_ms: Vec<f64>,
    sent_mib: Vec<f64>,
}

fn guest(vmm: GuestVmm, name: &str) -> MicrovmOptions {
    MicrovmOptions {
        vmm,
        name: name.into(),
        memory_mib: 512,
        cpus: 2,
        ready_timeout: READY,
        ..Default::default()
    }
}

/// Boots `opts` on `host` and starts the workload in it.
fn busy_guest(host: &TestHost, opts: &MicrovmOptions) -> Result<MicrovmGuest> {
    let vm = boot_guest(host, opts)?;
    WORKLOAD.start(host, &vm, None)?;
    std::thread::sleep(WARM_UP);
    Ok(vm)
}

fn address(host: &TestHost) -> Result<String> {
    let port = host
        .forwarded_port(PORT)
        .context("test hosts forward the migration port")?;
    Ok(format!("10.0.2.2:{port}"))
}

fn hopper_round(
    a: &TestHost,
    b: &TestHost,
    tls: &[String; 2],
    postcopy: bool,
    s: &mut Samples,
) -> Result<()> {
    let vm = busy_guest(a, &guest(GuestVmm::Hopper, "bench-hopper"))?;
    let target = receive_guest(b, "bench-hopper-in", PORT, &tls[1])?;
    let reply = a.sh(&format!(
        "hopper-runner vm migrate --socket {} --to {} {}{}",
        vm.api_socket
            .as_deref()
            .context("Hopper guests have an API socket")?,
        address(b)?,
        tls[0],
        if postcopy { " --postcopy" } else { "" }
    ))?;
    let reply: serde_json::Value = serde_json::from_str(reply.trim())?;
    let summary = &reply["migration"];
    let figure = |name: &str| {
        summary[name]
            .as_f64()
            .with_context(|| format!("no {name} in {reply}"))
    };
    // The rounds, and where the pause went, as both sides log them.
    for (host, dir, what) in [
        (a, &vm.dir, "migration round\\|migration handover"),
        (b, &target.dir, "restored the VM"),
    ] {
        let line = host.sh(&format!("grep '{what}' {dir}/vmm.log || true"))?;
        eprintln!("{}", line.trim());
    }
    eprintln!("Hopper's summary: {summary}");
    s.downtime_ms.push(figure("downtime_ms")?);
    s.total_ms.push(figure("total_ms")?);
    s.sent_mib.push(figure("wire_bytes")? / (1 << 20) as f64);
    target.wait_ready(b, READY)?;
    target.kill(b)?;
    Ok(())
}

/// QEMU's arguments for a TLS migration endpoint ("client" sends, "server" receives) with
/// the credentials in `dir` (tls::Identity::install_for_qemu).
fn qemu_tls(dir: &str, endpoint: &str) -> String {
    format!(
        "-object tls-creds-x509,id=tls0,dir={dir},endpoint={endpoint} \
         -global migration.tls-creds=tls0 -global migration.tls-hostname=hopper-runner"
    )
}

/// One QEMU migration A → B, over TLS with the credentials in `tls` (the same directory on
/// both hosts) when given.
fn qemu_round(a: &TestHost, b: &TestHost, tls: Option<&str>, s: &mut Samples) -> Result<()> {
    let mut opts = guest(GuestVmm::Qemu, "bench-qemu");
    opts.extra_vmm_args = vec![format!("-monitor tcp:{MONITOR},server,nowait")];
    let mut incoming = opts.clone();
    if let Some(dir) = tls {
        opts.extra_vmm_args.push(qemu_tls(dir, "client"));
        incoming.extra_vmm_args.push(qemu_tls(dir, "server"));
    }
    let vm = busy_guest(a, &opts)?;
    incoming.name = "bench-qemu-in".into();
    incoming.incoming = Some(format!("tcp:0:{PORT}"));
    let status = std::thread::scope(|scope| {
        // Returns once the migrated guest's agent answers on B.
        let target = scope.spawn(|| boot_guest(b, &incoming));
        // Until the target listens, QEMU's migration fails at once: retry briefly.
        let mut status = Err(anyhow::anyhow!("not started"));
        for _ in 0..30 {
            status = bench::qemu_migrate(a, MONITOR, &format!("-b tcp:{}", address(b)?));
            if status.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let target = target.join().expect("the target thread does not panic")?;
        target.kill(b)?;
        status
    })?;
    vm.kill(a)?;
    let figure = |name: &str| {
        bench::qemu_figure(&status, name)
            .with_context(|| format!("no {name} in QEMU's migration status:\n{status}"))
    };
    s.downtime_ms.push(figure("downtime")?);
    s.total_ms.push(figure("total time")?);
    let disk_kib = bench::qemu_figure(&status, "transferred disk").unwrap_or(0.0);
    s.sent_mib
        .push((figure("transferred ram")? + disk_kib) / 1024.0);
    Ok(())
}

fn main() -> Result<()> {
    let rounds = bench::rounds(1);
    eprintln!("booting two test hosts…");
    let boot = |name: &str| {
        TestHost::boot(TestHostOptions {
            name: Some(name.into()),
            forwards: vec![PORT],
            ..Default::default()
        })
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| boot("bench-a"));
        let b = s.spawn(|| boot("bench-b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a?, b?);
    let fleet = Fleet::new("Hopper bench fleet")?;
    let identities = [fleet.runner()?, fleet.runner()?];
    let tls = [
        identities[0].install(&a, "runner")?,
        identities[1].install(&b, "runner")?,
    ];
    let qemu_dir = identities[0].install_for_qemu(&a, "qemu")?;
    anyhow::ensure!(identities[1].install_for_qemu(&b, "qemu")? == qemu_dir);
    let qemu_creds = Some(qemu_dir.as_str());
    let [mut pre, mut post, mut qemu, mut qemu_tls_samples] = [(); 4].map(|_| Samples::default());
    // QEMU's emulation translates code the first times it runs: in a fresh pair of test
    // hosts Hopper's first migration paused 5 to 9 times longer than the later ones,
    // QEMU's about a tenth longer (measured). Each gets one round that is not counted.
    eprintln!("warm-up round (not counted)…");
    let mut discarded = Samples::default();
    hopper_round(&a, &b, &tls, false, &mut discarded)?;
    hopper_round(&a, &b, &tls, true, &mut discarded)?;
    qemu_round(&a, &b, None, &mut discarded)?;
    qemu_round(&a, &b, qemu_creds, &mut discarded)?;
    for round in 1..=rounds {
        hopper_round(&a, &b, &tls, false, &mut pre)?;
        hopper_round(&a, &b, &tls, true, &mut post)?;
        qemu_round(&a, &b, None, &mut qemu)?;
        qemu_round(&a, &b, qemu_creds, &mut qemu_tls_samples)?;
        let last = |s: &Samples| {
            format!(
                "pause {:.0} ms, total {:.0} ms, {:.1} MiB sent",
                s.downtime_ms[round - 1],
                s.total_ms[round - 1],
                s.sent_mib[round - 1]
            )
        };
        eprintln!(
            "round {round}/{rounds}: Hopper pre-copy {}; Hopper post-copy {}; QEMU {}; \
             QEMU with TLS {}",
            last(&pre),
            last(&post),
            last(&qemu),
            last(&qemu_tls_samples)
        );
    }
    println!(
        "Live migration benchmark: {rounds} round(s), 512 MiB guest, 2 vCPUs, workload running, medians"
    );
    println!(
        "| | Hopper pre-copy | Hopper post-copy | QEMU pre-copy | QEMU pre-copy, TLS \
         | pre-copy / QEMU | post-copy / QEMU | pre-copy / QEMU TLS | post-copy / QEMU TLS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (what, field) in [
        (
            "pause (ms)",
            (|s| &s.downtime_ms) as fn(&Samples) -> &Vec<f64>,
        ),
        ("total time (ms)", |s| &s.total_ms),
        ("sent (MiB)", |s| &s.sent_mib),
    ] {
        let [h, p, q, t] = [&pre, &post, &qemu, &qemu_tls_samples].map(|s| median(field(s)));
        println!(
            "| {what} | {h:.0} | {p:.0} | {q:.0} | {t:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            h / q,
            p / q,
            h / t,
            p / t
        );
    }
    Ok(())
}
