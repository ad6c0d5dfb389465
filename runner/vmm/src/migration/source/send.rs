//! Sending pages and disk blocks: in batch frames, spread over the parallel streams.

use super::tracking::{plan_blocks, plan_pages, TrackedDisk};
use super::MigrationError;
use crate::migration::link::{Link, LinkError};
use crate::migration::protocol::{Batch, Frame, Plan, Unit};
use crate::migration::{DISK_BLOCK, PAGE};
use crate::persist::PersistError;
use crate::snapshot::memory::SnapshotMemoryError;
use crate::vm::Vm;
use std::os::unix::fs::FileExt;
use vm_memory::{Bytes, GuestAddress};

/// Units per batch frame: 1 MiB of memory pages, 4 MiB of disk blocks.
const BATCH_UNITS: usize = 256;

/// Units travel in parallel streams by MiB of address: a unit always takes the same stream,
/// so a later copy of it never overtakes an earlier one.
const STREAM_SPAN_SHIFT: u32 = 20;

fn stream_of(at: u64, streams: usize) -> usize {
    ((at >> STREAM_SPAN_SHIFT) % streams as u64) as usize
}

#[derive(Default)]
pub(super) struct Sent {
    pub(super) memory: u64,
    pub(super) disk: u64,
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
pub(super) fn send_spread(
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

/// Sends the pages at these guest addresses; returns the bytes sent.
pub(in crate::migration) fn send_pages(
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
pub(in crate::migration) fn send_blocks(
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
