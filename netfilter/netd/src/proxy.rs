//! A vhost-user message relay between the VMM and netd's backend, so one backend serves
//! both enclave-vmm and QEMU 7.2.
//!
//! QEMU 7.2's vhost-user-net sends `SET_VRING_ENABLE` when the virtio-net device is reset,
//! before it has sent `SET_FEATURES` with `VHOST_USER_F_PROTOCOL_FEATURES`; the `vhost`
//! crate refuses that message (the spec only defines it once protocol features are acked)
//! and drops the connection. Without protocol features offered, QEMU refuses to start the
//! device at all, and it sends no further enables once it has acked them. The relay passes
//! every message through unchanged, with its descriptors, except a `SET_VRING_ENABLE` that
//! arrives while protocol features are not acked: it holds it back (answering it if the
//! frontend asked for a reply), and replays the last state held for each ring right after a
//! `SET_FEATURES` that acks protocol features. Without that ack the spec has rings enabled
//! from `SET_FEATURES` on, and the held messages are simply dropped.
//!
//! Only the control channel passes through the relay; frames travel through the shared
//! rings and eventfds, whose descriptors are handed on as they are.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a vhost-user message header.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted (the largest vhost-user message, `SET_MEM_TABLE` with 8
/// regions, is 264 bytes; config space messages up to 268).
pub const MAX_PAYLOAD: usize = 4096;
/// Most descriptors one message carries (the memory table: one per region).
pub const MAX_FDS: usize = 8;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Payload size.
    pub size: u32,
}

impl Header {
    /// Parses and bounds a header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        };
        if h.size as usize > MAX_PAYLOAD {
            return Err(format!(
                "vhost-user message {} with a {}-byte payload (at most {MAX_PAYLOAD})",
                h.request, h.size
            ));
        }
        Ok(h)
    }

    fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

/// What to do with a message from the frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pass it to the backend, then these messages (replayed ring enables).
    Forward(Vec<Vec<u8>>),
    /// Drop it; send this reply to the frontend if there is one.
    Drop(Option<Vec<u8>>),
}

/// The relay's view of the session: which virtio features the frontend acked.
#[derive(Debug, Default)]
pub struct Filter {
    acked: u64,
    /// Ring enables held back: ring index → state, in arrival order of first sight.
    held: Vec<(u32, u32)>,
    /// Messages dropped.
    pub dropped: u64,
}

impl Filter {
    /// Decides a frontend message.
    pub fn frontend(&mut self, h: &Header, payload: &[u8]) -> Action {
        match h.request {
            SET_FEATURES => {
                if let Some(b) = payload.get(..8) {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(b);
                    self.acked = u64::from_le_bytes(v);
                }
                let held = std::mem::take(&mut self.held);
                if self.acked & PROTOCOL_FEATURES_BIT == 0 {
                    return Action::Forward(Vec::new());
                }
                let replay = held
                    .into_iter()
                    .map(|(index, num)| {
                        let mut m = Header {
                            request: SET_VRING_ENABLE,
                            flags: FLAG_VERSION,
                            size: 8,
                        }
                        .bytes()
                        .to_vec();
                        m.extend_from_slice(&index.to_le_bytes());
                        m.extend_from_slice(&num.to_le_bytes());
                        m
                    })
                    .collect();
                Action::Forward(replay)
            }
            SET_VRING_ENABLE if self.acked & PROTOCOL_FEATURES_BIT == 0 => {
                self.dropped += 1;
                if let (Some(i), Some(n)) = (payload.get(0..4), payload.get(4..8)) {
                    let index = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
                    let num = u32::from_le_bytes([n[0], n[1], n[2], n[3]]);
                    // Bounded: one slot per ring index seen (a frontend has few rings).
                    let room = self.held.len() < 64;
                    match self.held.iter_mut().find(|(x, _)| *x == index) {
                        Some(slot) => slot.1 = num,
                        None if room => self.held.push((index, num)),
                        None => {}
                    }
                }
                let reply = (h.flags & FLAG_NEED_REPLY != 0).then(|| {
                    let mut r = Header {
                        request: h.request,
                        flags: FLAG_VERSION | FLAG_REPLY,
                        size: 8,
                    }
                    .bytes()
                    .to_vec();
                    r.extend_from_slice(&0u64.to_le_bytes());
                    r
                });
                Action::Drop(reply)
            }
            _ => Action::Forward(Vec::new()),
        }
    }
}

/// A message: header, payload, descriptors.
type Message = (Header, Vec<u8>, Vec<OwnedFd>);

/// One whole message with its descriptors, or `None` at end of stream.
fn recv(s: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `hdr`, which lives across the call and may take any bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    let fds: Vec<OwnedFd> = raw[..nfds.min(MAX_FDS)]
        .iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: the kernel just installed these descriptors for us; nothing else owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    (&*s).read_exact(&mut hdr[n..])?;
    let h = Header::parse(&hdr).map_err(io::Error::other)?;
    let mut payload = vec![0u8; h.size as usize];
    (&*s).read_exact(&mut payload)?;
    Ok(Some((h, payload, fds)))
}

fn send(s: &UnixStream, h: &Header, payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut msg = h.bytes().to_vec();
    msg.extend_from_slice(payload);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = s
        .send_with_fds(&[&msg[..]], &raw)
        .map_err(io::Error::from)?;
    (&*s).write_all(&msg[n..])
}

