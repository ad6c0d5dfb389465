//! Command-line interface.

pub mod vm;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hopper-runner",
    version,
    about = "Hopper's runner host daemon and microVM monitor"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run and control microVMs directly.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Run this machine as a runner host: enroll with the scheduler, take job assignments and
    /// run each job in its own microVM.
    ///
    /// SIGTERM or SIGINT stops every job's VM, reports the jobs failed, removes what they held on
    /// the host, and exits 0.
    Host(crate::host::HostArgs),
}

impl Cli {
    /// The log level when HOPPER_LOG is unset: the daemon reports its work; the VMM commands
    /// keep stderr for problems.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Host(_) => "info",
            Command::Vm(_) => "warn",
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Vm(cmd) => vm::run(cmd),
        Command::Host(args) => crate::host::run(args).map(|()| ExitCode::SUCCESS),
    }
}
