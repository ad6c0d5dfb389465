//! One job's VMM: `hopper-runner vm run` as a child process, so that a VMM crash takes down one
//! job and never the daemon or the other jobs. Its console and messages come back through
//! pipes into the job's capped logs; the child is awaited, never polled.

use std::fs::File;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hopper_agent::{AgentClient, ClientError};
use hopper_api::{LogName, Shape};
use hopper_vmm::migration::TlsFiles;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::caplog::CappedLog;
use super::jobdir::JobDir;
use super::netslot::NetSlot;

/// The guest kernel's command line. `panic=-1`: a guest that panics reboots at once, which
/// ends the VMM, instead of hanging until the job timeout.
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet root=/dev/vda";
/// How often to look for the agent socket the VMM creates while it builds the VM.
const SOCKET_POLL: Duration = Duration::from_millis(20);

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
    pid: u32,
    agent_socket: PathBuf,
    /// Done when the VMM's output is all in the logs.
    captures: Vec<JoinHandle<()>>,
}

impl Vm {
    /// Starts the VMM on the job's private disk, with its network on `net` (whose TAP,
    /// address and firewall the daemon has set up); the console goes to the job's logs.
    pub fn spawn(
        images: &Images,
        shape: Shape,
        dir: &JobDir,
        net: &NetSlot,
        dns: Option<Ipv4Addr>,
    ) -> Result<Vm, VmError> {
        let exe = std::env::current_exe().map_err(VmError::Spawn)?;
        let mut cmd = Command::new(exe);
        cmd.args(["vm", "run", "--cmdline"])
            .arg(format!("{CMDLINE} {}", net.guest_kernel_args(dns)))
            .args(["--tap", &net.tap(), "--tap-prepared"])
            .arg("--kernel")
            .arg(&images.kernel)
            .arg("--initrd")
            .arg(&images.initrd)
            .arg("--rootfs")
            .arg(dir.disk())
            .args(["--cpus", &shape.vcpus().to_string()])
            .args(["--memory", &shape.memory_mib().to_string()])
            .arg("--agent-socket")
            .arg(dir.agent_socket())
            .arg("--api-socket")
            .arg(dir.api_socket());
        Self::start(cmd, dir, None)
    }

    /// Starts a VMM that waits for a VM migrated from another host (`vm receive`), on the
    /// job's disk path and network; what it says about the migration (where it listens, that
    /// the VM runs here) comes on `events`.
    pub fn receive(
        tls: &TlsFiles,
        dir: &JobDir,
        net: &NetSlot,
        events: mpsc::UnboundedSender<String>,
    ) -> Result<Vm, VmError> {
        let exe = std::env::current_exe().map_err(VmError::Spawn)?;
        let mut cmd = Command::new(exe);
        cmd.args(["vm", "receive", "--listen", "0.0.0.0:0"])
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .args(["--tap", &net.tap(), "--tap-prepared"])
            .arg("--rootfs")
            .arg(dir.disk())
            .arg("--agent-socket")
            .arg(dir.agent_socket())
            .arg("--api-socket")
            .arg(dir.api_socket());
        Self::start(cmd, dir, Some(events))
    }

