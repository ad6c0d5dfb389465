//! One side of a migration connection: frames out through a buffer, frames in, and the
//! bytes the wire carried.

use super::protocol::{read_frame, write_frame, Compressor, Frame, ProtocolError};
use super::transport::Channel;
use std::io::{BufWriter, Write};

/// Large enough that a batch of pages goes out in a few TLS records.
const SEND_BUFFER: usize = 1 << 20;

pub struct Link {
    out: BufWriter<Channel>,
    compressor: Compressor,
    pub wire_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the peer gave up: {0}")]
    Aborted(String),
    #[error("expected a {expected} frame, the peer sent {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

impl From<std::io::Error> for LinkError {
    fn from(e: std::io::Error) -> Self {
        LinkError::Protocol(ProtocolError::Io(e))
    }
}

impl Link {
    pub fn new(channel: Channel) -> Link {
        Link {
            out: BufWriter::with_capacity(SEND_BUFFER, channel),
            compressor: Compressor::default(),
            wire_bytes: 0,
        }
    }

    /// Queues `frame`; it goes out when the buffer fills or before the next receive.
    pub fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        self.wire_bytes += write_frame(&mut self.out, frame, &mut self.compressor)?;
        Ok(())
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        self.out.flush()?;
        Ok(())
    }

    /// Sends what is queued and waits for the peer's next frame; an `Abort` is an error.
    pub fn receive(&mut self) -> Result<Frame, LinkError> {
        self.out.flush()?;
        match read_frame(self.out.get_mut())? {
            Frame::Abort(reason) => Err(LinkError::Aborted(reason)),
            frame => Ok(frame),
        }
    }

    /// Receives a frame that must be `expected` (a frame without payload).
    pub fn expect(&mut self, expected: Frame) -> Result<(), LinkError> {
        let got = self.receive()?;
        if std::mem::discriminant(&got) != std::mem::discriminant(&expected) {
            return Err(LinkError::Unexpected {
                expected: expected.name(),
                got: got.name(),
            });
        }
        Ok(())
    }

    /// Tells the peer why this side gives up (best effort: the link may be what failed).
    pub fn abort(&mut self, reason: &str) {
        let _ = self.send(&Frame::Abort(reason.to_owned()));
        let _ = self.out.flush();
    }
}
