//! A minimal virtio-mmio driver: device discovery from the command line, feature
//! negotiation, split virtqueues in static memory, polling (interrupts stay masked at CPL3).

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::{param, parse_u64, print, print_hex, println};

/// Queue size the probe uses.
pub const QSIZE: usize = 16;
const MAX_DEVICES: usize = 8;
const MAX_QUEUES: usize = 8;

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG: usize = 0x100;
}

/// One device window.
#[derive(Clone, Copy)]
pub struct Device {
    /// Physical base of the 4 KiB window.
    pub base: usize,
}

impl Device {
    /// Reads a register (an MMIO exit to the VMM).
    pub fn read(&self, off: usize) -> u32 {
        // SAFETY: `base` is a virtio-mmio window from the command line, identity mapped.
        unsafe { read_volatile((self.base + off) as *const u32) }
    }
    /// Writes a register.
    pub fn write(&self, off: usize, v: u32) {
        // SAFETY: as for read.
        unsafe { write_volatile((self.base + off) as *mut u32, v) }
    }
    /// Reads a byte of config space.
    pub fn config_u8(&self, off: usize) -> u8 {
        // SAFETY: as for read.
        unsafe { read_volatile((self.base + reg::CONFIG + off) as *const u8) }
    }
    /// Reads a 32-bit word of config space.
    pub fn config_u32(&self, off: usize) -> u32 {
        self.read(reg::CONFIG + off)
    }
    /// The virtio device type.
    pub fn device_id(&self) -> u32 {
        self.read(reg::DEVICE_ID)
    }

    /// Resets the device and negotiates `wanted` features (VERSION_1 is always asked for).
    /// Returns the accepted features, or None when the device refused.
    pub fn negotiate(&self, wanted: u64) -> Option<u64> {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, 1);
        self.write(reg::STATUS, 1 | 2);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES) as u64;
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES) as u64;
        let offered = lo | (hi << 32);
        let accept = offered & (wanted | (1 << 32));
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accept as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accept >> 32) as u32);
        self.write(reg::STATUS, 1 | 2 | 8);
        (self.read(reg::STATUS) & 8 != 0).then_some(accept)
    }

    /// Sets DRIVER_OK; true when the device did not flag DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) -> bool {
        self.write(reg::STATUS, 1 | 2 | 8 | 4);
        self.read(reg::STATUS) & 64 == 0
    }
}

