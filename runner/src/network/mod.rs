//! The host side of a guest's network: the TAP interface's address, and the firewall that
//! keeps the guest away from the host itself and from the cloud metadata service.
//!
//! Policy (nftables, one table per guest interface so that it can be removed whole):
//! traffic from the guest to any address of the host is dropped, except replies on connections
//! the host opened and the TCP ports the operator allows; traffic from the guest to link-local
//! addresses (169.254.0.0/16, where clouds put their metadata service) is dropped before it is
//! routed anywhere.

mod firewall;
mod interface;

use std::net::Ipv4Addr;

pub use firewall::{install_guest_nat, is_numbered, remove_guest_firewalls, GuestFirewall};
pub use interface::configure_interface;

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
}
