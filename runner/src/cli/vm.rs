//! `hopper-runner vm …`: boot a microVM in the foreground, and control a running one.

use crate::network::{self, Cidr, GuestFirewall};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hopper_vmm::control::{self, Request};
use hopper_vmm::{ExitReason, NetConfig, RestoreConfig, VmConfig, Vmm};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a VM; its serial console goes to stdout. Exits 0 when the guest powers off or
    /// reboots, non-zero with a message when the VM cannot be started or fails.
    Run(Box<RunArgs>),
    /// Pause a running VM's vCPUs and devices.
    Pause(SocketArg),
    /// Resume a paused VM.
    Resume(SocketArg),
    /// Stop a VM (as if its power were cut).
    Stop(SocketArg),
    /// Print whether a VM is running or paused.
    Status(SocketArg),
    /// Pause a running VM and save it (vCPUs, devices, memory, disk) into a directory; then
    /// stop it, or let it go on with --resume.
    Snapshot(SnapshotArgs),
    /// Start a VM from a snapshot, where it was paused; its serial console goes to stdout.
    Restore(Box<RestoreArgs>),
}

#[derive(Args)]
pub struct SnapshotArgs {
    /// The VM's control socket (its `--api-socket`).
    #[arg(long)]
    socket: PathBuf,
    /// Directory for the snapshot (created; must not hold a snapshot already).
    #[arg(long)]
    to: PathBuf,
    /// Let the VM run on after the snapshot instead of stopping it.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot directory (made by `vm snapshot`). It is left unchanged.
    #[arg(long)]
    from: PathBuf,
    /// Where to put the restored VM's root disk, a copy of the snapshot's (must not exist;
    /// required when the snapshot has a disk).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// TAP device for the network interface (default: the one the VM had).
    #[arg(long)]
    tap: Option<String>,
    #[command(flatten)]
    host_net: HostNetArgs,
    /// Unix socket for the guest agent channel (required when the VM had one).
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    /// Unix socket for the control API.
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

/// How the host side of a VM's TAP is set up.
#[derive(Args)]
pub struct HostNetArgs {
    /// Address (with prefix) of the host's end of the TAP, e.g. 172.16.0.1/30; the guest uses
    /// it as its gateway.
    #[arg(long)]
    host_ip: Option<Cidr>,
    /// Host TCP port the guest may connect to (repeatable). Every other host port, and the
    /// link-local range with the cloud metadata service, is closed to the guest.
    #[arg(long = "allow-host-port")]
    allow_host_ports: Vec<u16>,
}

impl HostNetArgs {
    fn check(&self, has_tap: bool) -> anyhow::Result<()> {
        if !has_tap && (self.host_ip.is_some() || !self.allow_host_ports.is_empty()) {
            bail!("--host-ip and --allow-host-port need a VM with a network interface");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct SocketArg {
    /// The VM's control socket (its `--api-socket`).
    #[arg(long)]
    socket: PathBuf,
}

#[derive(Args)]
pub struct RunArgs {
    /// Linux kernel bzImage (e.g. a stock distribution vmlinuz).
    #[arg(long)]
    kernel: PathBuf,
    /// initramfs (cpio, optionally compressed) for the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Raw disk image (e.g. ext4) attached read-write as the first virtio-blk disk (/dev/vda).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Attach the rootfs read-only.
    #[arg(long, requires = "rootfs")]
    rootfs_read_only: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Kernel command line.
    #[arg(long, default_value = hopper_vmm::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// TAP device for a virtio-net interface (created if missing, and then removed on exit).
    #[arg(long)]
    tap: Option<String>,
    #[command(flatten)]
    host_net: HostNetArgs,
    /// MAC address of the guest's interface.
    #[arg(long, default_value = "06:00:ac:10:00:02", requires = "tap")]
    mac: String,
    /// Unix socket for the guest agent channel (virtio-console, /dev/hvc0 in the guest).
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    /// Unix socket for the control API (pause, resume, stop, status).
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC address {s:?} must be six hex bytes separated by ':'");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .with_context(|| format!("MAC address {s:?}: bad byte {p:?}"))?;
    }
    if mac[0] & 1 != 0 {
        bail!("MAC address {s:?} is a multicast address");
    }
    Ok(mac)
}

pub fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    let (socket, request) = match cmd {
        VmCommand::Run(args) => return run_vm(*args),
        VmCommand::Restore(args) => return restore_vm(*args),
        VmCommand::Snapshot(a) => (
            a.socket,
            Request::Snapshot {
                dir: std::path::absolute(&a.to)
                    .with_context(|| format!("bad snapshot directory {}", a.to.display()))?,
                resume: a.resume,
            },
        ),
        VmCommand::Pause(s) => (s.socket, Request::Pause),
        VmCommand::Resume(s) => (s.socket, Request::Resume),
        VmCommand::Stop(s) => (s.socket, Request::Stop),
        VmCommand::Status(s) => (s.socket, Request::Status),
    };
    let response = control::call(&socket, &request)
        .with_context(|| format!("cannot reach the VM's control socket {}", socket.display()))?;
    println!("{}", serde_json::to_string(&response)?);
    Ok(if response.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_vm(args: RunArgs) -> anyhow::Result<ExitCode> {
    args.host_net.check(args.tap.is_some())?;
    let net = match &args.tap {
        Some(tap) => Some(NetConfig {
            tap: tap.clone(),
            mac: parse_mac(&args.mac)?,
        }),
        None => None,
    };
    let cfg = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        rootfs: args.rootfs,
        rootfs_read_only: args.rootfs_read_only,
        cpus: args.cpus,
        memory_mib: args.memory,
        cmdline: args.cmdline,
        net,
        agent_socket: args.agent_socket,
        api_socket: args.api_socket,
    };
    let vmm = Vmm::build(&cfg, Box::new(std::io::stdout())).context("cannot start the VM")?;
    run_to_end(vmm, args.tap.as_deref(), &args.host_net)
}

fn restore_vm(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let cfg = RestoreConfig {
        from: args.from,
        rootfs: args.rootfs,
        tap: args.tap,
        agent_socket: args.agent_socket,
        api_socket: args.api_socket,
    };
    let vmm = Vmm::restore(&cfg, Box::new(std::io::stdout()))
        .with_context(|| format!("cannot restore the VM from {}", cfg.from.display()))?;
    let tap = vmm.tap().map(str::to_owned);
    if let Err(e) = args.host_net.check(tap.is_some()) {
        drop(vmm);
        if let Some(copy) = &cfg.rootfs {
            let _ = std::fs::remove_file(copy);
        }
        return Err(e);
    }
    run_to_end(vmm, tap.as_deref(), &args.host_net)
}

/// Runs a built VM to its end, with the host side of its TAP set up meanwhile.
fn run_to_end(vmm: Vmm, tap: Option<&str>, host_net: &HostNetArgs) -> anyhow::Result<ExitCode> {
    // The VMM created the TAP; the host end is configured before the guest can use it, and
    // the firewall is removed when this function returns.
    let _firewall = match tap {
        Some(tap) => {
            if let Some(cidr) = host_net.host_ip {
                network::configure_interface(tap, cidr)?;
            }
            Some(GuestFirewall::install(tap, &host_net.allow_host_ports)?)
        }
        None => None,
    };
    match vmm.run().context("the VM failed")? {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => Ok(ExitCode::SUCCESS),
        ExitReason::Error(msg) => bail!("the VM failed: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02").unwrap(),
            [6, 0, 0xac, 0x10, 0, 2]
        );
        assert!(parse_mac("06:00:ac:10:00").is_err());
        assert!(parse_mac("01:00:00:00:00:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
