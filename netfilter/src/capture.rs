//! Packet captures of the flows behind denials and findings, as pcapng.
//!
//! netd keeps a small ring of the pod's recent frames (those its full path decided: new
//! flows, inspected flows, everything that is not an established flow the flow cache
//! passes). When it records a denial or an inspection finding, the ring's frames of that
//! flow become one pcapng *section* (section header, interface, the frames with their
//! direction), appended to the pod's capture file, which netd opened before dropping its
//! privileges. The section's uid goes into the audit record; `enclavectl capture list|get`
//! finds it again, and any pcapng reader (tshark, Wireshark) opens the file or the one
//! section.
//!
//! Card numbers and SSNs never reach a capture: each frame's payload is masked as the
//! audit records are (first six and last four digits of a PAN at most), and any run of
//! four or more digits touching either end of a payload is starred whole, since it could
//! be the part of a number split across two frames.

use crate::conntrack::FlowKey;
use crate::inspect::dlp;
use crate::matcher::Direction;
use crate::packet::{Frame, Net};
use sha2::{Digest, Sha256};

/// Frames the ring keeps by default.
pub const RING_FRAMES: usize = 512;
/// Bytes of one frame the ring keeps (the rest of a larger frame is cut off).
pub const SNAP: usize = 2048;

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const EPB: u32 = 6;
const MAGIC: u32 = 0x1A2B_3C4D;

/// A frame in the ring.
#[derive(Debug, Clone)]
struct Slot {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    t_ns: u64,
    dir: Direction,
    orig_len: usize,
    data: Vec<u8>,
}

/// The pod's recent frames.
#[derive(Debug)]
pub struct Ring {
    slots: Vec<Slot>,
    next: usize,
    cap: usize,
}

impl Ring {
    /// A ring of `cap` frames (buffers are reused: no allocation once it has wrapped).
    pub fn new(cap: usize) -> Self {
        Ring {
            slots: Vec::with_capacity(cap),
            next: 0,
            cap: cap.max(1),
        }
    }

    /// Keeps `frame` (at most [`SNAP`] bytes of it).
    pub fn push(&mut self, t_ns: u64, dir: Direction, frame: &[u8]) {
        let keep = &frame[..frame.len().min(SNAP)];
        if self.slots.len() < self.cap {
            self.slots.push(Slot {
                t_ns,
                dir,
                orig_len: frame.len(),
                data: keep.to_vec(),
            });
        } else {
            let s = &mut self.slots[self.next];
            s.t_ns = t_ns;
            s.dir = dir;
            s.orig_len = frame.len();
            s.data.clear();
            s.data.extend_from_slice(keep);
        }
        self.next = (self.next + 1) % self.cap;
    }

    /// The frames of the flow `key` (either direction), oldest first.
    fn flow(&self, key: &FlowKey) -> Vec<&Slot> {
        let n = self.slots.len();
        let start = if n < self.cap { 0 } else { self.next };
        (0..n)
            .map(|i| &self.slots[(start + i) % n])
            .filter(|s| key_of(&s.data).is_some_and(|k| k == *key))
            .collect()
    }
}

/// The flow key of a frame (as the matcher keys flows; ICMP by type only).
pub fn key_of(frame: &[u8]) -> Option<FlowKey> {
    let f = Frame::parse(frame).ok()?;
    let Net::Ip(ip) = f.net else { return None };
    let (sport, dport) = ip.l4.ports();
    Some(FlowKey::new(ip.proto, ip.src, sport, ip.dst, dport).0)
}

/// Where a frame's transport payload starts and ends.
fn payload_span(frame: &[u8]) -> Option<(usize, usize)> {
    let f = Frame::parse(frame).ok()?;
    let Net::Ip(ip) = f.net else { return None };
    let p = ip.l4.payload();
    if p.is_empty() {
        return None;
    }
    let start = (p.as_ptr() as usize).checked_sub(frame.as_ptr() as usize)?;
    (start + p.len() <= frame.len()).then_some((start, start + p.len()))
}

/// Masks card numbers and SSNs in a frame's payload, and stars digit runs at its edges.
/// Returns how many numbers were masked.
pub fn mask_frame(frame: &mut [u8]) -> usize {
    let Some((a, b)) = payload_span(frame) else {
        return 0;
    };
    let p = &mut frame[a..b];
    let mut n = dlp::mask_in_place(p);
    let is_run = |c: u8| c.is_ascii_digit() || c == b' ' || c == b'-' || c == b'*';
    // The run touching the start, and the one touching the end.
    let head = p.iter().take_while(|&&c| is_run(c)).count();
    let tail = p.iter().rev().take_while(|&&c| is_run(c)).count();
    for (from, to) in [(0, head), (p.len() - tail, p.len())] {
        let run = &mut p[from..to];
        if run.iter().filter(|c| c.is_ascii_digit()).count() >= 4 {
            run.iter_mut()
                .filter(|c| c.is_ascii_digit())
                .for_each(|c| *c = b'*');
            n += 1;
        }
    }
    n
}

