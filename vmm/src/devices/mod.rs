//! Devices the VMM emulates: the serial console, the i8042 reset line, virtio-mmio.

pub mod legacy;
pub mod virtio;
