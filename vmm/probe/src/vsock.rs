//! The vsock check: connect to a host port and exchange data; then accept a connection the
//! host opens (through the VMM's hybrid vsock socket) and echo in upper case.

use crate::io::{print, print_bytes, print_hex, println, wait_for};
use crate::virtio::{self, Device, Queue, QSIZE};
use crate::{check, param, parse_u64};

const HOST_CID: u64 = 2;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const HDR: usize = 44;
const BUF: usize = 4096;
const RX_BUFS: usize = QSIZE;

#[repr(C, align(4096))]
struct Buffers([[u8; BUF]; RX_BUFS + 2]);
static mut BUFS: Buffers = Buffers([[0; BUF]; RX_BUFS + 2]);

fn buf(i: usize) -> *mut u8 {
    // SAFETY: single-threaded; index within the static array.
    unsafe { (&raw mut BUFS.0[i]) as *mut u8 }
}

#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn put(p: *mut u8, off: usize, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: p points at a BUF-sized static buffer and off + len <= HDR.
        unsafe { p.add(off + i).write_volatile(*b) };
    }
}
fn get<const N: usize>(p: *const u8, off: usize) -> [u8; N] {
    // SAFETY: as for put.
    core::array::from_fn(|i| unsafe { p.add(off + i).read_volatile() })
}

impl Hdr {
    fn write(&self, p: *mut u8) {
        put(p, 0, &self.src_cid.to_le_bytes());
        put(p, 8, &self.dst_cid.to_le_bytes());
        put(p, 16, &self.src_port.to_le_bytes());
        put(p, 20, &self.dst_port.to_le_bytes());
        put(p, 24, &self.len.to_le_bytes());
        put(p, 28, &1u16.to_le_bytes());
        put(p, 30, &self.op.to_le_bytes());
        put(p, 32, &self.flags.to_le_bytes());
        put(p, 36, &self.buf_alloc.to_le_bytes());
        put(p, 40, &self.fwd_cnt.to_le_bytes());
    }
    fn read(p: *const u8) -> Hdr {
        Hdr {
            src_cid: u64::from_le_bytes(get(p, 0)),
            dst_cid: u64::from_le_bytes(get(p, 8)),
            src_port: u32::from_le_bytes(get(p, 16)),
            dst_port: u32::from_le_bytes(get(p, 20)),
            len: u32::from_le_bytes(get(p, 24)),
            op: u16::from_le_bytes(get(p, 30)),
            flags: u32::from_le_bytes(get(p, 32)),
            buf_alloc: u32::from_le_bytes(get(p, 36)),
            fwd_cnt: u32::from_le_bytes(get(p, 40)),
        }
    }
}

struct Vsock {
    cid: u64,
    rx: Queue,
    tx: Queue,
    /// rx buffer index by descriptor head.
    rx_slot: [usize; QSIZE],
    fwd_cnt: u32,
}

const TX_HDR: usize = RX_BUFS;
const TX_DATA: usize = RX_BUFS + 1;

impl Vsock {
    fn post_rx(&mut self, slot: usize) {
        if let Some(head) = self.rx.add(&[(buf(slot) as u64, BUF as u32, true)]) {
            self.rx_slot[head as usize] = slot;
        }
    }

    fn send(&mut self, mut h: Hdr, data: &[u8]) -> bool {
        h.src_cid = self.cid;
        h.dst_cid = HOST_CID;
        h.len = data.len() as u32;
        h.buf_alloc = (BUF * RX_BUFS) as u32;
        h.fwd_cnt = self.fwd_cnt;
        h.write(buf(TX_HDR));
        put(buf(TX_DATA), 0, data);
        // Header and payload in two descriptors, as Linux sends them.
        let chain: &[(u64, u32, bool)] = &[(buf(TX_HDR) as u64, HDR as u32, false), (buf(TX_DATA) as u64, data.len() as u32, false)];
        let chain = if data.is_empty() { &chain[..1] } else { chain };
        if self.tx.add(chain).is_none() {
            return false;
        }
        self.tx.kick();
        wait_for(5, || self.tx.used().is_some())
    }

