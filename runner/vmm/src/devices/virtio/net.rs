//! virtio-net on a TAP device. No offloads are negotiated: frames are at most one MTU, and each
//! receive buffer the guest posts holds a whole frame.

use super::{
    read_config_bytes, Interrupt, VirtioCommon, VirtioDevice, FIRST_DEVICE_TOKEN, QUEUE_SIZE,
    TYPE_NET,
};
use crate::memory::GuestMemory;
use crate::tap::{Tap, VNET_HDR_LEN};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::io::{ErrorKind, Read, Write};
use virtio_queue::QueueT;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Largest frame a TAP hands over without offloads, with its virtio header.
const MAX_FRAME: usize = 65_562;

const TOKEN_TAP: u32 = FIRST_DEVICE_TOKEN;

/// The MAC address of the host's end of a guest's TAP, derived from the guest's: the same
/// wherever and whenever the guest's TAP is created (after a restore, on another host), so the
/// guest's ARP entry for its gateway stays right. A fresh TAP would get a random address, and
/// the host would drop the guest's frames as meant for another machine until the guest asked
/// again. It differs from the guest's in one bit and stays unicast and locally administered.
pub fn host_side_mac(guest: [u8; 6]) -> [u8; 6] {
    let mut host = guest;
    host[0] = ((guest[0] ^ 0x04) | 0x02) & !0x01;
    host
}

pub struct Net {
    common: VirtioCommon,
    tap: Tap,
    mac: [u8; 6],
    /// A frame read from the TAP while the guest had no receive buffer for it.
    pending_rx: Option<Vec<u8>>,
    rx_buf: Vec<u8>,
}

impl Net {
    pub fn new(
        tap: Tap,
        mac: [u8; 6],
        interrupt: Interrupt,
        mem: GuestMemory,
    ) -> std::io::Result<Self> {
        Ok(Net {
            common: VirtioCommon::new(
                TYPE_NET,
                VIRTIO_NET_F_MAC,
                &[QUEUE_SIZE, QUEUE_SIZE],
                interrupt,
                mem,
            )?,
            tap,
            mac,
            pending_rx: None,
            rx_buf: vec![0; MAX_FRAME],
        })
    }

    fn process_tx(&mut self) {
        let mem = self.common.mem.clone();
        while let Some(chain) = self.common.queues[TX_QUEUE].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut r) => {
                    let mut frame = Vec::with_capacity(r.available_bytes());
                    match r.read_to_end(&mut frame) {
                        Ok(_) if frame.len() > VNET_HDR_LEN => {
                            if let Err(e) = self.tap.write_frame(&frame) {
                                // The host dropping a frame is what a real link does too.
                                log::debug!("virtio-net: TAP refused a frame: {e}");
                            }
                        }
                        Ok(_) => log::debug!("virtio-net: runt frame dropped"),
                        Err(e) => log::warn!("virtio-net: cannot read a guest frame: {e}"),
                    }
                }
                Err(e) => log::warn!("virtio-net: bad descriptor chain: {e}"),
            }
            self.common.complete(TX_QUEUE, head, 0);
        }
    }

    /// Gives `frame` to the guest; returns false when it has no receive buffer posted.
    fn deliver(&mut self, frame: &[u8]) -> bool {
        let mem = self.common.mem.clone();
        let Some(chain) = self.common.queues[RX_QUEUE].pop_descriptor_chain(&mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = match chain.writer(&mem) {
            Ok(mut w) if w.available_bytes() >= frame.len() => match w.write_all(frame) {
                Ok(()) => frame.len() as u32,
                Err(e) => {
                    log::warn!("virtio-net: cannot write a frame to the guest: {e}");
                    0
                }
            },
            Ok(w) => {
                log::warn!(
                    "virtio-net: {}-byte frame dropped, guest buffer holds {}",
                    frame.len(),
                    w.available_bytes()
                );
                0
            }
            Err(e) => {
                log::warn!("virtio-net: bad descriptor chain: {e}");
                0
            }
        };
        self.common.complete(RX_QUEUE, head, written);
        true
    }

    /// Moves frames from the TAP to the guest until either runs dry.
    fn process_rx(&mut self) {
        if let Some(frame) = self.pending_rx.take() {
            if !self.deliver(&frame) {
                self.pending_rx = Some(frame);
                return;
            }
        }
        loop {
            let n = match self.tap.read_frame(&mut self.rx_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: TAP read failed: {e}");
                    return;
                }
            };
            let frame = self.rx_buf[..n].to_vec();
            if !self.deliver(&frame) {
                self.pending_rx = Some(frame);
                return;
            }
        }
    }
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn reset(&mut self) {
        self.common.reset();
        self.pending_rx = None;
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queues(ops);
        // Edge-triggered: frames left in the TAP while the guest has no buffers must not wake
        // the loop again and again; a receive-queue notification resumes reading instead.
        let tap = Events::with_data(
            &self.tap,
            TOKEN_TAP,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(tap) {
            log::error!("virtio-net: cannot watch the TAP device: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let queue = self.common.take_queue_event(&events);
        if queue == Some(TX_QUEUE) && self.common.activated {
            self.process_tx();
        }
        if self.common.activated {
            self.process_rx();
        } else if queue.is_none() {
            // Frames for a guest whose driver is not up yet are dropped, as a NIC would.
            while self.tap.read_frame(&mut self.rx_buf).is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_side_mac_is_stable_unicast_local_and_not_the_guests() {
        for guest in [
            [6, 0, 0xac, 0x10, 0, 2],
            [0x02, 1, 2, 3, 4, 5],
            [0x52, 0x54, 0, 1, 2, 3],
        ] {
            let host = host_side_mac(guest);
            assert_ne!(host, guest);
            assert_eq!(host, host_side_mac(guest));
            assert_eq!(host[0] & 0x03, 0x02, "{host:x?}");
            assert_eq!(host[1..], guest[1..]);
        }
    }
}
