//! What a snapshot directory holds and how a paused VM is written into one:
//!
//! - `vm.state`: vCPUs, interrupt controllers, PIT and clock, devices, and which devices the
//!   VM has, in the checksummed format of [`crate::snapshot::format`]; written last, so a
//!   directory without it is an unfinished snapshot;
//! - `memory`: guest RAM, sparse ([`crate::snapshot::memory`]);
//! - `disk.img`: the root disk as it was at the pause, so that memory is never paired with a
//!   disk from another moment.
//!
//! [`crate::Vmm::restore`] rebuilds a VM from it in a fresh process.

use crate::devices::serial::{SavedSerial, SerialDevice};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::VirtioState;
use crate::snapshot::format::{self, FormatError};
use crate::snapshot::memory::{self, MemoryLayout, SnapshotMemoryError};
use crate::vcpu::state::{msrs_to_save, StateError, VcpuState};
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmError, VmState};
use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "memory";
pub const DISK_FILE: &str = "disk.img";

/// Which devices the VM has, in the order they were attached (a restore attaches the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevices {
    /// The root disk, if any; its content is `disk.img`.
    pub disk: Option<SavedDisk>,
    pub net: Option<SavedNet>,
    /// Whether the VM has the agent channel (virtio-console).
    pub agent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    pub mac: [u8; 6],
    /// The TAP it was attached to; a restore may name another.
    pub tap: String,
}