/// Relays between `frontend` (the VMM) and `backend` (netd's vhost-user handler) until
/// either side closes. Returns how many messages were dropped.
pub fn relay(frontend: UnixStream, backend: UnixStream) -> io::Result<u64> {
    let mut filter = Filter::default();
    let mut fds = [
        libc::pollfd {
            fd: frontend.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: backend.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let result = loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if fds[0].revents != 0 {
            match recv(&frontend) {
                Ok(Some((h, p, f))) => match filter.frontend(&h, &p) {
                    Action::Forward(replay) => {
                        if let Err(e) = send(&backend, &h, &p, &f) {
                            break Err(e);
                        }
                        if let Some(Err(e)) = replay
                            .iter()
                            .map(|m| (&backend).write_all(m))
                            .find(|r| r.is_err())
                        {
                            break Err(e);
                        }
                    }
                    Action::Drop(Some(reply)) => {
                        if let Err(e) = (&frontend).write_all(&reply) {
                            break Err(e);
                        }
                    }
                    Action::Drop(None) => {}
                },
                Ok(None) => break Ok(filter.dropped),
                Err(e) => break Err(e),
            }
        }
        if fds[1].revents != 0 {
            match recv(&backend) {
                Ok(Some((h, p, f))) => {
                    if let Err(e) = send(&frontend, &h, &p, &f) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(filter.dropped),
                Err(e) => break Err(e),
            }
        }
    };
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn h(request: u32, flags: u32, size: u32) -> Header {
        Header {
            request,
            flags,
            size,
        }
    }

    fn enable(index: u32, num: u32) -> Vec<u8> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        p
    }

    #[test]
    fn early_ring_enables_are_held_and_replayed_after_the_protocol_ack() {
        let mut f = Filter::default();
        let en = h(SET_VRING_ENABLE, FLAG_VERSION, 8);
        // QEMU 7.2: disable then enable each ring, before SET_FEATURES.
        for (i, n) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            assert_eq!(f.frontend(&en, &enable(i, n)), Action::Drop(None));
        }
        let need = h(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, 8);
        let Action::Drop(Some(reply)) = f.frontend(&need, &enable(1, 1)) else {
            panic!("a reply was asked for")
        };
        assert_eq!(reply.len(), HEADER_LEN + 8);
        assert_eq!(
            Header::parse(reply[..HEADER_LEN].try_into().unwrap()).unwrap(),
            h(SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY, 8)
        );
        let feats = h(SET_FEATURES, FLAG_VERSION, 8);
        let Action::Forward(replay) = f.frontend(&feats, &PROTOCOL_FEATURES_BIT.to_le_bytes())
        else {
            panic!("SET_FEATURES passes")
        };
        // The last state of each ring, in order: both enabled.
        let mut want = Vec::new();
        for i in [0u32, 1] {
            let mut m = h(SET_VRING_ENABLE, FLAG_VERSION, 8).bytes().to_vec();
            m.extend_from_slice(&enable(i, 1));
            want.push(m);
        }
        assert_eq!(replay, want);
        // Acked now: enables are the backend's.
        assert_eq!(f.frontend(&en, &enable(0, 0)), Action::Forward(vec![]));
        assert_eq!(f.dropped, 5);
    }

    #[test]
    fn without_the_protocol_ack_held_enables_are_dropped() {
        let mut f = Filter::default();
        let en = h(SET_VRING_ENABLE, FLAG_VERSION, 8);
        assert_eq!(f.frontend(&en, &enable(0, 1)), Action::Drop(None));
        let feats = h(SET_FEATURES, FLAG_VERSION, 8);
        assert_eq!(
            f.frontend(&feats, &(1u64 << 32).to_le_bytes()),
            Action::Forward(vec![])
        );
        assert_eq!(f.frontend(&en, &enable(0, 1)), Action::Drop(None));
        // A short SET_FEATURES payload changes nothing and is the backend's to refuse.
        assert_eq!(f.frontend(&feats, &[1]), Action::Forward(vec![]));
        // Short enable payloads are held nowhere.
        assert_eq!(f.frontend(&en, &[1, 2]), Action::Drop(None));
        assert!(f.held.is_empty());
    }

    #[test]
    fn an_oversized_message_is_refused() {
        let mut b = [0u8; HEADER_LEN];
        b[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(Header::parse(&b).unwrap_err().contains("payload"));
    }

    #[test]
    fn messages_and_descriptors_cross_the_relay() {
        let (vmm, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back));
        let file = tempfile::tempfile().unwrap();
        // An early enable (dropped), then a message with a descriptor (passed).
        send(&vmm, &h(SET_VRING_ENABLE, FLAG_VERSION, 8), &[0; 8], &[]).unwrap();
        let fd = OwnedFd::from(file);
        send(&vmm, &h(5, FLAG_VERSION, 4), &[1, 2, 3, 4], &[fd]).unwrap();
        let (hh, p, f) = recv(&daemon).unwrap().unwrap();
        assert_eq!((hh.request, p, f.len()), (5, vec![1, 2, 3, 4], 1));
        // A reply goes back.
        send(&daemon, &h(5, FLAG_VERSION | FLAG_REPLY, 0), &[], &[]).unwrap();
        let (hh, _, _) = recv(&vmm).unwrap().unwrap();
        assert_eq!(hh.flags, FLAG_VERSION | FLAG_REPLY);
        drop(vmm);
        assert_eq!(t.join().unwrap().unwrap(), 1);
    }
}
