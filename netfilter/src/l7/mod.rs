//! Application protocol detection from the first payload bytes of a flow.
//!
//! A rule with `app: redis` allows a flow only when its payload *is* Redis, whatever the
//! port. Each detector looks at the first bytes one side sent (the side that speaks first
//! in that protocol), and answers `Match`, `NoMatch`, or `NeedMore` when the bytes so far are
//! a valid prefix too short to tell. Detectors are total over arbitrary bytes and allocate
//! nothing.

pub mod h2;
pub mod hpack;
mod wire;

use crate::policy::AppProto;

/// Which end of the flow sent the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The initiator.
    Client,
    /// The responder.
    Server,
}

/// A detector's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// The bytes are this protocol.
    Match,
    /// The bytes are not this protocol.
    NoMatch,
    /// A valid prefix; more bytes are needed.
    NeedMore,
}

/// Bytes of a flow's first payload kept for detection; a flow still undecided after this
/// many bytes does not match.
pub const DETECT_BYTES: usize = 512;

/// The side that sends first in `app`.
pub fn first_speaker(app: AppProto) -> Side {
    match app {
        AppProto::Mysql | AppProto::Nats | AppProto::Smtp => Side::Server,
        _ => Side::Client,
    }
}

/// Runs the detector of `app` on the first bytes `side` sent. `datagram` is set for UDP,
/// where one datagram is all there is (so `NeedMore` becomes `NoMatch`).
pub fn detect(app: AppProto, side: Side, data: &[u8], datagram: bool) -> Detection {
    if side != first_speaker(app) {
        return Detection::NoMatch;
    }
    let d = match app {
        AppProto::Http => http(data),
        AppProto::Tls => tls(data),
        AppProto::Dns => {
            if datagram {
                dns_message(data)
            } else {
                dns_tcp(data)
            }
        }
        AppProto::Redis => redis(data),
        AppProto::Postgres => postgres(data),
        AppProto::Mysql => mysql(data),
        AppProto::Grpc => h2::grpc(data),
        AppProto::Http2 => h2::http2(data),
        AppProto::Ssh => wire::ssh(data),
        AppProto::Kafka => wire::kafka(data),
        AppProto::Mongodb => wire::mongodb(data),
        AppProto::Mssql => wire::mssql(data),
        AppProto::Oracle => wire::oracle(data),
        AppProto::Cassandra => wire::cassandra(data),
        AppProto::Memcached => wire::memcached(data),
        AppProto::Amqp => wire::amqp(data),
        AppProto::Mqtt => wire::mqtt(data),
        AppProto::Nats => wire::nats(data),
        AppProto::Zookeeper => wire::zookeeper(data),
        AppProto::Ldap => wire::ldap(data),
        AppProto::Smtp => wire::smtp(data),
        AppProto::Sip => wire::sip(data),
        AppProto::Rtsp => wire::rtsp(data),
        AppProto::Ntp => wire::ntp(data),
        AppProto::Dhcp => wire::dhcp(data),
        AppProto::Syslog => wire::syslog(data),
    };
    if datagram && d == Detection::NeedMore {
        Detection::NoMatch
    } else {
        d
    }
}

/// Learn mode's order: the specific before the general (gRPC is HTTP/2, which the `http`
/// detector accepts too).
const IDENTIFY_ORDER: [AppProto; AppProto::COUNT] = {
    let mut o = AppProto::ALL;
    // Move gRPC and HTTP/2 (indices 6 and 7) to the front.
    let mut i = 7;
    while i >= 2 {
        o[i] = o[i - 2];
        i -= 1;
    }
    o[0] = AppProto::Grpc;
    o[1] = AppProto::Http2;
    o
};

/// The app the bytes are, for learn mode: the first in a specific-first order that
/// matches. `None` while gRPC or HTTP/2 still need bytes (an HTTP/2 preface is HTTP too,
/// but the request after it tells whether it is gRPC), unless `data` is all there will be
/// (a datagram, or [`DETECT_BYTES`] held).
pub fn identify(side: Side, data: &[u8], datagram: bool) -> Option<AppProto> {
    let last = datagram || data.len() >= DETECT_BYTES;
    for (i, a) in IDENTIFY_ORDER.into_iter().enumerate() {
        match detect(a, side, data, datagram) {
            Detection::Match => return Some(a),
            Detection::NeedMore if !last && i < 2 => return None,
            _ => {}
        }
    }
    None
}

