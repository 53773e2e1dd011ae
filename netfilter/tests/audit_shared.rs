//! Several writers on one node audit log (one enclave-netd per pod): one unbroken chain.

use enclave_netfilter::audit::{self, AuditLog, AuditLogConfig, SyncPolicy, VerifyOptions};
use serde_json::json;

#[test]
fn interleaved_writers_keep_one_chain() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("audit.log");
    let cfg = AuditLogConfig {
        path: path.clone(),
        max_bytes: 1024,
        sync: SyncPolicy::Never,
        seal_key: None,
    };
    let mut a = AuditLog::open_shared(cfg.clone()).expect("open a");
    let mut b = AuditLog::open_shared(cfg).expect("open b");
    for i in 0..10 {
        let w = if i % 3 == 0 { &mut b } else { &mut a };
        let head = w
            .append(json!({"message": format!("record {i}")}))
            .expect("append");
        assert_eq!(head.seq, i + 1, "sequence continues across writers");
    }
    // Writers in separate processes behave the same: each append re-reads the tail.
    let report =
        audit::verify(std::slice::from_ref(&path), &VerifyOptions::default()).expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(
        std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count(),
        10
    );
    // max_bytes is ignored for a shared log: no rotation happened.
    assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 1);
}
