//! What one job's VM uses on this host — its work directory, network slot, TAP device, the
//! TAP's address and its firewall table — made by the daemon before the VMM starts and undone
//! by the daemon whatever way the VMM ends (exit, crash, SIGKILL): the VMM is handed a ready
//! TAP by name and installs nothing itself. What a killed daemon leaves behind, the next one
//! clears ([`clear_leftovers`]).

use std::io;
use std::sync::Arc;

use hopper_vmm::tap::{Tap, TapError};

use super::jobdir::{JobDir, JobRecord};
use super::netslot::{NetSlot, NetSlots, SlotError};
use crate::network::{self, GuestFirewall, NetworkError};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("cannot prepare the job directory {dir}: {cause}")]
    Prepare { dir: String, cause: io::Error },
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("cannot create the guest's TAP device: {0}")]
    Tap(#[from] TapError),
    #[error("cannot set up the guest's network: {0}")]
    Network(#[from] NetworkError),
}

/// A job's host resources; [`VmResources::release`] (or, failing that, drop) undoes them. The
/// job's VMM must be gone first: its TAP cannot be removed while it is attached.
pub struct VmResources {
    dir: JobDir,
    net: Option<GuestNet>,
    /// `release` has removed everything; nothing is left for drop.
    released: bool,
}

/// A guest network slot with its TAP and firewall; dropping it removes both and frees the slot.
struct GuestNet {
    // Dropped in this order: the firewall goes, then the TAP, then the slot is free again.
    _firewall: GuestFirewall,
    tap: PersistentTap,
    slot: NetSlot,
}

/// A TAP device that exists without an open handle, until dropped.
struct PersistentTap(String);

impl PersistentTap {
    fn create(name: &str) -> Result<Self, TapError> {
        Tap::open(name)?.set_persistent(true)?;
        Ok(PersistentTap(name.to_string()))
    }
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        if let Err(e) = remove_tap(&self.0) {
            tracing::error!(tap = %self.0, "cannot remove the guest's TAP device: {e}");
        }
    }
}

fn remove_tap(name: &str) -> Result<(), TapError> {
    Tap::open(name)?.set_persistent(false)
}

impl VmResources {
    /// Creates the job's directories and record. A work directory that exists already means a
    /// second start of the same job, which is refused.
    pub fn create(dir: JobDir, record: &JobRecord) -> Result<Self, ResourceError> {
        dir.create(record).map_err(|cause| ResourceError::Prepare {
            dir: dir.work.display().to_string(),
            cause,
        })?;
        Ok(VmResources {
            dir,
            net: None,
            released: false,
        })
    }

    pub fn dir(&self) -> &JobDir {
        &self.dir
    }

    /// Takes the job's network slot and makes its TAP, with the host's address and the
    /// firewall.
    pub fn attach_network(
        &mut self,
        slots: &Arc<NetSlots>,
        index: u32,
    ) -> Result<&NetSlot, ResourceError> {
        let slot = slots.acquire(index)?;
        let tap = PersistentTap::create(&slot.tap())?;
        let firewall = network::set_up_host_side(&tap.0, Some(slot.host()), &[])?;
        let net = self.net.insert(GuestNet {
            _firewall: firewall,
            tap,
            slot,
        });
        Ok(&net.slot)
    }

    /// Removes the network and the work directory; the logs stay.
    pub fn release(mut self) -> io::Result<()> {
        self.net = None;
        self.released = true;
        self.dir.remove_work()
    }
}

impl Drop for VmResources {
    /// The path of a job that did not get to `release` (its task was dropped).
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Some(net) = self.net.take() {
            tracing::warn!(tap = %net.tap.0, "job ended without releasing its VM's resources; removing them");
        }
        if let Err(e) = self.dir.remove_work() {
            tracing::error!(dir = %self.dir.work.display(), "cannot remove the job directory: {e}");
        }
    }
}

/// Removes this daemon's TAP devices (`prefix<N>`) and firewall tables of job networks that no
/// live job holds: what a daemon that was killed left. Run at start, after the old daemon's
/// VMMs are gone.
pub fn clear_leftovers(prefix: &str) -> Result<(), NetworkError> {
    let taps = std::fs::read_dir("/sys/class/net")
        .map_err(|source| NetworkError::Interface {
            name: "/sys/class/net".into(),
            source,
        })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| network::is_numbered(name, prefix));
    for tap in taps {
        match remove_tap(&tap) {
            Ok(()) => tracing::warn!(tap, "removed a guest TAP device left by a previous run"),
            Err(e) => tracing::error!(
                tap,
                "cannot remove a guest TAP device left by a previous run: {e}"
            ),
        }
    }
    for table in network::remove_guest_firewalls(prefix)? {
        tracing::warn!(
            table,
            "removed a guest firewall table left by a previous run"
        );
    }
    Ok(())
}
