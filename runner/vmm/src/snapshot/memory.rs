//! Guest memory in a snapshot: one file with every RAM region back to back, written sparse
//! (pages the guest never touched and pages of zeros stay holes, so the file costs what the
//! guest used), and mapped back privately on restore, so that a restored guest reads a page
//! from the file only when it touches it: restoring does not take longer for more memory.

use crate::memory::{self, GuestMemory, MemoryError};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const PAGE: usize = 4096;
/// Consecutive non-zero pages are written with one call, up to this many bytes.
const WRITE_RUN: usize = 1 << 20;

/// Where one RAM region lives in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The memory file's layout, kept in the snapshot's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<RegionLayout>,
    /// The file's length; a shorter file (truncated) would fault the guest, so it is refused.
    pub file_len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotMemoryError {
    #[error("writing guest memory: {0}")]
    Write(io::Error),
    #[error("reading guest memory at {addr:#x}: {source}")]
    Read {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the memory file is {found} bytes, the snapshot says {expected}")]
    WrongLength { found: u64, expected: u64 },
    #[error("the memory layout is invalid: {0}")]
    Layout(String),
    #[error(transparent)]
    Map(#[from] MemoryError),
}

/// What [`save`] wrote.
#[derive(Debug)]
pub struct Saved {
    pub layout: MemoryLayout,
    /// Bytes of guest memory actually stored (the rest are holes).
    pub stored: u64,
}

/// Writes all of `mem` into `file` (empty, or replaced), leaving holes for untouched and zero
/// pages. The vCPUs and devices must be paused.
pub fn save(mem: &GuestMemory, file: &File) -> Result<Saved, SnapshotMemoryError> {
    let layout = layout(mem);
    let mut stored = 0u64;
    file.set_len(0).map_err(SnapshotMemoryError::Write)?;
    for (region, placed) in mem.iter().zip(&layout.regions) {
        let offset = placed.file_offset;
        let in_use = memory::pages_in_use(region);
        let mut run: Vec<u8> = Vec::with_capacity(WRITE_RUN);
        let mut run_start = 0u64;
        let mut page = [0u8; PAGE];
        for (index, _) in in_use.iter().enumerate().filter(|(_, r)| **r) {
            let at = (index * PAGE) as u64;
            region
                .read_slice(&mut page, MemoryRegionAddress(at))
                .map_err(|source| SnapshotMemoryError::Read {
                    addr: region.start_addr().0 + at,
                    source,
                })?;
            if crate::zeros::is_zero(&page) {
                continue;
            }
            if run.len() == WRITE_RUN || (!run.is_empty() && run_start + run.len() as u64 != at) {
                write_run(file, offset + run_start, &run)?;
                stored += run.len() as u64;
                run.clear();
            }
            if run.is_empty() {
                run_start = at;
            }
            run.extend_from_slice(&page);
        }
        if !run.is_empty() {
            write_run(file, offset + run_start, &run)?;
            stored += run.len() as u64;
        }
    }
    // The holes at the end count as file length too.
    file.set_len(layout.file_len)
        .map_err(SnapshotMemoryError::Write)?;
    file.sync_all().map_err(SnapshotMemoryError::Write)?;
    Ok(Saved { layout, stored })
}

/// Where each RAM region of `mem` goes in a memory file: back to back, in address order.
pub fn layout(mem: &GuestMemory) -> MemoryLayout {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        regions.push(RegionLayout {
            guest_addr: region.start_addr().0,
            len: region.len(),
            file_offset: offset,
        });
        offset += region.len();
    }
    MemoryLayout {
        regions,
        file_len: offset,
    }
}

fn write_run(file: &File, at: u64, data: &[u8]) -> Result<(), SnapshotMemoryError> {
    file.write_all_at(data, at)
        .map_err(SnapshotMemoryError::Write)
}

/// Maps guest memory back from a memory file written by [`save`], lazily.
pub fn restore(file: &File, layout: &MemoryLayout) -> Result<GuestMemory, SnapshotMemoryError> {
    let found = file.metadata().map_err(SnapshotMemoryError::Write)?.len();
    if found != layout.file_len {
        return Err(SnapshotMemoryError::WrongLength {
            found,
            expected: layout.file_len,
        });
    }
    let mut regions = Vec::new();
    for r in &layout.regions {
        let fits = r
            .file_offset
            .checked_add(r.len)
            .is_some_and(|end| end <= layout.file_len);
        let aligned =
            r.len.is_multiple_of(PAGE as u64) && r.file_offset.is_multiple_of(PAGE as u64);
        if !fits || !aligned {
            return Err(SnapshotMemoryError::Layout(format!(
                "region at {:#x} ({} bytes at file offset {})",
                r.guest_addr, r.len, r.file_offset
            )));
        }
        regions.push((GuestAddress(r.guest_addr), r.len as usize, r.file_offset));
    }
    Ok(memory::from_file(file, &regions)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MMIO_GAP_END;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_written_pages_are_stored_and_come_back() {
        // Above 3 GiB: two regions around the MMIO gap, each at its own file offset.
        let mem = memory::create((3 << 30) + (8 << 20)).unwrap();
        let marks = [
            (GuestAddress(0x1000), 0x11u8),
            (GuestAddress(0x4000_0000), 0x22),
            (GuestAddress(MMIO_GAP_END + 0x5000), 0x33),
        ];
        for (addr, v) in marks {
            mem.write_slice(&[v; 100], addr).unwrap();
        }
        // Read but never written: resident as the zero page, still not stored.
        let _: u64 = mem.read_obj(GuestAddress(0x8000)).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create_new(&path).unwrap();
        let saved = save(&mem, &file).unwrap();
        assert_eq!(saved.stored, 3 * PAGE as u64);
        assert_eq!(saved.layout.regions.len(), 2);
        assert_eq!(saved.layout.file_len, (3 << 30) + (8 << 20));
        // Sparse on disk: a few pages, not gigabytes.
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(on_disk < 1 << 20, "{on_disk} bytes on disk");

        let file = File::open(&path).unwrap();
        let restored = restore(&file, &saved.layout).unwrap();
        for (addr, v) in marks {
            let mut back = [0u8; 101];
            restored.read_slice(&mut back, addr).unwrap();
            assert_eq!(&back[..100], &[v; 100][..]);
            assert_eq!(back[100], 0);
        }
        // The restored guest's writes stay private to it.
        restored
            .write_obj(0xffu8, GuestAddress(MMIO_GAP_END + 0x5000))
            .unwrap();
        let again = restore(&File::open(&path).unwrap(), &saved.layout).unwrap();
        assert_eq!(
            again
                .read_obj::<u8>(GuestAddress(MMIO_GAP_END + 0x5000))
                .unwrap(),
            0x33
        );
    }

    #[test]
    fn a_snapshot_of_a_restored_guest_keeps_pages_only_in_the_old_file() {
        let mem = memory::create(8 << 20).unwrap();
        let marks = [
            (GuestAddress(0x3000), 0x44u8),
            (GuestAddress(0x50_0000), 0x55),
        ];
        for (addr, v) in marks {
            mem.write_slice(&[v; 64], addr).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let first = File::create_new(dir.path().join("first")).unwrap();
        let saved = save(&mem, &first).unwrap();
        let restored = restore(&first, &saved.layout).unwrap();
        // The restored guest writes one page of its own and leaves the marked ones alone,
        // which then leave the host's page cache (as under memory pressure).
        restored.write_obj(0x66u8, GuestAddress(0x7000)).unwrap();
        // SAFETY: advice on an open file's page cache; no memory of this process is touched.
        let rc = unsafe { libc::posix_fadvise(first.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);

        let second = File::create_new(dir.path().join("second")).unwrap();
        let again = save(&restored, &second).unwrap();
        assert_eq!(again.stored, 3 * PAGE as u64);
        let back = restore(&second, &again.layout).unwrap();
        for (addr, v) in marks.into_iter().chain([(GuestAddress(0x7000), 0x66)]) {
            assert_eq!(back.read_obj::<u8>(addr).unwrap(), v, "at {addr:?}");
        }
    }

    #[test]
    fn truncated_or_inconsistent_memory_files_are_refused() {
        let mem = memory::create(8 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let saved = save(&mem, &File::create_new(&path).unwrap()).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len((8 << 20) - PAGE as u64).unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(
            restore(&file, &saved.layout),
            Err(SnapshotMemoryError::WrongLength { .. })
        ));

        let mut bad = saved.layout.clone();
        bad.file_len -= PAGE as u64;
        bad.regions[0].file_offset = 12;
        assert!(matches!(
            restore(&file, &bad),
            Err(SnapshotMemoryError::Layout(_))
        ));
    }
}