/// The transports an app runs over: (TCP, UDP).
pub fn transports(app: AppProto) -> (bool, bool) {
    match app {
        AppProto::Dns | AppProto::Syslog | AppProto::Sip => (true, true),
        AppProto::Ntp | AppProto::Dhcp => (false, true),
        _ => (true, false),
    }
}

/// `Match` when `data` starts with `lit`, `NeedMore` when `data` is a prefix of it.
pub(crate) fn literal(data: &[u8], lit: &[u8]) -> Detection {
    let n = data.len().min(lit.len());
    if data[..n] != lit[..n] {
        Detection::NoMatch
    } else if n < lit.len() {
        Detection::NeedMore
    } else {
        Detection::Match
    }
}

/// Which of `lits` `data` starts with: `Ok(index)` of the first it starts with, else
/// `Err(NeedMore)` when `data` is a prefix of one of them, `Err(NoMatch)` otherwise.
pub(crate) fn one_of(data: &[u8], lits: &[&[u8]]) -> Result<usize, Detection> {
    let mut prefix = false;
    for (i, lit) in lits.iter().enumerate() {
        match literal(data, lit) {
            Detection::Match => return Ok(i),
            Detection::NeedMore => prefix = true,
            Detection::NoMatch => {}
        }
    }
    Err(if prefix {
        Detection::NeedMore
    } else {
        Detection::NoMatch
    })
}

const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

