//! `hopper-runner vm …`: boot a microVM in the foreground, and control a running one.

use crate::network::{self, Cidr, GuestFirewall};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hopper_vmm::control::{self, Request};
use hopper_vmm::migration::{self, MigrateOptions, ReceiveConfig, TlsFiles};
use hopper_vmm::{ExitReason, NetConfig, Placement, RestoreConfig, RestoredDisk, VmConfig, Vmm};
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
    /// Move a running VM to another runner host (which runs `vm receive`) while it runs.
    /// Prints what it took; the VM's VMM here exits once the target runs it. On failure
    /// before the handover the VM runs on here.
    Migrate(Box<MigrateArgs>),
    /// Wait for one VM migrated by `vm migrate` from another host, then run it; its serial
    /// console goes to stdout. Exits non-zero, leaving nothing behind, if the migration fails.
    Receive(Box<ReceiveArgs>),
}

/// The mutual-TLS identity of a runner for migrations.
#[derive(Args)]
pub struct TlsArgs {
    /// This runner's certificate (PEM), signed by the fleet's CA and carrying the DNS name
    /// "hopper-runner".
    #[arg(long)]
    tls_cert: PathBuf,
    /// The certificate's private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// The fleet's CA certificate (PEM): peers must present a certificate it signed.
    #[arg(long)]
    tls_ca: PathBuf,
}

impl TlsArgs {
    /// Absolute paths: the VMM that reads them may run in another directory.
    fn files(&self) -> anyhow::Result<TlsFiles> {
        let abs = |p: &PathBuf| {
            std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
        };
        Ok(TlsFiles {
            cert: abs(&self.tls_cert)?,
            key: abs(&self.tls_key)?,
            ca: abs(&self.tls_ca)?,
        })
    }
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM's control socket (its `--api-socket`).
    #[arg(long)]
    socket: PathBuf,
    /// The receiving runner's address, host:port.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Copy while the guest runs until the final pause is estimated below this.
    #[arg(long, default_value_t = migration::source::DEFAULT_MAX_DOWNTIME_MS)]
    max_downtime_ms: u64,
    /// Hand over after at most this many copy rounds, even if the pause will be longer
    /// [default: 30, or 0 with --postcopy].
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Post-copy: hand the VM over as soon as the rounds end (at once by default) and send
    /// the rest while it runs on the target, first what its guest touches. The fastest
    /// evacuation; but until the copy completes the VM needs both hosts, and if either
    /// fails meanwhile the VM is lost.
    #[arg(long)]
    postcopy: bool,
    /// Connections that carry memory and disk in parallel (TLS and compression take a core
    /// each) [default: this host's CPUs, at most 4].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=16))]
    streams: Option<u8>,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Address to listen on, host:port.
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    place: PlaceArgs,
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
    /// The snapshot directory (made by `vm snapshot`). It is left unchanged, unless
    /// --take-disk.
    #[arg(long)]
    from: PathBuf,
    /// Move the snapshot's disk to --rootfs instead of copying it: no copy to wait for, but
    /// the snapshot cannot be restored again. Both must be on one file system.
    #[arg(long)]
    take_disk: bool,
    #[command(flatten)]
    place: PlaceArgs,
}

/// Where a VM that comes from elsewhere (a snapshot, another host) goes on this host.
#[derive(Args)]
pub struct PlaceArgs {
    /// Where to put the VM's root disk (must not exist; required when the VM has a disk).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// TAP device for the network interface (default: the one the VM had).
    #[arg(long)]
    tap: Option<String>,
    #[command(flatten)]
    host_net: HostNetArgs,
    /// The TAP exists with its host side (address, firewall) set up by the caller, as the
    /// runner host daemon does: this VMM installs nothing on the host.
    #[arg(long, requires = "tap", conflicts_with_all = ["host_ip", "allow_host_ports"])]
    tap_prepared: bool,
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
    /// The TAP's host side (address, firewall) is set up and removed by the caller, as the
    /// runner host daemon does for its jobs: this VMM installs nothing on the host.
    #[arg(long, requires = "tap", conflicts_with_all = ["host_ip", "allow_host_ports"])]
    tap_prepared: bool,
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
        VmCommand::Receive(args) => return receive_vm(*args),
        VmCommand::Migrate(a) => (
            a.socket.clone(),
            Request::Migrate({
                let defaults = MigrateOptions::new(a.to.clone(), a.tls.files()?, a.postcopy);
                MigrateOptions {
                    max_downtime_ms: a.max_downtime_ms,
                    max_rounds: a.max_rounds.unwrap_or(defaults.max_rounds),
                    streams: a.streams.unwrap_or(defaults.streams),
                    ..defaults
                }
            }),
        ),
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
    let firewall = match args.tap_prepared {
        true => None,
        false => host_side(args.tap.as_deref(), &args.host_net)?,
    };
    run_to_end(vmm, firewall)
}

