//! The receiving side: waits for one authenticated source, checks up front that the VM fits
//! this host, fills fresh guest memory and a new disk image with what arrives, builds the VM
//! from the final state, and runs it only once the source commits. Anything short of that
//! leaves nothing behind: no disk image, no socket, no VM.

use super::link::{Link, LinkError};
use super::protocol::{Batch, Frame, Hello, Unit};
use super::transport::{Listener, TlsFiles, TransportError};
use super::{DISK_BLOCK, PAGE};
use crate::devices::serial::SerialOutput;
use crate::memory;
use crate::vm::Vm;
use crate::vmm::{check_fits, Placement};
use crate::Vmm;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Address to listen on (host:port).
    pub listen: String,
    pub tls: TlsFiles,
    /// Where the VM's disk image (made from what arrives) and sockets go.
    pub place: Placement,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the VM cannot run here: {0}")]
    Unfit(Box<crate::Error>),
    #[error("the source sent {0}")]
    Invalid(String),
    #[error("writing the disk image {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<crate::Error> for ReceiveError {
    fn from(e: crate::Error) -> Self {
        ReceiveError::Unfit(Box::new(e))
    }
}

/// A disk image this side created; removed unless the VM it belongs to started.
struct NewDisk {
    path: PathBuf,
    file: File,
    len: u64,
    keep: bool,
}

impl Drop for NewDisk {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A VM received and built, not running yet.
pub struct Incoming {
    vmm: Vmm,
    link: Link,
    disk: Option<NewDisk>,
}

impl Incoming {
    /// The built VM, e.g. to set up its network before it runs.
    pub fn vmm(&self) -> &Vmm {
        &self.vmm
    }

