//! The deterministic guest workload (`hopper-workload`, images/workload) for snapshot, restore
//! and migration tests: what an undisturbed run writes (run natively), starting it in a guest,
//! waiting for its digest, and comparing what it wrote with the undisturbed run's bytes.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::binaries;
use crate::{HarnessError, MicrovmGuest, TestHost};

/// The workload's progress file on the guest's disk.
pub const GUEST_PROGRESS: &str = "/root/progress";
/// Its stdout and stderr in the guest, then its exit status (written when it ends).
const GUEST_OUTPUT: &str = "/root/workload.out";
const GUEST_STATUS: &str = "/root/workload.status";
/// Between polls of a guest: each one is an agent round trip that costs the emulated test
/// host CPU the guest needs.
const POLL: Duration = Duration::from_secs(2);

/// One run's parameters (`hopper-workload --mib --steps --every --pace-ms`).
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Size of the memory buffer.
    pub mib: u64,
    /// Steps, each hashing one page and rewriting another.
    pub steps: u64,
    /// A progress line every this many steps.
    pub every: u64,
    /// Sleep between progress lines: stretches a run without changing its output.
    pub pace_ms: u64,
}

/// What an undisturbed run writes.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The progress file (and what the connection carries): step lines, then the digest line.
    pub progress: Vec<u8>,
    /// The digest, in hex.
    pub digest: String,
}

impl Workload {
    fn args(&self, progress: &str) -> Vec<String> {
        [
            "--mib",
            &self.mib.to_string(),
            "--steps",
            &self.steps.to_string(),
            "--every",
            &self.every.to_string(),
            "--progress",
            progress,
        ]
        .map(String::from)
        .into()
    }

