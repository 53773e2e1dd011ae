#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The webhook sender against a real HTTP receiver on loopback: only the records response
//! rules mark are posted, in order, each once across runs (the cursor); a receiver that
//! refuses is tried again, one that stays down costs a backlog and nothing else; a record
//! it keeps refusing is counted and passed over.

use enclave_netfilter::audit::{AuditLog, AuditLogConfig, SyncPolicy, WebhookSender};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A receiver that answers each POST with the next status of `answers` (then 200), and
/// keeps the bodies it answered 2xx.
/// What the receiver keeps: the bodies it accepted, and how many POSTs it saw.
type Received = (Arc<Mutex<Vec<serde_json::Value>>>, Arc<Mutex<u32>>);

fn receiver(answers: Vec<u16>) -> (String, Received) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/enclave", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(Mutex::new(0u32));
    let (g, h) = (got.clone(), hits.clone());
    std::thread::spawn(move || {
        let mut answers = answers.into_iter();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("POST /hooks/enclave HTTP/1.1"), "{line}");
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            *h.lock().unwrap() += 1;
            let code = answers.next().unwrap_or(200);
            if (200..300).contains(&code) {
                g.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
            }
            let _ = write!(c, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (url, (got, hits))
}

fn log_with(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let p = dir.join("audit.log");
    let mut log = AuditLog::open(AuditLogConfig::node(p.clone(), SyncPolicy::Never)).unwrap();
    for i in 0..n {
        let marked = i % 3 == 1;
        log.append(json!({"class_uid": 0, "message": format!("record {i}"), "unmapped": {"enclave": {"webhook": marked, "i": i}}}))
            .unwrap();
    }
    p
}

#[test]
fn marked_records_are_posted_once_in_order_with_retries() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(dir.path(), 9);
    // The first POST is refused (503): tried again.
    let (url, (got, hits)) = receiver(vec![503]);
    let state = dir.path().join("audit.log.webhook");
    let mut w = WebhookSender::new(&log, &url, &state).unwrap();
    w.backoff = Duration::from_millis(20);
    let r = w.run_once(100).unwrap();
    assert_eq!((r.sent, r.failed, r.backlog), (3, 0, 0), "{r:?}");
    let is: Vec<u64> = got
        .lock()
        .unwrap()
        .iter()
        .map(|v| v["unmapped"]["enclave"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(is, [1, 4, 7]);
    assert_eq!(*hits.lock().unwrap(), 4, "one retry");
    // A new sender on the same cursor sends nothing again.
    let mut w = WebhookSender::new(&log, &url, &state).unwrap();
    assert_eq!(w.run_once(100).unwrap().sent, 0);
    // More records: only the new marked ones.
    let mut l = AuditLog::open(AuditLogConfig::node(log.clone(), SyncPolicy::Never)).unwrap();
    l.append(json!({"message": "late", "unmapped": {"enclave": {"webhook": true, "i": 99}}}))
        .unwrap();
    assert_eq!(w.run_once(100).unwrap().sent, 1);
    assert_eq!(
        got.lock().unwrap().last().unwrap()["unmapped"]["enclave"]["i"],
        99
    );
}

#[test]
fn a_receiver_that_keeps_refusing_costs_a_count_and_one_that_is_down_a_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(dir.path(), 3); // one marked record (i = 1)
    let (url, (got, hits)) = receiver(vec![500, 500, 500]);
    let state = dir.path().join("c");
    let mut w = WebhookSender::new(&log, &url, &state).unwrap();
    w.backoff = Duration::from_millis(10);
    w.tries = 3;
    let r = w.run_once(100).unwrap();
    assert_eq!((r.sent, r.failed), (0, 1), "{r:?}");
    assert!(r.last_error.unwrap().contains("HTTP 500"));
    assert_eq!(*hits.lock().unwrap(), 3);
    assert!(got.lock().unwrap().is_empty());

    // Nothing listening: each try fails at connect; the batch limit bounds a run.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", l.local_addr().unwrap());
    drop(l);
    let sub = dir.path().join("x");
    std::fs::create_dir_all(&sub).unwrap();
    let log2 = log_with(&sub, 30);
    let mut w = WebhookSender::new(&log2, &dead, &dir.path().join("c2")).unwrap();
    w.backoff = Duration::from_millis(1);
    w.tries = 2;
    let r = w.run_once(5).unwrap();
    assert!(r.backlog > 0, "a run takes at most its batch: {r:?}");
    assert_eq!(r.failed, 2, "records 1 and 4 of the first five: {r:?}");
}
