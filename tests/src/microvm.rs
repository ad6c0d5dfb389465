//! Guests (L2) inside a test host, booted by Hopper's VMM or by QEMU's `-M microvm`, the
//! baseline Hopper's VMM is compared against (same guest images, same host, same measurement).

use std::time::Duration;

use hopper_agent::{Exec, ExecOutput};

use crate::error::tail;
use crate::{HarnessError, TestHost};

/// The first line the guest images' init prints (images/initramfs/init).
pub const INIT_MARKER: &str = "hopper-init: started";

/// Which VMM boots the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestVmm {
    /// `hopper-runner vm run`.
    Hopper,
    /// `qemu-system-x86_64 -M microvm,acpi=on`.
    Qemu,
}

#[derive(Debug, Clone)]
pub struct MicrovmOptions {
    pub vmm: GuestVmm,
    /// More arguments for the VMM's command line (e.g. Hopper's `--tap`).
    pub extra_vmm_args: Vec<String>,
    /// Names the guest's directory in the test host (/tmp/<name>).
    pub name: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Boot from a private copy of the root disk (`root=/dev/vda`); otherwise the agent runs
    /// from the initramfs.
    pub root_disk: bool,
    /// Boot again from the disk an earlier guest of the same name left behind, instead of a
    /// fresh copy.
    pub reuse_disk: bool,
    /// Appended to the kernel command line (e.g. `hopper.ip=…`).
    pub extra_cmdline: String,
    /// QEMU only: take the guest from this migration source (`-incoming URI`) instead of
    /// booting it; readiness is then the agent answering, with no init line to wait for.
    pub incoming: Option<String>,
    pub ready_timeout: Duration,
}

impl Default for MicrovmOptions {
    fn default() -> Self {
        Self {
            vmm: GuestVmm::Qemu,
            extra_vmm_args: Vec::new(),
            name: "vm0".into(),
            memory_mib: 256,
            cpus: 1,
            root_disk: true,
            reuse_disk: false,
            extra_cmdline: String::new(),
            incoming: None,
            ready_timeout: Duration::from_secs(90),
        }
    }
}

/// A guest running inside a test host.
#[derive(Debug, Clone)]
pub struct MicrovmGuest {
    pub name: String,
    /// The guest's directory in the test host (console.log, vmm.log, agent.sock, disk).
    pub dir: String,
    /// The agent channel: the Unix socket behind the guest's virtio-console port.
    pub socket: String,
    /// Hopper's control socket (pause, resume, stop); `None` under QEMU.
    pub api_socket: Option<String>,
    /// From starting the VMM to the guest's init printing its first line.
    pub init_after: Duration,
    /// From starting the VMM to the agent's ready signal, measured in the test host
    /// (50 ms resolution).
    pub ready_after: Duration,
}