    /// Runs the workload natively (the static build that test hosts get, without pacing),
    /// undisturbed: what a guest's run must write.
    pub fn expected(&self) -> Result<Expected, HarnessError> {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let bin = binaries::build_static()?
            .into_iter()
            .find(|p| p.ends_with("hopper-workload"))
            .expect("hopper-workload is one of the static packages");
        let file = std::env::temp_dir().join(format!(
            "hopper-workload-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        let out = Command::new(&bin)
            .args(self.args(&file.to_string_lossy()))
            .output()
            .map_err(HarnessError::io(format!("running {}", bin.display())));
        let progress = std::fs::read(&file);
        let _ = std::fs::remove_file(&file);
        let out = out?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match (out.status.success(), stdout.trim().strip_prefix("digest ")) {
            (true, Some(digest)) => Ok(Expected {
                progress: progress
                    .map_err(HarnessError::io(format!("reading {}", file.display())))?,
                digest: digest.to_string(),
            }),
            _ => Err(HarnessError::Command {
                command: format!("{} {}", bin.display(), self.args("…").join(" ")),
                status: out.status.to_string(),
                output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
            }),
        }
    }

    /// Starts the workload in the background in `vm`, writing [`GUEST_PROGRESS`] and, with
    /// `connect` (`HOST:PORT` as the guest reaches it), sending the same lines there.
    pub fn start(
        &self,
        host: &TestHost,
        vm: &MicrovmGuest,
        connect: Option<&str>,
    ) -> Result<(), HarnessError> {
        let mut args = self.args(GUEST_PROGRESS);
        args.extend(["--pace-ms".into(), self.pace_ms.to_string()]);
        if let Some(addr) = connect {
            args.extend(["--connect".into(), addr.into()]);
        }
        // Every stream redirected: the agent's exec returns only when no process holds its
        // pipes, and the workload runs on.
        let script = format!(
            "rm -f {GUEST_PROGRESS} {GUEST_OUTPUT} {GUEST_STATUS}
(hopper-workload {} >{GUEST_OUTPUT} 2>&1; echo $? >{GUEST_STATUS}) </dev/null >/dev/null 2>&1 &",
            args.join(" ")
        );
        let out = vm.call(host, &["sh", "-c", &script])?;
        if !out.exit.success() {
            return Err(vm.error(
                host,
                format!(
                    "starting the workload failed ({}): {}",
                    out.exit,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    /// Ends the workload's pacing in `vm` (SIGUSR1): the rest of the run, whose output is the
    /// same, goes at full speed. For tests whose disturbances are over.
    pub fn hurry(&self, host: &TestHost, vm: &MicrovmGuest) -> Result<(), HarnessError> {
        vm.sh(host, "killall -USR1 hopper-workload").map(drop)
    }

    /// Waits until the workload in `vm` has ended and returns the digest it printed; an exit
    /// other than 0 is an error with its output.
    pub fn wait_done(
        &self,
        host: &TestHost,
        vm: &MicrovmGuest,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let started = Instant::now();
        let script = format!("cat {GUEST_STATUS} 2>/dev/null && cat {GUEST_OUTPUT}");
        loop {
            let out = vm.call_quiet(host, &["sh", "-c", &script])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some((status, output)) = text.split_once('\n') {
                return match (status, output.trim().strip_prefix("digest ")) {
                    ("0", Some(digest)) => Ok(digest.to_string()),
                    _ => Err(vm.error(
                        host,
                        format!("the workload exited with status {status}: {output}"),
                    )),
                };
            }
            if started.elapsed() >= timeout {
                return Err(vm.error(host, format!("the workload did not end within {timeout:?}")));
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The workload's progress file in `vm`, as read back from its disk: the guest's page cache
/// is dropped first, so a disk that lost or reordered writes shows.
pub fn guest_progress(host: &TestHost, vm: &MicrovmGuest) -> Result<Vec<u8>, HarnessError> {
    let out = vm.call(
        host,
        &[
            "sh",
            "-c",
            &format!("sync && echo 3 >/proc/sys/vm/drop_caches && cat {GUEST_PROGRESS}"),
        ],
    )?;
    if !out.exit.success() {
        return Err(vm.error(
            host,
            format!(
                "reading {GUEST_PROGRESS} failed ({}): {}",
                out.exit,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(out.stdout)
}

/// Starts a server in `host` that keeps everything a workload sends to `port` in `file`.
pub fn start_receiver(host: &TestHost, port: u16, file: &str) -> Result<(), HarnessError> {
    // nc's input stays open: at its end nc would close the connection, ending the workload's.
    host.sh(&format!(
        "(sleep 100000 </dev/null 2>/dev/null | nc -l -p {port} >{file} 2>/dev/null &)"
    ))
    .map(drop)
}

/// What the server of [`start_receiver`] has kept in `file`, once it holds the digest line
/// (or `timeout` has passed: the caller's check then says what is missing).
pub fn received(host: &TestHost, file: &str, timeout: Duration) -> Result<Vec<u8>, HarnessError> {
    let started = Instant::now();
    loop {
        let data = host.read_file(file)?;
        let done = data
            .split(|b| *b == b'\n')
            .any(|line| line.starts_with(b"digest "));
        if done || started.elapsed() >= timeout {
            return Ok(data);
        }
        std::thread::sleep(POLL);
    }
}

impl Expected {
    /// Checks what a run wrote (`what` names it in errors) against the undisturbed run's
    /// bytes: all of them when `complete`, else a prefix whose last line may be cut short (a
    /// write seen half done). Returns how many whole lines it holds; a difference is an error
    /// naming the first line that differs.
    pub fn check(&self, what: &str, actual: &[u8], complete: bool) -> Result<usize, HarnessError> {
        let diverged = |detail: String| HarnessError::Diverged {
            what: what.into(),
            detail,
        };
        let mut want = self.progress.split_inclusive(|b| *b == b'\n');
        let mut lines = 0;
        for got in actual.split_inclusive(|b| *b == b'\n') {
            let whole = got.ends_with(b"\n");
            let Some(expected) = want.next() else {
                return Err(diverged(format!(
                    "line {}: {:?} after the end of the undisturbed run's output",
                    lines + 1,
                    String::from_utf8_lossy(got)
                )));
            };
            if got != expected && (whole || complete || !expected.starts_with(got)) {
                return Err(diverged(format!(
                    "line {}: {:?}, expected {:?}",
                    lines + 1,
                    String::from_utf8_lossy(got),
                    String::from_utf8_lossy(expected),
                )));
            }
            lines += usize::from(whole);
        }
        match want.next() {
            Some(next) if complete => Err(diverged(format!(
                "it ends after {lines} lines; line {} should be {:?}",
                lines + 1,
                String::from_utf8_lossy(next)
            ))),
            _ => Ok(lines),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected {
        Expected {
            progress: b"step 10 aa\nstep 20 bb\ndigest cc\n".to_vec(),
            digest: "cc".into(),
        }
    }

    #[test]
    fn prefixes_pass_until_the_run_is_complete() {
        let e = expected();
        assert_eq!(e.check("x", b"", false).unwrap(), 0);
        assert_eq!(e.check("x", b"step 10 aa\nstep 2", false).unwrap(), 1);
        assert_eq!(e.check("x", &e.progress, true).unwrap(), 3);
        let short = e.check("x", b"step 10 aa\n", true).unwrap_err().to_string();
        assert!(
            short.contains("ends after 1 lines") && short.contains("step 20 bb"),
            "{short}"
        );
        let torn = e
            .check("x", b"step 10 aa\nstep 2", true)
            .unwrap_err()
            .to_string();
        assert!(torn.contains("line 2"), "{torn}");
    }

    #[test]
    fn the_first_differing_line_is_named() {
        let e = expected();
        let err = e
            .check("the disk", b"step 10 aa\nstep 20 bx\n", false)
            .unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("the disk") && err.contains("line 2") && err.contains("step 20 bb"),
            "{err}"
        );
        let extra = [e.progress.as_slice(), b"more\n"].concat();
        let err = e.check("x", &extra, false).unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("after the end"),
            "{err}"
        );
        assert!(e.check("x", b"step 10 aa\nstep 3", false).is_err());
    }
}
