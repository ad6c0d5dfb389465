//! Auto-converge: a thread that holds the vCPUs for a share of each period while the copy
//! cannot keep up with the guest's writes.

use super::Pausable;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

const THROTTLE_PERIOD_MS: u64 = 100;
/// Like QEMU's auto-converge: hold the vCPUs 20% of the time, 10% more each round that does
/// not converge, up to 95%.
const THROTTLE_FIRST: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 95;

/// Holds the vCPUs for `percent` of each period while the copy cannot keep up.
#[derive(Default)]
pub(super) struct Throttle {
    percent: AtomicU8,
    pub(super) max: AtomicU8,
    /// Set by [`Throttle::stop`], which also wakes the thread: the pause must follow the
    /// last round at once, not after the rest of a throttle period (the guest writes on
    /// meanwhile, and all of that falls into the pause).
    done: Mutex<bool>,
    wake: Condvar,
}

impl Throttle {
    pub(super) fn tighten(&self) {
        let p = match self.percent.load(Ordering::Relaxed) {
            0 => THROTTLE_FIRST,
            p => (p + THROTTLE_STEP).min(THROTTLE_MAX),
        };
        self.percent.store(p, Ordering::Relaxed);
        self.max.fetch_max(p, Ordering::Relaxed);
        log::info!(
            "migration: the guest dirties memory faster than it is sent; throttled to {}%",
            100 - p
        );
    }

    pub(super) fn stop(&self) {
        *self.done.lock().unwrap() = true;
        self.wake.notify_all();
    }

    pub(super) fn run(&self, control: &dyn Pausable) {
        let mut done = self.done.lock().unwrap();
        while !*done {
            let held = self.percent.load(Ordering::Relaxed) as u64 * THROTTLE_PERIOD_MS / 100;
            if held > 0 {
                control.pause();
                done = self.sleep(done, held);
                control.resume();
            }
            done = self.sleep(done, THROTTLE_PERIOD_MS - held);
        }
    }

    /// Sleeps `ms`, or less if stopped meanwhile.
    fn sleep<'a>(&self, done: MutexGuard<'a, bool>, ms: u64) -> MutexGuard<'a, bool> {
        let wait = self
            .wake
            .wait_timeout_while(done, Duration::from_millis(ms), |done| !*done);
        wait.unwrap().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Each round that does not converge holds the guest 10% longer, up to 95%.
    #[test]
    fn each_tightening_holds_the_guest_longer_up_to_95_percent() {
        let throttle = Throttle::default();
        let held: Vec<u8> = (0..10)
            .map(|_| {
                throttle.tighten();
                throttle.percent.load(Ordering::Relaxed)
            })
            .collect();
        assert_eq!(held, [20, 30, 40, 50, 60, 70, 80, 90, 95, 95]);
        assert_eq!(throttle.max.load(Ordering::Relaxed), 95);
    }

    /// Stopping the throttle ends its hold and its period at once, with the guest resumed.
    #[test]
    fn a_stopped_throttle_lets_go_at_once() {
        #[derive(Default)]
        struct Held(std::sync::atomic::AtomicI32);
        impl Pausable for Held {
            fn pause(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
            fn resume(&self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
            fn is_exiting(&self) -> bool {
                false
            }
        }
        let (throttle, guest) = (Throttle::default(), Held::default());
        for _ in 0..9 {
            throttle.tighten();
        }
        let took = std::thread::scope(|s| {
            let running = s.spawn(|| throttle.run(&guest));
            // Inside a 95 ms hold.
            while guest.0.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let stopped = Instant::now();
            throttle.stop();
            running.join().unwrap();
            stopped.elapsed()
        });
        // Waiting out the hold would take about 95 ms.
        assert!(took < Duration::from_millis(50), "{took:?}");
        assert_eq!(guest.0.load(Ordering::SeqCst), 0, "the guest runs again");
    }
}
