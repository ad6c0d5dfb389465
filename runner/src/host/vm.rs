//! One job's VMM: `hopper-runner vm run` as a child process, so that a VMM crash takes down one
//! job and never the daemon or the other jobs.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hopper_agent::{AgentClient, ClientError};

use super::jobdir::{JobDir, Log};
use super::netslot::NetSlot;

/// The guest kernel's command line. `panic=-1`: a guest that panics reboots at once, which
/// ends the VMM, instead of hanging until the job timeout.
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet root=/dev/vda";

/// The guest image every job boots from; jobs get private copies of `rootfs`.
#[derive(Debug, Clone)]
pub struct Images {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start the VMM: {0}")]
    Spawn(io::Error),
    #[error("the VMM exited before the guest agent was ready ({0})")]
    ExitedEarly(ExitStatus),
    #[error("the guest agent was not ready within {0:?}")]
    AgentTimeout(Duration),
    #[error("the guest agent channel failed before the agent was ready: {0}")]
    Agent(ClientError),
}

pub struct Vm {
    child: Child,
    dir: JobDir,
}

impl Vm {
    /// Starts the VMM on the job's private disk, with its network on `net`; the console goes
    /// to the job's logs.
    pub fn spawn(
        images: &Images,
        cpus: u32,
        memory_mib: u64,
        dir: &JobDir,
        net: &NetSlot,
        dns: Option<Ipv4Addr>,
    ) -> Result<Vm, VmError> {
        let exe = std::env::current_exe().map_err(VmError::Spawn)?;
        let console = File::create(dir.log(Log::Console)).map_err(VmError::Spawn)?;
        let vmm_log = File::create(dir.log(Log::Vmm)).map_err(VmError::Spawn)?;
        let child = Command::new(exe)
            .args(["vm", "run", "--cmdline"])
            .arg(format!("{CMDLINE} {}", net.guest_kernel_args(dns)))
            .args(["--tap", &net.tap(), "--host-ip", &net.host().to_string()])
            .arg("--kernel")
            .arg(&images.kernel)
            .arg("--initrd")
            .arg(&images.initrd)
            .arg("--rootfs")
            .arg(dir.disk())
            .args([
                "--cpus",
                &cpus.to_string(),
                "--memory",
                &memory_mib.to_string(),
            ])
            .arg("--agent-socket")
            .arg(dir.agent_socket())
            .arg("--api-socket")
            .arg(dir.api_socket())
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(vmm_log)
            .spawn()
            .map_err(VmError::Spawn)?;
        let vm = Vm {
            child,
            dir: dir.clone(),
        };
        // A restarted daemon finds the VMM by this file (see recover.rs).
        vm.dir.write_pid(vm.child.id()).map_err(VmError::Spawn)?;
        Ok(vm)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects to the guest agent and waits until it is ready, giving up early if the VMM
    /// exits.
    pub fn connect_agent(&mut self, timeout: Duration) -> Result<AgentClient<UnixStream>, VmError> {
        let deadline = Instant::now() + timeout;
        // The VMM creates the socket while it builds the VM.
        let stream = loop {
            if let Some(status) = self.exited() {
                return Err(VmError::ExitedEarly(status));
            }
            match UnixStream::connect(self.dir.agent_socket()) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(_) => return Err(VmError::AgentTimeout(timeout)),
            }
        };
        let mut agent = AgentClient::new(stream);
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.wait_ready(left) {
            Ok(_) => Ok(agent),
            Err(_) if self.wait_timeout(Duration::from_millis(200)).is_some() => {
                Err(VmError::ExitedEarly(self.exited().expect("just exited")))
            }
            Err(ClientError::Timeout(_)) => Err(VmError::AgentTimeout(timeout)),
            Err(e) => Err(VmError::Agent(e)),
        }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the VMM to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the VMM (the guest's power is cut) and reaps it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.exited() {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()
    }
}

impl Drop for Vm {
    /// No VMM outlives its supervisor, whatever path the supervisor leaves by.
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::error!(pid = self.child.id(), "cannot kill the VMM: {e}");
        }
    }
}
