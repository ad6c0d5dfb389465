//! The migration protocol: frames on one byte stream (the transport, [`super::transport`],
//! makes it authenticated and encrypted). Each frame is a tag byte, a little-endian u32 payload
//! length and the payload.
//!
//! Source → target: `Hello` (what the VM is made of; the target answers `Accept` or `Abort`
//! before anything else is sent), any number
//! of `Memory` and `Disk` batches (pre-copy rounds, then the final delta while the VM is
//! paused), `State` (vCPUs, VM, devices), then `Commit` after the target said `Ready`.
//! Each pre-copy round ends with `Sync` on every stream, which the target answers with
//! `Synced` once it has stored all before it: the source then knows the round's real rate,
//! and its pause does not begin with data still in flight.
//! Target → source: `Ready` once the VM is built from what arrived (not running), `Committed`
//! once it runs. Either side may send `Abort` with a reason instead.
//!
//! With several streams (the hello says how many), the source opens the others once accepted;
//! each carries the units of every other MiB of guest address (or disk offset), so that a
//! unit always travels on the same stream, and ends with `Done` before the state (or plan)
//! goes out on the first.
//!
//! Post-copy (the hello says so) moves the rest after the handover: the source opens a second
//! connection (the pull channel) once accepted, sends `Plan` (what the target still lacks)
//! instead of the final delta, then, after the commit, pushes what the plan names and `Done`.
//! On the pull channel the target asks (`PullPages`, `PullBlocks`) for what the guest touches
//! before it arrived, is answered with a batch, and says `Complete` once it has everything.

use crate::persist::{MachineState, SavedDevices};
use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Bumped whenever a frame's meaning changes; a peer with another version is refused.
pub const VERSION: u32 = 3;
/// Larger frames mean a broken or hostile peer.
const MAX_FRAME: usize = 64 << 20;

/// What the target needs to know before any memory arrives: to refuse early (another CPU,
/// missing sockets) and to lay out memory and disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub memory_mib: u64,
    /// (guest address, length) of every RAM region.
    pub regions: Vec<(u64, u64)>,
    /// The root disk's length in bytes, if the VM has one.
    pub disk_len: Option<u64>,
    pub devices: SavedDevices,
    pub vcpus: u8,
    /// The first vCPU's CPUID: the features the guest may use.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The rest of memory and disk moves after the handover.
    pub postcopy: bool,
    /// Connections that carry memory and disk before the handover (this one included).
    pub streams: u8,
}

/// Pages and disk blocks: per RAM region a bitmap of pages (bit `i % 64` of word `i / 64`),
/// and a bitmap of disk blocks. On the source, what is dirty and not yet sent; sent when a
/// post-copy hands over, what the target lacks (pages it holds that are set here are stale;
/// pages neither held nor set are zero).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub memory: Vec<Vec<u64>>,
    pub disk: Vec<u64>,
}

/// Equal-sized units (pages of memory, blocks of disk) at their offsets; a unit of zeros is
/// sent as a marker only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub unit: usize,
    pub items: Vec<(u64, Unit)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    Zero,
    Data(Vec<u8>),
}

impl Unit {
    /// `data` as a unit, a zero marker when it holds only zeros.
    pub fn of(data: &[u8]) -> Unit {
        if data.iter().all(|b| *b == 0) {
            Unit::Zero
        } else {
            Unit::Data(data.to_vec())
        }
    }
}

pub enum Frame {
    Hello(Box<Hello>),
    Accept,
    Memory(Batch),
    Disk(Batch),
    State(Box<MachineState>),
    Ready,
    Commit,
    Committed,
    Abort(String),
    Plan(Box<Plan>),
    /// Guest addresses of pages the target needs now.
    PullPages(Vec<u64>),
    /// Disk offsets of blocks the target needs now.
    PullBlocks(Vec<u64>),
    Done,
    Complete,
    Sync,
    Synced,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the migration channel failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent a malformed frame: {0}")]
    Malformed(String),
    #[error("the peer speaks migration protocol version {0}; this Hopper speaks {VERSION}")]
    Version(u32),
}

const KIND_ZERO: u8 = 0;
const KIND_RAW: u8 = 1;
const KIND_LZ4: u8 = 2;

