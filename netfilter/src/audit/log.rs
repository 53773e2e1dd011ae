//! The hash-chained, crash-safe audit log writer.
//!
//! Each record is one line written with a single `write` to a file opened `O_APPEND`, so a
//! killed writer leaves either the whole line or a torn tail, never an interleaving. With
//! [`SyncPolicy::Always`] the line is on disk (`fdatasync`) before `append` returns, so a
//! decision is never acted on before its record is durable. On open, a torn tail is cut
//! off, kept beside the log (`<log>.torn-<seq>`), and described by a recovery record, so it
//! is never silently accepted nor silently lost.

use super::seal::{seal_mac, SealState};
use super::{chain_fields, hex, line_hash, AuditError, GENESIS};
use serde_json::{json, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `fdatasync` after every record: survives power loss.
    Always,
    /// Leave it to the page cache: survives the writer being killed, not a node crash.
    Never,
}

/// Where and how to write.
#[derive(Debug, Clone)]
pub struct AuditLogConfig {
    /// The active log file.
    pub path: PathBuf,
    /// Rotate when the active file reaches this many bytes (0: never).
    pub max_bytes: u64,
    /// Durability.
    pub sync: SyncPolicy,
    /// The node's sealing key file (`<log>.key`, made by `enclavectl audit keygen`): when
    /// given, every record is sealed and epochs are closed as they pass (see `seal`).
    pub seal_key: Option<PathBuf>,
}

impl AuditLogConfig {
    /// `path`, no rotation, the given durability, sealed when `<path>.key` exists.
    pub fn node(path: PathBuf, sync: SyncPolicy) -> AuditLogConfig {
        let key = super::seal::key_path(&path);
        AuditLogConfig {
            seal_key: key.exists().then_some(key),
            path,
            max_bytes: 0,
            sync,
        }
    }
}

/// The last record written: what an off-node anchor should keep.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    /// Its sequence number.
    pub seq: u64,
    /// SHA-256 of its line.
    pub sha256: String,
}

/// An open audit log.
pub struct AuditLog {
    cfg: AuditLogConfig,
    file: File,
    size: u64,
    first_seq: u64,
    head: Head,
    shared: bool,
    seal: Option<SealState>,
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.display().to_string();
    move |source| AuditError::Io { path, op, source }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl AuditLog {
    /// Opens (or creates) the log and finds where its chain stands.
    pub fn open(cfg: AuditLogConfig) -> Result<AuditLog, AuditError> {
        let path = cfg.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path, "open"))?;
        let size = file.metadata().map_err(io(&path, "stat"))?.len();
        let (complete_len, last_line, torn) =
            read_tail(&mut file, size).map_err(io(&path, "read tail"))?;

