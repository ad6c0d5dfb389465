//! Direct boot of a Linux bzImage: the kernel, its initramfs and command line are placed in
//! guest memory, the zero page describes them and the memory map, and the boot vCPU starts at
//! the kernel's 64-bit entry point with identity-mapped page tables ([`long_mode`]).

pub mod long_mode;

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START,
    HIGH_RAM_START, RESET_VECTOR, ZERO_PAGE_START,
};
use crate::memory::{low_ram_end, GuestMemory};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use std::fs::File;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point sits this far past the start of the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the kernel is not a bootable bzImage: {0}")]
    Kernel(linux_loader::loader::Error),
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    LoadCmdline(linux_loader::loader::Error),
    #[error("the initramfs ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig { size: u64, limit: u64 },
    #[error("cannot read the initramfs: {0}")]
    Initrd(String),
    #[error("cannot write the reset vector stub: {0}")]
    ResetVector(vm_memory::GuestMemoryError),
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub zero_page: GuestAddress,
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the zero page.
pub fn load(
    mem: &GuestMemory,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(BootError::Kernel)?;
    let mut header = loaded.setup_header.ok_or(BootError::Kernel(
        linux_loader::loader::Error::InvalidKernelStartAddress,
    ))?;

    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    line.insert_str(cmdline).map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &line)
        .map_err(BootError::LoadCmdline)?;

    header.type_of_loader = KERNEL_LOADER_OTHER;
    header.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    header.header = KERNEL_HDR_MAGIC;
    header.cmd_line_ptr = CMDLINE_START as u32;
    header.cmdline_size = cmdline.len() as u32 + 1;
    header.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    if let Some(initrd) = initrd {
        let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;
        let (addr, size) = load_initrd(mem, initrd, header.initrd_addr_max as u64, kernel_end)?;
        header.ramdisk_image = addr as u32;
        header.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: ACPI_START,
        ..Default::default()
    };
    for (i, entry) in e820_map(mem).iter().enumerate() {
        params.e820_table[i] = *entry;
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)?;

    mem.write_slice(&reset_vector_stub(), GuestAddress(RESET_VECTOR))
        .map_err(BootError::ResetVector)?;

    Ok(BootEntry {
        entry: GuestAddress(loaded.kernel_load.0 + STARTUP_64_OFFSET),
        zero_page: GuestAddress(ZERO_PAGE_START),
    })
}

/// Real-mode code at the reset vector that writes the ACPI reset register: `mov al, value;
/// mov dx, port; out dx, al; hlt; jmp $-1`. Linux on hardware-reduced ACPI without EFI reboots
/// by jumping to the reset vector ("BIOS reboot"); with no firmware there, this stub turns that
/// jump into a reset the VMM sees.
fn reset_vector_stub() -> [u8; 9] {
    let [lo, hi] = ACPI_RESET_PORT.to_le_bytes();
    [0xb0, ACPI_RESET_VALUE, 0xba, lo, hi, 0xee, 0xf4, 0xeb, 0xfd]
}

/// Puts the initramfs as high as the kernel allows, page aligned, above the kernel image.
fn load_initrd(
    mem: &GuestMemory,
    initrd: &mut File,
    initrd_addr_max: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd
        .metadata()
        .map_err(|e| BootError::Initrd(e.to_string()))?
        .len();
    let limit = low_ram_end(mem).min(initrd_addr_max.saturating_add(1));
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooBig { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|e| BootError::Initrd(e.to_string()))?;
    Ok((addr, size))
}

/// The memory map the guest sees: low RAM, the reserved BIOS area (holding the ACPI tables),
/// and every RAM region above 1 MiB.
fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIGH_RAM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use crate::memory;

    #[test]
    fn e820_has_a_hole_for_mmio_above_3g() {
        let mem = memory::create(4 << 30).unwrap();
        let map = e820_map(&mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let mem = memory::create(64 << 20).unwrap();
        let mut f = tempfile_with(&[0x42; 8192]);
        assert!(matches!(
            load(&mem, &mut f, None, "console=ttyS0"),
            Err(BootError::Kernel(_))
        ));
    }

    fn tempfile_with(data: &[u8]) -> File {
        use std::io::{Seek, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f.rewind().unwrap();
        f
    }
}
