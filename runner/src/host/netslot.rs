//! Guest networks of the jobs on this host: each running job gets a slot, that is a TAP device
//! `hjob<N>` and a /30 out of 172.16.0.0/16 (host end .1, guest .2). Slots are returned when
//! the job's VM is gone, so the same TAP name never belongs to two live VMs.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use crate::network::Cidr;

/// Every job's guest address comes from here; the host masquerades it.
pub const GUEST_NET: Cidr = Cidr {
    addr: Ipv4Addr::new(172, 16, 0, 0),
    prefix: 16,
};
pub const TAP_PREFIX: &str = "hjob";
/// /30 networks in a /16.
const SLOTS: usize = 1 << 14;

pub struct NetSlots {
    used: Mutex<Vec<bool>>,
}

pub struct NetSlot {
    index: usize,
    slots: Arc<NetSlots>,
}

impl NetSlots {
    pub fn new() -> Arc<Self> {
        Arc::new(NetSlots {
            used: Mutex::new(vec![false; SLOTS]),
        })
    }

    /// The lowest free slot, or `None` when all are taken.
    pub fn acquire(self: &Arc<Self>) -> Option<NetSlot> {
        let mut used = self.used.lock().unwrap();
        let index = used.iter().position(|u| !u)?;
        used[index] = true;
        Some(NetSlot {
            index,
            slots: self.clone(),
        })
    }
}

impl NetSlot {
    pub fn tap(&self) -> String {
        format!("{TAP_PREFIX}{}", self.index)
    }

    fn addr(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(GUEST_NET.addr) + self.index as u32 * 4 + offset)
    }

    /// The host's end of the TAP: the guest's gateway.
    pub fn host(&self) -> Cidr {
        Cidr {
            addr: self.addr(1),
            prefix: 30,
        }
    }

    /// Kernel command-line parameters the guest image reads to configure eth0.
    pub fn guest_kernel_args(&self, dns: Option<Ipv4Addr>) -> String {
        let mut args = format!("hopper.ip={}/30 hopper.gw={}", self.addr(2), self.addr(1));
        if let Some(dns) = dns {
            args.push_str(&format!(" hopper.dns={dns}"));
        }
        args
    }
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        self.slots.used.lock().unwrap()[self.index] = false;
    }
}

/// The host's first IPv4 nameserver that a guest can reach (not a loopback stub resolver).
pub fn host_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_reused_after_release() {
        let slots = NetSlots::new();
        let a = slots.acquire().unwrap();
        let b = slots.acquire().unwrap();
        assert_eq!(
            (a.tap(), b.tap()),
            ("hjob0".to_string(), "hjob1".to_string())
        );
        assert_eq!(b.host().to_string(), "172.16.0.5/30");
        assert_eq!(
            b.guest_kernel_args(None),
            "hopper.ip=172.16.0.6/30 hopper.gw=172.16.0.5"
        );
        drop(a);
        assert_eq!(slots.acquire().unwrap().tap(), "hjob0");
    }

    #[test]
    fn loopback_resolvers_are_skipped() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver 10.0.2.3\n";
        assert_eq!(host_nameserver(conf), Some(Ipv4Addr::new(10, 0, 2, 3)));
        assert_eq!(host_nameserver("nameserver 127.0.0.1\n"), None);
    }
}
