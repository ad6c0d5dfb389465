//! The migration's course: connecting, the pre-copy rounds while the guest runs, the pause,
//! the handover, and (post-copy) sending the rest from the paused VM.

use super::convergence::{Convergence, Next};
use super::handover::{handover, last_changes};
use super::send::send_spread;
use super::throttle::Throttle;
use super::tracking::{in_use, TrackedDisk, Tracking};
use super::{MigrateOptions, MigrationError, MigrationSummary, Source};
use crate::migration::link::Link;
use crate::migration::protocol::{Frame, Hello, Plan, VERSION};
use crate::migration::serve::{self, Holdings};
use crate::migration::transport;
use crate::migration::{count_bits, DISK_BLOCK, PAGE};
use crate::snapshot::memory::layout;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Sends the VM to the runner at `opts.to`. `Ok` means the target runs it now and this side
/// must stop it. On any error before the commit the VM runs on here, as before.
pub fn migrate(src: &Source, opts: &MigrateOptions) -> Result<MigrationSummary, MigrationError> {
    let started = Instant::now();
    let vm = src.parts.vm;
    let tls = opts.tls.client_config()?;
    let mut link = Link::new(transport::connect(&opts.to, tls.clone())?);
    let disk = match src.parts.disk {
        Some((block, path)) => Some(TrackedDisk::open(block, path)?),
        None => None,
    };
    let hello = Hello {
        version: VERSION,
        memory_mib: src.parts.memory_mib,
        regions: layout(&vm.memory)
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect(),
        disk_len: disk.as_ref().map(|d| d.size),
        devices: src.parts.devices.clone(),
        vcpus: src.parts.vcpus.len() as u8,
        cpuid: src.cpuid.to_vec(),
        postcopy: opts.postcopy,
        streams: opts.streams.max(1),
    };
    link.send(&Frame::Hello(Box::new(hello)))?;
    link.expect(Frame::Accept)?;
    let mut extra = (1..opts.streams.max(1))
        .map(|_| Ok(Link::new(transport::connect(&opts.to, tls.clone())?)))
        .collect::<Result<Vec<_>, MigrationError>>()?;
    // Post-copy: the target's pulls come on a connection of their own, so that they do not
    // wait behind the pushed pages.
    let mut pull = match opts.postcopy {
        true => {
            let (channel, closer) = transport::connect_closable(&opts.to, tls.clone())?;
            Some((Link::new(channel), closer))
        }
        false => None,
    };

    let mut summary = MigrationSummary::default();
    let tracking = Tracking::start(vm, disk.as_ref())?;
    let throttle = Throttle::default();
    let precopied = std::thread::scope(|s| {
        s.spawn(|| throttle.run(src.control));
        let result = precopy(
            src,
            opts,
            &mut link,
            &mut extra,
            &tracking,
            &throttle,
            &mut summary,
        );
        throttle.stop();
        result
    });
    summary.throttle_percent = throttle.max.load(Ordering::Relaxed);
    let pending = match precopied {
        Ok(pending) => pending,
        Err(e) => {
            link.abort(&e.to_string());
            return Err(e);
        }
    };

    src.control.pause();
    let paused = Instant::now();
    let pending = match last_changes(&tracking, pending) {
        Ok(pending) => pending,
        Err(e) => {
            link.abort(&e.to_string());
            src.control.resume();
            return Err(e);
        }
    };
    let holdings = Holdings::new(vm, disk.as_ref(), pending);
    let handed_over = std::thread::scope(|s| {
        // The paused VM answers pulls from the moment its state is out: the target may touch
        // guest memory while it builds the VM.
        let answering = pull.as_mut().map(|(pull, closer)| {
            let (holdings, closer) = (&holdings, &*closer);
            (s.spawn(move || serve::answer_pulls(pull, holdings)), closer)
        });
        let result = handover(
            src,
            &mut link,
            &mut extra,
            &holdings,
            opts.postcopy,
            &mut summary,
        );
        let result = result.and_then(|()| {
            summary.downtime_ms = paused.elapsed().as_millis() as u64;
            match &answering {
                Some(_) => serve::push(&mut link, &holdings).map_err(Box::new),
                None => Ok(serve::Pushed::default()),
            }
            .map_err(MigrationError::PostcopyBroken)
        });
        let answered = answering.map(|(thread, close)| {
            if result.is_err() {
                close.close();
            }
            thread.join().expect("the pull server does not panic")
        });
        let pushed = result?;
        summary.memory_bytes += pushed.memory;
        summary.disk_bytes += pushed.disk;
        if let Some(answered) = answered {
            let answered = answered.map_err(|e| MigrationError::PostcopyBroken(Box::new(e)))?;
            summary.pulled = answered.units;
            summary.memory_bytes += answered.memory;
            summary.disk_bytes += answered.disk;
            summary.wire_bytes += answered.wire_bytes;
        }
        Ok::<_, MigrationError>(())
    });
    match handed_over {
        Ok(()) => {}
        // Before the commit the VM is still this side's.
        Err(e @ (MigrationError::Unconfirmed(_) | MigrationError::PostcopyBroken(_))) => {
            return Err(e)
        }
        Err(e) => {
            link.abort(&e.to_string());
            src.control.resume();
            return Err(e);
        }
    }
    summary.total_ms = started.elapsed().as_millis() as u64;
    summary.wire_bytes += link.wire_bytes + extra.iter().map(|l| l.wire_bytes).sum::<u64>();
    Ok(summary)
}

