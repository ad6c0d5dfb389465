//! Restoring a saved VM, from a snapshot or from a migration: the checks made before anything
//! is created, where its files and sockets go on this host, and the two steps that rebuild it:
//! making a VM of the saved one's shape ([`Vmm::prepare`]), then putting in its state
//! ([`Unrestored::restore`]). A migration target takes the first step while memory still
//! arrives, so that its pause holds only the second.

use crate::devices::serial::SerialOutput;
use crate::persist::{self, MachineState, PersistError, SavedDevices};
use crate::snapshot::format;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmError};
use crate::vmm::devices::{create_devices, DeviceSpec, Devices};
use crate::vmm::{io, Error, ExitSignal};
use crate::{NetConfig, Vmm};
use kvm_bindings::kvm_cpuid_entry2;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a restored or migrated-in VM's files and sockets go on this host; what the VM is
/// made of comes from its saved state.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Where the VM's root disk is made; it must not exist. Required when the VM has a disk.
    pub rootfs: Option<PathBuf>,
    /// TAP device for the network interface (default: the one it had).
    pub tap: Option<String>,
    pub agent_socket: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub from: PathBuf,
    /// The restored VM's root disk goes to `place.rootfs`.
    pub place: Placement,
    pub disk: RestoredDisk,
}

impl RestoreConfig {
    /// Undoes what a restore did with the disk of a VM that has one and will not run: the
    /// copy is removed, a taken disk goes back into the snapshot.
    pub fn undo_disk(&self) {
        let Some(path) = &self.place.rootfs else {
            return;
        };
        let _ = match self.disk {
            RestoredDisk::Copied => std::fs::remove_file(path),
            RestoredDisk::Taken => std::fs::rename(path, self.from.join(persist::DISK_FILE)),
        };
    }
}

/// How the snapshot's disk becomes the restored VM's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestoredDisk {
    /// A private copy (a reflink where the file system can): the snapshot stays as it was.
    #[default]
    Copied,
    /// Moved (renamed, on one file system): no copy, but the snapshot cannot be restored
    /// again, as with QEMU resuming a saved VM on its own disk.
    Taken,
}

/// What a saved VM is made of, known before its state: from a snapshot's state, or from a
/// migration's hello.
pub(crate) struct Shape<'a> {
    pub memory_mib: u64,
    pub vcpus: u8,
    pub devices: &'a SavedDevices,
}

impl<'a> Shape<'a> {
    pub fn of(state: &'a MachineState) -> Shape<'a> {
        Shape {
            memory_mib: state.memory_mib,
            vcpus: state.vcpus.len() as u8,
            devices: &state.devices,
        }
    }
}

/// A VM of a saved VM's shape, its devices and vCPUs made but in their initial state.
pub(crate) struct Unrestored {
    vm: Vm,
    memory_mib: u64,
    /// The devices the shape named, which the state must name too.
    saved_devices: SavedDevices,
    devices: Devices,
    exit: Arc<ExitSignal>,
    vcpus: Vec<Vcpu>,
    api_socket: Option<PathBuf>,
}

impl Vmm {
    /// Rebuilds the VM a snapshot holds, ready to resume where it was paused. The snapshot is
    /// checked (format, checksum, version, CPU features, memory file) before anything is
    /// created, and it is left as it was: the restored VM writes to a copy of its disk and
    /// keeps its memory changes private.
    pub fn restore(cfg: &RestoreConfig, console: SerialOutput) -> Result<Vmm, Error> {
        let mut phases = Phases::start();
        let state: MachineState =
            format::read(&cfg.from.join(persist::STATE_FILE)).map_err(PersistError::from)?;
        phases.mark("state read");
        let first = state
            .vcpus
            .first()
            .ok_or_else(|| Error::Restore("it has no vCPUs".into()))?;
        check_fits(
            state.vcpus.len() as u8,
            &first.cpuid,
            &state.devices,
            &cfg.place,
        )?;
        let frozen = cfg.from.join(persist::DISK_FILE);
        // The snapshot's disk is used only when it has one.
        let disk_to = state.devices.disk.as_ref().and(cfg.place.rootfs.as_deref());
        if disk_to.is_some() && !frozen.exists() {
            return Err(Error::Restore(format!(
                "its disk {} is missing (taken by an earlier restore?)",
                frozen.display()
            )));
        }
        phases.mark("checked");
        let memory_path = cfg.from.join(persist::MEMORY_FILE);
        let memory_file = File::open(&memory_path).map_err(io(format!(
            "cannot open the snapshot's memory {}",
            memory_path.display()
        )))?;
        let mem = crate::snapshot::memory::restore(&memory_file, &state.memory)
            .map_err(PersistError::from)?;
        phases.mark("memory mapped");
        let vm = Vm::new(mem)?;
        phases.mark("VM created");

        if let Some(path) = disk_to {
            let (made, how) = match cfg.disk {
                RestoredDisk::Copied => (crate::disk_copy::private_copy(&frozen, path), "copy"),
                RestoredDisk::Taken => (take_file(&frozen, path), "move"),
            };
            made.map_err(io(format!(
                "cannot {how} the snapshot's disk {} to {}",
                frozen.display(),
                path.display()
            )))?;
        }
        phases.mark(match cfg.disk {
            RestoredDisk::Copied => "disk copied",
            RestoredDisk::Taken => "disk taken",
        });
        let shape = Shape::of(&state);
        let restored = Vmm::prepare(vm, &shape, &cfg.place, console).and_then(|vm| {
            phases.mark("devices and vCPUs made");
            vm.restore(&state)
        });
        phases.mark("state restored");
        match &restored {
            Ok(_) => log::info!("restored from {}: {phases}", cfg.from.display()),
            // Nothing else was created on disk.
            Err(_) if disk_to.is_some() => cfg.undo_disk(),
            Err(_) => {}
        }
        restored
    }

