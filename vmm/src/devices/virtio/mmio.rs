//! The virtio-mmio transport (version 2), as a bus device. Every register access comes from
//! the guest: bad offsets, sizes and values are counted and ignored, never fatal.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::metrics::Metrics;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x454e_434c; // "ENCL"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, where the ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    metrics: Arc<Metrics>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Wraps `device`; `kicks` must hold one eventfd per queue (the VMM registers them as
    /// ioeventfds on this device's QueueNotify with the queue index as datamatch).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let sizes = device.queue_max_sizes();
        if sizes.len() != kicks.len() {
            return Err(format!(
                "{} queues but {} kick eventfds",
                sizes.len(),
                kicks.len()
            ));
        }
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|e| format!("queue of {s}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            kicks,
            interrupt,
            metrics,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    fn bad(&self) {
        self.metrics
            .bad_mmio_accesses
            .fetch_add(1, Ordering::Relaxed);
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        // Queue registers only change before DRIVER_OK (virtio 1.2, 4.2.2.2).
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits, in order (virtio 1.2, 3.1.1).
        if v & self.status != self.status {
            self.bad();
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0
            {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && !self.active {
            if v & STATUS_FEATURES_OK == 0 {
                self.bad();
                return;
            }
            match self.activate() {
                Ok(()) => self.active = true,
                Err(e) => {
                    eprintln!(
                        "enclave-vmm: virtio device type {} not started (guest driver error; device flagged for reset): {e}",
                        self.device.device_type()
                    );
                    self.status = v | STATUS_NEEDS_RESET;
                    self.interrupt.raise(super::INT_CONFIG);
                    return;
                }
            }
        }
        let _ = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FAILED);
        self.status = v;
    }

    fn activate(&mut self) -> Result<(), String> {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} has addresses outside guest memory or a bad size"
                ));
            }
        }
        let kicks = self
            .kicks
            .iter()
            .map(|k| k.try_clone().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).map_err(|e| format!("{e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            kicks,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        })
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.bad();
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.max_size() as u32)
                .unwrap_or(0),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.ready() as u32)
                .unwrap_or(0),
            reg::INTERRUPT_STATUS => {
                let s = self.interrupt.status.load(Ordering::SeqCst);
                if self.active && self.device.interrupt_status_is_implicit() {
                    s | INT_VRING
                } else {
                    s
                }
            }
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions (virtio-fs DAX windows): the spec's answer is a
            // length (and base) of all ones. Zero would announce an empty region at 0,
            // which Linux's virtio-fs tries to reserve and then fails its probe (EBUSY).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                self.bad();
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            } else {
                self.bad();
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad();
            return;
        };
        if offset % 4 != 0 {
            self.bad();
            return;
        }
        let v = u32::from_le_bytes(bytes);
        let features_phase = self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::SHM_SEL => {} // every region reads as absent
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v as u64,
                1 => self.acked_features = (self.acked_features & 0xffff_ffff) | ((v as u64) << 32),
                _ => self.bad(),
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => match self.queue() {
                Some(q) => q.set_size(v as u16),
                None => self.bad(),
            },
            reg::QUEUE_READY => match self.queue() {
                Some(q) => q.set_ready(v == 1),
                None => self.bad(),
            },
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                let Some(q) = self.queue() else {
                    self.bad();
                    return;
                };
                let (lo, hi) = if offset % 8 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !0x7 {
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd swallows this write; when it does not (a write of
                // another width), forward it by hand.
                match self.kicks.get(v as usize) {
                    Some(k) => {
                        let _ = k.write(1);
                    }
                    None => self.bad(),
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.set_status(v),
            _ => self.bad(),
        }
    }
}
