//! Verifies audit log files and says exactly where a chain breaks, which record was
//! changed, and (with the auditor's key) whether every seal holds.

use super::log::Head;
use super::seal::{head_mac, seal_mac, VerificationKey};
use super::{chain_fields, line_hash, AuditError, GENESIS};
use std::fmt;
use std::path::{Path, PathBuf};

/// A head exported off the node (`enclavectl audit export`): where the chain stood, when,
/// and its MAC with the key of its epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedHead {
    /// Sequence number of the last record.
    pub seq: u64,
    /// SHA-256 of its line.
    pub sha256: String,
    /// When it was taken, Unix ms.
    pub time: u64,
    /// The seal epoch it was signed in (absent: an unsealed log's head).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// `head_mac` with that epoch's key.
    #[serde(default)]
    pub mac: Option<String>,
}

/// What to check beyond the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// A head kept elsewhere: the log must reach it, with the same hash.
    pub head: Option<Head>,
    /// Heads exported off the node; the log must contain each (same hash) or be cut.
    pub heads: Vec<SignedHead>,
    /// The auditor's verification key: every seal and signed head is checked.
    pub key: Option<VerificationKey>,
    /// Accept a chain whose first record is not the genesis record (older files archived).
    pub allow_partial: bool,
}

/// Where a record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    /// File.
    pub file: String,
    /// Line (from 1).
    pub line: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A break in the chain, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file ends in a partial line.
    TornTail {
        /// Where.
        at: At,
        /// Its length.
        bytes: usize,
    },
    /// A line is not a JSON record with chain fields.
    Unparsable {
        /// Where.
        at: At,
        /// Why.
        why: String,
    },
    /// Sequence numbers skip: records were deleted.
    Missing {
        /// The record after the gap.
        at: At,
        /// The record before the gap.
        after: Option<At>,
        /// First missing sequence number.
        from: u64,
        /// Last missing.
        to: u64,
    },
    /// Records in the wrong order: these lines hold exactly the next sequence numbers, in
    /// another order.
    Reordered {
        /// The first line of the block.
        at: At,
        /// Its last line.
        last_line: usize,
        /// The sequence numbers as found.
        found: Vec<u64>,
    },
    /// A sequence number repeats or goes back: records inserted or duplicated.
    OutOfOrder {
        /// Where.
        at: At,
        /// Sequence number expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// A record's `prev_sha256` does not match the line before it: that line was changed
    /// (or this one forged).
    HashMismatch {
        /// The record whose `prev_sha256` does not match.
        at: At,
        /// Its sequence number.
        seq: u64,
        /// The record before it: the one most likely changed.
        changed: At,
    },
    /// A seal does not verify: with the seal before it good, the record before this one was
    /// changed after it was sealed (or this one was).
    SealBroken {
        /// The record whose seal fails.
        at: At,
        /// Its sequence number.
        seq: u64,
        /// Its epoch.
        epoch: u64,
        /// The record before it.
        changed: Option<At>,
    },
    /// A record without a seal after sealing began.
    Unsealed {
        /// Where.
        at: At,
        /// Its sequence number.
        seq: u64,
    },
    /// An epoch ended without its closing record, so its last records are covered only by
    /// a later epoch's key.
    EpochNotClosed {
        /// The first record of the later epoch.
        at: At,
        /// The epoch left open.
        epoch: u64,
    },
    /// Epochs skipped: the epochs between had no closing record, which the writer always
    /// makes.
    EpochSkipped {
        /// The first record after the gap.
        at: At,
        /// The first epoch missing.
        from: u64,
        /// The last.
        to: u64,
    },
    /// The sealed records do not start in epoch 0 (the writer closes every epoch from the
    /// key's creation on): someone who held a later key resealed them.
    SealingStartsLate {
        /// The first sealed record.
        at: At,
        /// Its epoch.
        epoch: u64,
    },
    /// A record's epoch is older than the one before it.
    EpochBackwards {
        /// Where.
        at: At,
        /// Its epoch.
        epoch: u64,
        /// The epoch before it.
        before: u64,
    },
    /// The chain does not start at the genesis record.
    NotGenesis {
        /// File.
        file: String,
        /// First sequence number found.
        seq: u64,
    },
    /// The log ends before a head kept elsewhere.
    Truncated {
        /// Last sequence number in the log.
        last: u64,
        /// The head's.
        head: u64,
    },
    /// The record at a head's sequence number has another hash.
    HeadMismatch {
        /// Sequence number.
        seq: u64,
        /// Where that record is.
        at: Option<At>,
    },
    /// An exported head whose MAC does not verify (not made on the node, or changed).
    HeadForged {
        /// Its sequence number.
        seq: u64,
    },
    /// No records at all.
    Empty,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::TornTail { at, bytes } => write!(f, "{at}: torn last line ({bytes} bytes, no newline): the writer stopped mid-record and the log was not reopened since"),
            Problem::Unparsable { at, why } => write!(f, "{at}: not an audit record: {why}"),
            Problem::Missing { at, after, from, to } => {
                let what = if from == to { format!("record seq {from} is missing (deleted)") } else { format!("records seq {from}..{to} are missing (deleted)") };
                match after {
                    Some(a) if a.file != at.file => write!(f, "{at}: {what}, between the end of {} (line {}) and this file", a.file, a.line),
                    Some(a) => write!(f, "{at}: {what}, after line {}", a.line),
                    None => write!(f, "{at}: {what}"),
                }
            }
            Problem::Reordered { at, last_line, found } => write!(f, "{at}: lines {}..{last_line} hold records seq {} in the wrong order: {:?} (reordered)", at.line, found.iter().min().copied().unwrap_or(0), found),
            Problem::OutOfOrder { at, expected, found } => write!(f, "{at}: expected seq {expected}, found {found}: records inserted or duplicated"),
            Problem::HashMismatch { at, seq, changed } => write!(f, "{changed}: record seq {} was modified: the next record ({at}, seq {seq}) chains to another hash (or that one was forged)", seq - 1),
            Problem::SealBroken { at, seq, epoch, changed: Some(c) } => write!(f, "{c}: record seq {} was changed after it was sealed: the seal of the next record ({at}, seq {seq}, epoch {epoch}) does not verify", seq - 1),
            Problem::SealBroken { at, seq, epoch, changed: None } => write!(f, "{at}: the seal of record seq {seq} (epoch {epoch}) does not verify: it was forged or changed"),
            Problem::Unsealed { at, seq } => write!(f, "{at}: record seq {seq} has no seal although the records before it are sealed: written without the key, or forged"),
            Problem::EpochNotClosed { at, epoch } => write!(f, "{at}: epoch {epoch} ended without its closing seal: its last records are covered only by a later key, which someone on the node may have held"),
            Problem::EpochSkipped { at, from, to } => write!(f, "{at}: seal epochs {from}..{to} are missing: the writer closes every epoch, so records were removed and the rest resealed"),
            Problem::SealingStartsLate { at, epoch } => write!(f, "{at}: the sealed records start in epoch {epoch}, not 0: they were resealed by someone who held a later key (or older files are missing: --allow-partial)"),
            Problem::EpochBackwards { at, epoch, before } => write!(f, "{at}: seal epoch {epoch} after epoch {before}: sealed out of order"),
            Problem::NotGenesis { file, seq } => write!(f, "{file}: chain starts at seq {seq}, not at the first record (earlier records missing; pass --allow-partial if they were archived)"),
            Problem::Truncated { last, head } => write!(f, "log ends at seq {last} but a head records seq {head}: records {}..{head} were cut off", last + 1),
            Problem::HeadMismatch { seq, at: Some(at) } => write!(f, "{at}: record seq {seq} does not hash to the head's sha256: it was modified"),
            Problem::HeadMismatch { seq, at: None } => write!(f, "record seq {seq} does not hash to the head's sha256: it was modified"),
            Problem::HeadForged { seq } => write!(f, "the exported head for seq {seq} does not verify with the key: it was not made by the node, or was changed"),
            Problem::Empty => write!(f, "no records"),
        }
    }
}