        let head = match &last_line {
            Some(line) => {
                let v: Value = serde_json::from_slice(line).map_err(|e| AuditError::Unrecoverable {
                    path: path.display().to_string(),
                    reason: format!("its last complete record is not JSON ({e}); move the file aside to start a new segment"),
                })?;
                let (seq, _) = chain_fields(&v).ok_or_else(|| AuditError::Unrecoverable {
                    path: path.display().to_string(),
                    reason: "its last complete record has no chain fields".into(),
                })?;
                Head {
                    seq,
                    sha256: line_hash(line),
                }
            }
            // Empty: continue from the head left by rotation, or start a chain.
            None => read_head(&head_path(&path))?.unwrap_or(Head {
                seq: 0,
                sha256: GENESIS.into(),
            }),
        };
        let first_seq = match first_record_seq(&path) {
            Some(s) => s,
            None => head.seq + 1,
        };
        let seal = match &cfg.seal_key {
            Some(k) => Some(SealState::open(k).map_err(io(k, "open the sealing key"))?),
            None => None,
        };
        let mut log = AuditLog {
            cfg,
            file,
            size: complete_len,
            first_seq,
            head,
            shared: false,
            seal,
        };
        if let Some(torn) = torn {
            log.recover_torn(&torn, complete_len)?;
        }
        Ok(log)
    }

    /// Cuts a torn tail off, keeps its bytes beside the log, and records what happened.
    fn recover_torn(&mut self, torn: &[u8], complete_len: u64) -> Result<(), AuditError> {
        let path = self.cfg.path.clone();
        let keep = path.with_file_name(format!(
            "{}.torn-{}",
            path.file_name()
                .map_or("audit.log".into(), |n| n.to_string_lossy()),
            self.head.seq + 1
        ));
        fs::write(&keep, torn).map_err(io(&keep, "save torn tail"))?;
        self.file
            .set_len(complete_len)
            .map_err(io(&path, "truncate torn tail"))?;
        self.file.sync_all().map_err(io(&path, "sync"))?;
        let torn_sha = hex(&sha2::Sha256::digest_bytes(torn));
        let mut record = super::base_event(
            3,
            "Medium",
            &format!(
                "audit log recovery: a torn record of {} bytes (sha256 {torn_sha}) was found after seq {} (the writer stopped mid-write); its bytes are kept in {}",
                torn.len(), self.head.seq, keep.display()),
            "audit-recovery",
        );
        record["unmapped"] = json!({"enclave": {"recovery": {
            "torn_bytes": torn.len(),
            "torn_sha256": torn_sha,
            "kept_in": keep.display().to_string(),
            "after_seq": self.head.seq,
        }}});
        self.append(record)?;
        Ok(())
    }

    /// Opens a log that several writers append to (the node's log: one enclave-netd per
    /// pod). Each append takes an exclusive `flock` and, when another writer appended since,
    /// re-reads the head from the file, so the one chain stays unbroken. No rotation: the
    /// other writers would keep appending to the renamed file, and enclave-netd's seccomp
    /// filter does not let it reopen one. The node log grows until the writers stop.
    pub fn open_shared(mut cfg: AuditLogConfig) -> Result<AuditLog, AuditError> {
        cfg.max_bytes = 0;
        // Under the writers' lock: another writer's record being written is not a torn
        // tail to recover.
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        }
        let guard = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&cfg.path)
            .map_err(io(&cfg.path, "open"))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&guard);
        // SAFETY: flock on a descriptor we own; released when it is closed below.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(io(&cfg.path, "lock")(std::io::Error::last_os_error()));
        }
        let mut log = AuditLog::open(cfg)?;
        drop(guard);
        log.shared = true;
        Ok(log)
    }

    /// Appends a record, filling in its chain fields. Returns the new head.
    pub fn append(&mut self, record: Value) -> Result<Head, AuditError> {
        if !self.shared {
            return self.append_now(record);
        }
        self.locked(|log| log.catch_up().and_then(|()| log.append_now(record)))
    }

    /// Under the lock: if the file grew past what this writer wrote, take the head from it.
    fn catch_up(&mut self) -> Result<(), AuditError> {
        let path = self.cfg.path.clone();
        let size = self.file.metadata().map_err(io(&path, "stat"))?.len();
        if size == self.size {
            return Ok(());
        }
        let (complete, last, _) =
            read_tail(&mut self.file, size).map_err(io(&path, "read tail"))?;
        if let Some(line) = last {
            let v: Value =
                serde_json::from_slice(&line).map_err(|e| AuditError::Unrecoverable {
                    path: path.display().to_string(),
                    reason: format!("another writer left a record that is not JSON ({e})"),
                })?;
            let (seq, _) = chain_fields(&v).ok_or_else(|| AuditError::Unrecoverable {
                path: path.display().to_string(),
                reason: "another writer left a record without chain fields".into(),
            })?;
            self.head = Head {
                seq,
                sha256: line_hash(&line),
            };
        }
        self.size = complete;
        Ok(())
    }

    /// Closes every epoch that has passed: a closing record sealed with the old key, then
    /// the next key replaces it on disk. Appends call it; a node daemon calls it too
    /// (`enclavectl audit export`), so a quiet log does not keep an old key.
    pub fn close_passed_epochs(&mut self) -> Result<(), AuditError> {
        if self.seal.is_none() {
            return Ok(());
        }
        if !self.shared {
            return self.close_epochs_now();
        }
        self.locked(|log| log.catch_up().and_then(|()| log.close_epochs_now()))
    }

    fn close_epochs_now(&mut self) -> Result<(), AuditError> {
        let Some(st) = self.seal.as_mut() else {
            return Ok(());
        };
        let key_path = st.path().to_path_buf();
        if self.shared {
            st.reload().map_err(io(&key_path, "read the sealing key"))?;
        }
        let due = st.epochs.at(now_ms());
        loop {
            let Some(st) = self.seal.as_ref() else {
                return Ok(());
            };
            if st.epoch >= due {
                return Ok(());
            }
            let (epoch, key) = (st.epoch, *st.key());
            let mut closing = super::base_event(
                1,
                "Informational",
                &format!("audit seal: epoch {epoch} closed; its key is erased from the node"),
                "audit-seal",
            );
            closing["unmapped"] = json!({"enclave": {"seal_closes_epoch": epoch}});
            self.write_line(closing, Some((epoch, key)))?;
            if let Some(st) = self.seal.as_mut() {
                st.advance()
                    .map_err(io(&key_path, "advance the sealing key"))?;
            }
        }
    }

    fn locked<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        // SAFETY: flock on a descriptor this struct owns; no memory is involved.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(io(&self.cfg.path, "lock")(std::io::Error::last_os_error()));
        }
        let r = f(self);
        // SAFETY: as above.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        r
    }

    fn append_now(&mut self, record: Value) -> Result<Head, AuditError> {
        self.close_epochs_now()?;
        let seal = self.seal.as_ref().map(|st| (st.epoch, *st.key()));
        let head = self.write_line(record, seal)?;
        if self.cfg.max_bytes > 0 && self.size >= self.cfg.max_bytes {
            self.rotate()?;
        }
        Ok(head)
    }

    /// Writes one record with its chain fields (and its seal, with the key given).
    fn write_line(
        &mut self,
        mut record: Value,
        seal: Option<(u64, [u8; 32])>,
    ) -> Result<Head, AuditError> {
        let seq = self.head.seq + 1;
        if let Some(obj) = record.as_object_mut() {
            let meta = obj.entry("metadata").or_insert_with(|| json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.insert("sequence".into(), json!(seq));
            }
            let un = obj.entry("unmapped").or_insert_with(|| json!({}));
            if let Some(u) = un.as_object_mut() {
                let mut chain = json!({"prev_sha256": self.head.sha256});
                if let Some((epoch, key)) = seal {
                    chain["seal"] = json!({
                        "epoch": epoch,
                        "mac": seal_mac(&key, seq, epoch, &self.head.sha256),
                    });
                }
                u.insert("chain".into(), chain);
            }
        }
        let mut line = serde_json::to_vec(&record).unwrap_or_default();
        let hash = line_hash(&line);
        line.push(b'\n');
        let path = self.cfg.path.clone();
        self.file.write_all(&line).map_err(io(&path, "append"))?;
        if self.cfg.sync == SyncPolicy::Always {
            self.file.sync_data().map_err(io(&path, "sync"))?;
        }
        self.size += line.len() as u64;
        self.head = Head { seq, sha256: hash };
        Ok(self.head.clone())
    }

    /// The current seal epoch and key, if the log is sealed (for signing exported heads).
    pub fn seal_key(&self) -> Option<(u64, [u8; 32])> {
        self.seal.as_ref().map(|s| (s.epoch, *s.key()))
    }

    /// The last record written.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Closes the active file as `<log>.<first>-<last>` and starts a new one; the chain
    /// continues across files.
    pub fn rotate(&mut self) -> Result<PathBuf, AuditError> {
        let path = self.cfg.path.clone();
        self.file.sync_all().map_err(io(&path, "sync"))?;
        self.checkpoint()?;
        let rotated = path.with_file_name(format!(
            "{}.{:012}-{:012}",
            path.file_name()
                .map_or("audit.log".into(), |n| n.to_string_lossy()),
            self.first_seq,
            self.head.seq
        ));
        fs::rename(&path, &rotated).map_err(io(&path, "rotate"))?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path, "open"))?;
        sync_dir(&path);
        self.size = 0;
        self.first_seq = self.head.seq + 1;
        Ok(rotated)
    }

    /// Writes the head file (`<log>.head`) atomically. Ship it off the node to make
    /// truncation of the log detectable by someone who controls the node.
    pub fn checkpoint(&mut self) -> Result<(), AuditError> {
        let hp = head_path(&self.cfg.path);
        let tmp = hp.with_extension("head.tmp");
        let body = serde_json::to_vec(&self.head).unwrap_or_default();
        {
            let mut f = File::create(&tmp).map_err(io(&tmp, "write head"))?;
            f.write_all(&body).map_err(io(&tmp, "write head"))?;
            f.sync_all().map_err(io(&tmp, "sync head"))?;
        }
        fs::rename(&tmp, &hp).map_err(io(&hp, "install head"))?;
        sync_dir(&hp);
        Ok(())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        let _ = self.file.sync_all();
        if !self.shared {
            let _ = self.checkpoint();
        }
    }
}

