//! Port-I/O and MMIO buses: which device answers an access exit from a vCPU.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range. Data comes
/// from the guest and is untrusted; lengths are whatever the instruction used (1-8 bytes).
pub trait BusDevice: Send {
    /// The guest reads; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between vCPU threads and the event loop.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Ranges sorted by start, never overlapping.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

/// Two devices claim overlapping addresses.
#[derive(Debug)]
pub struct Overlap(pub u64);

impl Bus {
    /// Adds `device` at `[start, start + len)`.
    pub fn insert(&mut self, start: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let end = start.checked_add(len).ok_or(Overlap(start))?;
        if len == 0
            || self
                .ranges
                .iter()
                .any(|(s, l, _)| start < s + l && *s < end)
        {
            return Err(Overlap(start));
        }
        let at = self.ranges.partition_point(|(s, _, _)| *s < start);
        self.ranges.insert(at, (start, len, device));
        Ok(())
    }

    /// The device covering `addr` and the offset within it.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let i = self
            .ranges
            .partition_point(|(s, _, _)| *s <= addr)
            .checked_sub(1)?;
        let (start, len, dev) = &self.ranges[i];
        (addr - start < *len).then_some((dev, addr - start))
    }

    /// Dispatches a read; false when no device is there (the data is then all ones, as on
    /// an empty ISA bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; false when no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on after a panic elsewhere poisoned it (device state is
/// plain data; the VMM aborts on panic in release builds anyway).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn lookup_overlap_and_holes() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Echo(9)))).unwrap();
        assert!(bus.insert(0x3fc, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x60, &[40]));
        bus.read(0x61, &mut b);
        assert_eq!(b[0], 41);
        assert!(!bus.read(0x5f, &mut b));
    }
}
