//! The keyboard controller's command port, only as far as the reset line: Linux falls back to
//! pulsing it (command 0xfe) when an ACPI reset does not take.

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use std::sync::Arc;

const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042Device {
    exit: Arc<ExitSignal>,
}

impl I8042Device {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042Device { exit }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: input buffer empty, so the guest's wait-before-write loop ends at once.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(ExitReason::Reset);
        }
    }
}
