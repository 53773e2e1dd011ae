//! The vhost-user-net backend: the guest's tx queue to the tap, the tap to the guest's rx
//! queue. Descriptor chains come from the guest and are validated by virtio-queue's
//! Reader/Writer (addresses inside guest memory, lengths without overflow); a bad chain is
//! returned unused and counted, never a crash.
//!
//! Where the zone policy will decide each frame (enclave-netd's enforcing mode) is marked
//! `DECIDE`: today every frame is forwarded.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::DescriptorChain;
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::tap::VNET_HDR_LEN;

/// Queue indexes.
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Epoll token of the tap (0..=2 are the queues and the library's exit event).
pub const TAP_TOKEN: u64 = 3;
/// Largest frame with its header (no TSO: one MTU-sized frame per buffer).
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The next available descriptor chain of a queue, if any.
fn next_chain(
    vring: &VringRwLock,
    mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
) -> Option<DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>> {
    vring
        .get_mut()
        .get_queue_mut()
        .iter(mem.clone())
        .ok()
        .and_then(|mut it| it.next())
}

/// A virtqueue error as an io::Error (the library's handler wants io results).
fn queue_err(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e:?}"))
}

/// Counters.
#[derive(Default, Debug)]
pub struct Stats {
    /// Frames from the guest written to the tap.
    pub tx_frames: AtomicU64,
    /// Frames from the tap written to the guest.
    pub rx_frames: AtomicU64,
    /// Chains rejected as malformed.
    pub bad_chains: AtomicU64,
    /// Frames from the tap dropped because the guest had no buffer big enough.
    pub rx_dropped: AtomicU64,
}

/// The backend state.
pub struct NetBackend {
    tap: File,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    /// A frame read from the tap that did not fit the guest's buffers yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    /// Counters, shared with whoever reports them.
    pub stats: Arc<Stats>,
}

impl NetBackend {
    /// A backend moving frames between the guest and `tap`.
    pub fn new(tap: File) -> Self {
        NetBackend {
            tap,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            event_idx: false,
            pending: None,
            buf: vec![0; MAX_FRAME],
            stats: Arc::default(),
        }
    }

    /// Guest → tap.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.memory();
        loop {
            let chain = next_chain(vring, &mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            // Copy the frame out of guest memory first: the guest can change it under us.
            let copied = chain.reader(&mem).ok().and_then(|mut r| {
                let n = r.available_bytes();
                if !(VNET_HDR_LEN + 14..=MAX_FRAME).contains(&n) {
                    return None;
                }
                r.read_exact(&mut self.buf[..n]).ok().map(|_| n)
            });
            match copied {
                Some(n) => {
                    // DECIDE: enclave-netd's policy check goes here, on self.buf[VNET_HDR_LEN..n].
                    match self.tap.write(&self.buf[..n]) {
                        Ok(_) => {
                            self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        }
                        // A full tap queue drops the frame, as a full NIC ring would.
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            }
            vring.add_used(head, 0).map_err(queue_err)?;
        }
        if vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Tap → guest, while the guest has buffers.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut used = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => self.buf[..n].to_vec(),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                },
            };
            // DECIDE: enclave-netd's policy check goes here, on frame[VNET_HDR_LEN..].
            let chain = next_chain(vring, &mem);
            let Some(chain) = chain else {
                // No buffer: keep the frame until the guest adds one (its rx kick).
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => {
                    w.write_all(&frame).ok().map(|_| frame.len())
                }
                _ => None,
            };
            match written {
                Some(n) => {
                    vring.add_used(head, n as u32).map_err(queue_err)?;
                    self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    vring.add_used(head, 0).map_err(queue_err)?;
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            used = true;
        }
        if used && vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        1024
    }
    fn features(&self) -> u64 {
        // No VHOST_USER_F_PROTOCOL_FEATURES: nothing optional is needed (one queue pair,
        // config space in the VMM), and without it rings start enabled, which QEMU's
        // vhost-user-net relies on (it enables rings before acking protocol features).
        // No VIRTIO_RING_F_EVENT_IDX: a Linux guest then kicks for every rx buffer it adds,
        // which the tap path needs to resume delivery after the guest ran out of buffers.
        VIRTIO_F_VERSION_1
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }
    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RXQ), vrings.get(TXQ)) else {
            return Ok(());
        };
        match device_event as usize {
            TXQ => loop {
                // With EVENT_IDX, re-check after enabling notifications (no lost kicks).
                if self.event_idx {
                    tx.disable_notification().map_err(queue_err)?;
                }
                self.process_tx(tx)?;
                if !self.event_idx || !tx.enable_notification().map_err(queue_err)? {
                    break;
                }
            },
            // The guest added rx buffers, or the tap has frames: either way, move what fits.
            _ => self.process_rx(rx)?,
        }
        Ok(())
    }
}
