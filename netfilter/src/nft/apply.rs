//! Installs and removes a rendered table through netlink (nftnl), in a network namespace.

use super::{kernel_sets, Hook, KeyField, Match, NftTable, NftVerdict};
use crate::packet::proto;
use nftnl::expr::{Bitwise, Cmp, CmpOp, Counter, InterfaceName, Meta};
use nftnl::{nft_expr, Batch, Chain, FinalizedBatch, ProtoFamily, Rule, Table};
use std::ffi::CString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Why a table could not be applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The network namespace could not be entered.
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        /// The namespace file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Netlink refused the batch (the kernel's reason is in the cause).
    #[error("nftables refused the {what} of table {table}: {source}")]
    Netlink {
        /// Apply or remove.
        what: &'static str,
        /// The table.
        table: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A name contained a NUL byte.
    #[error("invalid name {0:?} (contains NUL)")]
    BadName(String),
    /// The worker thread died.
    #[error("nftables worker thread panicked")]
    Thread,
}

fn cstr(s: &str) -> Result<CString, NftError> {
    CString::new(s).map_err(|_| NftError::BadName(s.to_string()))
}

/// Installs `table` (family inet) in the namespace at `netns` (a `/run/netns/NAME` or
/// `/proc/PID/ns/net` path; `None` for the caller's own). Replaces any table of the same
/// name in one atomic transaction, so applying twice gives the same ruleset.
pub fn apply(table: &NftTable, netns: Option<&Path>) -> Result<(), NftError> {
    let t = table.clone();
    in_netns(netns, move || {
        let batch = build(&t, true)?;
        send(&batch).map_err(|source| NftError::Netlink {
            what: "apply",
            table: t.name.clone(),
            source,
        })
    })
}

/// Removes the table named `name` from the namespace; a missing table is not an error.
pub fn remove(name: &str, netns: Option<&Path>) -> Result<(), NftError> {
    let name = name.to_string();
    in_netns(netns, move || {
        let mut batch = Batch::new();
        let table = Table::new(cstr(&name)?, ProtoFamily::Inet);
        // Add-then-delete: removes it if present, and is not an error if it is not.
        batch.add(&table, nftnl::MsgType::Add);
        batch.add(&table, nftnl::MsgType::Del);
        send(&batch.finalize()).map_err(|source| NftError::Netlink {
            what: "removal",
            table: name.clone(),
            source,
        })
    })
}

