//! Detectors of the application protocols beyond the first six: each reads the first bytes
//! its protocol's first speaker sends and answers `Match`, `NoMatch` or `NeedMore`. Each is
//! total over arbitrary bytes (no indexing without a bound check) and allocates nothing;
//! the references are the protocols' own specifications, and the tests in
//! `netfilter/tests/l7_clients.rs` feed them bytes captured from real clients.

use super::{literal, one_of, Detection};
use Detection::{Match, NeedMore, NoMatch};

/// The byte at `i`, or `Err(NeedMore)`.
fn at(d: &[u8], i: usize) -> Result<u8, Detection> {
    d.get(i).copied().ok_or(NeedMore)
}

fn be16(d: &[u8], i: usize) -> Result<u16, Detection> {
    Ok(u16::from_be_bytes([at(d, i)?, at(d, i + 1)?]))
}

fn be32(d: &[u8], i: usize) -> Result<u32, Detection> {
    Ok(u32::from_be_bytes([
        at(d, i)?,
        at(d, i + 1)?,
        at(d, i + 2)?,
        at(d, i + 3)?,
    ]))
}

fn le32(d: &[u8], i: usize) -> Result<u32, Detection> {
    Ok(u32::from_le_bytes([
        at(d, i)?,
        at(d, i + 1)?,
        at(d, i + 2)?,
        at(d, i + 3)?,
    ]))
}

/// `Err(NoMatch)` unless `ok`.
fn need(ok: bool) -> Result<(), Detection> {
    if ok {
        Ok(())
    } else {
        Err(NoMatch)
    }
}

fn run(f: impl FnOnce() -> Result<Detection, Detection>) -> Detection {
    f().unwrap_or_else(|e| e)
}

/// Visible ASCII or space, up to `end` (a byte that ends the run) within `max` bytes:
/// `Match` when `end` is found, `NeedMore` while the prefix is clean and short.
fn printable_until(d: &[u8], end: u8, max: usize) -> Detection {
    for (i, &c) in d.iter().enumerate() {
        if c == end {
            return Match;
        }
        if i >= max || !(0x20..=0x7e).contains(&c) {
            return NoMatch;
        }
    }
    NeedMore
}

/// SSH (RFC 4253 §4.2): `SSH-2.0-` (or `SSH-1.99-`) then the software version.
pub fn ssh(d: &[u8]) -> Detection {
    match literal(d, b"SSH-") {
        Match => {}
        other => return other,
    }
    let rest = &d[4..];
    match (literal(rest, b"2.0-"), literal(rest, b"1.99-")) {
        (Match, _) => printable_until(&rest[4..], b'\r', 250),
        (_, Match) => printable_until(&rest[5..], b'\r', 250),
        (NeedMore, _) | (_, NeedMore) => NeedMore,
        _ => NoMatch,
    }
}

/// Kafka (the protocol guide): the first request of a connection, ApiVersions (18),
/// Metadata (3) or SaslHandshake (17): size (i32), api_key (i16), api_version (i16),
/// correlation_id (i32), client_id (nullable string of visible ASCII).
pub fn kafka(d: &[u8]) -> Detection {
    run(|| {
        let size = be32(d, 0)?;
        need((10..=100 << 20).contains(&size))?;
        let key = be16(d, 4)?;
        need(matches!(key, 3 | 17 | 18))?;
        let version = be16(d, 6)?;
        need(version <= 20)?;
        be32(d, 8)?;
        let id_len = be16(d, 12)? as i16;
        need((-1..=256).contains(&id_len) && (14 + id_len.max(0) as u32) <= size + 4)?;
        let n = id_len.max(0) as usize;
        for i in 0..n.min(d.len().saturating_sub(14)) {
            let c = d[14 + i];
            need((0x20..=0x7e).contains(&c))?;
        }
        Ok(if d.len() >= 14 + n { Match } else { NeedMore })
    })
}

