//! HPACK (RFC 7541): the header compression of HTTP/2, read so that gRPC and HTTP/2
//! requests can be named and checked.
//!
//! A total decoder over hostile bytes: every length is bounded, the dynamic table is capped
//! (what the peer announced, at most [`MAX_TABLE`]), a header block decodes to at most
//! [`MAX_HEADERS`] fields of at most [`MAX_FIELD`] bytes, and any violation is an error, not a
//! panic. Huffman codes are rebuilt from the code lengths of Appendix B (the code is
//! canonical), so no 257-entry code table is copied around.

/// The largest dynamic table a decoder keeps, whatever the peer announces.
pub const MAX_TABLE: usize = 64 * 1024;
/// Fields per header block.
pub const MAX_HEADERS: usize = 128;
/// Bytes per decoded name or value.
pub const MAX_FIELD: usize = 8 * 1024;

/// Why a header block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block ended inside a field.
    Truncated,
    /// An integer too large, an index outside the tables, a bad Huffman string, a table
    /// size above the limit, or a field or block over the caps.
    Invalid(&'static str),
}

/// Code lengths of the 256 octets and EOS (RFC 7541 Appendix B).
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// Canonical decode tables: per length, the first code and where its symbols start.
struct Canon {
    first: [u32; 31],
    count: [u16; 31],
    start: [u16; 31],
    symbols: [u16; 257],
}

const fn canon() -> Canon {
    let mut c = Canon {
        first: [0; 31],
        count: [0; 31],
        start: [0; 31],
        symbols: [0; 257],
    };
    let mut i = 0;
    while i < 257 {
        c.count[LENGTHS[i] as usize] += 1;
        i += 1;
    }
    let mut code = 0u32;
    let mut pos = 0u16;
    let mut len = 1;
    while len < 31 {
        code = (code + c.count[len - 1] as u32) << 1;
        c.first[len] = code;
        c.start[len] = pos;
        pos += c.count[len];
        len += 1;
    }
    // Symbols in (length, value) order.
    let mut fill = c.start;
    let mut s = 0;
    while s < 257 {
        let l = LENGTHS[s] as usize;
        c.symbols[fill[l] as usize] = s as u16;
        fill[l] += 1;
        s += 1;
    }
    c
}

static CANON: Canon = canon();

/// Decodes a Huffman-coded string into `out` (at most [`MAX_FIELD`] bytes).
pub fn huffman_decode(data: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in data {
        for bit in (0..8).rev() {
            code = code << 1 | u32::from(byte >> bit & 1);
            len += 1;
            if len > 30 {
                return Err(HpackError::Invalid("Huffman code longer than 30 bits"));
            }
            let off = code.wrapping_sub(CANON.first[len]);
            if code >= CANON.first[len] && off < u32::from(CANON.count[len]) {
                let sym = CANON.symbols[usize::from(CANON.start[len]) + off as usize];
                if sym == 256 {
                    return Err(HpackError::Invalid("EOS inside a Huffman string"));
                }
                if out.len() >= MAX_FIELD {
                    return Err(HpackError::Invalid("header field too long"));
                }
                out.push(sym as u8);
                code = 0;
                len = 0;
            }
        }
    }
    // Padding: at most 7 bits, all ones (the EOS prefix).
    if len > 7 || code != (1 << len) - 1 {
        return Err(HpackError::Invalid("bad Huffman padding"));
    }
    Ok(())
}

/// The static table (RFC 7541 Appendix A), 1-based.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Name (lower case in HTTP/2).
    pub name: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
}

/// The decoder state of one direction of a connection: its dynamic table.
#[derive(Debug, Clone)]
pub struct Decoder {
    table: std::collections::VecDeque<Field>,
    size: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: std::collections::VecDeque::new(),
            size: 0,
            // SETTINGS_HEADER_TABLE_SIZE's initial value; a size update may change it.
            max: 4096,
        }
    }
}

