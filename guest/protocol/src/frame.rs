//! ttrpc framing: a 10-byte header (payload length, stream id, type, flags; big-endian)
//! before each protobuf payload, and the `Request`/`Response` envelopes.

use std::io::{self, Read, Write};

use prost::Message;

use crate::error::Status;

/// Header length in bytes.
pub const HEADER_LEN: usize = 10;
/// Largest payload either side accepts (ttrpc's default limit).
pub const MAX_PAYLOAD: u32 = 4 << 20;

/// Frame type of a request.
pub const TYPE_REQUEST: u8 = 1;
/// Frame type of a response.
pub const TYPE_RESPONSE: u8 = 2;

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length.
    pub length: u32,
    /// Stream id (odd, chosen by the client).
    pub stream_id: u32,
    /// Frame type.
    pub kind: u8,
    /// Flags (unused here, carried through).
    pub flags: u8,
}

impl Header {
    /// Parses a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            length: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            kind: b[8],
            flags: b[9],
        }
    }

    /// Serialises a header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.length.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        b[8] = self.kind;
        b[9] = self.flags;
        b
    }
}

/// ttrpc's request envelope.
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    /// Service name.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Method name.
    #[prost(string, tag = "2")]
    pub method: String,
    /// The method's request message.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// Deadline from now, in nanoseconds (0: none).
    #[prost(int64, tag = "4")]
    pub timeout_nano: i64,
}

/// ttrpc's response envelope.
#[derive(Clone, PartialEq, Message)]
pub struct Response {
    /// Error, when there is one.
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    /// The method's response message.
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

/// What reading a frame can yield.
#[derive(Debug)]
pub enum ReadError {
    /// The stream failed or ended.
    Io(io::Error),
    /// The header announced more than [`MAX_PAYLOAD`]; the stream cannot be trusted past
    /// this point.
    TooLarge(Header),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Reads one frame, refusing payloads over `MAX_PAYLOAD` before allocating for them.
pub fn read_frame(r: &mut impl Read) -> Result<(Header, Vec<u8>), ReadError> {
    let mut hb = [0u8; HEADER_LEN];
    r.read_exact(&mut hb)?;
    let h = Header::decode(&hb);
    if h.length > MAX_PAYLOAD {
        return Err(ReadError::TooLarge(h));
    }
    let mut payload = vec![0u8; h.length as usize];
    r.read_exact(&mut payload)?;
    Ok((h, payload))
}

/// Writes one frame (header and payload in a single write where the stream allows).
pub fn write_frame(w: &mut impl Write, stream_id: u32, kind: u8, payload: &[u8]) -> io::Result<()> {
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame payload too large"))?;
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(
        &Header {
            length,
            stream_id,
            kind,
            flags: 0,
        }
        .encode(),
    );
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            length: 0x0102_0304,
            stream_id: 7,
            kind: TYPE_RESPONSE,
            flags: 3,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(h.encode()[0..4], [1, 2, 3, 4]);
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let h = Header {
            length: MAX_PAYLOAD + 1,
            stream_id: 1,
            kind: TYPE_REQUEST,
            flags: 0,
        };
        let mut r = &h.encode()[..];
        assert!(matches!(read_frame(&mut r), Err(ReadError::TooLarge(x)) if x == h));
    }

    #[test]
    fn truncated_frame_is_an_io_error() {
        let mut bytes = Header {
            length: 10,
            stream_id: 1,
            kind: 1,
            flags: 0,
        }
        .encode()
        .to_vec();
        bytes.extend_from_slice(b"abc");
        let mut r = &bytes[..];
        assert!(matches!(read_frame(&mut r), Err(ReadError::Io(_))));
    }
}