/// MongoDB wire protocol: a message header (length, requestID, responseTo = 0, opCode
/// OP_MSG 2013, OP_QUERY 2004 or OP_COMPRESSED 2012, little-endian) and the start of the
/// body: OP_MSG flag bits (only the defined ones) and a section kind 0 or 1; OP_QUERY a
/// `db.$cmd`-style collection name.
pub fn mongodb(d: &[u8]) -> Detection {
    run(|| {
        let len = le32(d, 0)?;
        need((21..=48 << 20).contains(&len))?;
        le32(d, 4)?;
        need(le32(d, 8)? == 0)?;
        match le32(d, 12)? {
            2013 => {
                let flags = le32(d, 16)?;
                need(flags & !0x0001_0003 == 0)?;
                need(at(d, 20)? <= 1)?;
                // A BSON document: its length, at least 5.
                let doc = le32(d, 21)?;
                need(doc >= 5 && doc <= len)?;
                Ok(Match)
            }
            2004 => {
                le32(d, 16)?;
                // fullCollectionName: cstring with a dot.
                let name = d.get(20..).unwrap_or(&[]);
                let mut dot = false;
                for (i, &c) in name.iter().enumerate() {
                    if c == 0 {
                        return Ok(if dot && i > 2 { Match } else { NoMatch });
                    }
                    need(i < 128 && (0x21..=0x7e).contains(&c))?;
                    dot |= c == b'.';
                }
                Ok(NeedMore)
            }
            2012 => {
                let orig = le32(d, 16)?;
                need(matches!(orig, 2004 | 2013))?;
                Ok(Match)
            }
            _ => Err(NoMatch),
        }
    })
}

/// Microsoft SQL Server TDS (MS-TDS §2.2.3): a packet header of type PRELOGIN (0x12),
/// LOGIN7 (0x10) or SQL batch (0x01), status with only EOM/ignore/reset bits, a length
/// 8..=32,768, window 0; a PRELOGIN's first option is VERSION (0) at a sane offset.
pub fn mssql(d: &[u8]) -> Detection {
    run(|| {
        let ty = at(d, 0)?;
        need(matches!(ty, 0x12 | 0x10 | 0x01))?;
        need(at(d, 1)? & !0x1b == 0)?;
        let len = be16(d, 2)?;
        need((8..=32_768).contains(&len))?;
        need(at(d, 7)? == 0)?;
        if ty == 0x12 {
            need(at(d, 8)? == 0)?;
            let off = be16(d, 9)?;
            need(off >= 6 && off < len)?;
            need(be16(d, 11)? == 6)?;
        }
        Ok(Match)
    })
}

/// Oracle Net TNS: a CONNECT packet (type 1): length, zero packet checksum, flags, zero
/// header checksum, then version (300..=320) and the lowest version it speaks.
pub fn oracle(d: &[u8]) -> Detection {
    run(|| {
        let len = be16(d, 0)?;
        need(len == 0 || len >= 34)?;
        need(be16(d, 2)? == 0)?;
        need(at(d, 4)? == 1)?;
        need(be16(d, 6)? == 0)?;
        let version = be16(d, 8)?;
        need((300..=320).contains(&version))?;
        let lowest = be16(d, 10)?;
        need((300..=version).contains(&lowest))?;
        Ok(Match)
    })
}

/// Cassandra CQL native protocol v3–v5: a request frame (direction bit clear) OPTIONS
/// (0x05, empty body) or STARTUP (0x01, a string map with `CQL_VERSION`).
pub fn cassandra(d: &[u8]) -> Detection {
    run(|| {
        need(matches!(at(d, 0)?, 3..=5))?;
        need(at(d, 1)? & !0x1f == 0)?;
        be16(d, 2)?;
        let op = at(d, 4)?;
        let len = be32(d, 5)?;
        match op {
            0x05 => need(len == 0).map(|_| Match),
            0x01 => {
                need((2..=4096).contains(&len))?;
                let pairs = be16(d, 9)?;
                need((1..=16).contains(&pairs))?;
                Ok(Match)
            }
            _ => Err(NoMatch),
        }
    })
}

const MEMCACHED: [&[u8]; 22] = [
    b"get ",
    b"gets ",
    b"gat ",
    b"gats ",
    b"set ",
    b"add ",
    b"replace ",
    b"append ",
    b"prepend ",
    b"cas ",
    b"delete ",
    b"incr ",
    b"decr ",
    b"touch ",
    b"stats",
    b"version\r\n",
    b"verbosity ",
    b"flush_all",
    b"mg ",
    b"ms ",
    b"md ",
    b"mn\r\n",
];

/// memcached: a text command (lower case) with its arguments, or a binary request (magic
/// 0x80, a known opcode, data type 0, a body length covering key and extras).
pub fn memcached(d: &[u8]) -> Detection {
    if d.first() == Some(&0x80) {
        return run(|| {
            need(at(d, 1)? <= 0x48)?;
            let key = be16(d, 2)?;
            let extras = at(d, 4)?;
            need(at(d, 5)? == 0)?;
            let body = be32(d, 8)?;
            need(u32::from(key) + u32::from(extras) <= body && body <= 1 << 20)?;
            Ok(Match)
        });
    }
    match one_of(d, &MEMCACHED) {
        // A command that is its whole line.
        Ok(i) if MEMCACHED[i].ends_with(b"\n") => Match,
        // The arguments: visible ASCII to the end of the line.
        Ok(i) => printable_until(&d[MEMCACHED[i].len()..], b'\r', 300),
        Err(e) => e,
    }
}

