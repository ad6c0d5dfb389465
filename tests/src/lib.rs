//! Test-host harness: boots nested "test hosts" (L1: QEMU software emulation with an AMD CPU
//! model, KVM inside) in which Hopper's VMM and QEMU boot real guests (L2). See
//! tests/README.md and /work/shared/notes/nested-kvm.md for why guests are not tested on
//! the machine's own /dev/kvm.

pub mod bench;
mod binaries;
mod error;
mod l1image;
pub mod microvm;
mod monitor;
mod paths;
mod retry;
pub mod scheduler;
pub mod soak;
mod testhost;
pub mod tls;
pub mod workload;

pub use error::HarnessError;
pub use hopper_agent::{Exec, ExecOutput, ExitStatus};
pub use microvm::{
    boot_guest, receive_guest, restore_guest, GuestVmm, MicrovmGuest, MicrovmOptions,
};
pub use paths::GuestArtifacts;
pub use retry::again_if_a_host_broke;
pub use scheduler::SchedulerProcess;
pub use testhost::{TestHost, TestHostOptions};
pub use workload::{Expected, Workload};
