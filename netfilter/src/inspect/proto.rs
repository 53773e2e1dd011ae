//! Protocol checks of the inspector that need no stream state: TLS hello versions, DNS
//! tunneling, an HTTP request line where another protocol was agreed.

/// An HTTP/1.x request line (`METHOD SP target SP HTTP/1.x`, the line's end excluded).
pub fn is_http_request_line(line: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
    ];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(sp) = line.iter().position(|&b| b == b' ') else {
        return false;
    };
    if !METHODS.contains(&&line[..sp]) {
        return false;
    }
    let rest = &line[sp + 1..];
    let Some(sp2) = rest.iter().rposition(|&b| b == b' ') else {
        return false;
    };
    let version = &rest[sp2 + 1..];
    sp2 > 0 && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

/// What a TLS or SSL client hello says about its version, if it is one: `Some(threat
/// detail)` when it offers nothing newer than TLS 1.1 (or is SSL 2 or 3).
pub fn hello_version(data: &[u8]) -> Option<(bool, String)> {
    // SSL 2.0 hello: a two-byte record header with the top bit set, message type 1.
    if data.len() >= 5 && data[0] & 0x80 != 0 && data[2] == 1 && matches!(data[3], 0 | 3) {
        return Some((
            true,
            format!(
                "SSL 2.0-format client hello (version {}.{})",
                data[3], data[4]
            ),
        ));
    }
    if data.len() < 11 || data[0] != 0x16 || data[1] != 3 || data[5] != 1 {
        return None;
    }
    let legacy = u16::from_be_bytes([data[9], data[10]]);
    // The supported_versions extension (43) may offer TLS 1.2 or 1.3 beyond the legacy
    // field (which TLS 1.3 clients set to 1.2 anyway).
    let best = supported_versions(data).unwrap_or(legacy).max(legacy);
    match best {
        0x0300 => Some((true, "SSL 3.0 client hello".into())),
        v if v < 0x0303 => Some((
            false,
            format!(
                "client hello offers at most TLS 1.{}",
                (v & 0xff).saturating_sub(1)
            ),
        )),
        _ => None,
    }
}

/// The body of extension `want` in a ClientHello record.
fn hello_extension(d: &[u8], want: u16) -> Option<&[u8]> {
    // record(5) handshake type(1) len(3) version(2) random(32)
    let mut i = 5 + 4 + 2 + 32;
    let sid = usize::from(*d.get(i)?);
    i += 1 + sid;
    let cs = usize::from(u16::from_be_bytes([*d.get(i)?, *d.get(i + 1)?]));
    i += 2 + cs;
    let cm = usize::from(*d.get(i)?);
    i += 1 + cm;
    let ext_len = usize::from(u16::from_be_bytes([*d.get(i)?, *d.get(i + 1)?]));
    i += 2;
    let end = (i + ext_len).min(d.len());
    while i + 4 <= end {
        let ty = u16::from_be_bytes([d[i], d[i + 1]]);
        let len = usize::from(u16::from_be_bytes([d[i + 2], d[i + 3]]));
        let body = d.get(i + 4..i + 4 + len)?;
        if ty == want {
            return Some(body);
        }
        i += 4 + len;
    }
    None
}

/// The highest version in a ClientHello's supported_versions extension.
fn supported_versions(d: &[u8]) -> Option<u16> {
    let body = hello_extension(d, 43)?;
    let n = usize::from(*body.first()?);
    body.get(1..1 + n)?
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .filter(|v| v & 0x0f0f != 0x0a0a) // GREASE
        .max()
}

/// What a ClientHello says about the server it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// Not a ClientHello netd can read.
    NotHello,
    /// A hello without a server_name extension (or with no host name in it).
    Absent,
    /// The host name (RFC 6066 §3), lower case.
    Name(String),
    /// A server_name that is not a valid DNS host name.
    Invalid,
}

/// The server name in a ClientHello record (the first record: a hello is one record).
pub fn hello_sni(d: &[u8]) -> Sni {
    if d.len() < 11 || d[0] != 0x16 || d[1] != 3 || d[5] != 1 {
        return Sni::NotHello;
    }
    let Some(body) = hello_extension(d, 0) else {
        return Sni::Absent;
    };
    // server_name_list length, then (type 0 = host_name, length, name).
    let name = body
        .get(2)
        .filter(|t| **t == 0)
        .and_then(|_| body.get(3..5))
        .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        .and_then(|l| body.get(5..5 + l));
    match name {
        None => Sni::Absent,
        Some(n)
            if !n.is_empty()
                && n.len() <= 253
                && n.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_')) =>
        {
            Sni::Name(String::from_utf8_lossy(n).to_ascii_lowercase())
        }
        Some(_) => Sni::Invalid,
    }
}

/// The question name of a DNS query message, lower case, without the final dot; `None`
/// when the message is not a query with one question.
pub fn dns_query_name(msg: &[u8]) -> Option<String> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let (name, _) = read_name(msg, 12)?;
    Some(name)
}