/// AMQP: the protocol header, `AMQP` then 0-9-1 (`0 0 9 1`) or 1.0 (`0|2|3 1 0 0`).
pub fn amqp(d: &[u8]) -> Detection {
    match literal(d, b"AMQP") {
        Match => {}
        other => return other,
    }
    let v = &d[4..];
    let known: [&[u8]; 4] = [
        b"\x00\x00\x09\x01",
        b"\x00\x01\x00\x00",
        b"\x02\x01\x00\x00",
        b"\x03\x01\x00\x00",
    ];
    one_of(v, &known).map_or_else(|e| e, |_| Match)
}

/// MQTT: a CONNECT packet (0x10), its remaining length, and the protocol name `MQTT`
/// (levels 4 and 5) or `MQIsdp` (level 3).
pub fn mqtt(d: &[u8]) -> Detection {
    run(|| {
        need(at(d, 0)? == 0x10)?;
        let mut i = 1;
        let mut len = 0u32;
        loop {
            let b = at(d, i)?;
            len |= u32::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            need(i < 5)?;
        }
        need(len >= 10)?;
        let rest = d.get(i..).unwrap_or(&[]);
        for (name, level) in [
            (&b"\x00\x04MQTT"[..], &[4u8, 5][..]),
            (b"\x00\x06MQIsdp", &[3]),
        ] {
            match literal(rest, name) {
                Match => {
                    let l = at(rest, name.len())?;
                    return Ok(if level.contains(&l) { Match } else { NoMatch });
                }
                NeedMore => return Ok(NeedMore),
                NoMatch => {}
            }
        }
        Err(NoMatch)
    })
}

/// NATS: the server's greeting, `INFO {`.
pub fn nats(d: &[u8]) -> Detection {
    literal(d, b"INFO {")
}

const ZK_WORDS: [&[u8]; 17] = [
    b"ruok", b"stat", b"srvr", b"conf", b"cons", b"dump", b"envi", b"mntr", b"wchs", b"wchc",
    b"wchp", b"isro", b"crst", b"srst", b"dirs", b"gtmk", b"stmk",
];

/// ZooKeeper: a ConnectRequest (length 44..=300, protocol version 0, a timeout, a
/// password of 16 bytes or none), or one of the four-letter admin words.
pub fn zookeeper(d: &[u8]) -> Detection {
    if d.first().is_some_and(|c| c.is_ascii_lowercase()) {
        return one_of(d, &ZK_WORDS).map_or_else(|e| e, |_| Match);
    }
    run(|| {
        let len = be32(d, 0)?;
        need((44..=300).contains(&len))?;
        need(be32(d, 4)? == 0)?;
        // lastZxidSeen (8 bytes), then the session timeout in ms.
        let timeout = be32(d, 16)?;
        need((1..=86_400_000).contains(&timeout))?;
        let passwd = be32(d, 28)?;
        need(passwd == 16 || passwd == 0)?;
        Ok(Match)
    })
}

/// LDAP (RFC 4511): an LDAPMessage SEQUENCE, a messageID INTEGER of 1..=4 bytes, and a
/// request operation (bind, unbind, search, modify, add, delete, modDN, compare,
/// abandon, extended).
pub fn ldap(d: &[u8]) -> Detection {
    run(|| {
        need(at(d, 0)? == 0x30)?;
        let l = at(d, 1)?;
        let mut i = 2;
        if l & 0x80 != 0 {
            let n = usize::from(l & 0x7f);
            need((1..=4).contains(&n))?;
            i += n;
        }
        need(at(d, i)? == 0x02)?;
        let id_len = usize::from(at(d, i + 1)?);
        need((1..=4).contains(&id_len))?;
        let op = at(d, i + 2 + id_len)?;
        need(matches!(
            op,
            0x60 | 0x42 | 0x63 | 0x66 | 0x68 | 0x4a | 0x6c | 0x6e | 0x50 | 0x77
        ))?;
        Ok(Match)
    })
}

/// SMTP (RFC 5321 §4.2): the server's `220` greeting line (`220 ` or `220-`), visible
/// ASCII to its CRLF.
pub fn smtp(d: &[u8]) -> Detection {
    match (literal(d, b"220 "), literal(d, b"220-")) {
        (Match, _) | (_, Match) => printable_until(&d[4..], b'\r', 500),
        (NeedMore, _) | (_, NeedMore) => NeedMore,
        _ => NoMatch,
    }
}

