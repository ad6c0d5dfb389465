//! Log files with a size cap. A guest controls what its console prints and what its job
//! writes, so a job's logs are kept to [`CAP`] each: past it, the start is dropped and the last
//! [`KEEP`] bytes stay, which is all the scheduler keeps of a log anyway.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use hopper_api::logs::MAX_LOG_BYTES;

/// What is kept of a log that reaches [`CAP`]: what the scheduler keeps, and a margin so that
/// a JIT config across the line arrives whole and is redacted there.
pub const KEEP: u64 = MAX_LOG_BYTES as u64 + (64 << 10);
/// The most a log file holds.
pub const CAP: u64 = 2 * KEEP;
const DROPPED: &[u8] = b"[hopper-runner: earlier output dropped: the log reached its size cap]\n";

/// An open log that stays within `cap`, keeping its last `keep` bytes.
pub struct CappedLog {
    file: File,
    len: u64,
    cap: u64,
    keep: u64,
}

impl CappedLog {
    /// Opens `path` for appending, creating it.
    pub fn open(path: &Path) -> io::Result<CappedLog> {
        Self::with_cap(path, CAP, KEEP)
    }

    fn with_cap(path: &Path, cap: u64, keep: u64) -> io::Result<CappedLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut log = CappedLog {
            file,
            len,
            cap,
            keep,
        };
        if log.len > log.cap {
            log.trim()?;
        }
        Ok(log)
    }

    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        if self.len > self.cap {
            self.trim()?;
        }
        Ok(())
    }

    /// Rewrites the file as a marker and its last `keep` bytes: one copy of `keep` bytes per
    /// `cap - keep` appended, so appending stays linear.
    fn trim(&mut self) -> io::Result<()> {
        let mut tail = Vec::with_capacity(self.keep as usize);
        self.file.seek(SeekFrom::Start(self.len - self.keep))?;
        (&self.file).take(self.keep).read_to_end(&mut tail)?;
        self.file.set_len(0)?;
        self.file.write_all(DROPPED)?;
        self.file.write_all(&tail)?;
        self.len = (DROPPED.len() + tail.len()) as u64;
        Ok(())
    }
}

/// Appends to the log at `path` within the cap.
pub fn append(path: &Path, data: &[u8]) -> io::Result<()> {
    CappedLog::open(path)?.append(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_keeps_its_end_and_never_grows_past_its_cap() {
        let dir = std::env::temp_dir().join(format!("hopper-caplog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let (cap, keep) = (1000, 300);
        let mut log = CappedLog::with_cap(&path, cap, keep).unwrap();
        let mut written = Vec::new();
        for i in 0..500u32 {
            let line = format!("line {i}\n");
            log.append(line.as_bytes()).unwrap();
            written.extend_from_slice(line.as_bytes());
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(len <= cap, "{len} bytes after line {i}");
        }
        let kept = std::fs::read(&path).unwrap();
        assert!(kept.starts_with(DROPPED));
        assert!(written.ends_with(&kept[DROPPED.len()..]));
        assert!(kept.len() - DROPPED.len() >= keep as usize);
        // A log found over its cap (a daemon with a larger cap wrote it) is cut at once.
        drop(log);
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        CappedLog::with_cap(&path, cap, keep).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= cap);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
