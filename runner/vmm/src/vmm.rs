//! Building a VM, from its configuration or from a snapshot, and running it to its end.

use crate::acpi;
use crate::boot::{self, long_mode};
use crate::config::{ConfigError, VmConfig};
use crate::control::{Answer, ControlServer, Controllable, Request, Response, RunState};
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
use crate::migration::{self, source::Pausable, MigrateOptions, MigrationError};
use crate::persist::{self, PersistError, SavedDevices, SavedDisk, SavedNet};
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

/// The devices a VM gets, with the files and sockets they use.
pub(crate) struct DeviceSpec<'a> {
    pub rootfs: Option<(&'a Path, bool)>,
    pub net: Option<NetConfig>,
    pub agent_socket: Option<&'a Path>,
}

/// Devices as created, with the handles a snapshot needs.
pub(crate) struct Devices {
    pio: Bus,
    mmio: Bus,
    subscribers: Vec<Subscriber>,
    pub parts: SavedParts,
    sockets: Vec<OwnedSocket>,
}

/// The devices whose state a snapshot saves, and which devices there are.
pub(crate) struct SavedParts {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    disk: Option<(Arc<Mutex<Block>>, PathBuf)>,
    devices: SavedDevices,
}

impl SavedParts {
    pub fn tap(&self) -> Option<&str> {
        self.devices.net.as_ref().map(|n| n.tap.as_str())
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
        let (devices, infos) = create_devices(&vm, &spec, &exit, console)?;
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

    pub(crate) fn assemble(
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
        self.parts.tap()
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

        // Work the control API still does (a migration) ends and answers while the vCPUs
        // still run.
        drop(em);
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

/// Creates the VM's devices in their initial state: the serial console, the
/// power/reset registers, and the virtio devices in a fixed order (disk, network, agent
/// channel), which a restore repeats. Returns them with the MMIO windows the DSDT describes.
pub(crate) fn create_devices(
    vm: &Vm,
    spec: &DeviceSpec,
    exit: &Arc<ExitSignal>,
    console: SerialOutput,
) -> Result<(Devices, Vec<crate::acpi::MmioDeviceInfo>), Error> {
    let irq = vm.irq_line(SERIAL_GSI)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, console)));
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

    /// Sends the running VM to another host (see [`migration::source`]); then it stops here
    /// (sent), runs on (not sent), or stays paused (the handover is unconfirmed).
    fn migrate_and_settle(&self, opts: &MigrateOptions) -> Response {
        let result = migration::source::migrate(
            &migration::source::Source {
                parts: self.parts(),
                cpuid: &self.cpuid,
                control: self,
            },
            opts,
        );
        let mut state = self.state.lock().unwrap();
        match result {
            Ok(summary) => {
                log::info!("migrated to {}: {summary:?}", opts.to);
                *state = RunState::Stopping;
                self.exit.request(ExitReason::Migrated);
                Response::migrated(*state, summary)
            }
            Err(e @ MigrationError::Unconfirmed(_)) => {
                *state = RunState::Paused;
                Response::error(format!("migration to {}: {e}", opts.to))
            }
            // The target ran ahead: this copy is stale and must not run again.
            Err(e @ MigrationError::PostcopyBroken(_)) => {
                *state = RunState::Stopping;
                self.exit.request(ExitReason::Error(e.to_string()));
                Response::error(format!("migration to {}: {e}", opts.to))
            }
            Err(e) => {
                *state = RunState::Running;
                Response::error(format!(
                    "migration to {} failed, the VM runs on here: {e}",
                    opts.to
                ))
            }
        }
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
    fn handle(&mut self, request: Request) -> Answer {
        let m = &self.0;
        let mut state = m.state.lock().unwrap();
        let response = match (request, *state) {
            (Request::Status, s) => Response::state(s),
            (_, RunState::Stopping) => Response::error("the VM is stopping"),
            (_, RunState::Migrating) => {
                Response::error("a migration is under way; it ends on its own")
            }
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
            (Request::Migrate(opts), RunState::Running) => {
                *state = RunState::Migrating;
                let m = m.clone();
                return Answer::Later(Box::new(move || m.migrate_and_settle(&opts)));
            }
            (Request::Stop, _) => {
                *state = RunState::Stopping;
                m.exit.request(ExitReason::Stopped);
                Response::state(*state)
            }
        };
        Answer::Now(response)
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
