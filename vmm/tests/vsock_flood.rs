//! The vsock device against a hostile guest, driven through its real virtio-mmio transport
//! with rings this test writes as a driver would: a guest that floods connection requests
//! and never posts receive buffers, and a guest that opens more connections than a VM may
//! hold. What the device keeps for the guest stays bounded, the excess is refused and
//! counted, and the device still serves afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use enclave_vmm::bus::BusDevice;
use enclave_vmm::devices::virtio::mmio::MmioTransport;
use enclave_vmm::devices::virtio::vsock::{Vsock, MAX_CONNECTIONS, MAX_RX_CONTROL};
use enclave_vmm::devices::virtio::Interrupt;
use enclave_vmm::metrics::Metrics;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QSIZE: u16 = 16;
const RXQ: u32 = 0;
const TXQ: u32 = 1;

/// Queue i's rings: descriptors at 0x1000 + i * 0x3000, avail 0x1000 later, used after.
fn base(q: u32) -> u64 {
    0x1000 + u64::from(q) * 0x3000
}

struct Guest {
    mem: GuestMemoryMmap,
    vsock: Vsock,
    /// Kept alive: the activated device's transport.
    _transport: MmioTransport,
    kicks: Vec<EventFd>,
    metrics: Arc<Metrics>,
    /// Next avail index per queue.
    avail: [u16; 3],
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// A device brought up the way a driver does (status, features, three queues).
    fn new() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let metrics = Arc::new(Metrics::default());
        let vsock = Vsock::new(3, &path, metrics.clone()).unwrap();
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        vsock.register_kicks(&kicks).unwrap();
        let ours = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
        let irq = Arc::new(Interrupt::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            metrics.clone(),
        ));
        let mut transport = MmioTransport::new(
            Box::new(Vsock(vsock.0.clone())),
            mem.clone(),
            ours,
            irq,
            metrics.clone(),
        )
        .unwrap();
        let mut w = |off: u64, v: u32| transport.write(off, &v.to_le_bytes());
        w(0x70, 0);
        w(0x70, 1);
        w(0x70, 3);
        w(0x24, 1);
        w(0x20, 1); // VIRTIO_F_VERSION_1
        w(0x70, 11);
        for q in 0..3u32 {
            w(0x30, q);
            w(0x38, u32::from(QSIZE));
            w(0x80, base(q) as u32);
            w(0x90, (base(q) + 0x1000) as u32);
            w(0xa0, (base(q) + 0x2000) as u32);
            w(0x44, 1);
        }
        w(0x70, 15);
        Guest {
            mem,
            vsock,
            _transport: transport,
            kicks,
            metrics,
            avail: [0; 3],
            path,
            _dir: dir,
        }
    }

    /// Makes descriptors `0..bufs.len()` of queue `q` available (buffer address, length,
    /// device-writable or not) and kicks the device.
    fn offer(&mut self, q: u32, bufs: &[(u64, u32, bool)]) {
        let b = base(q);
        for (j, (addr, len, writable)) in bufs.iter().enumerate() {
            let d = b + 16 * j as u64;
            self.mem.write_obj(*addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
            let flags: u16 = if *writable { 2 } else { 0 };
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            let slot = (self.avail[q as usize] % QSIZE) as u64;
            self.mem
                .write_obj(j as u16, GuestAddress(b + 0x1000 + 4 + 2 * slot))
                .unwrap();
            self.avail[q as usize] = self.avail[q as usize].wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail[q as usize], GuestAddress(b + 0x1000 + 2))
            .unwrap();
        self.kicks[q as usize].write(1).unwrap();
        self.vsock.process();
    }

    /// Sends `n` connection requests from consecutive guest ports to host port `port`, 16 a
    /// kick, never posting a receive buffer.
    fn flood_requests(&mut self, first_src: u32, n: u32, port: u32) {
        let mut sent = 0;
        while sent < n {
            let batch = (n - sent).min(u32::from(QSIZE));
            let bufs: Vec<(u64, u32, bool)> = (0..batch)
                .map(|j| {
                    let at = 0x20000 + 64 * u64::from(j);
                    let mut h = [0u8; 44];
                    h[0..8].copy_from_slice(&3u64.to_le_bytes()); // src_cid
                    h[8..16].copy_from_slice(&2u64.to_le_bytes()); // dst_cid
                    h[16..20].copy_from_slice(&(first_src + sent + j).to_le_bytes());
                    h[20..24].copy_from_slice(&port.to_le_bytes());
                    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // STREAM
                    h[30..32].copy_from_slice(&1u16.to_le_bytes()); // REQUEST
                    h[36..40].copy_from_slice(&65536u32.to_le_bytes()); // buf_alloc
                    self.mem.write_slice(&h, GuestAddress(at)).unwrap();
                    (at, 44, false)
                })
                .collect();
            self.offer(TXQ, &bufs);
            sent += batch;
        }
    }

    /// The used index of queue `q`: how many buffers the device has returned.
    fn used(&self, q: u32) -> u16 {
        self.mem
            .read_obj(GuestAddress(base(q) + 0x2000 + 2))
            .unwrap()
    }
}

