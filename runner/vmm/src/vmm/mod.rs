//! Building a VM, from its configuration or from a snapshot, and running it to its end.
//!
//! [`Vmm::build`] makes a VM from its configuration ([`build`]) with its devices
//! ([`devices`], which a restore makes the same way); [`Vmm::run`] runs it ([`run`]) while
//! the control API drives the running machine ([`machine`]).

mod build;
pub(crate) mod devices;
mod machine;
mod run;

use self::devices::SavedParts;
use crate::acpi;
use crate::boot;
use crate::config::ConfigError;
use crate::devices::virtio::block::Block;
use crate::event_loop::Subscriber;
use crate::persist::PersistError;
use crate::vcpu::run::VcpuContext;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmError};
use kvm_bindings::kvm_cpuid_entry2;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use crate::exit::ExitReason;
pub(crate) use crate::exit::ExitSignal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot write boot page tables: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    #[error("cannot place the devices: {0}")]
    Devices(String),
    #[error(transparent)]
    Attach(#[from] crate::devices::virtio::attach::AttachError),
    #[error(transparent)]
    Snapshot(#[from] PersistError),
    #[error("the saved VM does not fit: {0}")]
    Restore(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A Unix socket path that is removed when the VMM is done with it.
struct OwnedSocket(PathBuf);

impl OwnedSocket {
    fn bind(path: &Path, what: &str) -> Result<(OwnedSocket, UnixListener), Error> {
        let listener = UnixListener::bind(path)
            .map_err(io(format!("cannot listen on {what} {}", path.display())))?;
        Ok((OwnedSocket(path.to_path_buf()), listener))
    }
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A VM ready to run.
pub struct Vmm {
    vm: Arc<Vm>,
    memory_mib: u64,
    /// The guest's CPUID, which a migration target checks before anything moves.
    cpuid: Vec<kvm_cpuid_entry2>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    ctx: VcpuContext,
    devices: Vec<Subscriber>,
    parts: SavedParts,
    api: Option<UnixListener>,
    _sockets: Vec<OwnedSocket>,
}

impl Vmm {
    /// What stops the VM from another thread.
    pub(crate) fn exit_signal(&self) -> Arc<ExitSignal> {
        self.ctx.exit.clone()
    }

    /// Whether the VM has a root disk.
    pub fn has_disk(&self) -> bool {
        self.disk().is_some()
    }

    /// The VM's root disk device, if it has one.
    pub(crate) fn disk(&self) -> Option<&Arc<Mutex<Block>>> {
        self.parts.disk.as_ref().map(|(block, _)| block)
    }

    /// The TAP device the VM's network interface uses, if it has one.
    pub fn tap(&self) -> Option<&str> {
        self.parts.tap()
    }
}
