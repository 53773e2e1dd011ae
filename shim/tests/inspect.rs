//! Inspection inside allowed flows, end to end with real clients and servers: a private
//! containerd with CRI runs two pods in microVMs, `web` (storefront) and `api` (payments,
//! in the CDE), each behind its own enclave-netd, under a policy whose rules ask for
//! inspection. Debian's own programs do the talking: psql (from the api pod) to a real
//! PostgreSQL and redis-cli to a real Redis, both running on the node and reached through
//! the api pod's netd; curl (from the web pod) to the api pod's HTTP server.
//! - an ordinary query and a PING pass; a SQL injection through the allowed api → db flow
//!   is cut, with a Detection Finding (OCSF 2004) and the flow's Reset record;
//! - a Redis connection that turns into HTTP is cut (a second protocol);
//! - a card number posted into the CDE (checkout) passes; the CDE answering with one is cut,
//!   and no full card number reaches the audit log;
//! - SQL injection in a URL's query string is cut.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enclave_tests::cri::{cri_client, exec_sync, records, run_pod, CriNode, PodRun, PodSpec};
use enclave_tests::skip_or_fail;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2")).with_file_name(name)
}

/// The node's own address on the pod bridge: where the test's PostgreSQL and Redis listen.
const NODE: &str = "10.88.77.1";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PAN: &str = "4111111111111111";

const POLICY: &str = r#"apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: inspect-e2e, version: "1"}
spec:
  zones:
    - {name: web, scope: connected, selector: {namespaces: [storefront]}}
    - {name: cde-api, scope: cde, selector: {namespaces: [payments]}}
    - {name: cde-data, scope: cde, description: "PostgreSQL and Redis on the node", cidrs: [10.88.77.1/32]}
  rules:
    - {name: web-to-api, from: web, to: cde-api, protocol: tcp, ports: [8080], app: http,
       inspect: {threats: deny, dlp: deny, dlpFlows: leaving-cde},
       http: [{methods: [GET, POST], paths: [/, /card.html, /search]}]}
    - {name: api-to-db, from: cde-api, to: cde-data, protocol: tcp, ports: [5432], app: postgres,
       inspect: {threats: deny}}
    - {name: api-to-cache, from: cde-api, to: cde-data, protocol: tcp, ports: [6379], app: redis,
       inspect: {threats: deny}, redis: {commands: [PING, GET, SET]}}
    - {name: api-to-dns, from: cde-api, to: cde-data, protocol: udp, ports: [53], app: dns,
       inspect: {threats: deny}}
  responses:
    - {name: isolate-api, zones: [cde-api], threats: [SQL.Injection], actions: [quarantine, webhook],
       keep: [api-to-cache]}
"#;

