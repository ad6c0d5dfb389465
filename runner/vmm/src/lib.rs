//! Hopper's KVM microVM monitor.
//!
//! A VM is built from a [`VmConfig`]: guest memory ([`memory`]) laid out as [`layout`] describes,
//! a stock Linux bzImage loaded by [`boot`], ACPI tables ([`acpi`]) that let an unmodified
//! distribution kernel discover the virtio-mmio [`devices`], and one thread per vCPU ([`vcpu`]).
//! [`Vmm`] ties them together and runs until the guest powers off or resets. Every piece keeps
//! its state in explicit structs so that snapshots and live migration can serialize it.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod disk_copy;
pub mod event_loop;
mod exit;
pub mod extents;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod persist;
mod restore;
pub mod snapshot;
pub mod tap;
pub mod vcpu;
pub mod vm;
mod vmm;
pub mod zeros;

pub use config::{ConfigError, NetConfig, VmConfig};
pub use restore::{Placement, RestoreConfig, RestoredDisk};
pub use vmm::{Error, ExitReason, Vmm};
