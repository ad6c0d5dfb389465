//! Where a file holds data (SEEK_DATA / SEEK_HOLE): sparse disk images and memory files are
//! read for what they hold, not for their length.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The data extents of `file` within `[start, end)`, as `[from, to)` pairs in order; the
/// rest reads as zeros. File systems without SEEK_DATA report the whole range as data.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(extent) = next_data(file, pos, end)? else {
            break;
        };
        extents.push(extent);
        pos = extent.1;
    }
    Ok(extents)
}

/// The next data extent at or after `pos`, cut at `end`; `None` when only a hole is left.
fn next_data(f: &File, pos: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, end))),
            _ => Err(e),
        };
    }
    if start as u64 >= end {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let to = if hole < 0 {
        end
    } else {
        (hole as u64).min(end)
    };
    Ok(Some((start as u64, to)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_name_the_data_and_skip_the_holes() {
        let file = tempfile::tempfile().unwrap();
        const MIB: u64 = 1 << 20;
        file.set_len(16 * MIB).unwrap();
        file.write_all_at(&[1; 4096], 2 * MIB).unwrap();
        file.write_all_at(&[2; 4096], 9 * MIB).unwrap();
        let all = data_extents(&file, 0, 16 * MIB).unwrap();
        // File systems allocate in their own block sizes: each extent covers its write.
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].0 <= 2 * MIB && all[0].1 >= 2 * MIB + 4096 && all[0].1 < 9 * MIB);
        assert!(all[1].0 <= 9 * MIB && all[1].1 >= 9 * MIB + 4096);
        // A window cuts the extents at its ends.
        let window = data_extents(&file, 2 * MIB + 1024, 9 * MIB + 100).unwrap();
        assert_eq!(window.first().unwrap().0, 2 * MIB + 1024);
        assert_eq!(window.last().unwrap().1, 9 * MIB + 100);
        assert!(data_extents(&file, 3 * MIB, 8 * MIB).unwrap().is_empty());
    }
}
