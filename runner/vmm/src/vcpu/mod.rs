//! vCPUs: their initial architectural state ([`Vcpu::configure`]) and the thread that runs
//! each one ([`run`]), with the pause/resume handshake the control API and snapshots use.

pub mod control;
pub mod run;
pub mod state;

use crate::boot::{long_mode, BootEntry};
use crate::cpuid;
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs on, default memory type write-back: without it the guest maps RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// LAPIC register offsets and delivery modes for the local interrupt pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Stack of the VMM's own threads (vCPUs, devices). Far more than they use, and below the
/// 2 MiB of a huge page: a default 2 MiB stack that happens to be aligned (as the next mapping
/// below the aligned guest RAM is) gets a whole huge page where THP is "always".
pub const THREAD_STACK: usize = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: KVM call {call} failed: {source}")]
    Kvm {
        id: u8,
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {total} MSRs")]
    Msrs { id: u8, set: usize, total: usize },
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(id as u64).map_err(|source| VcpuError::Kvm {
            id,
            call: "KVM_CREATE_VCPU",
            source,
        })?;
        Ok(Vcpu { id, fd })
    }

    pub(crate) fn kvm(&self, call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, call, source }
    }

    /// Sets the state of a freshly created vCPU. Only the boot vCPU gets `boot`; the others
    /// wait for the guest's INIT/SIPI in the in-kernel LAPIC.
    /// The CPUID the guest sees.
    pub fn cpuid(&self) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, VcpuError> {
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VcpuError::Kvm {
                id: self.id,
                call: "KVM_GET_CPUID2",
                source,
            })?;
        Ok(cpuid.as_slice().to_vec())
    }

    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        count: u8,
        boot: Option<&BootEntry>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, self.id, count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm("KVM_SET_CPUID2"))?;
        self.set_boot_msrs()?;
        self.set_lint()?;
        self.fd
            .set_fpu(&long_mode::fpu())
            .map_err(self.kvm("KVM_SET_FPU"))?;
        if let Some(boot) = boot {
            let sregs = self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&long_mode::sregs(sregs))
                .map_err(self.kvm("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&long_mode::regs(boot))
                .map_err(self.kvm("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_IA32_SYSENTER_ESP, 0),
            entry(MSR_IA32_SYSENTER_EIP, 0),
            entry(MSR_STAR, 0),
            entry(MSR_CSTAR, 0),
            entry(MSR_KERNEL_GS_BASE, 0),
            entry(MSR_SYSCALL_MASK, 0),
            entry(MSR_LSTAR, 0),
            entry(MSR_IA32_TSC, 0),
            entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
        ];
        let msrs = Msrs::from_entries(&entries).expect("a fixed, small MSR list");
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                total: entries.len(),
            });
        }
        Ok(())
    }

    /// Wires LINT0 to the legacy PIC (ExtINT) and LINT1 to NMI, as firmware would.
    fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: &mut [i8] = &mut lapic.regs[reg..reg + 4];
            let mut v = [0u8; 4];
            for (d, s) in v.iter_mut().zip(bytes.iter()) {
                *d = *s as u8;
            }
            let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
            for (d, s) in bytes.iter_mut().zip(value.to_le_bytes()) {
                *d = s as i8;
            }
        }
        self.fd.set_lapic(&lapic).map_err(self.kvm("KVM_SET_LAPIC"))
    }
}
