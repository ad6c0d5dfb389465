//! nftables: the per-guest table that keeps a guest away from its host and the metadata
//! service, and the host-wide NAT that gives guests the outside world.

use std::io::Write;
use std::process::{Command, Stdio};

use super::{Cidr, NetworkError};

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

/// The name of the table that guards `tap`.
fn table_name(tap: &str) -> String {
    format!(
        "hopper_{}",
        tap.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// Whether `name` is `prefix` followed by a number: one of the interfaces (or tables) made
/// with that prefix, and not one of another prefix that starts the same.
pub fn is_numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the guest firewall tables of every interface named `tap_prefix<N>`; returns their
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
        .filter(|t| is_numbered(t, &ours))
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

/// Outbound access for all guests of a host: IP forwarding on, guest addresses (`guests`, the
/// fleet's guest range) masqueraded behind the host, and no traffic from one guest to another.
/// By address, not interface: every daemon on a machine installs the same table, whatever its
/// interfaces are called. Installed at start; replaced whole on the next.
pub fn install_guest_nat(guests: Cidr) -> Result<(), NetworkError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetworkError::Forwarding)?;
    let table = "hopper_nat";
    let script = format!(
        "table ip {table}\ndelete table ip {table}\n\
         table ip {table} {{\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {guests} ip daddr != {guests} masquerade\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority -10; policy accept;\n\
         \x20   ip saddr {guests} ip daddr {guests} drop\n\
         \x20 }}\n\
         }}\n"
    );
    nft(&script, table)
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
    fn ruleset_drops_host_and_metadata_but_allows_listed_ports() {
        let r = ruleset("hopper_t0", "t0", &[8000, 9000]);
        assert!(r.contains("iifname \"t0\" tcp dport { 8000, 9000 } accept"));
        assert!(r.contains("iifname \"t0\" drop"));
        assert!(r.contains("169.254.0.0/16 drop"));
        assert!(!ruleset("hopper_t0", "t0", &[]).contains("dport"));
    }
}
