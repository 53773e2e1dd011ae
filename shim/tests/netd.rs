//! Zone policy enforcement end to end, as a node runs it: a private containerd with CRI, the
//! `enclave` runtime handler, the PCI CDE template from configs/policies in the node's
//! policy directory, and four pods, each in its own microVM behind its own enclave-netd:
//! `web` (storefront, non-CDE), `api`, `db` and `cache` (payments, CDE). Then, through the
//! real guests and the real datapath (guest virtio-net, QEMU vhost-user, netd, tap, bridge,
//! nftables, CNI bridge):
//! - allowed flows connect and carry data: web → api HTTP, api → db PostgreSQL-shaped, api →
//!   cache Redis;
//! - denied flows do not: web → db, db → web, api → db on a port no rule lists;
//! - an L7 rule at work: HTTP to the cache's Redis port is cut, and the record says why;
//! - a guest that forges its source IP or MAC is refused, and recorded;
//! - monitor mode lets a would-be-denied flow through and records it as such; learn mode's
//!   records turn into a rule with `enclavectl policy suggest`;
//! - a reload keeps a live connection the new policy still allows, and cuts (and records)
//!   one it denies;
//! - the node audit log verifies, and a tampered copy fails at the tampered record;
//! - killing a pod's netd stops that pod's VM: its network is gone, nothing passes around.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use enclave_tests::containerd::leftovers;
use enclave_tests::cri::{
    cri_client, exec_sync, reason, records, run_pod, wait_record, CriNode, PodRun, PodSpec,
};
use enclave_tests::skip_or_fail;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2")).with_file_name(name)
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `script` with sh in the pod's container: (exit code, stdout).
async fn sh(cri: &mut RuntimeServiceClient<Channel>, p: &PodRun, script: &str) -> (i32, String) {
    let (code, out, _) = exec_sync(cri, &p.c, &["sh", "-c", script]).await;
    (code, out)
}

/// A shell line that fetches `/` from `ip:8080` over HTTP/1.0 and prints the body; it fails
/// unless the answer is a 200 (busybox's wget crashes in a minimal rootfs, nc does not).
fn http_get(ip: &str, timeout: u32) -> String {
    let t = timeout + 5;
    format!(
        "r=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout {t} nc -w {timeout} {ip} 8080) && echo \"$r\" | grep -q '^HTTP/1.[01] 200' && echo \"$r\" | tail -n 1"
    )
}

/// The contents of `file` in the pod's container ("" if missing).
async fn cat(cri: &RuntimeServiceClient<Channel>, p: &PodRun, file: &str) -> String {
    let mut c = cri.clone();
    sh(&mut c, p, &format!("cat {file} 2>/dev/null; true"))
        .await
        .1
}

fn enclavectl(args: &[&str]) -> (bool, String) {
    enclave_tests::outcome(Command::new(bin("enclavectl")).args(args))
}

/// `enclavectl node reload` on the test's node.
fn node_reload(node: &CriNode) -> String {
    node.reload(&bin("enclavectl"))
}

/// A PostgreSQL StartupMessage (length 23, protocol 3.0, user=postgres), as printf escapes.
const PG_STARTUP: &str = r"\000\000\000\027\000\003\000\000user\000postgres\000\000";
/// A PostgreSQL simple Query message for `sql`, as printf escapes (the api -> db rule
/// inspects its flows: what crosses it must be PostgreSQL).
fn pg_query(sql: &str) -> String {
    let len = (sql.len() + 5) as u32;
    let mut s = String::from("Q");
    for b in len.to_be_bytes() {
        s.push_str(&format!("\\{b:03o}"));
    }
    s.push_str(&sql.replace('\'', "'\\''"));
    s.push_str("\\000");
    s
}

/// A Redis PING in RESP.
const REDIS_PING: &str = r"*1\r\n$4\r\nPING\r\n";

