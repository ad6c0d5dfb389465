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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedDevices {
    /// The root disk, if any; its content is `disk.img`.
    pub disk: Option<SavedDisk>,
    pub net: Option<SavedNet>,
    /// Whether the VM has the agent channel (virtio-console).
    pub agent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedDisk {
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Checks that every feature the snapshot's vCPU had is offered by `host` (this host's CPUID
/// for a fresh vCPU of the same id and count), before anything is restored.
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
        for (r, name) in registers
            .clone()
            .zip(&["eax", "ebx", "ecx", "edx"][registers])
        {
            let lacking = want[r] & !have[r];
            if lacking != 0 {
                missing.push(format!(
                    "leaf {:#x}.{} {name} bits {lacking:#x}",
                    leaf.0, leaf.1
                ));
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
        let err = check_cpu(&host, &[leaf(7, 0, 0b1 | 1 << 16, 0)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this host's CPU lacks features the snapshot's guest uses: leaf 0x7.0 ebx bits 0x10000"
        );
    }
}
