//! Snapshots of a VM, the base of live migration and continuous backup: the VM's state in a
//! checksummed, versioned file ([`format`]) and its memory in a sparse file that a restored VM
//! maps lazily ([`memory`]).

pub mod format;
pub mod memory;
