//! Virtio devices over the MMIO transport (virtio 1.x, "modern" only). [`mmio`] is the register
//! interface the guest driver talks to; each device module (block, net, console) does the
//! data path, driven from the VMM's event loop by queue notifications (ioeventfds).

pub mod attach;
pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod persist;

use crate::memory::GuestMemory;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Size of every queue Hopper's devices offer.
pub const QUEUE_SIZE: u16 = 256;
/// Event data of a device's sources other than its queues (which use their index).
pub const FIRST_DEVICE_TOKEN: u32 = 0x100;

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;

/// Device status bits (virtio 1.x, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// InterruptStatus bits.
const INT_USED_RING: u32 = 1;

/// The interrupt line of one device and its InterruptStatus register.
pub struct Interrupt {
    status: AtomicU32,
    line: EventFd,
}

impl Interrupt {
    pub fn new(line: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.line.write(1) {
            log::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status a snapshot recorded (the line itself is in the saved irqchip state).
    pub fn restore(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// What every virtio device carries: its queues and their notification events, the feature
/// negotiation, and whether the driver has brought it up.
pub struct VirtioCommon {
    pub device_type: u32,
    pub avail_features: u64,
    pub acked_features: u64,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Interrupt,
    pub mem: GuestMemory,
    pub activated: bool,
}

impl VirtioCommon {
    pub fn new(
        device_type: u32,
        avail_features: u64,
        queue_sizes: &[u16],
        interrupt: Interrupt,
        mem: GuestMemory,
    ) -> std::io::Result<Self> {
        let queues = queue_sizes
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are fixed powers of two"))
            .collect();
        let queue_events = queue_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(VirtioCommon {
            device_type,
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            acked_features: 0,
            queues,
            queue_events,
            interrupt,
            mem,
            activated: false,
        })
    }

    /// Puts the device back as before the driver touched it.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
    }

    /// Watches every queue's notification event, tagged with the queue's index.
    pub fn watch_queues(&self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
    }

    /// If `events` is a queue notification, consumes it and returns the queue's index.
    pub fn take_queue_event(&self, events: &Events) -> Option<usize> {
        let index = events.data() as usize;
        let evt = self
            .queue_events
            .get(index)
            .filter(|e| e.as_raw_fd() == events.fd())?;
        // Several notifications may have been coalesced; one pass over the queue serves all.
        let _ = evt.read();
        Some(index)
    }

    /// Marks `head` as done with `len` bytes written and interrupts the guest if it wants to be.
    pub fn complete(&mut self, queue: usize, head: u16, len: u32) {
        let q = &mut self.queues[queue];
        if let Err(e) = q.add_used(&self.mem, head, len) {
            log::error!("virtio queue {queue}: cannot return a buffer: {e}");
            return;
        }
        match q.needs_notification(&self.mem) {
            Ok(false) => {}
            _ => self.interrupt.signal_used_queue(),
        }
    }
}

/// A virtio device as the MMIO transport sees it.
pub trait VirtioDevice: MutEventSubscriber + Send {
    fn common(&self) -> &VirtioCommon;
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Called when the driver sets DRIVER_OK; the queues are configured by then.
    fn activate(&mut self) {
        self.common_mut().activated = true;
    }
    /// Called when the driver resets the device (writes 0 to Status).
    fn reset(&mut self) {
        self.common_mut().reset();
    }
}

/// Copies `config[offset..]` into `data`, leaving bytes past its end as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = (offset as usize).min(config.len());
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
