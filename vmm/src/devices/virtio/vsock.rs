//! virtio-vsock in the VMM, with Firecracker's hybrid vsock on the host side:
//! - host → guest: connect to `uds_path`, write `CONNECT <port>\n`, read `OK <hostport>\n`,
//!   then bytes flow;
//! - guest → host port P: the VMM connects to `<uds_path>_P`.
//!
//! Everything in a packet header comes from the guest: CIDs are checked (a guest cannot
//! claim another CID), lengths bounded, unknown connections answered with RST, and credit
//! accounting done with wrapping arithmetic. A bad packet is counted and dropped.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, VirtioDevice, INT_VRING, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::bus::lock;
use crate::metrics::Metrics;

/// The host's CID.
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// Largest payload accepted from the guest in one packet (Linux sends at most 64 KiB).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Our receive buffer per connection, advertised to the guest.
const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// First local port for host-initiated connections.
const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Connections one VM may hold (guest- and host-initiated, pending ones included), as
/// Firecracker caps them: each is a host socket and buffers.
pub const MAX_CONNECTIONS: usize = 1023;
/// Control packets (responses, resets, credit updates) waiting for the guest to post
/// receive buffers. A guest that floods requests and never posts buffers would otherwise
/// grow this without end; past it, packets are dropped (counted) and a connection whose
/// packet is dropped is closed on the host side.
pub const MAX_RX_CONTROL: usize = 2 * MAX_CONNECTIONS;

/// The packet header (virtio 1.2, 5.10.6).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

// SAFETY: PacketHeader is plain old data (integers only, packed, no padding), so any byte
// pattern is a valid value.
unsafe impl ByteValued for PacketHeader {}

/// Size of the header on the wire.
pub const HDR_LEN: usize = std::mem::size_of::<PacketHeader>();

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum ConnState {
    /// Host connected and we wait for its `CONNECT` line.
    AwaitingConnectLine,
    /// REQUEST sent to the guest; waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    local_port: u32,
    peer_port: u32,
    /// Bytes from the guest not yet written to the host stream.
    to_host: VecDeque<u8>,
    /// Bytes we forwarded to the host (our fwd_cnt).
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Partial CONNECT line.
    line: Vec<u8>,
    /// Epoll interest currently registered.
    interest: EventSet,
    host_eof: bool,
}

impl Conn {
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// Tokens in the device's own epoll.
const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_EV_KICK: u64 = 2;
const TOKEN_LISTENER: u64 = 3;
/// Stream tokens are `TOKEN_STREAM_BASE + fd`.
const TOKEN_STREAM_BASE: u64 = 16;

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    kicks: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
}

/// State shared between the transport (activation, on a vCPU thread) and the event loop.
pub struct VsockState {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    active: Option<Active>,
    /// Connections by (local port, peer port).
    conns: HashMap<(u32, u32), Conn>,
    /// Host connections waiting for their CONNECT line, by fd.
    pending: HashMap<RawFd, Conn>,
    /// Control packets waiting for a guest rx buffer.
    rx_control: VecDeque<PacketHeader>,
    next_port: u32,
    /// Read buffer for host → guest data.
    scratch: Vec<u8>,
    metrics: Arc<Metrics>,
}

/// The vsock device as the transport sees it.
pub struct Vsock(pub Arc<Mutex<VsockState>>);

impl Vsock {
    /// Creates the device and binds the host socket at `uds_path` (replacing a stale one).
    pub fn new(cid: u64, uds_path: &Path, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        let state = VsockState {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            active: None,
            conns: HashMap::new(),
            pending: HashMap::new(),
            rx_control: VecDeque::new(),
            next_port: EPHEMERAL_PORT_BASE,
            scratch: Vec::new(),
            metrics,
        };
        Ok(Vsock(Arc::new(Mutex::new(state))))
    }

    /// (connections, pending host connections, queued control packets): the device state a
    /// guest can make grow, all bounded.
    pub fn backlog(&self) -> (usize, usize, usize) {
        let s = lock(&self.0);
        (s.conns.len(), s.pending.len(), s.rx_control.len())
    }