/// What a capture is about, for its section header.
#[derive(Debug, Clone)]
pub struct CaptureMeta {
    /// Why: a threat id (`SQL.Injection`) or a denial reason (`no_rule`).
    pub event: String,
    /// The pod, `namespace/name`.
    pub pod: String,
    /// The flow, in words.
    pub flow: String,
    /// The interface (the pod's tap).
    pub interface: String,
}

/// A capture ready to append.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Its id (in the audit record and `enclavectl capture get`).
    pub uid: String,
    /// The pcapng section.
    pub bytes: Vec<u8>,
    /// Frames in it.
    pub frames: usize,
    /// Numbers masked in it.
    pub masked: usize,
}

fn opt(out: &mut Vec<u8>, code: u16, v: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(v);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn block(out: &mut Vec<u8>, ty: u32, body: &[u8]) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

/// The pcapng section of the ring's frames of `key`, masked; `None` when the ring holds
/// none of them.
pub fn capture(ring: &Ring, key: &FlowKey, meta: &CaptureMeta) -> Option<Capture> {
    let frames = ring.flow(key);
    if frames.is_empty() {
        return None;
    }
    let mut masked = 0;
    let mut epbs = Vec::new();
    for s in &frames {
        let mut data = s.data.clone();
        masked += mask_frame(&mut data);
        let mut b = Vec::with_capacity(32 + data.len());
        b.extend_from_slice(&0u32.to_le_bytes()); // interface 0
        b.extend_from_slice(&((s.t_ns >> 32) as u32).to_le_bytes());
        b.extend_from_slice(&(s.t_ns as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&(s.orig_len as u32).to_le_bytes());
        b.extend_from_slice(&data);
        b.resize(b.len().next_multiple_of(4), 0);
        // epb_flags: direction, from the pod's point of view (to the guest is inbound).
        let dir: u32 = match s.dir {
            Direction::Ingress => 1,
            Direction::Egress => 2,
        };
        opt(&mut b, 2, &dir.to_le_bytes());
        opt(&mut b, 0, &[]);
        block(&mut epbs, EPB, &b);
    }
    let digest = {
        let mut h = Sha256::new();
        h.update(meta.event.as_bytes());
        h.update(meta.flow.as_bytes());
        h.update(&epbs);
        crate::audit::hex(&h.finalize()[..12])
    };
    let comment = format!(
        "enclave capture uid={digest}; event={}; pod={}; flow={}; frames={}; numbers masked={masked}",
        meta.event,
        meta.pod,
        meta.flow,
        frames.len()
    );
    let mut out = Vec::new();
    let mut shb = Vec::new();
    shb.extend_from_slice(&MAGIC.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&u64::MAX.to_le_bytes()); // section length not given
    opt(&mut shb, 1, comment.as_bytes());
    opt(&mut shb, 4, b"enclave-netd");
    opt(&mut shb, 0, &[]);
    block(&mut out, SHB, &shb);
    let mut idb = Vec::new();
    idb.extend_from_slice(&1u16.to_le_bytes()); // LINKTYPE_ETHERNET
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&(SNAP as u32).to_le_bytes());
    opt(&mut idb, 2, meta.interface.as_bytes());
    opt(&mut idb, 9, &[9]); // nanosecond timestamps
    opt(&mut idb, 0, &[]);
    block(&mut out, IDB, &idb);
    out.extend_from_slice(&epbs);
    Some(Capture {
        uid: digest,
        bytes: out,
        frames: frames.len(),
        masked,
    })
}

/// One section of a capture file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Where it starts in the file.
    pub offset: usize,
    /// Its length.
    pub len: usize,
    /// Its uid (from the comment), if it is one of ours.
    pub uid: Option<String>,
    /// The section comment.
    pub comment: String,
    /// Packets in it.
    pub frames: usize,
}

