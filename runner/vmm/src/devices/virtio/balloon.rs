//! virtio-balloon for free page reporting only. The guest hands back runs of memory its
//! allocator has kept free for a while (2 MiB and up), and the VMM drops them
//! (`MADV_DONTNEED`): they then cost the host no memory, and a snapshot or a migration
//! neither reads nor sends them (what is not resident starts as zeros on the other side).
//! The balloon itself never inflates: its target size stays zero.

use super::{read_config_bytes, Interrupt, VirtioCommon, VirtioDevice, QUEUE_SIZE, TYPE_BALLOON};
use crate::memory::GuestMemory;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// The guest reports free pages on a queue of their own.
const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Without statistics or free page hinting, the reporting queue comes after the inflate and
/// deflate queues (which stay idle: the target size never changes).
const REPORTING_QUEUE: usize = 2;
const PAGE: u64 = 4096;

/// Whether reported pages may be dropped now, shared by the balloon and whatever needs guest
/// memory left as it is for a while (a post-copy filling it behind the guest's back, where a
/// dropped page would look missing).
#[derive(Clone, Default)]
pub struct FreePageDrops(Arc<AtomicBool>);

impl FreePageDrops {
    /// Reported pages stay until [`Self::resume`].
    pub fn hold(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.0.store(false, Ordering::Release);
    }

    fn held(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pub struct Balloon {
    common: VirtioCommon,
    drops: FreePageDrops,
}

impl Balloon {
    pub fn new(
        drops: FreePageDrops,
        interrupt: Interrupt,
        mem: GuestMemory,
    ) -> std::io::Result<Self> {
        Ok(Balloon {
            common: VirtioCommon::new(
                TYPE_BALLOON,
                VIRTIO_BALLOON_F_REPORTING,
                &[QUEUE_SIZE; 3],
                interrupt,
                mem,
            )?,
            drops,
        })
    }

    /// Drops every range in the reports the guest posted, then hands the reports back (the
    /// guest waits for that before it reuses the pages).
    fn take_reports(&mut self) {
        let mem = self.common.mem.clone();
        while let Some(chain) = self.common.queues[REPORTING_QUEUE].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            if !self.drops.held() {
                for range in chain {
                    drop_range(&mem, range.addr(), range.len() as u64);
                }
            }
            self.common.complete(REPORTING_QUEUE, head, 0);
        }
    }
}

/// Drops the guest's pages in `len` bytes at `at`, and marks them written: the next
/// migration round sends them as the zeros they now are, so both sides stay equal.
fn drop_range(mem: &GuestMemory, at: GuestAddress, len: u64) {
    if !at.0.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        log::warn!(
            "virtio-balloon: an unaligned report ({len:#x} bytes at {:#x})",
            at.0
        );
        return;
    }
    let slice = match mem.get_slice(at, len as usize) {
        Ok(slice) => slice,
        Err(e) => {
            log::warn!(
                "virtio-balloon: a report outside memory ({len:#x} bytes at {:#x}): {e}",
                at.0
            );
            return;
        }
    };
    let guard = slice.ptr_guard_mut();
    // SAFETY: the range is page-aligned and lies within one guest memory mapping (get_slice
    // checked it); the guest gave these pages up, and dropping them only makes them read as
    // zeros, which no VMM structure relies on.
    let dropped =
        unsafe { libc::madvise(guard.as_ptr().cast(), len as usize, libc::MADV_DONTNEED) };
    if dropped != 0 {
        log::warn!(
            "virtio-balloon: cannot drop {len:#x} bytes at {:#x}: {}",
            at.0,
            std::io::Error::last_os_error()
        );
        return;
    }
    slice.bitmap().mark_dirty(0, len as usize);
}

impl VirtioDevice for Balloon {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages (the target, in 4 KiB pages) and actual: both zero.
        read_config_bytes(&[0u8; 8], offset, data);
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queues(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.common.take_queue_event(&events) == Some(REPORTING_QUEUE) && self.common.activated {
            self.take_reports();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EventFd;

    const MIB: u64 = 1 << 20;
    /// The report: two runs of 2 MiB, at 4 and 8 MiB.
    const RUNS: [(u64, u64); 2] = [(4 * MIB, 2 * MIB), (8 * MIB, 2 * MIB)];

    struct Outcome {
        /// Whether the reported runs read as zeros afterwards.
        zeroed: bool,
        /// Whether every page of them is marked written.
        marked: bool,
        /// Reports handed back to the guest.
        returned: u16,
    }

    /// Fills the runs, has the guest report them on the reporting queue, and lets the
    /// balloon take the report.
    fn report(drops: FreePageDrops) -> Outcome {
        let mem = crate::memory::create(16 * MIB).unwrap();
        for (at, len) in RUNS {
            mem.write_slice(&vec![0xa5; len as usize], GuestAddress(at))
                .unwrap();
        }
        // Forget the fill: only what the balloon marks counts.
        // The region's own bitmap (RamBitmap), not the slice view GuestMemoryRegion gives.
        let written_since = || {
            std::ops::Deref::deref(mem.iter().next().unwrap())
                .bitmap()
                .take()
        };
        written_since();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut balloon = Balloon::new(drops, interrupt, mem.clone()).unwrap();
        let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
        balloon.common.queues[REPORTING_QUEUE] = queue.create_queue().unwrap();
        balloon.common.activated = true;
        let write = VRING_DESC_F_WRITE as u16;
        let chain = [
            SplitDescriptor::new(
                RUNS[0].0,
                RUNS[0].1 as u32,
                write | VRING_DESC_F_NEXT as u16,
                1,
            ),
            SplitDescriptor::new(RUNS[1].0, RUNS[1].1 as u32, write, 0),
        ]
        .map(RawDescriptor::from);
        queue.add_desc_chains(&chain, 0).unwrap();

        balloon.take_reports();

        let zeroed = RUNS.iter().all(|&(at, len)| {
            let mut data = vec![1u8; len as usize];
            mem.read_slice(&mut data, GuestAddress(at)).unwrap();
            data.iter().all(|b| *b == 0)
        });
        let written = written_since();
        let page = |i: u64| written[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let marked = RUNS
            .iter()
            .all(|&(at, len)| (at / PAGE..(at + len) / PAGE).all(page));
        Outcome {
            zeroed,
            marked,
            returned: queue.used().idx().load(),
        }
    }

    #[test]
    fn reported_runs_are_dropped_marked_written_and_handed_back() {
        let out = report(FreePageDrops::default());
        assert!(out.zeroed, "the reported memory still holds its data");
        assert!(out.marked, "the dropped pages are not marked written");
        assert_eq!(out.returned, 1);
    }

    #[test]
    fn held_drops_leave_memory_as_it_is_but_still_hand_the_report_back() {
        let drops = FreePageDrops::default();
        drops.hold();
        let out = report(drops);
        assert!(!out.zeroed && !out.marked, "a held drop touched memory");
        assert_eq!(
            out.returned, 1,
            "the guest would wait for its report forever"
        );
    }
}
