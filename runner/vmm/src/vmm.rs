//! Building a VM, from its configuration or from a snapshot, and running it to its end.

use crate::acpi;
use crate::boot::{self, long_mode};
use crate::config::{ConfigError, VmConfig};
use crate::control::{ControlServer, Controllable, Request, Response, RunState};
use crate::devices::bus::SharedBusDevice;
use crate::devices::i8042::I8042Device;
use crate::devices::power::AcpiPowerDevice;
use crate::devices::serial::{SerialDevice, SerialOutput};
use crate::devices::virtio::attach::VirtioDevices;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::Bus;
use crate::event_loop::{self, DeviceGate, Subscriber};
use crate::layout::*;
use crate::memory;
use crate::migration::{self, source::Pausable, MigrateOptions, MigrationError, MigrationSummary};
use crate::persist::{self, MachineState, PersistError, SavedDevices, SavedDisk, SavedNet};
use crate::snapshot::format;
use crate::tap::Tap;
use crate::vcpu::control::{install_kick_handler, Target, VcpuControl};
use crate::vcpu::run::{self, VcpuContext};
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmError};
use crate::NetConfig;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::kvm_cpuid_entry2;
use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vm_superio::serial::SerialState;

pub use crate::exit::ExitReason;
use crate::exit::ExitSignal;

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
    #[error("the snapshot does not fit this VM: {0}")]
    Restore(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
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

/// The devices a VM gets, with the files and sockets they use.
struct DeviceSpec<'a> {
    rootfs: Option<(&'a Path, bool)>,
    net: Option<NetConfig>,
    agent_socket: Option<&'a Path>,
}

/// Devices as created, with the handles a snapshot needs.
struct Devices {
    pio: Bus,
    mmio: Bus,
    subscribers: Vec<Subscriber>,
    parts: SavedParts,
    sockets: Vec<OwnedSocket>,
}

/// The devices whose state a snapshot saves, and which devices there are.
struct SavedParts {
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    disk: Option<(Arc<Mutex<Block>>, PathBuf)>,
    devices: SavedDevices,
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
    /// Creates the VM described by `cfg`: memory, kernel, devices, ACPI tables and vCPUs.
    /// Nothing outlives a failure: sockets are removed and TAP devices closed on the way out.
    pub fn build(cfg: &VmConfig, console: SerialOutput) -> Result<Vmm, Error> {
        cfg.validate()?;
        let mut kernel = File::open(&cfg.kernel).map_err(io("cannot open the kernel"))?;
        let mut initrd = match &cfg.initrd {
            Some(p) => Some(File::open(p).map_err(io("cannot open the initrd"))?),
            None => None,
        };
        let mem = memory::create(cfg.memory_mib << 20).map_err(|e| Error::Vm(e.into()))?;
        let vm = Vm::new(mem.clone())?;
        let entry = boot::load(&mem, &mut kernel, initrd.as_mut(), &cfg.cmdline)?;
        long_mode::write_tables(&mem).map_err(Error::PageTables)?;

        let exit = Arc::new(ExitSignal::new().map_err(io("cannot create the exit event"))?);
        let spec = DeviceSpec {
            rootfs: cfg
                .rootfs
                .as_deref()
                .map(|path| (path, cfg.rootfs_read_only)),
            net: cfg.net.clone(),
            agent_socket: cfg.agent_socket.as_deref(),
        };
        let (devices, infos) = create_devices(&vm, &spec, &exit, console, None)?;
        acpi::write_tables(&mem, cfg.cpus, &infos)?;

        let supported = vm.supported_cpuid()?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let vcpu = Vcpu::new(&vm.fd, id)?;
            vcpu.configure(&supported, cfg.cpus, (id == 0).then_some(&entry))?;
            vcpus.push(vcpu);
        }
        let cpuid = vcpus[0].cpuid()?;
        Self::assemble(
            vm,
            cfg.memory_mib,
            vcpus,
            cpuid,
            devices,
            exit,
            cfg.api_socket.as_deref(),
        )
    }

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
        let restored = Self::rebuild(vm, &state, &cfg.place, console);
        phases.mark("devices and vCPUs restored");
        match &restored {
            Ok(_) => log::info!("restored from {}: {phases}", cfg.from.display()),
            // Nothing else was created on disk.
            Err(_) if disk_to.is_some() => cfg.undo_disk(),
            Err(_) => {}
        }
        restored
    }

    /// Builds the VM `state` describes around `vm` (its memory already filled), with its
    /// disk at `place.rootfs`, ready to resume.
    pub(crate) fn rebuild(
        vm: Vm,
        state: &MachineState,
        place: &Placement,
        console: SerialOutput,
    ) -> Result<Vmm, Error> {
        if state.vcpus.is_empty()
            || state
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| v.id as usize != i)
        {
            return Err(Error::Restore("the vCPUs are not numbered 0..n".into()));
        }
        let saved = &state.devices;
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
        vm.restore_state(&state.vm)?;
        let exit = Arc::new(ExitSignal::new().map_err(io("cannot create the exit event"))?);
        let (devices, _) = create_devices(&vm, &spec, &exit, console, Some(&state.serial.0))?;
        let transports = &devices.parts.transports;
        if transports.len() != state.virtio.len() {
            return Err(Error::Restore(format!(
                "{} virtio devices saved, {} created",
                state.virtio.len(),
                transports.len()
            )));
        }
        for (i, (t, s)) in transports.iter().zip(&state.virtio).enumerate() {
            t.lock()
                .unwrap()
                .restore(s)
                .map_err(|e| Error::Restore(format!("virtio device {i}: {e}")))?;
        }
        let mut vcpus = Vec::new();
        for saved in &state.vcpus {
            let vcpu = Vcpu::new(&vm.fd, saved.id)?;
            vcpu.restore_state(&vm.kvm, saved)
                .map_err(|e| Error::Restore(e.to_string()))?;
            vcpus.push(vcpu);
        }
        Self::assemble(
            vm,
            state.memory_mib,
            vcpus,
            state.vcpus[0].cpuid.clone(),
            devices,
            exit,
            place.api_socket.as_deref(),
        )
    }

    fn assemble(
        vm: Vm,
        memory_mib: u64,
        vcpus: Vec<Vcpu>,
        cpuid: Vec<kvm_cpuid_entry2>,
        devices: Devices,
        exit: Arc<ExitSignal>,
        api_socket: Option<&Path>,
    ) -> Result<Vmm, Error> {
        let mut sockets = devices.sockets;
        let api = match api_socket {
            Some(path) => {
                let (owned, listener) = OwnedSocket::bind(path, "API socket")?;
                sockets.push(owned);
                Some(listener)
            }
            None => None,
        };
        let ctx = VcpuContext {
            pio: devices.pio,
            mmio: devices.mmio,
            exit,
            control: Arc::new(VcpuControl::default()),
        };
        Ok(Vmm {
            vm: Arc::new(vm),
            memory_mib,
            cpuid,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            ctx,
            devices: devices.subscribers,
            parts: devices.parts,
            api,
            _sockets: sockets,
        })
    }

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
        self.parts.devices.net.as_ref().map(|n| n.tap.as_str())
    }

    /// Runs the guest until it powers off, resets, is stopped, or fails.
    pub fn run(self) -> Result<ExitReason, Error> {
        install_kick_handler().map_err(|e| io("cannot install the vCPU kick handler")(e.into()))?;
        let gate = DeviceGate::new().map_err(io("cannot create the device gate"))?;
        let device_thread = event_loop::spawn(self.devices, gate.clone())
            .map_err(io("cannot start the device thread"))?;
        let mut threads = Vec::new();
        for vcpu in &self.vcpus {
            let (vcpu, ctx) = (vcpu.clone(), self.ctx.clone());
            let id = vcpu.lock().unwrap().id;
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .stack_size(crate::vcpu::THREAD_STACK)
                .spawn(move || run::run_loop(vcpu, ctx))
                .map_err(io("cannot start a vCPU thread"))?;
            threads.push(t);
        }
        let machine = Arc::new(Machine {
            threads: Mutex::new(threads),
            control: self.ctx.control.clone(),
            gate: gate.clone(),
            exit: self.ctx.exit.clone(),
            state: Mutex::new(RunState::Running),
            vm: self.vm.clone(),
            memory_mib: self.memory_mib,
            cpuid: self.cpuid,
            vcpus: self.vcpus.clone(),
            parts: self.parts,
        });

        let mut em =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(|e| {
                io("cannot create the main event loop")(std::io::Error::other(format!("{e:?}")))
            })?;
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(self.ctx.exit.clone()))));
        if let Some(listener) = self.api {
            let server = ControlServer::new(listener, MachineControl(machine.clone()))
                .map_err(io("cannot serve the API socket"))?;
            em.add_subscriber(Arc::new(Mutex::new(server)));
        }
        let reason = loop {
            if let Some(reason) = self.ctx.exit.reason() {
                break reason;
            }
            if let Err(e) = em.run() {
                break ExitReason::Error(format!("main event loop failed: {e:?}"));
            }
        };

        let threads = std::mem::take(&mut *machine.threads.lock().unwrap());
        machine.control.request(Target::Exit, &threads);
        for t in threads {
            let _ = t.join();
        }
        gate.exit();
        let _ = device_thread.join();
        if let Some((block, _)) = &machine.parts.disk {
            if let Err(e) = block.lock().unwrap().flush() {
                log::error!("flushing the disk failed: {e}");
            }
        }
        Ok(reason)
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

