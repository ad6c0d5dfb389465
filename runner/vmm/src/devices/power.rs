//! ACPI hardware-reduced power management: the sleep control register (S5 = poweroff) and the
//! reset register that the FADT points the guest at.

use super::BusDevice;
use crate::acpi::S5_SLEEP_TYPE;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{ACPI_PM_PORT, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT};
use std::sync::Arc;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct AcpiPowerDevice {
    exit: Arc<ExitSignal>,
}

impl AcpiPowerDevice {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiPowerDevice { exit }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = ACPI_PM_PORT + offset as u16;
        if port == ACPI_SLEEP_CONTROL_PORT
            && value & SLP_EN != 0
            && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE
        {
            self.exit.request(ExitReason::PowerOff);
        } else if port == ACPI_RESET_PORT && value == ACPI_RESET_VALUE {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = AcpiPowerDevice::new(exit.clone());
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN: ignored
        assert_eq!(exit.reason(), None);
        dev.write(0, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = AcpiPowerDevice::new(exit.clone());
        dev.write((ACPI_RESET_PORT - ACPI_PM_PORT) as u64, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
