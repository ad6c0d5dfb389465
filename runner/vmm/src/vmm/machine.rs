//! The running machine as the control API sees it: its run state, pause and resume,
//! snapshots, migrations and stops.

use super::devices::SavedParts;
use super::{ExitReason, ExitSignal};
use crate::control::{Answer, Controllable, Request, Response, RunState};
use crate::event_loop::DeviceGate;
use crate::migration::{self, source::Pausable, MigrateOptions, MigrationError};
use crate::persist;
use crate::vcpu::control::{Target, VcpuControl};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use kvm_bindings::kvm_cpuid_entry2;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The running VM as the control API sees it.
pub(super) struct Machine {
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(super) control: Arc<VcpuControl>,
    pub(super) gate: Arc<DeviceGate>,
    pub(super) exit: Arc<ExitSignal>,
    pub(super) state: Mutex<RunState>,
    pub(super) vm: Arc<Vm>,
    pub(super) memory_mib: u64,
    pub(super) cpuid: Vec<kvm_cpuid_entry2>,
    pub(super) vcpus: Vec<Arc<Mutex<Vcpu>>>,
    pub(super) parts: SavedParts,
}

impl Machine {
    fn pause(&self) {
        self.control
            .request(Target::Pause, &self.threads.lock().unwrap());
        self.gate.pause();
    }

    fn resume(&self) {
        self.gate.resume();
        self.control
            .request(Target::Run, &self.threads.lock().unwrap());
    }

    /// The parts a snapshot or a migration reads.
    fn parts(&self) -> persist::Paused<'_> {
        let parts = &self.parts;
        persist::Paused {
            vm: &self.vm,
            memory_mib: self.memory_mib,
            vcpus: &self.vcpus,
            serial: &parts.serial,
            transports: &parts.transports,
            disk: parts.disk.as_ref().map(|(b, p)| (&**b, p.as_path())),
            devices: &parts.devices,
        }
    }

    /// Sends the running VM to another host (see [`migration::source`]); then it stops here
    /// (sent), runs on (not sent), or stays paused (the handover is unconfirmed).
    fn migrate_and_settle(&self, opts: &MigrateOptions) -> Response {
        let result = migration::source::migrate(
            &migration::source::Source {
                parts: self.parts(),
                cpuid: &self.cpuid,
                control: self,
            },
            opts,
        );
        let mut state = self.state.lock().unwrap();
        match result {
            Ok(summary) => {
                log::info!("migrated to {}: {summary:?}", opts.to);
                *state = RunState::Stopping;
                self.exit.request(ExitReason::Migrated);
                Response::migrated(*state, summary)
            }
            Err(e @ MigrationError::Unconfirmed(_)) => {
                *state = RunState::Paused;
                Response::error(format!("migration to {}: {e}", opts.to))
            }
            // The target ran ahead: this copy is stale and must not run again.
            Err(e @ MigrationError::PostcopyBroken(_)) => {
                *state = RunState::Stopping;
                self.exit.request(ExitReason::Error(e.to_string()));
                Response::error(format!("migration to {}: {e}", opts.to))
            }
            Err(e) => {
                *state = RunState::Running;
                Response::error(format!(
                    "migration to {} failed, the VM runs on here: {e}",
                    opts.to
                ))
            }
        }
    }
}

impl Pausable for Machine {
    fn pause(&self) {
        Machine::pause(self)
    }
    fn resume(&self) {
        Machine::resume(self)
    }
    fn is_exiting(&self) -> bool {
        self.exit.is_exiting()
    }
}

pub(super) struct MachineControl(pub(super) Arc<Machine>);

impl Controllable for MachineControl {
    fn handle(&mut self, request: Request) -> Answer {
        let m = &self.0;
        let mut state = m.state.lock().unwrap();
        let response = match (request, *state) {
            (Request::Status, s) => Response::state(s),
            (_, RunState::Stopping) => Response::error("the VM is stopping"),
            (_, RunState::Migrating) => {
                Response::error("a migration is under way; it ends on its own")
            }
            (Request::Pause, RunState::Paused) | (Request::Resume, RunState::Running) => {
                Response::state(*state)
            }
            (Request::Pause, RunState::Running) => {
                m.pause();
                *state = RunState::Paused;
                Response::state(*state)
            }
            (Request::Resume, RunState::Paused) => {
                m.resume();
                *state = RunState::Running;
                Response::state(*state)
            }
            (Request::Snapshot { dir, resume }, before) => {
                if before == RunState::Running {
                    m.pause();
                }
                let result = persist::save(&dir, &m.parts());
                // A failed snapshot leaves the VM as it was; a good one without `resume`
                // stops it (the snapshot carries on from here).
                if result.is_ok() && !resume {
                    *state = RunState::Stopping;
                    m.exit.request(ExitReason::Stopped);
                } else if before == RunState::Running {
                    m.resume();
                }
                match result {
                    Ok(summary) => Response::snapshot(*state, summary),
                    Err(e) => Response::error(format!("snapshot failed: {e}")),
                }
            }
            (Request::Migrate(_), RunState::Paused) => {
                Response::error("the VM is paused; resume it to migrate it")
            }
            (Request::Migrate(opts), RunState::Running) => {
                *state = RunState::Migrating;
                let m = m.clone();
                return Answer::Later(Box::new(move || m.migrate_and_settle(&opts)));
            }
            (Request::Stop, _) => {
                *state = RunState::Stopping;
                m.exit.request(ExitReason::Stopped);
                Response::state(*state)
            }
        };
        Answer::Now(response)
    }
}