/// Devices named by `virtio_mmio.device=<size>@<base>:<irq>` entries.
pub fn discover(line: &[u8]) -> [Option<Device>; MAX_DEVICES] {
    let mut out = [None; MAX_DEVICES];
    let mut n = 0;
    for word in line.split(|&b| b == b' ') {
        let Some(v) = param(word, "virtio_mmio.device") else { continue };
        let Some(at) = v.iter().position(|&b| b == b'@') else { continue };
        let rest = &v[at + 1..];
        let end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
        let Some(base) = parse_u64(&rest[..end]) else { continue };
        let dev = Device { base: base as usize };
        let ok = dev.read(reg::MAGIC) == 0x7472_6976 && dev.read(reg::VERSION) == 2;
        crate::check("virtio.magic_version", ok, "bad magic or version at a declared window");
        if ok && n < MAX_DEVICES {
            out[n] = Some(dev);
            n += 1;
        }
    }
    out
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
struct QueueMem {
    desc: [Desc; QSIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE],
    used_event: u16,
    _pad: [u8; 4096 - 16 * QSIZE - 6 - 2 * QSIZE],
    used_flags: u16,
    used_idx: u16,
    used_ring: [UsedElem; QSIZE],
    avail_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

const EMPTY_QUEUE: QueueMem = QueueMem {
    desc: [Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QSIZE],
    used_event: 0,
    _pad: [0; 4096 - 16 * QSIZE - 6 - 2 * QSIZE],
    used_flags: 0,
    used_idx: 0,
    used_ring: [UsedElem { id: 0, len: 0 }; QSIZE],
    avail_event: 0,
};

static mut QUEUES: [QueueMem; MAX_QUEUES] = [EMPTY_QUEUE; MAX_QUEUES];
static mut NEXT_QUEUE: usize = 0;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A split virtqueue the probe drives.
pub struct Queue {
    dev: Device,
    index: u32,
    mem: *mut QueueMem,
    free: u32,
    last_used: u16,
}

impl Queue {
    /// Sets up queue `index` of `dev` in the next free static queue memory.
    pub fn new(dev: Device, index: u32) -> Option<Queue> {
        // SAFETY: single-threaded guest; NEXT_QUEUE only grows, each QueueMem is handed out
        // once.
        let mem = unsafe {
            if NEXT_QUEUE >= MAX_QUEUES {
                return None;
            }
            NEXT_QUEUE += 1;
            &raw mut QUEUES[NEXT_QUEUE - 1]
        };
        dev.write(reg::QUEUE_SEL, index);
        if (dev.read(reg::QUEUE_NUM_MAX) as usize) < QSIZE {
            return None;
        }
        dev.write(reg::QUEUE_NUM, QSIZE as u32);
        let base = mem as u64;
        // SAFETY: `mem` points at a static QueueMem; taking field addresses.
        let (desc, avail, used) = unsafe { (&raw const (*mem).desc as u64, &raw const (*mem).avail_flags as u64, &raw const (*mem).used_flags as u64) };
        let _ = base;
        for (lo, hi, v) in [(reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc), (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail), (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used)] {
            dev.write(lo, v as u32);
            dev.write(hi, (v >> 32) as u32);
        }
        dev.write(reg::QUEUE_READY, 1);
        Some(Queue { dev, index, mem, free: (1u32 << QSIZE) - 1, last_used: 0 })
    }

    fn alloc(&mut self) -> Option<u16> {
        if self.free == 0 {
            return None;
        }
        let i = self.free.trailing_zeros();
        self.free &= !(1 << i);
        Some(i as u16)
    }

    /// Offers a chain of buffers (addr, len, device-writable); returns the head index.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        if bufs.is_empty() || (self.free.count_ones() as usize) < bufs.len() {
            return None;
        }
        let mut ids = [0u16; 4];
        for id in ids.iter_mut().take(bufs.len()) {
            *id = self.alloc()?;
        }
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let d = Desc { addr, len, flags: if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT }, next: if last { 0 } else { ids[i + 1] } };
            // SAFETY: ids[i] < QSIZE; the device only reads descriptors after the avail
            // index is published below.
            unsafe { write_volatile(&raw mut (*self.mem).desc[ids[i] as usize], d) };
        }
        // SAFETY: the avail ring belongs to the driver; the fence orders the ring entry and
        // descriptors before the index the device reads.
        unsafe {
            let idx = read_volatile(&raw const (*self.mem).avail_idx);
            write_volatile(&raw mut (*self.mem).avail_ring[idx as usize % QSIZE], ids[0]);
            fence(Ordering::SeqCst);
            write_volatile(&raw mut (*self.mem).avail_idx, idx.wrapping_add(1));
            fence(Ordering::SeqCst);
        }
        Some(ids[0])
    }

    /// Points the second descriptor of the chain at `head` back at `head` (with NEXT set): a
    /// loop, which a device must detect instead of following forever.
    pub fn make_loop(&mut self, head: u16) {
        // SAFETY: descriptors of a chain we own; the device sees them after the next kick.
        unsafe {
            let first = read_volatile(&raw const (*self.mem).desc[head as usize % QSIZE]);
            let second = first.next as usize % QSIZE;
            let mut d = read_volatile(&raw const (*self.mem).desc[second]);
            d.flags |= F_NEXT;
            d.next = head;
            write_volatile(&raw mut (*self.mem).desc[second], d);
        }
        fence(Ordering::SeqCst);
    }

    /// Notifies the device (a write to QueueNotify: KVM turns it into an ioeventfd kick).
    pub fn kick(&self) {
        self.dev.write(reg::QUEUE_NOTIFY, self.index);
    }

    /// The next used element (head, written length), freeing its chain.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring is written by the device; read it volatile, after a fence.
        unsafe {
            fence(Ordering::SeqCst);
            let idx = read_volatile(&raw const (*self.mem).used_idx);
            if idx == self.last_used {
                return None;
            }
            let UsedElem { id, len } = read_volatile(&raw const (*self.mem).used_ring[self.last_used as usize % QSIZE]);
            self.last_used = self.last_used.wrapping_add(1);
            let mut d = (id as usize) % QSIZE;
            // At most QSIZE steps: a chain made into a loop (probe.hostile) must not hang us.
            for _ in 0..QSIZE {
                self.free |= 1 << d;
                let desc = read_volatile(&raw const (*self.mem).desc[d]);
                if desc.flags & F_NEXT == 0 {
                    break;
                }
                d = desc.next as usize % QSIZE;
            }
            Some((id as u16, len))
        }
    }
}

/// Prints the negotiated state of a device.
pub fn report(name: &str, features: Option<u64>) {
    print("INFO ");
    print(name);
    print(" features=");
    print_hex(features.unwrap_or(0));
    println("");
}