/// A request line `METHOD target VERSION\r\n` with one of `methods` and the version
/// literal `version`.
fn request_line(d: &[u8], methods: &[&[u8]], version: &[u8]) -> Detection {
    let rest = match one_of(d, methods) {
        Ok(i) => &d[methods[i].len()..],
        Err(e) => return e,
    };
    let Some(sp) = rest.iter().position(|&c| c == b' ') else {
        return if rest.iter().all(|c| (0x21..=0x7e).contains(c)) {
            NeedMore
        } else {
            NoMatch
        };
    };
    if sp == 0 || !rest[..sp].iter().all(|c| (0x21..=0x7e).contains(c)) {
        return NoMatch;
    }
    literal(&rest[sp + 1..], version)
}

/// SIP (RFC 3261): a request line ending `SIP/2.0`.
pub fn sip(d: &[u8]) -> Detection {
    request_line(
        d,
        &[
            b"INVITE ",
            b"REGISTER ",
            b"OPTIONS ",
            b"ACK ",
            b"BYE ",
            b"CANCEL ",
            b"SUBSCRIBE ",
            b"NOTIFY ",
            b"MESSAGE ",
            b"INFO ",
            b"PRACK ",
            b"UPDATE ",
            b"REFER ",
            b"PUBLISH ",
        ],
        b"SIP/2.0\r\n",
    )
}

/// RTSP (RFC 2326): a request line ending `RTSP/1.0` (or 2.0).
pub fn rtsp(d: &[u8]) -> Detection {
    let methods: [&[u8]; 10] = [
        b"OPTIONS ",
        b"DESCRIBE ",
        b"SETUP ",
        b"PLAY ",
        b"PAUSE ",
        b"TEARDOWN ",
        b"ANNOUNCE ",
        b"RECORD ",
        b"GET_PARAMETER ",
        b"SET_PARAMETER ",
    ];
    match request_line(d, &methods, b"RTSP/1.0\r\n") {
        NoMatch => request_line(d, &methods, b"RTSP/2.0\r\n"),
        other => other,
    }
}

/// NTP (RFC 5905): a 48-byte (or longer, by whole 4-byte words) packet of version 1..=4
/// in client mode (3).
pub fn ntp(d: &[u8]) -> Detection {
    run(|| {
        let b = at(d, 0)?;
        need((1..=4).contains(&(b >> 3 & 7)) && b & 7 == 3)?;
        need(d.len() >= 48 && (d.len() - 48) % 4 == 0 && d.len() <= 48 + 1024)?;
        Ok(Match)
    })
}

/// DHCP (RFC 2131): a BOOTREQUEST (op 1) of Ethernet (htype 1, hlen 6) with the magic
/// cookie at byte 236.
pub fn dhcp(d: &[u8]) -> Detection {
    run(|| {
        need(at(d, 0)? == 1 && at(d, 1)? == 1 && at(d, 2)? == 6 && at(d, 3)? <= 16)?;
        need(be32(d, 236)? == 0x6382_5363)?;
        Ok(Match)
    })
}

const MONTHS: [&[u8]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Syslog: `<PRI>` (0..=191) then RFC 5424's version `1 ` or RFC 3164's `Mmm ` timestamp;
/// over TCP an RFC 6587 octet count may come first.
pub fn syslog(d: &[u8]) -> Detection {
    let mut d = d;
    // Octet counting: `123 <13>1 ...`.
    let digits = d.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 {
        if digits > 6 {
            return NoMatch;
        }
        match d.get(digits) {
            None => return NeedMore,
            Some(b' ') => d = &d[digits + 1..],
            Some(_) => return NoMatch,
        }
    }
    run(|| {
        need(at(d, 0)? == b'<')?;
        let mut pri = 0u32;
        let mut i = 1;
        loop {
            let c = at(d, i)?;
            if c == b'>' {
                need(i > 1)?;
                break;
            }
            need(c.is_ascii_digit() && i <= 3)?;
            pri = pri * 10 + u32::from(c - b'0');
            i += 1;
        }
        need(pri <= 191)?;
        let rest = &d[i + 1..];
        if let Match | NeedMore = literal(rest, b"1 ") {
            return Ok(literal(rest, b"1 "));
        }
        match one_of(rest, &MONTHS) {
            Ok(_) => Ok(literal(&rest[3..], b" ")),
            Err(NeedMore) => Ok(NeedMore),
            Err(_) => Err(NoMatch),
        }
    })
}
