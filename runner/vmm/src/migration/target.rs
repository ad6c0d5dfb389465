//! The receiving side: waits for one authenticated source, checks up front that the VM fits
//! this host, fills fresh guest memory and a new disk image with what arrives, builds the VM
//! from the final state, and runs it only once the source commits. Anything short of that
//! leaves nothing behind: no disk image, no socket, no VM. A post-copy's rest arrives after
//! the commit ([`super::pull`]).

use super::link::{Link, LinkError};
use super::protocol::{Batch, Frame, Hello, Plan, Unit};
use super::pull::Postcopy;
use super::transport::{Listener, TlsFiles, TransportError, IO_TIMEOUT};
use super::{DISK_BLOCK, PAGE};
use crate::devices::serial::SerialOutput;
use crate::memory;
use crate::restore::{check_fits, Placement, Shape, Unrestored};
use crate::vm::Vm;
use crate::Vmm;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// More streams than this means a broken or hostile source.
const MAX_STREAMS: u8 = 16;

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
    #[error("this host cannot take the VM: {0}")]
    HostSide(String),
    #[error("the source sent {0}")]
    Invalid(String),
    #[error("post-copy: {0}")]
    Postcopy(String),
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
    postcopy: Option<PostcopyRun>,
}

/// A post-copy set up on this side; stopped unless the VM it belongs to runs.
struct PostcopyRun {
    shared: Arc<Postcopy>,
    running: bool,
}

impl Drop for PostcopyRun {
    fn drop(&mut self) {
        if !self.running {
            self.shared.stop();
        }
    }
}

impl Incoming {
    /// Tells the source the VM is ready and waits for its commit; then the VM is this
    /// host's to run (after a post-copy, with the rest arriving as it runs). Without a
    /// commit (the source gave up, the link broke) everything received is dropped.
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
        if let Some(run) = &mut self.postcopy {
            let shared = run.shared.clone();
            shared.watch(self.vmm.exit_signal());
            if let (Some(block), Some(disk)) = (self.vmm.disk(), shared.disk()) {
                block.lock().unwrap().fill_from(Some(disk));
            }
            let mut link = self.link;
            std::thread::Builder::new()
                .name("postcopy-push".into())
                .spawn(move || shared.receive_pushed(&mut link))
                .map_err(|e| ReceiveError::Postcopy(format!("cannot start a thread: {e}")))?;
            run.running = true;
        }
        Ok(self.vmm)
    }
}

/// Listens on `cfg.listen` (calling `listening` once bound), receives one VM and builds it.
/// `host_side` readies this host for the VM once its devices exist (given the TAP its network
/// uses), before anything moves and so outside the pause; what it returns comes back with
/// the VM, and its error refuses the migration.
pub fn receive<T, E: std::fmt::Display>(
    cfg: &ReceiveConfig,
    console: SerialOutput,
    listening: impl FnOnce(SocketAddr),
    host_side: impl FnOnce(Option<&str>) -> Result<T, E>,
) -> Result<(Incoming, T), ReceiveError> {
    let listener = Listener::bind(&cfg.listen, cfg.tls.server_config()?)?;
    listening(listener.local_addr().map_err(|source| TransportError::Io {
        what: "read the listening address".into(),
        source,
    })?);
    let mut link = Link::new(listener.accept()?);
    let hello = match link.receive() {
        Ok(Frame::Hello(hello)) => hello,
        received => {
            let e = match received {
                Ok(other) => ReceiveError::Invalid(format!("{} before hello", other.name())),
                Err(e) => e.into(),
            };
            // Tell the source why (another protocol version, say) rather than hang up.
            link.abort(&e.to_string());
            return Err(e);
        }
    };
    // The VM, its disk image and its devices are made now, while memory arrives: the pause
    // then holds only putting in the state.
    let prepared = prepare(&hello, &cfg.place, console).and_then(|(vm, disk)| {
        let host = host_side(vm.tap()).map_err(|e| ReceiveError::HostSide(e.to_string()))?;
        Ok((vm, disk, host))
    });
    let (vm, disk, host) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            link.abort(&e.to_string());
            return Err(e);
        }
    };
    link.send(&Frame::Accept)?;
    link.flush()?;
    // The source's further connections, in the order it opens them: the other streams,
    // then a post-copy's pulls.
    let mut extra = (1..hello.streams)
        .map(|_| Ok(Link::new(listener.accept_more(IO_TIMEOUT)?)))
        .collect::<Result<Vec<_>, ReceiveError>>()?;
    let mut pull = match hello.postcopy {
        true => Some(Link::new(listener.accept_more(IO_TIMEOUT)?)),
        false => None,
    };
    let mut postcopy = None;
    let filled = std::thread::scope(|s| {
        let (memory, disk) = (vm.vm(), disk.as_ref());
        let streams = extra
            .iter_mut()
            .map(|l| s.spawn(move || fill_stream(l, memory, disk)))
            .collect();
        let filled = fill(&mut link, memory, disk, hello.postcopy, streams);
        if let Err(e) = &filled {
            // The source then closes the other streams, which ends their receivers.
            link.abort(&e.to_string());
        }
        filled
    });
    let received = filled.and_then(|(state, plan)| {
        let arrived = std::time::Instant::now();
        if let (Some((plan, stale)), Some(mut pull)) = (plan, pull.take()) {
            let image = disk.as_ref().map(|d| (&d.file, d.len));
            let shared = Arc::new(Postcopy::prepare(vm.vm(), image, &plan, stale)?);
            // Faults are served from now on: putting in the state may touch its memory.
            let faults = shared.clone();
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || faults.serve_faults(&mut pull))
                .map_err(|e| ReceiveError::Postcopy(format!("cannot start a thread: {e}")))?;
            postcopy = Some(PostcopyRun {
                shared,
                running: false,
            });
        }
        // What was checked up front must be what arrives (not its CPUID: KVM updates
        // runtime bits such as OSXSAVE as the guest runs).
        let vmm = vm.restore(&state)?;
        log::info!(
            "restored the VM {} ms after its state arrived",
            arrived.elapsed().as_millis()
        );
        Ok(vmm)
    });
    match received {
        Ok(vmm) => Ok((
            Incoming {
                vmm,
                link,
                disk,
                postcopy,
            },
            host,
        )),
        Err(e) => {
            link.abort(&e.to_string());
            Err(e)
        }
    }
}

