//! The runner hosts that `up` starts as child processes: each a `hopper-runner host` on this
//! machine when its KVM can run guests, otherwise one `hopper-testhost run`, which boots a
//! nested QEMU test host with them all inside (tests/src/bin/hopper-testhost.rs).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::Poll;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use super::Progress;
use crate::config::{RunnerMode, UpArgs, MAX_HOSTS};
use crate::server::shutdown_signal;

/// The first runner host's output, in the data directory (a test host's output: all of them).
pub const RUNNER_LOG: &str = "runner.log";
/// The name the first runner host enrolls under (and the test host's hostname); the others
/// add `-<i>` (see [`host_name`]).
pub const HOST_NAME: &str = "hopper-up";
/// What a test host offers to jobs unless told otherwise: enough for the demo's
/// `hopper-1cpu-1gb` and for the default shape (2 vCPUs, 4 GiB).
const TESTHOST_VCPUS: u32 = 2;
const TESTHOST_MEMORY_MB: u32 = 4096;
/// How long a test host may take to stop (it finishes booting first) before it is killed.
const TESTHOST_STOP_GRACE: Duration = Duration::from_secs(300);
/// How long a direct runner host may take to stop its jobs (it allows itself 60 s).
const DIRECT_STOP_GRACE: Duration = Duration::from_secs(90);

/// The name runner host `i` enrolls under: `hopper-up`, `hopper-up-1`, `hopper-up-2`…
/// (`hopper-testhost run --hosts` names the daemons in its test host the same way).
pub fn host_name(i: usize) -> String {
    match i {
        0 => HOST_NAME.to_string(),
        i => format!("{HOST_NAME}-{i}"),
    }
}

/// Which of `up`'s runner hosts (of any run, so up to `--hosts`' limit) is named `name`.
pub fn host_index(name: &str) -> Option<usize> {
    (0..MAX_HOSTS.into()).find(|i| host_name(*i) == name)
}

/// Runner host `i`'s TAP prefix: hosts sharing a machine need their own, and they all begin
/// with the runner's default, `hjob` (`hjob`, `hjoba`, `hjobb`…, as in a test host).
fn tap_prefix(i: usize) -> String {
    match i {
        0 => "hjob".into(),
        i => format!("hjob{}", char::from(b'a' + (i - 1) as u8)),
    }
}

/// A file of runner host `i` in the data directory: `runner`/`runner.log` for the first (as
/// with one), `runner-<i>`/`runner-<i>.log` after.
fn own_path(dir: &Path, i: usize, ext: &str) -> PathBuf {
    match i {
        0 => dir.join(format!("runner{ext}")),
        i => dir.join(format!("runner-{i}{ext}")),
    }
}

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

/// The running runner hosts.
pub struct Fleet {
    processes: Processes,
    /// Whether chaos killed each runner host (its end is then no failure).
    killed: Vec<bool>,
    /// Direct: each runner host's log; test host: the one log of them all.
    logs: Vec<PathBuf>,
}

enum Processes {
    /// One `hopper-runner host` per runner host, each in a process group of its own with its
    /// VMMs, so that a chaos kill takes its VMs too and Ctrl-C reaches `up` only.
    Direct(Vec<Child>),
    /// The test host with them all. It stops when its standard input closes, and takes
    /// `kill <i>` lines there (see `kill`).
    TestHost {
        child: Box<Child>,
        stdin: Option<ChildStdin>,
    },
}

