//! The CPU state a 64-bit Linux entry point expects: long mode, paging with the first GiB
//! identity mapped, flat segments from a minimal GDT, and the zero page address in RSI.

use super::BootEntry;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use crate::memory::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_PS_2M: u64 = 0x80;

/// GDT entries: null, 64-bit code, data, TSS (what startup_64 reloads anyway).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(index: u8, entry: u64) -> kvm_segment {
    let bits = |shift: u32, width: u32| ((entry >> shift) & ((1 << width) - 1)) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32,
        selector: (index as u16) * 8,
        type_: bits(40, 4),
        present: bits(47, 1),
        dpl: bits(45, 2),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g: bits(55, 1),
        avl: bits(52, 1),
        unusable: if bits(47, 1) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity page tables into guest memory.
pub fn write_tables(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    mem.write_obj(PDPTE_START | PAGE_PRESENT_RW, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PAGE_PRESENT_RW, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PAGE_PRESENT_RW | PAGE_PS_2M,
            GuestAddress(PDE_START + i * 8),
        )?;
    }
    Ok(())
}

/// Special registers for the boot vCPU, on top of what KVM reports for a fresh vCPU.
pub fn sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    let tss = segment(3, GDT[3]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

pub fn regs(boot: &BootEntry) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: boot.entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot.zero_page.0,
        ..Default::default()
    }
}

/// x87 and SSE control words as after a hardware reset (FNINIT, default MXCSR).
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment(1, GDT[1]);
        assert_eq!((cs.l, cs.db, cs.present, cs.selector), (1, 0, 1, 8));
        assert_eq!(cs.limit, 0xfffff);
    }
}