impl Frame {
    fn tag(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Memory(_) => 2,
            Frame::Disk(_) => 3,
            Frame::State(_) => 4,
            Frame::Ready => 5,
            Frame::Commit => 6,
            Frame::Committed => 7,
            Frame::Abort(_) => 8,
            Frame::Accept => 9,
            Frame::Plan(_) => 10,
            Frame::PullPages(_) => 11,
            Frame::PullBlocks(_) => 12,
            Frame::Done => 13,
            Frame::Complete => 14,
            Frame::Sync => 15,
            Frame::Synced => 16,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Memory(_) => "memory",
            Frame::Disk(_) => "disk",
            Frame::State(_) => "state",
            Frame::Ready => "ready",
            Frame::Commit => "commit",
            Frame::Committed => "committed",
            Frame::Abort(_) => "abort",
            Frame::Accept => "accept",
            Frame::Plan(_) => "plan",
            Frame::PullPages(_) => "pull-pages",
            Frame::PullBlocks(_) => "pull-blocks",
            Frame::Done => "done",
            Frame::Complete => "complete",
            Frame::Sync => "sync",
            Frame::Synced => "synced",
        }
    }
}

/// LZ4 while it pays: after [`Compressor::GIVE_UP`] units in a row that it did not shrink by
/// an eighth, only every [`Compressor::PROBE_EVERY`]th unit is tried, until one shrinks
/// again. Incompressible memory then costs almost no compression time.
#[derive(Debug, Default)]
pub struct Compressor {
    misses: u32,
    skipped: u32,
    /// Units LZ4 was tried on.
    pub tried: u64,
}

impl Compressor {
    const GIVE_UP: u32 = 32;
    const PROBE_EVERY: u32 = 64;

    /// The kind and bytes `data` goes out as.
    fn pack<'a>(&mut self, data: &'a [u8], packed: &'a mut Vec<u8>) -> (u8, &'a [u8]) {
        if self.misses >= Self::GIVE_UP {
            self.skipped += 1;
            if self.skipped < Self::PROBE_EVERY {
                return (KIND_RAW, data);
            }
            self.skipped = 0;
        }
        self.tried += 1;
        *packed = lz4_flex::compress(data);
        if packed.len() <= data.len() - data.len() / 8 {
            self.misses = 0;
            (KIND_LZ4, &packed[..])
        } else {
            self.misses += 1;
            (KIND_RAW, data)
        }
    }
}

/// Writes `frame`; returns the bytes it took on the stream.
pub fn write_frame(
    w: &mut impl Write,
    frame: &Frame,
    compressor: &mut Compressor,
) -> io::Result<u64> {
    let payload = match frame {
        Frame::Hello(h) => serde_json::to_vec(h).map_err(io::Error::other)?,
        Frame::State(s) => serde_json::to_vec(s).map_err(io::Error::other)?,
        Frame::Memory(b) | Frame::Disk(b) => encode_batch(b, compressor),
        Frame::Abort(reason) => reason.as_bytes().to_vec(),
        Frame::Plan(p) => serde_json::to_vec(p).map_err(io::Error::other)?,
        Frame::PullPages(at) | Frame::PullBlocks(at) => {
            at.iter().flat_map(|a| a.to_le_bytes()).collect()
        }
        Frame::Accept
        | Frame::Ready
        | Frame::Commit
        | Frame::Committed
        | Frame::Done
        | Frame::Complete
        | Frame::Sync
        | Frame::Synced => Vec::new(),
    };
    if payload.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a {} frame of {} bytes is too large",
            frame.name(),
            payload.len()
        )));
    }
    w.write_all(&[frame.tag()])?;
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(&payload)?;
    Ok(5 + payload.len() as u64)
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header)?;
    let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::Malformed(format!("{len}-byte frame")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let json = |what: &str, e: serde_json::Error| ProtocolError::Malformed(format!("{what}: {e}"));
    Ok(match header[0] {
        1 => {
            // The version first: another version's hello may not parse as this one's.
            #[derive(Deserialize)]
            struct Versioned {
                version: u32,
            }
            let Versioned { version } =
                serde_json::from_slice(&payload).map_err(|e| json("hello", e))?;
            if version != VERSION {
                return Err(ProtocolError::Version(version));
            }
            Frame::Hello(Box::new(
                serde_json::from_slice(&payload).map_err(|e| json("hello", e))?,
            ))
        }
        2 => Frame::Memory(decode_batch(&payload)?),
        3 => Frame::Disk(decode_batch(&payload)?),
        4 => Frame::State(Box::new(
            serde_json::from_slice(&payload).map_err(|e| json("state", e))?,
        )),
        5 => Frame::Ready,
        6 => Frame::Commit,
        7 => Frame::Committed,
        8 => Frame::Abort(String::from_utf8_lossy(&payload).into_owned()),
        9 => Frame::Accept,
        10 => Frame::Plan(Box::new(
            serde_json::from_slice(&payload).map_err(|e| json("plan", e))?,
        )),
        11 => Frame::PullPages(offsets(&payload)?),
        12 => Frame::PullBlocks(offsets(&payload)?),
        13 => Frame::Done,
        14 => Frame::Complete,
        15 => Frame::Sync,
        16 => Frame::Synced,
        tag => return Err(ProtocolError::Malformed(format!("unknown frame tag {tag}"))),
    })
}