impl Fleet {
    pub fn start(
        plan: Plan,
        args: &UpArgs,
        count: usize,
        scheduler_port: u16,
        enroll_secret_file: &Path,
        progress: Progress,
    ) -> anyhow::Result<Fleet> {
        if let Some(why) = &plan.why {
            progress.line(why);
        }
        let open_log = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let spawn = |mut cmd: Command| {
            cmd.kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", plan.program.display()))
        };
        let fleet = match plan.kind {
            Kind::Direct => {
                let logs: Vec<PathBuf> = (0..count)
                    .map(|i| own_path(&args.data_dir, i, ".log"))
                    .collect();
                let mut children = Vec::new();
                for (i, log) in logs.iter().enumerate() {
                    let mut cmd = Command::new(&plan.program);
                    cmd.args(["host", "--scheduler"])
                        .arg(format!("http://127.0.0.1:{scheduler_port}"))
                        .arg("--enroll-secret-file")
                        .arg(enroll_secret_file)
                        .arg("--images")
                        .arg(&args.images)
                        .arg("--data-dir")
                        .arg(own_path(&args.data_dir, i, ""))
                        .args(["--name", &host_name(i)])
                        // The others on this machine reach it there; no cloud tells it of
                        // its end.
                        .args(["--address", "127.0.0.1", "--notice-source", "none"])
                        .args(["--tap-prefix", &tap_prefix(i)])
                        .stdin(Stdio::null())
                        .stdout(open_log(log)?)
                        .stderr(open_log(log)?)
                        .process_group(0);
                    if let Some(v) = args.host_vcpus {
                        cmd.arg("--vcpus").arg(v.to_string());
                    }
                    if let Some(m) = args.host_memory_mb {
                        cmd.arg("--memory-mb").arg(m.to_string());
                    }
                    children.push(spawn(cmd)?);
                }
                let names: Vec<String> = logs.iter().map(|l| l.display().to_string()).collect();
                progress.line(format!(
                    "starting {} on this machine ({}: {})",
                    runner_hosts(count),
                    if count == 1 { "log" } else { "logs" },
                    names.join(", ")
                ));
                Fleet {
                    processes: Processes::Direct(children),
                    killed: vec![false; count],
                    logs,
                }
            }
            Kind::TestHost => {
                let log = args.data_dir.join(RUNNER_LOG);
                let mut cmd = Command::new(&plan.program);
                cmd.args(["run", "--scheduler-port", &scheduler_port.to_string()])
                    .arg("--enroll-secret-file")
                    .arg(enroll_secret_file)
                    .args(["--name", HOST_NAME, "--hosts", &count.to_string()])
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
                    .stdout(open_log(&log)?)
                    .stderr(Stdio::piped())
                    // Ctrl-C is for `up`, which stops the test host in order.
                    .process_group(0);
                let mut child = spawn(cmd)?;
                // hopper-testhost's progress lines (on stderr) belong on the terminal.
                if let Some(stderr) = child.stderr.take() {
                    tokio::spawn(async move {
                        let mut lines = tokio::io::BufReader::new(stderr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            progress.line(line);
                        }
                    });
                }
                progress.line(format!(
                    "starting a test host with {} inside (runner log: {}{})",
                    runner_hosts(count),
                    log.display(),
                    if count > 1 {
                        ", each line after its host's name"
                    } else {
                        ""
                    }
                ));
                Fleet {
                    processes: Processes::TestHost {
                        stdin: child.stdin.take(),
                        child: Box::new(child),
                    },
                    killed: vec![false; count],
                    logs: vec![log],
                }
            }
        };
        Ok(fleet)
    }

    /// Resolves when a runner host's process (or the test host) ends that chaos did not
    /// kill; says which, how, and the end of its log.
    pub async fn failure(&mut self) -> String {
        let (what, log, status) = match &mut self.processes {
            Processes::Direct(children) => {
                let (i, status) = first_exit(children, &self.killed).await;
                (
                    format!("runner host {}", host_name(i)),
                    &self.logs[i],
                    status,
                )
            }
            Processes::TestHost { child, .. } => (
                "the test host".to_string(),
                &self.logs[0],
                child.wait().await,
            ),
        };
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        format!(
            "{what} ended ({status}); the last lines of {}:\n{}",
            log.display(),
            log_tail(log, 30)
        )
    }