/// Runs the rounds while the guest runs; returns what the final pause must still send.
fn precopy(
    src: &Source,
    opts: &MigrateOptions,
    link: &mut Link,
    extra: &mut [Link],
    tracking: &Tracking,
    throttle: &Throttle,
    summary: &mut MigrationSummary,
) -> Result<Plan, MigrationError> {
    let vm = src.parts.vm;
    // Round 0: all the guest has touched and the disk's data; the target starts from zeros.
    let mut pending = Plan {
        memory: in_use(vm),
        disk: tracking
            .disk
            .as_ref()
            .map(|d| d.blocks_with_data())
            .unwrap_or_default(),
    };
    let mut convergence = Convergence::default();
    while summary.rounds < opts.max_rounds {
        if src.control.is_exiting() {
            return Err(MigrationError::VmStopped);
        }
        let round = Instant::now();
        let first = summary.rounds == 0;
        let sent = send_spread(link, extra, vm, tracking.disk, &pending, first)?;
        sync(link, extra)?;
        let elapsed = round.elapsed().max(Duration::from_millis(1));
        summary.rounds += 1;
        summary.memory_bytes += sent.memory;
        summary.disk_bytes += sent.disk;
        let rate = (sent.memory + sent.disk) as f64 / elapsed.as_secs_f64();

        pending = tracking.take()?;
        let dirty = count_bits(&pending.memory) * PAGE as u64
            + count_bits(std::slice::from_ref(&pending.disk)) * DISK_BLOCK as u64;
        let estimate_ms = (dirty as f64 / rate.max(1.0) * 1000.0) as u64;
        log::info!(
            "migration round {}: sent {} KiB in {} ms ({:.1} MiB/s); {} KiB dirty, pause estimate {} ms",
            summary.rounds,
            (sent.memory + sent.disk) >> 10,
            elapsed.as_millis(),
            rate / (1 << 20) as f64,
            dirty >> 10,
            estimate_ms
        );
        match convergence.after_round(dirty, estimate_ms, opts.max_downtime_ms) {
            Next::Handover => break,
            Next::Round => {}
            Next::ThrottleAndRound => throttle.tighten(),
        }
    }
    Ok(pending)
}

/// Waits until the target has stored everything sent on every stream.
fn sync(link: &mut Link, extra: &mut [Link]) -> Result<(), MigrationError> {
    for l in extra.iter_mut().chain(std::iter::once(&mut *link)) {
        l.send(&Frame::Sync)?;
        l.flush()?;
    }
    for l in extra.iter_mut().chain(std::iter::once(link)) {
        l.expect(Frame::Synced)?;
    }
    Ok(())
}
