#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The audit log: chained writing, crash recovery, rotation, and verification that says
//! where a chain breaks.

use enclave_netfilter::audit::{
    self, AuditLog, AuditLogConfig, Problem, SyncPolicy, VerifyOptions,
};
use serde_json::json;
use std::path::{Path, PathBuf};

fn open(path: &Path, max_bytes: u64) -> AuditLog {
    AuditLog::open(AuditLogConfig {
        path: path.to_path_buf(),
        max_bytes,
        sync: SyncPolicy::Always,
        seal_key: None,
    })
    .expect("open log")
}

fn write(path: &Path, n: usize) {
    let mut log = open(path, 0);
    for i in 0..n {
        log.append(json!({"class_uid": 4001, "message": format!("record {i}")}))
            .expect("append");
    }
}

fn verify(files: &[PathBuf], head: Option<audit::Head>) -> audit::VerifyReport {
    audit::verify(
        files,
        &VerifyOptions {
            head,
            ..Default::default()
        },
    )
    .expect("verify runs")
}

fn at(p: &Path, line: usize) -> audit::At {
    audit::At {
        file: p.display().to_string(),
        line,
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

fn rewrite(p: &Path, lines: &[String]) {
    std::fs::write(p, lines.join("\n") + "\n").expect("write");
}

#[test]
fn intact_chain_verifies_and_reaches_its_head() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 10);
    let head = audit::read_head(&audit::head_path(&p))
        .expect("head")
        .expect("head written on close");
    assert_eq!(head.seq, 10);
    let r = verify(&[p], Some(head.clone()));
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.first_seq, r.last_seq), (10, 1, 10));
    assert_eq!(r.last_hash, head.sha256);
}

#[test]
fn reopening_continues_the_chain() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 3);
    write(&p, 4);
    let r = verify(&[p], None);
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.last_seq, 7);
}

#[test]
fn modified_record_breaks_the_chain_at_the_next_record() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 6);
    let mut l = lines(&p);
    l[2] = l[2].replace("record 2", "record X");
    rewrite(&p, &l);
    let r = verify(std::slice::from_ref(&p), None);
    assert_eq!(
        r.problems,
        vec![Problem::HashMismatch {
            at: at(&p, 4),
            seq: 4,
            changed: at(&p, 3),
        }]
    );
    // The message names the record that was changed, then the one that shows it.
    assert!(
        r.problems[0]
            .to_string()
            .starts_with(&format!("{}:3: record seq 3 was modified", p.display())),
        "{}",
        r.problems[0]
    );
}

#[test]
fn modified_last_record_is_caught_by_the_head() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 4);
    let head = audit::read_head(&audit::head_path(&p)).expect("head");
    let mut l = lines(&p);
    l[3] = l[3].replace("record 3", "record Y");
    rewrite(&p, &l);
    assert!(
        verify(std::slice::from_ref(&p), None).ok(),
        "without a head the last record cannot be checked"
    );
    assert_eq!(
        verify(std::slice::from_ref(&p), head).problems,
        vec![Problem::HeadMismatch {
            seq: 4,
            at: Some(at(&p, 4))
        }]
    );
}

#[test]
fn deleted_record_is_reported_by_sequence_number() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 6);
    let mut l = lines(&p);
    l.remove(2);
    rewrite(&p, &l);
    let r = verify(std::slice::from_ref(&p), None);
    assert_eq!(
        r.problems,
        vec![Problem::Missing {
            at: at(&p, 3),
            after: Some(at(&p, 2)),
            from: 3,
            to: 3
        }]
    );
}

#[test]
fn inserted_and_reordered_records_are_reported() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 6);
    let orig = lines(&p);
    let mut l = orig.clone();
    l.insert(3, orig[1].clone());
    rewrite(&p, &l);
    let r = verify(std::slice::from_ref(&p), None);
    assert!(
        r.problems.contains(&Problem::OutOfOrder {
            at: at(&p, 4),
            expected: 4,
            found: 2
        }),
        "{:?}",
        r.problems
    );

    // Two records swapped: one reordering, named by its lines, and nothing else.
    let mut l = orig.clone();
    l.swap(1, 2);
    rewrite(&p, &l);
    let r = verify(std::slice::from_ref(&p), None);
    assert_eq!(
        r.problems,
        vec![Problem::Reordered {
            at: at(&p, 2),
            last_line: 3,
            found: vec![3, 2]
        }]
    );
    assert!(
        r.problems[0].to_string().contains("reordered"),
        "{}",
        r.problems[0]
    );
    // Three records rotated.
    let mut l = orig.clone();
    l[1..4].rotate_left(1);
    rewrite(&p, &l);
    let r = verify(std::slice::from_ref(&p), None);
    assert_eq!(
        r.problems,
        vec![Problem::Reordered {
            at: at(&p, 2),
            last_line: 4,
            found: vec![3, 4, 2]
        }]
    );
}

#[test]
fn truncation_is_caught_against_the_head() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 8);
    let head = audit::read_head(&audit::head_path(&p)).expect("head");
    let l = lines(&p);
    rewrite(&p, &l[..5]);
    assert_eq!(
        verify(&[p], head).problems,
        vec![Problem::Truncated { last: 5, head: 8 }]
    );
}

