//! The virtio-mmio register interface (virtio 1.x, 4.2.2): feature negotiation, queue set-up,
//! status, interrupt status/acknowledge, and the device-specific configuration space.

use super::persist::{VirtioRestoreError, VirtioState};
use super::{
    VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK,
};
use crate::devices::BusDevice;
use std::sync::{Arc, Mutex};
use virtio_queue::QueueT;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4850_5052; // "HPPR"

/// Register offsets.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// The transport's own registers, apart from the device (saved with it in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    state: MmioState,
}

impl MmioTransport {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        MmioTransport {
            device,
            state: MmioState::default(),
        }
    }

    /// The device's state and this transport's, for a snapshot; the device must be idle
    /// (device thread parked, vCPUs paused).
    pub fn save(&self) -> VirtioState {
        self.device.lock().unwrap().common().save(&self.state)
    }

    /// Puts a saved state into this (freshly created, identically configured) transport and
    /// its device, and has the device look at its queues once it runs.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), VirtioRestoreError> {
        let device = self.device.clone();
        let mut device = device.lock().unwrap();
        device.common_mut().restore(state)?;
        self.state = state.transport.clone();
        device.common().notify_all_queues();
        Ok(())
    }

    fn read_reg(&self, dev: &dyn VirtioDevice, offset: u64) -> u32 {
        let c = dev.common();
        let queue = c.queues.get(self.state.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => c.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => c.avail_features as u32,
                1 => (c.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size() as u32),
            REG_QUEUE_READY => queue.map_or(0, |q| q.ready() as u32),
            REG_INTERRUPT_STATUS => c.interrupt.status(),
            REG_STATUS => self.state.status,
            REG_CONFIG_GENERATION => self.state.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, dev: &mut dyn VirtioDevice, offset: u64, value: u32) {
        let queue_sel = self.state.queue_sel as usize;
        // Queue layout may only change before the driver declares itself ready.
        let configurable = self.state.status & STATUS_DRIVER_OK == 0;
        let c = dev.common_mut();
        let with_queue = |c: &mut super::VirtioCommon,
                          f: &mut dyn FnMut(&mut virtio_queue::Queue)| {
            match c.queues.get_mut(queue_sel) {
                Some(q) if configurable => f(q),
                _ => log::warn!("virtio-mmio: ignored queue write to {offset:#x}"),
            }
        };
        match offset {
            REG_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.state.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.state.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                // The driver can only accept what the device offers.
                let offered = (c.avail_features >> shift) as u32;
                c.acked_features |= ((value & offered) as u64) << shift;
            }
            REG_QUEUE_SEL => self.state.queue_sel = value,
            REG_QUEUE_NUM => with_queue(c, &mut |q| q.set_size(value as u16)),
            REG_QUEUE_READY => with_queue(c, &mut |q| q.set_ready(value == 1)),
            REG_QUEUE_DESC_LOW => {
                with_queue(c, &mut |q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                with_queue(c, &mut |q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                with_queue(c, &mut |q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                with_queue(c, &mut |q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                with_queue(c, &mut |q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                with_queue(c, &mut |q| q.set_used_ring_address(None, Some(value)))
            }
            REG_INTERRUPT_ACK => c.interrupt.ack(value),
            REG_STATUS => self.set_status(dev, value),
            _ => log::debug!("virtio-mmio: write of {value:#x} to register {offset:#x} ignored"),
        }
    }

    fn set_status(&mut self, dev: &mut dyn VirtioDevice, value: u32) {
        if value == 0 {
            dev.reset();
            self.state = MmioState {
                config_generation: self.state.config_generation,
                ..MmioState::default()
            };
            return;
        }
        let old = self.state.status;
        // Status bits only accumulate, in the order the specification gives.
        let valid = value & old == old
            && match value & !old {
                STATUS_ACKNOWLEDGE => old == 0,
                STATUS_DRIVER => old == STATUS_ACKNOWLEDGE,
                STATUS_FEATURES_OK => old == STATUS_ACKNOWLEDGE | STATUS_DRIVER,
                STATUS_DRIVER_OK => old == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                STATUS_FAILED => true,
                _ => false,
            };
        if !valid {
            log::warn!("virtio-mmio: status change {old:#x} -> {value:#x} refused");
            return;
        }
        self.state.status = value;
        if value & !old == STATUS_DRIVER_OK {
            let c = dev.common();
            let mem = c.mem.clone();
            if c.queues.iter().all(|q| !q.ready() || q.is_valid(&mem)) {
                dev.activate();
            } else {
                log::error!("virtio-mmio: driver set up an invalid queue; device left inactive");
                self.state.status |= STATUS_FAILED;
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let dev = self.device.clone();
        let dev = dev.lock().unwrap();
        if offset >= REG_CONFIG {
            dev.read_config(offset - REG_CONFIG, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_reg(&*dev, offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            log::debug!("virtio-mmio: config space writes are not supported");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!("virtio-mmio: {}-byte register write ignored", data.len());
            return;
        };
        let dev = self.device.clone();
        let mut dev = dev.lock().unwrap();
        if offset == REG_QUEUE_NOTIFY {
            // Normally caught by the queue's ioeventfd in KVM; forward any that reach us.
            let q = u32::from_le_bytes(bytes) as usize;
            if let Some(evt) = dev.common().queue_events.get(q) {
                let _ = evt.write(1);
            }
            return;
        }
        self.write_reg(&mut *dev, offset, u32::from_le_bytes(bytes));
    }
}
