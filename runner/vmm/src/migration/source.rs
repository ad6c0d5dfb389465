//! The sending side: pre-copy of memory and disk while the guest runs, then a short pause for
//! the last changes and the VM's state, then the commit handshake.
//!
//! Round 0 sends every page the guest has touched and every disk block that is not zero;
//! each later round sends what was written meanwhile (KVM's dirty log for the vCPUs' writes,
//! the VMM's bitmaps for the devices' writes, the disk's block log). Rounds stop when the
//! rest would go out within the pause target at the measured rate (though while each round
//! still halves what is left, one more goes), or after the round limit. A guest that writes
//! faster than the link carries is throttled: its vCPUs are held for a growing share of each
//! 100 ms.
//!
//! Post-copy hands over after `max_rounds` rounds (none by default) and sends the rest from
//! the paused VM afterwards ([`super::serve`]): the shortest evacuation, but from the commit
//! until the copy completes the VM needs both hosts.

use super::link::{Link, LinkError};
use super::protocol::{Batch, Frame, Hello, Plan, Unit, VERSION};
use super::serve::{self, Holdings};
use super::transport::{self, TlsFiles, TransportError};
use super::{count_bits, set_bit, set_bits, DISK_BLOCK, PAGE};
use crate::devices::virtio::block::Block;
use crate::persist::{self, Paused, PersistError};
use crate::snapshot::memory::{layout, SnapshotMemoryError};
use crate::vm::{Vm, VmError};
use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 100;
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Units per batch frame: 1 MiB of memory pages, 4 MiB of disk blocks.
const BATCH_UNITS: usize = 256;
/// A pause estimated shorter than this is not worth another round to shorten.
const WORTH_ANOTHER_ROUND_MS: u64 = 5;
const THROTTLE_PERIOD_MS: u64 = 100;
/// Like QEMU's auto-converge: hold the vCPUs 20% of the time, 10% more each round that does
/// not converge, up to 95%.
const THROTTLE_FIRST: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 95;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// The receiving runner's address (host:port).
    pub to: String,
    pub tls: TlsFiles,
    /// Pre-copy goes on until the final pause is estimated to be this short.
    pub max_downtime_ms: u64,
    /// ... or for at most this many rounds.
    pub max_rounds: u32,
    /// Hand over when the rounds end and send the rest afterwards, pulled by the target
    /// where its guest needs it first.
    #[serde(default)]
    pub postcopy: bool,
    /// Connections that carry memory and disk in parallel before the handover.
    #[serde(default = "one_stream")]
    pub streams: u8,
}

fn one_stream() -> u8 {
    1
}

/// Units travel in parallel streams by MiB of address: a unit always takes the same stream,
/// so a later copy of it never overtakes an earlier one.
const STREAM_SPAN_SHIFT: u32 = 20;

fn stream_of(at: u64, streams: usize) -> usize {
    ((at >> STREAM_SPAN_SHIFT) % streams as u64) as usize
}

/// What a migration took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// Rounds sent while the guest ran (round 0 included).
    pub rounds: u32,
    /// Guest memory sent, counting pages sent more than once (before compression).
    pub memory_bytes: u64,
    /// Disk sent, counting blocks sent more than once (before compression).
    pub disk_bytes: u64,
    /// What went over the wire (compressed, with framing, before TLS).
    pub wire_bytes: u64,
    /// From pausing the guest here to the target's word that it runs it.
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// The largest share of time the guest's vCPUs were held to let the copy converge.
    pub throttle_percent: u8,
    /// Post-copy: pages and blocks the target pulled because its guest needed them first.
    pub pulled: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    State(#[from] PersistError),
    #[error("reading the disk: {0}")]
    Disk(std::io::Error),
    #[error("the VM stopped during the migration")]
    VmStopped,
    /// The commit was sent but not confirmed: the target may or may not run the VM, so this
    /// side keeps it paused (never both running); ask the target, then resume or stop it.
    #[error("the handover is unconfirmed ({0}); the VM stays paused here")]
    Unconfirmed(LinkError),
    /// A post-copy broke after the handover: the target runs the VM but lacks part of it.
    #[error("the post-copy broke after the handover ({0}); the VM cannot go on")]
    PostcopyBroken(Box<MigrationError>),
    #[error("the target sent {0}")]
    Invalid(String),
}

/// Pauses and resumes the whole VM (vCPUs and devices).
pub trait Pausable: Sync {
    fn pause(&self);
    fn resume(&self);
    /// Whether the VM is on its way out (powered off, failed): nothing left to migrate.
    fn is_exiting(&self) -> bool;
}