/// What verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// Files read, in chain order.
    pub files: Vec<PathBuf>,
    /// First sequence number.
    pub first_seq: u64,
    /// Last sequence number.
    pub last_seq: u64,
    /// Hash of the last record.
    pub last_hash: String,
    /// Crash recoveries recorded in the chain (file, line, after seq).
    pub recoveries: Vec<(String, usize, u64)>,
    /// Sealed records seen, and how many of their seals were checked (with a key).
    pub sealed: u64,
    /// Seals checked with the key.
    pub seals_checked: u64,
    /// Epochs closed in the chain.
    pub epochs_closed: u64,
    /// Records before the first sealed one (written before the key existed).
    pub unsealed_before_sealing: u64,
    /// The last sequence number an exported head (or `--head`) vouches for.
    pub anchored_to: Option<u64>,
    /// Records after the last head: not yet anchored off the node (first, last).
    pub unanchored: Option<(u64, u64)>,
    /// Breaks; empty means intact.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Line {
    at: At,
    text: Vec<u8>,
}

/// One parsed record.
struct Rec {
    seq: u64,
    prev: String,
    seal: Option<(u64, String)>,
    closes: Option<u64>,
    recovery_after: Option<u64>,
}

fn parse(text: &[u8]) -> Result<Rec, String> {
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let (seq, prev) =
        chain_fields(&v).ok_or("no metadata.sequence / unmapped.chain.prev_sha256")?;
    let seal = v
        .pointer("/unmapped/chain/seal")
        .map(|s| {
            let epoch = s.get("epoch").and_then(|e| e.as_u64());
            let mac = s.get("mac").and_then(|m| m.as_str());
            match (epoch, mac) {
                (Some(e), Some(m)) => Ok((e, m.to_string())),
                _ => Err("a seal without epoch and mac".to_string()),
            }
        })
        .transpose()?;
    Ok(Rec {
        seq,
        prev: prev.to_string(),
        seal,
        closes: v
            .pointer("/unmapped/enclave/seal_closes_epoch")
            .and_then(|e| e.as_u64()),
        recovery_after: v
            .pointer("/unmapped/enclave/recovery/after_seq")
            .and_then(|s| s.as_u64()),
    })
}