/// Runs `f` on a thread that has joined the namespace (setns affects only that thread; the
/// netlink socket it opens stays bound to the namespace).
fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl FnOnce() -> Result<T, NftError> + Send + 'static,
) -> Result<T, NftError> {
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    std::thread::Builder::new()
        .name("nft-apply".into())
        .spawn(move || {
            if let Some(p) = &netns {
                let file = std::fs::File::open(p).map_err(|source| NftError::Netns {
                    path: p.display().to_string(),
                    source,
                })?;
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a file descriptor we own, for this thread only; the thread
                // ends after `f`, so no other code runs in the namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(NftError::Netns {
                        path: p.display().to_string(),
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
            f()
        })
        .map_err(|source| NftError::Netns {
            path: "(thread)".into(),
            source,
        })?
        .join()
        .map_err(|_| NftError::Thread)?
}

fn build(t: &NftTable, replace: bool) -> Result<FinalizedBatch, NftError> {
    let mut batch = Batch::new();
    let table = Table::new(cstr(&t.name)?, ProtoFamily::Inet);
    if replace {
        batch.add(&table, nftnl::MsgType::Add);
        batch.add(&table, nftnl::MsgType::Del);
    }
    batch.add(&table, nftnl::MsgType::Add);
    let table_name = cstr(&t.name)?;
    let mut set_ids = std::collections::HashMap::new();
    for (i, set) in t.sets.iter().enumerate() {
        let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let name = cstr(&set.name)?;
        let (decl, elements) = kernel_sets::set_messages(&table_name, &name, id, set);
        batch.add(&decl, nftnl::MsgType::Add);
        for e in &elements {
            batch.add(e, nftnl::MsgType::Add);
        }
        set_ids.insert(set.name.as_str(), id);
    }
    for (i, set) in t.name_sets.iter().enumerate() {
        let id = u32::try_from(t.sets.len() + i + 1).unwrap_or(u32::MAX);
        let name = cstr(&set.name)?;
        batch.add(
            &kernel_sets::name_set_decl(&table_name, &name, id, set.v6),
            nftnl::MsgType::Add,
        );
        set_ids.insert(set.name.as_str(), id);
    }
    let mut chains = Vec::new();
    for c in &t.chains {
        let mut chain = Chain::new(cstr(&c.name)?, &table);
        if let Some((hook, prio)) = c.hook {
            chain.set_hook(
                match hook {
                    Hook::Input => nftnl::Hook::In,
                    Hook::Output => nftnl::Hook::Out,
                    Hook::Forward => nftnl::Hook::Forward,
                },
                prio,
            );
            chain.set_type(nftnl::ChainType::Filter);
            chain.set_policy(nftnl::Policy::Accept);
        }
        chains.push(chain);
    }
    for ch in &chains {
        batch.add(ch, nftnl::MsgType::Add);
    }
    for (c, chain) in t.chains.iter().zip(&chains) {
        for r in &c.rules {
            let mut rule = Rule::new(chain);
            let mut l4: Option<u8> = None;
            for m in &r.matches {
                add_match(&mut rule, m, &mut l4, &set_ids)?;
            }
            rule.add_expr(&Counter);
            match &r.verdict {
                NftVerdict::Accept => rule.add_expr(&nft_expr!(verdict accept)),
                NftVerdict::Drop => rule.add_expr(&nft_expr!(verdict drop)),
                NftVerdict::Jump(to) => {
                    rule.add_expr(&nftnl::expr::Verdict::Jump { chain: cstr(to)? })
                }
            }
            let mut comment = r.comment.replace('\0', " ");
            while comment.len() > 127 {
                comment.pop();
            }
            let _ = rule.set_comment(cstr(&comment)?);
            batch.add(&rule, nftnl::MsgType::Add);
        }
    }
    Ok(batch.finalize())
}

fn add_match(
    rule: &mut Rule<'_>,
    m: &Match,
    l4: &mut Option<u8>,
    set_ids: &std::collections::HashMap<&str, u32>,
) -> Result<(), NftError> {
    match m {
        Match::Iifname(n) => {
            rule.add_expr(&Meta::IifName);
            rule.add_expr(&Cmp::new(CmpOp::Eq, InterfaceName::Exact(cstr(n)?)));
        }
        Match::Oifname(n) => {
            rule.add_expr(&Meta::OifName);
            rule.add_expr(&Cmp::new(CmpOp::Eq, InterfaceName::Exact(cstr(n)?)));
        }
        Match::CtState { established } => {
            use nftnl::expr::States;
            let states = if *established {
                States::ESTABLISHED | States::RELATED
            } else {
                States::INVALID
            };
            rule.add_expr(&nft_expr!(ct state));
            rule.add_expr(&Bitwise::new(states.bits(), 0u32));
            rule.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
        }
        Match::L4Proto(p) => {
            *l4 = Some(*p);
            rule.add_expr(&Meta::L4Proto);
            rule.add_expr(&Cmp::new(CmpOp::Eq, *p));
        }
        Match::Saddr(r) | Match::Daddr(r) => {
            let src = matches!(m, Match::Saddr(_));
            nfproto(rule, r.lo);
            rule.add_expr(&addr_payload(r.lo, src));
            match r.as_cidr() {
                Some(c) => {
                    let full = if c.addr.is_ipv4() { 32 } else { 128 };
                    if c.len != full {
                        let mask = mask_bytes(c.addr.is_ipv4(), c.len);
                        let zero = vec![0u8; mask.len()];
                        rule.add_expr(&Bitwise::new(mask.as_slice(), zero.as_slice()));
                    }
                    rule.add_expr(&Cmp::new(CmpOp::Eq, octets(c.addr).as_slice()));
                }
                None => {
                    // Big-endian bytes compare in numeric order.
                    rule.add_expr(&Cmp::new(CmpOp::Gte, octets(r.lo).as_slice()));
                    rule.add_expr(&Cmp::new(CmpOp::Lte, octets(r.hi).as_slice()));
                }
            }
        }
        Match::InSet { set, key } => {
            if let Some(KeyField::Addr { v6, .. }) =
                key.iter().find(|f| matches!(f, KeyField::Addr { .. }))
            {
                let any = if *v6 {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0u8; 4])
                };
                nfproto(rule, any);
            }
            for load in kernel_sets::Load::of(key) {
                rule.add_expr(&load);
            }
            rule.add_expr(&kernel_sets::Lookup {
                set: cstr(set)?,
                id: set_ids.get(set.as_str()).copied().unwrap_or(0),
            });
        }
        Match::SaddrNot(a) => {
            nfproto(rule, *a);
            rule.add_expr(&addr_payload(*a, true));
            rule.add_expr(&Cmp::new(CmpOp::Neq, octets(*a).as_slice()));
        }
        Match::Dport(r) => {
            // TCP and UDP both keep the destination port at offset 2.
            rule.add_expr(&nftnl::expr::Payload::Transport(
                nftnl::expr::TransportHeaderField::Tcp(nftnl::expr::TcpHeaderField::Dport),
            ));
            let (lo, hi) = (r.lo.to_be_bytes(), r.hi.to_be_bytes());
            if r.lo == r.hi {
                rule.add_expr(&Cmp::new(CmpOp::Eq, &lo[..]));
            } else {
                // Big-endian bytes compare in numeric order.
                rule.add_expr(&Cmp::new(CmpOp::Gte, &lo[..]));
                rule.add_expr(&Cmp::new(CmpOp::Lte, &hi[..]));
            }
            let _ = l4;
        }
        Match::Icmpv6Type(t) => {
            if *l4 != Some(proto::ICMPV6) {
                rule.add_expr(&Meta::L4Proto);
                rule.add_expr(&Cmp::new(CmpOp::Eq, proto::ICMPV6));
            }
            rule.add_expr(&nftnl::expr::Payload::Transport(
                nftnl::expr::TransportHeaderField::Icmpv6(nftnl::expr::Icmpv6HeaderField::Type),
            ));
            rule.add_expr(&Cmp::new(CmpOp::Eq, *t));
        }
    }
    Ok(())
}

