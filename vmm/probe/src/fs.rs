//! The virtio-fs check: FUSE requests on the request queue, answered by virtiofsd through
//! the VMM's vhost-user frontend: INIT, LOOKUP of `probe.fs_file`, OPEN and READ, and the
//! file's first line printed.

use crate::io::{print, print_bytes, print_hex, println, wait_for};
use crate::virtio::{self, Device, Queue};
use crate::{check, param};

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const IN_HDR: usize = 40;
const OUT_HDR: usize = 16;

#[repr(C, align(4096))]
struct Buffers {
    req: [u8; 4096],
    resp: [u8; 8192],
}
static mut BUFS: Buffers = Buffers { req: [0; 4096], resp: [0; 8192] };

struct Fuse {
    q: Queue,
    unique: u64,
}

impl Fuse {
    /// Sends `opcode` on `nodeid` with `body`; returns (error, response body length).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Option<(i32, usize)> {
        self.unique += 1;
        let len = IN_HDR + body.len();
        // SAFETY: single-threaded; the buffers are only handed to the device below.
        let (req, resp) = unsafe { (&raw mut BUFS.req, &raw mut BUFS.resp) };
        let mut hdr = [0u8; IN_HDR];
        hdr[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        hdr[4..8].copy_from_slice(&opcode.to_le_bytes());
        hdr[8..16].copy_from_slice(&self.unique.to_le_bytes());
        hdr[16..24].copy_from_slice(&nodeid.to_le_bytes());
        // SAFETY: len <= 4096 (callers send small bodies); resp is cleared before use.
        unsafe {
            let r = &mut *req;
            r[..IN_HDR].copy_from_slice(&hdr);
            r[IN_HDR..len].copy_from_slice(body);
            (*resp).fill(0);
        }
        self.q.add(&[(req as u64, len as u32, false), (resp as u64, 8192, true)])?;
        self.q.kick();
        let mut used = None;
        if !wait_for(10, || {
            used = self.q.used();
            used.is_some()
        }) {
            return None;
        }
        // SAFETY: the device has returned the buffer.
        let r = unsafe { &*resp };
        let out_len = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
        let error = i32::from_le_bytes([r[4], r[5], r[6], r[7]]);
        let unique = u64::from_le_bytes(core::array::from_fn(|i| r[8 + i]));
        if unique != self.unique || out_len < OUT_HDR || out_len > 8192 {
            return None;
        }
        Some((error, out_len - OUT_HDR))
    }

    fn resp(&self) -> &'static [u8] {
        // SAFETY: only read between calls, when the device does not own the buffer.
        unsafe { &(&(*(&raw const BUFS.resp)))[OUT_HDR..] }
    }
}

/// Runs the fs checks on `dev`.
pub fn run(dev: &Device, line: &[u8]) {
    let features = dev.negotiate(0);
    virtio::report("fs", features);
    check("fs.features", features.is_some(), "device refused VERSION_1");
    let tag_len = (0..36).take_while(|&i| dev.config_u8(i) != 0).count();
    print("INFO fs tag=");
    for i in 0..tag_len {
        print_bytes(&[dev.config_u8(i)]);
    }
    println("");
    let (Some(_hiprio), Some(q)) = (Queue::new(*dev, 0), Queue::new(*dev, 1)) else {
        check("fs.queues", false, "queue setup failed");
        return;
    };
    check("fs.driver_ok", dev.driver_ok(), "device flagged DEVICE_NEEDS_RESET");
    let mut f = Fuse { q, unique: 0 };

    let mut init = [0u8; 64];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&31u32.to_le_bytes());
    init[8..12].copy_from_slice(&65536u32.to_le_bytes());
    let ok = matches!(f.call(FUSE_INIT, 0, &init[..16]), Some((0, n)) if n >= 8);
    check("fs.init", ok, "FUSE_INIT got no (or an error) reply through the vhost-user backend");
    if !ok {
        return;
    }
    let Some(name) = param(line, "probe.fs_file") else { return };
    let mut body = [0u8; 256];
    let n = name.len().min(254);
    body[..n].copy_from_slice(&name[..n]);
    let lookup = f.call(FUSE_LOOKUP, 1, &body[..n + 1]);
    let nodeid = match lookup {
        Some((0, len)) if len >= 8 => u64::from_le_bytes(core::array::from_fn(|i| f.resp()[i])),
        other => {
            print("INFO fs lookup error ");
            print_hex(other.map(|(e, _)| e as i64 as u64).unwrap_or(u64::MAX));
            println("");
            check("fs.lookup", false, "LOOKUP failed");
            return;
        }
    };
    check("fs.lookup", true, "");
    let open = [0u8; 8]; // O_RDONLY
    let fh = match f.call(FUSE_OPEN, nodeid, &open) {
        Some((0, len)) if len >= 8 => u64::from_le_bytes(core::array::from_fn(|i| f.resp()[i])),
        _ => {
            check("fs.open", false, "OPEN failed");
            return;
        }
    };
    let mut read = [0u8; 40];
    read[0..8].copy_from_slice(&fh.to_le_bytes());
    read[16..20].copy_from_slice(&4096u32.to_le_bytes());
    match f.call(FUSE_READ, nodeid, &read) {
        Some((0, len)) => {
            let data = &f.resp()[..len.min(4096)];
            let first = data.split(|&b| b == b'\n').next().unwrap_or(&[]);
            print("INFO fs read: ");
            print_bytes(first);
            println("");
            check("fs.read", len > 0, "empty read");
        }
        _ => check("fs.read", false, "READ failed"),
    }
}
