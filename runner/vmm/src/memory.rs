//! Guest RAM: anonymous mappings around the MMIO gap, with a dirty bitmap that records every
//! write the VMM itself makes (KVM's dirty log only sees vCPU writes).

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub type GuestMemory = GuestMemoryMmap<RamBitmap>;

/// Guest RAM starts on a huge-page boundary in the VMM's address space. KVM maps guest memory
/// with huge pages only where guest and host addresses are congruent modulo the huge page
/// size; an unaligned mapping (what a plain mmap gives) costs a nested page fault per 4 KiB
/// the guest first touches instead of one per 2 MiB.
const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        size_mib: u64,
        source: std::io::Error,
    },
    #[error("cannot lay out guest memory: {0}")]
    Layout(String),
    #[error("KVM refused memory slot {slot}: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges for `size` bytes: below the MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// Maps `size` bytes of zeroed guest RAM.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let map_err = |source| MemoryError::Map {
        size_mib: size >> 20,
        source,
    };
    let regions = ram_ranges(size)
        .into_iter()
        .map(|(base, len)| Ok((base, Mapping::new(len, Backing::Zeroed).map_err(map_err)?)))
        .collect::<Result<Vec<_>, MemoryError>>()?;
    assemble(regions)
}

/// Guest RAM whose regions are private mappings of `file` at the given offsets: pages are read
/// from the file when the guest first touches them, and the guest's writes stay private.
pub fn from_file(
    file: &File,
    regions: &[(GuestAddress, usize, u64)],
) -> Result<GuestMemory, MemoryError> {
    // The mappings keep their own handle: which pages hold data is asked of the file later.
    let file = Arc::new(file.try_clone().map_err(|source| MemoryError::Map {
        size_mib: regions.iter().map(|r| r.1 as u64).sum::<u64>() >> 20,
        source,
    })?);
    let mapped = regions
        .iter()
        .map(|&(base, len, offset)| {
            let backing = Backing::File {
                file: file.clone(),
                offset,
            };
            let mapping = Mapping::new(len, backing).map_err(|source| MemoryError::Map {
                size_mib: len as u64 >> 20,
                source,
            })?;
            Ok((base, mapping))
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    assemble(mapped)
}

fn assemble(regions: Vec<(GuestAddress, Mapping)>) -> Result<GuestMemory, MemoryError> {
    let mut built = Vec::new();
    for (base, mapping) in regions {
        let (addr, len) = (mapping.addr, mapping.len);
        let bitmap = RamBitmap {
            dirty: AtomicBitmap::with_len(len),
            mapping: Arc::new(mapping),
        };
        // SAFETY: `addr` is a live private mapping of exactly `len` bytes, and the region's
        // bitmap keeps it alive for as long as the region exists.
        let region = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(Mapping::FLAGS)
                .with_raw_mmap_pointer(addr)
        }
        .build()
        .map_err(|e| MemoryError::Layout(e.to_string()))?;
        built.push(
            GuestRegionMmap::new(region, base)
                .ok_or_else(|| MemoryError::Layout(format!("region at {base:?} overflows")))?,
        );
    }
    GuestMemory::from_regions(built).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// What a [`Mapping`] holds when created.
#[derive(Debug)]
enum Backing {
    /// Anonymous memory, zeroed, eligible for transparent huge pages.
    Zeroed,
    /// A private (copy-on-write) view of a file from `offset` on.
    File { file: Arc<File>, offset: u64 },
}

/// One private mapping aligned to [`HUGE_PAGE`]; unmapped when dropped.
#[derive(Debug)]
struct Mapping {
    addr: *mut u8,
    len: usize,
    backing: Backing,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through vm-memory's
// volatile accessors, which are safe to use from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself only holds the address for munmap.
unsafe impl Sync for Mapping {}

impl Mapping {
    const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

    fn new(len: usize, backing: Backing) -> std::io::Result<Mapping> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let reserve = len + HUGE_PAGE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; nothing
        // else is affected.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, Self::FLAGS, -1, 0) };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (aligned - start, start + reserve - (aligned + len));
        // SAFETY: both ranges lie inside the reservation just made and outside the part kept;
        // a zero length is skipped.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let mapping = Mapping {
            addr: aligned as *mut u8,
            len,
            backing,
        };
        match &mapping.backing {
            Backing::Zeroed => {
                // SAFETY: advice on the range this value owns. Only advice: without
                // transparent huge pages the guest still runs, on 4 KiB pages.
                unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
            }
            Backing::File { file, offset } => {
                // SAFETY: MAP_FIXED replaces exactly the range this value owns (so nothing
                // else can be clobbered) with a private view of the caller's open file.
                let mapped = unsafe {
                    libc::mmap(
                        aligned as *mut libc::c_void,
                        len,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        file.as_raw_fd(),
                        *offset as libc::off_t,
                    )
                };
                if mapped == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(mapping)
    }

    /// Which pages may hold something other than zeros: those this process holds (in memory
    /// or swapped out) and, in a view of a file, those the file has data for. The file
    /// matters for a restored guest: a page it has not touched since is only in the file,
    /// maybe not even in the page cache, so residency alone (`mincore`) would miss it.
    /// Where the kernel cannot tell, every page is named: slower, same result.
    fn pages_in_use(&self) -> Vec<bool> {
        let mut used = self
            .held_pages()
            .unwrap_or_else(|_| vec![true; self.len / PAGE]);
        if let Backing::File { file, offset } = &self.backing {
            let end = offset + self.len as u64;
            let extents = crate::extents::data_extents(file, *offset, end);
            let extents = extents.unwrap_or_else(|_| vec![(*offset, end)]);
            for (data, hole) in extents {
                let first = (data - offset) as usize / PAGE;
                let last = ((hole - offset) as usize).div_ceil(PAGE);
                used[first..last].fill(true);
            }
        }
        used
    }

    /// The pages present or swapped out in this process, from /proc/self/pagemap (one
    /// 64-bit entry per page: bit 63 present, bit 62 swapped).
    fn held_pages(&self) -> std::io::Result<Vec<bool>> {
        const HELD: u64 = 3 << 62;
        const CHUNK: usize = 1 << 15;
        let pagemap = File::open("/proc/self/pagemap")?;
        let (first, pages) = (self.addr as usize / PAGE, self.len / PAGE);
        let mut held = Vec::with_capacity(pages);
        let mut entries = vec![0u8; CHUNK * 8];
        for start in (0..pages).step_by(CHUNK) {
            let entries = &mut entries[..CHUNK.min(pages - start) * 8];
            pagemap.read_exact_at(entries, ((first + start) * 8) as u64)?;
            held.extend(
                entries
                    .chunks_exact(8)
                    .map(|e| u64::from_ne_bytes(e.try_into().expect("8-byte chunks")) & HELD != 0),
            );
        }
        Ok(held)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is the mapping made in `new`; its last user (the region's bitmap)
        // is being dropped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The dirty bitmap of one RAM region (vm-memory's [`AtomicBitmap`]), which also owns the
/// region's mapping: vm-memory does not unmap memory it did not map, and a region's bitmap
/// lives exactly as long as the region.
#[derive(Debug)]
pub struct RamBitmap {
    dirty: AtomicBitmap,
    mapping: Arc<Mapping>,
}

impl RamBitmap {
    /// The pages written since the last call, one bit per 4 KiB page (bit `i % 64` of word
    /// `i / 64`, as KVM's dirty log), clearing them.
    pub fn take(&self) -> Vec<u64> {
        self.dirty.get_and_reset()
    }
}

impl<'a> WithBitmapSlice<'a> for RamBitmap {
    type S = <AtomicBitmap as WithBitmapSlice<'a>>::S;
}

impl Bitmap for RamBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty.mark_dirty(offset, len)
    }
    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty.dirty_at(offset)
    }
    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.dirty.slice_at(offset)
    }
}

/// Which pages of `region` may hold something other than zeros, one flag per 4 KiB page;
/// the others need not be read.
pub fn pages_in_use(region: &GuestRegionMmap<RamBitmap>) -> Vec<bool> {
    std::ops::Deref::deref(region)
        .bitmap()
        .mapping
        .pages_in_use()
}

/// Hands every RAM region to KVM as its own slot; `flags` can ask for dirty logging.
pub fn register(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's own start address is mapped");
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `host` is owned by `mem`, which the VM keeps alive for as
        // long as the VM file descriptor exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// Top of the RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_huge_page_aligned_and_tracks_device_writes() {
        use vm_memory::Bytes;
        let mem = create(6 << 20).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0);
        mem.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x9000));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0xab);
    }

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