/// Reads an HPACK integer with an `n`-bit prefix at `d[*i]`.
fn integer(d: &[u8], i: &mut usize, n: u8) -> Result<usize, HpackError> {
    let mask = (1u16 << n) - 1;
    let first = *d.get(*i).ok_or(HpackError::Truncated)?;
    *i += 1;
    let mut v = usize::from(u16::from(first) & mask);
    if v < usize::from(mask) {
        return Ok(v);
    }
    let mut shift = 0;
    loop {
        let b = *d.get(*i).ok_or(HpackError::Truncated)?;
        *i += 1;
        if shift > 21 {
            return Err(HpackError::Invalid("integer too large"));
        }
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

fn string(d: &[u8], i: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huff = d.get(*i).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(d, i, 7)?;
    if len > MAX_FIELD * 2 {
        return Err(HpackError::Invalid("header field too long"));
    }
    let end = i.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = d.get(*i..end).ok_or(HpackError::Truncated)?;
    *i = end;
    if huff {
        let mut out = Vec::with_capacity(len * 8 / 5);
        huffman_decode(raw, &mut out)?;
        Ok(out)
    } else if raw.len() > MAX_FIELD {
        Err(HpackError::Invalid("header field too long"))
    } else {
        Ok(raw.to_vec())
    }
}

impl Decoder {
    fn entry(&self, index: usize) -> Result<Field, HpackError> {
        match index {
            0 => Err(HpackError::Invalid("index 0")),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok(Field {
                    name: n.as_bytes().to_vec(),
                    value: v.as_bytes().to_vec(),
                })
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::Invalid("index outside the tables")),
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.table.pop_back() {
                Some(f) => self.size -= f.name.len() + f.value.len() + 32,
                None => break,
            }
        }
    }

    fn insert(&mut self, f: Field) {
        let sz = f.name.len() + f.value.len() + 32;
        if sz > self.max {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - sz);
        self.size += sz;
        self.table.push_front(f);
    }

    /// Decodes one complete header block, updating the dynamic table.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < block.len() {
            if out.len() >= MAX_HEADERS {
                return Err(HpackError::Invalid("too many header fields"));
            }
            let b = block[i];
            if b & 0x80 != 0 {
                let idx = integer(block, &mut i, 7)?;
                out.push(self.entry(idx)?);
            } else if b & 0xe0 == 0x20 {
                let max = integer(block, &mut i, 5)?;
                if max > MAX_TABLE {
                    return Err(HpackError::Invalid("dynamic table size above the limit"));
                }
                self.max = max;
                self.evict_to(max);
            } else {
                // Literal: with incremental indexing (01), without (0000) or never (0001).
                let (prefix, index) = if b & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    (4, false)
                };
                let idx = integer(block, &mut i, prefix)?;
                let name = if idx == 0 {
                    string(block, &mut i)?
                } else {
                    self.entry(idx)?.name
                };
                let value = string(block, &mut i)?;
                let f = Field { name, value };
                if index {
                    self.insert(f.clone());
                }
                out.push(f);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_decodes_the_rfc_examples() {
        let mut out = Vec::new();
        huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"), &mut out).unwrap();
        assert_eq!(out, b"www.example.com");
        out.clear();
        huffman_decode(&hex("a8eb 1064 9cbf"), &mut out).unwrap();
        assert_eq!(out, b"no-cache");
        out.clear();
        assert!(huffman_decode(&hex("ffff ffff"), &mut out).is_err());
    }

    #[test]
    fn requests_with_huffman_decode_and_share_the_dynamic_table() {
        // RFC 7541 C.4.1 and C.4.2: the second request refers to the first's entries.
        let mut d = Decoder::default();
        let one = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .unwrap();
        assert_eq!(one[3].name, b":authority");
        assert_eq!(one[3].value, b"www.example.com");
        let two = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(two[3].value, b"www.example.com");
        assert_eq!(two[4].name, b"cache-control");
        assert_eq!(two[4].value, b"no-cache");
    }

    #[test]
    fn hostile_blocks_are_errors() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&[0xff]), Err(HpackError::Truncated));
        assert!(d
            .decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f])
            .is_err());
        assert!(
            d.decode(&[0xbf]).is_err(),
            "index 63 is outside both tables"
        );
        assert!(
            d.decode(&[0x3f, 0xe1, 0xff, 0x7f]).is_err(),
            "table size too big"
        );
        assert!(d.decode(&[0x40, 0x85, 0xff]).is_err());
    }
}
