//! A private copy of a disk image that shares no blocks the copy's user could dirty: a job's
//! root disk made from the base image, a snapshot's frozen disk, a restored VM's disk.
//! A reflink (FICLONE) when the file system can (XFS, Btrfs: instant, copy-on-write);
//! otherwise a sparse copy like `cp --sparse=always`: only the image's data extents are read,
//! and zero blocks inside them are left as holes, so a 64 MiB image mostly empty costs little.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOCK: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Copies `base` to `dest` (which must not exist); the base image is only read.
pub fn private_copy(base: &Path, dest: &Path) -> io::Result<()> {
    let src = File::open(base)?;
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both stay open across it.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let result = sparse_copy(&src, &dst);
    if result.is_err() {
        let _ = fs::remove_file(dest);
    }
    result
}

fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in crate::extents::data_extents(src, 0, len)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], at)?;
            write_nonzero(dst, &buf[..n], at)?;
            at += n as u64;
        }
    }
    dst.sync_all()
}

/// Writes the non-zero blocks of `data` (which belongs at `offset`), coalescing runs.
fn write_nonzero(dst: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut run: Option<usize> = None;
    for (i, block) in data.chunks(BLOCK).enumerate() {
        let zero = crate::zeros::is_zero(block);
        match (zero, run) {
            (false, None) => run = Some(i * BLOCK),
            (true, Some(s)) => {
                dst.write_all_at(&data[s..i * BLOCK], offset + s as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        dst.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copy_is_equal_sparse_and_independent() {
        let dir = std::env::temp_dir().join(format!("hopper-disk-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (base, copy) = (dir.join("base"), dir.join("copy"));
        // 8 MiB, fully allocated (zeros written), with data at the start, middle and end.
        let mut data = vec![0u8; 8 << 20];
        data[..5000].fill(1);
        data[3 << 20..(3 << 20) + 10].fill(2);
        let n = data.len();
        data[n - 1] = 3;
        fs::write(&base, &data).unwrap();
        private_copy(&base, &copy).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), data);
        // Either a reflink (shares extents) or a sparse copy (allocates few blocks).
        let blocks = fs::metadata(&copy).unwrap().blocks() * 512;
        assert!(blocks <= 1 << 20 || blocks >= n as u64, "{blocks}");
        fs::write(&copy, b"changed").unwrap();
        assert_eq!(
            fs::read(&base).unwrap(),
            data,
            "the base image is untouched"
        );
        assert!(
            private_copy(&base, &copy).is_err(),
            "an existing destination is refused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