/// The running VM to send.
pub struct Source<'a> {
    pub parts: Paused<'a>,
    /// The guest's CPUID (the first vCPU's), for the target's up-front check.
    pub cpuid: &'a [kvm_cpuid_entry2],
    pub control: &'a dyn Pausable,
}

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

/// What the rounds so far call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Handover,
    Round,
    /// Another round, with the guest held back more: it writes about as fast as we send.
    ThrottleAndRound,
}

/// The dirty sets of the rounds so far, which decide when the pre-copy hands over.
#[derive(Debug, Default)]
struct Convergence {
    /// What the last round left dirty; none before the first round.
    previous_dirty: Option<u64>,
}

impl Convergence {
    /// After a round that left `dirty` bytes, whose sending is estimated to take
    /// `estimate_ms`: hand over once that fits `max_downtime_ms`, unless rounds still halve
    /// what is left (another is short, and the pause then carries only what the guest
    /// writes during it); throttle when a round did not shrink it by a tenth.
    fn after_round(&mut self, dirty: u64, estimate_ms: u64, max_downtime_ms: u64) -> Next {
        let previous = self.previous_dirty.replace(dirty);
        let halving =
            previous.is_none_or(|p| dirty * 2 < p) && estimate_ms > WORTH_ANOTHER_ROUND_MS;
        if estimate_ms <= max_downtime_ms && !halving {
            Next::Handover
        } else if previous.is_some_and(|p| dirty * 10 > p * 9) {
            Next::ThrottleAndRound
        } else {
            Next::Round
        }
    }
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

/// With the VM paused: adds what was written since the last round to `pending`. (No flush:
/// the disk is read through the same page cache the guest's writes went to, and on this
/// side it is about to be dropped.)
fn last_changes(tracking: &Tracking, mut pending: Plan) -> Result<Plan, MigrationError> {
    let last = tracking.take()?;
    for (words, more) in pending.memory.iter_mut().zip(&last.memory) {
        for (w, m) in words.iter_mut().zip(more) {
            *w |= m;
        }
    }
    for (w, m) in pending.disk.iter_mut().zip(&last.disk) {
        *w |= m;
    }
    Ok(pending)
}

/// With the VM paused: what is still pending (pre-copy) or the plan of what the target lacks
/// (post-copy), the VM's state, then the commit handshake.
fn handover(
    src: &Source,
    link: &mut Link,
    extra: &mut [Link],
    holdings: &Holdings,
    postcopy: bool,
    summary: &mut MigrationSummary,
) -> Result<(), MigrationError> {
    let vm = src.parts.vm;
    let plan = holdings.plan();
    let started = Instant::now();
    if !postcopy {
        let sent = send_spread(link, extra, vm, holdings.disk(), plan, false)?;
        summary.memory_bytes += sent.memory;
        summary.disk_bytes += sent.disk;
    }
    // The other streams are done before the state (or plan) goes out on this one.
    for l in extra.iter_mut() {
        l.send(&Frame::Done)?;
        l.flush()?;
    }
    if postcopy {
        link.send(&Frame::Plan(Box::new(plan.clone())))?;
    }
    let data = started.elapsed();
    let state = persist::capture(&src.parts, layout(&vm.memory))?;
    link.send(&Frame::State(Box::new(state)))?;
    let captured = started.elapsed();
    link.expect(Frame::Ready)?;
    let ready = started.elapsed();
    // From here the target may run the VM: this side never resumes it on its own.
    link.send(&Frame::Commit)
        .and_then(|_| link.expect(Frame::Committed))
        .map_err(MigrationError::Unconfirmed)?;
    // Where the pause goes.
    log::info!(
        "migration handover: last data queued after {} ms, state after {} ms, target ready \
         after {} ms, committed after {} ms",
        data.as_millis(),
        captured.as_millis(),
        ready.as_millis(),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The pages of each region that may hold something other than zeros, as a bitmap.
fn in_use(vm: &Vm) -> Vec<Vec<u64>> {
    vm.memory
        .iter()
        .map(|r| {
            let pages = crate::memory::pages_in_use(r);
            let mut words = vec![0u64; pages.len().div_ceil(64)];
            for (i, _) in pages.iter().enumerate().filter(|(_, r)| **r) {
                set_bit(&mut words, i);
            }
            words
        })
        .collect()
}

#[derive(Default)]
struct Sent {
    memory: u64,
    disk: u64,
}

impl std::ops::Add for Sent {
    type Output = Sent;
    fn add(self, o: Sent) -> Sent {
        Sent {
            memory: self.memory + o.memory,
            disk: self.disk + o.disk,
        }
    }
}

/// Sends the units set in `pending` over `link` and the `extra` streams, each unit on its
/// stream ([`stream_of`]), the streams in parallel.
fn send_spread(
    link: &mut Link,
    extra: &mut [Link],
    vm: &Vm,
    disk: Option<&TrackedDisk>,
    pending: &Plan,
    skip_zero: bool,
) -> Result<Sent, MigrationError> {
    let streams = extra.len() + 1;
    let send = |i: usize, link: &mut Link| -> Result<Sent, MigrationError> {
        let mine = |at: &u64| stream_of(*at, streams) == i;
        let memory = send_pages(
            link,
            vm,
            plan_pages(vm, &pending.memory).filter(mine),
            skip_zero,
        )?;
        let disk = match disk {
            Some(d) => send_blocks(
                link,
                d,
                plan_blocks(d, &pending.disk).filter(mine),
                skip_zero,
            )?,
            None => 0,
        };
        // Out of the buffer now: the round's rate counts it, and the pause does not inherit
        // it.
        link.flush()?;
        Ok(Sent { memory, disk })
    };
    if extra.is_empty() {
        return send(0, link);
    }
    std::thread::scope(|s| {
        let others: Vec<_> = extra
            .iter_mut()
            .enumerate()
            .map(|(i, l)| s.spawn(move || send(i + 1, l)))
            .collect();
        let mut total = send(0, link);
        for other in others {
            let sent = other.join().expect("a stream's sender does not panic");
            total = match (total, sent) {
                (Ok(a), Ok(b)) => Ok(a + b),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        total
    })
}

/// Collects units into batch frames and sends each when full.
struct Batcher<'l> {
    link: &'l mut Link,
    frame: fn(Batch) -> Frame,
    unit: usize,
    items: Vec<(u64, Unit)>,
    /// Skip units of zeros: the target already has zeros there (round 0).
    skip_zero: bool,
    /// Bytes of units sent.
    sent: u64,
}

impl<'l> Batcher<'l> {
    fn new(link: &'l mut Link, frame: fn(Batch) -> Frame, unit: usize, skip_zero: bool) -> Self {
        Batcher {
            link,
            frame,
            unit,
            items: Vec::with_capacity(BATCH_UNITS),
            skip_zero,
            sent: 0,
        }
    }

    fn push(&mut self, at: u64, data: &[u8]) -> Result<(), LinkError> {
        let unit = Unit::of(data);
        if self.skip_zero && unit == Unit::Zero {
            return Ok(());
        }
        self.items.push((at, unit));
        self.sent += self.unit as u64;
        if self.items.len() == BATCH_UNITS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        let items = std::mem::take(&mut self.items);
        if !items.is_empty() {
            let batch = Batch {
                unit: self.unit,
                items,
            };
            self.link.send(&(self.frame)(batch))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<u64, LinkError> {
        self.flush()?;
        Ok(self.sent)
    }
}

/// The guest addresses of the pages set in `pages` (a bitmap per region).
pub(super) fn plan_pages<'a>(vm: &'a Vm, pages: &'a [Vec<u64>]) -> impl Iterator<Item = u64> + 'a {
    vm.memory.iter().zip(pages).flat_map(|(region, words)| {
        let (base, len) = (region.start_addr().0, region.len());
        set_bits(words)
            .map(|i| (i * PAGE) as u64)
            .take_while(move |at| *at < len)
            .map(move |at| base + at)
    })
}

/// The offsets of the disk blocks set in `blocks`.
pub(super) fn plan_blocks<'a>(
    disk: &TrackedDisk,
    blocks: &'a [u64],
) -> impl Iterator<Item = u64> + 'a {
    let count = disk.blocks();
    set_bits(blocks)
        .take_while(move |i| *i < count)
        .map(|i| (i * DISK_BLOCK) as u64)
}

/// Sends the pages at these guest addresses; returns the bytes sent.
pub(super) fn send_pages(
    link: &mut Link,
    vm: &Vm,
    pages: impl IntoIterator<Item = u64>,
    skip_zero: bool,
) -> Result<u64, MigrationError> {
    let mut out = Batcher::new(link, Frame::Memory, PAGE, skip_zero);
    let mut page = [0u8; PAGE];
    for at in pages {
        if at % PAGE as u64 != 0 {
            return Err(MigrationError::Invalid(format!("a page at {at:#x}")));
        }
        vm.memory
            .read_slice(&mut page, GuestAddress(at))
            .map_err(|source| PersistError::from(SnapshotMemoryError::Read { addr: at, source }))?;
        out.push(at, &page)?;
    }
    Ok(out.finish()?)
}

/// Sends the disk blocks at these offsets; returns the bytes sent.
pub(super) fn send_blocks(
    link: &mut Link,
    disk: &TrackedDisk,
    blocks: impl IntoIterator<Item = u64>,
    skip_zero: bool,
) -> Result<u64, MigrationError> {
    let mut out = Batcher::new(link, Frame::Disk, DISK_BLOCK, skip_zero);
    let mut block = vec![0u8; DISK_BLOCK];
    for at in blocks {
        if at % DISK_BLOCK as u64 != 0 || at >= disk.size {
            return Err(MigrationError::Invalid(format!("a disk block at {at}")));
        }
        // The last block may be short; the target writes only what fits its disk.
        let len = (disk.size - at).min(DISK_BLOCK as u64) as usize;
        block[len..].fill(0);
        disk.file
            .read_exact_at(&mut block[..len], at)
            .map_err(MigrationError::Disk)?;
        out.push(at, &block)?;
    }
    Ok(out.finish()?)
}

/// The root disk as the migration reads it: its own descriptor on the image file.
pub(super) struct TrackedDisk<'a> {
    block: &'a Mutex<Block>,
    file: File,
    size: u64,
}

impl<'a> TrackedDisk<'a> {
    fn open(block: &'a Mutex<Block>, path: &std::path::Path) -> Result<Self, MigrationError> {
        let file = File::open(path).map_err(MigrationError::Disk)?;
        let size = block.lock().unwrap().size();
        Ok(TrackedDisk { block, file, size })
    }

    fn blocks(&self) -> usize {
        self.size.div_ceil(DISK_BLOCK as u64) as usize
    }

    /// The blocks the image file holds data in, as a bitmap: holes read as zeros, which the
    /// target has already, so a mostly empty disk costs what it holds, not its size.
    fn blocks_with_data(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.blocks().div_ceil(64)];
        let extents = crate::extents::data_extents(&self.file, 0, self.size)
            .unwrap_or_else(|_| vec![(0, self.size)]);
        for (from, to) in extents {
            let block = DISK_BLOCK as u64;
            for i in (from / block)..to.div_ceil(block) {
                set_bit(&mut words, i as usize);
            }
        }
        words
    }
}

/// Dirty tracking of memory and disk for as long as it lives.
struct Tracking<'a> {
    vm: &'a Vm,
    disk: Option<&'a TrackedDisk<'a>>,
    disk_log: Arc<AtomicBitmap>,
}

impl<'a> Tracking<'a> {
    fn start(vm: &'a Vm, disk: Option<&'a TrackedDisk<'a>>) -> Result<Self, MigrationError> {
        vm.set_dirty_logging(true)?;
        // Earlier device writes are covered by round 0.
        let _ = vm.take_dirty_pages();
        let disk_log = Arc::new(AtomicBitmap::new(
            disk.map_or(0, |d| d.size as usize),
            std::num::NonZeroUsize::new(DISK_BLOCK).unwrap(),
        ));
        if let Some(d) = disk {
            d.block.lock().unwrap().track_writes(Some(disk_log.clone()));
        }
        Ok(Tracking { vm, disk, disk_log })
    }