/// `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".head");
    PathBuf::from(s)
}

/// Reads a head file, if there is one.
pub fn read_head(p: &Path) -> Result<Option<Head>, AuditError> {
    match fs::read(p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| AuditError::Unrecoverable {
                path: p.display().to_string(),
                reason: format!("head file is not valid: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuditError::Io {
            path: p.display().to_string(),
            op: "read head",
            source: e,
        }),
    }
}

fn sync_dir(p: &Path) {
    if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(f) = File::open(d) {
            let _ = f.sync_all();
        }
    }
}

fn first_record_seq(p: &Path) -> Option<u64> {
    let mut f = File::open(p).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read(&mut buf).ok()?;
    let end = buf[..n].iter().position(|b| *b == b'\n')?;
    let v: Value = serde_json::from_slice(&buf[..end]).ok()?;
    chain_fields(&v).map(|(s, _)| s)
}

/// Reads the end of the file: (length up to and including the last newline, the last
/// complete line, the torn bytes after it if any).
#[allow(clippy::type_complexity)]
fn read_tail(f: &mut File, size: u64) -> std::io::Result<(u64, Option<Vec<u8>>, Option<Vec<u8>>)> {
    if size == 0 {
        return Ok((0, None, None));
    }
    // Widen the window until it holds a whole line (records are small; logs may be big).
    let mut window = 64 * 1024u64;
    loop {
        let start = size.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((size - start) as usize);
        f.take(size - start).read_to_end(&mut buf)?;
        let last_nl = buf.iter().rposition(|b| *b == b'\n');
        let torn = match last_nl {
            Some(i) if i + 1 < buf.len() => Some(buf[i + 1..].to_vec()),
            None if start == 0 => Some(buf.clone()),
            _ => None,
        };
        match last_nl {
            Some(i) => {
                let prev = buf[..i].iter().rposition(|b| *b == b'\n');
                if prev.is_none() && start > 0 {
                    window *= 4;
                    continue;
                }
                let line = buf[prev.map_or(0, |p| p + 1)..i].to_vec();
                return Ok((start + i as u64 + 1, Some(line), torn));
            }
            None if start == 0 => return Ok((0, None, torn)),
            None => window *= 4,
        }
    }
}

trait DigestBytes {
    fn digest_bytes(b: &[u8]) -> Vec<u8>;
}

impl DigestBytes for sha2::Sha256 {
    fn digest_bytes(b: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(b).to_vec()
    }
}