fn nfproto(rule: &mut Rule<'_>, a: IpAddr) {
    rule.add_expr(&Meta::NfProto);
    let p = if a.is_ipv4() {
        libc::NFPROTO_IPV4
    } else {
        libc::NFPROTO_IPV6
    } as u8;
    rule.add_expr(&Cmp::new(CmpOp::Eq, p));
}

fn addr_payload(a: IpAddr, src: bool) -> nftnl::expr::Payload {
    use nftnl::expr::{
        Ipv4HeaderField as V4, Ipv6HeaderField as V6, NetworkHeaderField as N, Payload,
    };
    match (a.is_ipv4(), src) {
        (true, true) => Payload::Network(N::Ipv4(V4::Saddr)),
        (true, false) => Payload::Network(N::Ipv4(V4::Daddr)),
        (false, true) => Payload::Network(N::Ipv6(V6::Saddr)),
        (false, false) => Payload::Network(N::Ipv6(V6::Daddr)),
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn mask_bytes(v4: bool, len: u8) -> Vec<u8> {
    if v4 {
        crate::policy::v4_mask(len).to_be_bytes().to_vec()
    } else {
        crate::policy::v6_mask(len).to_be_bytes().to_vec()
    }
}

/// Sends a batch as one netlink message and reports the first error the kernel answers.
///
/// nftnl asks for an acknowledgement of every message, and each queued acknowledgement
/// takes about 700 bytes of the socket's receive buffer (its skb), so a batch of a few
/// hundred rules overflowed the default buffer (ENOBUFS). And the kernel applies a batch
/// only when its begin and end arrive in one message, while nftnl hands it over in pages.
/// So, as `nft` itself does: the pages are joined into one message, successes are not
/// acknowledged (errors always are), the send buffer is sized to the message, and once
/// `send` returns (the kernel processes the whole batch inside it) the socket is drained
/// of error replies without blocking.
fn send(batch: &FinalizedBatch) -> std::io::Result<()> {
    let mut msg: Vec<u8> = batch.iter().flatten().copied().collect();
    clear_ack_flags(&mut msg);
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let fd = socket.as_raw_fd();
    // The kernel refuses a message larger than the send buffer less a little (EMSGSIZE).
    let want = i32::try_from(msg.len() + 64 * 1024).unwrap_or(i32::MAX);
    set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, want)?;
    // Error replies carry the failed message back: room for a few.
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 4 * 1024 * 1024)?;
    send_on(fd, &msg)
}