/// Creates the VM's devices: the serial console (from a saved state, on restore), the
/// power/reset registers, and the virtio devices in a fixed order (disk, network, agent
/// channel), which a restore repeats. Returns them with the MMIO windows the DSDT describes.
fn create_devices(
    vm: &Vm,
    spec: &DeviceSpec,
    exit: &Arc<ExitSignal>,
    console: SerialOutput,
    serial_state: Option<&SerialState>,
) -> Result<(Devices, Vec<crate::acpi::MmioDeviceInfo>), Error> {
    let irq = vm.irq_line(SERIAL_GSI)?;
    let serial = Arc::new(Mutex::new(match serial_state {
        Some(state) => SerialDevice::from_state(state, irq, console),
        None => SerialDevice::new(irq, console),
    }));
    let legacy: [(u16, u16, SharedBusDevice); 3] = [
        (SERIAL_PORT, SERIAL_PORT_LEN, serial.clone()),
        (
            ACPI_PM_PORT,
            ACPI_PM_LEN,
            Arc::new(Mutex::new(AcpiPowerDevice::new(exit.clone()))),
        ),
        (
            I8042_COMMAND_PORT,
            1,
            Arc::new(Mutex::new(I8042Device::new(exit.clone()))),
        ),
    ];
    let mut pio = Bus::default();
    for (port, len, dev) in legacy {
        pio.insert(port as u64, len as u64, dev)
            .map_err(|e| Error::Devices(e.to_string()))?;
    }

    let mem = &vm.memory;
    let mut virtio = VirtioDevices::new(vm);
    let mut sockets = Vec::new();
    let mut disk = None;
    if let Some((path, read_only)) = spec.rootfs {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(io(format!("cannot open rootfs {}", path.display())))?;
        let irq = virtio.next_interrupt()?;
        let block = Block::new(file, read_only, "rootfs".into(), irq, mem.clone())
            .map_err(io("cannot create virtio-blk"))?;
        let block = Arc::new(Mutex::new(block));
        virtio.attach(block.clone())?;
        disk = Some((block, path.to_path_buf()));
    }
    if let Some(net) = &spec.net {
        let tap = Tap::open(&net.tap)?;
        tap.set_mac(crate::devices::virtio::net::host_side_mac(net.mac))?;
        let dev = Net::new(tap, net.mac, virtio.next_interrupt()?, mem.clone())
            .map_err(io("cannot create virtio-net"))?;
        virtio.attach(Arc::new(Mutex::new(dev)))?;
    }
    if let Some(path) = spec.agent_socket {
        let (owned, listener) = OwnedSocket::bind(path, "agent socket")?;
        sockets.push(owned);
        let dev = Console::new(listener, virtio.next_interrupt()?, mem.clone())
            .map_err(io("cannot create virtio-console"))?;
        virtio.attach(Arc::new(Mutex::new(dev)))?;
    }
    let devices = SavedDevices {
        disk: spec.rootfs.map(|(_, read_only)| SavedDisk { read_only }),
        net: spec.net.as_ref().map(|n| SavedNet {
            mac: n.mac,
            tap: n.tap.clone(),
        }),
        agent: spec.agent_socket.is_some(),
    };
    let VirtioDevices {
        bus: mmio,
        infos,
        subscribers,
        transports,
        ..
    } = virtio;
    Ok((
        Devices {
            pio,
            mmio,
            subscribers,
            parts: SavedParts {
                serial,
                transports,
                disk,
                devices,
            },
            sockets,
        },
        infos,
    ))
}