    /// Tells the source the VM is ready and waits for its commit; then the VM is this
    /// host's to run. Without a commit (the source gave up, the link broke) everything
    /// received is dropped.
    pub fn commit(mut self) -> Result<Vmm, ReceiveError> {
        self.link.send(&Frame::Ready)?;
        self.link.expect(Frame::Commit)?;
        // Best effort: if the confirmation is lost, the source stays paused (never both).
        if let Err(e) = self
            .link
            .send(&Frame::Committed)
            .and_then(|_| self.link.flush())
        {
            log::warn!("the source may not have heard that the VM runs here: {e}");
        }
        if let Some(disk) = &mut self.disk {
            disk.keep = true;
        }
        Ok(self.vmm)
    }
}

/// Listens on `cfg.listen` (calling `listening` once bound), receives one VM and builds it.
pub fn receive(
    cfg: &ReceiveConfig,
    console: SerialOutput,
    listening: impl FnOnce(SocketAddr),
) -> Result<Incoming, ReceiveError> {
    let listener = Listener::bind(&cfg.listen, cfg.tls.server_config()?)?;
    listening(listener.local_addr().map_err(|source| TransportError::Io {
        what: "read the listening address".into(),
        source,
    })?);
    let mut link = Link::new(listener.accept()?);
    let hello = match link.receive()? {
        Frame::Hello(hello) => hello,
        other => {
            return Err(ReceiveError::Invalid(format!(
                "{} before hello",
                other.name()
            )))
        }
    };
    let (vm, mut disk) = match prepare(&hello, &cfg.place) {
        Ok(prepared) => prepared,
        Err(e) => {
            link.abort(&e.to_string());
            return Err(e);
        }
    };
    link.send(&Frame::Accept)?;
    let received = fill(&mut link, &vm, disk.as_mut()).and_then(|state| {
        // What was checked up front must be what arrives.
        if state.memory_mib != hello.memory_mib {
            return Err(ReceiveError::Invalid(format!(
                "a state of {} MiB for a VM of {} MiB",
                state.memory_mib, hello.memory_mib
            )));
        }
        // (Not its CPUID: KVM updates runtime bits such as OSXSAVE as the guest runs.)
        if state.vcpus.len() != hello.vcpus as usize {
            return Err(ReceiveError::Invalid(format!(
                "a state of {} vCPUs for a VM of {}",
                state.vcpus.len(),
                hello.vcpus
            )));
        }
        Ok(Vmm::rebuild(vm, &state, &cfg.place, console)?)
    });
    match received {
        Ok(vmm) => Ok(Incoming { vmm, link, disk }),
        Err(e) => {
            link.abort(&e.to_string());
            Err(e)
        }
    }
}

/// Checks the VM fits and makes its empty memory and disk image.
fn prepare(hello: &Hello, place: &Placement) -> Result<(Vm, Option<NewDisk>), ReceiveError> {
    let ranges: Vec<(u64, u64)> = memory::ram_ranges(hello.memory_mib << 20)
        .into_iter()
        .map(|(base, len)| (base.0, len as u64))
        .collect();
    if ranges != hello.regions {
        return Err(ReceiveError::Invalid(format!(
            "memory regions {:?}; a {} MiB VM here has {ranges:?}",
            hello.regions, hello.memory_mib
        )));
    }
    let mem = memory::create(hello.memory_mib << 20).map_err(|e| crate::Error::Vm(e.into()))?;
    let vm = Vm::new(mem).map_err(crate::Error::Vm)?;
    check_fits(&vm, hello.vcpus, &hello.cpuid, &hello.devices, place)?;
    let disk = match (hello.disk_len, &place.rootfs) {
        (Some(len), Some(path)) => {
            let made = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .and_then(|file| file.set_len(len).map(|_| file));
            let file = made.map_err(|source| ReceiveError::Disk {
                path: path.clone(),
                source,
            })?;
            Some(NewDisk {
                path: path.clone(),
                file,
                len,
                keep: false,
            })
        }
        _ => None,
    };
    Ok((vm, disk))
}

/// Writes what arrives into memory and disk until the state comes.
fn fill(
    link: &mut Link,
    vm: &Vm,
    mut disk: Option<&mut NewDisk>,
) -> Result<Box<crate::persist::MachineState>, ReceiveError> {
    let zeros = vec![0u8; PAGE.max(DISK_BLOCK)];
    loop {
        match link.receive()? {
            Frame::Memory(batch) => {
                check_unit(&batch, PAGE, "memory")?;
                for (at, unit) in &batch.items {
                    let data = match unit {
                        Unit::Zero => &zeros[..PAGE],
                        Unit::Data(d) => &d[..],
                    };
                    if at % PAGE as u64 != 0 {
                        return Err(ReceiveError::Invalid(format!("a page at {at:#x}")));
                    }
                    vm.memory
                        .write_slice(data, GuestAddress(*at))
                        .map_err(|e| {
                            ReceiveError::Invalid(format!("a page at {at:#x} outside memory: {e}"))
                        })?;
                }
            }
            Frame::Disk(batch) => {
                check_unit(&batch, DISK_BLOCK, "disk")?;
                let Some(disk) = disk.as_deref_mut() else {
                    return Err(ReceiveError::Invalid(
                        "disk blocks for a VM without disk".into(),
                    ));
                };
                for (at, unit) in &batch.items {
                    if at % DISK_BLOCK as u64 != 0 || *at >= disk.len {
                        return Err(ReceiveError::Invalid(format!("a disk block at {at}")));
                    }
                    let len = (disk.len - at).min(DISK_BLOCK as u64) as usize;
                    let data = match unit {
                        Unit::Zero => &zeros[..len],
                        Unit::Data(d) => &d[..len],
                    };
                    disk.file
                        .write_all_at(data, *at)
                        .map_err(|source| ReceiveError::Disk {
                            path: disk.path.clone(),
                            source,
                        })?;
                }
            }
            Frame::State(state) => {
                if let Some(disk) = disk {
                    disk.file.sync_data().map_err(|source| ReceiveError::Disk {
                        path: disk.path.clone(),
                        source,
                    })?;
                }
                return Ok(state);
            }
            other => {
                return Err(ReceiveError::Invalid(format!(
                    "an unexpected {} frame",
                    other.name()
                )))
            }
        }
    }
}

fn check_unit(batch: &Batch, unit: usize, what: &str) -> Result<(), ReceiveError> {
    if batch.unit != unit {
        return Err(ReceiveError::Invalid(format!(
            "{what} in units of {} bytes (expected {unit})",
            batch.unit
        )));
    }
    Ok(())
}
