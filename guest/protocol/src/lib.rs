//! The protocol between the host (the shim, or a test) and `enclave-agent` in the guest.
//!
//! The wire is [ttrpc]: 10-byte frame headers carrying protobuf `Request`/`Response`
//! envelopes, several requests in flight on one connection, each on its own stream id. The
//! agent's methods and their messages are in [`messages`]; both sides map errors through
//! [`Code`] in one place ([`error`]). The transport is a byte stream: an `AF_VSOCK`
//! connection in the guest, and on the host a Unix socket speaking the hybrid-vsock
//! handshake (`CONNECT <port>\n` → `OK …\n`) of Firecracker and `vhost-device-vsock`.
//!
//! Frames are bounded ([`frame::MAX_PAYLOAD`]); a peer that sends an oversized or
//! malformed frame gets an error on the wire, never a crash.
//!
//! [ttrpc]: https://github.com/containerd/ttrpc/blob/main/PROTOCOL.md

pub mod client;
pub mod error;
pub mod frame;
pub mod messages;
pub mod server;

pub use client::{connect_hybrid_vsock, Client, ClientError};
pub use error::{Code, Status};

/// The ttrpc service name of the agent.
pub const SERVICE: &str = "enclave.agent.v1.Agent";

/// Protocol version: bumped on any incompatible change of a message or method. The client
/// refuses an agent whose major differs.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
