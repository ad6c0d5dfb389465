//! One test host (L1): a QEMU/TCG process with KVM inside, driven through hopper-agent.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use hopper_agent::{AgentClient, Exec, ExecOutput};

use crate::error::tail;
use crate::l1image::{l1_initramfs, DEFAULT_MODULES};
use crate::monitor;
use crate::paths::{cache_dir, GuestArtifacts};
use crate::HarnessError;

/// The port hopper-agent listens on inside every test host.
const AGENT_PORT: u16 = 7000;
const CONSOLE_TAIL_LINES: usize = 40;
/// QEMU picks host ports we chose moments earlier; another process may take one first.
const PORT_RACE_RETRIES: usize = 3;
/// QEMU's human monitor, in the host's log directory.
const MONITOR: &str = "monitor.sock";

#[derive(Debug, Clone)]
pub struct TestHostOptions {
    /// Hostname inside the host and name of its log directory; unique names are made up
    /// when `None`.
    pub name: Option<String>,
    pub memory_mib: u32,
    /// vCPUs of the test host; more than one makes its guests unreliable (see `Default`).
    pub cpus: u32,
    /// Guest TCP ports to reach from the machine running the test (each gets a free port on
    /// 127.0.0.1; see [`TestHost::forwarded_port`]).
    pub forwards: Vec<u16>,
    /// Kernel modules to load on top of the defaults (KVM, TAP, vhost, bridge, nftables).
    pub extra_modules: Vec<String>,
    pub boot_timeout: Duration,
    /// Limit for each command run through the agent.
    pub exec_timeout: Duration,
    /// Print every command run through `exec` (with its status and duration) on stdout, where
    /// a failing test shows them; off for tools that print their own summary.
    pub trace: bool,
}

impl Default for TestHostOptions {
    fn default() -> Self {
        Self {
            name: None,
            memory_mib: 2048,
            // One vCPU: with two, QEMU's multi-threaded emulation of nested SVM now and then
            // breaks guests (7.2 corrupted the test host too; 10.0 still lost 2 guests in 10
            // soak sessions); one vCPU ran clean (tests/README.md has the figures).
            cpus: 1,
            forwards: Vec::new(),
            extra_modules: Vec::new(),
            boot_timeout: Duration::from_secs(180),
            exec_timeout: Duration::from_secs(300),
            trace: true,
        }
    }
}

pub struct TestHost {
    name: String,
    dir: PathBuf,
    qemu: Mutex<Child>,
    agent_port: u16,
    forwards: Vec<(u16, u16)>,
    /// `None` after a failed request: the next one reconnects, since the stream may hold
    /// half a reply.
    agent: Mutex<Option<AgentClient<TcpStream>>>,
    exec_timeout: Duration,
    trace: bool,
    /// Set when this host produced an error: its logs are then kept for the post-mortem.
    failed: AtomicBool,
    /// Set by [`TestHost::kill`]: QEMU exiting after it is expected, before it a breakdown.
    killed: AtomicBool,
}

