//! `probe.hostile`: the guest misbehaves on purpose before doing the normal checks, and the
//! VMM must count each misdeed and carry on: register accesses of the wrong width or at
//! unknown offsets, queue registers written at the wrong time, a queue outside guest memory,
//! descriptors pointing outside guest memory, absurd lengths and a descriptor loop.

use core::ptr::{read_volatile, write_volatile};

use crate::io::println;
use crate::virtio::{Device, Queue};
use crate::check;

fn write8(dev: &Device, off: usize, v: u8) {
    // SAFETY: an MMIO window; a wrong-width access is the point.
    unsafe { write_volatile((dev.base + off) as *mut u8, v) }
}
fn read16(dev: &Device, off: usize) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile((dev.base + off) as *const u16) }
}

/// Misbehaves at `dev` (a vsock device), then resets it so the normal checks can follow.
pub fn run(dev: &Device) {
    println("INFO hostile: bad register accesses");
    let _ = read16(dev, 0x000); // magic with a 16-bit read
    write8(dev, 0x070, 0xff); // status with an 8-bit write
    dev.write(0x0c8, 1); // no register there
    let _ = dev.read(0x0c8);
    dev.write(0x014, 7); // device features page 7
    let _ = dev.read(0x010);
    dev.write(0x070, 4); // DRIVER_OK before anything else
    dev.write(0x030, 99); // a queue that does not exist
    dev.write(0x038, 64);
    dev.write(0x044, 1);
    dev.write(0x050, 77); // notify a queue that does not exist
    check("hostile.mmio_survived", dev.read(0x000) == 0x7472_6976, "the device stopped answering");

    println("INFO hostile: a queue outside guest memory");
    dev.write(0x070, 0);
    if dev.negotiate(0).is_some() {
        dev.write(0x030, 0);
        dev.write(0x038, 16);
        dev.write(0x080, 0);
        dev.write(0x084, 0x100); // 1 TiB: not guest memory
        dev.write(0x044, 1);
        let refused = !dev.driver_ok();
        check("hostile.bad_queue_refused", refused, "DRIVER_OK accepted a queue outside guest memory");
    }

    println("INFO hostile: bad descriptors");
    dev.write(0x070, 0);
    if dev.negotiate(0).is_some() {
        let (Some(_rx), Some(mut tx)) = (Queue::new(*dev, 0), Queue::new(*dev, 1)) else {
            check("hostile.queues", false, "queue setup failed");
            return;
        };
        let _ = dev.driver_ok();
        // Outside guest memory; a length near 4 GiB; a header cut short.
        let _ = tx.add(&[(0x0000_7fff_0000_0000, 4096, false)]);
        let _ = tx.add(&[(0x30_0000, 0xffff_fff0, false)]);
        let _ = tx.add(&[(0x30_0000, 10, false)]);
        // A loop: descriptor chain whose next points back at its head.
        if let Some(head) = tx.add(&[(0x30_0000, 44, false), (0x30_0000, 44, false)]) {
            tx.make_loop(head);
        }
        tx.kick();
        let mut used = 0;
        crate::io::wait_for(5, || {
            while tx.used().is_some() {
                used += 1;
            }
            used >= 3
        });
        check("hostile.bad_descriptors_returned", used >= 3, "the device did not return the bad chains");
    }
    // Back to a clean device for the normal checks.
    dev.write(0x070, 0);
}
