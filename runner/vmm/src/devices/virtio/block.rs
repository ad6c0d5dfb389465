//! virtio-blk backed by a raw image file. Requests are served synchronously on the event loop
//! thread, so that when the loop is paused no I/O is in flight (what snapshots need).

use super::{read_config_bytes, Interrupt, VirtioCommon, VirtioDevice, QUEUE_SIZE, TYPE_BLOCK};
use crate::memory::GuestMemory;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::bitmap::AtomicBitmap;

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const VIRTIO_BLK_ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("malformed descriptor chain: {0}")]
    Chain(String),
    #[error("sector {sector} + {len} bytes is beyond the disk's end")]
    OutOfRange { sector: u64, len: usize },
    #[error("disk I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Parts of the image that are not there yet (a post-copy migration brings them in the
/// background): a request waits until the range it touches has arrived.
pub trait Arriving: Send + Sync {
    fn wait_for(&self, offset: u64, len: usize) -> std::io::Result<()>;
}

pub struct Block {
    common: VirtioCommon,
    disk: File,
    capacity_sectors: u64,
    read_only: bool,
    id: String,
    /// While a migration copies the disk: the blocks written since it last looked.
    written: Option<Arc<AtomicBitmap>>,
    arriving: Option<Arc<dyn Arriving>>,
}

impl Block {
    pub fn new(
        disk: File,
        read_only: bool,
        id: String,
        interrupt: Interrupt,
        mem: GuestMemory,
    ) -> std::io::Result<Self> {
        let size = disk.metadata()?.len();
        let mut features = VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            common: VirtioCommon::new(TYPE_BLOCK, features, &[QUEUE_SIZE], interrupt, mem)?,
            disk,
            capacity_sectors: size / SECTOR_SIZE,
            read_only,
            id,
            written: None,
            arriving: None,
        })
    }

    fn process_queue(&mut self) {
        let mem = self.common.mem.clone();
        while let Some(chain) = self.common.queues[0].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let reader = chain.clone().reader(&mem);
            let writer = chain.writer(&mem);
            let written = match (reader, writer) {
                (Ok(r), Ok(w)) => self.serve(r, w),
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("virtio-blk: bad descriptor chain: {e}");
                    0
                }
            };
            self.common.complete(0, head, written);
        }
    }

    /// Serves one request and returns how many bytes it wrote into guest memory.
    fn serve(
        &mut self,
        mut req: Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        mut out: Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> u32 {
        let Some(status_at) = out.available_bytes().checked_sub(1) else {
            log::warn!("virtio-blk: request without a status byte");
            return 0;
        };
        let mut status = match out.split_at(status_at) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("virtio-blk: {e}");
                return 0;
            }
        };
        let result = self.execute(&mut req, &mut out);
        let code = match &result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::warn!("virtio-blk: {e}");
                e.status()
            }
        };
        let _ = status.write_all(&[code]);
        (out.bytes_written() + 1) as u32
    }

    fn execute(
        &mut self,
        req: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        out: &mut Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<(), RequestError> {
        let type_: u32 = req
            .read_obj()
            .map_err(|e| RequestError::Chain(e.to_string()))?;
        let _reserved: u32 = req
            .read_obj()
            .map_err(|e| RequestError::Chain(e.to_string()))?;
        let sector: u64 = req
            .read_obj()
            .map_err(|e| RequestError::Chain(e.to_string()))?;
        match type_ {
            VIRTIO_BLK_T_IN => {
                let len = out.available_bytes();
                let offset = self.check_range(sector, len)?;
                self.wait_for(offset, len)?;
                let mut buf = vec![0u8; len];
                self.disk.read_exact_at(&mut buf, offset)?;
                out.write_all(&buf)?;
            }
            VIRTIO_BLK_T_OUT if self.read_only => return Err(RequestError::Unsupported(type_)),
            VIRTIO_BLK_T_OUT => {
                let len = req.available_bytes();
                let offset = self.check_range(sector, len)?;
                // A partial write of a block that has not arrived must land on its data.
                self.wait_for(offset, len)?;
                let mut buf = vec![0u8; len];
                req.read_exact(&mut buf)?;
                self.disk.write_all_at(&buf, offset)?;
                // Marked after the write: a copier that clears the mark and then reads the
                // block sees this data, or is told again.
                if let Some(written) = &self.written {
                    written.set_addr_range(offset as usize, len);
                }
            }
            VIRTIO_BLK_T_FLUSH => self.disk.sync_data()?,
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                let n = self.id.len().min(VIRTIO_BLK_ID_BYTES);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let n = out.available_bytes().min(VIRTIO_BLK_ID_BYTES);
                out.write_all(&id[..n])?;
            }
            other => return Err(RequestError::Unsupported(other)),
        }
        Ok(())
    }

    fn check_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(len as u64));
        match end {
            Some(end) if end <= self.capacity_sectors * SECTOR_SIZE => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::OutOfRange { sector, len }),
        }
    }

    fn wait_for(&self, offset: u64, len: usize) -> std::io::Result<()> {
        match &self.arriving {
            Some(arriving) if len > 0 => arriving.wait_for(offset, len),
            _ => Ok(()),
        }
    }

    /// Makes requests wait for the parts of the image that `arriving` still lacks (or stops).
    pub fn fill_from(&mut self, arriving: Option<Arc<dyn Arriving>>) {
        self.arriving = arriving;
    }

    /// Records the guest's writes in `log` (one bit per block of its page size), or stops.
    pub fn track_writes(&mut self, log: Option<Arc<AtomicBitmap>>) {
        self.written = log;
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.capacity_sectors * SECTOR_SIZE
    }

    /// Makes everything the guest wrote durable (before a snapshot or a stop).
    pub fn flush(&self) -> std::io::Result<()> {
        self.disk.sync_data()
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.capacity_sectors.to_le_bytes(), offset, data);
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.watch_queues(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.common.take_queue_event(&events).is_some() && self.common.activated {
            self.process_queue();
        }
    }
}
