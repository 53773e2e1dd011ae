//! Bytes a guest sends back on the agent connection: frames, envelopes, every response type.
#![no_main]
use enclave_agent_protocol::frame::{read_frame, Response};
use enclave_agent_protocol::messages::*;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn all<M: Method>(p: &[u8]) {
    let _ = M::Response::decode(p);
}

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok((_h, payload)) = read_frame(&mut r) {
        let Ok(resp) = Response::decode(&payload[..]) else { continue };
        let p = &resp.payload[..];
        all::<Version>(p);
        all::<CreateContainer>(p);
        all::<StartContainer>(p);
        all::<WaitProcess>(p);
        all::<WriteStdin>(p);
        all::<ReadStdout>(p);
        all::<StatsContainer>(p);
        if let Some(s) = resp.status {
            let _ = s.to_string();
        }
    }
});
