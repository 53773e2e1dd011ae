//! HTTP/2 (RFC 9113) as a client sends it with prior knowledge: the preface, then frames.
//! Detection of HTTP/2 and gRPC, and the request reader that lets a rule check every
//! request (`:method`, `:path`, `:authority`, gRPC service and method) of a connection.
//!
//! Frames are read by their 9-byte headers; DATA payloads are skipped by length without
//! being held; a header block (HEADERS and its CONTINUATIONs) is held up to
//! [`BLOCK_MAX`] and decoded with the connection's HPACK table ([`super::hpack`]).

use super::hpack::{Decoder, Field};
use super::{literal, Detection};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest header block held for decoding.
pub const BLOCK_MAX: usize = 64 * 1024;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// HTTP/2: the preface, then a SETTINGS frame on stream 0 (RFC 9113 §3.4).
pub fn http2(d: &[u8]) -> Detection {
    match literal(d, PREFACE) {
        Detection::Match => {}
        other => return other,
    }
    let f = &d[PREFACE.len()..];
    if f.len() < 9 {
        return Detection::NeedMore;
    }
    let len = u32::from_be_bytes([0, f[0], f[1], f[2]]);
    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
    if f[3] == SETTINGS && stream == 0 && len % 6 == 0 {
        Detection::Match
    } else {
        Detection::NoMatch
    }
}

/// gRPC: HTTP/2 whose first request carries `content-type: application/grpc...`.
pub fn grpc(d: &[u8]) -> Detection {
    match http2(d) {
        Detection::Match => {}
        other => return other,
    }
    let mut r = RequestReader::default();
    match r.feed(d) {
        Err(_) => Detection::NoMatch,
        Ok(reqs) => match reqs.first() {
            Some(q) if q.is_grpc() => Detection::Match,
            Some(_) => Detection::NoMatch,
            None => Detection::NeedMore,
        },
    }
}

/// One request, as its header block names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Stream id.
    pub stream: u32,
    /// `:method`.
    pub method: String,
    /// `:path`.
    pub path: String,
    /// `:authority` (or `host`).
    pub authority: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// The names of the other headers.
    pub headers: Vec<String>,
}

impl Request {
    /// Whether the request is a gRPC call.
    pub fn is_grpc(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/grpc"))
    }

    /// A gRPC call's service and method, from `/package.Service/Method`.
    pub fn grpc_call(&self) -> Option<(&str, &str)> {
        let (service, method) = self.path.strip_prefix('/')?.split_once('/')?;
        (!service.is_empty() && !method.is_empty() && !method.contains('/'))
            .then_some((service, method))
    }

    fn of(stream: u32, fields: Vec<Field>) -> Request {
        let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
        let mut r = Request {
            stream,
            ..Request::default()
        };
        for f in fields {
            match f.name.as_slice() {
                b":method" => r.method = text(f.value),
                b":path" => r.path = text(f.value),
                b":authority" => r.authority = Some(text(f.value)),
                b"host" if r.authority.is_none() => r.authority = Some(text(f.value)),
                b"content-type" => r.content_type = Some(text(f.value)),
                _ => r.headers.push(text(f.name)),
            }
        }
        r
    }
}

/// Reads a client's HTTP/2 byte stream, in order, into requests.
#[derive(Debug, Default)]
pub struct RequestReader {
    /// Bytes of an unfinished frame header or header-block frame.
    buf: Vec<u8>,
    preface_done: bool,
    /// Payload bytes of the current non-header frame still to skip.
    skip: usize,
    /// An open header block (stream, bytes) waiting for CONTINUATION.
    block: Option<(u32, Vec<u8>)>,
    hpack: Decoder,
}

