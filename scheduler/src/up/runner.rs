//! The runner host that `up` starts as a child process: `hopper-runner host` on this machine
//! when its KVM can run guests, otherwise `hopper-testhost run`, which boots a nested QEMU test
//! host with `hopper-runner host` inside (tests/src/bin/hopper-testhost.rs).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, ChildStdin, Command};

use super::Progress;
use crate::config::{RunnerMode, UpArgs};
use crate::server::shutdown_signal;

/// The runner host's output, in the data directory.
pub const RUNNER_LOG: &str = "runner.log";
/// The name the runner host enrolls under (and the test host's hostname).
pub const HOST_NAME: &str = "hopper-up";
/// What a test host offers to jobs unless told otherwise: enough for the demo's
/// `hopper-1cpu-1gb` and for the default shape (2 vCPUs, 4 GiB).
const TESTHOST_VCPUS: u32 = 2;
const TESTHOST_MEMORY_MB: u32 = 4096;
/// How long a test host may take to stop (it finishes booting first) before it is killed.
const TESTHOST_STOP_GRACE: Duration = Duration::from_secs(300);
/// How long a direct runner host may take to stop its jobs (it allows itself 60 s).
const DIRECT_STOP_GRACE: Duration = Duration::from_secs(90);

/// Which runner host to start, the program that is it, and why when it was chosen for us.
pub struct Plan {
    kind: Kind,
    program: PathBuf,
    why: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    TestHost,
}

/// Decides on the runner host and checks what it needs, before anything is started.
pub fn choose(mode: RunnerMode, args: &UpArgs) -> anyhow::Result<Plan> {
    let (kind, why) = match mode {
        RunnerMode::Direct => (Kind::Direct, None),
        RunnerMode::Testhost => (Kind::TestHost, None),
        RunnerMode::Auto => match kvm_unusable() {
            None => (
                Kind::Direct,
                Some("this machine's KVM can run guests".to_string()),
            ),
            Some(why) => (
                Kind::TestHost,
                Some(format!(
                    "this machine's KVM cannot run guests ({why}), so the runner host runs in \
                     a nested test host (QEMU software emulation: slow, but the same path)"
                )),
            ),
        },
        RunnerMode::None => unreachable!("no plan without a runner host"),
    };
    let program = match kind {
        Kind::Direct => {
            // /proc/self belongs to the effective user.
            let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
            if euid != 0 {
                bail!(
                    "a runner host on this machine needs root (/dev/kvm, TAP devices, nftables): \
                     run `up` as root, or --runner testhost, or --runner none"
                );
            }
            for image in ["vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"] {
                if !args.images.join(image).is_file() {
                    bail!(
                        "guest image {} is missing: run tests/setup.sh (or images/build.sh), or \
                         point --images at one",
                        args.images.join(image).display()
                    );
                }
            }
            sibling(
                "hopper-runner",
                args.runner_bin.as_deref(),
                "hopper-runner",
                "--runner-bin",
            )?
        }
        Kind::TestHost => sibling(
            "hopper-testhost",
            args.testhost_bin.as_deref(),
            "hopper-tests",
            "--testhost-bin",
        )?,
    };
    Ok(Plan { kind, program, why })
}

/// Why this machine's own KVM cannot run guests, or `None` when it can: that takes hardware
/// virtualization (the CPU's `svm` or `vmx` flag) and `/dev/kvm`. A paravirtual /dev/kvm
/// without the flags (like kvm_pvm on some cloud machines) cannot boot a stock kernel.
fn kvm_unusable() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !has_virtualization_flag(&cpuinfo) {
        return Some("the CPU shows no svm or vmx flag".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing (load kvm_amd or kvm_intel)".into());
    }
    None
}

fn has_virtualization_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"))
}

/// A binary given by `flag`, or the one next to this executable (where cargo puts every binary
/// of the workspace).
fn sibling(name: &str, given: Option<&Path>, package: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(name),
    };
    if !path.is_file() {
        bail!(
            "{name} not found at {}: build it next to hopper-scheduler with `cargo build \
             --release -p {package} --bins`, or give its path with {flag}",
            path.display()
        );
    }
    Ok(path)
}

