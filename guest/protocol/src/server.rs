//! The serving loop: reads request frames off one connection and runs each on its own
//! thread, so a request that blocks (a `ReadStdout` waiting for output, a `WaitProcess`)
//! never holds up the others. Replies are written whole, one at a time.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;

use crate::error::{Code, Status};
use crate::frame::{self, ReadError, Request, Response, TYPE_REQUEST, TYPE_RESPONSE};
use crate::messages::Method;
use crate::SERVICE;

/// Requests allowed in flight on one connection; more are refused with
/// `ResourceExhausted`.
pub const MAX_IN_FLIGHT: usize = 128;

/// What serves requests.
pub trait Handler: Send + Sync + 'static {
    /// Runs `method` on an encoded request; returns the encoded response or an error.
    fn handle(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, Status>;
}

/// Decodes a request of method `M`, runs `f` and encodes its response: the glue a
/// [`Handler`] uses per method.
pub fn dispatch<M: Method>(
    payload: &[u8],
    f: impl FnOnce(M::Request) -> Result<M::Response, Status>,
) -> Result<Vec<u8>, Status> {
    let req = M::Request::decode(payload).map_err(|e| {
        Status::new(
            Code::InvalidArgument,
            format!("{}: malformed request: {e}", M::NAME),
        )
    })?;
    f(req).map(|r| r.encode_to_vec())
}

/// Why a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The peer closed it, or it failed.
    Closed(std::io::Error),
    /// The peer sent something that is not a ttrpc frame; an error was sent and the
    /// connection dropped, since the stream cannot be followed past it.
    Garbage(String),
}

/// Serves one connection until it ends. `writer` is a second handle on the same stream.
pub fn serve<R: Read, W: Write + Send + 'static>(
    mut reader: R,
    writer: W,
    handler: Arc<dyn Handler>,
) -> Ended {
    let writer = Arc::new(Mutex::new(writer));
    let in_flight = Arc::new(AtomicUsize::new(0));
    loop {
        let (h, payload) = match frame::read_frame(&mut reader) {
            Ok(f) => f,
            Err(ReadError::Io(e)) => return Ended::Closed(e),
            Err(ReadError::TooLarge(h)) => {
                let msg = format!(
                    "frame of {} bytes exceeds the {} byte limit (or is not a ttrpc frame)",
                    h.length,
                    frame::MAX_PAYLOAD
                );
                reply(
                    &writer,
                    h.stream_id,
                    Err(Status::new(Code::ResourceExhausted, &*msg)),
                );
                return Ended::Garbage(msg);
            }
        };
        if h.kind != TYPE_REQUEST {
            let msg = format!("frame type {} is not a request", h.kind);
            reply(
                &writer,
                h.stream_id,
                Err(Status::new(Code::InvalidArgument, &*msg)),
            );
            return Ended::Garbage(msg);
        }
        let req = match Request::decode(&payload[..]) {
            Ok(r) => r,
            Err(e) => {
                // The frame boundary is intact, so the connection can go on.
                let msg = format!("malformed ttrpc request envelope: {e}");
                reply(
                    &writer,
                    h.stream_id,
                    Err(Status::new(Code::InvalidArgument, msg)),
                );
                continue;
            }
        };
        if req.service != SERVICE {
            let msg = format!("unknown service {:?}", req.service);
            reply(
                &writer,
                h.stream_id,
                Err(Status::new(Code::Unimplemented, msg)),
            );
            continue;
        }
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let msg = format!("more than {MAX_IN_FLIGHT} requests in flight");
            reply(
                &writer,
                h.stream_id,
                Err(Status::new(Code::ResourceExhausted, msg)),
            );
            continue;
        }
        let (writer, handler, in_flight) = (writer.clone(), handler.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("rpc-{}", req.method))
            .spawn(move || {
                let result = handler.handle(&req.method, &req.payload);
                reply(&writer, h.stream_id, result);
                in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            return Ended::Closed(e);
        }
    }
}

fn reply<W: Write>(writer: &Mutex<W>, stream_id: u32, result: Result<Vec<u8>, Status>) {
    let resp = match result {
        Ok(payload) => Response {
            status: Some(Status::new(Code::Ok, "")),
            payload,
        },
        Err(status) => Response {
            status: Some(status),
            payload: Vec::new(),
        },
    };
    let bytes = resp.encode_to_vec();
    // A poisoned lock only means another reply panicked mid-write; the stream is shared
    // state we cannot repair, so go on with it.
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    // A write error means the peer is gone; the read side will see it and end.
    let _ = frame::write_frame(&mut *w, stream_id, TYPE_RESPONSE, &bytes);
}
