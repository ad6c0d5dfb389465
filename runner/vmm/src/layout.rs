//! The guest physical address map. Every fixed address the VMM places something at lives here,
//! so that the boot code, the ACPI tables and the device buses agree.

/// GDT for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) for the boot vCPU.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot protocol "zero page" (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPTE and PDE for the first GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of conventional memory; the EBDA and BIOS area above it are reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first), inside the reserved BIOS area where Linux also scans for them.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// The x86 reset vector (real mode F000:FFF0), where firmware would start after a reset.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Where the kernel's protected-mode part is loaded and where "high memory" begins.
pub const HIGH_RAM_START: u64 = 0x100000;

/// The 32-bit MMIO hole under 4 GiB: device registers, IOAPIC and LAPIC live here, so guest RAM
/// above 3 GiB continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Legacy I/O ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ACPI hardware-reduced sleep control/status and reset registers (named in the FADT).
pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_PM_LEN: u16 = 8;
pub const ACPI_SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
pub const ACPI_SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
pub const ACPI_RESET_PORT: u16 = ACPI_PM_PORT + 4;
pub const ACPI_RESET_VALUE: u8 = 0x42;

/// Interrupt lines (IOAPIC pins = GSIs). The serial port keeps its ISA line; virtio devices
/// take the lines after it.
pub const SERIAL_GSI: u32 = 4;
pub const FIRST_VIRTIO_GSI: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

/// Largest number of vCPUs: APIC IDs are 8 bits in the xAPIC MADT entries used here.
pub const MAX_VCPUS: u8 = 254;