    /// Kills runner host `i` as its cloud would take it: the daemon and its VMs, at once.
    /// In a test host, `hopper-testhost` does it when told on its standard input.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.killed[i] = true;
        match &mut self.processes {
            Processes::Direct(children) => {
                let child = &mut children[i];
                let Some(pid) = pid(child) else {
                    bail!("it had ended already");
                };
                rustix::process::kill_process_group(pid, rustix::process::Signal::KILL)
                    .context("kill")?;
                child.wait().await?;
            }
            Processes::TestHost { stdin, .. } => {
                let stdin = stdin.as_mut().context("the test host is stopping")?;
                stdin.write_all(format!("kill {i}\n").as_bytes()).await?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    /// Stops the runner hosts and gives them time. A test host is asked by closing its
    /// standard input (its QEMU must not outlive it); direct runner hosts get SIGTERM, stop
    /// their jobs' VMs and report them. A second Ctrl-C or SIGTERM kills them at once.
    pub async fn stop(mut self, progress: Progress) {
        let (what, grace) = match &mut self.processes {
            Processes::TestHost { stdin, .. } => {
                drop(stdin.take());
                ("test host", TESTHOST_STOP_GRACE)
            }
            Processes::Direct(children) => {
                for pid in children.iter().filter_map(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                ("runner hosts", DIRECT_STOP_GRACE)
            }
        };
        let mut children: Vec<&mut Child> = match &mut self.processes {
            Processes::Direct(children) => children.iter_mut().collect(),
            Processes::TestHost { child, .. } => vec![child],
        };
        children.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        if children.is_empty() {
            return;
        }
        progress.line(format!(
            "stopping the {what} (Ctrl-C again to kill at once)"
        ));
        let all_ended = async {
            for child in children.iter_mut() {
                let _ = child.wait().await;
            }
        };
        tokio::select! {
            _ = all_ended => return,
            _ = tokio::time::sleep(grace) => {
                progress.line(format!("the {what} did not stop in time; killing"));
            }
            _ = shutdown_signal() => {
                progress.line(format!("killing the {what}; what they ran may be left running"));
            }
        }
        for child in children {
            let _ = child.kill().await;
        }
    }
}

/// "hopper-runner host" or "N hopper-runner hosts".
fn runner_hosts(count: usize) -> String {
    match count {
        1 => "hopper-runner host".into(),
        n => format!("{n} hopper-runner hosts"),
    }
}

/// A child's process id while it has not been waited for (after, the id may be another's).
fn pid(child: &Child) -> Option<rustix::process::Pid> {
    child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
}

/// The first of the children that chaos did not kill to end, and how; never without one.
async fn first_exit(
    children: &mut [Child],
    killed: &[bool],
) -> (usize, std::io::Result<ExitStatus>) {
    let mut waits: Vec<Pin<Box<dyn Future<Output = _> + Send + '_>>> = children
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| !killed[*i])
        .map(
            |(i, child)| -> Pin<Box<dyn Future<Output = _> + Send + '_>> {
                Box::pin(async move { (i, child.wait().await) })
            },
        )
        .collect();
    std::future::poll_fn(|cx| {
        for wait in &mut waits {
            if let Poll::Ready(ended) = wait.as_mut().poll(cx) {
                return Poll::Ready(ended);
            }
        }
        Poll::Pending
    })
    .await
}

/// The last `n` lines of a log.
fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    match lines.len() {
        0 => format!("({} is empty)", log.display()),
        len => lines[len.saturating_sub(n)..].join("\n"),
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

    #[test]
    fn runner_hosts_are_known_by_their_names() {
        assert_eq!(host_name(0), "hopper-up");
        assert_eq!(host_name(3), "hopper-up-3");
        for i in 0..MAX_HOSTS.into() {
            assert_eq!(host_index(&host_name(i)), Some(i));
        }
        for other in [
            "hopper-up-0",
            "hopper-up-8",
            "hopper-up-01",
            "hopper-upx",
            "spot-a",
            "",
        ] {
            assert_eq!(host_index(other), None, "{other}");
        }
    }

    #[test]
    fn runner_hosts_sharing_a_machine_keep_apart() {
        let prefixes: Vec<String> = (0..MAX_HOSTS.into()).map(tap_prefix).collect();
        assert_eq!(prefixes[..3], ["hjob", "hjoba", "hjobb"]);
        let paths: Vec<PathBuf> = (0..MAX_HOSTS.into())
            .map(|i| own_path(Path::new("/d"), i, ".log"))
            .collect();
        assert_eq!(
            paths[..2],
            [PathBuf::from("/d/runner.log"), "/d/runner-1.log".into()]
        );
        for i in 0..prefixes.len() {
            for j in 0..i {
                assert_ne!(prefixes[i], prefixes[j]);
                assert_ne!(paths[i], paths[j]);
            }
            // What hopper-runner takes: lowercase letters from 'h', at most 10.
            assert!(prefixes[i].len() <= 10 && prefixes[i].bytes().all(|b| b.is_ascii_lowercase()));
        }
    }
}
