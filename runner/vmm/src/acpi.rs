//! ACPI tables that let a stock distribution kernel find the machine: the vCPUs and IOAPIC
//! (MADT), the virtio-mmio devices as `LNRO0005` nodes (DSDT; the kernel's virtio_mmio driver
//! binds to them without command-line device lists), and hardware-reduced power and reset
//! registers (FADT) so that the guest's default poweroff and reboot reach the VMM.

use crate::layout::{
    ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    ACPI_START, IOAPIC_START, LAPIC_START, SERIAL_GSI, SERIAL_PORT, SERIAL_PORT_LEN,
};
use crate::memory::GuestMemory;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

const OEM_ID: [u8; 6] = *b"HOPPER";
const OEM_TABLE_ID: [u8; 8] = *b"HOPPERVM";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC (the clock comes from kvmclock).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// The sleep type the DSDT's \_S5_ object announces, written back by the guest on poweroff.
pub const S5_SLEEP_TYPE: u8 = 5;

/// A virtio-mmio device as the guest must see it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) overflow the BIOS area")]
    TooLarge(u64),
    #[error("cannot write ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    // AML objects borrow their children, so each layer is collected before the next.
    let mems: Vec<_> = devices
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.base as u32, d.len as u32))
        .collect();
    let irqs: Vec<_> = devices
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.gsi))
        .collect();
    let templates: Vec<_> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let names: Vec<[aml::Name; 3]> = templates
        .iter()
        .enumerate()
        .map(|(i, crs)| {
            [
                aml::Name::new("_HID".into(), &"LNRO0005"),
                aml::Name::new("_UID".into(), &(i as u32)),
                aml::Name::new("_CRS".into(), crs),
            ]
        })
        .collect();
    let nodes: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, [hid, uid, crs])| {
            aml::Device::new(format!("V{i:03}").as_str().into(), vec![hid, uid, crs])
        })
        .collect();
    // COM1 must be described too: hardware-reduced ACPI disables the legacy PIC, and with it
    // Linux's implicit ISA interrupt mappings, so the serial port gets its line from here.
    let com1_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, SERIAL_PORT_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(nodes.iter().map(|n| n as &dyn Aml));
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE]);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&to_bytes(&aml::Scope::new("_SB_".into(), children)));
    sdt.append_slice(&to_bytes(&aml::Name::new("_S5_".into(), &s5)));
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port as u64,
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_byte(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"HOPPERVM").into();
    to_bytes(&fadt.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    to_bytes(&madt)
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT at [`ACPI_START`].
pub fn write_tables(
    mem: &GuestMemory,
    cpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<(), AcpiError> {
    let align = |addr: u64| (addr + 15) & !15;
    let xsdt_addr = align(ACPI_START + Rsdp::len() as u64);
    // The XSDT has two entries; compute its size before placing what follows it.
    let xsdt_len = 36 + 2 * 8;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let dsdt = dsdt(devices);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    mem.write_slice(
        &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(ACPI_START),
    )?;
    for (addr, table) in [
        (xsdt_addr, &xsdt),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_link_up() {
        let mem = memory::create(64 << 20).unwrap();
        let dev = MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        };
        write_tables(&mem, 2, &[dev, dev]).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut head = [0u8; 8];
            mem.read_slice(&mut head, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "bad checksum in {:?}", &head[..4]);
            t
        };
        let xsdt = read_table(xsdt_addr);
        let sigs: Vec<Vec<u8>> = xsdt[36..]
            .chunks(8)
            .map(|c| read_table(u64::from_le_bytes(c.try_into().unwrap()))[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn dsdt_names_each_device() {
        let devs: Vec<_> = (0..3)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let d = dsdt(&devs);
        let count = d.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 3);
        assert!(d.windows(4).any(|w| w == b"_S5_"));
    }
}