/// Everything in `vm.state`.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub memory_mib: u64,
    pub memory: MemoryLayout,
    pub devices: SavedDevices,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SavedSerial,
    pub virtio: Vec<VirtioState>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already holds a snapshot; choose another directory")]
    Exists(PathBuf),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("guest memory: {0}")]
    Memory(#[from] SnapshotMemoryError),
    #[error(transparent)]
    Vcpu(#[from] StateError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("this host's CPU lacks features the snapshot's guest uses: {0}")]
    Cpu(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A running VM's parts, as the snapshot needs them. Its vCPUs must be paused (in-flight
/// exits completed) and its device thread parked.
pub struct Paused<'a> {
    pub vm: &'a Vm,
    pub memory_mib: u64,
    pub vcpus: &'a [Arc<Mutex<Vcpu>>],
    pub serial: &'a Mutex<SerialDevice>,
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    /// The root disk's device and file.
    pub disk: Option<(&'a Mutex<Block>, &'a Path)>,
    pub devices: &'a SavedDevices,
}

/// What a snapshot cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub memory_bytes: u64,
    /// Guest memory bytes actually stored (the rest were never touched or zero).
    pub stored_bytes: u64,
    pub took_ms: u64,
}

/// Writes the paused VM into `dir` (created if missing; refused if it holds a snapshot).
pub fn save(dir: &Path, vm: &Paused) -> Result<SnapshotSummary, PersistError> {
    let started = Instant::now();
    fs::create_dir_all(dir).map_err(io(dir))?;
    let state_path = dir.join(STATE_FILE);
    if state_path.exists() {
        return Err(PersistError::Exists(dir.to_path_buf()));
    }
    if let Some((block, path)) = vm.disk {
        block.lock().unwrap().flush().map_err(io(path))?;
        let copy = dir.join(DISK_FILE);
        // A leftover of an unfinished snapshot (no state file) is replaced.
        let _ = fs::remove_file(&copy);
        crate::disk_copy::private_copy(path, &copy).map_err(io(&copy))?;
    }
    let memory_path = dir.join(MEMORY_FILE);
    let memory_file = File::create(&memory_path).map_err(io(&memory_path))?;
    let saved_memory = memory::save(&vm.vm.memory, &memory_file)?;

    let state = capture(vm, saved_memory.layout)?;
    format::write(&state_path, &state)?;
    Ok(SnapshotSummary {
        memory_bytes: vm.memory_mib << 20,
        stored_bytes: saved_memory.stored,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// Reads the paused VM's vCPU, VM and device state; `memory` says where its RAM went.
pub fn capture(vm: &Paused, memory: MemoryLayout) -> Result<MachineState, PersistError> {
    let msrs = msrs_to_save(&vm.vm.kvm).map_err(|source| VmError::Kvm {
        call: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    let vcpus = vm
        .vcpus
        .iter()
        .map(|v| v.lock().unwrap().save_state(&vm.vm.kvm, &msrs))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MachineState {
        memory_mib: vm.memory_mib,
        memory,
        devices: vm.devices.clone(),
        vm: vm.vm.save_state()?,
        vcpus,
        serial: SavedSerial(vm.serial.lock().unwrap().state()),
        virtio: vm
            .transports
            .iter()
            .map(|t| t.lock().unwrap().save())
            .collect(),
    })
}

/// CPUID leaves (function, index) whose registers list features a guest may rely on.
const FEATURE_LEAVES: [(u32, u32); 5] = [
    (0x1, 0),
    (0x7, 0),
    (0xd, 1),
    (0x8000_0001, 0),
    (0x8000_0008, 0),
];

/// Names of well-known feature bits (as Linux's /proc/cpuinfo spells them): leaf, register
/// (0 = eax … 3 = edx), bit, name. Bits not listed are reported by number.
const FEATURE_NAMES: &[((u32, u32), usize, u32, &str)] = &[
    ((0x1, 0), 2, 0, "pni (sse3)"),
    ((0x1, 0), 2, 1, "pclmulqdq"),
    ((0x1, 0), 2, 9, "ssse3"),
    ((0x1, 0), 2, 12, "fma"),
    ((0x1, 0), 2, 13, "cx16"),
    ((0x1, 0), 2, 19, "sse4_1"),
    ((0x1, 0), 2, 20, "sse4_2"),
    ((0x1, 0), 2, 21, "x2apic"),
    ((0x1, 0), 2, 22, "movbe"),
    ((0x1, 0), 2, 23, "popcnt"),
    ((0x1, 0), 2, 24, "tsc_deadline_timer"),
    ((0x1, 0), 2, 25, "aes"),
    ((0x1, 0), 2, 26, "xsave"),
    ((0x1, 0), 2, 28, "avx"),
    ((0x1, 0), 2, 29, "f16c"),
    ((0x1, 0), 2, 30, "rdrand"),
    ((0x1, 0), 3, 25, "sse"),
    ((0x1, 0), 3, 26, "sse2"),
    ((0x7, 0), 1, 0, "fsgsbase"),
    ((0x7, 0), 1, 3, "bmi1"),
    ((0x7, 0), 1, 5, "avx2"),
    ((0x7, 0), 1, 7, "smep"),
    ((0x7, 0), 1, 8, "bmi2"),
    ((0x7, 0), 1, 9, "erms"),
    ((0x7, 0), 1, 10, "invpcid"),
    ((0x7, 0), 1, 16, "avx512f"),
    ((0x7, 0), 1, 17, "avx512dq"),
    ((0x7, 0), 1, 18, "rdseed"),
    ((0x7, 0), 1, 19, "adx"),
    ((0x7, 0), 1, 20, "smap"),
    ((0x7, 0), 1, 21, "avx512ifma"),
    ((0x7, 0), 1, 23, "clflushopt"),
    ((0x7, 0), 1, 24, "clwb"),
    ((0x7, 0), 1, 28, "avx512cd"),
    ((0x7, 0), 1, 29, "sha_ni"),
    ((0x7, 0), 1, 30, "avx512bw"),
    ((0x7, 0), 1, 31, "avx512vl"),
    ((0x7, 0), 2, 1, "avx512vbmi"),
    ((0x7, 0), 2, 2, "umip"),
    ((0x7, 0), 2, 3, "pku"),
    ((0x7, 0), 2, 6, "avx512_vbmi2"),
    ((0x7, 0), 2, 8, "gfni"),
    ((0x7, 0), 2, 9, "vaes"),
    ((0x7, 0), 2, 10, "vpclmulqdq"),
    ((0x7, 0), 2, 11, "avx512_vnni"),
    ((0x7, 0), 2, 12, "avx512_bitalg"),
    ((0x7, 0), 2, 14, "avx512_vpopcntdq"),
    ((0x7, 0), 2, 22, "rdpid"),
    ((0x7, 0), 3, 4, "fsrm"),
    ((0x7, 0), 3, 14, "serialize"),
    ((0x7, 0), 3, 22, "amx_bf16"),
    ((0x7, 0), 3, 24, "amx_tile"),
    ((0x7, 0), 3, 25, "amx_int8"),
    ((0xd, 1), 0, 0, "xsaveopt"),
    ((0xd, 1), 0, 1, "xsavec"),
    ((0xd, 1), 0, 2, "xgetbv1"),
    ((0xd, 1), 0, 3, "xsaves"),
    ((0x8000_0001, 0), 2, 0, "lahf_lm"),
    ((0x8000_0001, 0), 2, 5, "abm"),
    ((0x8000_0001, 0), 2, 6, "sse4a"),
    ((0x8000_0001, 0), 2, 8, "3dnowprefetch"),
    ((0x8000_0001, 0), 3, 20, "nx"),
    ((0x8000_0001, 0), 3, 26, "pdpe1gb"),
    ((0x8000_0001, 0), 3, 27, "rdtscp"),
    ((0x8000_0001, 0), 3, 29, "lm"),
    ((0x8000_0008, 0), 1, 0, "clzero"),
    ((0x8000_0008, 0), 1, 9, "wbnoinvd"),
];

const REGISTERS: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

/// Bits that mirror the guest's own control registers, not the CPU: KVM sets them in a vCPU's
/// CPUID once the guest turns the feature on (Linux 6.12 does so for OSXSAVE; a fresh vCPU
/// has them clear). Never a reason to refuse a snapshot.
const GUEST_STATE_BITS: [((u32, u32), usize, u32); 2] = [
    ((0x1, 0), 2, 27), // osxsave: CR4.OSXSAVE
    ((0x7, 0), 2, 4),  // ospke: CR4.PKE
];

/// Checks that every feature the snapshot's vCPU had is offered by `host` (this host's CPUID
/// for a fresh vCPU of the same id and count), before anything is restored. The error names
/// each missing feature.
pub fn check_cpu(host: &CpuId, saved: &[kvm_cpuid_entry2]) -> Result<(), PersistError> {
    let find = |entries: &[kvm_cpuid_entry2], (function, index): (u32, u32)| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
            .unwrap_or_default()
    };
    let mut missing = Vec::new();
    for leaf in FEATURE_LEAVES {
        // Leaf 0x80000008 EBX holds features; its other registers hold sizes and counts.
        let registers = if leaf.0 == 0x8000_0008 { 1..2 } else { 0..4 };
        let (want, have) = (find(saved, leaf), find(host.as_slice(), leaf));
        for r in registers {
            let guest_state = GUEST_STATE_BITS
                .iter()
                .filter(|(l, reg, _)| *l == leaf && *reg == r)
                .fold(0, |mask, (.., bit)| mask | 1 << bit);
            let lacking = want[r] & !have[r] & !guest_state;
            for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
                let place = format!("leaf {:#x}.{} {} bit {bit}", leaf.0, leaf.1, REGISTERS[r]);
                missing.push(
                    match FEATURE_NAMES
                        .iter()
                        .find(|(l, reg, b, _)| *l == leaf && *reg == r && *b == bit)
                    {
                        Some((.., name)) => format!("{name} ({place})"),
                        None => place,
                    },
                );
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PersistError::Cpu(missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let host = CpuId::from_entries(&[leaf(1, 0, 0, 0b0110), leaf(7, 0, 0b1, 0)]).unwrap();
        assert!(check_cpu(&host, &[leaf(1, 0, 0, 0b0100), leaf(7, 0, 0b1, 0)]).is_ok());
        let err = check_cpu(&host, &[leaf(7, 0, 0b1 | 1 << 16 | 1 << 1, 0)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this host's CPU lacks features the snapshot's guest uses: \
             leaf 0x7.0 ebx bit 1, avx512f (leaf 0x7.0 ebx bit 16)"
        );
    }

    #[test]
    fn bits_the_guest_set_itself_are_not_missing_features() {
        let host = CpuId::from_entries(&[leaf(1, 0, 0, 0), leaf(7, 0, 0, 0)]).unwrap();
        // OSXSAVE and OSPKE: set in a running guest's CPUID, clear in a fresh vCPU's.
        assert!(check_cpu(&host, &[leaf(1, 0, 0, 1 << 27), leaf(7, 0, 0, 1 << 4)]).is_ok());
        assert!(check_cpu(&host, &[leaf(1, 0, 0, 1 << 26)]).is_err());
    }
}
