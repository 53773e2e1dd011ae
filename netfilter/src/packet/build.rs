//! Builders for well-formed frames, with correct checksums: used by tests, benchmarks, the
//! demo and anything that injects crafted frames onto a tap.

use super::{proto, MacAddr, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use std::net::{IpAddr, Ipv4Addr};

/// Both ends of a frame.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    /// Source MAC.
    pub src_mac: MacAddr,
    /// Destination MAC.
    pub dst_mac: MacAddr,
    /// Source IP (v4 and v6 must not be mixed).
    pub src: IpAddr,
    /// Destination IP.
    pub dst: IpAddr,
    /// Source port (TCP/UDP) or echo identifier (ICMP).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

impl Ends {
    /// The same conversation seen from the other side.
    pub fn reversed(&self) -> Ends {
        Ends {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// Optional IP-level details.
#[derive(Debug, Clone, Copy, Default)]
pub struct IpOpts {
    /// IPv4 identification / IPv6 fragment id.
    pub id: u32,
    /// Fragment offset in 8-byte units and the more-fragments flag, if fragmented.
    pub frag: Option<(u16, bool)>,
    /// A VLAN tag to add.
    pub vlan: Option<u16>,
}

/// A TCP segment in a frame.
pub fn tcp(e: &Ends, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&e.sport.to_be_bytes());
    t.extend_from_slice(&e.dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push(5 << 4);
    t.push(flags);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(payload);
    ip(e, proto::TCP, t, IpOpts::default())
}

/// A UDP datagram in a frame.
pub fn udp(e: &Ends, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&e.sport.to_be_bytes());
    u.extend_from_slice(&e.dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    ip(e, proto::UDP, u, IpOpts::default())
}

/// An ICMP (or ICMPv6, by address family) message; `sport` is the echo identifier.
pub fn icmp(e: &Ends, ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&e.sport.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(body);
    let p = if e.src.is_ipv6() {
        proto::ICMPV6
    } else {
        proto::ICMP
    };
    ip(e, p, m, IpOpts::default())
}

/// An IP packet with the given transport bytes (checksums filled in), in a frame.
pub fn ip(e: &Ends, p: u8, mut l4: Vec<u8>, o: IpOpts) -> Vec<u8> {
    fill_l4_checksum(e, p, &mut l4);
    let mut f = eth_header(e.src_mac, e.dst_mac, o.vlan);
    match (e.src, e.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let start = f.len();
            let total = (20 + l4.len()) as u16;
            let (off, more) = o.frag.unwrap_or((0, false));
            let ff = (off & 0x1fff) | if more { 0x2000 } else { 0 };
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&(o.id as u16).to_be_bytes());
            f.extend_from_slice(&ff.to_be_bytes());
            f.extend_from_slice(&[64, p, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            let c = checksum(&[&f[start..start + 20]]);
            f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
        }
        (s, d) => {
            let (s, d) = (v6(s), v6(d));
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let frag_hdr = o.frag.is_some();
            let plen = l4.len() + if frag_hdr { 8 } else { 0 };
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(plen as u16).to_be_bytes());
            f.push(if frag_hdr { 44 } else { p });
            f.push(64);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            if let Some((off, more)) = o.frag {
                f.extend_from_slice(&[p, 0]);
                f.extend_from_slice(&((off << 3) | u16::from(more)).to_be_bytes());
                f.extend_from_slice(&o.id.to_be_bytes());
            }
        }
    }
    f.extend_from_slice(&l4);
    f
}

/// An ARP packet in a frame.
pub fn arp(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    op: u16,
    spa: Ipv4Addr,
    tha: MacAddr,
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = eth_header(src_mac, dst_mac, None);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha.0);
    f.extend_from_slice(&tpa.octets());
    f
}

fn eth_header(src: MacAddr, dst: MacAddr, vlan: Option<u16>) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    if let Some(v) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    f
}

fn v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

fn fill_l4_checksum(e: &Ends, p: u8, l4: &mut [u8]) {
    let at = match p {
        proto::TCP => 16,
        proto::UDP => 6,
        proto::ICMP => 2,
        proto::ICMPV6 => 2,
        _ => return,
    };
    if l4.len() < at + 2 {
        return;
    }
    let len = (l4.len() as u32).to_be_bytes();
    let c = match (e.src, e.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) if p != proto::ICMP => {
            let pseudo = [&s.octets()[..], &d.octets()[..], &[0, p], &len[2..]].concat();
            checksum(&[&pseudo, l4])
        }
        (IpAddr::V4(_), IpAddr::V4(_)) => checksum(&[l4]),
        (s, d) => {
            let pseudo = [
                &v6(s).octets()[..],
                &v6(d).octets()[..],
                &len[..],
                &[0, 0, 0, p],
            ]
            .concat();
            checksum(&[&pseudo, l4])
        }
    };
    let c = if p == proto::UDP && c == 0 { 0xffff } else { c };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &byte in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
                None => odd = Some(byte),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TLS 1.2/1.3 ClientHello record naming `sni` (server_name, supported_versions with
/// TLS 1.3 and 1.2, one cipher suite): what a modern client's first flight starts with.
pub fn tls_client_hello(sni: &str) -> Vec<u8> {
    let name = sni.as_bytes();
    let mut ext = Vec::new();
    // server_name: list length, host_name type 0, name length, name.
    let list = name.len() + 3;
    ext.extend_from_slice(&[0, 0]);
    ext.extend_from_slice(&((list + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(list as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    // supported_versions: TLS 1.3, TLS 1.2.
    ext.extend_from_slice(&[0, 43, 0, 5, 4, 3, 4, 3, 3]);
    let mut body = vec![3, 3];
    body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// A DNS query for `name` (type A), transaction id `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// The answer to [`dns_query`]`(id, name)`: A records of `addrs` with `ttl`.
pub fn dns_answer(id: u16, name: &str, addrs: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    let mut m = dns_query(id, name);
    m[2] = 0x81;
    m[3] = 0x80;
    m[7] = addrs.len() as u8;
    for a in addrs {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&[0, 4]);
        m.extend_from_slice(&a.octets());
    }
    m
}
