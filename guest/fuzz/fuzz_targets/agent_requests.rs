//! Bytes the agent reads from the host: the serving loop with a handler that decodes every
//! request type (the agent's own handlers run on the same decoded messages).
#![no_main]
use std::sync::Arc;

use enclave_agent_protocol::messages::*;
use enclave_agent_protocol::server::{dispatch, serve, Handler};
use enclave_agent_protocol::{Code, Status};
use libfuzzer_sys::fuzz_target;

struct Decode;

impl Handler for Decode {
    fn handle(&self, method: &str, p: &[u8]) -> Result<Vec<u8>, Status> {
        match method {
            "Version" => dispatch::<Version>(p, |_| Ok(VersionResponse::default())),
            "CreateContainer" => dispatch::<CreateContainer>(p, |_| Ok(CreateContainerResponse::default())),
            "ExecProcess" => dispatch::<ExecProcess>(p, |_| Ok(StartResponse::default())),
            "SignalProcess" => dispatch::<SignalProcess>(p, |_| Ok(Empty {})),
            "WriteStdin" => dispatch::<WriteStdin>(p, |_| Ok(WriteStdinResponse::default())),
            "ConfigureNetwork" => dispatch::<ConfigureNetwork>(p, |_| Ok(Empty {})),
            _ => Err(Status::new(Code::Unimplemented, "x")),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = serve(data, std::io::sink(), Arc::new(Decode));
});
