//! virtio: the MMIO transport, the device trait, and the devices (vsock in the VMM; net
//! and fs through vhost-user backends).

pub mod mmio;
pub mod vhost_user;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::Metrics;

/// VIRTIO_F_VERSION_1: the only virtio we speak (no legacy layouts).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: socket device (vsock).
pub const TYPE_VSOCK: u32 = 19;
/// Device type: file system (virtio-fs).
pub const TYPE_FS: u32 = 26;

/// InterruptStatus bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: an irqfd into the in-kernel IOAPIC plus the status register
/// the driver reads in its handler.
pub struct Interrupt {
    /// Bits of InterruptStatus.
    pub status: AtomicU32,
    /// Wired to the device's GSI with KVM_IRQFD.
    pub irqfd: EventFd,
    metrics: Arc<Metrics>,
}

impl Interrupt {
    /// An interrupt line for a GSI's irqfd.
    pub fn new(irqfd: EventFd, metrics: Arc<Metrics>) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            metrics,
        }
    }

    /// Raises the interrupt with `bit` set in InterruptStatus.
    pub fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.metrics.interrupts.fetch_add(1, Ordering::Relaxed);
        // Failing to write an eventfd means its counter is saturated: the interrupt is
        // already pending.
        let _ = self.irqfd.write(1);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in index order.
    pub queues: Vec<Queue>,
    /// The eventfd each queue's notify register kicks (registered as a KVM ioeventfd).
    pub kicks: Vec<EventFd>,
    /// The interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// The largest size of each queue (the number of queues is the length).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device; an error makes the transport flag DEVICE_NEEDS_RESET.
    fn activate(&mut self, a: Activation) -> Result<(), String>;
    /// Stops the device after a driver reset (status 0).
    fn reset(&mut self);
    /// True for vhost-user devices, whose backend signals the irqfd without setting
    /// InterruptStatus (the transport then reports the vring bit on every read).
    fn interrupt_status_is_implicit(&self) -> bool {
        false
    }
}

/// Copies bytes of device config space at `offset` into `data` (zero beyond the end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