    /// Waits for a packet; copies its payload into `out`.
    fn recv(&mut self, out: &mut [u8]) -> Option<(Hdr, usize)> {
        let mut got = None;
        wait_for(10, || {
            got = self.rx.used();
            got.is_some()
        });
        let (head, len) = got?;
        let slot = self.rx_slot[head as usize % QSIZE];
        let p = buf(slot);
        let h = Hdr::read(p);
        let n = (h.len as usize).min(out.len()).min((len as usize).saturating_sub(HDR));
        for (i, o) in out.iter_mut().enumerate().take(n) {
            // SAFETY: within the slot's BUF bytes (n <= len - HDR <= BUF - HDR).
            *o = unsafe { p.add(HDR + i).read_volatile() };
        }
        if h.op == OP_RW {
            self.fwd_cnt = self.fwd_cnt.wrapping_add(h.len);
        }
        self.post_rx(slot);
        self.rx.kick();
        Some((h, n))
    }

    /// Receives a packet for local port `port`, skipping credit updates and leftovers of
    /// other connections (a host close racing our own shutdown, say).
    fn recv_data(&mut self, port: u32, out: &mut [u8]) -> Option<(Hdr, usize)> {
        loop {
            let r = self.recv(out)?;
            if r.0.op != OP_CREDIT_UPDATE && r.0.dst_port == port {
                return Some(r);
            }
        }
    }
}

/// Runs the vsock checks on `dev`.
pub fn run(dev: &Device, line: &[u8]) {
    let features = dev.negotiate(0);
    virtio::report("vsock", features);
    check("vsock.features", features.is_some(), "device refused VERSION_1");
    let cid = dev.config_u32(0) as u64 | ((dev.config_u32(4) as u64) << 32);
    print("INFO vsock guest_cid=");
    print_hex(cid);
    println("");
    let (Some(rx), Some(tx), Some(mut ev)) = (Queue::new(*dev, 0), Queue::new(*dev, 1), Queue::new(*dev, 2)) else {
        check("vsock.queues", false, "queue setup failed");
        return;
    };
    let _ = ev.add(&[(buf(TX_DATA) as u64 + 2048, 8, true)]);
    check("vsock.driver_ok", dev.driver_ok(), "device flagged DEVICE_NEEDS_RESET");
    let mut v = Vsock { cid, rx, tx, rx_slot: [0; QSIZE], fwd_cnt: 0 };
    if let Some(n) = param(line, "probe.vsock_flood").and_then(parse_u64) {
        flood(&mut v, n);
    }
    for slot in 0..RX_BUFS {
        v.post_rx(slot);
    }
    v.rx.kick();
    if param(line, "probe.vsock_flood").is_some() {
        drain(&mut v);
    }

    let mut data = [0u8; 256];
    if let Some(port) = param(line, "probe.vsock_port").and_then(parse_u64) {
        let local = 40000;
        v.fwd_cnt = 0;
        let req = Hdr { src_port: local, dst_port: port as u32, op: OP_REQUEST, ..Default::default() };
        let sent = v.send(req, &[]);
        let resp = v.recv(&mut data);
        let connected = sent && matches!(resp, Some((h, _)) if h.op == OP_RESPONSE && h.src_port == port as u32 && h.dst_port == local && h.src_cid == HOST_CID);
        check("vsock.connect", connected, "no RESPONSE from the host port");
        if connected {
            let msg = b"hello from the probe guest\n";
            let rw = Hdr { src_port: local, dst_port: port as u32, op: OP_RW, ..Default::default() };
            check("vsock.send", v.send(rw, msg), "tx descriptor not used");
            match v.recv_data(local, &mut data) {
                Some((h, n)) if h.op == OP_RW => {
                    print("INFO vsock host says: ");
                    print_bytes(&data[..n]);
                    println("");
                    check("vsock.recv", data[..n].starts_with(b"hello from the host"), "unexpected reply");
                }
                _ => check("vsock.recv", false, "no data from the host"),
            }
            let sd = Hdr { src_port: local, dst_port: port as u32, op: OP_SHUTDOWN, flags: 3, ..Default::default() };
            v.send(sd, &[]);
            // The host may close first (SHUTDOWN to us) or answer ours (RST): either ends it.
            let mut closed = false;
            for _ in 0..2 {
                match v.recv_data(local, &mut data) {
                    Some((h, _)) if h.op == OP_RST => {
                        closed = true;
                        break;
                    }
                    Some((h, _)) if h.op == OP_SHUTDOWN => continue,
                    _ => break,
                }
            }
            check("vsock.close", closed, "no RST after SHUTDOWN");
        }
    }
    if let Some(port) = param(line, "probe.vsock_listen").and_then(parse_u64) {
        println("INFO vsock listening");
        match v.recv_data(port as u32, &mut data) {
            Some((h, _)) if h.op == OP_REQUEST => {
                v.fwd_cnt = 0; // credit counts are per connection
                let resp = Hdr { src_port: port as u32, dst_port: h.src_port, op: OP_RESPONSE, ..Default::default() };
                check("vsock.accept", v.send(resp, &[]), "tx descriptor not used");
                let mut echoed = 0usize;
                loop {
                    match v.recv_data(port as u32, &mut data) {
                        Some((d, n)) if d.op == OP_RW => {
                            let mut up = [0u8; 256];
                            for i in 0..n {
                                up[i] = data[i].to_ascii_uppercase();
                            }
                            let rw = Hdr { src_port: port as u32, dst_port: h.src_port, op: OP_RW, ..Default::default() };
                            v.send(rw, &up[..n]);
                            echoed += n;
                        }
                        Some((d, _)) if d.op == OP_SHUTDOWN => {
                            let rst = Hdr { src_port: port as u32, dst_port: h.src_port, op: OP_RST, ..Default::default() };
                            v.send(rst, &[]);
                            break;
                        }
                        Some((d, _)) => {
                            print("INFO vsock unexpected op ");
                            print_hex(d.op as u64);
                            print(" ports ");
                            print_hex(d.src_port as u64);
                            print(" ");
                            print_hex(d.dst_port as u64);
                            println("");
                            if d.op == OP_RST {
                                break;
                            }
                        }
                        None => break,
                    }
                }
                print("INFO vsock echoed bytes=");
                print_hex(echoed as u64);
                println("");
                check("vsock.echo", echoed > 0, "no data from the host connection");
            }
            _ => check("vsock.accept", false, "no REQUEST from the host"),
        }
    }
}

