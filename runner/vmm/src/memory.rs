//! Guest RAM: anonymous mappings around the MMIO gap, with a dirty bitmap that records every
//! write the VMM itself makes (KVM's dirty log only sees vCPU writes).

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        size_mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
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
    GuestMemory::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Map {
        size_mib: size >> 20,
        source,
    })
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