    /// What was written since the last look.
    fn take(&self) -> Result<Plan, MigrationError> {
        Ok(Plan {
            memory: self.vm.take_dirty_pages()?,
            disk: self.disk_log.get_and_reset(),
        })
    }
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.disk {
            d.block.lock().unwrap().track_writes(None);
        }
        if let Err(e) = self.vm.set_dirty_logging(false) {
            log::warn!("cannot turn dirty logging off: {e}");
        }
    }
}

/// Holds the vCPUs for `percent` of each period while the copy cannot keep up.
#[derive(Default)]
struct Throttle {
    percent: AtomicU8,
    max: AtomicU8,
    /// Set by [`Throttle::stop`], which also wakes the thread: the pause must follow the
    /// last round at once, not after the rest of a throttle period (the guest writes on
    /// meanwhile, and all of that falls into the pause).
    done: Mutex<bool>,
    wake: Condvar,
}

impl Throttle {
    fn tighten(&self) {
        let p = match self.percent.load(Ordering::Relaxed) {
            0 => THROTTLE_FIRST,
            p => (p + THROTTLE_STEP).min(THROTTLE_MAX),
        };
        self.percent.store(p, Ordering::Relaxed);
        self.max.fetch_max(p, Ordering::Relaxed);
        log::info!(
            "migration: the guest dirties memory faster than it is sent; throttled to {}%",
            100 - p
        );
    }