/// The running VM as the control API sees it.
struct Machine {
    threads: Mutex<Vec<JoinHandle<()>>>,
    control: Arc<VcpuControl>,
    gate: Arc<DeviceGate>,
    exit: Arc<ExitSignal>,
    state: Mutex<RunState>,
    vm: Arc<Vm>,
    memory_mib: u64,
    cpuid: Vec<kvm_cpuid_entry2>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    parts: SavedParts,
}

impl Machine {
    fn pause(&self) {
        self.control
            .request(Target::Pause, &self.threads.lock().unwrap());
        self.gate.pause();
    }

    fn resume(&self) {
        self.gate.resume();
        self.control
            .request(Target::Run, &self.threads.lock().unwrap());
    }

    /// The parts a snapshot or a migration reads.
    fn parts(&self) -> persist::Paused<'_> {
        let parts = &self.parts;
        persist::Paused {
            vm: &self.vm,
            memory_mib: self.memory_mib,
            vcpus: &self.vcpus,
            serial: &parts.serial,
            transports: &parts.transports,
            disk: parts.disk.as_ref().map(|(b, p)| (&**b, p.as_path())),
            devices: &parts.devices,
        }
    }

    /// Sends the running VM to another host (see [`migration::source`]).
    fn migrate(&self, opts: &MigrateOptions) -> Result<MigrationSummary, MigrationError> {
        migration::source::migrate(
            &migration::source::Source {
                parts: self.parts(),
                cpuid: &self.cpuid,
                control: self,
            },
            opts,
        )
    }
}