/// A server run in the node's network namespace, killed at the end.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_node(node: &CriNode, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &node.netns.name]).args(args);
    c
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PostgreSQL (initdb'd fresh, trust auth for user `shop`) and Redis, listening on the
/// node's bridge address.
fn start_servers(node: &CriNode, dir: &Path) -> (Server, Server) {
    let pg = dir.join("pg");
    std::fs::create_dir_all(&pg).unwrap();
    assert!(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&pg)
        .status()
        .unwrap()
        .success());
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG_BIN}/initdb")])
        .args(["-A", "trust", "-U", "shop", "-D"])
        .arg(pg.join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::File::create(dir.join("postgres.log")).unwrap();
    let postgres = in_node(
        node,
        &[
            "runuser",
            "-u",
            "postgres",
            "--",
            &format!("{PG_BIN}/postgres"),
        ],
    )
    .arg("-D")
    .arg(pg.join("data"))
    .args(["-k", pg.to_str().unwrap()])
    .args([
        "-c",
        &format!("listen_addresses={NODE}"),
        "-c",
        "shared_buffers=16MB",
    ])
    .args(["-c", &format!("hba_file={}", pg.join("hba.conf").display())])
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .unwrap();
    std::fs::write(
        pg.join("hba.conf"),
        "host all all 0.0.0.0/0 trust\nlocal all all trust\n",
    )
    .unwrap();
    let postgres = Server(postgres);
    wait_until("PostgreSQL ready", Duration::from_secs(30), || {
        in_node(node, &[&format!("{PG_BIN}/pg_isready"), "-h", NODE, "-q"])
            .status()
            .is_ok_and(|s| s.success())
    });
    let out = in_node(node, &[&format!("{PG_BIN}/psql"), "-X", "-h", NODE, "-U", "shop", "-d", "postgres", "-c",
        "CREATE TABLE cards (id int, owner text, token text); INSERT INTO cards VALUES (1, 'ana', 'tok_1'), (2, 'bo', 'tok_2');"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql setup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let redis = in_node(
        node,
        &[
            "redis-server",
            "--bind",
            NODE,
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let redis = Server(redis);
    wait_until("Redis ready", Duration::from_secs(20), || {
        in_node(node, &["redis-cli", "-h", NODE, "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    });
    (postgres, redis)
}

async fn sh(
    cri: &mut RuntimeServiceClient<Channel>,
    p: &PodRun,
    script: &str,
) -> (i32, String, String) {
    exec_sync(cri, &p.c, &["sh", "-c", script]).await
}

/// `enclavectl node reload` on the test's node.
fn node_reload(node: &CriNode) -> String {
    node.reload(&bin("enclavectl"))
}

fn ctl(args: &[&str]) -> (bool, String) {
    enclave_tests::outcome(Command::new(bin("enclavectl")).args(args))
}

/// `enclavectl capture get UID` into `out`; fails the test if it fails.
fn capture_get(uid: &str, cap_dir: &Path, out: &Path) -> PathBuf {
    let (ok, got) = ctl(&[
        "capture",
        "get",
        uid,
        "-o",
        out.to_str().unwrap(),
        "--dir",
        cap_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{got}");
    out.to_path_buf()
}

/// tshark (Debian's) on a capture file: its output; fails the test if tshark does.
fn tshark(file: &Path, args: &[&str]) -> String {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tshark: {e}"));
    assert!(
        out.status.success(),
        "tshark -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HTTP receiver on loopback for the webhook: its URL, and the bodies it gets.
fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/enclave", l.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = std::io::BufReader::new(c.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let _ = (&c).write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
            let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
        }
    });
    (url, rx)
}

/// Waits for a Detection Finding of `threat` in a flow rule `rule` allowed, and returns it.
async fn finding(audit: &Path, threat: &str, rule: &str) -> serde_json::Value {
    finding_saying(audit, threat, rule, "").await
}

/// As [`finding`], the first whose message contains `text`.
async fn finding_saying(audit: &Path, threat: &str, rule: &str, text: &str) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = records(audit).into_iter().find(|r| {
            r["class_uid"] == 2004
                && r["finding_info"]["types"][0] == threat
                && r["firewall_rule"]["name"] == rule
                && r["message"].as_str().is_some_and(|m| m.contains(text))
        }) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "no {threat} finding in {}",
            audit.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn attacks_and_card_data_inside_allowed_flows_are_cut_with_real_clients() {
    let test = "attacks_and_card_data_inside_allowed_flows_are_cut_with_real_clients";
    if let Err(e) = enclave_tests::cri::prerequisites(&[
        ("postgres", &format!("{PG_BIN}/postgres")),
        ("redis-server", "/usr/bin/redis-server"),
        ("curl", "/usr/bin/curl"),
        ("runuser", "/usr/sbin/runuser"),
        ("tshark", "/usr/bin/tshark"),
    ]) {
        return skip_or_fail(test, &e);
    }
    if !bin("enclave-netd").exists() {
        return skip_or_fail(
            test,
            "enclave-netd not built (cargo build --workspace --bins)",
        );
    }
    enclave_tests::cri::clean_node();
    let dir = std::env::temp_dir().join(format!("enclave-inspect-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // postgres (an unprivileged user) must reach its data directory.
    let _ = Command::new("chmod").arg("755").arg(&dir).status();
    let node = CriNode::start_with_policy(
        &dir,
        &bin(""),
        &format!("enclave-insp-{}", std::process::id()),
        POLICY,
    );
    let image = enclave_tests::containerd::tools_image(
        &dir.join("images"),
        &[
            (&format!("{PG_BIN}/psql"), "psql"),
            ("/usr/bin/redis-cli", "redis-cli"),
            ("/usr/bin/curl", "curl"),
        ],
    )
    .unwrap_or_else(|e| panic!("{test}: {e}"));
    node.import_image(&image);
    let audit = node.audit_log.clone();
    let mut cri = cri_client(&node.containerd.sock()).await;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let t = Instant::now();
    // The API serves an ordinary page and, at /card.html, one with a card number on it.
    let serve = format!(
        "mkdir -p /www && echo ok > /www/index.html && echo 'card {PAN} exp 12/29' > /www/card.html && exec httpd -f -p 8080 -h /www"
    );
    let tools = Some(enclave_tests::containerd::TOOLS_IMAGE);
    let pod = |who, script| PodSpec {
        who,
        image: tools,
        script,
        net_admin: false,
    };
    let api = run_pod(
        &mut cri,
        &node,
        &logs,
        pod(("api", "payments", "cde-api"), &serve),
    )
    .await;
    let web = run_pod(
        &mut cri,
        &node,
        &logs,
        pod(("web", "storefront", "web"), "exec sleep 100000"),
    )
    .await;
    eprintln!(
        "2 pods up in {:?}: web {} api {}",
        t.elapsed(),
        web.ip,
        api.ip
    );
    let (_pg, _redis) = start_servers(&node, &dir);
    eprintln!(
        "[{:>5.1}s] PostgreSQL and Redis up on {NODE}",
        t.elapsed().as_secs_f64()
    );

    // --- api -> db with psql: an ordinary query passes.
    let psql = format!("timeout 8 psql -X -h {NODE} -U shop -d postgres -At -c");
    let cap_dir = node.audit_log.parent().unwrap().join("captures");
    let (code, out, err) = sh(
        &mut cri,
        &api,
        &format!("{psql} 'SELECT count(*) FROM cards'"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "2"), "an ordinary query: {err}");
    // --- api -> cache with redis-cli: PING passes; Redis then HTTP on one connection is cut.
    let (code, out, _) = sh(
        &mut cri,
        &api,
        &format!("timeout 10 redis-cli -h {NODE} PING"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "PONG"));
    let (_, out, _) = sh(
        &mut cri,
        &api,
        &format!("printf 'PING\\r\\nGET / HTTP/1.1\\r\\nHost: cache\\r\\n\\r\\n' | timeout 5 nc -w 3 {NODE} 6379"),
    )
    .await;
    eprintln!(
        "[{:>5.1}s] PING then HTTP to Redis answered {:?}",
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    let f = finding(&audit, "Protocol.Mismatch", "api-to-cache").await;
    assert!(
        f["message"].as_str().unwrap().contains("GET / HTTP/1.1"),
        "{f}"
    );
    assert_eq!(f["firewall_rule"]["name"], "api-to-cache", "{f}");

    // --- Requests inside allowed flows: the cache rule allows PING, GET and SET only.
    let (code, out, _) = sh(
        &mut cri,
        &api,
        &format!("timeout 10 redis-cli -h {NODE} SET k v"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "OK"), "SET is allowed");
    let (code, out, err) = sh(
        &mut cri,
        &api,
        &format!("timeout 10 redis-cli -h {NODE} FLUSHALL"),
    )
    .await;
    assert!(
        code != 0 || !out.contains("OK"),
        "FLUSHALL went through: {out} {err}"
    );
    finding_saying(&audit, "Policy.Request", "api-to-cache", "`FLUSHALL`").await;
    let (_, out, _) = sh(
        &mut cri,
        &api,
        &format!("timeout 10 redis-cli -h {NODE} GET k"),
    )
    .await;
    assert_eq!(out.trim(), "v", "FLUSHALL must not have run");
    eprintln!(
        "[{:>5.1}s] redis-cli FLUSHALL refused, SET/GET allowed",
        t.elapsed().as_secs_f64()
    );

    // --- api -> DNS with busybox's nslookup: a query carrying data in a 55-byte label.
    let label = "a".repeat(55);
    let _ = sh(
        &mut cri,
        &api,
        &format!("timeout 2 nslookup {label}.t.example {NODE}; true"),
    )
    .await;
    let f = finding(&audit, "DNS.Tunneling", "api-to-dns").await;
    assert!(
        f["message"].as_str().unwrap().contains("label of 55"),
        "{f}"
    );
    eprintln!(
        "[{:>5.1}s] nslookup with data in its labels: DNS.Tunneling",
        t.elapsed().as_secs_f64()
    );

    // --- web -> api with curl: the ordinary page passes; checkout posts a card number
    // into the CDE (passes); the CDE answering with one is cut.
    let curl = format!("timeout 10 curl -sS -m 5 http://{}:8080", api.ip);
    let (code, out, err) = sh(&mut cri, &web, &format!("{curl}/")).await;
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    // The rule allows GET and POST only: DELETE is refused, and named in the finding.
    let (code, _, err) = sh(&mut cri, &web, &format!("{curl}/ -X DELETE")).await;
    assert!(
        code != 0 && code != 28,
        "DELETE was not refused at once: {code} {err}"
    );
    finding_saying(&audit, "Policy.Request", "web-to-api", "`DELETE /`").await;
    let (code, _, err) = sh(
        &mut cri,
        &web,
        &format!("{curl}/ -o /dev/null -w '%{{http_code}}' --data 'card={PAN}&exp=12/29'"),
    )
    .await;
    assert_eq!(
        code, 0,
        "a card number posted into the CDE must pass: {err}"
    );
    let (code, out, err) = sh(&mut cri, &web, &format!("{curl}/card.html")).await;
    eprintln!(
        "[{:>5.1}s] fetching a page with a card number: exit {code} {}",
        t.elapsed().as_secs_f64(),
        err.trim()
    );
    assert_ne!(code, 0, "the page with a card number must be cut");
    assert!(
        code != 28 && code != 124,
        "curl waited for its timeout: the cut connection was not reset ({err})"
    );
    assert!(!out.contains(PAN), "the card number reached web: {out}");
    let f = finding(&audit, "DLP.CreditCard", "web-to-api").await;
    assert_eq!(f["disposition"], "Blocked", "{f}");
    assert_eq!(
        f["unmapped"]["enclave"]["data"]["masked"], "411111******1111",
        "{f}"
    );
    assert_eq!(f["unmapped"]["enclave"]["sent_by"], "responder", "{f}");
    // Its capture holds the masked number only.
    let uid = f["unmapped"]["enclave"]["capture"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let pcap = capture_get(&uid, &cap_dir, &dir.join("dlp.pcapng"));
    let bytes = std::fs::read(&pcap).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("411111******1111"),
        "the capture lacks the masked number"
    );
    assert!(!text.contains(PAN), "a full PAN in a capture");
    assert!(!tshark(&pcap, &["-T", "fields", "-e", "frame.number"])
        .trim()
        .is_empty());
    let only_one = records(&audit)
        .iter()
        .filter(|r| r["finding_info"]["types"][0] == "DLP.CreditCard")
        .count();
    assert_eq!(only_one, 1, "the checkout's card number was reported too");

    // --- SQL injection in a query string.
    let (code, _, _) = sh(
        &mut cri,
        &web,
        &format!("{curl}/search?q=1%27%20OR%20%271%27%3D%271"),
    )
    .await;
    assert_ne!(code, 0, "an injected query string must be cut");
    let f = finding(&audit, "SQL.Injection", "web-to-api").await;
    assert!(
        f["message"].as_str().unwrap().contains("query parameter"),
        "{f}"
    );
    // The storefront sent it, but the response rule is for the CDE's api pod: no response.
    assert!(!records(&audit)
        .iter()
        .any(|r| r["unmapped"]["enclave"]["response"].is_object()));

    // --- ... a SQL injection through the same allowed flow is cut.
    let (code, out, err) = sh(
        &mut cri,
        &api,
        &format!("{psql} \"SELECT token FROM cards WHERE owner = '' OR '1'='1'\""),
    )
    .await;
    eprintln!(
        "[{:>5.1}s] psql with an injection: exit {code}, {}",
        t.elapsed().as_secs_f64(),
        err.trim()
    );
    assert_ne!(code, 0, "the injected query must not complete: {out}");
    // netd resets the connection it cut: psql notices at once instead of timing out (143).
    assert_ne!(
        code, 143,
        "psql hung until its timeout: the cut connection was not reset"
    );
    assert!(
        !out.contains("tok_1"),
        "the injected query's answer came back: {out}"
    );
    let f = finding(&audit, "SQL.Injection", "api-to-db").await;
    assert_eq!(f["disposition"], "Blocked", "{f}");
    assert_eq!(f["evidences"][0]["dst_endpoint"]["zone"], "cde-data", "{f}");
    assert_eq!(f["unmapped"]["enclave"]["src"]["pod"], "api", "{f}");
    assert!(f["message"].as_str().unwrap().contains("tautology"), "{f}");
    // The flow's own record says it was cut for a threat.
    let cut = records(&audit)
        .into_iter()
        .find(|r| {
            r["class_uid"] == 4001
                && r["unmapped"]["enclave"]["reason"] == "threat"
                && r["firewall_rule"]["name"] == "api-to-db"
        })
        .unwrap_or_else(|| panic!("no Reset record with reason threat"));
    assert_eq!(cut["activity_name"], "Reset", "{cut}");
    // The flow's frames were captured: the record names the capture; enclavectl lists it
    // and writes it out; tshark reads it and sees the query.
    let cap = &f["unmapped"]["enclave"]["capture"];
    let uid = cap["uid"]
        .as_str()
        .unwrap_or_else(|| panic!("no capture in {f}"))
        .to_string();
    assert!(cap["frames"].as_u64().unwrap() >= 3, "{cap}");
    let (ok, list) = ctl(&["capture", "list", "--dir", cap_dir.to_str().unwrap()]);
    assert!(
        ok && list.contains(&uid) && list.contains("SQL.Injection"),
        "{list}"
    );
    let pcap = capture_get(&uid, &cap_dir, &dir.join("sqli.pcapng"));
    let ts = tshark(
        &pcap,
        &[
            "-Y",
            "tcp.dstport == 5432",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "tcp.flags.str",
        ],
    );
    assert!(ts.lines().count() >= 2, "tshark saw: {ts}");
    let ts = tshark(&pcap, &["-x"]);
    assert!(
        ts.contains("OR '1'='1") || ts.contains("OR '1'") || ts.contains("'1'='1"),
        "tshark's hex view lacks the query:\n{ts}"
    );
    eprintln!(
        "[{:>5.1}s] capture {uid}: {} frames, tshark reads it",
        t.elapsed().as_secs_f64(),
        cap["frames"]
    );

    // The response rule quarantined the api pod: it is listed; a new connection to the
    // database is refused, the cache (a rule it keeps) still answers, and the storefront
    // cannot reach it; the response record went to the webhook receiver.
    let (ok, list) = ctl(&[
        "node",
        "quarantine",
        "list",
        "--registry",
        node.registry.to_str().unwrap(),
    ]);
    assert!(
        ok && list.contains("payments/api")
            && list.contains(
                "quarantined response isolate-api threat SQL.Injection keep api-to-cache"
            ),
        "{list}"
    );
    let (code, _, _) = sh(&mut cri, &api, &format!("{psql} 'SELECT 1'")).await;
    assert_ne!(code, 0, "a quarantined pod reached the database");
    let (code, out, _) = sh(
        &mut cri,
        &api,
        &format!("timeout 10 redis-cli -h {NODE} PING"),
    )
    .await;
    assert_eq!(
        (code, out.trim()),
        (0, "PONG"),
        "the kept rule api-to-cache"
    );
    let (code, _, _) = sh(&mut cri, &web, &format!("{curl}/")).await;
    assert_ne!(code, 0, "the storefront reached a quarantined pod");
    let resp = records(&audit)
        .into_iter()
        .find(|r| r["unmapped"]["enclave"]["response"]["name"] == "isolate-api")
        .unwrap_or_else(|| panic!("no response record"));
    assert_eq!(
        resp["unmapped"]["enclave"]["response"]["actions"],
        serde_json::json!(["quarantine", "webhook"]),
        "{resp}"
    );
    assert!(
        records(&audit)
            .iter()
            .any(|r| r["unmapped"]["enclave"]["reason"] == "quarantined"),
        "no record of a flow the quarantine cut or refused"
    );
    let (hook_url, hooked) = webhook_receiver();
    let (ok, out) = ctl(&[
        "audit",
        "webhook",
        "--once",
        "--log",
        audit.to_str().unwrap(),
        "--url",
        &hook_url,
    ]);
    assert!(ok && out.contains("posted 1 records"), "{out}");
    let body = hooked
        .recv_timeout(Duration::from_secs(5))
        .expect("the webhook got nothing");
    assert!(
        body.contains("isolate-api") && body.contains("SQL.Injection"),
        "{body}"
    );
    // Released: the database answers again.
    let (ok, out) = ctl(&[
        "node",
        "quarantine",
        "release",
        "payments/api",
        "--registry",
        node.registry.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("released from quarantine"), "{out}");
    let (code, out, _) = sh(&mut cri, &api, &format!("{psql} 'SELECT 1'")).await;
    assert_eq!((code, out.trim()), (0, "1"), "after release");
    let (ok, list) = ctl(&[
        "node",
        "quarantine",
        "list",
        "--registry",
        node.registry.to_str().unwrap(),
    ]);
    assert!(ok && list.contains("no pod quarantined"), "{list}");
    eprintln!(
        "[{:>5.1}s] quarantine, webhook and release",
        t.elapsed().as_secs_f64()
    );

    // --- A response that restarts: a new policy version asks for it on a second protocol;
    // the api pod sends one; its netd records the response and exits, the shim stops the
    // VM, and the container ends (the orchestrator would start the pod again).
    let restart_policy = POLICY.replace(
        "version: \"1\"",
        "version: \"2\"",
    ) + "    - {name: restart-api, zones: [cde-api], threats: [Protocol.Mismatch], actions: [restart]}\n";
    std::fs::write(node.policy_dir.join("policy.yaml"), &restart_policy).unwrap();
    node_reload(&node);
    let _ = sh(
        &mut cri,
        &api,
        &format!("printf 'PING\\r\\nPOST /x HTTP/1.1\\r\\nHost: cache\\r\\n\\r\\n' | timeout 5 nc -w 3 {NODE} 6379"),
    )
    .await;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = cri
            .container_status(k8s_cri::v1::ContainerStatusRequest {
                container_id: api.c.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if st.state == k8s_cri::v1::ContainerState::ContainerExited as i32 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the api container still runs after a restart response: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let resp = records(&audit)
        .into_iter()
        .find(|r| r["unmapped"]["enclave"]["response"]["name"] == "restart-api")
        .unwrap_or_else(|| panic!("no record of the restart response"));
    assert_eq!(
        resp["unmapped"]["enclave"]["response"]["actions"],
        serde_json::json!(["restart"]),
        "{resp}"
    );
    eprintln!(
        "[{:>5.1}s] restart response: netd exited, the pod's container ended",
        t.elapsed().as_secs_f64()
    );

    // No full card number anywhere in the audit log or in any capture.
    let raw = std::fs::read_to_string(&audit).unwrap();
    assert!(!raw.contains(PAN), "a full PAN in the audit log");
    for e in std::fs::read_dir(&cap_dir).unwrap().flatten() {
        let b = std::fs::read(e.path()).unwrap();
        assert!(
            !String::from_utf8_lossy(&b).contains(PAN),
            "a full PAN in {}",
            e.path().display()
        );
    }
    // The whole capture file of the api pod (several sections) opens in tshark too.
    let all = tshark(
        &cap_dir.join("payments_api.pcapng"),
        &["-T", "fields", "-e", "frame.number"],
    );
    assert!(all.lines().count() >= 6, "{all}");
    // The node's log verifies with the findings in it.
    let out = Command::new(bin("enclavectl"))
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("[{:>5.1}s] done", t.elapsed().as_secs_f64());
}
