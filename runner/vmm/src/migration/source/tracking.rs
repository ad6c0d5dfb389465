//! Dirty tracking: which pages and disk blocks may hold data at the start, which were written
//! since the last look, and the addresses those bitmaps name.

use super::MigrationError;
use crate::devices::virtio::block::Block;
use crate::migration::protocol::Plan;
use crate::migration::{set_bit, set_bits, DISK_BLOCK, PAGE};
use crate::vm::Vm;
use std::fs::File;
use std::sync::{Arc, Mutex};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The pages of each region that may hold something other than zeros, as a bitmap.
pub(super) fn in_use(vm: &Vm) -> Vec<Vec<u64>> {
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

/// The guest addresses of the pages set in `pages` (a bitmap per region).
pub(in crate::migration) fn plan_pages<'a>(
    vm: &'a Vm,
    pages: &'a [Vec<u64>],
) -> impl Iterator<Item = u64> + 'a {
    vm.memory.iter().zip(pages).flat_map(|(region, words)| {
        let (base, len) = (region.start_addr().0, region.len());
        set_bits(words)
            .map(|i| (i * PAGE) as u64)
            .take_while(move |at| *at < len)
            .map(move |at| base + at)
    })
}

/// The offsets of the disk blocks set in `blocks`.
pub(in crate::migration) fn plan_blocks<'a>(
    disk: &TrackedDisk,
    blocks: &'a [u64],
) -> impl Iterator<Item = u64> + 'a {
    let count = disk.blocks();
    set_bits(blocks)
        .take_while(move |i| *i < count)
        .map(|i| (i * DISK_BLOCK) as u64)
}

/// The root disk as the migration reads it: its own descriptor on the image file.
pub(in crate::migration) struct TrackedDisk<'a> {
    block: &'a Mutex<Block>,
    pub(super) file: File,
    pub(super) size: u64,
}

impl<'a> TrackedDisk<'a> {
    pub(super) fn open(
        block: &'a Mutex<Block>,
        path: &std::path::Path,
    ) -> Result<Self, MigrationError> {
        let file = File::open(path).map_err(MigrationError::Disk)?;
        let size = block.lock().unwrap().size();
        Ok(TrackedDisk { block, file, size })
    }

    fn blocks(&self) -> usize {
        self.size.div_ceil(DISK_BLOCK as u64) as usize
    }

    /// The blocks the image file holds data in, as a bitmap: holes read as zeros, which the
    /// target has already, so a mostly empty disk costs what it holds, not its size.
    pub(super) fn blocks_with_data(&self) -> Vec<u64> {
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
pub(super) struct Tracking<'a> {
    vm: &'a Vm,
    pub(super) disk: Option<&'a TrackedDisk<'a>>,
    disk_log: Arc<AtomicBitmap>,
}

impl<'a> Tracking<'a> {
    pub(super) fn start(
        vm: &'a Vm,
        disk: Option<&'a TrackedDisk<'a>>,
    ) -> Result<Self, MigrationError> {
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
    pub(super) fn take(&self) -> Result<Plan, MigrationError> {
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