fn http(d: &[u8]) -> Detection {
    if literal(d, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") != Detection::NoMatch {
        return literal(d, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    }
    match one_of(d, &HTTP_METHODS) {
        Ok(i) => http_after_method(&d[HTTP_METHODS[i].len()..]),
        Err(e) => e,
    }
}

/// Request-target (visible ASCII) then ` HTTP/1.x\r\n`.
fn http_after_method(d: &[u8]) -> Detection {
    let Some(&first) = d.first() else {
        return Detection::NeedMore;
    };
    if !(first == b'/' || first == b'*' || first.is_ascii_alphanumeric()) {
        return Detection::NoMatch;
    }
    for (i, &c) in d.iter().enumerate() {
        if c == b' ' {
            let rest = &d[i + 1..];
            return match literal(rest, b"HTTP/1.") {
                Detection::Match => match rest.get(7) {
                    None => Detection::NeedMore,
                    Some(v) if v.is_ascii_digit() => literal(&rest[8..], b"\r\n"),
                    Some(_) => Detection::NoMatch,
                },
                other => other,
            };
        }
        if !(0x21..=0x7e).contains(&c) {
            return Detection::NoMatch;
        }
    }
    // A long request-target of visible ASCII after a method: that is HTTP.
    if d.len() >= 32 {
        Detection::Match
    } else {
        Detection::NeedMore
    }
}

fn tls(d: &[u8]) -> Detection {
    // Record: type 22 (handshake), version 3.x, length; handshake type 1 (ClientHello),
    // 24-bit length, client_version 3.x.
    type Check = (usize, fn(u8) -> bool);
    let checks: [Check; 7] = [
        (0, |b| b == 0x16),
        (1, |b| b == 0x03),
        (2, |b| b <= 0x04),
        (5, |b| b == 0x01),
        (6, |b| b == 0x00),
        (9, |b| b == 0x03),
        (10, |b| b <= 0x04),
    ];
    for (off, ok) in checks {
        match d.get(off) {
            None => return Detection::NeedMore,
            Some(b) if !ok(*b) => return Detection::NoMatch,
            _ => {}
        }
    }
    let rec_len = usize::from(u16::from_be_bytes([d[3], d[4]]));
    let hs_len = usize::from(d[7]) << 8 | usize::from(d[8]);
    if !(1..=16384 + 2048).contains(&rec_len) || hs_len < 34 {
        return Detection::NoMatch;
    }
    Detection::Match
}

/// A DNS query message (RFC 1035 §4.1): header, then a well-formed question.
fn dns_message(d: &[u8]) -> Detection {
    if d.len() < 12 {
        return Detection::NeedMore;
    }
    let flags = u16::from_be_bytes([d[2], d[3]]);
    let qr = flags >> 15;
    let opcode = (flags >> 11) & 0xf;
    let qd = u16::from_be_bytes([d[4], d[5]]);
    let an = u16::from_be_bytes([d[6], d[7]]);
    let ns = u16::from_be_bytes([d[8], d[9]]);
    let ar = u16::from_be_bytes([d[10], d[11]]);
    if qr != 0 || opcode > 5 || qd != 1 || an != 0 || ns > 1 || ar > 2 {
        return Detection::NoMatch;
    }
    let mut i = 12;
    let mut name_len = 0usize;
    loop {
        let Some(&l) = d.get(i) else {
            return Detection::NeedMore;
        };
        if l == 0 {
            i += 1;
            break;
        }
        if l > 63 {
            return Detection::NoMatch;
        }
        name_len += usize::from(l) + 1;
        if name_len > 255 {
            return Detection::NoMatch;
        }
        let Some(label) = d.get(i + 1..i + 1 + usize::from(l)) else {
            return Detection::NeedMore;
        };
        if !label
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        {
            return Detection::NoMatch;
        }
        i += 1 + usize::from(l);
    }
    if d.len() < i + 4 {
        Detection::NeedMore
    } else {
        Detection::Match
    }
}

fn dns_tcp(d: &[u8]) -> Detection {
    if d.len() < 2 {
        return Detection::NeedMore;
    }
    let len = usize::from(u16::from_be_bytes([d[0], d[1]]));
    if len < 17 {
        return Detection::NoMatch;
    }
    dns_message(&d[2..])
}

const REDIS_INLINE: [&[u8]; 10] = [
    b"PING", b"AUTH ", b"HELLO", b"SELECT ", b"INFO", b"QUIT", b"ECHO ", b"CLIENT ", b"COMMAND",
    b"EXISTS ",
];

fn redis(d: &[u8]) -> Detection {
    let Some(&first) = d.first() else {
        return Detection::NeedMore;
    };
    if first == b'*' {
        // *<count>\r\n$<len>\r\n<command>
        let (n, rest) = match resp_int(&d[1..]) {
            Ok(x) => x,
            Err(e) => return e,
        };
        if !(1..=1024 * 1024).contains(&n) {
            return Detection::NoMatch;
        }
        match rest.first() {
            None => return Detection::NeedMore,
            Some(b'$') => {}
            Some(_) => return Detection::NoMatch,
        }
        let (len, cmd) = match resp_int(&rest[1..]) {
            Ok(x) => x,
            Err(e) => return e,
        };
        if !(1..=32).contains(&len) {
            return Detection::NoMatch;
        }
        let want = len as usize;
        let have = cmd.len().min(want);
        if !cmd[..have]
            .iter()
            .all(|c| c.is_ascii_alphabetic() || *c == b'_' || *c == b'.')
        {
            return Detection::NoMatch;
        }
        if cmd.len() < want + 2 {
            return Detection::NeedMore;
        }
        return literal(&cmd[want..], b"\r\n");
    }
    // Inline commands, case-insensitive.
    let mut prefix = false;
    for c in REDIS_INLINE {
        let n = d.len().min(c.len());
        if d[..n].eq_ignore_ascii_case(&c[..n]) {
            if n < c.len() {
                prefix = true;
                continue;
            }
            match d.get(c.len()) {
                None if c.ends_with(b" ") => return Detection::Match,
                None => prefix = true,
                Some(b'\r' | b' ') => return Detection::Match,
                Some(_) if c.ends_with(b" ") => return Detection::Match,
                Some(_) => {}
            }
        }
    }
    if prefix {
        Detection::NeedMore
    } else {
        Detection::NoMatch
    }
}

/// Parses `<digits>\r\n`, returning the number and what follows.
fn resp_int(d: &[u8]) -> Result<(i64, &[u8]), Detection> {
    let mut n: i64 = 0;
    for (i, &c) in d.iter().enumerate() {
        match c {
            b'0'..=b'9' if i < 10 => n = n * 10 + i64::from(c - b'0'),
            b'\r' if i > 0 => {
                return match d.get(i + 1) {
                    None => Err(Detection::NeedMore),
                    Some(b'\n') => Ok((n, &d[i + 2..])),
                    Some(_) => Err(Detection::NoMatch),
                };
            }
            _ => return Err(Detection::NoMatch),
        }
    }
    Err(Detection::NeedMore)
}

fn postgres(d: &[u8]) -> Detection {
    if d.len() < 8 {
        // A startup length is small: the first byte must be zero.
        return if d.first().is_some_and(|b| *b != 0) {
            Detection::NoMatch
        } else {
            Detection::NeedMore
        };
    }
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let code = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    match code {
        // SSLRequest, GSSENCRequest.
        80_877_103 | 80_877_104 if len == 8 => Detection::Match,
        // CancelRequest.
        80_877_102 if len == 16 => Detection::Match,
        // StartupMessage v3.0: parameters are NUL-terminated visible strings.
        196_608 if (9..=10_000).contains(&len) => match d.get(8) {
            None => Detection::NeedMore,
            Some(c) if c.is_ascii_lowercase() || *c == b'_' => Detection::Match,
            Some(_) => Detection::NoMatch,
        },
        _ => Detection::NoMatch,
    }
}

fn mysql(d: &[u8]) -> Detection {
    // Initial handshake v10: 3-byte length (LE), sequence 0, protocol 10, version string.
    if d.len() < 6 {
        return match (d.get(3), d.get(4)) {
            (Some(s), _) if *s != 0 => Detection::NoMatch,
            (_, Some(p)) if *p != 10 => Detection::NoMatch,
            _ => Detection::NeedMore,
        };
    }
    let len = usize::from(d[0]) | usize::from(d[1]) << 8 | usize::from(d[2]) << 16;
    if d[3] != 0 || d[4] != 10 || !(20..=1024).contains(&len) {
        return Detection::NoMatch;
    }
    for &c in &d[5..] {
        if c == 0 {
            return Detection::Match;
        }
        if !(0x20..=0x7e).contains(&c) {
            return Detection::NoMatch;
        }
    }
    if d.len() >= 5 + 48 {
        Detection::NoMatch
    } else {
        Detection::NeedMore
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AppProto::*;
    use Detection::*;

    fn c(app: AppProto, d: &[u8]) -> Detection {
        detect(app, Side::Client, d, false)
    }

    #[test]
    fn http_request_line_matches_and_other_protocols_do_not() {
        assert_eq!(c(Http, b"GET /index.html HTTP/1.1\r\nHost: x\r\n"), Match);
        assert_eq!(c(Http, b"POST /pay HTTP/1.0\r\n"), Match);
        assert_eq!(c(Http, b"GE"), NeedMore);
        assert_eq!(c(Http, b"GET /x HTTP/2"), NoMatch);
        assert_eq!(c(Http, b"*1\r\n$4\r\nPING\r\n"), NoMatch);
        assert_eq!(c(Http, b"\x16\x03\x01\x00\xa5\x01"), NoMatch);
    }

    #[test]
    fn redis_resp_and_inline_match_but_http_does_not() {
        assert_eq!(c(Redis, b"*1\r\n$4\r\nPING\r\n"), Match);
        assert_eq!(c(Redis, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n"), Match);
        assert_eq!(c(Redis, b"PING\r\n"), Match);
        assert_eq!(c(Redis, b"*2\r\n$3\r\nGE"), NeedMore);
        assert_eq!(c(Redis, b"GET / HTTP/1.1\r\n"), NoMatch);
        assert_eq!(c(Redis, b"*1\r\n$4\r\nP\x00NG\r\n"), NoMatch);
    }

    #[test]
    fn postgres_startup_and_ssl_request_match() {
        let mut startup = vec![0, 0, 0, 40, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0app\0database\0cards\0\0");
        assert_eq!(c(Postgres, &startup), Match);
        assert_eq!(c(Postgres, &[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]), Match);
        assert_eq!(c(Postgres, b"GET / HTTP/1.1\r\n"), NoMatch);
        assert_eq!(c(Postgres, &[0, 0]), NeedMore);
    }

    #[test]
    fn tls_client_hello_matches_and_plaintext_does_not() {
        let hello = [
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x11,
        ];
        assert_eq!(c(Tls, &hello), Match);
        assert_eq!(c(Tls, &hello[..4]), NeedMore);
        assert_eq!(c(Tls, b"GET / HTTP/1.1\r\n"), NoMatch);
    }

    #[test]
    fn dns_query_matches_over_udp_and_garbage_does_not() {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x03api\x07example\x03com\x00\x00\x01\x00\x01");
        assert_eq!(detect(Dns, Side::Client, &q, true), Match);
        assert_eq!(detect(Dns, Side::Client, &q[..14], true), NoMatch);
        assert_eq!(
            detect(Dns, Side::Client, b"hello world, not dns", true),
            NoMatch
        );
        let mut tcp = vec![0, q.len() as u8];
        tcp.extend_from_slice(&q);
        assert_eq!(detect(Dns, Side::Client, &tcp, false), Match);
    }

    #[test]
    fn mysql_is_detected_from_the_server_greeting_only() {
        let mut g = vec![74, 0, 0, 0, 10];
        g.extend_from_slice(b"8.0.36\0");
        assert_eq!(detect(Mysql, Side::Server, &g, false), Match);
        assert_eq!(detect(Mysql, Side::Client, &g, false), NoMatch);
        assert_eq!(
            detect(Mysql, Side::Server, b"HTTP/1.1 200 OK\r\n", false),
            NoMatch
        );
    }

    #[test]
    fn identify_names_the_protocol_for_learn_mode() {
        assert_eq!(
            identify(Side::Client, b"GET / HTTP/1.1\r\n", false),
            Some(Http)
        );
        assert_eq!(
            identify(Side::Client, b"*1\r\n$4\r\nPING\r\n", false),
            Some(Redis)
        );
        assert_eq!(identify(Side::Client, b"\x00\x01\x02garbage", false), None);
    }

    #[test]
    fn protocols_without_a_captured_client_match_their_specification() {
        // SMTP (RFC 5321 §4.2) and NATS greet first.
        let smtp = b"220 mail.example.org ESMTP Postfix (Debian/GNU)\r\n";
        assert_eq!(detect(Smtp, Side::Server, smtp, false), Match);
        assert_eq!(detect(Smtp, Side::Client, smtp, false), NoMatch);
        assert_eq!(detect(Smtp, Side::Server, b"220", false), NeedMore);
        assert_eq!(detect(Smtp, Side::Server, b"200 OK\r\n", false), NoMatch);
        // SIP (RFC 3261 §7.1), over UDP.
        let sip = b"REGISTER sip:registrar.example.com SIP/2.0\r\nVia: SIP/2.0/UDP x\r\n";
        assert_eq!(detect(Sip, Side::Client, sip, true), Match);
        assert_eq!(
            detect(Sip, Side::Client, b"REGISTER sip:x HTTP/1.1\r\n", true),
            NoMatch
        );
        // RTSP (RFC 2326 §6.1).
        let rtsp = b"OPTIONS rtsp://cam.example.com/stream RTSP/1.0\r\nCSeq: 1\r\n";
        assert_eq!(c(Rtsp, rtsp), Match);
        assert_eq!(c(Http, rtsp), NoMatch);
        // DHCP (RFC 2131 §2): a DISCOVER.
        let mut dhcp = vec![1u8, 1, 6, 0, 0x39, 0x03, 0xf3, 0x26];
        dhcp.resize(236, 0);
        dhcp.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 53, 1, 1, 0xff]);
        assert_eq!(detect(Dhcp, Side::Client, &dhcp, true), Match);
        dhcp[236] = 0;
        assert_eq!(detect(Dhcp, Side::Client, &dhcp, true), NoMatch);
        // UDP-only and TCP-only protocols say so.
        assert_eq!(transports(Ntp), (false, true));
        assert_eq!(transports(Kafka), (true, false));
    }

    #[test]
    fn learn_mode_waits_for_the_request_that_tells_grpc_from_http2() {
        let g = h2::tests::client_bytes("/a.B/C", "application/grpc");
        assert_eq!(identify(Side::Client, &g[..30], false), None);
        assert_eq!(identify(Side::Client, &g, false), Some(Grpc));
        let h = h2::tests::client_bytes("/index.html", "text/html");
        assert_eq!(identify(Side::Client, &h, false), Some(Http2));
        const { assert!(AppProto::COUNT >= 24) };
    }
}
