//! CPUID as the guest sees it: what KVM supports, with the topology rewritten per vCPU (APIC
//! IDs, logical processor counts) and the hypervisor bit set, so that every vCPU describes the
//! same consistent machine.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_CLFLUSH_SHIFT: u32 = 8;
const EDX_HTT: u32 = 1 << 28;
/// Extended topology level types (ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Adds to KVM's supported set the features KVM emulates but leaves to the VMM to announce.
/// The TSC-deadline timer is one: without it the guest programs its LAPIC timer through the
/// initial-count register instead, a path that (besides being slower) brought down nested test
/// hosts, while guests with the deadline timer, as QEMU and Firecracker configure them, run fine.
pub fn add_emulated(cpuid: &mut CpuId, tsc_deadline_timer: bool) {
    if !tsc_deadline_timer {
        return;
    }
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `id` of `count`: each vCPU is one core of a
/// single socket, without SMT siblings.
pub fn normalize(cpuid: &mut CpuId, id: u8, count: u8) {
    let core_bits = u32::BITS - (count as u32).saturating_sub(1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, id as u32, count as u32, core_bits);
    }
}

fn normalize_entry(e: &mut kvm_cpuid_entry2, id: u32, count: u32, core_bits: u32) {
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (id << EBX_APIC_ID_SHIFT)
                | (count << EBX_LOGICAL_COUNT_SHIFT)
                | (8 << EBX_CLFLUSH_SHIFT);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
            e.edx = id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_EXT_APIC_ID => {
            e.eax = id;
            e.ebx = id; // compute unit = core, one thread each
            e.ecx = 0;
        }
        LEAF_AMD_SIZE_IDS => {
            e.ecx = (core_bits << 12) | (count - 1);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn tsc_deadline_is_announced_only_when_kvm_emulates_it() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        add_emulated(&mut cpuid, false);
        assert_eq!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        add_emulated(&mut cpuid, true);
        assert_ne!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        normalize(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
    }
}
