//! A vCPU's complete architectural state as KVM exposes it, in the orders that keep it
//! consistent (see shared/notes/vmm.md): saved MP state first and events last; restored CPUID
//! first, LAPIC after the special registers and before the MSRs, the TSC before its deadline,
//! events last. This is what snapshots and live migration carry per vCPU.

use super::{Vcpu, VcpuError};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Largest XSAVE area the legacy KVM_GET/SET_XSAVE calls carry (no AMX tile data).
const LEGACY_XSAVE_SIZE: i32 = 4096;

/// MSRs that hold guest state worth moving (the rest are read-only or derived by KVM).
fn msr_must_move(index: u32) -> bool {
    matches!(
        index,
        0x10 // TSC
            | 0x3b // TSC_ADJUST
            | 0x48 // SPEC_CTRL
            | 0x174..=0x176 // SYSENTER_CS/ESP/EIP
            | 0x1a0 // MISC_ENABLE
            | 0x200..=0x2ff // MTRRs and PAT
            | 0x6e0 // TSC_DEADLINE
            | 0x800..=0x8ff // x2APIC
            | 0xda0 // XSS
            | 0xc000_0080..=0xc000_0084 // EFER, STAR, LSTAR, CSTAR, SFMASK
            | 0xc000_0100..=0xc000_0103 // FS/GS/KERNEL_GS_BASE, TSC_AUX
            | 0x4b56_4d00..=0x4b56_4dff // KVM paravirtual: kvmclock, async PF, steal time, PV EOI
    )
}

/// The MSR indices this host's KVM reports and that carry guest state.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let list = kvm.get_msr_index_list()?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|i| msr_must_move(*i))
        .collect())
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub tsc_khz: u32,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(
        "vCPU {id}: the XSAVE area is {size} bytes (AMX?); only {LEGACY_XSAVE_SIZE} are supported"
    )]
    XsaveTooLarge { id: u8, size: i32 },
    #[error("vCPU {id}: KVM returned {got} of {wanted} MSRs")]
    Msrs { id: u8, got: usize, wanted: usize },
    #[error("saved state has {0} CPUID entries, more than KVM accepts")]
    Cpuid(usize),
    #[error("saved state belongs to vCPU {saved}, not vCPU {target}")]
    WrongVcpu { saved: u8, target: u8 },
}

impl Vcpu {
    fn check_xsave_size(&self, kvm: &Kvm) -> Result<(), StateError> {
        let size = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        if size > LEGACY_XSAVE_SIZE {
            return Err(StateError::XsaveTooLarge { id: self.id, size });
        }
        Ok(())
    }

    /// Reads the vCPU's state. The vCPU must not be running (paused, with in-flight exits
    /// completed).
    pub fn save_state(&self, kvm: &Kvm, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
        self.check_xsave_size(kvm)?;
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(self.kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(self.kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(self.kvm("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(self.kvm("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(self.kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().map_err(self.kvm("KVM_GET_TSC_KHZ"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm("KVM_GET_CPUID2"))?;
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Msrs {
            id: self.id,
            got: 0,
            wanted: entries.len(),
        })?;
        let got = fd.get_msrs(&mut msrs).map_err(self.kvm("KVM_GET_MSRS"))?;
        if got != entries.len() {
            return Err(StateError::Msrs {
                id: self.id,
                got,
                wanted: entries.len(),
            });
        }
        let events = fd
            .get_vcpu_events()
            .map_err(self.kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            tsc_khz,
            msrs: msrs.as_slice().to_vec(),
            events,
        })
    }

    /// Puts `state` into this (freshly created, never run) vCPU.
    pub fn restore_state(&self, kvm: &Kvm, state: &VcpuState) -> Result<(), StateError> {
        if state.id != self.id {
            return Err(StateError::WrongVcpu {
                saved: state.id,
                target: self.id,
            });
        }
        self.check_xsave_size(kvm)?;
        let fd = &self.fd;
        let cpuid =
            CpuId::from_entries(&state.cpuid).map_err(|_| StateError::Cpuid(state.cpuid.len()))?;
        fd.set_cpuid2(&cpuid).map_err(self.kvm("KVM_SET_CPUID2"))?;
        // The guest's clock runs at the saved rate even where the host's TSC differs.
        let host_khz = fd.get_tsc_khz().map_err(self.kvm("KVM_GET_TSC_KHZ"))?;
        if host_khz != state.tsc_khz {
            fd.set_tsc_khz(state.tsc_khz)
                .map_err(self.kvm("KVM_SET_TSC_KHZ"))?;
        }
        fd.set_mp_state(state.mp_state)
            .map_err(self.kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(self.kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs)
            .map_err(self.kvm("KVM_SET_SREGS"))?;
        // SAFETY: check_xsave_size made sure KVM's XSAVE area is the 4 KiB that kvm_xsave holds,
        // so the kernel reads nothing past the struct.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(self.kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(self.kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debug_regs)
            .map_err(self.kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic)
            .map_err(self.kvm("KVM_SET_LAPIC"))?;
        let msrs = restore_order(&state.msrs);
        let total = msrs.len();
        let msrs = Msrs::from_entries(&msrs).map_err(|_| StateError::Msrs {
            id: self.id,
            got: 0,
            wanted: total,
        })?;
        let set = fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
        if set != total {
            return Err(StateError::Msrs {
                id: self.id,
                got: set,
                wanted: total,
            });
        }
        fd.set_vcpu_events(&state.events)
            .map_err(self.kvm("KVM_SET_VCPU_EVENTS"))?;
        // Tells the guest's kvmclock that the vCPU was stopped, so its watchdogs do not fire;
        // hosts without kvmclock support answer EINVAL, which is harmless.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}

/// MSRs in the order KVM needs them: the TSC before the TSC deadline, and a zero deadline
/// (timer disarmed when saved) replaced by the TSC so that the timer fires at once instead of
/// never — a disarmed deadline with a pending timer interrupt would hang the guest.
fn restore_order(saved: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let tsc = saved
        .iter()
        .find(|e| e.index == MSR_IA32_TSC)
        .map(|e| e.data);
    let (mut deadline, mut rest): (Vec<_>, Vec<_>) = saved
        .iter()
        .copied()
        .partition(|e| e.index == MSR_IA32_TSC_DEADLINE);
    for d in &mut deadline {
        if d.data == 0 {
            d.data = tsc.unwrap_or(0);
        }
    }
    rest.extend(deadline);
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn deadline_goes_after_tsc_and_zero_becomes_tsc() {
        let out = restore_order(&[
            msr(MSR_IA32_TSC_DEADLINE, 0),
            msr(0x174, 1),
            msr(MSR_IA32_TSC, 777),
        ]);
        assert_eq!(out.last().unwrap().index, MSR_IA32_TSC_DEADLINE);
        assert_eq!(out.last().unwrap().data, 777);
        let out = restore_order(&[msr(MSR_IA32_TSC_DEADLINE, 5), msr(MSR_IA32_TSC, 777)]);
        assert_eq!(out.last().unwrap().data, 5);
    }

    #[test]
    fn only_state_carrying_msrs_move() {
        assert!(msr_must_move(0x4b56_4d01) && msr_must_move(0xc000_0080) && msr_must_move(0x802));
        assert!(!msr_must_move(0x17) && !msr_must_move(0xc001_0007));
    }
}
