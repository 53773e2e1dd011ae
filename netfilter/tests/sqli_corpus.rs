#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The SQL injection detector against corpora: ordinary queries and ordinary user input
//! (false positives), injected queries and injection payloads (misses). The corpora are in
//! tests/corpus/sqli/, one per line; PostgreSQL's own extension scripts are added when the
//! server package is installed (thousands of ordinary DDL and DML statements). Prints the
//! figures docs/inspection.md quotes.

use enclave_netfilter::inspect::sqli::{in_input, in_query};

fn lines(name: &str) -> Vec<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/sqli")
        .join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn flagged(items: &[String], f: fn(&[u8]) -> bool) -> Vec<&String> {
    items.iter().filter(|s| f(s.as_bytes())).collect()
}

#[test]
fn no_false_positives_on_ordinary_queries_and_input_and_every_attack_found() {
    let q = |b: &[u8]| in_query(b).is_some();
    let i = |b: &[u8]| in_input(b).is_some();
    let (oq, oi) = (lines("ordinary_queries.sql"), lines("ordinary_inputs.txt"));
    let (aq, ai) = (lines("attack_queries.sql"), lines("attack_inputs.txt"));
    let fp_q = flagged(&oq, q);
    let fp_i = flagged(&oi, i);
    let tp_q = flagged(&aq, q);
    let tp_i = flagged(&ai, i);
    println!(
        "SQLi corpus: ordinary queries {}/{} flagged, ordinary inputs {}/{} flagged; attack queries {}/{} found, attack inputs {}/{} found",
        fp_q.len(),
        oq.len(),
        fp_i.len(),
        oi.len(),
        tp_q.len(),
        aq.len(),
        tp_i.len(),
        ai.len()
    );
    assert!(fp_q.is_empty(), "ordinary queries flagged: {fp_q:#?}");
    assert!(fp_i.is_empty(), "ordinary input flagged: {fp_i:#?}");
    let missed_q: Vec<_> = aq.iter().filter(|s| !q(s.as_bytes())).collect();
    let missed_i: Vec<_> = ai.iter().filter(|s| !i(s.as_bytes())).collect();
    assert!(
        missed_q.is_empty(),
        "injected queries missed: {missed_q:#?}"
    );
    assert!(missed_i.is_empty(), "payloads missed: {missed_i:#?}");
}

#[test]
fn postgresqls_own_scripts_are_ordinary_sql() {
    let dir = std::path::Path::new("/usr/share/postgresql");
    let Ok(versions) = std::fs::read_dir(dir) else {
        println!(
            "SKIPPED postgresqls_own_scripts_are_ordinary_sql: no {} (the postgresql package)",
            dir.display()
        );
        return;
    };
    let (mut n, mut hits) = (0usize, Vec::new());
    for v in versions.flatten() {
        let Ok(files) = std::fs::read_dir(v.path().join("extension")) else {
            continue;
        };
        for f in files.flatten() {
            let p = f.path();
            if p.extension().map_or(true, |x| x != "sql") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            for stmt in text.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
                n += 1;
                if let Some(h) = in_query(stmt.as_bytes()) {
                    hits.push(format!(
                        "{}: {:?}: {}",
                        p.display(),
                        h.shape,
                        &stmt[..stmt.len().min(160)]
                    ));
                }
            }
        }
    }
    println!(
        "SQLi corpus: PostgreSQL extension scripts {}/{n} statements flagged",
        hits.len()
    );
    assert!(n > 1000, "expected thousands of statements, read {n}");
    assert!(hits.is_empty(), "{hits:#?}");
}