#[test]
fn chain_not_starting_at_genesis_is_reported_unless_partial_is_allowed() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 5);
    let l = lines(&p);
    rewrite(&p, &l[2..]);
    let r = verify(std::slice::from_ref(&p), None);
    assert_eq!(
        r.problems,
        vec![Problem::NotGenesis {
            file: p.display().to_string(),
            seq: 3
        }]
    );
    let r = audit::verify(
        &[p],
        &VerifyOptions {
            allow_partial: true,
            ..Default::default()
        },
    )
    .expect("verify");
    assert!(r.ok());
}

#[test]
fn torn_last_line_is_reported_then_recovered_with_a_record_of_it() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 3);
    // The writer died in the middle of a record.
    let mut bytes = std::fs::read(&p).expect("read");
    bytes.extend_from_slice(b"{\"class_uid\":4001,\"mess");
    std::fs::write(&p, &bytes).expect("write");
    let r = verify(std::slice::from_ref(&p), None);
    assert_eq!(
        r.problems,
        vec![Problem::TornTail {
            at: at(&p, 4),
            bytes: 23
        }]
    );

    // Reopening keeps the torn bytes aside, records the recovery, and the chain is whole.
    write(&p, 1);
    let kept = d.path().join("audit.log.torn-4");
    assert_eq!(
        std::fs::read(&kept).expect("torn bytes kept"),
        b"{\"class_uid\":4001,\"mess"
    );
    let r = verify(std::slice::from_ref(&p), None);
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.last_seq, 5);
    assert_eq!(r.recoveries.len(), 1);
    assert!(
        lines(&p)[3].contains("torn record of 23 bytes"),
        "{}",
        lines(&p)[3]
    );
}

#[test]
fn rotation_keeps_one_chain_across_files_in_any_order() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    {
        let mut log = open(&p, 600);
        for i in 0..20 {
            log.append(json!({"class_uid": 4001, "message": format!("record {i} with some padding to fill the file")})).expect("append");
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(d.path())
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|f| {
            f.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("audit.log")
                    && !n.to_string_lossy().ends_with(".head")
            })
        })
        .collect();
    assert!(files.len() >= 3, "expected rotation, got {files:?}");
    files.reverse();
    let head = audit::read_head(&audit::head_path(&p)).expect("head");
    let r = verify(&files, head);
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records, 20);

    // Removing a rotated file in the middle shows as missing records.
    files.sort();
    let middle = files
        .iter()
        .find(|f| !f.ends_with("audit.log"))
        .cloned()
        .expect("a rotated file");
    let rest: Vec<PathBuf> = files.into_iter().filter(|f| *f != middle).collect();
    let r = verify(&rest, None);
    assert!(
        r.problems.iter().any(
            |x| matches!(x, Problem::Missing { .. }) || matches!(x, Problem::NotGenesis { .. })
        ),
        "{:?}",
        r.problems
    );
}

#[test]
fn garbage_line_is_reported_not_fatal() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    write(&p, 3);
    let mut l = lines(&p);
    l[1] = "not json at all".into();
    rewrite(&p, &l);
    let r = verify(&[p], None);
    assert!(
        matches!(&r.problems[0], Problem::Unparsable { at, .. } if at.line == 2),
        "{:?}",
        r.problems
    );
    assert!(
        matches!(
            &r.problems[1],
            Problem::Missing {
                at,
                from: 2,
                to: 2,
                ..
            } if at.line == 3
        ),
        "{:?}",
        r.problems
    );
}

/// The child half of `killed_writer_leaves_a_chain_that_recovers_and_verifies`: appends
/// records as fast as it can until it is killed. Not a test on its own (ignored); the
/// parent runs it in a child process.
#[test]
#[ignore = "helper process of killed_writer_leaves_a_chain_that_recovers_and_verifies"]
fn audit_writer_child_process() {
    let Ok(path) = std::env::var("ENCLAVE_AUDIT_CHILD_LOG") else {
        return;
    };
    let mut log = AuditLog::open(AuditLogConfig {
        path: path.into(),
        max_bytes: 0,
        sync: SyncPolicy::Never,
        seal_key: None,
    })
    .expect("open");
    let pad = "x".repeat(3000);
    for i in 0u64.. {
        log.append(json!({"class_uid": 4001, "message": format!("record {i} {pad}")}))
            .expect("append");
    }
}

#[test]
fn killed_writer_leaves_a_chain_that_recovers_and_verifies() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("audit.log");
    for attempt in 0..5 {
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "audit_writer_child_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ENCLAVE_AUDIT_CHILD_LOG", &p)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn writer");
        std::thread::sleep(std::time::Duration::from_millis(150 + 70 * attempt));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        // Reopening recovers a torn tail if the kill landed mid-write, and continues.
        write(&p, 1);
    }
    let r = verify(std::slice::from_ref(&p), None);
    assert!(r.ok(), "{:?}", r.problems);
    assert!(
        r.records > 100,
        "the writers got going: {} records",
        r.records
    );
    for (_, _, after) in &r.recoveries {
        assert!(d
            .path()
            .join(format!("audit.log.torn-{}", after + 1))
            .exists());
    }
    eprintln!(
        "{} records across 5 killed writers, {} torn tails recovered",
        r.records,
        r.recoveries.len()
    );
}
