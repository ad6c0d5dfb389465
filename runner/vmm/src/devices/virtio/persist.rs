//! The saved state of a virtio device: its MMIO transport registers, feature negotiation,
//! interrupt status and every queue's position. Block requests are served synchronously, so
//! none is in flight once the device thread is parked; the console's host connection and the
//! bytes buffered for it belong to the old process and are not carried (the host reconnects).

use super::mmio::MmioState;
use super::VirtioCommon;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// `virtio_queue::QueueState`, which has no serde support of its own.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedQueue(#[serde(with = "QueueStateDef")] QueueState);

#[derive(Serialize, Deserialize)]
pub struct VirtioState {
    pub device_type: u32,
    pub transport: MmioState,
    pub acked_features: u64,
    pub interrupt_status: u32,
    pub activated: bool,
    queues: Vec<SavedQueue>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioRestoreError {
    #[error("saved device type {saved} where this VM has device type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("saved device has {saved} queues, this one {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("saved queue {index} is invalid: {source}")]
    Queue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("saved features {acked:#x} include some this device does not offer ({offered:#x})")]
    Features { acked: u64, offered: u64 },
}

impl VirtioCommon {
    pub(super) fn save(&self, transport: &MmioState) -> VirtioState {
        VirtioState {
            device_type: self.device_type,
            transport: transport.clone(),
            acked_features: self.acked_features,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: self.queues.iter().map(|q| SavedQueue(q.state())).collect(),
        }
    }

    pub(super) fn restore(&mut self, state: &VirtioState) -> Result<(), VirtioRestoreError> {
        if state.device_type != self.device_type {
            return Err(VirtioRestoreError::DeviceType {
                saved: state.device_type,
                here: self.device_type,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(VirtioRestoreError::QueueCount {
                saved: state.queues.len(),
                here: self.queues.len(),
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(VirtioRestoreError::Features {
                acked: state.acked_features,
                offered: self.avail_features,
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                Queue::try_from(q.0).map_err(|source| VirtioRestoreError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.acked_features = state.acked_features;
        self.activated = state.activated;
        self.interrupt.restore(state.interrupt_status);
        Ok(())
    }

    /// Makes the device look at every queue once, as after a notification: requests the
    /// guest posted just before the snapshot had their notification in the old process.
    pub(super) fn notify_all_queues(&self) {
        for evt in &self.queue_events {
            let _ = evt.write(1);
        }
    }
}
