//! The KVM VM object: in-kernel interrupt controllers and PIT, guest memory slots, and
//! interrupt lines (irqfds) for devices.

use crate::cpuid;
use crate::layout::IOAPIC_PINS;
use crate::memory::{self, GuestMemory, MemoryError};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, CpuId, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Lowest host TSS address (three pages) KVM needs on Intel hosts; harmless elsewhere.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability Hopper needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM call {call} failed: {source}")]
    Kvm {
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("interrupt line {0} is out of range")]
    BadGsi(u32),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
}

fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { call, source }
}

/// The VM-wide state KVM keeps in the kernel: the PIT, the clock and the interrupt
/// controllers (PIC master, PIC slave, IOAPIC, in that order).
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub irqchips: [kvm_irqchip; 3],
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// The CPUID every vCPU of a VM on `kvm` starts from: what KVM supports, plus what it
/// emulates on request. Needs no VM, so a restore can check it before creating one.
pub fn supported_cpuid(kvm_sys: &Kvm) -> Result<CpuId, VmError> {
    let mut cpuid = kvm_sys
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm_sys.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    cpuid::add_emulated(&mut cpuid, tsc_deadline);
    Ok(cpuid)
}

/// A created VM with its memory; vCPUs are created from it.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub memory: GuestMemory,
}

impl Vm {
    pub fn new(memory: GuestMemory) -> Result<Self, VmError> {
        let kvm_sys = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm_sys.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "in-kernel irqchip"),
            (kvm_ioctls::Cap::Irqfd, "irqfd"),
            (kvm_ioctls::Cap::Ioeventfd, "ioeventfd"),
            (kvm_ioctls::Cap::UserMemory, "user memory"),
            (kvm_ioctls::Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm_sys.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
        memory::register(&fd, &memory, 0)?;
        Ok(Vm {
            kvm: kvm_sys,
            fd: Arc::new(fd),
            memory,
        })
    }

    /// The CPUID every vCPU starts from: what KVM supports, plus what it emulates on request.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        supported_cpuid(&self.kvm)
    }

    /// Reads the VM-wide state; the vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let pit = self.fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let mut irqchips = IRQCHIPS.map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut irqchips {
            self.fd.get_irqchip(chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        }
        Ok(VmState {
            pit,
            clock,
            irqchips,
        })
    }

    /// Puts `state` into this VM. The clock goes first, before any vCPU runs; with the wall
    /// time it was saved at, KVM advances it by the time that has passed since.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            flags: state.clock.flags & KVM_CLOCK_REALTIME,
            ..state.clock
        };
        self.fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        self.fd.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
        for chip in &state.irqchips {
            self.fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    /// Turns KVM's dirty page logging of guest memory on or off (for live migration).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        Ok(memory::register(&self.fd, &self.memory, flags)?)
    }

    /// The pages written since the last call (or since logging was turned on), per RAM
    /// region: by the vCPUs (KVM's log) or by the VMM's devices (the regions' own bitmaps).
    /// Both logs are cleared. One bit per 4 KiB page.
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>, VmError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let mut pages = self
                    .fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
                for (word, device) in pages
                    .iter_mut()
                    .zip(std::ops::Deref::deref(region).bitmap().take())
                {
                    *word |= device;
                }
                Ok(pages)
            })
            .collect()
    }

    /// An eventfd that raises interrupt line `gsi` when written.
    pub fn irq_line(&self, gsi: u32) -> Result<EventFd, VmError> {
        if gsi >= IOAPIC_PINS {
            return Err(VmError::BadGsi(gsi));
        }
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(kvm("KVM_IRQFD"))?;
        Ok(evt)
    }
}
