//! Newline-delimited framing with a size limit, usable on streams that time out: partial data
//! stays buffered across `read_frame` calls that fail with a timeout.

use std::io::{self, Read, Write};

use serde::Serialize;

use crate::protocol::MAX_FRAME_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame longer than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads `\n`-terminated frames. The reader does not own the stream so that the same stream
/// can be written between reads.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
    /// Set after an oversized frame: bytes up to the next newline belong to it and are dropped.
    discarding: bool,
    max: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }
}

impl FrameReader {
    pub fn with_limit(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            discarding: false,
            max,
        }
    }

    /// The next frame without its line ending (`\r\n` is accepted, as TTYs in cooked mode
    /// produce it), or `None` at end of stream. An oversized frame yields `TooLarge` once and
    /// is skipped, so the stream stays usable.
    pub fn read_frame(&mut self, src: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            // Only bytes not yet searched are scanned: frames can be megabytes long.
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if std::mem::take(&mut self.discarding) {
                    continue;
                }
                if line.len() > self.max {
                    return Err(FrameError::TooLarge(self.max));
                }
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                self.buf.clear();
                self.scanned = 0;
                if !self.discarding {
                    self.discarding = true;
                    return Err(FrameError::TooLarge(self.max));
                }
            }
            let n = match src.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Writes one frame and flushes it.
pub fn write_frame(dst: &mut impl Write, msg: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    dst.write_all(&line)?;
    dst.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, String>> {
        let mut r = FrameReader::with_limit(max);
        let mut src = input;
        let mut out = Vec::new();
        loop {
            match r.read_frame(&mut src) {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => return out,
                Err(e) => out.push(Err(e.to_string())),
            }
        }
    }

    #[test]
    fn splits_lines_and_strips_cr() {
        assert_eq!(
            frames(b"a\nbc\r\n\n", 100),
            vec![Ok(b"a".to_vec()), Ok(b"bc".to_vec()), Ok(vec![])]
        );
    }

    #[test]
    fn oversized_frame_is_reported_once_then_skipped() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\nok\n");
        let got = frames(&input, 10);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].as_ref().unwrap_err().contains("longer than 10"));
        assert_eq!(got[1], Ok(b"ok".to_vec()));
    }

    #[test]
    fn partial_frame_survives_a_timeout() {
        struct Stutter(Vec<io::Result<Vec<u8>>>);
        impl Read for Stutter {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                match self.0.pop() {
                    None => Ok(0),
                    Some(Ok(d)) => {
                        out[..d.len()].copy_from_slice(&d);
                        Ok(d.len())
                    }
                    Some(Err(e)) => Err(e),
                }
            }
        }
        let mut src = Stutter(vec![
            Ok(b"lo\n".to_vec()),
            Err(io::ErrorKind::WouldBlock.into()),
            Ok(b"hel".to_vec()),
        ]);
        let mut r = FrameReader::default();
        assert!(matches!(r.read_frame(&mut src), Err(FrameError::Io(_))));
        assert_eq!(r.read_frame(&mut src).unwrap(), Some(b"hello".to_vec()));
    }
}