impl RequestReader {
    /// Feeds in-order bytes; returns the requests whose header blocks completed, or why
    /// the stream cannot be followed.
    pub fn feed(&mut self, mut b: &[u8]) -> Result<Vec<Request>, String> {
        let mut out = Vec::new();
        while !b.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(b.len());
                self.skip -= n;
                b = &b[n..];
                continue;
            }
            if !self.preface_done {
                let need = PREFACE.len() - self.buf.len();
                let n = need.min(b.len());
                self.buf.extend_from_slice(&b[..n]);
                b = &b[n..];
                if self.buf.len() == PREFACE.len() {
                    if self.buf != PREFACE {
                        return Err("not the HTTP/2 connection preface".into());
                    }
                    self.buf.clear();
                    self.preface_done = true;
                }
                continue;
            }
            // A frame header, then (for header frames) the payload, held.
            if self.buf.len() < 9 {
                let n = (9 - self.buf.len()).min(b.len());
                self.buf.extend_from_slice(&b[..n]);
                b = &b[n..];
                if self.buf.len() < 9 {
                    break;
                }
            }
            let h = &self.buf;
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let (ty, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if self.block.is_some() && ty != CONTINUATION {
                return Err("a header block interrupted by another frame".into());
            }
            if ty != HEADERS && ty != CONTINUATION {
                let _ = DATA;
                self.buf.clear();
                self.skip = len;
                continue;
            }
            if len > BLOCK_MAX {
                return Err(format!("a header frame of {len} bytes"));
            }
            let have = self.buf.len() - 9;
            let n = (len - have).min(b.len());
            self.buf.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.buf.len() - 9 < len {
                break;
            }
            let payload = std::mem::take(&mut self.buf);
            let mut p = &payload[9..];
            if ty == HEADERS {
                if stream == 0 {
                    return Err("HEADERS on stream 0".into());
                }
                if flags & PADDED != 0 {
                    let pad = usize::from(*p.first().ok_or("empty padded HEADERS")?);
                    p = p
                        .get(1..p.len().checked_sub(pad).ok_or("padding past the frame")?)
                        .ok_or("padding past the frame")?;
                }
                if flags & PRIORITY != 0 {
                    p = p.get(5..).ok_or("HEADERS too short for its priority")?;
                }
                self.block = Some((stream, p.to_vec()));
            } else {
                match self.block.as_mut() {
                    Some((s, blk)) if *s == stream => {
                        if blk.len() + p.len() > BLOCK_MAX {
                            return Err("a header block over 64 KiB".into());
                        }
                        blk.extend_from_slice(p);
                    }
                    _ => return Err("CONTINUATION without its HEADERS".into()),
                }
            }
            if flags & END_HEADERS != 0 {
                if let Some((s, blk)) = self.block.take() {
                    let fields = self
                        .hpack
                        .decode(&blk)
                        .map_err(|e| format!("HPACK: {e:?}"))?;
                    // Trailers (no pseudo-headers) are not requests.
                    if fields.iter().any(|f| f.name == b":method") {
                        out.push(Request::of(s, fields));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A client's connection start with one request, as a plain (non-Huffman) block.
    pub(crate) fn client_bytes(path: &str, content_type: &str) -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend_from_slice(&[0, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        let mut blk = vec![0x83, 0x86]; // :method POST, :scheme http
        blk.push(0x04); // :path, literal without indexing, indexed name 4
        blk.push(path.len() as u8);
        blk.extend_from_slice(path.as_bytes());
        blk.push(0x0f);
        blk.push(0x10); // content-type = static 31: 0x0f then 31-15 = 16
        blk.push(content_type.len() as u8);
        blk.extend_from_slice(content_type.as_bytes());
        let l = blk.len();
        b.extend_from_slice(&[0, 0, l as u8, HEADERS, END_HEADERS, 0, 0, 0, 1]);
        b.extend_from_slice(&blk);
        b.extend_from_slice(&[0, 0, 5, DATA, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn grpc_is_told_from_plain_http2_by_its_content_type() {
        let g = client_bytes("/payments.v1.Payments/Authorize", "application/grpc");
        assert_eq!(http2(&g), Detection::Match);
        assert_eq!(grpc(&g), Detection::Match);
        let h = client_bytes("/index.html", "text/html");
        assert_eq!(grpc(&h), Detection::NoMatch);
        assert_eq!(grpc(&g[..40]), Detection::NeedMore);
        let mut r = RequestReader::default();
        let reqs = r.feed(&g).unwrap();
        assert_eq!(
            reqs[0].grpc_call(),
            Some(("payments.v1.Payments", "Authorize"))
        );
        assert_eq!(reqs[0].method, "POST");
    }

    #[test]
    fn the_reader_follows_byte_by_byte_and_refuses_broken_blocks() {
        let g = client_bytes("/a.B/C", "application/grpc+proto");
        let mut r = RequestReader::default();
        let mut n = 0;
        for b in &g {
            n += r.feed(std::slice::from_ref(b)).unwrap().len();
        }
        assert_eq!(n, 1);
        let mut bad = PREFACE.to_vec();
        bad.extend_from_slice(&[0, 0, 1, CONTINUATION, END_HEADERS, 0, 0, 0, 1, 0x82]);
        assert!(RequestReader::default().feed(&bad).is_err());
    }
}