impl TestHost {
    /// Boots a test host and waits for its agent. Several may boot at once: each has its own
    /// ports and log directory.
    pub fn boot(opts: TestHostOptions) -> Result<TestHost, HarnessError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let (guest, initramfs) = Self::image(&opts)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = opts.name.clone().unwrap_or_else(|| format!("testhost{n}"));
        let dir = cache_dir()
            .join("testhost/run")
            .join(format!("{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);

        let mut attempt = 0;
        loop {
            let mut host = Self::start(&opts, &name, &dir, &guest.vmlinuz, &initramfs)?;
            match host.wait_for_agent(opts.boot_timeout) {
                Ok(()) => return Ok(host),
                Err(e) if attempt + 1 < PORT_RACE_RETRIES && host.lost_port_race() => {
                    attempt += 1;
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Builds the image `boot` boots (the static project binaries and the initramfs), or finds
    /// it cached, without booting: for callers that show the first, slow build as a step of
    /// its own. `boot` does the same (then cheaply).
    pub fn prepare(opts: &TestHostOptions) -> Result<(), HarnessError> {
        Self::image(opts).map(drop)
    }

    fn image(opts: &TestHostOptions) -> Result<(GuestArtifacts, PathBuf), HarnessError> {
        let guest = GuestArtifacts::locate()?;
        let mut modules: Vec<String> = DEFAULT_MODULES.iter().map(|m| m.to_string()).collect();
        modules.extend(opts.extra_modules.iter().cloned());
        let initramfs = l1_initramfs(&guest, &modules)?;
        Ok((guest, initramfs))
    }

    fn start(
        opts: &TestHostOptions,
        name: &str,
        dir: &Path,
        kernel: &Path,
        initramfs: &Path,
    ) -> Result<TestHost, HarnessError> {
        let ports = free_ports(1 + opts.forwards.len())?;
        let agent_port = ports[0];
        let forwards: Vec<(u16, u16)> = opts
            .forwards
            .iter()
            .copied()
            .zip(ports[1..].iter().copied())
            .collect();
        let mut netdev = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{agent_port}-:{AGENT_PORT}");
        for (guest, host) in &forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        fs::create_dir_all(dir).map_err(HarnessError::io(format!("creating {}", dir.display())))?;
        let log = fs::File::create(dir.join("qemu.log"))
            .map_err(HarnessError::io("creating qemu.log"))?;
        let log2 = log.try_clone().map_err(HarnessError::io("qemu.log"))?;
        let _ = fs::remove_file(dir.join("console.log"));
        let qemu = Command::new("qemu-system-x86_64")
            // TCG with an AMD model: SVM is emulated, so KVM works inside (nested-kvm.md).
            .args(["-accel", "tcg", "-cpu", "EPYC"])
            .args([
                "-m",
                &opts.memory_mib.to_string(),
                "-smp",
                &opts.cpus.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join(MONITOR).display()
            ))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args([
                "-append",
                // nokaslr: the RIPs of a breakdown (breakdown.txt) then match
                // /proc/kallsyms of any test host.
                &format!("console=ttyS0 panic=-1 quiet nokaslr testhost.name={name}"),
            ])
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(HarnessError::io(
                "starting qemu-system-x86_64 (run tests/setup.sh)",
            ))?;
        Ok(TestHost {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            qemu: Mutex::new(qemu),
            agent_port,
            forwards,
            agent: Mutex::new(None),
            exec_timeout: opts.exec_timeout,
            trace: opts.trace,
            failed: AtomicBool::new(false),
            killed: AtomicBool::new(false),
        })
    }

    /// Connects until the agent answers. QEMU accepts forwarded connections before the host
    /// listens and then drops them, so a failed attempt is retried until the deadline.
    fn wait_for_agent(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(self.error(format!(
                    "QEMU exited during boot ({status}): {}",
                    self.qemu_log()
                )));
            }
            let last = match self.connect(Duration::from_secs(3)) {
                Ok(client) => {
                    *self.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
                    return Ok(());
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                self.failed.store(true, Ordering::Relaxed);
                return Err(HarnessError::BootTimeout {
                    host: self.name.clone(),
                    after: timeout,
                    last,
                    console: self.console_tail(),
                });
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn connect(&self, ready_timeout: Duration) -> Result<AgentClient<TcpStream>, String> {
        let addr = self.agent_addr();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut client = AgentClient::new(stream);
        client
            .wait_ready(ready_timeout)
            .map_err(|e| e.to_string())?;
        client.set_timeout(Some(self.exec_timeout));
        Ok(client)
    }

    fn lost_port_race(&self) -> bool {
        self.exited().is_some() && self.qemu_log().contains("hostfwd")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Directory holding this host's console.log and qemu.log (kept after a failed test).
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// Where the host's agent is reached from the machine running the test.
    pub fn agent_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.agent_port).into()
    }

    /// The port on 127.0.0.1 that reaches `guest_port` inside the host, if it was forwarded.
    pub fn forwarded_port(&self, guest_port: u16) -> Option<u16> {
        self.forwards
            .iter()
            .find(|(g, _)| *g == guest_port)
            .map(|(_, h)| *h)
    }

    /// Runs a command in the host.
    pub fn exec(&self, argv: &[&str]) -> Result<ExecOutput, HarnessError> {
        self.exec_with(&Exec::new(argv.iter().copied()))
    }

    /// Runs a command with environment, working directory or input.
    pub fn exec_with(&self, cmd: &Exec) -> Result<ExecOutput, HarnessError> {
        if !self.trace {
            return self.exec_quiet(cmd);
        }
        // Shown by the test runner when a test fails: which command hung or failed, and when.
        let shown: String = cmd.argv().join(" ").chars().take(160).collect();
        println!("[{}] $ {shown}", self.name);
        let started = Instant::now();
        let out = self.with_agent(|c| c.exec(cmd))?;
        println!(
            "[{}]   {} after {:.1} s",
            self.name,
            out.exit,
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }

    /// Like [`TestHost::exec_with`], without printing the command: for polling loops, whose
    /// every round would otherwise add two lines to the output.
    pub fn exec_quiet(&self, cmd: &Exec) -> Result<ExecOutput, HarnessError> {
        self.with_agent(|c| c.exec(cmd))
    }

    /// Runs a shell script in the host and returns its stdout; a non-zero exit is an error
    /// carrying both outputs.
    pub fn sh(&self, script: &str) -> Result<String, HarnessError> {
        let out = self.exec(&["sh", "-c", script])?;
        if !out.exit.success() {
            return Err(self.error(format!(
                "script failed ({}): {script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.exit,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Copies a local file into the host, keeping its permission bits.
    pub fn put(&self, local: &Path, remote: &str) -> Result<(), HarnessError> {
        use std::os::unix::fs::PermissionsExt;
        let data =
            fs::read(local).map_err(HarnessError::io(format!("reading {}", local.display())))?;
        let mode = fs::metadata(local)
            .map_err(HarnessError::io(format!("stat {}", local.display())))?
            .permissions()
            .mode();
        self.write_file(remote, &data, mode & 0o7777)
    }

    pub fn write_file(&self, remote: &str, data: &[u8], mode: u32) -> Result<(), HarnessError> {
        self.with_agent(|c| c.write_file(remote, Some(mode), data))
    }

    pub fn read_file(&self, remote: &str) -> Result<Vec<u8>, HarnessError> {
        self.with_agent(|c| c.read_file(remote))
    }

    /// Everything the host printed on its serial console so far.
    pub fn console(&self) -> String {
        fs::read(self.dir.join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// SIGKILLs the host's QEMU: what a reclaimed spot instance looks like from outside.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        let mut qemu = self.qemu.lock().unwrap_or_else(|e| e.into_inner());
        let _ = qemu.kill();
        let _ = qemu.wait();
    }

    pub fn is_running(&self) -> bool {
        self.exited().is_none()
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.qemu
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
            .ok()
            .flatten()
    }

    fn with_agent<T>(
        &self,
        f: impl FnOnce(&mut AgentClient<TcpStream>) -> Result<T, hopper_agent::ClientError>,
    ) -> Result<T, HarnessError> {
        if !self.is_running() {
            // Expected after kill(); nothing in the logs would explain it, so they are not kept.
            return Err(self.describe("the host is not running".into()));
        }
        let mut slot = self.agent.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(
                self.connect(Duration::from_secs(30))
                    .map_err(|e| self.error(format!("reconnecting: {e}")))?,
            );
        }
        let result = f(slot.as_mut().expect("connected above"));
        result.map_err(|e| {
            *slot = None;
            let died = self
                .exited()
                .filter(|_| !self.killed.load(Ordering::Relaxed));
            match (e, died) {
                (e, Some(status)) => self.broke(format!(
                    "QEMU exited ({status}) during a request ({e}): {}",
                    self.qemu_log()
                )),
                (e @ hopper_agent::ClientError::Timeout(_), None) => self.broke(e.to_string()),
                (e, None) => self.error(format!("agent request failed: {e}")),
            }
        })
    }

    /// The host itself broke down: QEMU's view of its CPUs goes next to its logs.
    fn broke(&self, what: String) -> HarnessError {
        self.failed.store(true, Ordering::Relaxed);
        let file = self.dir.join("breakdown.txt");
        let cpus = if self.is_running() {
            let report = monitor::ask(
                &self.dir.join(MONITOR),
                &["info cpus", "info registers -a", "info irq", "info pic"],
            );
            let _ = fs::write(&file, &report);
            let summary: Vec<&str> = report
                .lines()
                .filter(|l| l.contains("CPU #") || l.starts_with("RIP="))
                .collect();
            format!(
                "; its CPUs: {} (registers in {})",
                summary.join(", "),
                file.display()
            )
        } else {
            String::new()
        };
        HarnessError::HostBroke {
            host: self.name.clone(),
            what: format!("{what}{cpus}"),
            console: self.console_tail(),
        }
    }

    fn qemu_log(&self) -> String {
        tail(
            &fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
            10,
        )
    }

    /// The last lines of the host's console.
    pub fn console_tail(&self) -> String {
        tail(&self.console(), CONSOLE_TAIL_LINES)
    }

    /// An error about this host; its logs are kept.
    pub(crate) fn error(&self, what: String) -> HarnessError {
        self.failed.store(true, Ordering::Relaxed);
        self.describe(what)
    }

    fn describe(&self, what: String) -> HarnessError {
        HarnessError::Host {
            host: self.name.clone(),
            what,
            console: self.console_tail(),
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.kill();
        // Logs of a failing test are worth keeping; a passing test leaves nothing behind.
        if thread::panicking() || self.failed.load(Ordering::Relaxed) {
            eprintln!(
                "test host {}: logs kept in {}",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Ports the OS considers free right now (all held at once, so they differ from each other).
fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<_, _>>()
        .map_err(HarnessError::io("finding a free port"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(HarnessError::io("finding a free port"))
}
