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

/// An Ethernet + IPv4 + UDP DNS query (example.com A) from `mac`, 10.1.0.5:40000 to
/// 10.96.0.10:53, into `f`; returns its length.
fn udp_frame(f: &mut [u8], mac: &[u8; 6]) -> usize {
    const DNS: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    let total = 20 + 8 + DNS.len();
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip.copy_from_slice(&[0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 5, 10, 96, 0, 10]);
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    let mut sum: u32 = 0;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + DNS.len()) as u16).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    f[42..42 + DNS.len()].copy_from_slice(DNS);
    (14 + total).max(60)
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
    // probe.net_batch=K: K frames per kick (the datapath benchmark); 1 by default.
    let batch = param(line, "probe.net_batch")
        .and_then(parse_u64)
        .unwrap_or(1)
        .clamp(1, QSIZE as u64 - 1);
    // probe.net_udp=1: IPv4/UDP DNS queries from 10.1.0.5:40000 to 10.96.0.10:53 (a flow the
    // PCI CDE template allows for zone cde-api) instead of experimental-ethertype frames.
    let udp = param(line, "probe.net_udp").is_some();
    let txb = buf(QSIZE);
    let mut f = [0u8; NET_HDR + 128];
    let len = if udp {
        udp_frame(&mut f[NET_HDR..], &mac)
    } else {
        f[NET_HDR..NET_HDR + 6].copy_from_slice(&[0xff; 6]);
        f[NET_HDR + 6..NET_HDR + 12].copy_from_slice(&mac);
        f[NET_HDR + 12..NET_HDR + 14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        let msg = b"enclave-probe frame ";
        f[NET_HDR + 14..NET_HDR + 14 + msg.len()].copy_from_slice(msg);
        60
    };
    let mut sent = 0u64;
    while sent < frames {
        if !udp {
            // Numbered frames (the host checks their order).
            f[NET_HDR + 14 + 20] = b'0' + (sent % 10) as u8;
        }
        for (j, b) in f[..NET_HDR + len].iter().enumerate() {
            // SAFETY: txb is a static buffer of FRAME + NET_HDR bytes; f is shorter.
            unsafe { txb.add(j).write_volatile(*b) };
        }
        // virtio_net_hdr_v1 all zero (no offloads); the device only reads the buffer, so
        // every descriptor of a batch may point at it.
        let k = batch.min(frames - sent);
        let mut queued = 0;
        for _ in 0..k {
            if tx.add(&[(txb as u64, (NET_HDR + len) as u32, false)]).is_none() {
                break;
            }
            queued += 1;
        }
        if queued == 0 {
            break;
        }
        tx.kick();
        let mut done = 0;
        if !wait_for(5, || {
            while tx.used().is_some() {
                done += 1;
            }
            done == queued
        }) {
            sent += done;
            break;
        }
        sent += done;
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