    fn start(
        mut cmd: Command,
        dir: &JobDir,
        events: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Vm, VmError> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A dropped job task (the daemon giving up on it) leaves no VMM behind.
            .kill_on_drop(true)
            .spawn()
            .map_err(VmError::Spawn)?;
        let pid = child.id().expect("a child just spawned has its pid");
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        let stdout = File::from(stdout.into_owned_fd().map_err(VmError::Spawn)?);
        let stderr = File::from(stderr.into_owned_fd().map_err(VmError::Spawn)?);
        let captures = vec![
            capture(stdout, dir, LogName::Console, None),
            capture(stderr, dir, LogName::Vmm, events),
        ];
        // A restarted daemon finds the VMM by this file (see recover.rs).
        dir.write_pid(pid).map_err(VmError::Spawn)?;
        Ok(Vm {
            child,
            pid,
            agent_socket: dir.agent_socket(),
            captures,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Connects to the guest agent and waits until it is ready, giving up early if the VMM
    /// exits.
    pub async fn connect_agent(
        &mut self,
        timeout: Duration,
    ) -> Result<AgentClient<UnixStream>, VmError> {
        let deadline = Instant::now() + timeout;
        let stream = self.connect(deadline, timeout).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = tokio::task::spawn_blocking(move || {
            let mut agent = AgentClient::new(stream);
            agent.wait_ready(left).map(|_| agent)
        })
        .await
        .expect("the agent handshake does not panic");
        match ready {
            Ok(agent) => Ok(agent),
            Err(_)
                if self
                    .wait_timeout(Duration::from_millis(200))
                    .await
                    .is_some() =>
            {
                Err(VmError::ExitedEarly(self.exited().expect("just exited")))
            }
            Err(ClientError::Timeout(_)) => Err(VmError::AgentTimeout(timeout)),
            Err(e) => Err(VmError::Agent(e)),
        }
    }

    /// Connects to the agent channel of a guest that is past its handshake (a VM received
    /// mid-job): whatever the agent says next is for the caller.
    pub async fn attach_agent(
        &mut self,
        timeout: Duration,
    ) -> Result<AgentClient<UnixStream>, VmError> {
        let stream = self.connect(Instant::now() + timeout, timeout).await?;
        Ok(AgentClient::new(stream))
    }

    async fn connect(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<UnixStream, VmError> {
        loop {
            if let Some(status) = self.exited() {
                return Err(VmError::ExitedEarly(status));
            }
            match UnixStream::connect(&self.agent_socket) {
                Ok(s) => return Ok(s),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(SOCKET_POLL).await,
                Err(_) => return Err(VmError::AgentTimeout(timeout)),
            }
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the VMM to exit on its own.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Kills the VMM (the guest's power is cut) unless it has exited, reaps it, and waits
    /// until its last output is in the logs.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        let status = match self.exited() {
            Some(status) => status,
            None => {
                self.child.kill().await?;
                self.child.wait().await?
            }
        };
        for capture in self.captures.drain(..) {
            let _ = capture.await;
        }
        Ok(status)
    }
}

/// Copies what the VMM writes on one pipe into one of the job's logs, within the log's cap,
/// until the VMM closes the pipe (it exits). The VMM's own lines (`hopper-runner: …`) also go
/// to `events`; only its stderr gets one, where the guest cannot write.
fn capture(
    mut pipe: File,
    dir: &JobDir,
    log: LogName,
    events: Option<mpsc::UnboundedSender<String>>,
) -> JoinHandle<()> {
    let path = dir.log(log);
    tokio::task::spawn_blocking(move || {
        let mut lines = events.map(|tx| (tx, Vec::new()));
        let mut out = match CappedLog::open(&path) {
            Ok(out) => Some(out),
            Err(e) => {
                tracing::warn!(log = %path.display(), "cannot open the log; its output is dropped: {e}");
                None
            }
        };
        let mut buf = vec![0; 64 << 10];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some((tx, line)) = lines.as_mut() {
                        forward_lines(&buf[..n], line, tx);
                    }
                    if let Some(Err(e)) = out.as_mut().map(|o| o.append(&buf[..n])) {
                        tracing::warn!(log = %path.display(), "cannot write the log; its output is dropped: {e}");
                        out = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// Sends each complete line of the VMM's own (`hopper-runner: …`) in `chunk` to `tx`; `line`
/// holds a line's start until its end arrives (bounded: longer lines are not ours).
fn forward_lines(chunk: &[u8], line: &mut Vec<u8>, tx: &mpsc::UnboundedSender<String>) {
    const OURS: &[u8] = b"hopper-runner: ";
    for &b in chunk {
        if b != b'\n' {
            if line.len() < 4096 {
                line.push(b);
            }
            continue;
        }
        if line.starts_with(OURS) {
            let _ = tx.send(String::from_utf8_lossy(line).into_owned());
        }
        line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_lines_of_the_vmm_are_forwarded() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut line = Vec::new();
        forward_lines(b"noise\nhopper-runner: wait", &mut line, &tx);
        assert!(rx.try_recv().is_err());
        forward_lines(
            b"ing on 0.0.0.0:4\nguest hopper-runner: no\n",
            &mut line,
            &tx,
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            "hopper-runner: waiting on 0.0.0.0:4"
        );
        assert!(rx.try_recv().is_err());
    }
}