/// The sections of a capture file (little-endian pcapng, as netd writes). A damaged tail
/// ends the list with an error naming the offset; the sections before it are returned.
pub fn sections(b: &[u8]) -> (Vec<Section>, Option<String>) {
    let mut out: Vec<Section> = Vec::new();
    let mut i = 0;
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    while i < b.len() {
        let (Some(ty), Some(len)) = (u32_at(i), u32_at(i + 4)) else {
            return (out, Some(format!("a block header cut short at byte {i}")));
        };
        let len = len as usize;
        if len < 12 || len % 4 != 0 || i + len > b.len() {
            return (
                out,
                Some(format!("a block of impossible length {len} at byte {i}")),
            );
        }
        match ty {
            SHB => {
                if u32_at(i + 8) != Some(MAGIC) {
                    return (
                        out,
                        Some(format!(
                            "a section header at byte {i} that is not little-endian pcapng"
                        )),
                    );
                }
                let mut comment = String::new();
                let mut o = i + 24;
                while o + 4 <= i + len - 4 {
                    let code = u16::from_le_bytes([b[o], b[o + 1]]);
                    let olen = usize::from(u16::from_le_bytes([b[o + 2], b[o + 3]]));
                    if code == 0 || o + 4 + olen > i + len - 4 {
                        break;
                    }
                    if code == 1 {
                        comment = String::from_utf8_lossy(&b[o + 4..o + 4 + olen]).into_owned();
                    }
                    o += 4 + olen.next_multiple_of(4);
                }
                let uid = comment
                    .split("uid=")
                    .nth(1)
                    .and_then(|r| r.split(';').next())
                    .map(str::to_string);
                out.push(Section {
                    offset: i,
                    len: 0,
                    uid,
                    comment,
                    frames: 0,
                });
            }
            EPB | 3 => {
                if let Some(s) = out.last_mut() {
                    s.frames += 1;
                }
            }
            _ => {}
        }
        i += len;
        if let Some(s) = out.last_mut() {
            s.len = i - s.offset;
        }
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{build, MacAddr, TcpFlags as F};

    fn ends(sport: u16) -> build::Ends {
        build::Ends {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: "10.0.0.1"
                .parse()
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            dst: "10.0.0.2"
                .parse()
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            sport,
            dport: 80,
        }
    }

    #[test]
    fn a_flows_frames_become_one_masked_section_and_read_back() {
        let mut r = Ring::new(4);
        let a = ends(1000);
        r.push(1, Direction::Egress, &build::tcp(&a, F::SYN, 1, 0, b""));
        r.push(
            2,
            Direction::Egress,
            &build::tcp(&ends(2000), F::SYN, 1, 0, b""),
        );
        r.push(
            3,
            Direction::Ingress,
            &build::tcp(&a.reversed(), F::SYN | F::ACK, 9, 2, b""),
        );
        r.push(
            4,
            Direction::Egress,
            &build::tcp(&a, F::ACK, 2, 10, b"card=4111111111111111 x"),
        );
        // A number split across two frames: both edges starred.
        r.push(
            5,
            Direction::Egress,
            &build::tcp(&a, F::ACK, 25, 10, b"pan=4111 1111"),
        );
        r.push(
            6,
            Direction::Egress,
            &build::tcp(&a, F::ACK, 38, 10, b" 1111 1111&y=1"),
        );
        let key = key_of(&build::tcp(&a, F::ACK, 0, 0, b"")).unwrap_or_else(|| panic!("key"));
        let meta = CaptureMeta {
            event: "DLP.CreditCard".into(),
            pod: "payments/api".into(),
            flow: "tcp 10.0.0.1:1000 -> 10.0.0.2:80".into(),
            interface: "tap0".into(),
        };
        let c = capture(&r, &key, &meta).unwrap_or_else(|| panic!("no capture"));
        // The ring kept the last 4 frames, all of this flow: the first SYN and the other
        // flow's SYN fell out.
        assert_eq!(c.frames, 4, "{c:?}");
        let text = String::from_utf8_lossy(&c.bytes);
        assert!(text.contains("411111******1111"), "{text}");
        assert!(!text.contains("4111111111111111"));
        assert!(
            text.contains("pan=**** ****") && text.contains(" **** ****&y=1"),
            "{text}"
        );
        let (secs, err) = sections(&c.bytes);
        assert_eq!(err, None);
        assert_eq!(secs.len(), 1);
        assert_eq!(secs[0].frames, 4);
        assert_eq!(secs[0].uid.as_deref(), Some(c.uid.as_str()));
        assert_eq!(secs[0].len, c.bytes.len());
        // Two sections in one file, and a torn tail.
        let mut file = c.bytes.clone();
        file.extend_from_slice(&c.bytes);
        file.extend_from_slice(&c.bytes[..30]);
        let (secs, err) = sections(&file);
        assert_eq!(secs.len(), 2);
        assert_eq!(secs[1].offset, c.bytes.len());
        assert!(err.is_some_and(|e| e.contains(&format!("byte {}", 2 * c.bytes.len()))));
    }
}
