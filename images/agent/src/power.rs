//! Powering the guest off or rebooting it on the host's request.

use std::io;

/// Flushes file systems and powers off or reboots. Returns only on failure (e.g. not root).
pub fn power_off(reboot: bool) -> io::Error {
    let cmd = if reboot {
        libc::RB_AUTOBOOT
    } else {
        libc::RB_POWER_OFF
    };
    // SAFETY: sync and reboot take no pointers; reboot either does not return or fails with
    // errno set.
    unsafe {
        libc::sync();
        libc::reboot(cmd);
    }
    io::Error::last_os_error()
}
