//! Forward-secure sealing of the audit chain.
//!
//! Time is cut into epochs of a fixed length from a start time. Epoch `e` has its own key:
//! `K(0)` is 32 random bytes made by `enclavectl audit keygen`, and
//! `K(e + 1) = SHA-256("enclave-audit-evolve-v1" || K(e))`. The node keeps only the key of
//! the current epoch, in the key file beside the log; when the epoch changes, the writer
//! seals the end of the old epoch with the old key (a closing record), derives the new key
//! and overwrites the old one. The auditor keeps the verification key (`K(0)`, the start
//! time and the epoch length), printed once by keygen and never stored on the node, and
//! derives every epoch's key from it.
//!
//! Every record carries `unmapped.chain.seal`: its epoch and
//! `HMAC-SHA256(K(epoch), "enclave-audit-seal-v1" || seq || epoch || prev_sha256)`. The MAC
//! covers the record's place in the chain and, through `prev_sha256`, every byte of every
//! record before it. So whoever holds the node's key at epoch `E` cannot alter, insert,
//! delete or reorder a record of an earlier epoch without breaking a seal made with a key
//! that no longer exists anywhere on the node: the closing record of every epoch is sealed
//! with that epoch's key, so even an epoch's last record is covered. What such an attacker
//! can still do: stop logging, and rewrite or cut the records of the current epoch — which
//! the heads exported off the node (`enclavectl audit export`) expose.
//!
//! Like systemd-journald's FSS, the verification key can derive every sealing key: an
//! auditor's copy must be kept as carefully as the evidence it checks.

use super::hex;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Domain separation of the key evolution.
const EVOLVE: &[u8] = b"enclave-audit-evolve-v1";
/// Domain separation of record seals.
const SEAL: &[u8] = b"enclave-audit-seal-v1";
/// Domain separation of exported heads.
const HEAD: &[u8] = b"enclave-audit-head-v1";
/// The key file: magic, then start (ms), epoch length (ms), epoch, key.
const MAGIC: &[u8; 8] = b"ENCLKEY1";
const FILE_LEN: usize = 8 + 8 + 8 + 8 + 32;

/// The next epoch's key.
pub fn evolve(key: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(EVOLVE);
    h.update(key);
    h.finalize().into()
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC-SHA256 (RFC 2104) with a 32-byte key.
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Sha256::new();
    inner.update(ipad);
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(opad);
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The seal of record `seq` of `epoch` whose `prev_sha256` is `prev` (hex).
pub fn seal_mac(key: &[u8; 32], seq: u64, epoch: u64, prev: &str) -> String {
    let prev = unhex32(prev).unwrap_or([0; 32]);
    hex(&hmac(
        key,
        &[SEAL, &seq.to_be_bytes(), &epoch.to_be_bytes(), &prev],
    ))
}

/// The MAC of an exported head.
pub fn head_mac(key: &[u8; 32], seq: u64, sha256: &str, time_ms: u64, epoch: u64) -> String {
    let h = unhex32(sha256).unwrap_or([0; 32]);
    hex(&hmac(
        key,
        &[
            HEAD,
            &seq.to_be_bytes(),
            &h,
            &time_ms.to_be_bytes(),
            &epoch.to_be_bytes(),
        ],
    ))
}

/// The epochs: a start time and a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epochs {
    /// Start of epoch 0, Unix ms.
    pub start_ms: u64,
    /// Length of an epoch, ms (at least 1,000).
    pub length_ms: u64,
}

impl Epochs {
    /// The epoch `now_ms` falls in (0 before the start).
    pub fn at(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.start_ms) / self.length_ms.max(1)
    }
}

/// What the auditor keeps: the first key and the epochs.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationKey {
    /// `K(0)`.
    pub key0: [u8; 32],
    /// The epochs.
    pub epochs: Epochs,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerificationKey({:?}, key not shown)", self.epochs)
    }
}

impl VerificationKey {
    /// `enclave-audit-v1:<start ms>:<epoch ms>:<hex K(0)>`.
    pub fn encode(&self) -> String {
        format!(
            "enclave-audit-v1:{}:{}:{}",
            self.epochs.start_ms,
            self.epochs.length_ms,
            hex(&self.key0)
        )
    }

    /// Parses [`VerificationKey::encode`]'s text.
    pub fn parse(s: &str) -> Result<VerificationKey, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [tag, start, len, key] = parts.as_slice() else {
            return Err("a verification key is enclave-audit-v1:START:EPOCH:KEY".into());
        };
        if *tag != "enclave-audit-v1" {
            return Err(format!(
                "unknown key kind `{tag}` (expected enclave-audit-v1)"
            ));
        }
        let start_ms = start
            .parse()
            .map_err(|_| format!("start `{start}` is not a number of milliseconds"))?;
        let length_ms: u64 = len
            .parse()
            .map_err(|_| format!("epoch length `{len}` is not a number of milliseconds"))?;
        if length_ms < 1000 {
            return Err("the epoch length is under one second".into());
        }
        let key0 = unhex32(key).ok_or("the key is not 64 hex digits")?;
        Ok(VerificationKey {
            key0,
            epochs: Epochs {
                start_ms,
                length_ms,
            },
        })
    }

    /// Derives epoch keys in increasing order, each from the last one derived.
    pub fn deriver(&self) -> KeyDeriver {
        KeyDeriver {
            epoch: 0,
            key: self.key0,
            first: self.key0,
        }
    }
}

/// Epoch keys from `K(0)`, cheap when asked in increasing order (a verifier walks a chain
/// whose epochs only grow).
pub struct KeyDeriver {
    epoch: u64,
    key: [u8; 32],
    first: [u8; 32],
}