/// Boots a guest from the images of images/build.sh with `opts.vmm` in the test host, and
/// waits until the guest agent is ready.
pub fn boot_guest(host: &TestHost, opts: &MicrovmOptions) -> Result<MicrovmGuest, HarnessError> {
    let dir = format!("/tmp/{}", opts.name);
    let socket = format!("{dir}/agent.sock");
    let mut cmdline = String::from("console=ttyS0 panic=-1 quiet");
    if opts.root_disk {
        cmdline.push_str(" root=/dev/vda");
    }
    if !opts.extra_cmdline.is_empty() {
        cmdline = format!("{cmdline} {}", opts.extra_cmdline);
    }
    let mut extra = opts.extra_vmm_args.join(" ");
    if let Some(uri) = &opts.incoming {
        extra.push_str(&format!(" -incoming '{uri}'"));
    }
    let api_socket = format!("{dir}/api.sock");
    let launch = match opts.vmm {
        GuestVmm::Qemu => {
            let disk = if opts.root_disk {
                format!("-drive id=d0,file={dir}/rootfs.ext4,format=raw,if=none -device virtio-blk-device,drive=d0")
            } else {
                String::new()
            };
            format!(
                "qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host -m {mem} -smp {cpus} \
  -nodefaults -no-user-config -display none -no-reboot \
  -serial file:{dir}/console.log \
  -kernel /guest/vmlinuz -initrd /guest/initramfs.cpio.gz -append '{cmdline}' {disk} \
  -netdev user,id=n0,restrict=on -device virtio-net-device,netdev=n0 \
  -device virtio-serial-device -chardev socket,id=c0,path={socket},server=on,wait=off \
  -device virtconsole,chardev=c0 {extra} >{dir}/vmm.log 2>&1",
                mem = opts.memory_mib,
                cpus = opts.cpus,
            )
        }
        GuestVmm::Hopper => {
            let disk = if opts.root_disk {
                format!("--rootfs {dir}/rootfs.ext4")
            } else {
                String::new()
            };
            // Info level: a migration's source logs its rounds and where its pause went.
            format!(
                "HOPPER_LOG=info hopper-runner vm run --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio.gz \
  --memory {mem} --cpus {cpus} --cmdline '{cmdline}' {disk} \
  --agent-socket {socket} --api-socket {api_socket} {extra} \
  >{dir}/console.log 2>{dir}/vmm.log",
                mem = opts.memory_mib,
                cpus = opts.cpus,
            )
        }
    };
    let script = format!(
        r#"set -e
{prepare}
t0=$(cut -d' ' -f1 /proc/uptime)
{spawn}
# Polls are slow in an emulated host: bound the wait by the clock, not by a count.
deadline=$(awk -v t=$t0 'BEGIN{{print int(t + {timeout})}}')
until {incoming} || grep -q '^{INIT_MARKER}' {dir}/console.log 2>/dev/null; do
  kill -0 $(cat {dir}/vmm.pid) 2>/dev/null || {{
    sleep 0.2; echo "the VMM exited during boot (status $(cat {dir}/exit_status 2>/dev/null); dmesg: $(dmesg | tail -n 5 | tr '\n' '|'))" >&2; exit 1; }}
  now=$(cut -d. -f1 /proc/uptime)
  [ $now -lt $deadline ] || {{ echo "no init marker on the console after {timeout} s" >&2; exit 1; }}
  # Coarse polling: every poll costs the emulated host CPU that the guest's boot needs.
  sleep 0.05
done
ti=$(cut -d' ' -f1 /proc/uptime)
hopper-agent call --unix {socket} --timeout {timeout}
t1=$(cut -d' ' -f1 /proc/uptime)
echo "$t0 $ti $t1""#,
        prepare = if opts.reuse_disk {
            format!("rm -f {dir}/vmm.pid {dir}/exit_status {dir}/*.sock")
        } else if opts.root_disk {
            format!("rm -rf {dir} && mkdir -p {dir} && cp /guest/rootfs.ext4 {dir}/rootfs.ext4")
        } else {
            format!("rm -rf {dir} && mkdir -p {dir}")
        },
        timeout = opts.ready_timeout.as_secs_f64(),
        spawn = spawn_script(&dir, &launch),
        incoming = opts.incoming.is_some(),
    );
    let guest = MicrovmGuest {
        name: opts.name.clone(),
        dir,
        socket,
        api_socket: (opts.vmm == GuestVmm::Hopper).then_some(api_socket),
        init_after: Duration::ZERO,
        ready_after: Duration::ZERO,
    };
    let [init, ready] = guest.start(host, &script)?[..] else {
        return Err(guest.error(host, "the start-up script printed no timings".into()));
    };
    Ok(MicrovmGuest {
        init_after: init,
        ready_after: ready,
        ..guest
    })
}

/// Shell lines that start `launch` (a VMM writing its logs into `dir`) in the background and
/// return once its pid is in `dir/vmm.pid`; its exit status lands in `dir/exit_status`.
fn spawn_script(dir: &str, launch: &str) -> String {
    // The VMM's output goes to files: the agent's exec returns only when every holder of its
    // pipes has exited, and the VMM keeps running. `set +e`: a failed VMM's status is what
    // the caller wants to see, and under the caller's `set -e` the subshell would end first.
    format!(
        "( set +e; {launch} </dev/null & echo $! >{dir}/vmm.pid; wait $!; echo $? >{dir}/exit_status ) \\
  </dev/null >/dev/null 2>&1 &
while [ ! -s {dir}/vmm.pid ]; do sleep 0.01; done"
    )
}

/// A guest that a VMM takes from elsewhere (`vm restore`, `vm receive`): in /tmp/<name>,
/// with its disk at /tmp/<name>/rootfs.ext4, and the shell lines that make its directory
/// and those that start `hopper-runner vm <command> <args>` for it in the background (its
/// log at info level: what the restore or the migration took).
fn placed_guest(name: &str, command: &str, args: &str) -> (MicrovmGuest, String, String) {
    let dir = format!("/tmp/{name}");
    let guest = MicrovmGuest {
        name: name.into(),
        socket: format!("{dir}/agent.sock"),
        api_socket: Some(format!("{dir}/api.sock")),
        dir,
        init_after: Duration::ZERO,
        ready_after: Duration::ZERO,
    };
    let launch = format!(
        "HOPPER_LOG=info hopper-runner vm {command} {args} --rootfs {dir}/rootfs.ext4 \\
  --agent-socket {socket} --api-socket {dir}/api.sock \\
  >{dir}/console.log 2>{dir}/vmm.log",
        dir = guest.dir,
        socket = guest.socket,
    );
    let prepare = format!("rm -rf {dir} && mkdir -p {dir}", dir = guest.dir);
    let spawn = spawn_script(&guest.dir, &launch);
    (guest, prepare, spawn)
}

