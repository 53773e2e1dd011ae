//! HTTP/1.x requests as the inspector reads them: smuggling in the head, SQL injection in
//! what a user controls (the path, the query string, cookies and the usual free-text
//! headers, form and JSON bodies).

use super::sqli;

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Which body parser applies, from `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `application/json`.
    Json,
    /// Anything else: not parsed (DLP still reads it).
    Other,
}

/// What a request head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The request line, for records (at most 120 bytes, printable).
    pub line: String,
    /// The method.
    pub method: String,
    /// The path (the target without its query string).
    pub path: String,
    /// The Host header, if any.
    pub host: Option<String>,
    /// The names of the headers it carries.
    pub header_names: Vec<String>,
    /// How the body is framed.
    pub body: Body,
    /// What the body is.
    pub kind: BodyKind,
    /// A smuggling sign, if any.
    pub smuggling: Option<String>,
    /// An injection in a user-controlled part, if any: the shape and where.
    pub sqli: Option<(sqli::Shape, String)>,
}

/// Printable excerpt of bytes, at most `max` characters.
pub fn excerpt(b: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &c in b.iter().take(max) {
        if (0x20..0x7f).contains(&c) {
            s.push(char::from(c));
        } else {
            s.push('.');
        }
    }
    if b.len() > max {
        s.push('…');
    }
    s
}

/// A request target for a record: the path as sent (an excerpt of `max` bytes), the
/// query's parameter names kept and their values starred (they can carry tokens or
/// personal data that a refusal record has no need of).
pub fn target_for_record(target: &str, max: usize) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return excerpt(target.as_bytes(), max);
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !v.is_empty() => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    excerpt(format!("{path}?{}", query.join("&")).as_bytes(), max)
}

/// `%XX` and `+` decoded; decoded twice when the first pass leaves escapes behind (double
/// encoding is a common evasion).
pub fn url_decode(s: &[u8]) -> Vec<u8> {
    fn once(s: &[u8]) -> Vec<u8> {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    if let (Some(h), Some(l)) = (
                        s.get(i + 1).and_then(|&c| hex(c)),
                        s.get(i + 2).and_then(|&c| hex(c)),
                    ) {
                        out.push(h << 4 | l);
                        i += 3;
                        continue;
                    }
                    out.push(b'%');
                }
                c => out.push(c),
            }
            i += 1;
        }
        out
    }
    let first = once(s);
    if first
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
    {
        once(&first)
    } else {
        first
    }
}

/// Values of `a=b&c=d` (split on `sep`), decoded.
fn params(s: &[u8], sep: u8) -> impl Iterator<Item = Vec<u8>> + '_ {
    s.split(move |&b| b == sep)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let v = p.iter().position(|&b| b == b'=').map_or(p, |i| &p[i + 1..]);
            url_decode(v)
        })
}

fn check(out: &mut Option<(sqli::Shape, String)>, what: &str, v: &[u8]) {
    if out.is_none() {
        if let Some(h) = sqli::in_input(v) {
            *out = Some((h.shape, format!("{what} `{}`", excerpt(v, 80))));
        }
    }
}

/// Reads a request head (through the blank line). `None` when it is not an HTTP/1.x
/// request at all.
pub fn head(h: &[u8]) -> Option<Head> {
    let mut lines = h
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next()?;
    if !super::proto::is_http_request_line(line) {
        return None;
    }
    let mut sqli = None;
    let mut smuggling = None;
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or(b"");
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    for seg in path.split(|&b| b == b'/') {
        check(&mut sqli, "path segment", &url_decode(seg));
    }
    for v in params(query, b'&') {
        check(&mut sqli, "query parameter", &v);
    }
    let method =
        String::from_utf8_lossy(line.split(|&b| b == b' ').next().unwrap_or(b"")).into_owned();
    let mut host = None;
    let mut header_names = Vec::new();
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut te: Option<&[u8]> = None;
    let mut kind = BodyKind::Other;
    for l in lines {
        if l.is_empty() {
            break;
        }
        if l[0] == b' ' || l[0] == b'\t' {
            smuggling.get_or_insert_with(|| "a folded header line (obs-fold)".to_string());
            continue;
        }
        let Some(c) = l.iter().position(|&b| b == b':') else {
            smuggling.get_or_insert_with(|| {
                format!("a header line without a colon: `{}`", excerpt(l, 60))
            });
            continue;
        };
        let (name, value) = (&l[..c], l[c + 1..].trim_ascii());
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            smuggling.get_or_insert_with(|| {
                format!("a header name with white space: `{}`", excerpt(name, 60))
            });
            continue;
        }
        header_names.push(String::from_utf8_lossy(name).into_owned());
        if name.eq_ignore_ascii_case(b"host") {
            host = Some(String::from_utf8_lossy(value).into_owned());
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if te.is_some() {
                smuggling.get_or_insert_with(|| "Transfer-Encoding given twice".to_string());
            }
            te = Some(value);
        } else if name.eq_ignore_ascii_case(b"content-type") {
            let v = value.to_ascii_lowercase();
            if v.starts_with(b"application/x-www-form-urlencoded") {
                kind = BodyKind::Form;
            } else if v.starts_with(b"application/json") {
                kind = BodyKind::Json;
            }
        } else if name.eq_ignore_ascii_case(b"cookie") {
            for v in params(value, b';') {
                check(&mut sqli, "cookie", v.trim_ascii());
            }
        } else if [
            &b"user-agent"[..],
            b"referer",
            b"x-forwarded-for",
            b"x-api-key",
        ]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
        {
            check(&mut sqli, "header", value);
        }
    }
    let body = match (te, lengths.as_slice()) {
        (Some(t), l) => {
            if !l.is_empty() {
                smuggling.get_or_insert_with(|| {
                    "both Content-Length and Transfer-Encoding (CL.TE)".to_string()
                });
            }
            if !t.eq_ignore_ascii_case(b"chunked") {
                smuggling.get_or_insert_with(|| {
                    format!(
                        "Transfer-Encoding `{}` is not exactly `chunked`",
                        excerpt(t, 40)
                    )
                });
            }
            Body::Chunked
        }
        (None, []) => Body::None,
        (None, l) => {
            let parsed: Vec<Option<u64>> = l
                .iter()
                .map(|v| {
                    (!v.is_empty() && v.iter().all(u8::is_ascii_digit) && v.len() <= 15)
                        .then(|| std::str::from_utf8(v).ok()?.parse().ok())
                        .flatten()
                })
                .collect();
            match parsed.as_slice() {
                [Some(n)] => Body::Length(*n),
                many if many.iter().all(|n| n.is_some() && *n == many[0]) => {
                    Body::Length(many[0].unwrap_or(0))
                }
                _ => {
                    smuggling.get_or_insert_with(|| {
                        "Content-Length that is not one number (CL.CL)".to_string()
                    });
                    Body::None
                }
            }
        }
    };
    Some(Head {
        line: excerpt(line, 120),
        method,
        path: String::from_utf8_lossy(path).into_owned(),
        host,
        header_names,
        body,
        kind,
        smuggling,
        sqli,
    })
}

/// Injection in a form or JSON body.
pub fn body(kind: BodyKind, b: &[u8]) -> Option<(sqli::Shape, String)> {
    let mut out = None;
    match kind {
        BodyKind::Form => {
            for v in params(b, b'&') {
                check(&mut out, "form field", &v);
            }
        }
        BodyKind::Json => {
            // Every string in the document (keys too: cheap and harmless).
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'"' {
                    let mut j = i + 1;
                    let mut v = Vec::new();
                    while j < b.len() && b[j] != b'"' {
                        if b[j] == b'\\' && j + 1 < b.len() {
                            j += 1;
                            v.push(match b[j] {
                                b'n' => b'\n',
                                b't' => b'\t',
                                c => c,
                            });
                        } else {
                            v.push(b[j]);
                        }
                        j += 1;
                    }
                    check(&mut out, "JSON string", &v);
                    i = j + 1;
                } else {
                    i += 1;
                }
            }
        }
        BodyKind::Other => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smuggling_signs_in_heads() {
        let h = |s: &str| head(s.as_bytes()).unwrap().smuggling;
        assert_eq!(h("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        assert!(
            h("POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .contains("CL.TE")
        );
        assert!(
            h("POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .contains("CL.CL")
        );
        assert!(h("POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n").is_some());
        assert!(h("POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n").is_some());
        assert!(h("GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n")
            .unwrap()
            .contains("obs-fold"));
        assert_eq!(
            head(b"POST /p HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
                .unwrap()
                .body,
            Body::Length(12)
        );
        assert!(head(b"SET a b\r\n\r\n").is_none());
    }

    #[test]
    fn injection_in_user_controlled_parts() {
        let s = |r: &str| head(r.as_bytes()).unwrap().sqli.map(|(_, w)| w);
        assert!(
            s("GET /search?q=x%27%20OR%20%271%27%3D%271 HTTP/1.1\r\n\r\n")
                .unwrap()
                .starts_with("query parameter")
        );
        assert!(
            s("GET /items/1%20UNION%20SELECT%20password%20FROM%20users HTTP/1.1\r\n\r\n")
                .unwrap()
                .starts_with("path segment")
        );
        assert!(
            s("GET / HTTP/1.1\r\nCookie: sid=abc; user=admin'--\r\n\r\n")
                .unwrap()
                .starts_with("cookie")
        );
        assert_eq!(
            s("GET /search?q=O%27Brien&page=2 HTTP/1.1\r\nUser-Agent: curl/7.88.1\r\n\r\n"),
            None
        );
        // Double encoding.
        assert!(s("GET /?id=1%2520OR%25201%253D1 HTTP/1.1\r\n\r\n").is_some());
        assert!(body(BodyKind::Form, b"user=bob&pass=x%27+or+%27a%27%3D%27a").is_some());
        assert!(body(BodyKind::Json, br#"{"name":"1' OR '1'='1"}"#).is_some());
        assert_eq!(body(BodyKind::Json, br#"{"name":"O'Brien","n":2}"#), None);
    }

    #[test]
    fn a_record_keeps_query_names_and_stars_their_values() {
        assert_eq!(
            target_for_record("/v1/pay?token=s3cr3t&page=2&flag", 100),
            "/v1/pay?token=***&page=***&flag"
        );
        assert_eq!(target_for_record("/plain", 100), "/plain");
    }
}
