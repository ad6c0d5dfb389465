//! Placing virtio devices on the machine: each gets the next MMIO window and interrupt line,
//! its queue notifications wired to ioeventfds, a transport on the MMIO bus, and a place in
//! the device event loop. The windows and lines collected here are what the DSDT describes.

use super::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use super::{Interrupt, VirtioDevice};
use crate::acpi::MmioDeviceInfo;
use crate::devices::Bus;
use crate::event_loop::Subscriber;
use crate::layout::{FIRST_VIRTIO_GSI, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::vm::{Vm, VmError};
use kvm_ioctls::IoEventAddress;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot wire a queue notification: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::OverlapError),
}

pub struct VirtioDevices<'a> {
    vm: &'a Vm,
    pub bus: Bus,
    pub infos: Vec<MmioDeviceInfo>,
    pub subscribers: Vec<Subscriber>,
    /// In attach order, which is the order a restore attaches them in again.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl<'a> VirtioDevices<'a> {
    pub fn new(vm: &'a Vm) -> Self {
        VirtioDevices {
            vm,
            bus: Bus::default(),
            infos: Vec::new(),
            subscribers: Vec::new(),
            transports: Vec::new(),
        }
    }

    fn next_info(&self) -> MmioDeviceInfo {
        let index = self.infos.len() as u64;
        MmioDeviceInfo {
            base: VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE,
            len: VIRTIO_MMIO_SIZE,
            gsi: FIRST_VIRTIO_GSI + index as u32,
        }
    }

    /// The interrupt line the next attached device will use.
    pub fn next_interrupt(&self) -> Result<Interrupt, VmError> {
        Ok(Interrupt::new(self.vm.irq_line(self.next_info().gsi)?))
    }

    /// Attaches a device made with [`Self::next_interrupt`].
    pub fn attach<D: VirtioDevice + 'static>(
        &mut self,
        dev: Arc<Mutex<D>>,
    ) -> Result<(), AttachError> {
        let info = self.next_info();
        let notify = IoEventAddress::Mmio(info.base + REG_QUEUE_NOTIFY);
        for (q, evt) in dev.lock().unwrap().common().queue_events.iter().enumerate() {
            self.vm
                .fd
                .register_ioevent(evt, &notify, q as u32)
                .map_err(AttachError::IoEvent)?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(dev.clone())));
        self.bus.insert(info.base, info.len, transport.clone())?;
        self.transports.push(transport);
        self.infos.push(info);
        self.subscribers.push(dev);
        Ok(())
    }
}