    /// Makes a VM of `shape` around `vm` (its memory filled, or still being filled): its
    /// devices, with their files and sockets as `place` says, and its vCPUs.
    pub(crate) fn prepare(
        vm: Vm,
        shape: &Shape,
        place: &Placement,
        console: SerialOutput,
    ) -> Result<Unrestored, Error> {
        if shape.vcpus == 0 {
            return Err(Error::Restore("it has no vCPUs".into()));
        }
        let saved = shape.devices;
        let spec = DeviceSpec {
            rootfs: place
                .rootfs
                .as_deref()
                .zip(saved.disk.as_ref().map(|d| d.read_only)),
            net: saved.net.as_ref().map(|n| NetConfig {
                tap: place.tap.clone().unwrap_or_else(|| n.tap.clone()),
                mac: n.mac,
            }),
            agent_socket: place.agent_socket.as_deref().filter(|_| saved.agent),
        };
        let exit = Arc::new(ExitSignal::new().map_err(io("cannot create the exit event"))?);
        let (devices, _) = create_devices(&vm, &spec, &exit, console)?;
        let vcpus = (0..shape.vcpus)
            .map(|id| Vcpu::new(&vm.fd, id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Unrestored {
            vm,
            memory_mib: shape.memory_mib,
            saved_devices: saved.clone(),
            devices,
            exit,
            vcpus,
            api_socket: place.api_socket.clone(),
        })
    }
}

impl Unrestored {
    /// The VM's memory, e.g. for a post-copy to fill on fault.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The TAP device the VM's network interface uses, if it has one.
    pub fn tap(&self) -> Option<&str> {
        self.devices.parts.tap()
    }

    /// Puts the saved VM's `state` into this one, which must be of its shape; then it is
    /// ready to run where the saved VM was paused.
    pub fn restore(self, state: &MachineState) -> Result<Vmm, Error> {
        if state.memory_mib != self.memory_mib
            || state.vcpus.len() != self.vcpus.len()
            || state.devices != self.saved_devices
        {
            return Err(Error::Restore(format!(
                "a state of {} MiB, {} vCPUs and devices {:?} for a VM of {} MiB, {} vCPUs and \
                 devices {:?}",
                state.memory_mib,
                state.vcpus.len(),
                state.devices,
                self.memory_mib,
                self.vcpus.len(),
                self.saved_devices
            )));
        }
        self.vm.restore_state(&state.vm)?;
        let parts = &self.devices.parts;
        parts
            .serial
            .lock()
            .unwrap()
            .restore(&state.serial.0)
            .map_err(io("cannot restore the serial port"))?;
        if parts.transports.len() != state.virtio.len() {
            return Err(Error::Restore(format!(
                "{} virtio devices saved, {} created",
                state.virtio.len(),
                parts.transports.len()
            )));
        }
        for (i, (t, s)) in parts.transports.iter().zip(&state.virtio).enumerate() {
            t.lock()
                .unwrap()
                .restore(s)
                .map_err(|e| Error::Restore(format!("virtio device {i}: {e}")))?;
        }
        for (vcpu, saved) in self.vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(&self.vm.kvm, saved)
                .map_err(|e| Error::Restore(e.to_string()))?;
        }
        Vmm::assemble(
            self.vm,
            self.memory_mib,
            self.vcpus,
            state.vcpus[0].cpuid.clone(),
            self.devices,
            self.exit,
            self.api_socket.as_deref(),
        )
    }
}

/// Moves `from` to `to`, which must not exist (a rename would replace it).
fn take_file(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.exists() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

/// Where the time of a multi-step operation went, for its log line.
struct Phases {
    started: std::time::Instant,
    last: std::time::Instant,
    done: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Phases {
        let now = std::time::Instant::now();
        Phases {
            started: now,
            last: now,
            done: Vec::new(),
        }
    }

    /// Ends the phase called `what`.
    fn mark(&mut self, what: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((what, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} ms (", self.started.elapsed().as_secs_f64() * 1e3)?;
        for (i, (what, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{what} {:.1}", took.as_secs_f64() * 1e3)?;
        }
        write!(f, ")")
    }
}

/// Checks, before any VM exists or anything is copied, that a saved VM with `vcpus` vCPUs,
/// this CPUID and these devices can run here with what `place` provides.
pub(crate) fn check_fits(
    vcpus: u8,
    cpuid: &[kvm_cpuid_entry2],
    devices: &SavedDevices,
    place: &Placement,
) -> Result<(), Error> {
    let kvm = kvm_ioctls::Kvm::new().map_err(VmError::OpenKvm)?;
    let mut offered = crate::vm::supported_cpuid(&kvm)?;
    crate::cpuid::normalize(&mut offered, 0, vcpus);
    persist::check_cpu(&offered, cpuid)?;
    check_placement(devices, place)
}

/// Checks that `place` provides what a saved VM with these devices needs.
fn check_placement(devices: &SavedDevices, place: &Placement) -> Result<(), Error> {
    if devices.agent && place.agent_socket.is_none() {
        return Err(Error::Restore(
            "it has an agent channel: name its socket (--agent-socket)".into(),
        ));
    }
    if devices.disk.is_some() && place.rootfs.is_none() {
        return Err(Error::Restore(
            "it has a root disk: say where it goes (--rootfs)".into(),
        ));
    }
    Ok(())
}
