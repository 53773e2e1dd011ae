//! The vhost-user-net backend: the guest's tx queue to the tap, the tap to the guest's rx
//! queue. Descriptor chains come from the guest and are validated by virtio-queue's
//! Reader/Writer (addresses inside guest memory, lengths without overflow); a bad chain is
//! returned unused and counted, never a crash.
//!
//! Every frame, both ways, is decided by the [`Gate`] on netd's own copy of it (guest
//! memory can change under us, so it is read once); only a passing frame moves on. No
//! offloads are negotiated, so frames are whole and checksummed, and the virtio-net header
//! is rewritten to all zeros both ways: a guest's header flags never reach the host kernel.

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

use crate::gate::Gate;
use enclave_netd::tap::{self, VNET_HDR_LEN};
use enclave_netfilter::matcher::Direction;

/// Queue indexes.
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Epoll token of the tap (0..=2 are the queues and the library's exit event).
pub const TAP_TOKEN: u64 = 3;
/// Largest frame with its header (no TSO: one MTU-sized frame per buffer).
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Receive offloads: the guest takes frames with a partial checksum and TSO super-frames.
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const GUEST_TSO6: u64 = 1 << 8;
/// `virtio_net_hdr` without `num_buffers` (legacy drivers without MRG_RXBUF).
const LEGACY_HDR_LEN: usize = 10;

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

/// Writes one frame (with its virtio-net header) to the tap: true if it went, false if the
/// tap's queue was full (the frame is dropped, as a full NIC ring would drop it).
fn tap_send(tap: &mut File, b: &[u8]) -> io::Result<bool> {
    match tap.write(b) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
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
    /// Frames from the guest the policy dropped.
    pub tx_denied: AtomicU64,
    /// Frames to the guest the policy dropped.
    pub rx_denied: AtomicU64,
}

/// The backend state.
pub struct NetBackend {
    tap: File,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    /// The guest's virtio-net header: 12 bytes with VIRTIO_F_VERSION_1, 10 without (a
    /// legacy driver, e.g. behind QEMU's legacy virtio-mmio).
    hdr_len: usize,
    /// Receive offloads in use: the tap's header (made by the host kernel) goes to the guest.
    rx_offloads: bool,
    /// The length of a frame in `rx_buf`, read from the tap and decided, that did not fit
    /// the guest's buffers yet.
    pending: Option<usize>,
    /// Guest → tap frames.
    buf: Vec<u8>,
    /// Tap → guest frames (apart from `buf`, so a pending frame survives tx work).
    rx_buf: Vec<u8>,
    /// Counters, shared with whoever reports them.
    pub stats: Arc<Stats>,
    /// The decision on every frame.
    pub gate: Gate,
    /// Frames netd made for the guest (TCP resets of cut connections), sent before the
    /// tap's next frame; at most [`TO_GUEST_MAX`].
    to_guest: std::collections::VecDeque<Vec<u8>>,
}

/// Frames netd queues for the guest at most (more are dropped: resets are a courtesy).
const TO_GUEST_MAX: usize = 64;

impl NetBackend {
    /// A backend moving frames between the guest and `tap`, each decided by `gate`.
    pub fn new(tap: File, gate: Gate) -> Self {
        NetBackend {
            tap,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            event_idx: false,
            hdr_len: VNET_HDR_LEN,
            rx_offloads: false,
            pending: None,
            buf: vec![0; MAX_FRAME],
            rx_buf: vec![0; MAX_FRAME],
            stats: Arc::default(),
            gate,
            to_guest: std::collections::VecDeque::new(),
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
            // The guest's header (10 or 12 bytes) lands so that the frame starts at
            // VNET_HDR_LEN, where the tap's 12-byte header ends.
            let off = VNET_HDR_LEN - self.hdr_len;
            let copied = chain.reader(&mem).ok().and_then(|mut r| {
                let n = r.available_bytes();
                if !(self.hdr_len + 14..=MAX_FRAME - off).contains(&n) {
                    return None;
                }
                r.read_exact(&mut self.buf[off..off + n])
                    .ok()
                    .map(|_| off + n)
            });
            match copied {
                Some(n)
                    if !self
                        .gate
                        .pass(Direction::Egress, &self.buf[VNET_HDR_LEN..n]) =>
                {
                    self.stats.tx_denied.fetch_add(1, Ordering::Relaxed);
                    let (back, on) = self.gate.take_resets();
                    if let Some(f) = back {
                        self.queue_to_guest(f);
                    }
                    if let Some(f) = on {
                        self.write_tap(&f)?;
                    }
                }
                Some(n) => {
                    self.buf[..VNET_HDR_LEN].fill(0);
                    if tap_send(&mut self.tap, &self.buf[..n])? {
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
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

    fn queue_to_guest(&mut self, frame: Vec<u8>) {
        if self.to_guest.len() < TO_GUEST_MAX && frame.len() + VNET_HDR_LEN <= MAX_FRAME {
            self.to_guest.push_back(frame);
        }
    }

    /// Writes a frame netd made to the tap (a reset of a cut connection, to the peer).
    fn write_tap(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut b = vec![0u8; VNET_HDR_LEN + frame.len()];
        b[VNET_HDR_LEN..].copy_from_slice(frame);
        tap_send(&mut self.tap, &b).map(|_| ())
    }

    /// The guest's header for the frame in `rx_buf`: the host kernel's (receive offloads
    /// in use, as the guest negotiated them) or zeros.
    fn rx_header(&mut self, from_tap: bool) {
        if self.rx_offloads && from_tap {
            // Without MRG_RXBUF num_buffers is 1; a legacy header is its first 10 bytes,
            // moved up to sit right before the frame.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            if self.hdr_len == LEGACY_HDR_LEN {
                self.rx_buf.copy_within(0..LEGACY_HDR_LEN, 2);
            }
        } else {
            // No offloads, or a frame netd made whole (checksums filled in): all zeros.
            self.rx_buf[..VNET_HDR_LEN].fill(0);
        }
    }

    /// Tap → guest, while the guest has buffers.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut used = false;
        loop {
            let n = match self.pending.take() {
                Some(n) => n,
                None if !self.to_guest.is_empty() => {
                    let Some(f) = self.to_guest.pop_front() else {
                        break;
                    };
                    let n = VNET_HDR_LEN + f.len();
                    self.rx_buf[VNET_HDR_LEN..n].copy_from_slice(&f);
                    self.rx_header(false);
                    n
                }
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(0) => break,
                    Ok(n) if n <= VNET_HDR_LEN => continue,
                    Ok(n) => {
                        if !self
                            .gate
                            .pass(Direction::Ingress, &self.rx_buf[VNET_HDR_LEN..n])
                        {
                            self.stats.rx_denied.fetch_add(1, Ordering::Relaxed);
                            let (back, on) = self.gate.take_resets();
                            if let Some(f) = back {
                                self.write_tap(&f)?;
                            }
                            if let Some(f) = on {
                                self.queue_to_guest(f);
                            }
                            continue;
                        }
                        // The host kernel's header (checksum and segmentation of a frame
                        // netd decided as a whole), as the guest negotiated it.
                        self.rx_header(true);
                        n
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                },
            };
            let chain = next_chain(vring, &mem);
            let Some(chain) = chain else {
                // No buffer: keep the frame (in rx_buf) until the guest adds one (its kick).
                self.pending = Some(n);
                break;
            };
            let head = chain.head_index();
            // The frame with the guest's header length (its tail of the tap's).
            let out = &self.rx_buf[VNET_HDR_LEN - self.hdr_len..n];
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= out.len() => {
                    w.write_all(out).ok().map(|_| out.len())
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
        // VHOST_USER_F_PROTOCOL_FEATURES: QEMU 7.2 refuses to start vhost-user-net without
        // it (its early ring enables are absorbed by the relay, proxy.rs).
        // No VIRTIO_RING_F_EVENT_IDX: a Linux guest then kicks for every rx buffer it adds,
        // which the tap path needs to resume delivery after the guest ran out of buffers.
        // No transmit offloads (CSUM, HOST_TSO/UFO): the matcher decides whole, checksummed
        // frames from the guest, and a guest cannot make the host kernel segment or
        // checksum for it.
        // Receive offloads (GUEST_CSUM, GUEST_TSO4/6) are offered: those frames come from
        // the host kernel (a peer's TSO segment through the bridge), and netd decides each
        // as one frame; the guest is spared segmenting them one MTU at a time.
        VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }
    fn acked_features(&mut self, features: u64) {
        self.hdr_len = if features & VIRTIO_F_VERSION_1 != 0 {
            VNET_HDR_LEN
        } else {
            LEGACY_HDR_LEN
        };
        // The tap hands over exactly the offloaded frames the guest can take.
        let mut flags = 0;
        if features & GUEST_CSUM != 0 {
            flags |= tap::TUN_F_CSUM;
            if features & GUEST_TSO4 != 0 {
                flags |= tap::TUN_F_TSO4;
            }
            if features & GUEST_TSO6 != 0 {
                flags |= tap::TUN_F_TSO6;
            }
        }
        self.rx_offloads = match tap::set_offload(&self.tap, flags) {
            Ok(()) => flags != 0,
            Err(e) => {
                eprintln!("enclave-netd: tap offloads {flags:#x}: {e}; receive offloads off");
                let _ = tap::set_offload(&self.tap, 0);
                false
            }
        };
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
                    // Resets netd made for the guest go out now, not with the tap's next frame.
                    if !self.to_guest.is_empty() {
                        self.process_rx(rx)?;
                    }
                    break;
                }
            },
            // The guest added rx buffers, or the tap has frames: either way, move what fits.
            _ => self.process_rx(rx)?,
        }
        Ok(())
    }
}