/// Checks the VM fits, makes its empty memory and disk image, and a VM of its shape.
fn prepare(
    hello: &Hello,
    place: &Placement,
    console: SerialOutput,
) -> Result<(Unrestored, Option<NewDisk>), ReceiveError> {
    if hello.streams == 0 || hello.streams > MAX_STREAMS {
        return Err(ReceiveError::Invalid(format!("{} streams", hello.streams)));
    }
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
    check_fits(hello.vcpus, &hello.cpuid, &hello.devices, place)?;
    let mem = memory::create(hello.memory_mib << 20).map_err(|e| crate::Error::Vm(e.into()))?;
    let vm = Vm::new(mem).map_err(crate::Error::Vm)?;
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
    let shape = Shape {
        memory_mib: hello.memory_mib,
        vcpus: hello.vcpus,
        devices: &hello.devices,
    };
    let vm = Vmm::prepare(vm, &shape, place, console)?;
    Ok((vm, disk))
}

/// The VM's state, with a post-copy's plan and whether pages arrived before it.
type Filled = (Box<crate::persist::MachineState>, Option<(Plan, bool)>);

/// The other streams' receivers: each returns whether pages arrived on it.
type Streams<'s> = Vec<std::thread::ScopedJoinHandle<'s, Result<bool, ReceiveError>>>;

/// Writes what arrives into memory and disk until the state comes; returns it with a
/// post-copy's plan and whether pages arrived before that plan. The other streams must
/// have ended before the plan or the state.
fn fill(
    link: &mut Link,
    vm: &Vm,
    disk: Option<&NewDisk>,
    postcopy: bool,
    mut streams: Streams,
) -> Result<Filled, ReceiveError> {
    let mut plan = None;
    let mut pages_arrived = false;
    let mut end_streams = |pages_arrived: &mut bool| -> Result<(), ReceiveError> {
        for stream in streams.drain(..) {
            *pages_arrived |= stream.join().expect("a stream's receiver does not panic")?;
        }
        Ok(())
    };
    loop {
        match link.receive()? {
            Frame::Plan(p) if postcopy && plan.is_none() => {
                end_streams(&mut pages_arrived)?;
                plan = Some(*p);
            }
            Frame::Memory(_) | Frame::Disk(_) if plan.is_some() => {
                return Err(ReceiveError::Invalid(
                    "memory or disk between the plan and the state".into(),
                ))
            }
            Frame::State(_) if postcopy && plan.is_none() => {
                return Err(ReceiveError::Invalid("a post-copy without a plan".into()))
            }
            Frame::Memory(batch) => pages_arrived |= write_memory(vm, &batch)?,
            Frame::Disk(batch) => write_disk(disk, &batch)?,
            Frame::Sync => synced(link)?,
            Frame::State(state) => {
                // No flush in the pause: the guest's next flush makes the whole image durable.
                end_streams(&mut pages_arrived)?;
                return Ok((state, plan.map(|p| (p, pages_arrived))));
            }
            other => return Err(unexpected(&other)),
        }
    }
}

/// Receives one of the other streams until its `Done`; returns whether pages arrived.
fn fill_stream(link: &mut Link, vm: &Vm, disk: Option<&NewDisk>) -> Result<bool, ReceiveError> {
    let mut pages_arrived = false;
    loop {
        match link.receive()? {
            Frame::Memory(batch) => pages_arrived |= write_memory(vm, &batch)?,
            Frame::Disk(batch) => write_disk(disk, &batch)?,
            Frame::Sync => synced(link)?,
            Frame::Done => return Ok(pages_arrived),
            other => {
                return Err(ReceiveError::Invalid(format!(
                    "an unexpected {} frame on a data stream",
                    other.name()
                )))
            }
        }
    }
}

