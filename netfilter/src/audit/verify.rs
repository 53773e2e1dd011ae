//! Verifies audit log files and says exactly where a chain breaks.

use super::log::Head;
use super::{chain_fields, line_hash, AuditError, GENESIS};
use std::fmt;
use std::path::{Path, PathBuf};

/// What to check beyond the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// A head kept elsewhere: the log must reach it, with the same hash.
    pub head: Option<Head>,
    /// Accept a chain whose first record is not the genesis record (older files archived).
    pub allow_partial: bool,
}

/// A break in the chain, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file ends in a partial line.
    TornTail {
        /// File.
        file: String,
        /// Line number of the partial line.
        line: usize,
        /// Its length.
        bytes: usize,
    },
    /// A line is not a JSON record with chain fields.
    Unparsable {
        /// File.
        file: String,
        /// Line.
        line: usize,
        /// Why.
        why: String,
    },
    /// Sequence numbers skip: records were deleted.
    Missing {
        /// File.
        file: String,
        /// Line where the gap shows.
        line: usize,
        /// First missing sequence number.
        from: u64,
        /// Last missing.
        to: u64,
    },
    /// A sequence number repeats or goes back: records inserted or reordered.
    OutOfOrder {
        /// File.
        file: String,
        /// Line.
        line: usize,
        /// Sequence number expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// A record's `prev_sha256` does not match the line before it.
    HashMismatch {
        /// File.
        file: String,
        /// Line of the record whose prev does not match.
        line: usize,
        /// Its sequence number.
        seq: u64,
    },
    /// The chain does not start at the genesis record.
    NotGenesis {
        /// File.
        file: String,
        /// First sequence number found.
        seq: u64,
    },
    /// The log ends before the head kept elsewhere.
    Truncated {
        /// Last sequence number in the log.
        last: u64,
        /// The head's.
        head: u64,
    },
    /// The record at the head's sequence number has another hash.
    HeadMismatch {
        /// Sequence number.
        seq: u64,
    },
    /// No records at all.
    Empty,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::TornTail { file, line, bytes } => write!(f, "{file}:{line}: torn last line ({bytes} bytes, no newline): the writer stopped mid-record and the log was not reopened since"),
            Problem::Unparsable { file, line, why } => write!(f, "{file}:{line}: not an audit record: {why}"),
            Problem::Missing { file, line, from, to } if from == to => write!(f, "{file}:{line}: record seq {from} is missing (deleted)"),
            Problem::Missing { file, line, from, to } => write!(f, "{file}:{line}: records seq {from}..{to} are missing (deleted)"),
            Problem::OutOfOrder { file, line, expected, found } => write!(f, "{file}:{line}: expected seq {expected}, found {found}: records inserted, duplicated or reordered"),
            Problem::HashMismatch { file, line, seq } => write!(f, "{file}:{line}: chain broken at seq {seq}: its prev_sha256 does not match the record before it (that record was modified, or this one forged)"),
            Problem::NotGenesis { file, seq } => write!(f, "{file}: chain starts at seq {seq}, not at the first record (earlier records missing; pass --allow-partial if they were archived)"),
            Problem::Truncated { last, head } => write!(f, "log ends at seq {last} but the head records seq {head}: records {}..{head} were cut off", last + 1),
            Problem::HeadMismatch { seq } => write!(f, "record seq {seq} does not hash to the head's sha256: it was modified"),
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
    file: String,
    line: usize,
    text: Vec<u8>,
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
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    lines.push(Line {
                        file: name.clone(),
                        line: n,
                        text: rest[..i].to_vec(),
                    });
                    rest = &rest[i + 1..];
                }
                None => {
                    rep.problems.push(Problem::TornTail {
                        file: name.clone(),
                        line: n,
                        bytes: rest.len(),
                    });
                    rest = &[];
                }
            }
        }
    }

    let mut expected_seq: Option<u64> = None;
    let mut prev_hash: Option<String> = None;
    let mut head_seen = false;
    for l in &lines {
        let v: serde_json::Value = match serde_json::from_slice(&l.text) {
            Ok(v) => v,
            Err(e) => {
                rep.problems.push(Problem::Unparsable {
                    file: l.file.clone(),
                    line: l.line,
                    why: e.to_string(),
                });
                prev_hash = Some(line_hash(&l.text));
                continue;
            }
        };
        let Some((seq, prev)) = chain_fields(&v) else {
            rep.problems.push(Problem::Unparsable {
                file: l.file.clone(),
                line: l.line,
                why: "no metadata.sequence / unmapped.chain.prev_sha256".into(),
            });
            prev_hash = Some(line_hash(&l.text));
            continue;
        };
        match expected_seq {
            None => {
                rep.first_seq = seq;
                if (seq != 1 || prev != GENESIS) && !opts.allow_partial {
                    rep.problems.push(Problem::NotGenesis {
                        file: l.file.clone(),
                        seq,
                    });
                }
            }
            Some(exp) if seq > exp => rep.problems.push(Problem::Missing {
                file: l.file.clone(),
                line: l.line,
                from: exp,
                to: seq - 1,
            }),
            Some(exp) if seq < exp => rep.problems.push(Problem::OutOfOrder {
                file: l.file.clone(),
                line: l.line,
                expected: exp,
                found: seq,
            }),
            Some(_) => {
                if prev_hash.as_deref() != Some(prev) {
                    rep.problems.push(Problem::HashMismatch {
                        file: l.file.clone(),
                        line: l.line,
                        seq,
                    });
                }
            }
        }
        let recovery = v
            .get("unmapped")
            .and_then(|u| u.get("enclave"))
            .and_then(|e| e.get("recovery"));
        if let Some(after) = recovery
            .and_then(|r| r.get("after_seq"))
            .and_then(|s| s.as_u64())
        {
            rep.recoveries.push((l.file.clone(), l.line, after));
        }
        let h = line_hash(&l.text);
        if let Some(head) = &opts.head {
            if head.seq == seq {
                head_seen = true;
                if head.sha256 != h {
                    rep.problems.push(Problem::HeadMismatch { seq });
                }
            }
        }
        rep.records += 1;
        rep.last_seq = seq;
        rep.last_hash = h.clone();
        prev_hash = Some(h);
        expected_seq = Some(seq + 1);
    }
    if rep.records == 0 {
        rep.problems.push(Problem::Empty);
    }
    if let Some(head) = &opts.head {
        if !head_seen && head.seq > rep.last_seq {
            rep.problems.push(Problem::Truncated {
                last: rep.last_seq,
                head: head.seq,
            });
        }
    }
    Ok(rep)
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