    /// The fd the event loop waits on (the device's own epoll).
    pub fn epoll_fd(&self) -> RawFd {
        lock(&self.0).epoll.as_raw_fd()
    }

    /// Registers the queue kick eventfds (before activation: kicks are then drained and
    /// ignored).
    pub fn register_kicks(&self, kicks: &[EventFd]) -> std::io::Result<()> {
        let s = lock(&self.0);
        for (i, k) in kicks.iter().enumerate() {
            s.epoll.ctl(
                ControlOperation::Add,
                k.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(())
    }

    /// Handles whatever is ready; called by the event loop when the epoll fd is readable.
    pub fn process(&self) {
        lock(&self.0).process();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&lock(&self.0).cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let mut queues = a.queues.into_iter();
        let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err("vsock needs 3 queues".into());
        };
        let mut s = lock(&self.0);
        s.active = Some(Active {
            mem: a.mem,
            rxq,
            txq,
            kicks: a.kicks,
            interrupt: a.interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        let mut s = lock(&self.0);
        s.active = None;
        let conns: Vec<_> = s.conns.drain().map(|(_, c)| c).collect();
        for c in conns {
            let _ = s.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        s.rx_control.clear();
    }
}

impl VsockState {
    fn header(&self, local_port: u32, peer_port: u32, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local_port,
            dst_port: peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn control(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
        if self.rx_control.len() >= MAX_RX_CONTROL {
            self.metrics
                .vsock_control_dropped
                .fetch_add(1, Ordering::Relaxed);
            // The guest will not hear of this connection's state: end it here, so that
            // host and guest agree it is gone (its next packet gets a reset once the queue
            // drains).
            if let Some(c) = self.conns.remove(&(local_port, peer_port)) {
                self.drop_fd(&c.stream);
            }
            return;
        }
        let mut h = self.header(local_port, peer_port, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&(local_port, peer_port)) {
            h.fwd_cnt = c.fwd_cnt;
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        self.rx_control.push_back(h);
    }

    fn process(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_RX_KICK | TOKEN_TX_KICK | TOKEN_EV_KICK => {
                    if let Some(a) = &self.active {
                        if let Some(k) = a.kicks.get(ev.data() as usize) {
                            let _ = k.read();
                        }
                    } else {
                        // Not active yet: nothing to do but keep the eventfd from firing.
                        continue;
                    }
                    self.metrics.queue_kicks.fetch_add(1, Ordering::Relaxed);
                    if ev.data() == TOKEN_TX_KICK {
                        self.process_tx();
                    }
                }
                TOKEN_LISTENER => self.accept(),
                t => self.stream_event((t - TOKEN_STREAM_BASE) as RawFd, ev.event_set()),
            }
        }
        self.flush_rx();
    }

    /// Registers a host stream for reading and makes its connection state.
    fn watch(
        &self,
        stream: UnixStream,
        state: ConnState,
        local_port: u32,
        peer_port: u32,
    ) -> Option<Conn> {
        let fd = stream.as_raw_fd();
        let ev = EpollEvent::new(EventSet::IN, TOKEN_STREAM_BASE + fd as u64);
        self.epoll.ctl(ControlOperation::Add, fd, ev).ok()?;
        Some(Conn {
            stream,
            state,
            local_port,
            peer_port,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            line: Vec::new(),
            interest: EventSet::IN,
            host_eof: false,
        })
    }

    /// Whether the VM already holds [`MAX_CONNECTIONS`].
    fn at_capacity(&self) -> bool {
        self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.at_capacity() {
                // Dropped: the host side sees the connection close.
                self.metrics
                    .vsock_conn_refused
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            let Some(conn) = self.watch(stream, ConnState::AwaitingConnectLine, 0, 0) else {
                continue;
            };
            self.pending.insert(fd, conn);
        }
    }

    fn drop_fd(&mut self, stream: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    fn stream_event(&mut self, fd: RawFd, set: EventSet) {
        if let Some(mut c) = self.pending.remove(&fd) {
            // Reading the CONNECT line, a byte at a time so no data after it is consumed.
            let mut b = [0u8; 1];
            loop {
                match c.stream.read(&mut b) {
                    Ok(1) if b[0] == b'\n' => break,
                    Ok(1) if c.line.len() < MAX_CONNECT_LINE => c.line.push(b[0]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.pending.insert(fd, c);
                        return;
                    }
                    _ => {
                        self.drop_fd(&c.stream);
                        return;
                    }
                }
            }
            let port = std::str::from_utf8(&c.line)
                .ok()
                .and_then(|l| l.strip_prefix("CONNECT "))
                .and_then(|p| p.trim().parse::<u32>().ok());
            let Some(port) = port else {
                let _ = c.stream.write_all(b"ERROR bad CONNECT line\n");
                self.drop_fd(&c.stream);
                return;
            };
            if self.active.is_none() {
                self.drop_fd(&c.stream);
                return;
            }
            let local = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(EPHEMERAL_PORT_BASE);
            c.local_port = local;
            c.peer_port = port;
            c.state = ConnState::Connecting;
            // Do not read from the host until the guest accepts.
            self.set_interest(&mut c, EventSet::empty());
            self.conns.insert((local, port), c);
            self.metrics
                .vsock_connections
                .fetch_add(1, Ordering::Relaxed);
            self.control(local, port, OP_REQUEST, 0);
            return;
        }
        let Some(key) = self
            .conns
            .iter()
            .find(|(_, c)| c.stream.as_raw_fd() == fd)
            .map(|(k, _)| *k)
        else {
            return;
        };
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Hang-ups are reported whatever the interest: stop polling this stream (the
            // pump still drains what is left and sees the EOF) so it cannot spin the loop.
            if let Some(c) = self.conns.get_mut(&key) {
                c.host_eof = true;
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                c.interest = EventSet::empty();
                if c.state != ConnState::Established {
                    self.conns.remove(&key);
                    self.control(key.0, key.1, OP_RST, 0);
                }
            }
        }
        // Readable streams are read in flush_rx, when the guest has buffers for the data.
    }

    fn set_interest(&self, c: &mut Conn, set: EventSet) {
        if c.interest != set && !c.host_eof {
            let fd = c.stream.as_raw_fd();
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, TOKEN_STREAM_BASE + fd as u64),
            );
            c.interest = set;
        }
    }

    fn flush_to_host(&mut self, key: (u32, u32)) {
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_fd(&c.stream);
                    self.control(key.0, key.1, OP_RST, 0);
                    return;
                }
            }
        }
        let want = if c.to_host.is_empty() {
            c.interest - EventSet::OUT
        } else {
            c.interest | EventSet::OUT
        };
        self.set_interest(&mut c, want);
        let credit_due = c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CONN_BUF_ALLOC / 4;
        self.conns.insert(key, c);
        if credit_due {
            self.control(key.0, key.1, OP_CREDIT_UPDATE, 0);
        }
    }

