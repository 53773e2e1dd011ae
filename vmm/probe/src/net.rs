//! The net check: send frames through the net device (a vhost-user backend on the host puts
//! them on a tap) and read frames the host sends back.

use crate::io::{print, print_hex, println, wait_for};
use crate::virtio::{self, Device, Queue, QSIZE};
use crate::{check, param, parse_u64};

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1 (VERSION_1 always has num_buffers).
const NET_HDR: usize = 12;
const FRAME: usize = 1536;
/// Experimental ethertype (IEEE 802 local experimental 1).
pub const ETHERTYPE: u16 = 0x88b5;

#[repr(C, align(4096))]
struct Buffers([[u8; FRAME + NET_HDR]; QSIZE + 1]);
static mut BUFS: Buffers = Buffers([[0; FRAME + NET_HDR]; QSIZE + 1]);

fn buf(i: usize) -> *mut u8 {
    // SAFETY: single-threaded; index within the static array.
    unsafe { (&raw mut BUFS.0[i]) as *mut u8 }
}

/// Runs the net checks on `dev`.
pub fn run(dev: &Device, line: &[u8]) {
    let features = dev.negotiate(VIRTIO_NET_F_MAC);
    virtio::report("net", features);
    check("net.features", features.is_some(), "device refused VERSION_1");
    let mac: [u8; 6] = core::array::from_fn(|i| dev.config_u8(i));
    let (Some(mut rx), Some(mut tx)) = (Queue::new(*dev, 0), Queue::new(*dev, 1)) else {
        check("net.queues", false, "queue setup failed");
        return;
    };
    check("net.driver_ok", dev.driver_ok(), "device flagged DEVICE_NEEDS_RESET");
    let mut slot_of = [0usize; QSIZE];
    for slot in 0..QSIZE - 1 {
        if let Some(h) = rx.add(&[(buf(slot) as u64, (FRAME + NET_HDR) as u32, true)]) {
            slot_of[h as usize] = slot;
        }
    }
    rx.kick();

    let frames = param(line, "probe.net_frames").and_then(parse_u64).unwrap_or(4);
    let txb = buf(QSIZE);
    let mut sent = 0u64;
    for i in 0..frames {
        // virtio_net_hdr_v1: all zero (no offloads).
        let mut f = [0u8; NET_HDR + 60];
        f[NET_HDR..NET_HDR + 6].copy_from_slice(&[0xff; 6]);
        f[NET_HDR + 6..NET_HDR + 12].copy_from_slice(&mac);
        f[NET_HDR + 12..NET_HDR + 14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        let msg = b"enclave-probe frame ";
        f[NET_HDR + 14..NET_HDR + 14 + msg.len()].copy_from_slice(msg);
        f[NET_HDR + 14 + msg.len()] = b'0' + (i % 10) as u8;
        for (j, b) in f.iter().enumerate() {
            // SAFETY: txb is a static buffer of FRAME + NET_HDR bytes; f is shorter.
            unsafe { txb.add(j).write_volatile(*b) };
        }
        if tx.add(&[(txb as u64, f.len() as u32, false)]).is_none() {
            break;
        }
        tx.kick();
        if wait_for(5, || tx.used().is_some()) {
            sent += 1;
        }
    }
    print("INFO net sent=");
    print_hex(sent);
    println("");
    check("net.tx", sent == frames, "a tx descriptor was not used");

    // The host answers each frame with one of its own, to our MAC.
    let mut received = 0u64;
    let want = param(line, "probe.net_expect").and_then(parse_u64).unwrap_or(0);
    while received < want {
        let mut got = None;
        if !wait_for(10, || {
            got = rx.used();
            got.is_some()
        }) {
            break;
        }
        let Some((head, len)) = got else { break };
        let slot = slot_of[head as usize % QSIZE];
        let p = buf(slot);
        // SAFETY: reading within the slot (len is bounded by the buffer we offered).
        let at = |i: usize| unsafe { p.add(NET_HDR + i).read_volatile() };
        let len = (len as usize).saturating_sub(NET_HDR);
        let to_us = (0..6).all(|i| at(i) == mac[i]);
        let ethertype = u16::from_be_bytes([at(12), at(13)]);
        if len >= 14 && to_us && ethertype == ETHERTYPE {
            received += 1;
        }
        if let Some(h) = rx.add(&[(p as u64, (FRAME + NET_HDR) as u32, true)]) {
            slot_of[h as usize] = slot;
        }
        rx.kick();
    }
    if want > 0 {
        print("INFO net received=");
        print_hex(received);
        println("");
        check("net.rx", received == want, "fewer frames than the host sent");
    }
}
