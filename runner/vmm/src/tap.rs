//! TAP network devices: the host end of a guest's virtio-net. Frames carry a 12-byte virtio-net
//! header in both directions (IFF_VNET_HDR), which matches what the guest driver exchanges with
//! VIRTIO_F_VERSION_1, so frames pass through without rewriting.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const ARPHRD_ETHER: u16 = 1;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// Size of struct virtio_net_hdr_v1.
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// `struct ifreq` holding a hardware address.
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; libc::IFNAMSIZ],
    family: u16,
    data: [u8; 14],
    _pad: [u8; 8],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is invalid (1 to 15 bytes, no '/', whitespace or NUL)")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    Open(std::io::Error),
    #[error("cannot attach to TAP device {name}: {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot configure TAP device {name}: {source}")]
    Configure {
        name: String,
        source: std::io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
}

fn ioctl(fd: RawFd, req: libc::c_ulong, arg: *const libc::c_void) -> std::io::Result<()> {
    // SAFETY: every caller passes a request whose argument is `arg`'s pointee or an integer
    // passed by value, and `fd` is an open TUN file descriptor.
    let ret = unsafe { libc::ioctl(fd, req, arg) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens (creating if needed) the TAP device `name`, non-blocking. A device that did not
    /// exist before goes away when the returned handle is dropped.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let valid = !name.is_empty()
            && name.len() < libc::IFNAMSIZ
            && !name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
        if !valid {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        let attach = |source| TapError::Attach {
            name: name.to_string(),
            source,
        };
        ioctl(fd, TUNSETIFF, &req as *const IfReq as *const libc::c_void).map_err(attach)?;
        let configure = |source| TapError::Configure {
            name: name.to_string(),
            source,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl(
            fd,
            TUNSETVNETHDRSZ,
            &hdr_len as *const libc::c_int as *const libc::c_void,
        )
        .map_err(configure)?;
        // No offloads: the guest is offered none, so the host must hand it complete frames.
        ioctl(fd, TUNSETOFFLOAD, std::ptr::null()).map_err(configure)?;
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the host side's MAC address.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), TapError> {
        let mut req = IfReqHwAddr {
            name: [0; libc::IFNAMSIZ],
            family: ARPHRD_ETHER,
            data: [0; 14],
            _pad: [0; 8],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        req.data[..6].copy_from_slice(&mac);
        ioctl(
            self.file.as_raw_fd(),
            libc::SIOCSIFHWADDR,
            &req as *const IfReqHwAddr as *const libc::c_void,
        )
        .map_err(|source| TapError::Configure {
            name: self.name.clone(),
            source,
        })
    }

    /// A persistent device outlives its handles: whoever made it persistent must undo that,
    /// and the device goes when its last handle closes.
    pub fn set_persistent(&self, persistent: bool) -> Result<(), TapError> {
        // TUNSETPERSIST takes its flag as the argument's value, not through a pointer.
        ioctl(
            self.file.as_raw_fd(),
            TUNSETPERSIST,
            usize::from(persistent) as *const libc::c_void,
        )
        .map_err(|source| TapError::Configure {
            name: self.name.clone(),
            source,
        })
    }

    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", "a/b", "has space", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::BadName(_))),
                "{name:?}"
            );
        }
    }
}