    fn process_tx(&mut self) {
        loop {
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let mem = a.mem.clone();
            let Some(chain) = a.txq.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = match chain.reader(&mem) {
                Ok(mut r) => match r.read_obj::<PacketHeader>() {
                    Ok(h) if h.len <= MAX_PKT_PAYLOAD && r.available_bytes() >= h.len as usize => {
                        let mut payload = vec![0u8; h.len as usize];
                        r.read_exact(&mut payload).ok().map(|_| (h, payload))
                    }
                    _ => None,
                },
                Err(_) => None,
            };
            if let Some(a) = self.active.as_mut() {
                let _ = a.txq.add_used(&mem, head, 0);
            }
            match parsed {
                Some((h, payload)) => {
                    self.metrics
                        .vsock_tx_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .vsock_tx_bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    self.handle_guest_packet(h, payload);
                }
                None => {
                    self.metrics.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.notify(TXQ);
    }

    fn handle_guest_packet(&mut self, h: PacketHeader, payload: Vec<u8>) {
        let (src_cid, dst_cid, type_, op) = (h.src_cid, h.dst_cid, h.type_, h.op);
        if src_cid != self.cid || dst_cid != HOST_CID || type_ != TYPE_STREAM {
            self.metrics
                .vsock_bad_packets
                .fetch_add(1, Ordering::Relaxed);
            if op != OP_RST && type_ == TYPE_STREAM && src_cid == self.cid {
                self.control(h.dst_port, h.src_port, OP_RST, 0);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                self.control(key.0, key.1, OP_RST, 0);
                return;
            }
            if self.at_capacity() {
                self.metrics
                    .vsock_conn_refused
                    .fetch_add(1, Ordering::Relaxed);
                self.control(key.0, key.1, OP_RST, 0);
                return;
            }
            let dst_port = h.dst_port;
            let path = format!("{}_{}", self.uds_path.display(), dst_port);
            match connect_nonblocking(&path) {
                Ok(stream) => {
                    let Some(mut c) = self.watch(stream, ConnState::Established, key.0, key.1)
                    else {
                        self.control(key.0, key.1, OP_RST, 0);
                        return;
                    };
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    self.conns.insert(key, c);
                    self.metrics
                        .vsock_connections
                        .fetch_add(1, Ordering::Relaxed);
                    self.control(key.0, key.1, OP_RESPONSE, 0);
                }
                Err(_) => self.control(key.0, key.1, OP_RST, 0),
            }
            return;
        }
        let Some(mut c) = self.conns.remove(&key) else {
            if op != OP_RST {
                self.metrics
                    .vsock_bad_packets
                    .fetch_add(1, Ordering::Relaxed);
                self.control(key.0, key.1, OP_RST, 0);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match op {
            OP_RESPONSE if c.state == ConnState::Connecting => {
                let line = format!("OK {}\n", c.local_port);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.drop_fd(&c.stream);
                    self.control(key.0, key.1, OP_RST, 0);
                    return;
                }
                c.state = ConnState::Established;
                self.set_interest(&mut c, EventSet::IN);
            }
            OP_RW if c.state == ConnState::Established => {
                if c.to_host.len() + payload.len() > CONN_BUF_ALLOC as usize {
                    // The guest ignored our credit: that is a protocol violation.
                    self.metrics
                        .vsock_bad_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.drop_fd(&c.stream);
                    self.control(key.0, key.1, OP_RST, 0);
                    return;
                }
                c.to_host.extend(payload);
                self.conns.insert(key, c);
                self.flush_to_host(key);
                return;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                self.conns.insert(key, c);
                self.control(key.0, key.1, OP_CREDIT_UPDATE, 0);
                return;
            }
            OP_SHUTDOWN => {
                let flags = h.flags;
                if flags & SHUTDOWN_SEND != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                if flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.drop_fd(&c.stream);
                    self.control(key.0, key.1, OP_RST, 0);
                    return;
                }
            }
            OP_RST => {
                self.drop_fd(&c.stream);
                return;
            }
            _ => {
                self.metrics
                    .vsock_bad_packets
                    .fetch_add(1, Ordering::Relaxed);
                self.drop_fd(&c.stream);
                self.control(key.0, key.1, OP_RST, 0);
                return;
            }
        }
        self.conns.insert(key, c);
    }

    /// Fills guest rx buffers: control packets first, then data from readable streams, then
    /// the control packets pumping produced (credit requests, shutdowns).
    fn flush_rx(&mut self) {
        let mut used = false;
        for _ in 0..2 {
            while let Some(h) = self.rx_control.front().copied() {
                match self.write_rx(h, &[]) {
                    Some(ok) => {
                        self.rx_control.pop_front();
                        used |= ok;
                    }
                    None => break,
                }
            }
            if !self.rx_control.is_empty() {
                break;
            }
            let keys: Vec<_> = self
                .conns
                .iter()
                .filter(|(_, c)| c.state == ConnState::Established)
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                used |= self.pump_host_to_guest(key);
            }
        }
        if used {
            self.notify(RXQ);
        }
    }

    /// Reads from one host stream into guest rx buffers while credit and buffers last.
    fn pump_host_to_guest(&mut self, key: (u32, u32)) -> bool {
        // One 64 KiB buffer for the device's life, not one per connection per event.
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(MAX_PKT_PAYLOAD as usize, 0);
        let used = self.pump_into(key, &mut buf);
        self.scratch = buf;
        used
    }

    fn pump_into(&mut self, key: (u32, u32), buf: &mut [u8]) -> bool {
        let mut used = false;
        loop {
            let Some(c) = self.conns.get_mut(&key) else {
                return used;
            };
            let credit = c.peer_free() as usize;
            let Some(room) = self.rx_room() else {
                // No rx buffers: stop polling the stream until the guest adds some.
                if let Some(mut c) = self.conns.remove(&key) {
                    let keep = c.interest - EventSet::IN;
                    self.set_interest(&mut c, keep);
                    self.conns.insert(key, c);
                }
                return used;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                return used;
            };
            let want = credit.min(room.saturating_sub(HDR_LEN)).min(buf.len());
            if want == 0 {
                let keep = c.interest - EventSet::IN;
                if let Some(mut c) = self.conns.remove(&key) {
                    self.set_interest(&mut c, keep);
                    self.conns.insert(key, c);
                }
                if credit == 0 {
                    self.control(key.0, key.1, OP_CREDIT_REQUEST, 0);
                }
                return used;
            }
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    if let Some(c) = self.conns.remove(&key) {
                        self.drop_fd(&c.stream);
                    }
                    self.control(key.0, key.1, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    return used;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    let fwd_cnt = c.fwd_cnt;
                    let h = PacketHeader {
                        len: n as u32,
                        fwd_cnt,
                        ..self.header(key.0, key.1, OP_RW)
                    };
                    if self.write_rx(h, &buf[..n]) == Some(true) {
                        used = true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let want = c.interest | EventSet::IN;
                    if let Some(mut c) = self.conns.remove(&key) {
                        self.set_interest(&mut c, want);
                        self.conns.insert(key, c);
                    }
                    return used;
                }
                Err(_) => {
                    if let Some(c) = self.conns.remove(&key) {
                        self.drop_fd(&c.stream);
                    }
                    self.control(key.0, key.1, OP_RST, 0);
                    return used;
                }
            }
        }
    }

    /// Writable bytes in the next guest rx buffer, without consuming it.
    fn rx_room(&mut self) -> Option<usize> {
        let a = self.active.as_mut()?;
        let mem = a.mem.clone();
        let chain = a.rxq.pop_descriptor_chain(&mem)?;
        let room = chain
            .clone()
            .writer(&mem)
            .map(|w| w.available_bytes())
            .unwrap_or(0);
        a.rxq.go_to_previous_position();
        Some(room)
    }

    /// Writes one packet into the next rx buffer. None: no buffer; Some(false): the buffer
    /// was unusable (too small, bad addresses) and was returned empty.
    fn write_rx(&mut self, h: PacketHeader, payload: &[u8]) -> Option<bool> {
        let a = self.active.as_mut()?;
        let mem = a.mem.clone();
        let chain = a.rxq.pop_descriptor_chain(&mem)?;
        let head = chain.head_index();
        let ok = match chain.writer(&mem) {
            Ok(mut w) if w.available_bytes() >= HDR_LEN + payload.len() => {
                w.write_obj(h).is_ok() && w.write_all(payload).is_ok()
            }
            _ => false,
        };
        let len = if ok {
            (HDR_LEN + payload.len()) as u32
        } else {
            0
        };
        let _ = a.rxq.add_used(&mem, head, len);
        if ok {
            self.metrics
                .vsock_rx_packets
                .fetch_add(1, Ordering::Relaxed);
            self.metrics
                .vsock_rx_bytes
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
        } else {
            self.metrics.bad_descriptors.fetch_add(1, Ordering::Relaxed);
        }
        Some(ok)
    }

    fn notify(&mut self, q: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mem = a.mem.clone();
        let queue = if q == RXQ { &mut a.rxq } else { &mut a.txq };
        if queue.needs_notification(&mem).unwrap_or(true) {
            a.interrupt.raise(INT_VRING);
        }
    }
}

/// Connects to a host service's socket without waiting: a Unix stream socket made
/// non-blocking before `connect` fails at once with `EAGAIN` when the listener's backlog is
/// full, where a blocking one would wait (the whole event loop with it) until the service
/// accepts. The stream is returned non-blocking.
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: socket() with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: connect on our own descriptor with a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(HDR_LEN, 44);
    }
}
