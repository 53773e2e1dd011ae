#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! `enclavectl` as a user runs it: exit codes, located errors, explanations, rendering,
//! verification, suggestions and graphs.

use enclave_netfilter::audit::{AuditContext, AuditLog, AuditLogConfig, RecordBuilder, SyncPolicy};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::matcher::{Direction, Enforcer, EnforcerConfig, LocalWorkload};
use enclave_netfilter::packet::{build, MacAddr, TcpFlags as F};
use enclave_netfilter::policy;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enclavectl"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run enclavectl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_accepts_templates_and_locates_errors_with_exit_codes() {
    let ok = ctl(&[
        "policy",
        "check",
        "configs/policies/pci-cde.yaml",
        "configs/policies/three-tier.yaml",
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(
        text(&ok).contains("OK `pci-cde` version 2026.11.1: 7 zones, 8 rules"),
        "{}",
        text(&ok)
    );
    // What netd alone enforces is said where it is written, and is not a warning: --strict
    // still accepts the templates.
    assert!(
        text(&ok).contains("configs/policies/pci-cde.yaml:74:12: note: spec.rules[1].app: the kernel wall (nftables) allows tcp/5432 for rule `api-to-db` whatever the payload"),
        "{}",
        text(&ok)
    );
    assert!(text(&ok).contains("6 note(s)"), "{}", text(&ok));
    let strict = ctl(&[
        "policy",
        "check",
        "--strict",
        "configs/policies/pci-cde.yaml",
    ]);
    assert_eq!(strict.status.code(), Some(0), "{}", text(&strict));

    let d = tempfile::tempdir().expect("tmp");
    let bad = d.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {name: x, version: 1}\nspec:\n  zones:\n    - name: a\n      cidrs: [10.0.0.0/8]\n  rules:\n    - from: a\n      to: b\n").expect("write");
    let o = ctl(&["policy", "check", bad.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!(
            "{}:10:11: error: spec.rules[0].to: no zone named `b`",
            bad.display()
        )),
        "{}",
        text(&o)
    );

    let missing = ctl(&["policy", "check", "/nonexistent/policy.yaml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing).contains("cannot read policy file /nonexistent/policy.yaml"),
        "{}",
        text(&missing)
    );
}

#[test]
fn explain_names_the_deciding_rule_in_words() {
    let p = "configs/policies/pci-cde.yaml";
    let inv = "configs/inventory/pci-demo.yaml";
    let o = ctl(&[
        "policy", "explain", p, "--from", "web", "--to", "cde-db", "--proto", "tcp", "--port",
        "5432",
    ]);
    assert!(
        text(&o).contains("verdict: DENY by rule `non-cde-not-to-cde-data`"),
        "{}",
        text(&o)
    );
    let o = ctl(&[
        "policy",
        "explain",
        p,
        "--inventory",
        inv,
        "--from",
        "payments/payments-api-0",
        "--to",
        "10.244.2.30",
        "--port",
        "6379",
        "--app",
        "http",
    ]);
    assert!(
        text(&o).contains("open to redis only; a http payload is cut"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("10.244.2.30 (payments/payments-cache-0) in zone `cde-cache`"),
        "{}",
        text(&o)
    );
    let o = ctl(&[
        "policy",
        "explain",
        p,
        "--from",
        "cde-api",
        "--to",
        "api.acquirer.example",
        "--port",
        "443",
        "--app",
        "tls",
    ]);
    assert!(
        text(&o).contains("ALLOW by rule `api-to-processor`"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("api.acquirer.example in name zone `payment-processor`"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("requests: only TLS to server names api.acquirer.example, *.psp.example"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("inside the flow: attacks (SQL injection"),
        "{}",
        text(&o)
    );
    let o = ctl(&[
        "policy", "explain", p, "--from", "web", "--to", "cde-api", "--port", "8080", "--app",
        "http",
    ]);
    assert!(
        text(&o).contains(
            "card numbers and SSNs the destination answers with (leaving the CDE) are cut"
        ),
        "{}",
        text(&o)
    );
    let o = ctl(&[
        "policy", "explain", p, "--from", "corp", "--to", "cde-api", "--port", "8080",
    ]);
    assert!(
        text(&o).contains(
            "DENY by default: no rule allows zone `corp` to reach zone `cde-api` over tcp/8080"
        ),
        "{}",
        text(&o)
    );
    let o = ctl(&[
        "policy", "explain", p, "--from", "nowhere", "--to", "cde-api", "--port", "1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("`nowhere` is not a zone"), "{}", text(&o));
}

#[test]
fn render_prints_an_nft_table_for_a_workload() {
    let o = ctl(&[
        "policy",
        "render",
        "--nft",
        "configs/policies/pci-cde.yaml",
        "--inventory",
        "configs/inventory/pci-demo.yaml",
        "--workload",
        "payments/payments-db-0",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("table inet enclave_payments_payments_db_0 {"),
        "{t}"
    );
    assert!(t.contains("ip saddr 10.244.2.10 tcp dport 5432 counter accept comment \"allow rule api-to-db; app postgres enforced by enclave-netd\""), "{t}");
    assert!(t.contains("counter drop comment \"default deny\""), "{t}");
    let inline = ctl(&[
        "policy",
        "render",
        "--nft",
        "configs/policies/pci-cde.yaml",
        "--workload",
        "ns=payments,pod=x,ip=10.9.9.9,label.app=cache",
    ]);
    assert!(
        text(&inline).contains("zone `cde-cache`"),
        "{}",
        text(&inline)
    );
}

#[test]
fn demo_runs_and_its_audit_log_verifies_while_the_tampered_copy_fails() {
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().to_str().expect("utf8");
    let o = ctl(&["demo", "--out", out]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("tampering is caught"), "{}", text(&o));
    let log = d.path().join("audit/audit.log");
    let head = d.path().join("audit/audit.log.head");
    let v = ctl(&[
        "audit",
        "verify",
        log.to_str().expect("utf8"),
        "--head",
        head.to_str().expect("utf8"),
    ]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(
        text(&v).contains("chain intact, anchored by heads up to seq"),
        "{}",
        text(&v)
    );
    assert!(text(&v).contains("seals were not checked"), "{}", text(&v));
    let key = d.path().join("audit/verification.key");
    let key = key.to_str().expect("utf8");
    let v = ctl(&[
        "audit",
        "verify",
        log.to_str().expect("utf8"),
        "--key-file",
        key,
    ]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("19 seals verified"), "{}", text(&v));
    let t = ctl(&[
        "audit",
        "verify",
        d.path().join("audit/tampered.log").to_str().expect("utf8"),
    ]);
    assert_eq!(t.status.code(), Some(1));
    assert!(
        text(&t).contains("BROKEN: ") && text(&t).contains("was modified: the next record"),
        "{}",
        text(&t)
    );
    // Re-chained: the bare chain is fooled, the key is not.
    let rechained = d.path().join("audit/rechained.log");
    let rechained = rechained.to_str().expect("utf8");
    let plain = ctl(&["audit", "verify", rechained]);
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain));
    let keyed = ctl(&["audit", "verify", rechained, "--key-file", key]);
    assert_eq!(keyed.status.code(), Some(1), "{}", text(&keyed));
    assert!(
        text(&keyed).contains("was changed after it was sealed"),
        "{}",
        text(&keyed)
    );
    let svg = std::fs::read_to_string(d.path().join("flows.svg")).expect("svg written");
    assert!(svg.starts_with("<svg") && svg.contains(">cde-db<"), "{svg}");
}

/// Writes a learn-mode log the way enclave-netd will: an enforcer for a pod whose zone is
/// in learn mode, and records from its events.
fn learn_log(dir: &Path) -> PathBuf {
    let src = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: learning, version: 1}
spec:
  zones:
    - {name: shop, mode: learn, selector: {namespaces: [shop]}}
    - {name: data, selector: {namespaces: [data]}}
"#;
    let c = Arc::new(
        policy::load_str(src, "learn.yaml")
            .expect("policy")
            .compiled,
    );
    let inv: Inventory = enclave_netfilter::yaml::from_str("workloads:\n  - {name: web, namespace: shop, ips: [10.1.0.1], mac: \"02:00:00:00:00:01\"}\n  - {name: pg, namespace: data, ips: [10.1.0.2]}\n").expect("inv");
    let peers = Arc::new(PeerDirectory::build(c.policy(), &inv.workloads));
    let w = &inv.workloads[0];
    let mac = MacAddr([2, 0, 0, 0, 0, 1]);
    let local = LocalWorkload {
        identity: Arc::new(w.identity()),
        mac,
        ipv4: vec![[10, 1, 0, 1].into()],
        ipv6: vec![],
        dhcp: false,
    };
    let mut e = Enforcer::new(c.clone(), peers.clone(), local, EnforcerConfig::default());
    let rb = RecordBuilder::new(AuditContext {
        policy: c,
        peers,
        local: Arc::new(w.identity()),
        local_ips: w.ips.clone(),
        node: "n".into(),
        component: "test".into(),
    });
    let path = dir.join("learn.log");
    let mut log = AuditLog::open(AuditLogConfig {
        path: path.clone(),
        max_bytes: 0,
        sync: SyncPolicy::Never,
        seal_key: None,
    })
    .expect("log");
    let mut startup = vec![0, 0, 0, 30, 0, 3, 0, 0];
    startup.extend_from_slice(b"user\0web\0\0");
    for sport in [40000, 40001] {
        let ends = build::Ends {
            src_mac: mac,
            dst_mac: MacAddr([2, 0, 0, 0, 0, 0xfe]),
            src: w.ips[0],
            dst: "10.1.0.2".parse().expect("ip"),
            sport,
            dport: 5432,
        };
        let back = build::Ends {
            src_mac: ends.dst_mac,
            dst_mac: mac,
            ..ends.reversed()
        };
        for (dir, f) in [
            (Direction::Egress, build::tcp(&ends, F::SYN, 1, 0, &[])),
            (
                Direction::Ingress,
                build::tcp(&back, F::SYN | F::ACK, 9, 2, &[]),
            ),
            (Direction::Egress, build::tcp(&ends, F::ACK, 2, 10, &[])),
            (
                Direction::Egress,
                build::tcp(&ends, F::ACK | F::PSH, 2, 10, &startup),
            ),
        ] {
            if let Some(ev) = e.decide(dir, &f, u64::from(sport)).event {
                log.append(rb.record(&ev, 1)).expect("append");
            }
        }
    }
    path
}

#[test]
fn suggest_turns_a_learn_mode_log_into_rules_that_check_clean() {
    let d = tempfile::tempdir().expect("tmp");
    let log = learn_log(d.path());
    let o = ctl(&["policy", "suggest", log.to_str().expect("utf8")]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("from: shop\n    to: data\n    protocol: tcp\n    ports: [5432]\n    app: postgres\n    # seen 2 time(s)"), "{t}");
    // The proposal, pasted into the policy, is a valid policy that allows those flows.
    let rules: String = t
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let full = format!("apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {{name: learned, version: 2}}\nspec:\n  zones:\n    - {{name: shop, selector: {{namespaces: [shop]}}}}\n    - {{name: data, selector: {{namespaces: [data]}}}}\n  {}\n", rules.replace('\n', "\n  "));
    let p = d.path().join("learned.yaml");
    std::fs::write(&p, full).expect("write");
    let o = ctl(&[
        "policy",
        "explain",
        p.to_str().expect("utf8"),
        "--from",
        "shop",
        "--to",
        "data",
        "--port",
        "5432",
        "--app",
        "postgres",
    ]);
    assert!(
        text(&o).contains("ALLOW by rule `learned-shop-to-data-tcp-postgres`"),
        "{}",
        text(&o)
    );
}

#[test]
fn graph_writes_svg_or_dot_and_refuses_other_extensions() {
    let d = tempfile::tempdir().expect("tmp");
    let log = learn_log(d.path());
    let dot = d.path().join("f.dot");
    let o = ctl(&[
        "flows",
        "graph",
        log.to_str().expect("utf8"),
        "-o",
        dot.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let body = std::fs::read_to_string(&dot).expect("dot");
    assert!(
        body.contains("\"shop\" -> \"data\" [label=\"tcp/5432 postgres (2 allowed)\""),
        "{body}"
    );
    let o = ctl(&[
        "flows",
        "graph",
        log.to_str().expect("utf8"),
        "-o",
        d.path().join("f.png").to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["policy", "--help"],
        vec!["policy", "check", "--help"],
        vec!["policy", "explain", "--help"],
        vec!["policy", "render", "--help"],
        vec!["policy", "apply", "--help"],
        vec!["policy", "remove", "--help"],
        vec!["policy", "suggest", "--help"],
        vec!["audit", "verify", "--help"],
        vec!["flows", "graph", "--help"],
        vec!["demo", "--help"],
    ] {
        let o = ctl(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(text(&o).contains("Usage:"), "{args:?}: {}", text(&o));
    }
}

/// `audit keygen` makes the node's key once and prints the auditor's; the node's records are
/// then sealed; `audit export` to a receiver that is not there fails the run, counts it and
/// reports the backlog in its metrics, and keeps its cursor where it was.
#[test]
fn keygen_seals_the_log_and_export_counts_a_run_that_found_no_receiver() {
    use enclave_netfilter::audit::{AuditLog, AuditLogConfig, SyncPolicy};
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("audit.log");
    let log_s = log.to_str().expect("utf8");
    let k = ctl(&["audit", "keygen", "--log", log_s, "--epoch-secs", "60"]);
    assert_eq!(k.status.code(), Some(0), "{}", text(&k));
    let key_line = text(&k)
        .lines()
        .find(|l| l.starts_with("enclave-audit-v1:"))
        .expect("the verification key is printed")
        .to_string();
    let again = ctl(&["audit", "keygen", "--log", log_s]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "a key is never replaced: {}",
        text(&again)
    );
    {
        let mut w = AuditLog::open_shared(AuditLogConfig::node(log.clone(), SyncPolicy::Never))
            .expect("open");
        for i in 0..5 {
            w.append(serde_json::json!({"class_uid": 4001, "message": format!("flow {i}")}))
                .expect("append");
        }
    }
    let keyfile = d.path().join("vk");
    std::fs::write(&keyfile, &key_line).expect("write key");
    let v = ctl(&[
        "audit",
        "verify",
        log_s,
        "--key-file",
        keyfile.to_str().expect("utf8"),
    ]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("5 seals verified"), "{}", text(&v));

    // Nobody listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let metrics = d.path().join("export.prom");
    let e = ctl(&[
        "audit",
        "export",
        "--log",
        log_s,
        "--to",
        &format!("127.0.0.1:{port}"),
        "--once",
        "--metrics",
        metrics.to_str().expect("utf8"),
    ]);
    assert_eq!(e.status.code(), Some(1), "{}", text(&e));
    assert!(text(&e).contains("records wait in the log"), "{}", text(&e));
    let m = std::fs::read_to_string(&metrics).expect("metrics written");
    assert!(
        m.contains("enclave_audit_export_failed_runs_total 1"),
        "{m}"
    );
    assert!(m.contains("enclave_audit_export_records_total 0"), "{m}");
    let backlog: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("enclave_audit_export_backlog_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("backlog");
    assert_eq!(backlog, std::fs::metadata(&log).expect("log").len());
}

#[test]
fn explain_takes_pods_by_name_from_the_cluster_map_and_inline_with_labels() {
    use enclave_netfilter::identity::{ClusterMap, ClusterPod, CLUSTER_MAP_FORMAT};
    let d = tempfile::tempdir().unwrap();
    let policy = d.path().join("p.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: sel, version: "1"}
spec:
  zones:
    - name: cde-db
      selector: {namespaceSelector: {matchLabels: {pci: cde}}, matchLabels: {app: db}}
    - name: cde-api
      selector: {namespaces: [payments], matchExpressions: [{key: app, operator: In, values: [api]}]}
  rules:
    - {name: api-to-db, from: cde-api, to: cde-db, protocol: tcp, ports: [5432]}
"#,
    )
    .unwrap();
    let pod = |ns: &str, name: &str, app: &str, ip: &str, nsl: &[(&str, &str)]| ClusterPod {
        uid: name.into(),
        namespace: ns.into(),
        name: name.into(),
        node: "b".into(),
        ips: vec![ip.parse().unwrap()],
        labels: [("app".to_string(), app.to_string())].into(),
        namespace_labels: nsl
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let peers = d.path().join("peers");
    std::fs::create_dir_all(&peers).unwrap();
    ClusterMap {
        format: CLUSTER_MAP_FORMAT,
        generation: 1,
        written_unix_ms: 0,
        stale: false,
        pods: vec![
            pod("payments", "db-0", "db", "10.1.0.5", &[("pci", "cde")]),
            pod("payments", "api-0", "api", "10.1.0.6", &[("pci", "cde")]),
        ],
    }
    .write_dir(&peers)
    .unwrap();
    let (p, dir) = (policy.to_str().unwrap(), peers.to_str().unwrap());
    let o = ctl(&[
        "policy",
        "explain",
        p,
        "--peers",
        dir,
        "--from",
        "payments/api-0",
        "--to",
        "payments/db-0",
        "--port",
        "5432",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(
            "flow: payments/api-0 in zone `cde-api` → payments/db-0 in zone `cde-db`, tcp/5432"
        ),
        "{t}"
    );
    assert!(t.contains("payments/db-0 (labels app=db; namespace labels pci=cde): zone `cde-db`'s selector matches it"), "{t}");
    assert!(t.contains("verdict: ALLOW by rule `api-to-db`"), "{t}");
    // By address, through the same map.
    let t = text(&ctl(&[
        "policy", "explain", p, "--peers", dir, "--from", "10.1.0.6", "--to", "10.1.0.5", "--port",
        "5432",
    ]));
    assert!(
        t.contains("10.1.0.6 (payments/api-0) in zone `cde-api`") && t.contains("ALLOW"),
        "{t}"
    );
    // Inline, with namespace labels: without pci=cde the db is in no zone.
    let t = text(&ctl(&[
        "policy",
        "explain",
        p,
        "--from",
        "ns=payments,pod=api,label.app=api",
        "--to",
        "ns=payments,pod=db,label.app=db",
        "--port",
        "5432",
    ]));
    assert!(
        t.contains("payments/db (labels app=db): no zone's selector matches it")
            && t.contains("DENY by default"),
        "{t}"
    );
    // A pod neither the inventory nor the map knows: said so, with what to pass.
    let o = ctl(&[
        "policy",
        "explain",
        p,
        "--peers",
        dir,
        "--from",
        "payments/nope",
        "--to",
        "cde-db",
        "--port",
        "5432",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("not in the inventory or the cluster map"),
        "{}",
        text(&o)
    );
}

#[test]
fn node_commands_say_when_there_are_no_pods_and_the_doctor_names_each_miss_with_a_fix() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).to_str().unwrap().to_string();
    std::fs::create_dir_all(p("registry")).unwrap();
    let o = ctl(&["node", "status", "--registry", &p("registry")]);
    assert!(
        o.status.success() && text(&o).starts_with("no pods: none registered in"),
        "{}",
        text(&o)
    );
    let o = ctl(&["node", "metrics", "--registry", &p("registry")]);
    assert!(
        o.status.success() && text(&o).starts_with("# no pods"),
        "{}",
        text(&o)
    );

    std::fs::create_dir_all(p("policies")).unwrap();
    let doctor = || {
        ctl(&[
            "node",
            "doctor",
            "--policy-dir",
            &p("policies"),
            "--registry",
            &p("registry"),
            "--peer-dir",
            &p("peers"),
            "--audit-log",
            &p("log/audit.log"),
            "--guest-image",
            &p("guest"),
            "--containerd-config",
            &p("containerd.toml"),
        ])
    };
    let o = doctor();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    let line = |what: &str| -> String {
        let mut lines = t.lines();
        let l = lines
            .find(|l| l[5..].starts_with(what))
            .unwrap_or_else(|| panic!("no {what} line:\n{t}"));
        format!("{l}\n{}", lines.next().unwrap_or(""))
    };
    for (what, fix) in [
        ("policy", "put one zone policy in"),
        ("guest image", "guest/image/build.sh"),
        ("runtime config", "configs/containerd/enclave-runtime.toml"),
        ("audit log", "mkdir -p"),
    ] {
        let l = line(what);
        assert!(l.starts_with("FAIL") && l.contains(fix), "{what}:\n{l}");
    }
    assert!(line("KVM").contains("pods run"), "{t}");
    assert!(line("cluster map").starts_with("WARN"), "{t}");
    assert!(
        t.lines().last().unwrap().starts_with("node NOT ready"),
        "{t}"
    );

    // Fixed: a policy, the runtime config, an image, the log's directory, a stale map.
    std::fs::copy(
        root().join("configs/policies/pci-cde.yaml"),
        p("policies/policy.yaml"),
    )
    .unwrap();
    std::fs::copy(
        root().join("configs/containerd/enclave-runtime.toml"),
        p("containerd.toml"),
    )
    .unwrap();
    std::fs::create_dir_all(p("guest")).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::write(p(&format!("guest/{f}")), b"x").unwrap();
    }
    std::fs::create_dir_all(p("log")).unwrap();
    std::fs::create_dir_all(p("peers")).unwrap();
    enclave_netfilter::identity::ClusterMap {
        format: enclave_netfilter::identity::CLUSTER_MAP_FORMAT,
        generation: 4,
        stale: true,
        ..Default::default()
    }
    .write_dir(Path::new(&p("peers")))
    .unwrap();
    let t = text(&doctor());
    for what in ["policy", "guest image", "runtime config", "audit log"] {
        assert!(line_of(&t, what).starts_with("ok"), "{what}:\n{t}");
    }
    assert!(line_of(&t, "policy").contains("`pci-cde`"), "{t}");
    let l = line_of(&t, "cluster map");
    assert!(l.starts_with("WARN") && l.contains("stale"), "{l}");
}

fn line_of<'a>(t: &'a str, what: &str) -> &'a str {
    t.lines()
        .find(|l| l.len() > 5 && l[5..].starts_with(what))
        .unwrap_or_else(|| panic!("no {what} line:\n{t}"))
}

#[test]
fn the_segmentation_cronjob_passes_only_flags_enclavectl_knows() {
    let manifest =
        std::fs::read_to_string(root().join("configs/kubernetes/segmentation-cronjob.yaml"))
            .expect("the CronJob manifest");
    let help = ctl(&["segmentation", "test", "--help"]);
    assert_eq!(help.status.code(), Some(0), "{}", text(&help));
    let mut n = 0;
    for line in manifest.lines() {
        let Some(flag) = line.trim().strip_prefix("- --") else {
            continue;
        };
        let flag = flag.split('=').next().unwrap_or(flag);
        assert!(
            text(&help).contains(&format!("--{flag}")),
            "enclavectl segmentation test has no --{flag}"
        );
        n += 1;
    }
    assert!(n >= 8, "{n} flags found");
    // Nothing to probe from: said plainly, exit 2.
    let d = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(d.path().join("reg")).expect("mkdir");
    std::fs::create_dir_all(d.path().join("pol")).expect("mkdir");
    std::fs::copy(
        root().join("configs/policies/pci-cde.yaml"),
        d.path().join("pol/policy.yaml"),
    )
    .expect("copy");
    let p = |x: &str| d.path().join(x).to_str().expect("utf8").to_string();
    let o = ctl(&[
        "segmentation",
        "test",
        "--policy-dir",
        &p("pol"),
        "--registry",
        &p("reg"),
        "--peer-dir",
        &p("peers"),
        "--audit-log",
        &p("audit.log"),
        "--out",
        &p("out"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no pods registered"), "{}", text(&o));
}
