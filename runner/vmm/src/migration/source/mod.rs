//! The sending side: pre-copy of memory and disk while the guest runs, then a short pause for
//! the last changes and the VM's state, then the commit handshake.
//!
//! Round 0 sends every page the guest has touched and every disk block that is not zero;
//! each later round sends what was written meanwhile (KVM's dirty log for the vCPUs' writes,
//! the VMM's bitmaps for the devices' writes, the disk's block log). Rounds stop when the
//! rest would go out within the pause target at the measured rate (though while each round
//! still halves what is left, one more goes), or after the round limit. A guest that writes
//! faster than the link carries is throttled: its vCPUs are held for a growing share of each
//! 100 ms.
//!
//! Post-copy hands over after `max_rounds` rounds (none by default) and sends the rest from
//! the paused VM afterwards ([`super::serve`]): the shortest evacuation, but from the commit
//! until the copy completes the VM needs both hosts.
//!
//! [`migrate`] drives it ([`rounds`]); [`convergence`] decides when the rounds stop,
//! [`throttle`] holds back a guest that writes too fast, [`tracking`] says what was written,
//! [`send`] puts pages and blocks on the streams, and [`handover`] does the pause's work.

mod convergence;
mod handover;
mod rounds;
pub(super) mod send;
mod throttle;
pub(super) mod tracking;

use super::link::LinkError;
use super::transport::{TlsFiles, TransportError};
use crate::persist::{Paused, PersistError};
use crate::vm::VmError;
use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

pub use rounds::migrate;

pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 100;
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// The receiving runner's address (host:port).
    pub to: String,
    pub tls: TlsFiles,
    /// Pre-copy goes on until the final pause is estimated to be this short.
    pub max_downtime_ms: u64,
    /// ... or for at most this many rounds.
    pub max_rounds: u32,
    /// Hand over when the rounds end and send the rest afterwards, pulled by the target
    /// where its guest needs it first.
    #[serde(default)]
    pub postcopy: bool,
    /// Connections that carry memory and disk in parallel before the handover.
    #[serde(default = "one_stream")]
    pub streams: u8,
}

fn one_stream() -> u8 {
    1
}

impl MigrateOptions {
    /// The defaults: pre-copy for up to [`DEFAULT_MAX_ROUNDS`] rounds (post-copy hands over at
    /// once), as many streams as this host has CPUs, at most 4.
    pub fn new(to: String, tls: TlsFiles, postcopy: bool) -> Self {
        MigrateOptions {
            to,
            tls,
            max_downtime_ms: DEFAULT_MAX_DOWNTIME_MS,
            max_rounds: if postcopy { 0 } else { DEFAULT_MAX_ROUNDS },
            postcopy,
            streams: std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u8),
        }
    }
}

/// What a migration took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// Rounds sent while the guest ran (round 0 included).
    pub rounds: u32,
    /// Guest memory sent, counting pages sent more than once (before compression).
    pub memory_bytes: u64,
    /// Disk sent, counting blocks sent more than once (before compression).
    pub disk_bytes: u64,
    /// What went over the wire (compressed, with framing, before TLS).
    pub wire_bytes: u64,
    /// From pausing the guest here to the target's word that it runs it.
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// The largest share of time the guest's vCPUs were held to let the copy converge.
    pub throttle_percent: u8,
    /// Post-copy: pages and blocks the target pulled because its guest needed them first.
    pub pulled: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    State(#[from] PersistError),
    #[error("reading the disk: {0}")]
    Disk(std::io::Error),
    #[error("the VM stopped during the migration")]
    VmStopped,
    /// The commit was sent but not confirmed: the target may or may not run the VM, so this
    /// side keeps it paused (never both running); ask the target, then resume or stop it.
    #[error("the handover is unconfirmed ({0}); the VM stays paused here")]
    Unconfirmed(LinkError),
    /// A post-copy broke after the handover: the target runs the VM but lacks part of it.
    #[error("the post-copy broke after the handover ({0}); the VM cannot go on")]
    PostcopyBroken(Box<MigrationError>),
    #[error("the target sent {0}")]
    Invalid(String),
}

/// Pauses and resumes the whole VM (vCPUs and devices).
pub trait Pausable: Sync {
    fn pause(&self);
    fn resume(&self);
    /// Whether the VM is on its way out (powered off, failed): nothing left to migrate.
    fn is_exiting(&self) -> bool;
}

/// The running VM to send.
pub struct Source<'a> {
    pub parts: Paused<'a>,
    /// The guest's CPUID (the first vCPU's), for the target's up-front check.
    pub cpuid: &'a [kvm_cpuid_entry2],
    pub control: &'a dyn Pausable,
}