#[test]
fn a_request_flood_without_receive_buffers_keeps_the_control_queue_bounded() {
    let mut g = Guest::new();
    let n = (MAX_RX_CONTROL as u32) * 4;
    // Port 7777 has no listener: every request is answered with a reset the guest never
    // takes.
    g.flood_requests(10_000, n, 7777);
    let (conns, pending, control) = g.vsock.backlog();
    assert_eq!((conns, pending), (0, 0));
    assert!(
        control <= MAX_RX_CONTROL,
        "{control} control packets queued"
    );
    let dropped = g.metrics.vsock_control_dropped.load(Ordering::Relaxed);
    assert_eq!(
        dropped,
        u64::from(n) - MAX_RX_CONTROL as u64,
        "dropped and counted"
    );
    assert_eq!(g.used(TXQ), n as u16, "every request was consumed");

    // The device still serves: once the guest posts receive buffers, the queued resets
    // come out.
    let rx: Vec<(u64, u32, bool)> = (0..QSIZE)
        .map(|j| (0x40000 + 0x1000 * u64::from(j), 0x1000, true))
        .collect();
    g.offer(RXQ, &rx);
    assert_eq!(
        g.used(RXQ),
        QSIZE,
        "the device fills every posted receive buffer"
    );
    assert_eq!(g.vsock.backlog().2, control - usize::from(QSIZE));
}

#[test]
fn connections_past_the_per_vm_limit_are_refused_and_counted() {
    let mut g = Guest::new();
    // A host service on port 5000 that accepts everything and never reads.
    let listener = UnixListener::bind(format!("{}_5000", g.path.display())).unwrap();
    let held = std::thread::spawn(move || {
        let mut streams = Vec::new();
        for s in listener.incoming() {
            match s {
                Ok(s) => streams.push(s),
                Err(_) => break,
            }
            if streams.len() == MAX_CONNECTIONS {
                break;
            }
        }
        streams
    });
    // Receive buffers in between so responses do not pile up against the control limit.
    let rx: Vec<(u64, u32, bool)> = (0..QSIZE)
        .map(|j| (0x40000 + 0x1000 * u64::from(j), 0x1000, true))
        .collect();
    let extra = 200u32;
    let total = MAX_CONNECTIONS as u32 + extra;
    let mut sent = 0;
    while sent < total {
        let batch = (total - sent).min(u32::from(QSIZE));
        g.flood_requests(20_000 + sent, batch, 5000);
        g.offer(RXQ, &rx);
        sent += batch;
    }
    let (conns, _, _) = g.vsock.backlog();
    assert_eq!(conns, MAX_CONNECTIONS, "connections held");
    let refused = g.metrics.vsock_conn_refused.load(Ordering::Relaxed);
    assert_eq!(refused, u64::from(extra), "refused and counted");
    assert_eq!(
        g.metrics.vsock_connections.load(Ordering::Relaxed),
        MAX_CONNECTIONS as u64
    );
    assert_eq!(held.join().unwrap().len(), MAX_CONNECTIONS);
}

/// A host service that never accepts, with a backlog of one: the guest's connection
/// requests past what the backlog holds are refused at once (RST), and the device's event
/// loop never waits in `connect` (before 2026-11-26 the second request blocked the VMM's
/// whole event loop, serial and every device with it, until the service accepted).
#[test]
fn a_host_service_that_never_accepts_does_not_block_the_device() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut g = Guest::new();
        let listener = UnixListener::bind(format!("{}_6000", g.path.display())).unwrap();
        // SAFETY: listen() again on our own socket, to shrink its backlog to one.
        let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 1) };
        assert_eq!(rc, 0);
        let rx_bufs: Vec<(u64, u32, bool)> = (0..QSIZE)
            .map(|j| (0x40000 + 0x1000 * u64::from(j), 0x1000, true))
            .collect();
        g.offer(RXQ, &rx_bufs);
        g.flood_requests(30_000, 8, 6000);
        let (conns, pending, _) = g.vsock.backlog();
        tx.send((conns, pending, g.used(TXQ))).unwrap();
        drop(listener);
    });
    let (conns, pending, used) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the device blocked on a host service that never accepts");
    assert_eq!(used, 8, "every request was consumed");
    assert!(
        conns + pending < 8,
        "requests past the backlog are refused, not held: {conns} connections"
    );
}
