//! Guest networks of the jobs on this host. The scheduler gives each job a slot of the fleet's
//! guest range, 172.16.0.0/16: a /30 (host end .1, guest .2) that the job keeps on every host
//! its VM visits, so the guest keeps its address and gateway when it moves. Here a slot is a
//! TAP device `<prefix><slot>` with that /30's host end; the prefix is this daemon's own, so
//! daemons sharing a machine never touch each other's devices.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use crate::network::Cidr;

/// Every job's guest address comes from here; the host masquerades it.
pub const GUEST_NET: Cidr = Cidr {
    addr: Ipv4Addr::new(172, 16, 0, 0),
    prefix: 16,
};
pub const DEFAULT_TAP_PREFIX: &str = "hjob";
/// /30 networks in a /16.
const SLOTS: u32 = 1 << 14;
/// Interface names have at most 15 bytes, and a slot takes up to 5 digits.
const MAX_PREFIX_LEN: usize = 10;

/// The slots this host's VMs hold.
pub struct NetSlots {
    prefix: String,
    used: Mutex<HashSet<u32>>,
}

pub struct NetSlot {
    index: u32,
    slots: Arc<NetSlots>,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("guest network slot {0} is outside the fleet's range (0 to 16383)")]
    OutOfRange(u32),
    #[error("guest network slot {0} is taken by another VM on this host")]
    Taken(u32),
}

/// Checks a TAP prefix given on the command line.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.bytes().all(|b| b.is_ascii_lowercase())
        && prefix.starts_with('h');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "a TAP prefix is 1 to {MAX_PREFIX_LEN} lowercase letters starting with 'h', not {prefix:?}"
        )),
    }
}

impl NetSlots {
    pub fn new(prefix: &str) -> Arc<Self> {
        Arc::new(NetSlots {
            prefix: prefix.to_string(),
            used: Mutex::new(HashSet::new()),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Takes the slot the scheduler gave a job.
    pub fn acquire(self: &Arc<Self>, index: u32) -> Result<NetSlot, SlotError> {
        if index >= SLOTS {
            return Err(SlotError::OutOfRange(index));
        }
        if !self.used.lock().unwrap().insert(index) {
            return Err(SlotError::Taken(index));
        }
        Ok(NetSlot {
            index,
            slots: self.clone(),
        })
    }
}

impl NetSlot {
    pub fn tap(&self) -> String {
        format!("{}{}", self.slots.prefix, self.index)
    }

    fn addr(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(GUEST_NET.addr) + self.index * 4 + offset)
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
        self.slots.used.lock().unwrap().remove(&self.index);
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
    fn a_slot_is_held_once_and_free_again_after_release() {
        let slots = NetSlots::new("hab");
        let a = slots.acquire(0).unwrap();
        let b = slots.acquire(1).unwrap();
        assert_eq!((a.tap(), b.tap()), ("hab0".to_string(), "hab1".to_string()));
        assert_eq!(b.host().to_string(), "172.16.0.5/30");
        assert_eq!(
            b.guest_kernel_args(None),
            "hopper.ip=172.16.0.6/30 hopper.gw=172.16.0.5"
        );
        assert!(matches!(slots.acquire(0), Err(SlotError::Taken(0))));
        assert!(matches!(
            slots.acquire(1 << 14),
            Err(SlotError::OutOfRange(_))
        ));
        drop(a);
        assert_eq!(slots.acquire(0).unwrap().tap(), "hab0");
        let last = slots.acquire((1 << 14) - 1).unwrap();
        assert_eq!(last.host().to_string(), "172.16.255.253/30");
        assert!(format!("hjobabcdef{}", (1 << 14) - 1).len() <= 15);
    }

    #[test]
    fn tap_prefixes_fit_interface_names() {
        assert!(check_prefix("hjob").is_ok());
        assert!(check_prefix("hjobabcdef").is_ok());
        for bad in ["", "hjobabcdefg", "job", "h1", "hJ", "h-"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_resolvers_are_skipped() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver 10.0.2.3\n";
        assert_eq!(host_nameserver(conf), Some(Ipv4Addr::new(10, 0, 2, 3)));
        assert_eq!(host_nameserver("nameserver 127.0.0.1\n"), None);
    }
}