/// Reads heads exported by `enclavectl audit export` from what a receiver stored: one per
/// line, the JSON object anywhere in the line (a syslog receiver prefixes its own fields);
/// lines that hold no head are skipped.
pub fn read_heads(text: &str) -> Vec<SignedHead> {
    text.lines()
        .filter_map(|l| {
            let start = l.find("{\"")?;
            serde_json::from_str::<SignedHead>(l[start..].trim_end()).ok()
        })
        .collect()
}

/// Verifies the files of one chain (in any order: they are ordered by first sequence).
pub fn verify(paths: &[PathBuf], opts: &VerifyOptions) -> Result<VerifyReport, AuditError> {
    let mut files: Vec<(u64, PathBuf, Vec<u8>)> = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|source| AuditError::Io {
            path: p.display().to_string(),
            op: "read",
            source,
        })?;
        let first = first_seq(&bytes).unwrap_or(u64::MAX);
        files.push((first, p.clone(), bytes));
    }
    files.sort_by_key(|(s, _, _)| *s);

    let mut rep = VerifyReport::default();
    let mut lines = Vec::new();
    for (_, p, bytes) in &files {
        rep.files.push(p.clone());
        let name = display(p);
        let mut n = 0;
        let mut rest: &[u8] = bytes;
        while !rest.is_empty() {
            n += 1;
            let at = At {
                file: name.clone(),
                line: n,
            };
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    lines.push(Line {
                        at,
                        text: rest[..i].to_vec(),
                    });
                    rest = &rest[i + 1..];
                }
                None => {
                    rep.problems.push(Problem::TornTail {
                        at,
                        bytes: rest.len(),
                    });
                    rest = &[];
                }
            }
        }
    }
    let parsed: Vec<Result<Rec, String>> = lines.iter().map(|l| parse(&l.text)).collect();
    let hashes: Vec<String> = lines.iter().map(|l| line_hash(&l.text)).collect();

    let mut deriver = opts.key.as_ref().map(VerificationKey::deriver);
    let mut expected_seq: Option<u64> = None;
    let mut prev_hash: Option<String> = None;
    let mut prev_at: Option<At> = None;
    // The seal epoch of the record before, and whether that record closed it.
    let mut prev_seal: Option<(u64, bool)> = None;
    let mut by_seq: std::collections::HashMap<u64, usize> = Default::default();
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        let rec = match &parsed[i] {
            Ok(r) => r,
            Err(why) => {
                rep.problems.push(Problem::Unparsable {
                    at: l.at.clone(),
                    why: why.clone(),
                });
                prev_hash = Some(hashes[i].clone());
                prev_at = Some(l.at.clone());
                i += 1;
                continue;
            }
        };
        let seq = rec.seq;
        let mut chained = true;
        match expected_seq {
            None => {
                rep.first_seq = seq;
                if (seq != 1 || rec.prev != GENESIS) && !opts.allow_partial {
                    rep.problems.push(Problem::NotGenesis {
                        file: l.at.file.clone(),
                        seq,
                    });
                }
                chained = false;
            }
            Some(exp) if seq != exp => {
                if let Some(k) = reordered_block(&parsed[i..], exp) {
                    let found: Vec<u64> = parsed[i..i + k]
                        .iter()
                        .filter_map(|r| r.as_ref().ok().map(|r| r.seq))
                        .collect();
                    rep.problems.push(Problem::Reordered {
                        at: l.at.clone(),
                        last_line: lines[i + k - 1].at.line,
                        found,
                    });
                    // Carry on after the block as if it had been in order.
                    let last = exp + k as u64 - 1;
                    let j = (i..i + k)
                        .find(|j| parsed[*j].as_ref().is_ok_and(|r| r.seq == last))
                        .unwrap_or(i + k - 1);
                    for (j, r) in parsed.iter().enumerate().skip(i).take(k) {
                        if let Ok(r) = r {
                            by_seq.insert(r.seq, j);
                        }
                        rep.records += 1;
                    }
                    prev_hash = Some(hashes[j].clone());
                    prev_at = Some(lines[j].at.clone());
                    prev_seal = parsed[j]
                        .as_ref()
                        .ok()
                        .and_then(|r| r.seal.as_ref().map(|(e, _)| (*e, r.closes == Some(*e))));
                    expected_seq = Some(last + 1);
                    rep.last_seq = last;
                    rep.last_hash = hashes[j].clone();
                    i += k;
                    continue;
                }
                if seq > exp {
                    rep.problems.push(Problem::Missing {
                        at: l.at.clone(),
                        after: prev_at.clone(),
                        from: exp,
                        to: seq - 1,
                    });
                } else {
                    rep.problems.push(Problem::OutOfOrder {
                        at: l.at.clone(),
                        expected: exp,
                        found: seq,
                    });
                }
                chained = false;
            }
            Some(_) => {
                if prev_hash.as_deref() != Some(rec.prev.as_str()) {
                    rep.problems.push(Problem::HashMismatch {
                        at: l.at.clone(),
                        seq,
                        changed: prev_at.clone().unwrap_or_else(|| l.at.clone()),
                    });
                }
            }
        }
        // Seals.
        match (&rec.seal, prev_seal) {
            (None, Some(_)) => rep.problems.push(Problem::Unsealed {
                at: l.at.clone(),
                seq,
            }),
            (None, None) => {
                if rep.sealed == 0 {
                    rep.unsealed_before_sealing += 1;
                }
            }
            (Some((epoch, mac)), before) => {
                rep.sealed += 1;
                if rec.closes == Some(*epoch) {
                    rep.epochs_closed += 1;
                }
                let checking = deriver.is_some();
                match before {
                    None if checking && *epoch != 0 && !opts.allow_partial => {
                        rep.problems.push(Problem::SealingStartsLate {
                            at: l.at.clone(),
                            epoch: *epoch,
                        })
                    }
                    Some((b, _)) if *epoch < b => rep.problems.push(Problem::EpochBackwards {
                        at: l.at.clone(),
                        epoch: *epoch,
                        before: b,
                    }),
                    Some((b, closed)) if *epoch > b && checking => {
                        if !closed {
                            rep.problems.push(Problem::EpochNotClosed {
                                at: l.at.clone(),
                                epoch: b,
                            });
                        } else if *epoch > b + 1 {
                            rep.problems.push(Problem::EpochSkipped {
                                at: l.at.clone(),
                                from: b + 1,
                                to: *epoch - 1,
                            });
                        }
                    }
                    _ => {}
                }
                if let Some(d) = deriver.as_mut() {
                    rep.seals_checked += 1;
                    let good = d
                        .key(*epoch)
                        .is_some_and(|k| seal_mac(&k, seq, *epoch, &rec.prev) == *mac);
                    if !good {
                        rep.problems.push(Problem::SealBroken {
                            at: l.at.clone(),
                            seq,
                            epoch: *epoch,
                            changed: chained.then(|| prev_at.clone()).flatten(),
                        });
                    }
                }
            }
        }
        prev_seal = rec
            .seal
            .as_ref()
            .map(|(e, _)| (*e, rec.closes == Some(*e)))
            .or(prev_seal);
        if let Some(after) = rec.recovery_after {
            rep.recoveries.push((l.at.file.clone(), l.at.line, after));
        }
        by_seq.insert(seq, i);
        rep.records += 1;
        rep.last_seq = seq;
        rep.last_hash = hashes[i].clone();
        prev_hash = Some(hashes[i].clone());
        prev_at = Some(l.at.clone());
        expected_seq = Some(seq + 1);
        i += 1;
    }
    if rep.records == 0 {
        rep.problems.push(Problem::Empty);
    }

    // Heads: the one given, and every exported one.
    let mut heads: Vec<SignedHead> = opts.heads.clone();
    if let Some(h) = &opts.head {
        heads.push(SignedHead {
            seq: h.seq,
            sha256: h.sha256.clone(),
            time: 0,
            epoch: None,
            mac: None,
        });
    }
    let mut deriver = opts.key.as_ref().map(VerificationKey::deriver);
    for h in &heads {
        if let (Some(d), Some(epoch), Some(mac)) = (deriver.as_mut(), h.epoch, &h.mac) {
            let good = d
                .key(epoch)
                .is_some_and(|k| head_mac(&k, h.seq, &h.sha256, h.time, epoch) == *mac);
            if !good {
                rep.problems.push(Problem::HeadForged { seq: h.seq });
                continue;
            }
        }
        match by_seq.get(&h.seq) {
            Some(&j) if hashes[j] != h.sha256 => rep.problems.push(Problem::HeadMismatch {
                seq: h.seq,
                at: Some(lines[j].at.clone()),
            }),
            Some(_) => {}
            None if h.seq > rep.last_seq => {
                if !rep
                    .problems
                    .iter()
                    .any(|p| matches!(p, Problem::Truncated { .. }))
                {
                    let head = heads.iter().map(|h| h.seq).max().unwrap_or(h.seq);
                    rep.problems.push(Problem::Truncated {
                        last: rep.last_seq,
                        head,
                    });
                }
            }
            None => rep.problems.push(Problem::HeadMismatch {
                seq: h.seq,
                at: None,
            }),
        }
        rep.anchored_to = Some(rep.anchored_to.map_or(h.seq, |a| a.max(h.seq)));
    }
    if let Some(a) = rep.anchored_to {
        if rep.last_seq > a {
            rep.unanchored = Some((a + 1, rep.last_seq));
        }
    }
    Ok(rep)
}

/// If the next `k` records (2 ≤ k ≤ 16) hold exactly sequence numbers `exp .. exp + k` in
/// another order, `k`.
fn reordered_block(recs: &[Result<Rec, String>], exp: u64) -> Option<usize> {
    let mut seen: Vec<u64> = Vec::new();
    for (k, r) in recs.iter().take(16).enumerate() {
        let seq = r.as_ref().ok()?.seq;
        seen.push(seq);
        if k >= 1 {
            let mut s = seen.clone();
            s.sort_unstable();
            if s.iter().enumerate().all(|(i, v)| *v == exp + i as u64) {
                return Some(k + 1);
            }
        }
    }
    None
}

fn first_seq(bytes: &[u8]) -> Option<u64> {
    let end = bytes
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(bytes.len());
    let v: serde_json::Value = serde_json::from_slice(&bytes[..end]).ok()?;
    chain_fields(&v).map(|(s, _)| s)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
