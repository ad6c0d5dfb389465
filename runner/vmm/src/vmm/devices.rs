//! The devices a VM is made with, in their initial state, from a spec that a fresh build and
//! a restore fill in alike; and the handles a snapshot or a migration reads them by.

use super::{io, Error, ExitSignal, OwnedSocket};
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
use crate::event_loop::Subscriber;
use crate::layout::*;
use crate::persist::{SavedDevices, SavedDisk, SavedNet};
use crate::tap::Tap;
use crate::vm::Vm;
use crate::NetConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The devices a VM gets, with the files and sockets they use.
pub(crate) struct DeviceSpec<'a> {
    pub rootfs: Option<(&'a Path, bool)>,
    pub net: Option<NetConfig>,
    pub agent_socket: Option<&'a Path>,
}

/// Devices as created, with the handles a snapshot needs.
pub(crate) struct Devices {
    pub(super) pio: Bus,
    pub(super) mmio: Bus,
    pub(super) subscribers: Vec<Subscriber>,
    pub parts: SavedParts,
    pub(super) sockets: Vec<OwnedSocket>,
}

/// The devices whose state a snapshot saves, and which devices there are.
pub(crate) struct SavedParts {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) disk: Option<(Arc<Mutex<Block>>, PathBuf)>,
    pub(super) devices: SavedDevices,
}

impl SavedParts {
    pub fn tap(&self) -> Option<&str> {
        self.devices.net.as_ref().map(|n| n.tap.as_str())
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
