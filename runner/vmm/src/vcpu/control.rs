//! The handshake between the VMM and its vCPU threads: the VMM asks for a state (running,
//! paused, exited), kicks the threads out of KVM_RUN with a signal, and waits until each one
//! acknowledges. Kicks repeat until acknowledged, which closes the race of a signal landing
//! just before a thread enters KVM_RUN.

use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

const KICK_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Run,
    Pause,
    Exit,
}

/// What the VMM asks of its vCPUs and how many of them are stopped (paused or exited).
struct Shared {
    target: Target,
    stopped: usize,
}

pub struct VcpuControl {
    shared: Mutex<Shared>,
    changed: Condvar,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; without one the signal would kill the process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick)
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            shared: Mutex::new(Shared {
                target: Target::Run,
                stopped: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    pub fn target(&self) -> Target {
        self.shared.lock().unwrap().target
    }

    /// Called by a vCPU thread that has stopped for `target`. For Pause it blocks until the
    /// VMM wants something else; for Exit it only counts the thread as stopped.
    pub fn park(&self, target: Target) {
        let mut s = self.shared.lock().unwrap();
        s.stopped += 1;
        self.changed.notify_all();
        if target == Target::Pause {
            while s.target == Target::Pause {
                s = self.changed.wait(s).unwrap();
            }
            s.stopped -= 1;
        }
    }

    /// Blocks while the target is still `target` (a vCPU that asked for a VM exit waits here
    /// for the VMM to collect it).
    pub fn wait_while(&self, target: Target) {
        let mut s = self.shared.lock().unwrap();
        while s.target == target {
            s = self.changed.wait(s).unwrap();
        }
    }

    /// Sets `target` and returns once all `threads` have stopped for it (Pause, Exit), or
    /// at once for Run.
    pub fn request<T>(&self, target: Target, threads: &[JoinHandle<T>]) {
        let mut s = self.shared.lock().unwrap();
        s.target = target;
        self.changed.notify_all();
        if target == Target::Run {
            return;
        }
        while s.stopped < threads.len() {
            drop(s);
            for t in threads {
                // A thread that has already finished cannot be signalled; that is fine.
                let _ = t.kill(kick_signal());
            }
            s = self.shared.lock().unwrap();
            s = self.changed.wait_timeout(s, KICK_INTERVAL).unwrap().0;
        }
    }
}
