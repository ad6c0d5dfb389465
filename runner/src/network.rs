//! The host side of a guest's network: the TAP interface's address, and the firewall that
//! keeps the guest away from the host itself and from the cloud metadata service.
//!
//! Policy (nftables, one table per guest interface so that it can be removed whole):
//! traffic from the guest to any address of the host is dropped, except replies on connections
//! the host opened and the TCP ports the operator allows; traffic from the guest to link-local
//! addresses (169.254.0.0/16, where clouds put their metadata service) is dropped before it is
//! routed anywhere.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0:?} is not an IPv4 address with a prefix length (like 172.16.0.1/30)")]
    BadCidr(String),
    #[error("cannot configure interface {name}: {source}")]
    Interface {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot turn on IP forwarding for guests: {0}")]
    Forwarding(std::io::Error),
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    NftMissing(std::io::Error),
    #[error("nft refused the guest firewall for {tap}: {stderr}")]
    Nft { tap: String, stderr: String },
}

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = NetworkError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError::BadCidr(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix == 0 || prefix > 30 {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }
}

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

/// The nftables table guarding one guest interface; removed when dropped.
pub struct GuestFirewall {
    table: String,
}

fn nft(script: &str, tap: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetworkError::NftMissing)?;
    child
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(script.as_bytes())
        .map_err(NetworkError::NftMissing)?;
    let out = child.wait_with_output().map_err(NetworkError::NftMissing)?;
    if !out.status.success() {
        return Err(NetworkError::Nft {
            tap: tap.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The ruleset for `tap`; `allowed_tcp_ports` are host ports the guest may connect to.
pub fn ruleset(table: &str, tap: &str, allowed_tcp_ports: &[u16]) -> String {
    let allow = if allowed_tcp_ports.is_empty() {
        String::new()
    } else {
        let ports: Vec<String> = allowed_tcp_ports.iter().map(u16::to_string).collect();
        format!(
            "    iifname \"{tap}\" tcp dport {{ {} }} accept\n",
            ports.join(", ")
        )
    };
    format!(
        "table inet {table} {{\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority -10; policy accept;\n\
         \x20   iifname \"{tap}\" ct state established,related accept\n\
         {allow}\
         \x20   iifname \"{tap}\" drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority -10; policy accept;\n\
         \x20   iifname \"{tap}\" ip daddr 169.254.0.0/16 drop\n\
         \x20   iifname \"{tap}\" ip6 daddr fe80::/10 drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Gives `tap` its host address (if any) and its firewall, removed when the returned value is
/// dropped.
pub fn set_up_host_side(
    tap: &str,
    host_ip: Option<Cidr>,
    allowed_tcp_ports: &[u16],
) -> Result<GuestFirewall, NetworkError> {
    if let Some(cidr) = host_ip {
        configure_interface(tap, cidr)?;
    }
    GuestFirewall::install(tap, allowed_tcp_ports)
}

/// The name of the table that guards `tap`.
fn table_name(tap: &str) -> String {
    format!(
        "hopper_{}",
        tap.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// Removes the guest firewall tables of every interface named `tap_prefix…`; returns their
/// names.
pub fn remove_guest_firewalls(tap_prefix: &str) -> Result<Vec<String>, NetworkError> {
    let out = Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .map_err(NetworkError::NftMissing)?;
    if !out.status.success() {
        return Err(NetworkError::Nft {
            tap: tap_prefix.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let ours = table_name(tap_prefix);
    let tables: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|t| t.starts_with(&ours))
        .map(str::to_string)
        .collect();
    for table in &tables {
        nft(&format!("delete table inet {table}\n"), table)?;
    }
    Ok(tables)
}

impl GuestFirewall {
    pub fn install(tap: &str, allowed_tcp_ports: &[u16]) -> Result<Self, NetworkError> {
        let table = table_name(tap);
        // Start from a clean table: one left by a VMM that was killed is replaced whole.
        let script = format!(
            "table inet {table}\ndelete table inet {table}\n{}",
            ruleset(&table, tap, allowed_tcp_ports)
        );
        nft(&script, tap)?;
        Ok(GuestFirewall { table })
    }
}

/// Outbound access for all guests of a host: IP forwarding on, guest addresses (`guests`)
/// masqueraded behind the host, and no traffic from one guest interface (`tap_prefix*`) to
/// another. Installed once by the host daemon; replaced whole on the next start.
pub fn install_guest_nat(guests: Cidr, tap_prefix: &str) -> Result<(), NetworkError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetworkError::Forwarding)?;
    let table = "hopper_nat";
    let script = format!(
        "table ip {table}\ndelete table ip {table}\n\
         table ip {table} {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {guests} oifname != \"{tap_prefix}*\" masquerade\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority -10; policy accept;\n\
         \x20   iifname \"{tap_prefix}*\" oifname \"{tap_prefix}*\" drop\n\
         \x20 }}\n\
         }}\n"
    );
    nft(&script, tap_prefix)
}

impl Drop for GuestFirewall {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table), &self.table) {
            tracing::warn!("cannot remove firewall table {}: {e}", self.table);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "172.16.0.1/30".parse().unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        for bad in [
            "172.16.0.1",
            "172.16.0.1/0",
            "172.16.0.1/31",
            "x/24",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ruleset_drops_host_and_metadata_but_allows_listed_ports() {
        let r = ruleset("hopper_t0", "t0", &[8000, 9000]);
        assert!(r.contains("iifname \"t0\" tcp dport { 8000, 9000 } accept"));
        assert!(r.contains("iifname \"t0\" drop"));
        assert!(r.contains("169.254.0.0/16 drop"));
        assert!(!ruleset("hopper_t0", "t0", &[]).contains("dport"));
    }
}
