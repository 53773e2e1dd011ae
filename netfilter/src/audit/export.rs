//! Ships the node's audit log off the node as it grows: every record, and a signed head
//! after each batch, to a syslog receiver (RFC 5424 messages, octet-counted over TCP as
//! RFC 6587 frames them).
//!
//! The exporter tails the log file from a cursor it keeps on disk, so the datapath never
//! waits for it: when the receiver is down, records stay in the log (where they are
//! anyway), the attempt is counted, and the next run catches up from the cursor. Syslog
//! over TCP has no acknowledgement: a receiver that crashes loses what it had accepted but
//! not yet written. The heads make that visible (the receiver's copy, verified against
//! them, shows the missing sequence numbers) and [`Exporter::rewind_to`] sends them again.
//!
//! Heads are what make truncation and rewriting on the node visible: a head exported at
//! time T says "the chain reached seq N with this hash". With a sealed log, each head is
//! MAC'd with the key of the current epoch; `enclavectl audit verify --heads` checks them.

use super::log::{AuditLog, AuditLogConfig, SyncPolicy};
use super::seal::{head_mac, key_path, SealState};
use super::{chain_fields, line_hash, now_ms, AuditError, SignedHead};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Records per write to the receiver.
const BATCH: usize = 500;

/// Where the cursor stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// Bytes of the log already exported.
    pub offset: u64,
    /// The last sequence number exported.
    pub seq: u64,
    /// Records exported, in all.
    pub exported: u64,
    /// Runs that could not reach the receiver.
    pub failures: u64,
}

/// What one run did.
#[derive(Debug, Clone, Default)]
pub struct ExportRun {
    /// Records sent.
    pub records: u64,
    /// The head sent after them, if any.
    pub head: Option<SignedHead>,
    /// Bytes of the log not yet exported after the run.
    pub backlog: u64,
}

/// The exporter of one log.
pub struct Exporter {
    log: PathBuf,
    to: String,
    state: PathBuf,
    hostname: String,
    /// The cursor (read from and saved to the state file).
    pub cursor: Cursor,
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.display().to_string();
    move |source| AuditError::Io { path, op, source }
}

impl Exporter {
    /// An exporter of `log` to the syslog receiver at `to` (`host:port`, TCP), keeping its
    /// cursor in `state`.
    pub fn new(log: &Path, to: &str, state: &Path) -> Result<Exporter, AuditError> {
        let cursor = match std::fs::read(state) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AuditError::Unrecoverable {
                path: state.display().to_string(),
                reason: format!(
                    "the export cursor is not valid ({e}); remove it to export from the start"
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cursor::default(),
            Err(e) => return Err(io(state, "read the export cursor")(e)),
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "-".into());
        Ok(Exporter {
            log: log.to_path_buf(),
            to: to.to_string(),
            state: state.to_path_buf(),
            hostname,
            cursor,
        })
    }

    /// Moves the cursor back to record `seq`, so the next run sends it and everything
    /// after it again (to fill a gap a receiver lost: plain syslog over TCP has no
    /// acknowledgement, so a receiver that crashes loses what it had queued; verifying
    /// its copy against the heads shows which records).
    pub fn rewind_to(&mut self, seq: u64) -> Result<(), AuditError> {
        let text = std::fs::read(&self.log).map_err(io(&self.log, "read"))?;
        let mut offset = 0u64;
        for line in text.split_inclusive(|b| *b == b'\n') {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let s = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| chain_fields(&v).map(|(s, _)| s));
            if s == Some(seq) {
                self.cursor.offset = offset;
                self.cursor.seq = seq.saturating_sub(1);
                return self.save();
            }
            offset += line.len() as u64;
        }
        Err(AuditError::Unrecoverable {
            path: self.log.display().to_string(),
            reason: format!("no record seq {seq} in this file"),
        })
    }

    /// One run: closes passed seal epochs of a sealed log (so a quiet log does not keep
    /// an old key), sends every record after the cursor and then a head, and saves the
    /// cursor. A receiver that cannot be reached is an error, counted in the cursor; the
    /// records wait in the log.
    pub fn run_once(&mut self) -> Result<ExportRun, AuditError> {
        if key_path(&self.log).exists() {
            let mut w =
                AuditLog::open_shared(AuditLogConfig::node(self.log.clone(), SyncPolicy::Always))?;
            w.close_passed_epochs()?;
        }
        let r = self.send();
        if r.is_err() {
            self.cursor.failures += 1;
        }
        self.save()?;
        r
    }

