//! Running a VM to its end: the device and vCPU threads, the main loop that serves the control
//! API until an exit reason is recorded, and the teardown.

use super::machine::{Machine, MachineControl};
use super::{io, Error, ExitReason, ExitSignal, Vmm};
use crate::control::{ControlServer, RunState};
use crate::event_loop::{self, DeviceGate};
use crate::vcpu::control::{install_kick_handler, Target};
use crate::vcpu::run;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::{Arc, Mutex};

impl Vmm {
    /// Runs the guest until it powers off, resets, is stopped, or fails.
    pub fn run(self) -> Result<ExitReason, Error> {
        install_kick_handler().map_err(|e| io("cannot install the vCPU kick handler")(e.into()))?;
        let gate = DeviceGate::new().map_err(io("cannot create the device gate"))?;
        let device_thread = event_loop::spawn(self.devices, gate.clone())
            .map_err(io("cannot start the device thread"))?;
        let mut threads = Vec::new();
        for vcpu in &self.vcpus {
            let (vcpu, ctx) = (vcpu.clone(), self.ctx.clone());
            let id = vcpu.lock().unwrap().id;
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .stack_size(crate::vcpu::THREAD_STACK)
                .spawn(move || run::run_loop(vcpu, ctx))
                .map_err(io("cannot start a vCPU thread"))?;
            threads.push(t);
        }
        let machine = Arc::new(Machine {
            threads: Mutex::new(threads),
            control: self.ctx.control.clone(),
            gate: gate.clone(),
            exit: self.ctx.exit.clone(),
            state: Mutex::new(RunState::Running),
            vm: self.vm.clone(),
            memory_mib: self.memory_mib,
            cpuid: self.cpuid,
            vcpus: self.vcpus.clone(),
            parts: self.parts,
        });

        let mut em =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(|e| {
                io("cannot create the main event loop")(std::io::Error::other(format!("{e:?}")))
            })?;
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(self.ctx.exit.clone()))));
        if let Some(listener) = self.api {
            let server = ControlServer::new(listener, MachineControl(machine.clone()))
                .map_err(io("cannot serve the API socket"))?;
            em.add_subscriber(Arc::new(Mutex::new(server)));
        }
        let reason = loop {
            if let Some(reason) = self.ctx.exit.reason() {
                break reason;
            }
            if let Err(e) = em.run() {
                break ExitReason::Error(format!("main event loop failed: {e:?}"));
            }
        };

        // Work the control API still does (a migration) ends and answers while the vCPUs
        // still run.
        drop(em);
        let threads = std::mem::take(&mut *machine.threads.lock().unwrap());
        machine.control.request(Target::Exit, &threads);
        for t in threads {
            let _ = t.join();
        }
        gate.exit();
        let _ = device_thread.join();
        if let Some((block, _)) = &machine.parts.disk {
            if let Err(e) = block.lock().unwrap().flush() {
                log::error!("flushing the disk failed: {e}");
            }
        }
        Ok(reason)
    }
}

/// Wakes the main loop when any thread records an exit reason.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(self.0.event_fd(), EventSet::IN))
            .expect("a fresh event loop accepts the exit event");
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event_fd().read();
    }
}
