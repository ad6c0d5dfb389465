//! virtio-console with a single port: the agent channel. The guest sees it as /dev/hvc0; the
//! host end is a Unix socket that one client at a time (the runner, a test) connects to.
//! Guest output that arrives while nobody is connected is kept (up to a bound) and delivered
//! on connect, so the agent's first "ready" message is never lost.

use super::{
    read_config_bytes, Interrupt, VirtioCommon, VirtioDevice, FIRST_DEVICE_TOKEN, QUEUE_SIZE,
    TYPE_CONSOLE,
};
use crate::memory::GuestMemory;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use virtio_queue::QueueT;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Guest output kept for a host that is not connected yet.
const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Host input read ahead of the guest's buffers.
const MAX_PENDING_INPUT: usize = 64 << 10;

const TOKEN_LISTENER: u32 = FIRST_DEVICE_TOKEN;
const TOKEN_CLIENT: u32 = FIRST_DEVICE_TOKEN + 1;

pub struct Console {
    common: VirtioCommon,
    listener: UnixListener,
    client: Option<UnixStream>,
    to_host: VecDeque<u8>,
    to_guest: VecDeque<u8>,
}

impl Console {
    pub fn new(
        listener: UnixListener,
        interrupt: Interrupt,
        mem: GuestMemory,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Console {
            common: VirtioCommon::new(TYPE_CONSOLE, 0, &[QUEUE_SIZE, QUEUE_SIZE], interrupt, mem)?,
            listener,
            client: None,
            to_host: VecDeque::new(),
            to_guest: VecDeque::new(),
        })
    }

    /// Moves what the guest transmitted into the host-bound buffer.
    fn drain_tx(&mut self) {
        let mem = self.common.mem.clone();
        while let Some(chain) = self.common.queues[TX_QUEUE].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut r) => {
                    let mut buf = Vec::with_capacity(r.available_bytes());
                    if let Err(e) = r.read_to_end(&mut buf) {
                        log::warn!("virtio-console: cannot read guest output: {e}");
                    }
                    self.to_host.extend(buf);
                }
                Err(e) => log::warn!("virtio-console: bad descriptor chain: {e}"),
            }
            self.common.complete(TX_QUEUE, head, 0);
        }
        let excess = self.to_host.len().saturating_sub(MAX_PENDING_OUTPUT);
        if excess > 0 {
            log::warn!("virtio-console: no host reader; dropped {excess} bytes of guest output");
            self.to_host.drain(..excess);
        }
    }

    /// Hands buffered host input to the guest's receive buffers.
    fn fill_rx(&mut self) {
        let mem = self.common.mem.clone();
        while !self.to_guest.is_empty() {
            let Some(chain) = self.common.queues[RX_QUEUE].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(self.to_guest.len());
                    let chunk: Vec<u8> = self.to_guest.drain(..n).collect();
                    if let Err(e) = w.write_all(&chunk) {
                        log::warn!("virtio-console: cannot write guest input: {e}");
                    }
                    n as u32
                }
                Err(e) => {
                    log::warn!("virtio-console: bad descriptor chain: {e}");
                    0
                }
            };
            self.common.complete(RX_QUEUE, head, written);
        }
    }

    /// Writes as much host-bound output as the client takes; returns false if it went away.
    fn flush_to_host(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else {
            return true;
        };
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match client.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn read_from_host(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else {
            return true;
        };
        let mut buf = [0u8; 4096];
        while self.to_guest.len() < MAX_PENDING_INPUT {
            match client.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.to_guest.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn client_interest(&self) -> EventSet {
        let mut set = EventSet::READ_HANG_UP;
        if self.to_guest.len() < MAX_PENDING_INPUT {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some(c) = self.client.take() {
            let _ = ops.remove(Events::with_data(&c, TOKEN_CLIENT, EventSet::empty()));
            log::debug!("virtio-console: host end disconnected");
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            // The newest connection wins: a restarted runner reclaims the channel.
            self.drop_client(ops);
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let events = Events::with_data(&stream, TOKEN_CLIENT, self.client_interest());
            if let Err(e) = ops.add(events) {
                log::error!("virtio-console: cannot watch the client: {e:?}");
                continue;
            }
            self.client = Some(stream);
        }
    }
}

impl VirtioDevice for Console {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: all zero without the features that use them.
        read_config_bytes(&[0u8; 12], offset, data);
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queues(ops);
        let listener = Events::with_data(&self.listener, TOKEN_LISTENER, EventSet::IN);
        if let Err(e) = ops.add(listener) {
            log::error!("virtio-console: cannot watch the agent socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut alive = true;
        match self.common.take_queue_event(&events) {
            Some(TX_QUEUE) if self.common.activated => self.drain_tx(),
            Some(_) => {}
            None if events.data() == TOKEN_LISTENER => self.accept(ops),
            None => {
                if events.event_set().contains(EventSet::IN) {
                    alive &= self.read_from_host();
                }
                let gone = EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
                if events.event_set().intersects(gone) {
                    alive = false;
                }
            }
        }
        if self.common.activated {
            self.fill_rx();
        }
        alive &= self.flush_to_host();
        if !alive {
            self.drop_client(ops);
        } else if let Some(c) = &self.client {
            let _ = ops.modify(Events::with_data(c, TOKEN_CLIENT, self.client_interest()));
        }
    }
}