/// Sends a batch (its ACK flags cleared) on an open netfilter socket and reads what the
/// kernel answered at once: only errors come back.
pub(super) fn send_on(fd: std::os::fd::RawFd, msg: &[u8]) -> std::io::Result<()> {
    // SAFETY: sending our own buffer on our own socket.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if usize::try_from(sent).ok() != Some(msg.len()) {
        return Err(std::io::Error::other("netlink took part of the batch"));
    }
    let mut buffer = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize * 4];
    loop {
        // SAFETY: receiving into our own buffer, without blocking.
        let n = unsafe {
            libc::recv(
                fd,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(()),
                _ => Err(e),
            };
        }
        let n = usize::try_from(n).unwrap_or(0);
        if let Some(code) = first_error(&buffer[..n]) {
            return Err(std::io::Error::from_raw_os_error(code));
        }
        if n == 0 {
            return Ok(());
        }
    }
}

use std::os::fd::AsRawFd;

/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_ACK`.
const NLM_F_ACK: u16 = 4;

/// Walks the netlink messages in `buf` (`nlmsghdr`: u32 len, u16 type, u16 flags, u32 seq,
/// u32 pid, then the payload, each message padded to 4 bytes).
fn messages(buf: &[u8]) -> impl Iterator<Item = (usize, usize, u16)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let hdr = buf.get(at..at + 16)?;
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let kind = u16::from_ne_bytes([hdr[4], hdr[5]]);
        if len < 16 || at + len > buf.len() {
            return None;
        }
        let here = at;
        at += (len + 3) & !3;
        Some((here, len, kind))
    })
}

/// Clears `NLM_F_ACK` on every message of a batch we built.
pub(super) fn clear_ack_flags(buf: &mut [u8]) {
    let at: Vec<usize> = messages(buf).map(|(at, _, _)| at).collect();
    for a in at {
        let flags = u16::from_ne_bytes([buf[a + 6], buf[a + 7]]) & !NLM_F_ACK;
        buf[a + 6..a + 8].copy_from_slice(&flags.to_ne_bytes());
    }
}

/// The first non-zero error code (positive errno) among `NLMSG_ERROR` replies in `buf`.
fn first_error(buf: &[u8]) -> Option<i32> {
    messages(buf)
        .filter(|(_, len, kind)| *kind == NLMSG_ERROR && *len >= 20)
        .map(|(at, _, _)| {
            i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]])
        })
        .find(|code| *code != 0)
        .map(|code| -code)
}

/// Sets a socket buffer size: the `FORCE` option (CAP_NET_ADMIN, which applying nftables
/// needs anyway) past the system limit, else the plain one.
fn set_buffer(fd: i32, force: i32, plain: i32, size: i32) -> std::io::Result<()> {
    for opt in [force, plain] {
        // SAFETY: setsockopt with a pointer to a local int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(payload);
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn ack_flags_are_cleared_on_every_message_and_nothing_else_changes() {
        let mut buf = nlmsg(0x10, NLM_F_ACK | 1, &[1, 2, 3]);
        buf.extend(nlmsg(0xa06, NLM_F_ACK | 0x400, &[9; 8]));
        let before = buf.clone();
        clear_ack_flags(&mut buf);
        let flags: Vec<u16> = messages(&buf)
            .map(|(at, _, _)| u16::from_ne_bytes([buf[at + 6], buf[at + 7]]))
            .collect();
        assert_eq!(flags, vec![1, 0x400]);
        assert_eq!(buf.len(), before.len());
        assert_eq!(buf[16..19], before[16..19]);
    }

    #[test]
    fn an_error_reply_is_found_and_an_ack_is_not_an_error() {
        let ok = nlmsg(NLMSG_ERROR, 0, &0i32.to_ne_bytes());
        assert_eq!(first_error(&ok), None);
        let mut both = ok.clone();
        both.extend(nlmsg(NLMSG_ERROR, 0, &(-libc::ENOENT).to_ne_bytes()));
        assert_eq!(first_error(&both), Some(libc::ENOENT));
        // A truncated or garbage buffer is not read past its end.
        assert_eq!(first_error(&both[..20]), None);
        assert_eq!(first_error(&[0xff; 7]), None);
    }
}