/// The running runner host.
pub struct RunnerHost {
    child: Child,
    kind: Kind,
    /// A test host stops when its standard input closes (see `stop`).
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl RunnerHost {
    pub fn start(
        plan: Plan,
        args: &UpArgs,
        scheduler_port: u16,
        enroll_secret_file: &Path,
        progress: Progress,
    ) -> anyhow::Result<RunnerHost> {
        if let Some(why) = &plan.why {
            progress.line(why);
        }
        let log = args.data_dir.join(RUNNER_LOG);
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))
        };
        let mut cmd = Command::new(&plan.program);
        cmd.kill_on_drop(true).stdout(open_log()?);
        match plan.kind {
            Kind::Direct => {
                cmd.args(["host", "--scheduler"])
                    .arg(format!("http://127.0.0.1:{scheduler_port}"))
                    .arg("--enroll-secret-file")
                    .arg(enroll_secret_file)
                    .arg("--images")
                    .arg(&args.images)
                    .arg("--data-dir")
                    .arg(args.data_dir.join("runner"))
                    .args(["--name", HOST_NAME])
                    .stdin(Stdio::null())
                    .stderr(open_log()?);
                if let Some(v) = args.host_vcpus {
                    cmd.arg("--vcpus").arg(v.to_string());
                }
                if let Some(m) = args.host_memory_mb {
                    cmd.arg("--memory-mb").arg(m.to_string());
                }
                progress.line(format!(
                    "starting hopper-runner host on this machine (log: {})",
                    log.display()
                ));
            }
            Kind::TestHost => {
                cmd.args(["run", "--scheduler-port", &scheduler_port.to_string()])
                    .arg("--enroll-secret-file")
                    .arg(enroll_secret_file)
                    .args(["--name", HOST_NAME])
                    .arg("--vcpus")
                    .arg(args.host_vcpus.unwrap_or(TESTHOST_VCPUS).to_string())
                    .arg("--memory-mb")
                    .arg(
                        args.host_memory_mb
                            .unwrap_or(TESTHOST_MEMORY_MB)
                            .to_string(),
                    )
                    .arg("--until-stdin-closes")
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped())
                    // Ctrl-C is for `up`, which stops the test host in order.
                    .process_group(0);
                progress.line(format!(
                    "starting a test host with hopper-runner host inside (runner log: {})",
                    log.display()
                ));
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", plan.program.display()))?;
        // hopper-testhost's progress lines (on stderr) belong on the terminal.
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    progress.line(line);
                }
            });
        }
        Ok(RunnerHost {
            stdin: child.stdin.take(),
            child,
            kind: plan.kind,
            log,
        })
    }

    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The last `n` lines of the runner host's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        match lines.len() {
            0 => format!("({} is empty)", self.log.display()),
            len => lines[len.saturating_sub(n)..].join("\n"),
        }
    }

    /// Stops the runner host and gives it time. A test host is asked by closing its standard
    /// input (its QEMU must not outlive it); a direct runner host gets SIGTERM, stops its jobs'
    /// VMs and reports them. A second Ctrl-C or SIGTERM kills it at once.
    pub async fn stop(mut self, progress: Progress) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let (what, grace) = match self.kind {
            Kind::TestHost => {
                drop(self.stdin.take());
                ("test host", TESTHOST_STOP_GRACE)
            }
            Kind::Direct => {
                let pid = self
                    .child
                    .id()
                    .and_then(|p| rustix::process::Pid::from_raw(p as i32));
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                ("runner host", DIRECT_STOP_GRACE)
            }
        };
        progress.line(format!(
            "stopping the {what} (Ctrl-C again to kill it at once)"
        ));
        tokio::select! {
            _ = self.child.wait() => return,
            _ = tokio::time::sleep(grace) => {
                progress.line(format!("the {what} did not stop in time; killing it"));
            }
            _ = shutdown_signal() => {
                progress.line(format!("killing the {what}; what it ran may be left running"));
            }
        }
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_virtualization_is_a_cpu_flag() {
        assert!(has_virtualization_flag(
            "processor\t: 0\nflags\t\t: fpu vme svm sse\n"
        ));
        assert!(has_virtualization_flag("flags\t: vmx ept\n"));
        assert!(!has_virtualization_flag(
            "flags\t\t: fpu hypervisor svm_lock\nbugs\t: svm\n"
        ));
    }
}
