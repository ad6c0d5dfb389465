//! Giving an interface (a guest's TAP) its address and bringing it up, through the same ioctls
//! `ifconfig` uses.

use std::net::Ipv4Addr;

use super::{Cidr, NetworkError};

#[repr(C)]
struct IfReqAddr {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifname(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut buf = [0u8; libc::IFNAMSIZ];
    let n = name.len().min(libc::IFNAMSIZ - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    buf
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Gives interface `name` the address `cidr` and brings it up.
pub fn configure_interface(name: &str, cidr: Cidr) -> Result<(), NetworkError> {
    let err = |source| NetworkError::Interface {
        name: name.to_string(),
        source,
    };
    // SAFETY: plain socket creation; the descriptor is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let ioctl = |req: libc::c_ulong, arg: *mut libc::c_void| {
        // SAFETY: `arg` points to an ifreq-shaped struct that lives across the call, as the
        // SIOCSIF* requests expect.
        if unsafe { libc::ioctl(sock, req, arg) } < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let result = (|| {
        let mut req = IfReqAddr {
            name: ifname(name),
            addr: sockaddr(cidr.addr),
            _pad: [0; 8],
        };
        ioctl(libc::SIOCSIFADDR, &mut req as *mut _ as *mut libc::c_void)?;
        req.addr = sockaddr(cidr.netmask());
        ioctl(
            libc::SIOCSIFNETMASK,
            &mut req as *mut _ as *mut libc::c_void,
        )?;
        let mut flags = IfReqFlags {
            name: ifname(name),
            flags: 0,
            _pad: [0; 22],
        };
        ioctl(
            libc::SIOCGIFFLAGS,
            &mut flags as *mut _ as *mut libc::c_void,
        )?;
        flags.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ioctl(
            libc::SIOCSIFFLAGS,
            &mut flags as *mut _ as *mut libc::c_void,
        )
    })();
    // SAFETY: `sock` is a descriptor this function opened.
    unsafe { libc::close(sock) };
    result.map_err(err)
}
