//! The audit trail: one OCSF record per decision worth keeping, hash-chained on disk.
//!
//! - [`record`] turns a matcher [`FlowEvent`](crate::matcher::FlowEvent) into an OCSF
//!   Network Activity (class 4001) record with the pod, namespace and zone of both ends;
//! - [`AuditLog`] appends records as JSON lines, each carrying its sequence number and the
//!   SHA-256 of the previous line, so that any change, deletion, insertion, reordering or
//!   truncation shows; it recovers from a torn last line after a crash by recording it;
//! - [`verify`] checks files and says exactly where a chain breaks.
//!
//! The format is documented in `docs/audit-log.md`.

mod export;
mod log;
pub mod record;
pub mod seal;
mod verify;
mod webhook;

pub use export::{rfc3339, Cursor, ExportRun, Exporter};
pub use log::{head_path, now_ms, read_head, AuditLog, AuditLogConfig, Head, SyncPolicy};
pub use record::{base_event, AuditContext, RecordBuilder};
pub use verify::{read_heads, verify, At, Problem, SignedHead, VerifyOptions, VerifyReport};
pub use webhook::{Endpoint, WebhookCursor, WebhookRun, WebhookSender};

use sha2::{Digest, Sha256};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why the audit log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// An I/O operation on a log file failed.
    #[error("audit log {path}: {op}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An existing log's last complete record could not be understood, so the chain cannot
    /// be continued safely.
    #[error("audit log {path}: cannot continue the chain: {reason}")]
    Unrecoverable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// SHA-256 of a line (without its newline), lower-case hex.
pub fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(b"0123456789abcdef"[usize::from(x >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(x & 15)]));
    }
    s
}

/// The chain fields of a parsed record: (sequence, previous hash).
pub fn chain_fields(v: &serde_json::Value) -> Option<(u64, &str)> {
    let seq = v.get("metadata")?.get("sequence")?.as_u64()?;
    let prev = v
        .get("unmapped")?
        .get("chain")?
        .get("prev_sha256")?
        .as_str()?;
    Some((seq, prev))
}