    fn stop(&self) {
        *self.done.lock().unwrap() = true;
        self.wake.notify_all();
    }

    fn run(&self, control: &dyn Pausable) {
        let mut done = self.done.lock().unwrap();
        while !*done {
            let held = self.percent.load(Ordering::Relaxed) as u64 * THROTTLE_PERIOD_MS / 100;
            if held > 0 {
                control.pause();
                done = self.sleep(done, held);
                control.resume();
            }
            done = self.sleep(done, THROTTLE_PERIOD_MS - held);
        }
    }

    /// Sleeps `ms`, or less if stopped meanwhile.
    fn sleep<'a>(&self, done: MutexGuard<'a, bool>, ms: u64) -> MutexGuard<'a, bool> {
        let wait = self
            .wake
            .wait_timeout_while(done, Duration::from_millis(ms), |done| !*done);
        wait.unwrap().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Rounds shrink: they go on past the pause target while each halves what is left, and
    /// hand over once one does not (or too little is left to bother).
    #[test]
    fn a_converging_guest_is_handed_over_once_rounds_stop_halving() {
        let mut c = Convergence::default();
        assert_eq!(c.after_round(64 * MIB, 4000, 100), Next::Round);
        assert_eq!(c.after_round(8 * MIB, 500, 100), Next::Round);
        // Under the target, but halved: one more.
        assert_eq!(c.after_round(MIB, 60, 100), Next::Round);
        assert_eq!(c.after_round(MIB / 4, 15, 100), Next::Round);
        // Under the target and no longer halving.
        assert_eq!(c.after_round(MIB / 5, 12, 100), Next::Handover);
        let mut c = Convergence::default();
        c.after_round(64 * MIB, 4000, 100);
        // Halved, but too little left to be worth a round.
        assert_eq!(c.after_round(16 * 4096, 4, 100), Next::Handover);
    }

    /// A guest that writes as fast as the link carries is throttled from the second round
    /// on, each round that does not shrink by a tenth; a round that does is not.
    #[test]
    fn a_guest_outrunning_the_link_is_throttled_harder_each_round() {
        let mut c = Convergence::default();
        assert_eq!(c.after_round(64 * MIB, 4000, 100), Next::Round);
        assert_eq!(c.after_round(60 * MIB, 3800, 100), Next::ThrottleAndRound);
        assert_eq!(c.after_round(61 * MIB, 3900, 100), Next::ThrottleAndRound);
        assert_eq!(c.after_round(40 * MIB, 2500, 100), Next::Round);
        let throttle = Throttle::default();
        let held: Vec<u8> = (0..10)
            .map(|_| {
                throttle.tighten();
                throttle.percent.load(Ordering::Relaxed)
            })
            .collect();
        assert_eq!(held, [20, 30, 40, 50, 60, 70, 80, 90, 95, 95]);
        assert_eq!(throttle.max.load(Ordering::Relaxed), 95);
    }

    /// Stopping the throttle ends its hold and its period at once, with the guest resumed.
    #[test]
    fn a_stopped_throttle_lets_go_at_once() {
        #[derive(Default)]
        struct Held(std::sync::atomic::AtomicI32);
        impl Pausable for Held {
            fn pause(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
            fn resume(&self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
            fn is_exiting(&self) -> bool {
                false
            }
        }
        let (throttle, guest) = (Throttle::default(), Held::default());
        for _ in 0..9 {
            throttle.tighten();
        }
        let took = std::thread::scope(|s| {
            let running = s.spawn(|| throttle.run(&guest));
            // Inside a 95 ms hold.
            while guest.0.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let stopped = Instant::now();
            throttle.stop();
            running.join().unwrap();
            stopped.elapsed()
        });
        // Waiting out the hold would take about 95 ms.
        assert!(took < Duration::from_millis(50), "{took:?}");
        assert_eq!(guest.0.load(Ordering::SeqCst), 0, "the guest runs again");
    }
}
