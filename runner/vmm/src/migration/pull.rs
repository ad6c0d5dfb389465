//! The target's side of a post-copy: the guest runs before all of its memory and disk have
//! arrived. Memory it lacks is registered with userfaultfd, so a page the guest (or KVM, or a
//! device) touches first is pulled from the source while the toucher waits; disk requests
//! wait for the blocks they touch the same way. Everything else arrives pushed. Once nothing
//! is missing the target says `Complete` and the source may go.

use super::link::Link;
use super::protocol::{Batch, Frame, Plan, Unit};
use super::target::{block_bytes, check_unit, unexpected, ReceiveError};
use super::{bit, set_bits, trimmed, DISK_BLOCK, PAGE};
use crate::devices::virtio::block::Arriving;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestMemory;
use crate::vm::Vm;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Pages pulled together around a fault (64 KiB): guests touch memory in runs.
const CLUSTER_PAGES: usize = 16;
/// How often the fault thread looks at its stop flag and whether it is done.
const POLL_MS: i32 = 100;
/// An idle pull channel says it is alive this often (the source's reads time out).
const KEEPALIVE: Duration = Duration::from_secs(5);

/// One RAM region as the fault handler sees it.
struct Region {
    guest: u64,
    host: usize,
    len: usize,
    /// Pages the source still has to send (the plan).
    needed: Vec<u64>,
    /// Needed pages that have arrived.
    present: Vec<AtomicU64>,
}

impl Region {
    fn needed(&self, page: usize) -> bool {
        bit(&self.needed, page)
    }

