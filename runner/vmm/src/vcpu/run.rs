//! The vCPU thread: KVM_RUN in a loop, dispatching port I/O and MMIO exits to the buses and
//! turning the guest's shutdown and reset into a VM exit.

use super::control::{Target, VcpuControl};
use super::Vcpu;
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;
use std::sync::{Arc, Mutex};

/// What a vCPU thread needs besides its vCPU.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    pub control: Arc<VcpuControl>,
}

enum Step {
    Continue,
    Stop(ExitReason),
}

/// Runs `vcpu` until the VMM asks the thread to exit. The vCPU is locked while it runs and
/// free while the thread is parked, so the VMM can read a paused vCPU's state.
pub fn run_loop(vcpu: Arc<Mutex<Vcpu>>, ctx: VcpuContext) {
    loop {
        match ctx.control.target() {
            Target::Run => {}
            Target::Pause => {
                vcpu.lock().unwrap().finish_in_flight();
                ctx.control.park(Target::Pause);
                continue;
            }
            Target::Exit => {
                vcpu.lock().unwrap().finish_in_flight();
                ctx.control.park(Target::Exit);
                return;
            }
        }
        let step = vcpu.lock().unwrap().step(&ctx);
        match step {
            // A device write (poweroff, reset) may have ended the VM: run no more guest
            // code, which after an ACPI poweroff would only poll the sleep status register.
            Step::Continue if !ctx.exit.is_exiting() => {}
            Step::Continue => ctx.control.wait_while(Target::Run),
            Step::Stop(reason) => {
                ctx.exit.request(reason);
                ctx.control.wait_while(Target::Run);
            }
        }
    }
}

impl Vcpu {
    fn step(&mut self, ctx: &VcpuContext) -> Step {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(port as u64, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(port as u64, data) {
                    log::debug!("vCPU {id}: write {data:x?} to unclaimed port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    log::debug!("vCPU {id}: MMIO read of unclaimed address {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    log::debug!("vCPU {id}: MMIO write to unclaimed address {addr:#x}");
                }
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: a reset to the guest, but worth a line for whoever reads why
                // a VM ended without a word on its console. No registers: on AMD, KVM has
                // already reset the vCPU when it reports the shutdown.
                log::warn!("vCPU {id}: triple fault; the VM resets");
                return Step::Stop(ExitReason::Reset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => return Step::Stop(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => return Step::Stop(ExitReason::Reset),
                other => log::warn!("vCPU {id}: system event {other} ignored"),
            },
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC, HLT is handled by KVM; seeing it means no wake-up
                // source exists for this vCPU.
                return Step::Stop(ExitReason::Error(format!("vCPU {id} halted for good")));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Step::Stop(ExitReason::Error(format!(
                    "vCPU {id}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )));
            }
            Ok(VcpuExit::InternalError) => {
                return Step::Stop(ExitReason::Error(format!("vCPU {id}: KVM internal error")));
            }
            Ok(other) => log::warn!("vCPU {id}: unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return Step::Stop(ExitReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}")));
            }
        }
        Step::Continue
    }

    /// Completes an instruction whose port or MMIO access was just served, without running
    /// further guest code, so that the state read next reflects it.
    fn finish_in_flight(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Ok(exit) => log::debug!(
                "vCPU {}: exit {exit:?} while completing in-flight I/O",
                self.id
            ),
            Err(e) => log::warn!("vCPU {}: completing in-flight I/O failed: {e}", self.id),
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}
