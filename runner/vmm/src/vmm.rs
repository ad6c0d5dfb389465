//! Building a VM from its configuration and running it to its end.

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
use crate::devices::virtio::net::Net;
use crate::devices::Bus;
use crate::event_loop::{self, DeviceGate, Subscriber};
use crate::layout::*;
use crate::memory;
use crate::tap::Tap;
use crate::vcpu::control::{install_kick_handler, Target, VcpuControl};
use crate::vcpu::run::VcpuContext;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmError};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

/// A VM ready to run.
pub struct Vmm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    devices: Vec<Subscriber>,
    blocks: Vec<Arc<Mutex<Block>>>,
    api: Option<UnixListener>,
    _sockets: Vec<OwnedSocket>,
}

impl Vmm {
    /// Creates the VM described by `cfg`: memory, kernel, devices, ACPI tables and vCPUs.
    /// Nothing outlives a failure: sockets are removed and TAP devices closed on the way out.
    pub fn build(cfg: &VmConfig, console: SerialOutput) -> Result<Vmm, Error> {
        cfg.validate()?;
        let mut sockets = Vec::new();
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
        let pio = legacy_devices(&vm, &exit, console)?;
        let mut virtio = VirtioDevices::new(&vm);
        let mut blocks = Vec::new();
        if let Some(path) = &cfg.rootfs {
            let disk = std::fs::OpenOptions::new()
                .read(true)
                .write(!cfg.rootfs_read_only)
                .open(path)
                .map_err(io(format!("cannot open rootfs {}", path.display())))?;
            let irq = virtio.next_interrupt()?;
            let block = Block::new(
                disk,
                cfg.rootfs_read_only,
                "rootfs".into(),
                irq,
                mem.clone(),
            )
            .map_err(io("cannot create virtio-blk"))?;
            let block = Arc::new(Mutex::new(block));
            blocks.push(block.clone());
            virtio.attach(block)?;
        }
        if let Some(net) = &cfg.net {
            let tap = Tap::open(&net.tap)?;
            let dev = Net::new(tap, net.mac, virtio.next_interrupt()?, mem.clone())
                .map_err(io("cannot create virtio-net"))?;
            virtio.attach(Arc::new(Mutex::new(dev)))?;
        }
        if let Some(path) = &cfg.agent_socket {
            let (owned, listener) = OwnedSocket::bind(path, "agent socket")?;
            sockets.push(owned);
            let dev = Console::new(listener, virtio.next_interrupt()?, mem.clone())
                .map_err(io("cannot create virtio-console"))?;
            virtio.attach(Arc::new(Mutex::new(dev)))?;
        }
        let VirtioDevices {
            bus: mmio,
            infos,
            subscribers: devices,
            ..
        } = virtio;
        acpi::write_tables(&mem, cfg.cpus, &infos)?;

        let api = match &cfg.api_socket {
            Some(path) => {
                let (owned, listener) = OwnedSocket::bind(path, "API socket")?;
                sockets.push(owned);
                Some(listener)
            }
            None => None,
        };

        let supported = vm.supported_cpuid()?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let vcpu = Vcpu::new(&vm.fd, id)?;
            vcpu.configure(&supported, cfg.cpus, (id == 0).then_some(&entry))?;
            vcpus.push(vcpu);
        }
        let ctx = VcpuContext {
            pio,
            mmio,
            exit,
            control: Arc::new(VcpuControl::default()),
        };
        Ok(Vmm {
            vm,
            vcpus,
            ctx,
            devices,
            blocks,
            api,
            _sockets: sockets,
        })
    }

    /// Runs the guest until it powers off, resets, is stopped, or fails.
    pub fn run(self) -> Result<ExitReason, Error> {
        install_kick_handler().map_err(|e| io("cannot install the vCPU kick handler")(e.into()))?;
        let gate = DeviceGate::new().map_err(io("cannot create the device gate"))?;
        let device_thread = event_loop::spawn(self.devices, gate.clone())
            .map_err(io("cannot start the device thread"))?;
        let mut threads = Vec::new();
        for vcpu in self.vcpus {
            let ctx = self.ctx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id))
                .spawn(move || vcpu.run_loop(ctx))
                .map_err(io("cannot start a vCPU thread"))?;
            threads.push(t);
        }
        let machine = Arc::new(Machine {
            threads: Mutex::new(threads),
            control: self.ctx.control.clone(),
            gate: gate.clone(),
            exit: self.ctx.exit.clone(),
            state: Mutex::new(RunState::Running),
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
        for block in &self.blocks {
            if let Err(e) = block.lock().unwrap().flush() {
                log::error!("flushing the disk failed: {e}");
            }
        }
        drop(self.vm);
        Ok(reason)
    }
}

/// The port I/O devices: the serial console and the power/reset registers.
fn legacy_devices(vm: &Vm, exit: &Arc<ExitSignal>, console: SerialOutput) -> Result<Bus, Error> {
    let serial = SerialDevice::new(vm.irq_line(SERIAL_GSI)?, console);
    let devices: [(u16, u16, SharedBusDevice); 3] = [
        (SERIAL_PORT, SERIAL_PORT_LEN, Arc::new(Mutex::new(serial))),
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
    for (port, len, dev) in devices {
        pio.insert(port as u64, len as u64, dev)
            .map_err(|e| Error::Devices(e.to_string()))?;
    }
    Ok(pio)
}

/// The running VM as the control API sees it.
struct Machine {
    threads: Mutex<Vec<JoinHandle<Vcpu>>>,
    control: Arc<VcpuControl>,
    gate: Arc<DeviceGate>,
    exit: Arc<ExitSignal>,
    state: Mutex<RunState>,
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
                m.control.request(Target::Pause, &m.threads.lock().unwrap());
                m.gate.pause();
                *state = RunState::Paused;
                Response::state(*state)
            }
            (Request::Resume, RunState::Paused) => {
                m.gate.resume();
                m.control.request(Target::Run, &m.threads.lock().unwrap());
                *state = RunState::Running;
                Response::state(*state)
            }
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