impl KeyDeriver {
    /// `K(epoch)`; `None` for an epoch absurdly far ahead (over 10^8 evolutions).
    pub fn key(&mut self, epoch: u64) -> Option<[u8; 32]> {
        if epoch < self.epoch {
            self.epoch = 0;
            self.key = self.first;
        }
        if epoch - self.epoch > 100_000_000 {
            return None;
        }
        while self.epoch < epoch {
            self.key = evolve(&self.key);
            self.epoch += 1;
        }
        Some(self.key)
    }
}

/// The node's sealing state: the key file, held open (enclave-netd cannot open files once
/// its filter is on), read and rewritten in place under the log's lock.
pub struct SealState {
    file: File,
    path: PathBuf,
    /// The epochs.
    pub epochs: Epochs,
    /// The epoch of `key`.
    pub epoch: u64,
    key: [u8; 32],
}

impl std::fmt::Debug for SealState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SealState({}, epoch {})",
            self.path.display(),
            self.epoch
        )
    }
}

/// `<log>.key`.
pub fn key_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".key");
    PathBuf::from(s)
}

fn bad(path: &Path, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    )
}

impl SealState {
    /// Makes a new key (from the kernel's random source) for a log whose epochs start now,
    /// writes the node's key file (mode 0600; refuses to replace one) and returns what the
    /// auditor must keep.
    pub fn create(path: &Path, now_ms: u64, length_ms: u64) -> std::io::Result<VerificationKey> {
        if length_ms < 1000 {
            return Err(bad(path, "the epoch length is under one second"));
        }
        let mut key0 = [0u8; 32];
        File::open("/dev/urandom")?.read_exact(&mut key0)?;
        let epochs = Epochs {
            start_ms: now_ms,
            length_ms,
        };
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&encode_state(epochs, 0, &key0))?;
        f.sync_all()?;
        Ok(VerificationKey { key0, epochs })
    }

    /// Opens the node's key file for sealing.
    pub fn open(path: &Path) -> std::io::Result<SealState> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let mut s = SealState {
            file,
            path: path.to_path_buf(),
            epochs: Epochs {
                start_ms: 0,
                length_ms: 1,
            },
            epoch: 0,
            key: [0; 32],
        };
        s.reload()?;
        Ok(s)
    }

    /// Reads the file again (another writer may have advanced it).
    pub fn reload(&mut self) -> std::io::Result<()> {
        let mut b = [0u8; FILE_LEN];
        self.file.read_exact_at(&mut b, 0)?;
        if &b[..8] != MAGIC {
            return Err(bad(&self.path, "not an Enclave audit key file"));
        }
        let n = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        self.epochs = Epochs {
            start_ms: n(8),
            length_ms: n(16).max(1),
        };
        self.epoch = n(24);
        self.key.copy_from_slice(&b[32..64]);
        Ok(())
    }

    /// The current key.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// Moves to the next epoch: derives its key and overwrites the old one on disk (synced)
    /// before returning, so the old key is gone from the file.
    pub fn advance(&mut self) -> std::io::Result<()> {
        let next = evolve(&self.key);
        let body = encode_state(self.epochs, self.epoch + 1, &next);
        self.file.write_all_at(&body, 0)?;
        self.file.sync_data()?;
        self.key = next;
        self.epoch += 1;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn encode_state(epochs: Epochs, epoch: u64, key: &[u8; 32]) -> [u8; FILE_LEN] {
    let mut b = [0u8; FILE_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&epochs.start_ms.to_be_bytes());
    b[16..24].copy_from_slice(&epochs.length_ms.to_be_bytes());
    b[24..32].copy_from_slice(&epoch.to_be_bytes());
    b[32..64].copy_from_slice(key);
    b
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        // Key "Jefe": HMAC pads a key with zeros to the block size, so the 32-byte
        // zero-padded form gives the RFC's value.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac(&key, &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn keys_evolve_one_way_and_the_deriver_finds_any_epoch() {
        let vk = VerificationKey {
            key0: [7; 32],
            epochs: Epochs {
                start_ms: 1_000,
                length_ms: 60_000,
            },
        };
        let mut d = vk.deriver();
        let k3 = d.key(3).unwrap();
        assert_eq!(k3, evolve(&evolve(&evolve(&[7; 32]))));
        assert_eq!(d.key(1).unwrap(), evolve(&[7; 32]));
        assert_eq!(d.key(3).unwrap(), k3);
        assert_eq!(VerificationKey::parse(&vk.encode()).unwrap(), vk);
        assert_eq!(vk.epochs.at(0), 0);
        assert_eq!(vk.epochs.at(61_000), 1);
        for bad in [
            "",
            "enclave-audit-v2:1:2000:00",
            "enclave-audit-v1:1:10:00",
            "enclave-audit-v1:x:2000:00",
        ] {
            assert!(VerificationKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_node_file_holds_only_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log.key");
        let vk = SealState::create(&p, 5_000, 1_000).unwrap();
        assert!(
            SealState::create(&p, 5_000, 1_000).is_err(),
            "never replaced"
        );
        let mut s = SealState::open(&p).unwrap();
        assert_eq!((s.epoch, *s.key()), (0, vk.key0));
        s.advance().unwrap();
        s.advance().unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(on_disk.len(), FILE_LEN);
        assert!(!on_disk.windows(32).any(|w| w == vk.key0), "K(0) erased");
        assert!(
            !on_disk.windows(32).any(|w| w == evolve(&vk.key0)),
            "K(1) erased"
        );
        let again = SealState::open(&p).unwrap();
        assert_eq!(again.epoch, 2);
        assert_eq!(*again.key(), vk.deriver().key(2).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
