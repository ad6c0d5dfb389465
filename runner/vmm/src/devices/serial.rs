//! The 8250 UART at COM1 (vm-superio's model): the guest's console. Output goes to a writer
//! (the VMM's stdout or a log file).

use super::BusDevice;
use serde::{Deserialize, Serialize};
use std::io::Write;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt line.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

/// `vm_superio::serial::SerialState`, which has no serde support of its own.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART's registers and receive FIFO, as a snapshot carries them.
#[derive(Serialize, Deserialize)]
pub struct SavedSerial(#[serde(with = "SerialStateDef")] pub SerialState);

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    fn from_state(state: &SerialState, irq: EventFd, out: SerialOutput) -> Self {
        let uart = Serial::from_state(state, IrqTrigger(irq), NoEvents, out)
            .expect("a saved serial state is always within the FIFO's capacity");
        SerialDevice { uart }
    }

    /// Puts in a saved state, keeping this device's interrupt line and output.
    pub fn restore(&mut self, state: &SerialState) -> std::io::Result<()> {
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(std::io::sink()));
        *self = Self::from_state(state, irq, out);
        Ok(())
    }

    pub fn state(&self) -> SerialState {
        self.uart.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                log::warn!("serial write failed: {e:?}");
            }
            // The console is line-oriented for readers; flush at line ends only.
            if offset == 0 && *b == b'\n' {
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}