    fn present(&self, page: usize) -> bool {
        self.present[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn missing(&self, page: usize) -> bool {
        self.needed(page) && !self.present(page)
    }
}

/// Guest memory whose missing pages fault into this process.
struct FaultingMemory {
    uffd: Uffd,
    regions: Vec<Region>,
    remaining: AtomicU64,
}

impl FaultingMemory {
    /// Drops the copies of the pages `plan` names (if pages arrived before it: `stale`) and
    /// registers all guest memory with a new userfaultfd; pages neither held nor named are
    /// zero.
    fn register(
        memory: &GuestMemory,
        plan: &[Vec<u64>],
        stale: bool,
    ) -> Result<FaultingMemory, ReceiveError> {
        if plan.len() != memory.num_regions() {
            return Err(ReceiveError::Invalid(format!(
                "a plan for {} memory regions, the VM has {}",
                plan.len(),
                memory.num_regions()
            )));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM's and the devices' accesses fault from the kernel too.
            .user_mode_only(false)
            .create()
            .map_err(|e| ReceiveError::Postcopy(format!("cannot create a userfaultfd: {e}")))?;
        let mut regions = Vec::new();
        let mut remaining = 0;
        for (region, words) in memory.iter().zip(plan) {
            let len = region.len() as usize;
            let needed = trimmed(words, len / PAGE);
            let host = region.as_ptr() as usize;
            remaining += needed.iter().map(|w| w.count_ones() as u64).sum::<u64>();
            if stale {
                for (first, pages) in runs(&needed) {
                    // SAFETY: the pages lie inside this region's live private mapping;
                    // dropping their content is what we want (the source sends them anew),
                    // and nothing runs in the VM yet.
                    let dropped = unsafe {
                        libc::madvise(
                            (host + first * PAGE) as *mut libc::c_void,
                            pages * PAGE,
                            libc::MADV_DONTNEED,
                        )
                    };
                    if dropped != 0 {
                        return Err(ReceiveError::Postcopy(format!(
                            "cannot drop stale pages: {}",
                            std::io::Error::last_os_error()
                        )));
                    }
                }
            }
            uffd.register(host as *mut libc::c_void, len).map_err(|e| {
                ReceiveError::Postcopy(format!("cannot register guest memory for faults: {e}"))
            })?;
            regions.push(Region {
                guest: region.start_addr().0,
                host,
                len,
                present: (0..needed.len()).map(|_| AtomicU64::new(0)).collect(),
                needed,
            });
        }
        Ok(FaultingMemory {
            uffd,
            regions,
            remaining: AtomicU64::new(remaining),
        })
    }

    fn by_host(&self, addr: usize) -> Option<(&Region, usize)> {
        self.regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.len)
            .map(|r| (r, (addr - r.host) / PAGE))
    }

    fn by_guest(&self, addr: u64) -> Option<(&Region, usize)> {
        self.regions
            .iter()
            .find(|r| addr >= r.guest && addr < r.guest + r.len as u64)
            .map(|r| (r, ((addr - r.guest) as usize) / PAGE))
    }

    /// Puts a page that arrived in place (unless it is there already) and wakes whoever
    /// waits for it.
    fn place(&self, at: u64, unit: &Unit) -> Result<(), ReceiveError> {
        let Some((region, page)) = self.by_guest(at).filter(|_| at.is_multiple_of(PAGE as u64))
        else {
            return Err(ReceiveError::Invalid(format!("a page at {at:#x}")));
        };
        if !region.missing(page) {
            return Ok(());
        }
        let dst = (region.host + page * PAGE) as *mut libc::c_void;
        // SAFETY: `dst` is a page of registered guest memory and `src` a page-sized buffer;
        // the kernel copies it in atomically (or fails with EEXIST if the page is there).
        let placed = unsafe {
            match unit {
                Unit::Zero => self.uffd.zeropage(dst, PAGE, true).map(|_| ()),
                Unit::Data(data) => self
                    .uffd
                    .copy(data.as_ptr() as *const libc::c_void, dst, PAGE, true)
                    .map(|_| ()),
            }
        };
        match placed {
            Ok(()) => {
                region.present[page / 64].fetch_or(1 << (page % 64), Ordering::Release);
                self.remaining.fetch_sub(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) if already_there(&e) => Ok(()),
            Err(e) => Err(ReceiveError::Postcopy(format!("cannot place a page: {e}"))),
        }
    }

    /// The guest addresses of the missing pages in the cluster around `page`.
    fn missing_near(&self, region: &Region, page: usize) -> Vec<u64> {
        let first = page - page % CLUSTER_PAGES;
        (first..(first + CLUSTER_PAGES).min(region.len / PAGE))
            .filter(|p| region.missing(*p))
            .map(|p| region.guest + (p * PAGE) as u64)
            .collect()
    }

    /// Resolves a fault on a page that was never to arrive (zero) or already has.
    fn settle(&self, addr: usize) -> Result<(), ReceiveError> {
        let page = (addr & !(PAGE - 1)) as *mut libc::c_void;
        // SAFETY: `page` is a page of registered guest memory; a zero page is what the
        // guest had there on the source.
        match unsafe { self.uffd.zeropage(page, PAGE, true) } {
            Ok(_) => Ok(()),
            Err(e) if already_there(&e) => self
                .uffd
                .wake(page, PAGE)
                .map_err(|e| ReceiveError::Postcopy(format!("cannot wake a fault: {e}"))),
            Err(e) => Err(ReceiveError::Postcopy(format!("cannot zero a page: {e}"))),
        }
    }

    fn unregister(&self) {
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host as *mut libc::c_void, r.len) {
                log::warn!("cannot unregister guest memory from faults: {e}");
            }
        }
    }
}

/// The runs of set bits of a bitmap, as (first, length).
fn runs(words: &[u64]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for i in set_bits(words) {
        match runs.last_mut() {
            Some((first, len)) if *first + *len == i => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

fn already_there(e: &userfaultfd::Error) -> bool {
    matches!(e, userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno)
        if *errno as i32 == libc::EEXIST)
}

/// Disk blocks that have not arrived; the block device waits on them.
pub(super) struct MissingDisk {
    file: File,
    len: u64,
    state: Mutex<DiskState>,
    arrived: Condvar,
    /// Tells the fault thread that a request waits.
    wanted: EventFd,
    remaining: AtomicU64,
}

#[derive(Default)]
struct DiskState {
    missing: Vec<u64>,
    wanted: Vec<u64>,
    failed: Option<String>,
}

impl MissingDisk {
    fn new(file: File, len: u64, plan: &[u64]) -> Result<MissingDisk, ReceiveError> {
        let missing = trimmed(plan, len.div_ceil(DISK_BLOCK as u64) as usize);
        let remaining = missing.iter().map(|w| w.count_ones() as u64).sum();
        Ok(MissingDisk {
            file,
            len,
            state: Mutex::new(DiskState {
                missing,
                ..DiskState::default()
            }),
            arrived: Condvar::new(),
            wanted: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| ReceiveError::Postcopy(format!("cannot create an eventfd: {e}")))?,
            remaining: AtomicU64::new(remaining),
        })
    }

    /// Writes a block that arrived, unless it is there already (the guest may have
    /// written it since).
    fn place(&self, at: u64, unit: &Unit) -> Result<(), ReceiveError> {
        let bytes = block_bytes(unit, at, self.len)?;
        let index = (at / DISK_BLOCK as u64) as usize;
        let mut state = self.state.lock().unwrap();
        if !bit(&state.missing, index) {
            return Ok(());
        }
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| ReceiveError::Postcopy(format!("cannot write a disk block: {e}")))?;
        state.missing[index / 64] &= !(1 << (index % 64));
        self.remaining.fetch_sub(1, Ordering::AcqRel);
        self.arrived.notify_all();
        Ok(())
    }

    /// The blocks requests wait for, each once.
    fn take_wanted(&self) -> Vec<u64> {
        let _ = self.wanted.read();
        let mut state = self.state.lock().unwrap();
        let mut wanted = std::mem::take(&mut state.wanted);
        wanted.sort_unstable();
        wanted.dedup();
        wanted.retain(|i| bit(&state.missing, *i as usize));
        wanted.into_iter().map(|i| i * DISK_BLOCK as u64).collect()
    }

    fn fail(&self, reason: &str) {
        self.state.lock().unwrap().failed = Some(reason.to_owned());
        self.arrived.notify_all();
    }
}

impl Arriving for MissingDisk {
    fn wait_for(&self, offset: u64, len: usize) -> std::io::Result<()> {
        if self.remaining.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let first = offset / DISK_BLOCK as u64;
        let last = (offset + len as u64 - 1) / DISK_BLOCK as u64;
        let mut state = self.state.lock().unwrap();
        let mut asked = false;
        loop {
            if let Some(reason) = &state.failed {
                return Err(std::io::Error::other(reason.clone()));
            }
            let missing: Vec<u64> = (first..=last)
                .filter(|i| bit(&state.missing, *i as usize))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if !asked {
                state.wanted.extend(missing);
                self.wanted.write(1)?;
                asked = true;
            }
            state = self.arrived.wait(state).unwrap();
        }
    }
}

/// A post-copy in progress on the target.
pub(super) struct Postcopy {
    memory: FaultingMemory,
    disk: Option<Arc<MissingDisk>>,
    /// Set once the VM exists: a post-copy that breaks stops it.
    exit: Mutex<Option<Arc<ExitSignal>>>,
    stop: AtomicBool,
    started: Instant,
}

impl Postcopy {
    /// Sets up memory and disk for `plan`; `disk` is the VM's new image (if it has one),
    /// `stale` whether pages arrived before the plan.
    pub fn prepare(
        vm: &Vm,
        disk: Option<(&File, u64)>,
        plan: &Plan,
        stale: bool,
    ) -> Result<Postcopy, ReceiveError> {
        let disk = match disk {
            Some((file, len)) => {
                let file = file
                    .try_clone()
                    .map_err(|e| ReceiveError::Postcopy(format!("cannot reopen the disk: {e}")))?;
                Some(Arc::new(MissingDisk::new(file, len, &plan.disk)?))
            }
            None if plan.disk.iter().any(|w| *w != 0) => {
                return Err(ReceiveError::Invalid(
                    "a plan with disk blocks for a VM without disk".into(),
                ))
            }
            None => None,
        };
        Ok(Postcopy {
            memory: FaultingMemory::register(&vm.memory, &plan.memory, stale)?,
            disk,
            exit: Mutex::new(None),
            stop: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    pub fn disk(&self) -> Option<Arc<MissingDisk>> {
        self.disk.clone()
    }

    /// From now on a broken post-copy stops the VM through `exit`.
    pub fn watch(&self, exit: Arc<ExitSignal>) {
        *self.exit.lock().unwrap() = Some(exit);
    }

    /// Ends the fault thread (the VM was not built or not committed).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn remaining(&self) -> u64 {
        self.memory.remaining.load(Ordering::Acquire)
            + self
                .disk
                .as_ref()
                .map_or(0, |d| d.remaining.load(Ordering::Acquire))
    }

    /// The VM cannot go on without what the source holds: stop it, and wake every waiter.
    fn fail(&self, e: &ReceiveError) {
        let reason = format!("the post-copy broke, the VM cannot go on: {e}");
        log::error!("{reason}");
        if let Some(exit) = &*self.exit.lock().unwrap() {
            exit.request(ExitReason::Error(reason.clone()));
        }
        if let Some(disk) = &self.disk {
            disk.fail(&reason);
        }
        self.memory.unregister();
    }

    fn place_batch(&self, batch: &Batch, memory: bool) -> Result<(), ReceiveError> {
        if memory {
            check_unit(batch, PAGE, "memory")?;
            batch
                .items
                .iter()
                .try_for_each(|(at, unit)| self.memory.place(*at, unit))
        } else {
            check_unit(batch, DISK_BLOCK, "disk")?;
            let Some(disk) = &self.disk else {
                return Err(ReceiveError::Invalid(
                    "disk blocks for a VM without disk".into(),
                ));
            };
            batch
                .items
                .iter()
                .try_for_each(|(at, unit)| disk.place(*at, unit))
        }
    }

    /// Resolves faults and disk waits by pulling from the source until nothing is missing
    /// (then tells the source) or until stopped. Returns how many units it pulled.
    pub fn serve_faults(&self, pull: &mut Link) -> Result<u64, ReceiveError> {
        let result = self.fault_loop(pull);
        match &result {
            Ok(pulled) => log::info!(
                "post-copy complete after {} ms: {pulled} pages and blocks pulled on demand",
                self.started.elapsed().as_millis()
            ),
            Err(e) => self.fail(e),
        }
        result
    }

    fn fault_loop(&self, pull: &mut Link) -> Result<u64, ReceiveError> {
        let mut pulled = 0u64;
        let mut last_sent = Instant::now();
        let mut fds = vec![libc::pollfd {
            fd: self.memory.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(disk) = &self.disk {
            fds.push(libc::pollfd {
                fd: disk.wanted.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(pulled);
            }
            if self.remaining() == 0 {
                pull.send(&Frame::Complete)?;
                pull.flush()?;
                self.memory.unregister();
                return Ok(pulled);
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ReceiveError::Postcopy(format!("poll failed: {e}")));
            }
            while let Some(event) = self
                .memory
                .uffd
                .read_event()
                .map_err(|e| ReceiveError::Postcopy(format!("cannot read a fault: {e}")))?
            {
                let Event::Pagefault { addr, .. } = event else {
                    continue;
                };
                let addr = addr as usize;
                let Some((region, page)) = self.memory.by_host(addr) else {
                    return Err(ReceiveError::Postcopy(format!(
                        "a fault at {addr:#x} outside guest memory"
                    )));
                };
                if !region.missing(page) {
                    self.memory.settle(addr)?;
                    continue;
                }
                let wanted = self.memory.missing_near(region, page);
                pulled += wanted.len() as u64;
                self.pull_and_place(pull, Frame::PullPages(wanted))?;
                last_sent = Instant::now();
                // Placed by the push meanwhile, the page needs its waiters woken.
                self.memory.settle(addr)?;
            }
            if let Some(disk) = &self.disk {
                let wanted = disk.take_wanted();
                if !wanted.is_empty() {
                    pulled += wanted.len() as u64;
                    self.pull_and_place(pull, Frame::PullBlocks(wanted))?;
                    last_sent = Instant::now();
                }
            }
            if last_sent.elapsed() >= KEEPALIVE {
                pull.send(&Frame::PullPages(Vec::new()))?;
                pull.flush()?;
                last_sent = Instant::now();
            }
        }
    }

    /// Sends a pull (`PullPages` or `PullBlocks`) and places the source's answer: a batch
    /// of the same kind.
    fn pull_and_place(&self, pull: &mut Link, request: Frame) -> Result<(), ReceiveError> {
        let memory = matches!(request, Frame::PullPages(_));
        pull.send(&request)?;
        match (pull.receive()?, memory) {
            (Frame::Memory(batch), true) | (Frame::Disk(batch), false) => {
                self.place_batch(&batch, memory)
            }
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Places what the source pushes until it says `Done`.
    pub fn receive_pushed(&self, link: &mut Link) -> Result<(), ReceiveError> {
        let result = self.push_loop(link);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    fn push_loop(&self, link: &mut Link) -> Result<(), ReceiveError> {
        loop {
            match link.receive()? {
                Frame::Memory(batch) => self.place_batch(&batch, true)?,
                Frame::Disk(batch) => self.place_batch(&batch, false)?,
                Frame::Done => return Ok(()),
                other => return Err(unexpected(&other)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};

    /// A page touched before it arrived is pulled (with its cluster) and read with the
    /// source's content; a page outside the plan reads as zero; once all has arrived the
    /// target says so.
    #[test]
    fn touched_pages_are_pulled_and_the_rest_is_zero() {
        let mem = crate::memory::create(4 << 20).unwrap();
        let mut plan = vec![0u64; (4 << 20) / PAGE / 64];
        plan[0] = 0b1111;
        mem.write_obj(0xaau8, GuestAddress(PAGE as u64)).unwrap();
        let postcopy = Arc::new(Postcopy {
            memory: FaultingMemory::register(&mem, &[plan], true).unwrap(),
            disk: None,
            exit: Mutex::new(None),
            stop: AtomicBool::new(false),
            started: Instant::now(),
        });
        let (ours, theirs) = UnixStream::pair().unwrap();
        let source = std::thread::spawn(move || {
            let mut link = Link::new(Box::new(theirs));
            let mut pulled = Vec::new();
            loop {
                match link.receive().unwrap() {
                    Frame::PullPages(pages) => {
                        let items = pages
                            .iter()
                            .map(|at| (*at, Unit::Data(vec![(at / PAGE as u64) as u8 + 1; PAGE])))
                            .collect();
                        pulled.extend(pages);
                        link.send(&Frame::Memory(Batch { unit: PAGE, items }))
                            .unwrap();
                    }
                    Frame::Complete => return pulled,
                    other => panic!("unexpected {}", other.name()),
                }
            }
        });
        let faults = {
            let postcopy = postcopy.clone();
            std::thread::spawn(move || postcopy.serve_faults(&mut Link::new(Box::new(ours))))
        };
        // The stale byte written before the plan is gone: the source's page replaces it.
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(2 * PAGE as u64)).unwrap(),
            3
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE as u64)).unwrap(), 2);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(100 * PAGE as u64)).unwrap(),
            0
        );
        assert_eq!(faults.join().unwrap().unwrap(), 4);
        let pulled = source.join().unwrap();
        assert_eq!(pulled, [0, 1, 2, 3].map(|p| p * PAGE as u64));
    }

    #[test]
    fn runs_of_bits() {
        assert_eq!(runs(&[0b0111_0110, 1 << 63, 1]), [(1, 2), (4, 3), (127, 2)]);
        assert!(runs(&[0, 0]).is_empty());
    }

    /// Disk requests wait for the blocks they touch; a block the guest already has is not
    /// overwritten by a late copy.
    #[test]
    fn disk_requests_wait_for_missing_blocks() {
        let file = tempfile::tempfile().unwrap();
        let len = 2 * DISK_BLOCK as u64 + 512;
        file.set_len(len).unwrap();
        let disk = Arc::new(MissingDisk::new(file.try_clone().unwrap(), len, &[0b101]).unwrap());
        assert!(
            disk.wait_for(DISK_BLOCK as u64, 10).is_ok(),
            "block 1 is here"
        );
        let waiter = {
            let disk = disk.clone();
            std::thread::spawn(move || disk.wait_for(2 * DISK_BLOCK as u64 + 100, 10))
        };
        let wanted = loop {
            let w = disk.take_wanted();
            if !w.is_empty() {
                break w;
            }
            std::thread::yield_now();
        };
        assert_eq!(wanted, [2 * DISK_BLOCK as u64]);
        disk.place(2 * DISK_BLOCK as u64, &Unit::Data(vec![7; DISK_BLOCK]))
            .unwrap();
        waiter.join().unwrap().unwrap();
        // A second copy of the same block (pushed after it was pulled) changes nothing.
        disk.place(2 * DISK_BLOCK as u64, &Unit::Zero).unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 2 * DISK_BLOCK as u64).unwrap();
        assert_eq!(buf, [7; 4]);
        assert_eq!(disk.remaining.load(Ordering::Acquire), 1);
        disk.place(0, &Unit::Zero).unwrap();
        assert_eq!(disk.remaining.load(Ordering::Acquire), 0);
        assert!(disk.place(3 * DISK_BLOCK as u64, &Unit::Zero).is_err());
    }
}
