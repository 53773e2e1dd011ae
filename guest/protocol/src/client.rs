//! A multiplexed client: any number of threads may call at once; each call has its own
//! stream id and a reader thread hands each response to its caller.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;

use crate::error::{Code, Status};
use crate::frame::{self, ReadError, Request, Response, TYPE_REQUEST, TYPE_RESPONSE};
use crate::messages::{Method, Version, VersionRequest, VersionResponse};
use crate::{PROTOCOL_VERSION, SERVICE};

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Status(Status),
    /// The connection failed or closed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// No answer in time.
    #[error("agent did not answer {method} within {timeout:?}")]
    Timeout {
        /// The method called.
        method: &'static str,
        /// The time allowed.
        timeout: Duration,
    },
    /// The answer could not be decoded.
    #[error("agent sent a malformed {method} response: {detail}")]
    Malformed {
        /// The method called.
        method: &'static str,
        /// The decode error.
        detail: String,
    },
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol {agent}, this client {client}")]
    Version {
        /// The agent's version.
        agent: u32,
        /// Ours.
        client: u32,
    },
}

impl ClientError {
    /// The status code, when the agent answered with an error.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<Option<HashMap<u32, Sender<Result<Response, io::ErrorKind>>>>>>;

/// A connection to the agent.
pub struct Client {
    writer: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU32,
    /// Time allowed for calls that do not block by design.
    pub timeout: Duration,
}

impl Client {
    /// Wraps a connected stream (after any hybrid-vsock handshake) and starts its reader.
    pub fn new(stream: UnixStream) -> io::Result<Client> {
        let reader = stream.try_clone()?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("agent-client-rx".into())
            .spawn(move || read_loop(reader, p))?;
        Ok(Client {
            writer: Mutex::new(stream),
            pending,
            next_id: AtomicU32::new(1),
            timeout: Duration::from_secs(30),
        })
    }

    /// Calls `M` with the client's default timeout.
    pub fn call<M: Method>(&self, req: &M::Request) -> Result<M::Response, ClientError> {
        self.call_timeout::<M>(req, Some(self.timeout))
    }

    /// Calls `M`, waiting at most `timeout` (`None`: as long as it takes, for calls that
    /// block by design such as `WaitProcess` and `ReadStdout`).
    pub fn call_timeout<M: Method>(
        &self,
        req: &M::Request,
        timeout: Option<Duration>,
    ) -> Result<M::Response, ClientError> {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match p.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(io::Error::from(io::ErrorKind::NotConnected).into()),
            };
        }
        let envelope = Request {
            service: SERVICE.into(),
            method: M::NAME.into(),
            payload: req.encode_to_vec(),
            timeout_nano: timeout.map_or(0, |t| t.as_nanos().min(i64::MAX as u128) as i64),
        };
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            frame::write_frame(&mut *w, id, TYPE_REQUEST, &envelope.encode_to_vec())
        };
        if let Err(e) = sent {
            self.forget(id);
            return Err(e.into());
        }
        let resp = wait(&rx, timeout).map_err(|e| {
            self.forget(id);
            match e {
                None => ClientError::Timeout {
                    method: M::NAME,
                    timeout: timeout.unwrap_or_default(),
                },
                Some(kind) => ClientError::Io(io::Error::from(kind)),
            }
        })?;
        if let Some(status) = resp.status.filter(|s| s.code() != Code::Ok) {
            return Err(ClientError::Status(status));
        }
        M::Response::decode(&resp.payload[..]).map_err(|e| ClientError::Malformed {
            method: M::NAME,
            detail: e.to_string(),
        })
    }

    /// The version handshake; fails when the agent's protocol differs from ours.
    pub fn handshake(&self) -> Result<VersionResponse, ClientError> {
        let v = self.call::<Version>(&VersionRequest {
            protocol: PROTOCOL_VERSION,
            client_version: env!("CARGO_PKG_VERSION").into(),
        })?;
        if v.protocol != PROTOCOL_VERSION {
            return Err(ClientError::Version {
                agent: v.protocol,
                client: PROTOCOL_VERSION,
            });
        }
        Ok(v)
    }

    fn forget(&self, id: u32) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = p.as_mut() {
            map.remove(&id);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

fn wait(
    rx: &Receiver<Result<Response, io::ErrorKind>>,
    timeout: Option<Duration>,
) -> Result<Response, Option<io::ErrorKind>> {
    let got = match timeout {
        Some(t) => rx.recv_timeout(t).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => None,
            mpsc::RecvTimeoutError::Disconnected => Some(io::ErrorKind::ConnectionAborted),
        })?,
        None => rx
            .recv()
            .map_err(|_| Some(io::ErrorKind::ConnectionAborted))?,
    };
    got.map_err(Some)
}

fn read_loop(mut reader: UnixStream, pending: Pending) {
    let kind = loop {
        match frame::read_frame(&mut reader) {
            Ok((h, payload)) if h.kind == TYPE_RESPONSE => {
                let tx = {
                    let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                    p.as_mut().and_then(|m| m.remove(&h.stream_id))
                };
                let resp = Response::decode(&payload[..]).map_err(|_| io::ErrorKind::InvalidData);
                if let Some(tx) = tx {
                    let _ = tx.send(resp);
                }
            }
            Ok(_) => break io::ErrorKind::InvalidData,
            Err(ReadError::TooLarge(_)) => break io::ErrorKind::InvalidData,
            Err(ReadError::Io(e)) => break e.kind(),
        }
    };
    let waiting = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    for (_, tx) in waiting.into_iter().flatten() {
        let _ = tx.send(Err(kind));
    }
}

/// Connects to a guest vsock port through a hybrid-vsock Unix socket (Firecracker's
/// scheme, also `vhost-device-vsock`'s): sends `CONNECT <port>\n` and expects a line
/// starting `OK `. Retries until `deadline`, since the guest listens only once booted.
pub fn connect_hybrid_vsock(path: &Path, port: u32, deadline: Instant) -> io::Result<UnixStream> {
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no attempt made");
    while Instant::now() < deadline {
        match try_connect(path, port) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("vsock port {port} via {}: {last}", path.display()),
    ))
}

fn try_connect(path: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply a byte at a time: bytes after the newline belong to the agent.
    let mut line = Vec::new();
    let mut r = BufReader::with_capacity(1, &s);
    r.read_until(b'\n', &mut line).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "the vsock backend accepted but sent no OK within 2 s",
        ),
        _ => e,
    })?;
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock answered {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    drop(r);
    s.set_read_timeout(None)?;
    Ok(s)
}