impl PlaceArgs {
    /// The host side of the VM's TAP, unless the caller prepared it.
    fn host_side(&self, tap: Option<&str>) -> anyhow::Result<Option<GuestFirewall>> {
        match self.tap_prepared {
            true => Ok(None),
            false => host_side(tap, &self.host_net),
        }
    }

    fn placement(&self) -> Placement {
        Placement {
            rootfs: self.rootfs.clone(),
            tap: self.tap.clone(),
            agent_socket: self.agent_socket.clone(),
            api_socket: self.api_socket.clone(),
        }
    }
}

fn restore_vm(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let cfg = RestoreConfig {
        from: args.from,
        place: args.place.placement(),
        disk: match args.take_disk {
            true => RestoredDisk::Taken,
            false => RestoredDisk::Copied,
        },
    };
    let vmm = Vmm::restore(&cfg, Box::new(std::io::stdout()))
        .with_context(|| format!("cannot restore the VM from {}", cfg.from.display()))?;
    let tap = vmm.tap().map(str::to_owned);
    let firewall = match args.place.host_side(tap.as_deref()) {
        Ok(firewall) => firewall,
        Err(e) => {
            let had_disk = vmm.has_disk();
            drop(vmm);
            if had_disk {
                cfg.undo_disk();
            }
            return Err(e);
        }
    };
    run_to_end(vmm, firewall)
}

/// What `vm receive` says on stderr once it listens (followed by the address), and once the VM
/// runs on this host: the runner host daemon follows a migration by these lines.
pub const LISTENING_ON: &str = "hopper-runner: waiting for a migrating VM on ";
pub const RUNS_HERE: &str = "hopper-runner: the VM runs here";

fn receive_vm(args: ReceiveArgs) -> anyhow::Result<ExitCode> {
    let cfg = ReceiveConfig {
        listen: args.listen.clone(),
        tls: args.tls.files()?,
        place: args.place.placement(),
    };
    // The VM's network is made ready before anything moves; a failure refuses the VM, and
    // the source runs on.
    let (incoming, firewall) = migration::target::receive(
        &cfg,
        Box::new(std::io::stdout()),
        |addr| eprintln!("{LISTENING_ON}{addr}"),
        |tap| args.place.host_side(tap),
    )
    .context("cannot receive the VM")?;
    let vmm = incoming
        .commit()
        .context("the migration did not complete")?;
    eprintln!("{RUNS_HERE}");
    run_to_end(vmm, firewall)
}

/// Sets up the host side of a VM's TAP: its address, and the firewall (removed when the
/// returned value is dropped).
fn host_side(tap: Option<&str>, host_net: &HostNetArgs) -> anyhow::Result<Option<GuestFirewall>> {
    host_net.check(tap.is_some())?;
    let Some(tap) = tap else {
        return Ok(None);
    };
    Ok(Some(network::set_up_host_side(
        tap,
        host_net.host_ip,
        &host_net.allow_host_ports,
    )?))
}

/// Runs a built VM to its end; `_firewall` stays in place meanwhile.
fn run_to_end(vmm: Vmm, _firewall: Option<GuestFirewall>) -> anyhow::Result<ExitCode> {
    match vmm.run().context("the VM failed")? {
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped => Ok(ExitCode::SUCCESS),
        ExitReason::Migrated => {
            eprintln!("hopper-runner: the VM moved to another host");
            Ok(ExitCode::SUCCESS)
        }
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
