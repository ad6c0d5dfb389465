//! Emulated devices. Legacy ones sit on the port I/O bus, virtio devices on the MMIO bus; each
//! device module keeps its saved state next to it.

pub mod bus;
pub mod i8042;
pub mod power;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