    fn send(&mut self) -> Result<ExportRun, AuditError> {
        let mut f = std::fs::File::open(&self.log).map_err(io(&self.log, "open"))?;
        let size = f.metadata().map_err(io(&self.log, "stat"))?.len();
        if size < self.cursor.offset {
            return Err(AuditError::Unrecoverable {
                path: self.log.display().to_string(),
                reason: format!(
                    "the log is shorter ({size} bytes) than what was exported ({} bytes): it was cut or replaced on the node; the exported heads show what it held",
                    self.cursor.offset
                ),
            });
        }
        f.seek(SeekFrom::Start(self.cursor.offset))
            .map_err(io(&self.log, "seek"))?;
        let mut new = Vec::new();
        f.take(size - self.cursor.offset)
            .read_to_end(&mut new)
            .map_err(io(&self.log, "read"))?;
        // Only whole lines: a record being written is taken next time.
        let whole = new.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let lines: Vec<&[u8]> = new[..whole]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let sink = |e: std::io::Error| AuditError::Io {
            path: self.to.clone(),
            op: "send to the syslog receiver",
            source: e,
        };
        let mut conn = TcpStream::connect(&self.to).map_err(sink)?;
        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
        let mut run = ExportRun::default();
        let mut last: Option<(u64, String)> = None;
        let mut offset = self.cursor.offset;
        for batch in lines.chunks(BATCH) {
            let mut out = Vec::new();
            for l in batch {
                frame(&mut out, &self.hostname, "record", l);
                if let Some(seq) = serde_json::from_slice::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| chain_fields(&v).map(|(s, _)| s))
                {
                    last = Some((seq, line_hash(l)));
                }
            }
            conn.write_all(&out).map_err(sink)?;
            offset += batch.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
            run.records += batch.len() as u64;
            self.cursor.offset = offset;
            self.cursor.exported += batch.len() as u64;
            if let Some((seq, _)) = &last {
                self.cursor.seq = *seq;
            }
        }
        // The head: the last whole record of the log now.
        let head = match last {
            Some((seq, sha256)) => Some(self.sign(seq, sha256)),
            None if self.cursor.seq > 0 => {
                // Nothing new: re-state where the chain stands, with the time.
                let tail = last_line(&self.log, self.cursor.offset)?;
                tail.map(|l| self.sign(self.cursor.seq, line_hash(&l)))
            }
            None => None,
        };
        if let Some(h) = &head {
            let body = serde_json::to_vec(h).unwrap_or_default();
            let mut out = Vec::new();
            frame(&mut out, &self.hostname, "head", &body);
            conn.write_all(&out).map_err(sink)?;
        }
        conn.flush().map_err(sink)?;
        run.head = head;
        run.backlog = size - self.cursor.offset;
        Ok(run)
    }

    fn sign(&self, seq: u64, sha256: String) -> SignedHead {
        let time = now_ms();
        let key = SealState::open(&key_path(&self.log)).ok();
        let (epoch, mac) = match key {
            Some(k) => (
                Some(k.epoch),
                Some(head_mac(k.key(), seq, &sha256, time, k.epoch)),
            ),
            None => (None, None),
        };
        SignedHead {
            seq,
            sha256,
            time,
            epoch,
            mac,
        }
    }

    fn save(&self) -> Result<(), AuditError> {
        let tmp = self.state.with_extension("tmp");
        let body = serde_json::to_vec(&self.cursor).unwrap_or_default();
        std::fs::write(&tmp, body).map_err(io(&tmp, "write the export cursor"))?;
        std::fs::rename(&tmp, &self.state).map_err(io(&self.state, "save the export cursor"))
    }
}

/// The last whole line that ends at `end`.
fn last_line(path: &Path, end: u64) -> Result<Option<Vec<u8>>, AuditError> {
    let mut f = std::fs::File::open(path).map_err(io(path, "open"))?;
    let start = end.saturating_sub(1024 * 1024);
    f.seek(SeekFrom::Start(start)).map_err(io(path, "seek"))?;
    let mut buf = Vec::new();
    f.take(end - start)
        .read_to_end(&mut buf)
        .map_err(io(path, "read"))?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    let from = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Ok((from < buf.len()).then(|| buf[from..].to_vec()))
}

/// One RFC 5424 message (facility local0, severity informational, MSGID `msgid`, the
/// record as the message), framed by octet counting (RFC 6587 3.4.1).
fn frame(out: &mut Vec<u8>, hostname: &str, msgid: &str, msg: &[u8]) {
    let ts = rfc3339(now_ms());
    let pid = std::process::id();
    let mut m = format!("<134>1 {ts} {hostname} enclave-audit {pid} {msgid} - ").into_bytes();
    m.extend_from_slice(msg);
    out.extend_from_slice(format!("{} ", m.len()).as_bytes());
    out.extend_from_slice(&m);
}

/// `YYYY-MM-DDThh:mm:ss.mmmZ`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_frames_are_what_rfc_5424_and_6587_say() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_397_727_607), "2026-11-23T01:35:27.607Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        let mut out = Vec::new();
        frame(&mut out, "node-1", "record", b"{\"a\":1}");
        let text = String::from_utf8(out).unwrap_or_default();
        let (len, msg) = text.split_once(' ').unwrap_or_default();
        assert_eq!(len.parse::<usize>().ok(), Some(msg.len()));
        assert!(msg.starts_with("<134>1 "), "{msg}");
        assert!(msg.contains(" node-1 enclave-audit "), "{msg}");
        assert!(msg.ends_with(" record - {\"a\":1}"), "{msg}");
    }
}
