//! How a running VM ends, and the one-shot signal that carries the first reason to the VMM's
//! main loop from whichever thread saw it (a vCPU, a device, the control socket).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, keyboard controller, or triple fault).
    Reset,
    /// The operator asked the VMM to stop.
    Stopped,
    /// The VM moved to another host, which runs it now.
    Migrated,
    /// The VMM could not go on running the guest.
    Error(String),
}

pub struct ExitSignal {
    evt: EventFd,
    /// Set with the reason; read on every vCPU exit, so kept lock-free.
    exiting: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            exiting: AtomicBool::new(false),
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` unless an earlier one is already recorded, and wakes the main loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap();
        if slot.is_none() {
            log::debug!("VM exit requested: {reason:?}");
            *slot = Some(reason);
            self.exiting.store(true, Ordering::Release);
        }
        // A failed write means the counter is saturated, so the main loop is already woken.
        let _ = self.evt.write(1);
    }

    pub fn is_exiting(&self) -> bool {
        self.exiting.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap().clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}
