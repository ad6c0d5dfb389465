//! The device thread: one event loop that serves every device's queue notifications, TAP and
//! socket traffic. A gate in the loop lets the VMM park the whole thread, which is how devices
//! are paused: with block I/O served synchronously, a parked loop has no request in flight.

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::{Arc, Condvar, Mutex};
use vmm_sys_util::eventfd::EventFd;

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

struct GateState {
    want: Want,
    parked: bool,
}

/// Lets another thread pause, resume and end the device loop.
pub struct DeviceGate {
    evt: EventFd,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl DeviceGate {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(DeviceGate {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            state: Mutex::new(GateState {
                want: Want::Run,
                parked: false,
            }),
            changed: Condvar::new(),
        }))
    }

    fn set(&self, want: Want) {
        self.state.lock().unwrap().want = want;
        self.changed.notify_all();
        // A failed write means the counter is full, so the loop is already woken.
        let _ = self.evt.write(1);
    }

    /// Returns once the device loop is parked.
    pub fn pause(&self) {
        self.set(Want::Pause);
        let mut s = self.state.lock().unwrap();
        while !s.parked {
            s = self.changed.wait(s).unwrap();
        }
    }

    pub fn resume(&self) {
        self.set(Want::Run);
    }

    pub fn exit(&self) {
        self.set(Want::Exit);
    }

    fn exiting(&self) -> bool {
        self.state.lock().unwrap().want == Want::Exit
    }
}

struct GateSubscriber(Arc<DeviceGate>);

impl MutEventSubscriber for GateSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.0.evt, EventSet::IN))
            .expect("a fresh event loop accepts its gate");
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
        let gate = &self.0;
        let mut s = gate.state.lock().unwrap();
        if s.want == Want::Pause {
            s.parked = true;
            gate.changed.notify_all();
            while s.want == Want::Pause {
                s = gate.changed.wait(s).unwrap();
            }
            s.parked = false;
        }
    }
}

/// Starts the device thread with `devices` subscribed.
pub fn spawn(
    devices: Vec<Subscriber>,
    gate: Arc<DeviceGate>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut em =
        EventManager::<Subscriber>::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    em.add_subscriber(Arc::new(Mutex::new(GateSubscriber(gate.clone()))));
    for dev in devices {
        em.add_subscriber(dev);
    }
    std::thread::Builder::new()
        .name("devices".into())
        .stack_size(crate::vcpu::THREAD_STACK)
        .spawn(move || {
            while !gate.exiting() {
                if let Err(e) = em.run() {
                    log::error!("device event loop failed: {e:?}");
                    break;
                }
            }
        })
}
