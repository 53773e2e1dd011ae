//! Client and server loop over a Unix socket pair with a small handler: concurrency,
//! errors, and hostile input. (The real agent is tested in a VM: tests/guest_vm.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use enclave_agent_protocol::frame::{self, Request, Response, TYPE_REQUEST};
use enclave_agent_protocol::messages::*;
use enclave_agent_protocol::server::{dispatch, serve, Handler};
use enclave_agent_protocol::{Client, Code, Status, PROTOCOL_VERSION, SERVICE};
use prost::Message;

struct Test {
    release: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Handler for Test {
    fn handle(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, Status> {
        match method {
            "Version" => dispatch::<Version>(payload, |r| {
                Ok(VersionResponse {
                    protocol: r.protocol,
                    agent_version: "t".into(),
                    ..Default::default()
                })
            }),
            // Blocks until the test releases it, like a read of a silent process.
            "ReadStdout" => dispatch::<ReadStdout>(payload, |_| {
                let rx = self.release.lock().unwrap().take().unwrap();
                rx.recv().unwrap();
                Ok(ReadStreamResponse {
                    data: b"late".to_vec(),
                })
            }),
            "WaitProcess" => dispatch::<WaitProcess>(payload, |r| {
                Err(Status::new(
                    Code::NotFound,
                    format!("no container {:?}", r.container_id),
                ))
            }),
            m => Err(Status::new(Code::Unimplemented, format!("no method {m}"))),
        }
    }
}

fn pair() -> (Client, UnixStream, mpsc::Sender<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let h = Arc::new(Test {
        release: Mutex::new(Some(rx)),
    });
    let (r, w) = (b.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || serve(r, w, h));
    let mut c = Client::new(a).unwrap();
    c.timeout = Duration::from_secs(5);
    (c, b, tx)
}

#[test]
fn handshake_and_error_codes() {
    let (c, _b, _tx) = pair();
    assert_eq!(c.handshake().unwrap().protocol, PROTOCOL_VERSION);
    let e = c.call::<WaitProcess>(&ProcessRequest {
        container_id: "x".into(),
        exec_id: String::new(),
    });
    let e = e.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    assert!(e.to_string().contains("no container \"x\""), "{e}");
    let e = c.call::<Shutdown>(&Empty {}).unwrap_err();
    assert_eq!(e.code(), Some(Code::Unimplemented));
}

#[test]
fn a_blocked_request_does_not_hold_up_others() {
    let (c, _b, tx) = pair();
    let c = Arc::new(c);
    let c2 = c.clone();
    let blocked = std::thread::spawn(move || {
        c2.call_timeout::<ReadStdout>(&ReadStreamRequest::default(), None)
            .unwrap()
            .data
    });
    std::thread::sleep(Duration::from_millis(50));
    // Answered while ReadStdout is still waiting.
    c.handshake().unwrap();
    assert!(!blocked.is_finished());
    tx.send(()).unwrap();
    assert_eq!(blocked.join().unwrap(), b"late");
}

fn raw_call(s: &mut UnixStream, stream_id: u32, envelope: &[u8]) -> Response {
    frame::write_frame(s, stream_id, TYPE_REQUEST, envelope).unwrap();
    let (h, p) = frame::read_frame(s).map_err(|_| "read").unwrap();
    assert_eq!(h.stream_id, stream_id);
    Response::decode(&p[..]).unwrap()
}

#[test]
fn malformed_payloads_get_errors_and_the_connection_goes_on() {
    let (a, b) = UnixStream::pair().unwrap();
    let (_tx, rx) = mpsc::channel();
    let h = Arc::new(Test {
        release: Mutex::new(Some(rx)),
    });
    let (r, w) = (b.try_clone().unwrap(), b);
    std::thread::spawn(move || serve(r, w, h));
    let mut s = a;
    // Not a protobuf envelope at all.
    let r = raw_call(&mut s, 1, b"\xff\xff\xff garbage");
    assert_eq!(r.status.unwrap().code(), Code::InvalidArgument);
    // A good envelope around a garbage method payload.
    let env = Request {
        service: SERVICE.into(),
        method: "Version".into(),
        payload: b"\x0a\xff\xff".to_vec(),
        timeout_nano: 0,
    };
    let r = raw_call(&mut s, 3, &env.encode_to_vec());
    let st = r.status.unwrap();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(
        st.message.contains("Version: malformed request"),
        "{}",
        st.message
    );
    // Wrong service.
    let env = Request {
        service: "other".into(),
        ..env
    };
    assert_eq!(
        raw_call(&mut s, 5, &env.encode_to_vec())
            .status
            .unwrap()
            .code(),
        Code::Unimplemented
    );
    // Still serving.
    let env = Request {
        service: SERVICE.into(),
        method: "Version".into(),
        payload: VersionRequest {
            protocol: 1,
            client_version: "x".into(),
        }
        .encode_to_vec(),
        timeout_nano: 0,
    };
    let r = raw_call(&mut s, 7, &env.encode_to_vec());
    assert_eq!(r.status.unwrap().code(), Code::Ok);
}

#[test]
fn unframed_garbage_gets_an_error_then_the_connection_closes() {
    let (a, b) = UnixStream::pair().unwrap();
    let (_tx, rx) = mpsc::channel();
    let h = Arc::new(Test {
        release: Mutex::new(Some(rx)),
    });
    let (r, w) = (b.try_clone().unwrap(), b);
    let server = std::thread::spawn(move || serve(r, w, h));
    let mut s = a;
    s.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
        .unwrap();
    let (h, p) = frame::read_frame(&mut s).map_err(|_| "read").unwrap();
    let st = Response::decode(&p[..]).unwrap().status.unwrap();
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert_eq!(h.stream_id, u32::from_be_bytes(*b"/ HT"));
    // Closed: end of stream, or a reset since the server left our bytes unread.
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert!(matches!(
        server.join().unwrap(),
        enclave_agent_protocol::server::Ended::Garbage(_)
    ));
}
