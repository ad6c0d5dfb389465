//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device register window. `offset` is relative to the window's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps another device")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedBusDevice)>,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: SharedBusDevice,
    ) -> Result<(), OverlapError> {
        let end = base + len;
        let clash = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if len == 0 || clash {
            return Err(OverlapError { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// Returns false when no device claims `addr` (reads then see all ones, as on real buses).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().unwrap().read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().unwrap().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        assert!(bus.insert(0x10f, 1, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(0xf8, 0x10, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        bus.insert(0x110, 1, Arc::new(Mutex::new(Echo(9)))).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x110, &[7]));
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x111, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
