//! `hopper-agent`: `serve` runs inside a guest (or a test host); `call` is the host-side
//! client for scripts and tests.

mod power;
mod tty;

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hopper_agent::server::{serve, Served};
use hopper_agent::{AgentClient, Channel, Exec};

#[derive(Parser)]
#[command(
    name = "hopper-agent",
    version,
    about = "Hopper's guest agent and its command-line client"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the agent protocol (inside the guest).
    Serve(ServeArgs),
    /// Connect to an agent, optionally copy files in, run a command (exiting with its status)
    /// and power the guest off.
    Call(CallArgs),
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct ServeArgs {
    /// Serve on this TTY device (a virtio-console port such as /dev/hvc0), reopening it when
    /// it hangs up.
    #[arg(long)]
    device: Option<PathBuf>,
    /// Serve TCP connections on this address, one at a time.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(Args)]
struct CallArgs {
    /// Unix socket of the agent channel (e.g. a QEMU chardev socket).
    #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
    unix: Option<PathBuf>,
    /// TCP address of an agent started with `serve --listen`.
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Seconds to wait for the channel and the agent's ready signal.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Copy LOCAL to REMOTE in the guest first (mode copied too); repeatable.
    #[arg(long, num_args = 2, value_names = ["LOCAL", "REMOTE"], action = clap::ArgAction::Append)]
    put: Vec<PathBuf>,
    /// After everything else, ask the agent to sync and power the guest off.
    #[arg(long)]
    poweroff: bool,
    /// The command to run in the guest.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => run_serve(args).map(|()| ExitCode::SUCCESS),
        Cmd::Call(args) => run_call(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("hopper-agent: {e:#}");
        ExitCode::from(255)
    })
}

fn run_serve(args: ServeArgs) -> Result<()> {
    match (args.device, args.listen) {
        (Some(dev), _) => serve_device(&dev),
        (None, Some(addr)) => serve_tcp(addr),
        (None, None) => unreachable!("clap requires one of --device/--listen"),
    }
}

fn serve_device(dev: &Path) -> Result<()> {
    loop {
        let mut port = tty::open_raw(dev).with_context(|| format!("opening {}", dev.display()))?;
        match serve(&mut port) {
            Ok(Served::Shutdown { reboot }) => shut_down(reboot)?,
            Ok(Served::Closed) => eprintln!("hopper-agent: {} hung up; reopening", dev.display()),
            Err(e) => eprintln!("hopper-agent: {}: {e}; reopening", dev.display()),
        }
        // Avoid spinning if the port keeps hanging up.
        thread::sleep(Duration::from_millis(200));
    }
}

fn serve_tcp(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("hopper-agent: accept: {e}");
                continue;
            }
        };
        // Frames are small request/reply pairs: send each at once.
        let _ = conn.set_nodelay(true);
        match serve(&mut conn) {
            Ok(Served::Shutdown { reboot }) => shut_down(reboot)?,
            Ok(Served::Closed) => {}
            Err(e) => eprintln!("hopper-agent: connection: {e}"),
        }
    }
    Ok(())
}

fn shut_down(reboot: bool) -> Result<()> {
    Err(power::power_off(reboot)).context(if reboot { "reboot" } else { "power off" })
}

fn run_call(args: CallArgs) -> Result<ExitCode> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let deadline = Instant::now() + timeout;
    match (&args.unix, &args.tcp) {
        (Some(path), _) => call(
            retry_connect(
                deadline,
                || UnixStream::connect(path),
                &path.display().to_string(),
            )?,
            &args,
            deadline,
        ),
        (None, Some(addr)) => call(
            retry_connect(deadline, || TcpStream::connect(addr), &addr.to_string())?,
            &args,
            deadline,
        ),
        (None, None) => unreachable!("clap requires one of --unix/--tcp"),
    }
}

/// The channel may not exist yet (the VM is still starting), so connecting is retried until
/// the deadline.
fn retry_connect<S>(
    deadline: Instant,
    connect: impl Fn() -> std::io::Result<S>,
    what: &str,
) -> Result<S> {
    loop {
        match connect() {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {what}"))
            }
            // Often: how soon a call notices the channel is part of what it measures
            // (a restored guest's readiness, say).
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn call<S: Channel>(stream: S, args: &CallArgs, deadline: Instant) -> Result<ExitCode> {
    let mut client = AgentClient::new(stream);
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    client.wait_ready(left).context("waiting for the agent")?;
    for pair in args.put.chunks(2) {
        let [local, remote] = pair else {
            bail!("--put takes LOCAL REMOTE")
        };
        put(&mut client, local, remote)?;
    }
    let mut code = ExitCode::SUCCESS;
    if !args.command.is_empty() {
        let out = client
            .exec(&Exec::new(args.command.iter().cloned()))
            .context("running the command")?;
        std::io::stdout().write_all(&out.stdout)?;
        std::io::stderr().write_all(&out.stderr)?;
        // Shell convention: a signal shows as 128 + its number; codes outside a byte wrap.
        code = ExitCode::from(out.exit.shell_code() as u8);
    }
    if args.poweroff {
        client.shutdown(false).context("powering the guest off")?;
    }
    Ok(code)
}

fn put<S: Channel>(client: &mut AgentClient<S>, local: &Path, remote: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let data = std::fs::read(local).with_context(|| format!("reading {}", local.display()))?;
    let mode = File::open(local)?.metadata()?.permissions().mode() & 0o7777;
    let remote = remote.to_str().context("remote path is not UTF-8")?;
    client
        .write_file(remote, Some(mode), &data)
        .with_context(|| format!("copying {} to {remote}", local.display()))
}