impl Pausable for Machine {
    fn pause(&self) {
        Machine::pause(self)
    }
    fn resume(&self) {
        Machine::resume(self)
    }
    fn is_exiting(&self) -> bool {
        self.exit.is_exiting()
    }
}

struct MachineControl(Arc<Machine>);

impl Controllable for MachineControl {
    fn handle(&mut self, request: Request) -> Response {
        let m = &self.0;
        let mut state = m.state.lock().unwrap();
        match (request, *state) {
            (Request::Status, s) => Response::state(s),
            (_, RunState::Stopping) => Response::error("the VM is stopping"),
            (Request::Pause, RunState::Paused) | (Request::Resume, RunState::Running) => {
                Response::state(*state)
            }
            (Request::Pause, RunState::Running) => {
                m.pause();
                *state = RunState::Paused;
                Response::state(*state)
            }
            (Request::Resume, RunState::Paused) => {
                m.resume();
                *state = RunState::Running;
                Response::state(*state)
            }
            (Request::Snapshot { dir, resume }, before) => {
                if before == RunState::Running {
                    m.pause();
                }
                let result = persist::save(&dir, &m.parts());
                // A failed snapshot leaves the VM as it was; a good one without `resume`
                // stops it (the snapshot carries on from here).
                if result.is_ok() && !resume {
                    *state = RunState::Stopping;
                    m.exit.request(ExitReason::Stopped);
                } else if before == RunState::Running {
                    m.resume();
                }
                match result {
                    Ok(summary) => Response::snapshot(*state, summary),
                    Err(e) => Response::error(format!("snapshot failed: {e}")),
                }
            }
            (Request::Migrate(_), RunState::Paused) => {
                Response::error("the VM is paused; resume it to migrate it")
            }
            (Request::Migrate(opts), RunState::Running) => match m.migrate(&opts) {
                Ok(summary) => {
                    log::info!("migrated to {}: {summary:?}", opts.to);
                    *state = RunState::Stopping;
                    m.exit.request(ExitReason::Migrated);
                    Response::migrated(*state, summary)
                }
                Err(e @ MigrationError::Unconfirmed(_)) => {
                    *state = RunState::Paused;
                    Response::error(format!("migration to {}: {e}", opts.to))
                }
                // The target ran ahead: this copy is stale and must not run again.
                Err(e @ MigrationError::PostcopyBroken(_)) => {
                    *state = RunState::Stopping;
                    m.exit.request(ExitReason::Error(e.to_string()));
                    Response::error(format!("migration to {}: {e}", opts.to))
                }
                Err(e) => Response::error(format!(
                    "migration to {} failed, the VM runs on here: {e}",
                    opts.to
                )),
            },
            (Request::Stop, _) => {
                *state = RunState::Stopping;
                m.exit.request(ExitReason::Stopped);
                Response::state(*state)
            }
        }
    }
}

/// Wakes the main loop when any thread records an exit reason.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(self.0.event_fd(), EventSet::IN))
            .expect("a fresh event loop accepts the exit event");
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event_fd().read();
    }
}