/// Starts Hopper's VMM from the snapshot in `from` (a directory in the test host) as guest
/// `name`, with `extra_vmm_args` (e.g. the host side of its network), and waits for its
/// agent.
pub fn restore_guest(
    host: &TestHost,
    from: &str,
    name: &str,
    extra_vmm_args: &str,
    ready_timeout: Duration,
) -> Result<MicrovmGuest, HarnessError> {
    let (guest, prepare, spawn) =
        placed_guest(name, "restore", &format!("--from {from} {extra_vmm_args}"));
    let script = format!(
        "set -e\n{prepare}\nt0=$(cut -d' ' -f1 /proc/uptime)\n{spawn}
hopper-agent call --unix {socket} --timeout {timeout}
t1=$(cut -d' ' -f1 /proc/uptime)
echo \"$t0 $t1\"",
        socket = guest.socket,
        timeout = ready_timeout.as_secs_f64(),
    );
    let [ready] = guest.start(host, &script)?[..] else {
        return Err(guest.error(host, "the start-up script printed no timings".into()));
    };
    Ok(MicrovmGuest {
        ready_after: ready,
        ..guest
    })
}

/// Starts `hopper-runner vm receive --listen 0.0.0.0:<port>` in the test host as guest
/// `name`, with `args` (its TLS identity, the host side of its network), and returns once
/// it listens. The guest's agent answers once a migration into it has completed
/// ([`MicrovmGuest::wait_ready`]).
pub fn receive_guest(
    host: &TestHost,
    name: &str,
    port: u16,
    args: &str,
) -> Result<MicrovmGuest, HarnessError> {
    let (guest, prepare, spawn) =
        placed_guest(name, "receive", &format!("--listen 0.0.0.0:{port} {args}"));
    let script = format!(
        "set -e\n{prepare}\n{spawn}
n=0
until grep -q 'waiting for a migrating VM' {dir}/vmm.log; do
  kill -0 $(cat {dir}/vmm.pid) 2>/dev/null || {{ sleep 0.2; cat {dir}/vmm.log >&2; exit 1; }}
  n=$((n+1)); [ $n -lt 300 ] || {{ echo 'not listening after 30 s' >&2; exit 1; }}
  sleep 0.1
done",
        dir = guest.dir,
    );
    let out = host.exec(&["sh", "-c", &script])?;
    if !out.exit.success() {
        return Err(guest.error(
            host,
            format!(
                "vm receive did not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(guest)
}

impl MicrovmGuest {
    /// Runs the script that starts this guest's VMM and waits for it; the script prints
    /// uptime stamps, and the result is each later stamp's distance from the first.
    fn start(&self, host: &TestHost, script: &str) -> Result<Vec<Duration>, HarnessError> {
        let out = host.exec(&["sh", "-c", script])?;
        if !out.exit.success() {
            return Err(self.error(
                host,
                format!(
                    "did not become ready ({}): {}",
                    out.exit,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stamps: Vec<f64> = stdout
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| self.error(host, format!("unexpected timing output {stdout:?}")))?;
        let Some((first, rest)) = stamps.split_first() else {
            return Err(self.error(host, format!("unexpected timing output {stdout:?}")));
        };
        Ok(rest
            .iter()
            .map(|t| Duration::from_secs_f64((t - first).max(0.0)))
            .collect())
    }

    /// Waits until the guest's agent answers (e.g. after a migration into it).
    pub fn wait_ready(&self, host: &TestHost, timeout: Duration) -> Result<(), HarnessError> {
        let out = host.exec(&[
            "hopper-agent",
            "call",
            "--unix",
            &self.socket,
            "--timeout",
            &timeout.as_secs().to_string(),
        ])?;
        if !out.exit.success() {
            return Err(self.error(host, format!("the agent did not answer within {timeout:?}")));
        }
        Ok(())
    }

    /// Runs a shell script in the guest: its stdout, or an error with its status and stderr.
    pub fn sh(&self, host: &TestHost, script: &str) -> Result<String, HarnessError> {
        let out = self.call(host, &["sh", "-c", script])?;
        if !out.exit.success() {
            return Err(self.error(
                host,
                format!(
                    "guest script failed ({}): {script}\n{}",
                    out.exit,
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command in the guest through its agent; the result is the guest command's.
    pub fn call(&self, host: &TestHost, argv: &[&str]) -> Result<ExecOutput, HarnessError> {
        host.exec_with(&self.agent_call(argv))
    }

    /// Like [`MicrovmGuest::call`], without printing the command: for polling loops.
    pub fn call_quiet(&self, host: &TestHost, argv: &[&str]) -> Result<ExecOutput, HarnessError> {
        host.exec_quiet(&self.agent_call(argv))
    }

    /// The test host's command that runs `argv` in the guest.
    fn agent_call(&self, argv: &[&str]) -> Exec {
        let call = [
            "hopper-agent",
            "call",
            "--unix",
            &self.socket,
            "--timeout",
            "30",
            "--",
        ];
        Exec::new(call.iter().chain(argv).copied())
    }

    /// The guest's serial console so far.
    pub fn console(&self, host: &TestHost) -> String {
        host.read_file(&format!("{}/console.log", self.dir))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Asks the guest agent to power the guest off and waits until the VMM has exited.
    pub fn poweroff(&self, host: &TestHost, timeout: Duration) -> Result<(), HarnessError> {
        let script = format!(
            "hopper-agent call --unix {sock} --timeout 30 --poweroff || exit 1
pid=$(cat {dir}/vmm.pid); n=0
while kill -0 $pid 2>/dev/null; do n=$((n+1)); [ $n -lt {tries} ] || exit 2; sleep 0.1; done",
            sock = self.socket,
            dir = self.dir,
            tries = timeout.as_millis() / 100,
        );
        let out = host.exec(&["sh", "-c", &script])?;
        match out.exit.shell_code() {
            0 => Ok(()),
            2 => Err(self.error(
                host,
                format!("VMM still running {timeout:?} after the agent agreed to power off"),
            )),
            _ => Err(self.error(
                host,
                format!(
                    "poweroff request failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )),
        }
    }

    /// The VMM process's resident memory in KiB, split into guest RAM (mappings at least as
    /// large as the guest's memory) and everything else (the VMM's own overhead).
    pub fn resident_kib(
        &self,
        host: &TestHost,
        guest_mib: u32,
    ) -> Result<(u64, u64), HarnessError> {
        let script = format!(
            "awk -v g={guest_kib} '/^Size:/{{s=$2}} /^Rss:/{{if (s>=g) guest+=$2; else other+=$2}} \
             END{{print guest+0, other+0}}' /proc/$(cat {dir}/vmm.pid)/smaps",
            guest_kib = guest_mib as u64 * 1024,
            dir = self.dir,
        );
        let out = host.sh(&script)?;
        let nums: Vec<u64> = out
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        match nums[..] {
            [guest, other] => Ok((guest, other)),
            _ => Err(self.error(host, format!("cannot read the VMM's memory use: {out:?}"))),
        }
    }

    /// Waits until the VMM has exited on its own and returns its exit status.
    pub fn wait_exit(&self, host: &TestHost, timeout: Duration) -> Result<i32, HarnessError> {
        let script = format!(
            "n=0; while [ ! -s {dir}/exit_status ]; do n=$((n+1)); [ $n -lt {tries} ] || exit 99; sleep 0.1; done; cat {dir}/exit_status",
            dir = self.dir,
            tries = timeout.as_millis() / 100,
        );
        let out = host.exec(&["sh", "-c", &script])?;
        let text = String::from_utf8_lossy(&out.stdout);
        match (out.exit.success(), text.trim().parse()) {
            (true, Ok(code)) => Ok(code),
            _ => Err(self.error(host, format!("the VMM did not exit within {timeout:?}"))),
        }
    }

    /// Kills the guest's VMM and waits (up to 10 s) until its launcher wrote the exit status: a
    /// status written later would land in whatever next uses the directory.
    pub fn kill(&self, host: &TestHost) -> Result<(), HarnessError> {
        host.sh(&format!(
            "[ -s {dir}/vmm.pid ] || exit 0
kill -9 $(cat {dir}/vmm.pid) 2>/dev/null
for i in $(seq 200); do [ -e {dir}/exit_status ] && exit 0; sleep 0.05; done",
            dir = self.dir
        ))
        .map(drop)
    }

    pub(crate) fn error(&self, host: &TestHost, what: String) -> HarnessError {
        let qemu_log = host
            .read_file(&format!("{}/vmm.log", self.dir))
            .unwrap_or_default();
        let what = format!(
            "{what}\n--- vmm.log ---\n{}",
            tail(&String::from_utf8_lossy(&qemu_log), 10)
        );
        HarnessError::Guest {
            guest: self.name.clone(),
            what,
            console: tail(&self.console(host), 40),
        }
    }
}