/// A hostile guest: `n` connection requests, each from a new local port, to a host port
/// nobody listens on, with no receive buffer posted, so every answer (a RST) must wait in
/// the device. What the VMM keeps for them must stay bounded.
fn flood(v: &mut Vsock, n: u64) {
    let mut sent = 0u64;
    for i in 0..n {
        let req = Hdr { src_port: 50_000u32.wrapping_add(i as u32), dst_port: 7, op: OP_REQUEST, ..Default::default() };
        if !v.send(req, &[]) {
            break;
        }
        sent += 1;
    }
    print("INFO vsock flood sent=");
    print_hex(sent);
    println("");
    check("vsock.flood_sent", sent == n, "the device stopped taking transmit buffers");
}

/// Reads what the device kept for the flood, until it has nothing more.
fn drain(v: &mut Vsock) {
    let mut got = 0u64;
    let mut rsts = 0u64;
    loop {
        let mut used = None;
        if !wait_for(1, || {
            used = v.rx.used();
            used.is_some()
        }) {
            break;
        }
        let Some((head, _)) = used else { break };
        let slot = v.rx_slot[head as usize % QSIZE];
        let h = Hdr::read(buf(slot));
        got += 1;
        if h.op == OP_RST && h.src_port == 7 {
            rsts += 1;
        }
        v.post_rx(slot);
        v.rx.kick();
    }
    print("INFO vsock flood drained=");
    print_hex(got);
    print(" rst=");
    print_hex(rsts);
    println("");
    check("vsock.flood_answered", rsts > 0, "no RST for the refused requests");
}