/// Reads a (possibly compressed) domain name at `i`: the name and the offset after it in
/// the message (after the first pointer, if any). At most 255 bytes and 32 pointers.
pub fn read_name(msg: &[u8], mut i: usize) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut after = None;
    let mut jumps = 0;
    loop {
        let l = *msg.get(i)?;
        match l {
            0 => {
                return Some((out, after.unwrap_or(i + 1)));
            }
            1..=63 => {
                let label = msg.get(i + 1..i + 1 + usize::from(l))?;
                if !out.is_empty() {
                    out.push('.');
                }
                for &c in label {
                    if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                        return None;
                    }
                    out.push(char::from(c.to_ascii_lowercase()));
                }
                if out.len() > 253 {
                    return None;
                }
                i += 1 + usize::from(l);
            }
            0xc0..=0xff => {
                let off = usize::from(u16::from_be_bytes([l, *msg.get(i + 1)?]) & 0x3fff);
                after.get_or_insert(i + 2);
                jumps += 1;
                if jumps > 32 || off >= msg.len() {
                    return None;
                }
                i = off;
            }
            _ => return None,
        }
    }
}

/// Signs of data tunneled through DNS queries: `Some(detail)` when a query (a DNS message
/// over UDP, `msg`) has a label of 50 or more bytes, a name of 160 or more, asks for the
/// NULL type, or its labels below the registered domain are long and random-looking
/// (Shannon entropy above 4 bits per character over 30 or more characters), or asks TXT
/// for such a name.
pub fn dns_tunnel(msg: &[u8]) -> Option<String> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None; // too short, or a response
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    if qd == 0 {
        return None;
    }
    let mut labels: Vec<&[u8]> = Vec::new();
    let mut i = 12;
    let mut name_len = 0usize;
    loop {
        let n = usize::from(*msg.get(i)?);
        if n == 0 {
            i += 1;
            break;
        }
        if n & 0xc0 != 0 {
            return None; // compression in a question: not from an ordinary stub
        }
        let l = msg.get(i + 1..i + 1 + n)?;
        name_len += n + 1;
        labels.push(l);
        i += 1 + n;
        if labels.len() > 127 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    let longest = labels.iter().map(|l| l.len()).max().unwrap_or(0);
    if longest >= 50 {
        return Some(format!("a query label of {longest} bytes"));
    }
    if name_len >= 160 {
        return Some(format!("a query name of {name_len} bytes"));
    }
    if qtype == 10 {
        return Some("a query for type NULL".into());
    }
    // The subdomain part: everything but the last two labels.
    let sub: Vec<u8> = labels
        .iter()
        .take(labels.len().saturating_sub(2))
        .flat_map(|l| l.iter().copied())
        .collect();
    if sub.len() >= 30 {
        let h = entropy(&sub);
        if h > 4.0 {
            let ty = if qtype == 16 { "TXT " } else { "" };
            return Some(format!(
                "a {ty}query whose subdomain is {} random-looking bytes ({h:.1} bits per character)",
                sub.len()
            ));
        }
    }
    None
}

/// Shannon entropy in bits per byte.
pub fn entropy(b: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &c in b {
        counts[usize::from(c.to_ascii_lowercase())] += 1;
    }
    let n = b.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn dns_tunnels_are_told_from_ordinary_names() {
        for ok in [
            "www.example.com",
            "api.payments.svc.cluster.local",
            "r3---sn-4g5e6nsz.googlevideo.com",
            "_https._tcp.acquirer.example",
        ] {
            assert_eq!(dns_tunnel(&query(ok, 1)), None, "{ok}");
        }
        let long = format!("{}.t.example", "a".repeat(55));
        assert!(dns_tunnel(&query(&long, 1))
            .unwrap()
            .contains("label of 55"));
        assert!(dns_tunnel(&query("x.example", 10))
            .unwrap()
            .contains("NULL"));
        let b32 = "mzxw6ytboi2dsnrzgm3tmnbqgezdgnbvgy3tqojq.ga3tkmzxg44tgnjw.t.example";
        let d = dns_tunnel(&query(b32, 16)).unwrap();
        assert!(d.contains("TXT") && d.contains("random-looking"), "{d}");
        // Truncated and garbage messages are not findings, and never panic.
        let q = query(b32, 16);
        for n in 0..q.len() {
            let _ = dns_tunnel(&q[..n]);
        }
    }

    #[test]
    fn http_request_lines() {
        assert!(is_http_request_line(b"GET / HTTP/1.1\r"));
        assert!(is_http_request_line(b"POST /x?a=b HTTP/1.0"));
        assert!(!is_http_request_line(b"GET key"));
        assert!(!is_http_request_line(b"SET a b"));
        assert!(!is_http_request_line(b"GET  HTTP/1.1x"));
    }

    #[test]
    fn old_tls_versions_are_flagged() {
        // A TLS 1.0 ClientHello without extensions.
        let mut h = vec![0x16, 3, 1, 0, 45, 1, 0, 0, 41, 3, 1];
        h.extend_from_slice(&[0u8; 32]);
        h.extend_from_slice(&[0, 0, 2, 0, 0x2f, 1, 0]);
        let (ssl, d) = hello_version(&h).unwrap();
        assert!(!ssl);
        assert!(d.contains("TLS 1.0"), "{d}");
        // The same with supported_versions offering TLS 1.3: fine.
        let mut h13 = h.clone();
        h13[10] = 3;
        h13.extend_from_slice(&[0, 7, 0, 43, 0, 3, 2, 3, 4]);
        assert_eq!(hello_version(&h13), None);
        // SSL 3.0.
        let mut h3 = h.clone();
        h3[9] = 3;
        h3[10] = 0;
        assert!(hello_version(&h3).unwrap().0);
        // SSLv2.
        assert!(hello_version(&[0x80, 0x2e, 1, 0, 2]).unwrap().0);
        assert_eq!(hello_version(b"GET / HTTP/1.1"), None);
    }
}
