//! vCPU and VM state survive a save → serialize → restore into a new VM → save round trip.
//! Only KVM's state calls are exercised (no guest code runs), which this machine's own
//! /dev/kvm supports even though it cannot boot Linux.

use hopper_vmm::boot::BootEntry;
use hopper_vmm::memory;
use hopper_vmm::vcpu::state::{msrs_to_save, VcpuState};
use hopper_vmm::vcpu::Vcpu;
use hopper_vmm::vm::{Vm, VmState};
use vm_memory::GuestAddress;

fn new_vm() -> Vm {
    Vm::new(memory::create(64 << 20).unwrap()).expect("/dev/kvm is usable")
}

#[test]
fn vcpu_and_vm_state_round_trip_through_serde() {
    let vm = new_vm();
    let supported = vm
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let boot = BootEntry {
        entry: GuestAddress(0x100200),
        zero_page: GuestAddress(0x7000),
    };
    let vcpu = Vcpu::new(&vm.fd, 0).unwrap();
    vcpu.configure(&supported, 1, Some(&boot)).unwrap();
    let msrs = msrs_to_save(&vm.kvm).unwrap();
    assert!(!msrs.is_empty());

    let saved_vm = vm.save_state().unwrap();
    let saved = vcpu.save_state(&vm.kvm, &msrs).unwrap();
    let wire = serde_json::to_string(&(&saved_vm, &saved)).unwrap();
    let (vm_state, vcpu_state): (VmState, VcpuState) = serde_json::from_str(&wire).unwrap();

    let vm2 = new_vm();
    vm2.restore_state(&vm_state).unwrap();
    let vcpu2 = Vcpu::new(&vm2.fd, 0).unwrap();
    vcpu2.restore_state(&vm2.kvm, &vcpu_state).unwrap();
    let again = vcpu2.save_state(&vm2.kvm, &msrs).unwrap();

    assert_eq!(again.regs.rip, 0x100200);
    assert_eq!(again.regs.rsi, 0x7000);
    assert_eq!(
        (
            again.sregs.cr0,
            again.sregs.cr3,
            again.sregs.cr4,
            again.sregs.efer
        ),
        (
            saved.sregs.cr0,
            saved.sregs.cr3,
            saved.sregs.cr4,
            saved.sregs.efer
        )
    );
    assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
    assert_eq!(again.mp_state.mp_state, saved.mp_state.mp_state);
    assert_eq!(again.xcrs.xcrs[0].value, saved.xcrs.xcrs[0].value);
    for (a, b) in again.msrs.iter().zip(&saved.msrs) {
        assert_eq!(a.index, b.index);
        // The TSC keeps counting; everything else must come back as it was.
        if a.index != 0x10 && a.index != 0x6e0 {
            assert_eq!(a.data, b.data, "MSR {:#x}", a.index);
        }
    }
    let again_vm = vm2.save_state().unwrap();
    assert_eq!(again_vm.irqchips[2].chip_id, saved_vm.irqchips[2].chip_id);
    // The clock does not go backwards across the move.
    assert!(again_vm.clock.clock >= saved_vm.clock.clock);
}

#[test]
fn state_of_another_vcpu_is_refused() {
    let vm = new_vm();
    let supported = vm
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let vcpu0 = Vcpu::new(&vm.fd, 0).unwrap();
    vcpu0.configure(&supported, 2, None).unwrap();
    let msrs = msrs_to_save(&vm.kvm).unwrap();
    let state = vcpu0.save_state(&vm.kvm, &msrs).unwrap();
    let vcpu1 = Vcpu::new(&vm.fd, 1).unwrap();
    assert!(vcpu1.restore_state(&vm.kvm, &state).is_err());
}
