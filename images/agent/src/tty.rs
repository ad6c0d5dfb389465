//! Opening the agent's virtio-console port. /dev/hvc0 is a TTY: in its default cooked mode it
//! would echo our input back, turn `\n` into `\r\n` and buffer by line, so it is switched to
//! raw mode before the first frame.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub fn open_raw(path: &Path) -> io::Result<File> {
    // O_NOCTTY: the agent may run as a session leader (from init) and must not make the
    // channel its controlling terminal, or a hangup would signal it.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: termios is plain old data, fully initialised by tcgetattr before use; `fd` is
    // a valid open descriptor owned by `file` for the duration of these calls.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Whatever arrived while the port was in cooked mode is mangled; the client pings
        // until it hears from us, so dropping it loses nothing.
        libc::tcflush(fd, libc::TCIOFLUSH);
    }
    Ok(file)
}