/// Answers a `Sync`: everything before it is stored.
fn synced(link: &mut Link) -> Result<(), ReceiveError> {
    link.send(&Frame::Synced)?;
    Ok(link.flush()?)
}

/// Writes a batch of pages into guest memory; returns whether it held any.
fn write_memory(vm: &Vm, batch: &Batch) -> Result<bool, ReceiveError> {
    check_unit(batch, PAGE, "memory")?;
    let zeros = [0u8; PAGE];
    for (at, unit) in &batch.items {
        let data = match unit {
            Unit::Zero => &zeros[..],
            Unit::Data(d) => &d[..],
        };
        if at % PAGE as u64 != 0 {
            return Err(ReceiveError::Invalid(format!("a page at {at:#x}")));
        }
        vm.memory
            .write_slice(data, GuestAddress(*at))
            .map_err(|e| ReceiveError::Invalid(format!("a page at {at:#x} outside memory: {e}")))?;
    }
    Ok(!batch.items.is_empty())
}

/// Writes a batch of blocks into the new disk image.
fn write_disk(disk: Option<&NewDisk>, batch: &Batch) -> Result<(), ReceiveError> {
    check_unit(batch, DISK_BLOCK, "disk")?;
    let Some(disk) = disk else {
        return Err(ReceiveError::Invalid(
            "disk blocks for a VM without disk".into(),
        ));
    };
    for (at, unit) in &batch.items {
        disk.file
            .write_all_at(block_bytes(unit, *at, disk.len)?, *at)
            .map_err(|source| ReceiveError::Disk {
                path: disk.path.clone(),
                source,
            })?;
    }
    Ok(())
}

static ZERO_BLOCK: [u8; DISK_BLOCK] = [0; DISK_BLOCK];

/// What the block at `at` of a `disk_len`-byte image holds (the last block may be short),
/// or why it cannot be one.
pub(super) fn block_bytes(unit: &Unit, at: u64, disk_len: u64) -> Result<&[u8], ReceiveError> {
    if !at.is_multiple_of(DISK_BLOCK as u64) || at >= disk_len {
        return Err(ReceiveError::Invalid(format!("a disk block at {at}")));
    }
    let len = (disk_len - at).min(DISK_BLOCK as u64) as usize;
    Ok(match unit {
        Unit::Zero => &ZERO_BLOCK[..len],
        Unit::Data(d) => &d[..len],
    })
}

pub(super) fn unexpected(frame: &Frame) -> ReceiveError {
    ReceiveError::Invalid(format!("an unexpected {} frame", frame.name()))
}

pub(super) fn check_unit(batch: &Batch, unit: usize, what: &str) -> Result<(), ReceiveError> {
    if batch.unit != unit {
        return Err(ReceiveError::Invalid(format!(
            "{what} in units of {} bytes (expected {unit})",
            batch.unit
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::VERSION;
    use crate::migration::transport::{connect, tests::identity};
    use crate::persist::{SavedDevices, SavedDisk};

    fn hello(version: u32, streams: u8) -> Hello {
        Hello {
            version,
            memory_mib: 64,
            regions: vec![(0, 64 << 20)],
            disk_len: Some(1 << 20),
            devices: SavedDevices {
                disk: Some(SavedDisk { read_only: false }),
                net: None,
                agent: false,
            },
            vcpus: 1,
            cpuid: Vec::new(),
            postcopy: false,
            streams,
        }
    }

    /// The source hears why, the target returns the same error, and nothing was made.
    #[test]
    fn a_bad_hello_is_refused_with_its_reason_before_anything_is_made() {
        let cases = [
            (hello(VERSION - 1, 1), "protocol version 2"),
            (hello(VERSION, 0), "0 streams"),
            (hello(VERSION, MAX_STREAMS + 1), "17 streams"),
        ];
        for (hello, reason) in cases {
            let dir = tempfile::tempdir().unwrap();
            let tls = identity(dir.path(), "fleet");
            let disk = dir.path().join("disk.img");
            let cfg = ReceiveConfig {
                listen: "127.0.0.1:0".into(),
                tls: tls.clone(),
                place: Placement {
                    rootfs: Some(disk.clone()),
                    ..Default::default()
                },
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let target = std::thread::spawn(move || {
                receive(
                    &cfg,
                    Box::new(std::io::sink()),
                    |addr| tx.send(addr).unwrap(),
                    |_| Ok::<_, String>(()),
                )
                .map(drop)
                .map_err(|e| e.to_string())
            });
            let addr = rx.recv().unwrap().to_string();
            let mut link = Link::new(connect(&addr, tls.client_config().unwrap()).unwrap());
            link.send(&Frame::Hello(Box::new(hello))).unwrap();
            match link.receive() {
                Err(LinkError::Aborted(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!(
                    "expected an abort for {reason}, got {:?}",
                    other.map(|f| f.name())
                ),
            }
            let err = target.join().unwrap().unwrap_err();
            assert!(err.contains(reason), "{err}");
            assert!(!disk.exists(), "{reason}: a disk image was made");
        }
    }
}
