#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! Sealing against an attacker who is root on the node, and the verifier's locations at
//! rotation boundaries.
//!
//! The attacker here holds everything the node holds: the log files and the sealing key
//! file as it is when they take the node. They edit records and recompute the hash chain
//! (which an unkeyed chain cannot resist), and reseal what their key lets them.

use enclave_netfilter::audit::seal::{key_path, seal_mac, SealState, VerificationKey};
use enclave_netfilter::audit::{
    self, line_hash, AuditLog, AuditLogConfig, Problem, SignedHead, SyncPolicy, VerifyOptions,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A sealed log whose epochs last one second, with records written over about three
/// epochs: (log, verification key).
fn sealed_log(dir: &Path, records: u64) -> (PathBuf, VerificationKey) {
    let p = dir.join("audit.log");
    let vk = SealState::create(&key_path(&p), audit::now_ms(), 1000).unwrap();
    let mut log = AuditLog::open(AuditLogConfig {
        path: p.clone(),
        max_bytes: 0,
        sync: SyncPolicy::Never,
        seal_key: Some(key_path(&p)),
    })
    .unwrap();
    for i in 0..records {
        log.append(json!({"class_uid": 4001, "message": format!("record {i}")}))
            .unwrap();
        std::thread::sleep(Duration::from_millis(3000 / records));
    }
    (p, vk)
}

fn check(
    files: &[PathBuf],
    key: Option<&VerificationKey>,
    heads: &[SignedHead],
) -> audit::VerifyReport {
    audit::verify(
        files,
        &VerifyOptions {
            key: key.cloned(),
            heads: heads.to_vec(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn records(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn seq(v: &Value) -> u64 {
    v["metadata"]["sequence"].as_u64().unwrap()
}

fn epoch(v: &Value) -> u64 {
    v["unmapped"]["chain"]["seal"]["epoch"].as_u64().unwrap()
}

/// Writes records back with the chain recomputed; `reseal` gives a key for a record (by
/// its epoch) when the attacker can reseal it, and the epoch to claim.
fn rechain(p: &Path, mut recs: Vec<Value>, reseal: impl Fn(&Value) -> Option<(u64, [u8; 32])>) {
    let mut prev = audit::GENESIS.to_string();
    let mut out = String::new();
    for r in &mut recs {
        r["unmapped"]["chain"]["prev_sha256"] = json!(prev);
        if let Some((e, k)) = reseal(r) {
            r["unmapped"]["chain"]["seal"] =
                json!({"epoch": e, "mac": seal_mac(&k, seq(r), e, &prev)});
        }
        let line = serde_json::to_string(r).unwrap();
        prev = line_hash(line.as_bytes());
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(p, out).unwrap();
}

#[test]
fn every_record_is_sealed_and_every_epoch_closed() {
    let d = tempfile::tempdir().unwrap();
    let (p, vk) = sealed_log(d.path(), 30);
    let r = check(std::slice::from_ref(&p), Some(&vk), &[]);
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.sealed, r.records);
    assert_eq!(r.seals_checked, r.records);
    assert!(r.epochs_closed >= 2, "{} epochs closed", r.epochs_closed);
    // The node's key file now holds a later epoch's key, and none of the earlier ones.
    let st = SealState::open(&key_path(&p)).unwrap();
    assert!(st.epoch >= 2);
    let file = std::fs::read(key_path(&p)).unwrap();
    let mut d0 = vk.deriver();
    for e in 0..st.epoch {
        let k = d0.key(e).unwrap();
        assert!(
            !file.windows(32).any(|w| w == k),
            "key of epoch {e} still on the node"
        );
    }
    // A wrong key fails every seal, loudly.
    let mut wrong = vk.clone();
    wrong.key0[0] ^= 1;
    let r = check(std::slice::from_ref(&p), Some(&wrong), &[]);
    assert!(r
        .problems
        .iter()
        .any(|x| matches!(x, Problem::SealBroken { .. })));
}

#[test]
fn a_rechained_log_passes_the_hash_chain_and_fails_the_seals() {
    let d = tempfile::tempdir().unwrap();
    let (p, vk) = sealed_log(d.path(), 30);
    let mut recs = records(&p);
    // Record seq 5 (epoch 0) says something else; every later prev_sha256 recomputed.
    assert_eq!(epoch(&recs[4]), 0);
    recs[4]["message"] = json!("record 4, edited");
    rechain(&p, recs, |_| None);
    let plain = check(std::slice::from_ref(&p), None, &[]);
    assert!(
        plain.ok(),
        "an unkeyed chain cannot tell: {:?}",
        plain.problems
    );
    let r = check(std::slice::from_ref(&p), Some(&vk), &[]);
    let first = r.problems.first().expect("a broken seal");
    assert!(
        matches!(first, Problem::SealBroken { seq: 6, changed: Some(c), .. } if c.line == 5),
        "{:?}",
        r.problems
    );
    assert!(
        first
            .to_string()
            .contains(":5: record seq 5 was changed after it was sealed"),
        "{first}"
    );
}

#[test]
fn root_on_the_node_cannot_reseal_an_earlier_epoch() {
    let d = tempfile::tempdir().unwrap();
    let (p, vk) = sealed_log(d.path(), 30);
    // What the attacker takes: the node's key file, at the current epoch E.
    let stolen = SealState::open(&key_path(&p)).unwrap();
    let (e_now, k_now) = (stolen.epoch, *stolen.key());
    assert!(e_now >= 2);
    let orig = records(&p);

    // 1. Edit an epoch-0 record; reseal what the stolen key can (the current epoch's
    //    records), keep the older seals: the first older seal after the edit breaks.
    let mut recs = orig.clone();
    recs[2]["message"] = json!("record 2, edited");
    rechain(&p, recs, |r| (epoch(r) == e_now).then_some((e_now, k_now)));
    let r = check(std::slice::from_ref(&p), Some(&vk), &[]);
    assert!(
        matches!(r.problems.first(), Some(Problem::SealBroken { seq: 4, .. })),
        "{:?}",
        r.problems
    );

    // 2. Reseal everything as if it had all been written in epoch E: the epochs before
    //    cannot be forged, so the sealed records start late.
    let mut recs = orig.clone();
    recs[2]["message"] = json!("record 2, edited");
    recs.retain(|r| r["unmapped"]["enclave"]["seal_closes_epoch"].is_null());
    rechain(&p, recs, |_| Some((e_now, k_now)));
    let r = check(std::slice::from_ref(&p), Some(&vk), &[]);
    assert!(
        r.problems
            .iter()
            .any(|x| matches!(x, Problem::SealingStartsLate { epoch, .. } if *epoch == e_now)),
        "{:?}",
        r.problems
    );

    // 3. Rewrite only the current epoch (what the stolen key can seal): the seals hold,
    //    which is why heads leave the node. A head exported before the rewrite catches it.
    let restore: String = orig
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&p, &restore).unwrap();
    let last = orig.last().unwrap();
    let last_line = serde_json::to_string(last).unwrap();
    let exported = SignedHead {
        seq: seq(last),
        sha256: line_hash(last_line.as_bytes()),
        time: audit::now_ms(),
        epoch: Some(e_now),
        mac: Some(audit::seal::head_mac(
            &vk.deriver().key(e_now).unwrap(),
            seq(last),
            &line_hash(last_line.as_bytes()),
            audit::now_ms(),
            e_now,
        )),
    };
    // (The head's time is part of its MAC: sign and state the same one.)
    let exported = SignedHead {
        mac: Some(audit::seal::head_mac(
            &vk.deriver().key(e_now).unwrap(),
            exported.seq,
            &exported.sha256,
            exported.time,
            e_now,
        )),
        ..exported
    };
    let ok = check(
        std::slice::from_ref(&p),
        Some(&vk),
        std::slice::from_ref(&exported),
    );
    assert!(ok.ok(), "{:?}", ok.problems);
    assert_eq!(ok.anchored_to, Some(exported.seq));
    let mut recs = orig.clone();
    let n = recs.len();
    recs[n - 1]["message"] = json!("the last record, rewritten");
    rechain(&p, recs, |r| (epoch(r) == e_now).then_some((e_now, k_now)));
    let sealed_only = check(std::slice::from_ref(&p), Some(&vk), &[]);
    assert!(
        sealed_only.ok(),
        "the current epoch is the attacker's: {:?}",
        sealed_only.problems
    );
    let r = check(
        std::slice::from_ref(&p),
        Some(&vk),
        std::slice::from_ref(&exported),
    );
    assert!(
        r.problems
            .iter()
            .any(|x| matches!(x, Problem::HeadMismatch { seq, .. } if *seq == exported.seq)),
        "{:?}",
        r.problems
    );
    // A head forged in the receiver's stream does not verify.
    let mut forged = exported.clone();
    forged.seq += 5;
    let r = check(std::slice::from_ref(&p), Some(&vk), &[forged]);
    assert!(
        matches!(r.problems.first(), Some(Problem::HeadForged { .. })),
        "{:?}",
        r.problems
    );
}

#[test]
fn records_after_the_last_head_are_not_yet_anchored() {
    let d = tempfile::tempdir().unwrap();
    let (p, vk) = sealed_log(d.path(), 10);
    let recs = records(&p);
    let h = &recs[5];
    let line = serde_json::to_string(h).unwrap();
    let head = SignedHead {
        seq: seq(h),
        sha256: line_hash(line.as_bytes()),
        time: 0,
        epoch: None,
        mac: None,
    };
    let r = check(std::slice::from_ref(&p), Some(&vk), &[head]);
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.anchored_to, Some(seq(h)));
    assert_eq!(r.unanchored, Some((seq(h) + 1, r.last_seq)));
}

#[test]
fn at_a_rotation_boundary_the_file_that_was_changed_is_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("audit.log");
    {
        let mut log = AuditLog::open(AuditLogConfig {
            path: p.clone(),
            max_bytes: 2000,
            sync: SyncPolicy::Never,
            seal_key: None,
        })
        .unwrap();
        for i in 0..40 {
            log.append(
                json!({"class_uid": 4001, "message": format!("record {i} {}", "x".repeat(100))}),
            )
            .unwrap();
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("audit.log") && !n.ends_with(".head")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    // The first rotated file (`audit.log.<first>-<last>`).
    let first = files
        .iter()
        .find(|f| {
            f.extension()
                .is_some_and(|e| e.to_string_lossy().contains('-'))
        })
        .unwrap()
        .clone();
    let original = std::fs::read_to_string(&first).unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_string).collect();
    let last = lines.len();

    // The last record of the first file edited: named in that file, not the next one.
    lines[last - 1] = lines[last - 1].replace("record", "RECORD");
    std::fs::write(&first, lines.join("\n") + "\n").unwrap();
    let r = check(&files, None, &[]);
    let msg = r
        .problems
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        msg.starts_with(&format!("{}:{last}: record seq", first.display())),
        "{msg}"
    );

    // The last record of the first file deleted: the message says between which files.
    lines.pop();
    std::fs::write(&first, lines.join("\n") + "\n").unwrap();
    let r = check(&files, None, &[]);
    let msg = r
        .problems
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        msg.contains("is missing (deleted), between the end of")
            && msg.contains(&first.display().to_string()),
        "{msg}"
    );
    std::fs::write(&first, original).unwrap();
    assert!(check(&files, None, &[]).ok());
}

/// The node log as the node writes it: several writers (one per pod's netd) appending to
/// one sealed chain under the lock, across epochs, one of them restarting mid-epoch.
#[test]
fn several_writers_and_a_restart_keep_one_sealed_chain() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("audit.log");
    let vk = SealState::create(&key_path(&p), audit::now_ms(), 1000).unwrap();
    let cfg = || AuditLogConfig::node(p.clone(), SyncPolicy::Never);
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let cfg = cfg();
            std::thread::spawn(move || {
                let mut log = AuditLog::open_shared(cfg.clone()).unwrap();
                for i in 0..40 {
                    if w == 0 && i == 20 {
                        // A restart mid-epoch: the key file says where sealing stands.
                        drop(log);
                        log = AuditLog::open_shared(cfg.clone()).unwrap();
                    }
                    log.append(
                        json!({"class_uid": 4001, "message": format!("writer {w} record {i}")}),
                    )
                    .unwrap();
                    std::thread::sleep(Duration::from_millis(60));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let r = check(std::slice::from_ref(&p), Some(&vk), &[]);
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records - r.epochs_closed, 120);
    assert!(r.epochs_closed >= 1, "{} epochs closed", r.epochs_closed);
    // Each passed epoch was closed exactly once, whichever writer got there first.
    let closes: Vec<u64> = records(&p)
        .iter()
        .filter_map(|v| v["unmapped"]["enclave"]["seal_closes_epoch"].as_u64())
        .collect();
    let mut unique = closes.clone();
    unique.dedup();
    assert_eq!(closes, unique, "an epoch closed twice: {closes:?}");
}

/// A closing record removed (with the chain and sequence numbers recomputed, as root could
/// do without any key): the epoch shows as never closed, and the next seal breaks.
#[test]
fn an_epochs_closing_record_removed_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let (p, vk) = sealed_log(d.path(), 20);
    let mut recs = records(&p);
    let k = recs
        .iter()
        .position(|r| r["unmapped"]["enclave"]["seal_closes_epoch"] == json!(0))
        .expect("epoch 0 closed");
    recs.remove(k);
    for (i, r) in recs.iter_mut().enumerate() {
        r["metadata"]["sequence"] = json!(i as u64 + 1);
    }
    rechain(&p, recs, |_| None);
    let r = check(std::slice::from_ref(&p), Some(&vk), &[]);
    assert!(
        r.problems
            .iter()
            .any(|x| matches!(x, Problem::EpochNotClosed { epoch: 0, .. })),
        "{:?}",
        r.problems
    );
    assert!(r
        .problems
        .iter()
        .any(|x| matches!(x, Problem::SealBroken { .. })));
}