/// Batch payload: unit size (u32), item count (u32), then per item its offset (u64), a kind
/// byte and, for data, a u32 length and the bytes (LZ4 where that saves an eighth or more).
fn encode_batch(batch: &Batch, compressor: &mut Compressor) -> Vec<u8> {
    let mut packed = Vec::new();
    let mut out = Vec::with_capacity(8 + batch.items.len() * (batch.unit + 13));
    out.extend_from_slice(&(batch.unit as u32).to_le_bytes());
    out.extend_from_slice(&(batch.items.len() as u32).to_le_bytes());
    for (at, unit) in &batch.items {
        out.extend_from_slice(&at.to_le_bytes());
        match unit {
            Unit::Zero => out.push(KIND_ZERO),
            Unit::Data(data) => {
                let (kind, bytes) = compressor.pack(data, &mut packed);
                out.push(kind);
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
    out
}

fn decode_batch(payload: &[u8]) -> Result<Batch, ProtocolError> {
    let mut cursor = payload;
    let unit = take_u32(&mut cursor)? as usize;
    let count = take_u32(&mut cursor)? as usize;
    if unit == 0 || unit > MAX_FRAME || count > payload.len() {
        return Err(ProtocolError::Malformed(format!(
            "batch of {count} units of {unit} bytes"
        )));
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let at = u64::from_le_bytes(take(&mut cursor, 8)?.try_into().unwrap());
        let kind = take(&mut cursor, 1)?[0];
        let data = match kind {
            KIND_ZERO => Unit::Zero,
            KIND_RAW | KIND_LZ4 => {
                let len = take_u32(&mut cursor)? as usize;
                let bytes = take(&mut cursor, len)?;
                let data = if kind == KIND_RAW {
                    bytes.to_vec()
                } else {
                    lz4_flex::decompress(bytes, unit)
                        .map_err(|e| ProtocolError::Malformed(format!("LZ4 unit: {e}")))?
                };
                if data.len() != unit {
                    return Err(ProtocolError::Malformed(format!(
                        "a {}-byte unit in a batch of {unit}-byte units",
                        data.len()
                    )));
                }
                Unit::Data(data)
            }
            other => return Err(ProtocolError::Malformed(format!("unit kind {other}"))),
        };
        items.push((at, data));
    }
    if !cursor.is_empty() {
        return Err(ProtocolError::Malformed("bytes after the last unit".into()));
    }
    Ok(Batch { unit, items })
}

fn offsets(payload: &[u8]) -> Result<Vec<u64>, ProtocolError> {
    if !payload.len().is_multiple_of(8) {
        return Err(ProtocolError::Malformed(format!(
            "a pull of {} bytes",
            payload.len()
        )));
    }
    Ok(payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

fn take<'a>(cursor: &mut &'a [u8], n: usize) -> Result<&'a [u8], ProtocolError> {
    if cursor.len() < n {
        return Err(ProtocolError::Malformed("truncated batch".into()));
    }
    let (head, rest) = cursor.split_at(n);
    *cursor = rest;
    Ok(head)
}

fn take_u32(cursor: &mut &[u8]) -> Result<u32, ProtocolError> {
    Ok(u32::from_le_bytes(take(cursor, 4)?.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: &Frame) -> Frame {
        let mut wire = Vec::new();
        let n = write_frame(&mut wire, frame, &mut Compressor::default()).unwrap();
        assert_eq!(n, wire.len() as u64);
        read_frame(&mut &wire[..]).unwrap()
    }

    #[test]
    fn batches_round_trip_compressed_where_it_pays() {
        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let batch = Batch {
            unit: 4096,
            items: vec![
                (0, Unit::of(&[0u8; 4096])),
                (4096, Unit::of(&[7u8; 4096])),
                (8192, Unit::of(&random)),
            ],
        };
        assert_eq!(batch.items[0].1, Unit::Zero);
        let mut wire = Vec::new();
        write_frame(
            &mut wire,
            &Frame::Memory(batch.clone()),
            &mut Compressor::default(),
        )
        .unwrap();
        // The repeated page compresses to almost nothing; the random one goes raw.
        assert!(wire.len() < 2 * 4096, "{} bytes", wire.len());
        match read_frame(&mut &wire[..]).unwrap() {
            Frame::Memory(b) => assert_eq!(b, batch),
            other => panic!("got {}", other.name()),
        }
        assert!(matches!(roundtrip(&Frame::Commit), Frame::Commit));
        assert!(matches!(roundtrip(&Frame::Abort("x".into())), Frame::Abort(r) if r == "x"));
        assert!(
            matches!(roundtrip(&Frame::PullPages(vec![0, 4096 << 20])), Frame::PullPages(a) if a == [0, 4096 << 20])
        );
        let plan = Plan {
            memory: vec![vec![1, 2], vec![]],
            disk: vec![u64::MAX],
        };
        assert!(
            matches!(roundtrip(&Frame::Plan(Box::new(plan.clone()))), Frame::Plan(p) if *p == plan)
        );
        assert!(matches!(roundtrip(&Frame::Complete), Frame::Complete));
        assert!(matches!(roundtrip(&Frame::Sync), Frame::Sync));
        assert!(matches!(roundtrip(&Frame::Synced), Frame::Synced));
    }

    /// After a run of incompressible units LZ4 is tried rarely, and fully again once a
    /// probe pays; every unit still decodes to what was sent.
    #[test]
    fn compression_is_tried_while_it_pays() {
        // xorshift64: bytes LZ4 cannot shrink.
        let noise = |seed: u32| -> Vec<u8> {
            let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect()
        };
        let mut c = Compressor::default();
        let mut sent = Vec::new();
        let mut wire = Vec::new();
        for round in 0..3u32 {
            let batch = Batch {
                unit: 4096,
                items: (0..256u32)
                    .map(|i| (i as u64 * 4096, Unit::Data(noise(round * 256 + i))))
                    .collect(),
            };
            write_frame(&mut wire, &Frame::Memory(batch.clone()), &mut c).unwrap();
            sent.push(batch);
        }
        // 32 misses, then one probe per 64 units.
        assert!(c.tried < 32 + 768 / 64 + 2, "tried {} times", c.tried);
        let tried = c.tried;
        let batch = Batch {
            unit: 4096,
            items: (0..128u64)
                .map(|i| (i * 4096, Unit::Data(vec![i as u8; 4096])))
                .collect(),
        };
        let before = wire.len();
        write_frame(&mut wire, &Frame::Memory(batch.clone()), &mut c).unwrap();
        sent.push(batch);
        // Found again within a probe interval: most of these pages went compressed.
        assert!(c.tried > tried + 64, "tried {} times", c.tried);
        assert!(
            wire.len() - before < 64 * 4096,
            "{} bytes",
            wire.len() - before
        );
        let mut cursor = &wire[..];
        for batch in sent {
            match read_frame(&mut cursor).unwrap() {
                Frame::Memory(b) => assert_eq!(b, batch),
                other => panic!("got {}", other.name()),
            }
        }
    }

    #[test]
    fn damaged_frames_are_refused() {
        let batch = Batch {
            unit: 4096,
            items: vec![(0, Unit::Data(vec![1u8; 4096]))],
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &Frame::Disk(batch), &mut Compressor::default()).unwrap();
        // Truncated stream, truncated payload, a unit of the wrong size, an unknown tag.
        assert!(matches!(
            read_frame(&mut &wire[..wire.len() - 1]),
            Err(ProtocolError::Io(_))
        ));
        let mut short = wire.clone();
        short[1..5].copy_from_slice(&((wire.len() - 6) as u32).to_le_bytes());
        short.pop();
        assert!(matches!(
            read_frame(&mut &short[..]),
            Err(ProtocolError::Malformed(_))
        ));
        let mut odd = wire.clone();
        odd[5..9].copy_from_slice(&4000u32.to_le_bytes());
        assert!(read_frame(&mut &odd[..]).is_err());
        assert!(matches!(
            read_frame(&mut &[99u8, 0, 0, 0, 0][..]),
            Err(ProtocolError::Malformed(_))
        ));
        // A hello from another protocol version is named as such, whatever its shape.
        let other = br#"{"version":1,"something":"else"}"#;
        let mut wire = vec![1u8];
        wire.extend_from_slice(&(other.len() as u32).to_le_bytes());
        wire.extend_from_slice(other);
        assert!(matches!(
            read_frame(&mut &wire[..]),
            Err(ProtocolError::Version(1))
        ));
    }
}