#[tokio::test(flavor = "current_thread")]
async fn zone_policy_is_enforced_on_every_pod_frame() {
    let test = "zone_policy_is_enforced_on_every_pod_frame";
    if let Err(e) = enclave_tests::cri::prerequisites(&[("nsenter", "/usr/bin/nsenter")]) {
        return skip_or_fail(test, &e);
    }
    if !bin("enclavectl").exists() || !bin("enclave-netd").exists() {
        return skip_or_fail(
            test,
            "enclavectl / enclave-netd not built (cargo build --workspace --bins)",
        );
    }
    enclave_tests::cri::clean_node();

    let dir = std::env::temp_dir().join(format!("enclave-netd-e2e-{}", std::process::id()));
    let template =
        std::fs::read_to_string(workspace().join("configs/policies/pci-cde.yaml")).unwrap();
    let node = CriNode::start_with_policy(
        &dir,
        &bin(""),
        &format!("enclave-netd-{}", std::process::id()),
        &template,
    );
    let audit = node.audit_log.clone();
    let mut cri = cri_client(&node.containerd.sock()).await;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let serve_http =
        "mkdir -p /www && cat /etc/hostname > /www/index.html && exec httpd -f -p 8080 -h /www";
    let t = Instant::now();
    let web = run_pod(
        &mut cri,
        &node,
        &logs,
        PodSpec {
            who: ("web", "storefront", "web"),
            image: None,
            script: serve_http,
            net_admin: false,
        },
    )
    .await;
    let api = run_pod(
        &mut cri,
        &node,
        &logs,
        PodSpec {
            who: ("api", "payments", "cde-api"),
            image: None,
            script: serve_http,
            net_admin: true,
        },
    )
    .await;
    let db = run_pod(
        &mut cri,
        &node,
        &logs,
        PodSpec {
            who: ("db", "payments", "cde-db"),
            image: None,
            script: "(while true; do nc -l -p 2222 >> /tmp/got2222; done) & while true; do nc -l -p 5432 >> /tmp/got; done",
            net_admin: false,
        },
    )
    .await;
    let cache = run_pod(
        &mut cri,
        &node,
        &logs,
        PodSpec {
            who: ("cache", "payments", "cde-cache"),
            image: None,
            script: "while true; do nc -l -p 6379 >> /tmp/got; done",
            net_admin: false,
        },
    )
    .await;
    eprintln!(
        "4 pods up in {:?}: web {} api {} db {} cache {}",
        t.elapsed(),
        web.ip,
        api.ip,
        db.ip,
        cache.ip
    );
    // Every pod is in the registry with its zone; every netd answers.
    let st = enclavectl(&[
        "node",
        "status",
        "--registry",
        node.registry.to_str().unwrap(),
    ]);
    for (p, z) in [
        ("storefront/web", "web"),
        ("payments/api", "cde-api"),
        ("payments/db", "cde-db"),
        ("payments/cache", "cde-cache"),
    ] {
        assert!(
            st.1.lines().any(|l| l.starts_with(p)
                && l.contains(&format!("\t{z}\t"))
                && l.contains("ok tx")),
            "node status lacks {p} in {z}:\n{}",
            st.1
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!(
        "[{:>5.1}s] Allowed: web -> api, HTTP on 8080 (rule web-to-api, app http)",
        t.elapsed().as_secs_f64()
    );
    // --- Allowed: web -> api, HTTP on 8080 (rule web-to-api, app http).
    let (code, out) = sh(&mut cri, &web, &http_get(&api.ip, 10)).await;
    assert_eq!((code, out.as_str()), (0, "api"), "web -> api HTTP");
    let r = wait_record(
        &audit,
        (&web.ip, &api.ip, 8080),
        "web -> api allowed",
        |r| r["action"] == "Allowed",
    )
    .await;
    assert_eq!(r["firewall_rule"]["name"], "web-to-api", "{r}");
    assert_eq!(
        r["unmapped"]["enclave"]["src"]["pod"], "web",
        "pod identity: {r}"
    );

    eprintln!(
        "[{:>5.1}s] Allowed: api -> db, PostgreSQL-shaped traffic on 5432 (rule api-to-db)",
        t.elapsed().as_secs_f64()
    );
    // --- Allowed: api -> db, PostgreSQL-shaped traffic on 5432 (rule api-to-db).
    let (code, _) = sh(
        &mut cri,
        &api,
        &format!("printf '{PG_STARTUP}' | timeout 8 nc -w 2 {} 5432", db.ip),
    )
    .await;
    let _ = code; // the data arriving is the check
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cat(&cri, &db, "/tmp/got").await.contains("postgres") {
        assert!(
            Instant::now() < deadline,
            "the startup message did not reach db"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = wait_record(&audit, (&api.ip, &db.ip, 5432), "api -> db allowed", |r| {
        r["action"] == "Allowed"
    })
    .await;
    assert_eq!(r["firewall_rule"]["name"], "api-to-db", "{r}");

    eprintln!(
        "[{:>5.1}s] Denied: web -> db (guardrail non-cde-not-to-cde-data), db -> web (guardrail",
        t.elapsed().as_secs_f64()
    );
    // --- Denied: web -> db (guardrail non-cde-not-to-cde-data), db -> web (guardrail
    // cde-not-to-non-cde), api -> db on 2222 (no rule lists it).
    let before = cat(&cri, &db, "/tmp/got").await.matches("postgres").count();
    let (code, _) = sh(
        &mut cri,
        &web,
        &format!("printf '{PG_STARTUP}' | timeout 8 nc -w 3 {} 5432", db.ip),
    )
    .await;
    assert_ne!(code, 0, "web -> db must not connect");
    let r = wait_record(&audit, (&web.ip, &db.ip, 5432), "web -> db denied", |r| {
        r["action"] == "Denied"
    })
    .await;
    assert_eq!(r["firewall_rule"]["name"], "non-cde-not-to-cde-data", "{r}");
    let (code, _) = sh(&mut cri, &db, &http_get(&web.ip, 3)).await;
    assert_ne!(code, 0, "db -> web must not connect");
    let r = wait_record(&audit, (&db.ip, &web.ip, 8080), "db -> web denied", |r| {
        r["action"] == "Denied"
    })
    .await;
    assert_eq!(r["firewall_rule"]["name"], "cde-not-to-non-cde", "{r}");
    let (code, _) = sh(
        &mut cri,
        &api,
        &format!("echo hi | timeout 8 nc -w 3 {} 2222", db.ip),
    )
    .await;
    assert_ne!(code, 0, "api -> db:2222 must not connect");
    let r = wait_record(
        &audit,
        (&api.ip, &db.ip, 2222),
        "api -> db:2222 denied",
        |r| r["action"] == "Denied",
    )
    .await;
    assert_eq!(reason(&r), "no_rule", "{r}");
    assert_eq!(
        cat(&cri, &db, "/tmp/got2222").await,
        "",
        "nothing reached db:2222"
    );
    assert_eq!(
        cat(&cri, &db, "/tmp/got").await.matches("postgres").count(),
        before,
        "nothing from web reached db:5432"
    );

    eprintln!("[{:>5.1}s] L7: the api-to-cache rule allows only Redis on 6379. A PING passes; an HTTP request", t.elapsed().as_secs_f64());
    // --- L7: the api-to-cache rule allows only Redis on 6379. A PING passes; an HTTP request
    // on the same port is cut, and the record says the payload was HTTP.
    let (code, _) = sh(
        &mut cri,
        &api,
        &format!(
            "printf '{REDIS_PING}' | timeout 8 nc -w 2 {} 6379",
            cache.ip
        ),
    )
    .await;
    let _ = code; // the data arriving is the check
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cat(&cri, &cache, "/tmp/got").await.contains("PING") {
        assert!(Instant::now() < deadline, "PING did not reach the cache");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = sh(
        &mut cri,
        &api,
        &format!(
            "printf 'GET /keys HTTP/1.0\\r\\n\\r\\n' | timeout 8 nc -w 3 {} 6379",
            cache.ip
        ),
    )
    .await;
    let r = wait_record(
        &audit,
        (&api.ip, &cache.ip, 6379),
        "HTTP to redis cut",
        |r| r["action"] == "Denied",
    )
    .await;
    assert_eq!(reason(&r), "app_mismatch", "{r}");
    assert_eq!(
        r["unmapped"]["enclave"]["app_protocol_detected"], "http",
        "{r}"
    );
    assert_eq!(
        r["unmapped"]["enclave"]["app_protocol_required"],
        serde_json::json!(["redis"]),
        "the record names the required app: {r}"
    );
    assert!(
        !cat(&cri, &cache, "/tmp/got").await.contains("GET"),
        "HTTP reached the cache"
    );

    eprintln!(
        "[{:>5.1}s] Anti-spoofing: api forges its source IP, then its MAC",
        t.elapsed().as_secs_f64()
    );
    // --- Anti-spoofing: api forges its source IP, then its MAC.
    // A ping from the real address first (refused by the guardrail, but its ARP resolves web)
    // fills the neighbour cache, so the forged packet is an IP one, not an ARP probe (which
    // would be refused as bad_arp).
    let fake_ip = "10.88.77.250";
    let (code, out) = sh(
        &mut cri,
        &api,
        &format!("ping -c 1 -W 3 {w}; ip addr add {fake_ip}/24 dev eth0 && ping -c 2 -W 2 -I {fake_ip} {w}; ip addr del {fake_ip}/24 dev eth0; true", w = web.ip),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let spoofed = |what: &'static str| {
        let audit = audit.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(r) = records(&audit).into_iter().find(|r| reason(r) == what) {
                    return r;
                }
                assert!(
                    Instant::now() < deadline,
                    "no {what} record; reasons seen: {:?}",
                    records(&audit)
                        .iter()
                        .map(|r| reason(r).to_string())
                        .collect::<std::collections::BTreeSet<_>>()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!("{out}");
    let r = spoofed("spoofed_ip").await;
    assert_eq!(r["src_endpoint"]["ip"], fake_ip, "{r}");
    assert_eq!(r["action"], "Denied", "{r}");
    let (code, out) = sh(
        &mut cri,
        &api,
        &format!("real=$(cat /sys/class/net/eth0/address); ip link set eth0 address 02:de:ad:be:ef:01 && ping -c 2 -W 2 {}; ip link set eth0 address $real; cat /sys/class/net/eth0/address", web.ip),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let r = spoofed("spoofed_mac").await;
    assert_eq!(r["src_endpoint"]["mac"], "02:de:ad:be:ef:01", "{r}");
    // Its real identity still works afterwards.
    let (code, _) = sh(&mut cri, &web, &http_get(&api.ip, 10)).await;
    assert_eq!(code, 0, "web -> api after api's MAC came back");

    eprintln!("[{:>5.1}s] Monitor mode (the node observes instead of enforcing, as in a rollout): web -> db", t.elapsed().as_secs_f64());
    // --- Monitor mode (the node observes instead of enforcing, as in a rollout): web -> db
    // passes both pods' netds and nftables walls, and is recorded as "would deny".
    let monitored = template.replacen("defaultMode: enforce", "defaultMode: monitor", 1);
    assert_ne!(monitored, template);
    std::fs::write(node.policy_dir.join("policy.yaml"), &monitored).unwrap();
    let rl = node_reload(&node);
    assert!(rl.contains("payments/db: nftables"), "{rl}");
    let before = cat(&cri, &db, "/tmp/got").await.matches("postgres").count();
    let (code, _) = sh(
        &mut cri,
        &web,
        &format!("printf '{PG_STARTUP}' | timeout 8 nc -w 2 {} 5432", db.ip),
    )
    .await;
    let _ = code; // the data arriving is the check
    let deadline = Instant::now() + Duration::from_secs(10);
    while cat(&cri, &db, "/tmp/got").await.matches("postgres").count() == before {
        assert!(
            Instant::now() < deadline,
            "monitor mode: nothing reached db"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = wait_record(&audit, (&web.ip, &db.ip, 5432), "monitored", |r| {
        r["disposition"] == "Detected"
    })
    .await;
    assert_eq!(r["action"], "Allowed", "{r}");
    assert_eq!(r["unmapped"]["enclave"]["mode"], "monitor", "{r}");

    eprintln!(
        "[{:>5.1}s] Learn mode: flows are recorded, and suggest turns them into rules",
        t.elapsed().as_secs_f64()
    );
    // --- Learn mode: flows are recorded, and suggest turns them into rules.
    let learning = template.replacen("defaultMode: enforce", "defaultMode: learn", 1);
    std::fs::write(node.policy_dir.join("policy.yaml"), &learning).unwrap();
    node_reload(&node);
    // To db's 2222 (cache's listener may still hold the connection the L7 rule cut).
    let (_, out) = sh(
        &mut cri,
        &web,
        &format!(
            "printf '{PG_STARTUP}' | timeout 8 nc -w 2 {} 2222; echo nc=$?",
            db.ip
        ),
    )
    .await;
    eprintln!("web -> db:2222 in learn mode: {out}");
    wait_record(&audit, (&web.ip, &db.ip, 2222), "learned", |r| {
        r["disposition"] == "Logged"
    })
    .await;
    let (ok, suggestion) = enclavectl(&["policy", "suggest", audit.to_str().unwrap()]);
    assert!(ok, "{suggestion}");
    assert!(
        suggestion.contains("from: web")
            && suggestion.contains("to: cde-db")
            && suggestion.contains("2222")
            && suggestion.contains("postgres")
            && suggestion.contains("CAUTION: deny rule `non-cde-not-to-cde-data`"),
        "suggested rules ({out}):\n{suggestion}"
    );
    std::fs::write(node.policy_dir.join("policy.yaml"), &template).unwrap();
    node_reload(&node);

    eprintln!(
        "[{:>5.1}s] Reload keeps a live flow the new policy still allows, and cuts one it denies",
        t.elapsed().as_secs_f64()
    );
    // A long-lived api -> db connection: the startup message, a pause across the reload,
    // then more data on the same connection.
    let live = |marker: &'static str| {
        let mut cri = cri.clone();
        let (api_c, db_ip) = (api.c.clone(), db.ip.clone());
        tokio::spawn(async move {
            exec_sync(
                &mut cri,
                &api_c,
                &[
                    "sh",
                    "-c",
                    &format!("(printf '{PG_STARTUP}'; sleep 6; printf '{}') | timeout 14 nc -w 4 {db_ip} 5432; true", pg_query(&format!("SELECT '{marker}'"))),
                ],
            )
            .await
        })
    };
    let before = cat(&cri, &db, "/tmp/got").await.matches("postgres").count();
    let task = live("AFTER-RELOAD-KEPT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cat(&cri, &db, "/tmp/got").await.matches("postgres").count() == before {
        assert!(Instant::now() < deadline, "the live flow did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bumped = template.replacen("version: \"2026.11.1\"", "version: \"2026.11.2\"", 1);
    assert_ne!(bumped, template);
    std::fs::write(node.policy_dir.join("policy.yaml"), &bumped).unwrap();
    let rl = node_reload(&node);
    assert!(
        rl.contains("version 2026.11.2") && rl.contains("0 flows cut"),
        "{rl}"
    );
    task.await.unwrap();
    assert!(
        cat(&cri, &db, "/tmp/got")
            .await
            .contains("AFTER-RELOAD-KEPT"),
        "a flow the reloaded policy still allows lost its data"
    );
    // Now a policy without rule api-to-db: the live flow is cut and recorded.
    let rule = "    - name: api-to-db\n      from: cde-api\n      to: cde-db\n      protocol: tcp\n      ports: [5432]\n      app: postgres\n      inspect: {threats: deny}\n";
    let without = template.replacen(rule, "", 1);
    assert_ne!(
        without, template,
        "rule api-to-db not found in the template"
    );
    let before = cat(&cri, &db, "/tmp/got").await.matches("postgres").count();
    let task = live("AFTER-RELOAD-CUT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cat(&cri, &db, "/tmp/got").await.matches("postgres").count() == before {
        assert!(
            Instant::now() < deadline,
            "the second live flow did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(node.policy_dir.join("policy.yaml"), &without).unwrap();
    let rl = node_reload(&node);
    assert!(
        rl.lines()
            .any(|l| l.contains("payments/api:") && !l.contains("; 0 flows cut")),
        "{rl}"
    );
    task.await.unwrap();
    assert!(
        !cat(&cri, &db, "/tmp/got")
            .await
            .contains("AFTER-RELOAD-CUT"),
        "a flow the reloaded policy denies still carried data"
    );
    let r = wait_record(&audit, (&api.ip, &db.ip, 5432), "flow cut by reload", |r| {
        reason(r) == "flow_cut"
    })
    .await;
    assert_eq!(r["action"], "Denied", "{r}");
    std::fs::write(node.policy_dir.join("policy.yaml"), &template).unwrap();
    node_reload(&node);

    eprintln!(
        "[{:>5.1}s] The node audit log verifies; a tampered copy fails at the tampered record",
        t.elapsed().as_secs_f64()
    );
    // --- The node audit log verifies; a tampered copy fails at the tampered record.
    let (ok, v) = enclavectl(&["audit", "verify", audit.to_str().unwrap()]);
    assert!(ok, "audit verify:\n{v}");
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let k = lines
        .iter()
        .position(|l| l.contains("non-cde-not-to-cde-data"))
        .expect("a denial record");
    let forged = lines[k].replacen("\"Denied\"", "\"Allowed\"", 1);
    assert_ne!(forged, lines[k]);
    let mut copy: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    copy[k] = forged;
    let tampered = dir.join("tampered.log");
    std::fs::write(&tampered, copy.join("\n") + "\n").unwrap();
    let (ok, v) = enclavectl(&["audit", "verify", tampered.to_str().unwrap()]);
    assert!(!ok, "a tampered log verified:\n{v}");
    let seq = serde_json::from_str::<serde_json::Value>(lines[k]).unwrap()["metadata"]["sequence"]
        .as_u64()
        .unwrap();
    let want = format!("tampered.log:{}: record seq {seq} was modified", k + 1);
    assert!(
        v.contains(&want),
        "verify should name the tampered record ({want}):\n{v}"
    );

    eprintln!(
        "[{:>5.1}s] Metrics: per rule and verdict, Prometheus text",
        t.elapsed().as_secs_f64()
    );
    // --- Metrics: per rule and verdict, Prometheus text.
    let (ok, m) = enclavectl(&[
        "node",
        "metrics",
        "--registry",
        node.registry.to_str().unwrap(),
    ]);
    assert!(ok);
    assert!(
        m.lines().any(
            |l| l.starts_with("enclave_netd_rule_flows_total{pod=\"web\"")
                && l.contains("rule=\"web-to-api\"")
                && !l.ends_with(" 0")
        ),
        "{m}"
    );
    assert!(m.contains("reason=\"spoofed_ip\",verdict=\"drop\""), "{m}");

    eprintln!(
        "[{:>5.1}s] Every process of the api pod: unprivileged, own namespaces, filtered",
        t.elapsed().as_secs_f64()
    );
    let mut expect = enclave_tests::confinement::QEMU_POD.to_vec();
    expect.push(enclave_tests::confinement::NETD);
    let (seen, wrong) = enclave_tests::confinement::check(
        &format!("/run/enclave/k8s.io/{}/", api.sandbox),
        &expect,
    );
    for l in &seen {
        eprintln!("  {l}");
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(
        seen.len(),
        4,
        "qemu, vsock backend, virtiofsd, netd: {seen:#?}"
    );

    eprintln!(
        "[{:>5.1}s] Killing api's netd stops api's VM: no network, and nothing unfiltered",
        t.elapsed().as_secs_f64()
    );
    // --- Killing api's netd stops api's VM: no network, and nothing unfiltered.
    let netd_pid = enclave_tests::containerd::pid_of(&["enclave-netd", &api.sandbox])
        .expect("api's enclave-netd");
    // SAFETY: kill on a pid we just looked up.
    unsafe { libc::kill(netd_pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while leftovers(&format!("/run/enclave/k8s.io/{}/", api.sandbox))
        .iter()
        .any(|c| c.contains("qemu-system"))
    {
        assert!(
            Instant::now() < deadline,
            "api's VM still runs after its netd died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _) = sh(&mut cri, &web, &http_get(&api.ip, 3)).await;
    assert_ne!(code, 0, "api answered without its netd");

    enclave_tests::cri::remove_pods(&mut cri, &[&web, &api, &db, &cache]).await;
    let left = leftovers("/run/enclave/k8s.io/");
    assert!(left.is_empty(), "left behind: {left:?}");
    let reg: Vec<_> = std::fs::read_dir(&node.registry)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(reg.is_empty(), "registry entries left: {reg:?}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
