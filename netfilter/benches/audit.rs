#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]
//! The audit log's costs, sealed against unsealed in the same run:
//! - appends per second of a record as enclave-netd writes it (the PCI CDE demo's records,
//!   about 1.3 KB each: pods, zones, rule, policy), with the page cache (`SyncPolicy::Never`)
//!   and with an `fdatasync` per record (`Always`, the default for enforcement);
//! - the verifier on a sealed log of ENCLAVE_BENCH_VERIFY_MB (default 1024) MB, with and
//!   without the auditor's key.
//!
//! `cargo bench -p enclave-netfilter --bench audit` (ENCLAVE_BENCH_RECORDS, default 20,000;
//! ENCLAVE_BENCH_SYNC_RECORDS, default 2,000). Writes under the system temp directory.

use enclave_netfilter::audit::seal::{key_path, SealState};
use enclave_netfilter::audit::{self, AuditLog, AuditLogConfig, SyncPolicy, VerifyOptions};
use std::path::Path;
use std::time::Instant;

/// A denied-flow record of the PCI CDE demo, as netd writes it (before its chain fields).
fn record(i: u64) -> serde_json::Value {
    serde_json::json!({
        "class_uid": 4001, "class_name": "Network Activity", "category_uid": 4,
        "category_name": "Network Activity", "activity_id": 3, "activity_name": "Reset",
        "type_uid": 400103, "type_name": "Network Activity: Reset", "time": 1_795_397_727_607u64 + i,
        "severity_id": 3, "severity": "Medium", "status_id": 2, "status": "Failure",
        "action_id": 2, "action": "Denied", "disposition_id": 2, "disposition": "Blocked",
        "message": format!("tcp 10.244.2.10:{} → 10.244.2.30:6379 [cde-api → cde-cache] cut by rule `api-to-cache`: payload is http, not the required app", 40000 + i % 20000),
        "src_endpoint": {"ip": "10.244.2.10", "port": 40000 + i % 20000, "mac": "02:00:0a:f4:02:0a", "zone": "cde-api",
            "name": "payments-api-0", "container": {"orchestrator": "kubernetes", "name": "payments-api-0"}},
        "dst_endpoint": {"ip": "10.244.2.30", "port": 6379, "zone": "cde-cache", "name": "payments-cache-0",
            "container": {"orchestrator": "kubernetes", "name": "payments-cache-0"}},
        "connection_info": {"protocol_num": 6, "protocol_name": "tcp", "protocol_ver_id": 4,
            "direction_id": 2, "direction": "Outbound"},
        "firewall_rule": {"name": "api-to-cache", "uid": "pci-cde/2", "type": "allow"},
        "policy": {"name": "pci-cde", "version": "2026.11.1", "uid": "pci-cde@2026.11.1"},
        "device": {"hostname": "node-1", "type_id": 6, "type": "Virtual"},
        "metadata": {"version": "1.1.0", "log_name": "enclave-netd",
            "product": {"name": "Enclave", "vendor_name": "Enclave", "version": "0.1.0"},
            "profiles": ["security_control", "container"]},
        "unmapped": {"enclave": {"reason": "app_mismatch", "mode": "enforce",
            "app_protocol_required": ["redis"], "app_protocol_detected": "http",
            "src": {"pod": "payments-api-0", "namespace": "payments"},
            "dst": {"pod": "payments-cache-0", "namespace": "payments"},
            "workload": {"name": "payments-api-0", "namespace": "payments"}}}
    })
}

/// Removes a log, its head and its key.
fn clear(path: &Path) {
    for p in [path.to_path_buf(), key_path(path), audit::head_path(path)] {
        let _ = std::fs::remove_file(p);
    }
}

fn open(path: &Path, sync: SyncPolicy, sealed: bool) -> AuditLog {
    clear(path);
    if sealed {
        SealState::create(&key_path(path), audit::now_ms(), 900_000).unwrap();
    }
    AuditLog::open(AuditLogConfig {
        path: path.to_path_buf(),
        max_bytes: 0,
        sync,
        seal_key: sealed.then(|| key_path(path)),
    })
    .unwrap()
}

fn appends_per_second(path: &Path, sync: SyncPolicy, sealed: bool, n: u64) -> f64 {
    let mut log = open(path, sync, sealed);
    let t = Instant::now();
    for i in 0..n {
        log.append(record(i)).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let p = dir.path().join("audit.log");
    let (n, n_sync) = (
        env("ENCLAVE_BENCH_RECORDS", 20_000),
        env("ENCLAVE_BENCH_SYNC_RECORDS", 2_000),
    );
    println!("audit appends, records of the PCI CDE demo's shape");
    println!(
        "{:<34}{:>14}{:>14}{:>10}",
        "", "unsealed/s", "sealed/s", "ratio"
    );
    for (name, sync, count) in [
        ("page cache (SyncPolicy::Never)", SyncPolicy::Never, n),
        (
            "fdatasync each (SyncPolicy::Always)",
            SyncPolicy::Always,
            n_sync,
        ),
    ] {
        // Interleaved, twice each, the better of two: the disk moves under us.
        let mut plain = 0f64;
        let mut sealed = 0f64;
        for _ in 0..2 {
            plain = plain.max(appends_per_second(&p, sync, false, count));
            sealed = sealed.max(appends_per_second(&p, sync, true, count));
        }
        println!(
            "{name:<34}{plain:>14.0}{sealed:>14.0}{:>9.2}x",
            sealed / plain
        );
    }

    let mb = env("ENCLAVE_BENCH_VERIFY_MB", 1024);
    clear(&p);
    let vk = SealState::create(&key_path(&p), audit::now_ms(), 900_000).unwrap();
    let mut log = open_existing(&p);
    let t = Instant::now();
    let mut i = 0;
    while std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) < mb << 20 {
        for _ in 0..10_000 {
            log.append(record(i)).unwrap();
            i += 1;
        }
    }
    drop(log);
    let size = std::fs::metadata(&p).unwrap().len();
    eprintln!(
        "wrote a sealed log of {} MB ({i} records) in {:.1} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    println!("\nverify a sealed log of {} MB, {i} records", size >> 20);
    for (name, key) in [
        ("chain only", None),
        ("chain and every seal (--key-file)", Some(vk)),
    ] {
        let t = Instant::now();
        let rep = audit::verify(
            std::slice::from_ref(&p),
            &VerifyOptions {
                key,
                ..Default::default()
            },
        )
        .unwrap();
        let s = t.elapsed().as_secs_f64();
        assert!(rep.ok(), "{:?}", rep.problems.first());
        println!(
            "{name:<36}{s:>8.1} s{:>10.0} MB/s{:>12.0} records/s",
            size as f64 / (1 << 20) as f64 / s,
            rep.records as f64 / s
        );
    }
}

fn open_existing(p: &Path) -> AuditLog {
    AuditLog::open(AuditLogConfig {
        path: p.to_path_buf(),
        max_bytes: 0,
        sync: SyncPolicy::Never,
        seal_key: Some(key_path(p)),
    })
    .unwrap()
}
