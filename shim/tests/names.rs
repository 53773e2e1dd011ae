//! Egress by DNS name and rules inside TLS and DNS, end to end: a private containerd with
//! CRI runs a pod in a microVM behind its enclave-netd, under a policy that lets it reach
//! the name zone `*.psp.example` over TLS (server name checked) and ask the cluster DNS
//! only about names it needs. On the node: dnsmasq (Debian's) as the cluster DNS, and
//! two TLS servers (openssl s_server) on two addresses.
//! - curl in the pod resolves api.psp.example through dnsmasq and reaches it: netd learned
//!   the address from the pod's own answer, and the shim put it in the pod's nftables set;
//! - the same server name at an address the pod never resolved is refused;
//! - a learned address asked for under another server name (SNI) is refused;
//! - a DNS query for a name the rule does not list is dropped and named in the audit log;
//! - a pod in learn mode reaches shop.lab.example: its record names the destination, and
//!   `enclavectl policy suggest` proposes a name zone for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use enclave_tests::cri::{cri_client, exec_sync, records, run_pod, CriNode, PodSpec};
use enclave_tests::services::{self, Service};
use enclave_tests::skip_or_fail;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2")).with_file_name(name)
}

const NODE: &str = "10.88.77.1";
/// Where api.psp.example resolves (outside CNI's .2–.199).
const PSP: &str = "10.88.77.200";
/// A second TLS server the pod never resolves.
const OTHER: &str = "10.88.77.201";

const POLICY: &str = r#"apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: names-e2e, version: "1"}
spec:
  names: {minTtlSeconds: 60, maxTtlSeconds: 600}
  zones:
    - {name: cde-api, scope: cde, selector: {namespaces: [payments]}}
    - {name: cluster-dns, cidrs: [10.88.77.1/32]}
    - {name: psp, description: "the payment service provider, by name", names: ["*.psp.example"]}
    - {name: lab, mode: learn, selector: {namespaces: [lab]}}
  rules:
    - {name: api-dns, from: cde-api, to: cluster-dns, protocol: udp, ports: [53], app: dns,
       dns: {names: ["*.psp.example"]}}
    - {name: api-to-psp, from: cde-api, to: psp, protocol: tcp, ports: [443], app: tls,
       tls: {sni: ["*.psp.example"]}}
"#;

fn in_node(node: &CriNode, args: &[&str]) -> Command {
    enclave_tests::services::in_node(node, args)
}

/// dnsmasq answering api.psp.example with PSP and shop.lab.example with OTHER, and a TLS
/// server on PSP and on OTHER, all in the node's namespace; waits until they answer.
fn start_servers(node: &CriNode, dir: &Path) -> Vec<Service> {
    services::add_addresses(node, NODE, &[PSP, OTHER]).unwrap();
    let mut servers = services::tls_servers(node, dir, "api.psp.example", &[PSP, OTHER]).unwrap();
    servers.push(
        services::dnsmasq(
            node,
            dir,
            NODE,
            &[("api.psp.example", PSP), ("shop.lab.example", OTHER)],
        )
        .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let dns = in_node(node, &["busybox", "nslookup", "api.psp.example", NODE])
            .output()
            .unwrap();
        let tls = [PSP, OTHER].iter().all(|a| {
            in_node(
                node,
                &["curl", "-sk", "--max-time", "2", &format!("https://{a}/")],
            )
            .output()
            .is_ok_and(|o| o.status.success())
        });
        if tls && String::from_utf8_lossy(&dns.stdout).contains(PSP) {
            break;
        }
        assert!(
            Instant::now() < end,
            "servers not up: {}",
            String::from_utf8_lossy(&dns.stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    servers
}

/// The nftables set of name zone `zone` in the pod's network namespace, as `nft` lists it.
fn name_set(node: &CriNode, pod: &str, set: &str) -> String {
    let entry = std::fs::read_dir(&node.registry)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains(pod))
        .expect("the pod's registry entry");
    let entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
    // The pod's namespace is mounted inside containerd's mount namespace only; netd lives
    // in it, so its /proc entry names it.
    let control = entry["control"].as_str().unwrap();
    let netd = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|p| {
            std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("enclave-netd") && c.contains(control)
            })
        })
        .expect("the pod's enclave-netd");
    let netns = netd.path().join("ns/net");
    let netns = netns.display();
    let table = format!(
        "enclave_{}_{}",
        entry["namespace"].as_str().unwrap(),
        entry["name"].as_str().unwrap()
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["nft", "list", "set", "inet", &table, set])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_pod_reaches_a_psp_by_name_only_at_addresses_it_resolved() {
    let test = "a_pod_reaches_a_psp_by_name_only_at_addresses_it_resolved";
    if let Err(e) = enclave_tests::cri::prerequisites(&[
        ("dnsmasq", "/usr/sbin/dnsmasq"),
        ("curl", "/usr/bin/curl"),
        ("openssl", "/usr/bin/openssl"),
        ("nsenter", "/usr/bin/nsenter"),
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
    let dir = std::env::temp_dir().join(format!("enclave-names-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let node = CriNode::start_with_policy(
        &dir,
        &bin(""),
        &format!("enclave-names-{}", std::process::id()),
        POLICY,
    );
    let image =
        enclave_tests::containerd::tools_image(&dir.join("images"), &[("/usr/bin/curl", "curl")])
            .unwrap_or_else(|e| panic!("{test}: {e}"));
    node.import_image(&image);
    let audit = node.audit_log.clone();
    let mut cri = cri_client(&node.containerd.sock()).await;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let t = Instant::now();
    // The pod's resolver is the node's dnsmasq (what a cluster DNS service is to a pod).
    let api = run_pod(
        &mut cri,
        &node,
        &logs,
        PodSpec {
            who: ("api", "payments", "cde-api"),
            image: Some(enclave_tests::containerd::TOOLS_IMAGE),
            script: &format!("echo 'nameserver {NODE}' > /etc/resolv.conf && exec sleep 100000"),
            net_admin: false,
        },
    )
    .await;
    eprintln!(
        "[{:>5.1}s] pod api up at {}",
        t.elapsed().as_secs_f64(),
        api.ip
    );
    // CNI made the node's bridge with the pod: the servers go on it now.
    let _servers = start_servers(&node, &dir);
    let sh = |script: String| {
        let c = api.c.clone();
        (c, script)
    };

    // Before any answer, the address is nobody's: denied (the SYN is dropped; curl times out).
    let (c, s) = sh(format!(
        "curl -sk --max-time 4 --resolve api.psp.example:443:{PSP} https://api.psp.example/"
    ));
    let (code, _, _) = exec_sync(&mut cri, &c, &["sh", "-c", &s]).await;
    assert_eq!(
        code, 28,
        "a PSP address the pod never resolved is refused (curl timed out)"
    );
    eprintln!(
        "[{:>5.1}s] before resolving: refused",
        t.elapsed().as_secs_f64()
    );

    // curl resolves the name through dnsmasq itself, then connects.
    let (c, s) = sh("curl -sk --max-time 10 https://api.psp.example/".into());
    let (code, out, err) = exec_sync(&mut cri, &c, &["sh", "-c", &s]).await;
    assert_eq!(code, 0, "curl https://api.psp.example/: {err}");
    assert!(out.contains("s_server"), "the PSP's page: {out}");
    eprintln!(
        "[{:>5.1}s] resolved and reached api.psp.example at {PSP}",
        t.elapsed().as_secs_f64()
    );
    let set = name_set(&node, "api", "names_3_v4");
    assert!(
        set.contains(PSP) && set.contains("expires"),
        "the wall's name set: {set}"
    );

    // The same name at an address the pod never resolved.
    let (c, s) = sh(format!(
        "curl -sk --max-time 4 --resolve api.psp.example:443:{OTHER} https://api.psp.example/"
    ));
    let (code, _, _) = exec_sync(&mut cri, &c, &["sh", "-c", &s]).await;
    assert_ne!(code, 0, "an address the pod never resolved is refused");
    // A resolved address, asked for under a server name the rule does not allow.
    let (c, s) = sh(format!(
        "curl -sk --max-time 6 --resolve evil.example:443:{PSP} https://evil.example/"
    ));
    let (code, _, err) = exec_sync(&mut cri, &c, &["sh", "-c", &s]).await;
    assert_ne!(code, 0, "SNI evil.example went through: {err}");
    // A DNS name the rule does not list: the query is dropped.
    let (c, s) = sh(format!("nslookup exfil.attacker.example {NODE}"));
    let (code, out, _) = exec_sync(&mut cri, &c, &["sh", "-c", &s]).await;
    assert!(code != 0 || !out.contains("Address"), "{out}");
    eprintln!(
        "[{:>5.1}s] other address, other SNI, other DNS name: refused",
        t.elapsed().as_secs_f64()
    );

    // The audit log says why, rule by rule.
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let recs = records(&audit);
        let allowed = recs.iter().any(|r| {
            r["class_uid"] == 4001
                && r["firewall_rule"]["name"] == "api-to-psp"
                && r["dst_endpoint"]["ip"] == PSP
                && r["disposition_id"] == 1
        });
        let sni = recs.iter().any(|r| {
            r["class_uid"] == 2004
                && r["firewall_rule"]["name"] == "api-to-psp"
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("`evil.example`"))
        });
        let dns = recs.iter().any(|r| {
            r["class_uid"] == 2004
                && r["firewall_rule"]["name"] == "api-dns"
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("`exfil.attacker.example`"))
        });
        if allowed && sni && dns {
            break;
        }
        assert!(
            Instant::now() < end,
            "records: allowed to PSP {allowed}, SNI refusal {sni}, DNS refusal {dns} in {}",
            audit.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Learn mode: the destination's name reaches the record and the proposal.
    let lab = run_pod(
        &mut cri,
        &node,
        &logs,
        PodSpec {
            who: ("learner", "lab", "lab"),
            image: Some(enclave_tests::containerd::TOOLS_IMAGE),
            script: &format!("echo 'nameserver {NODE}' > /etc/resolv.conf && exec sleep 100000"),
            net_admin: false,
        },
    )
    .await;
    let (code, _, err) = exec_sync(
        &mut cri,
        &lab.c,
        &[
            "sh",
            "-c",
            "curl -sk --max-time 10 https://shop.lab.example/",
        ],
    )
    .await;
    assert_eq!(code, 0, "learn mode lets it through: {err}");
    let end = Instant::now() + Duration::from_secs(15);
    let suggested = loop {
        let named = records(&audit).iter().any(|r| {
            r["class_uid"] == 4001 && r["unmapped"]["enclave"]["dst_name"] == "shop.lab.example"
        });
        let (ok, out) = enclave_tests::outcome(
            Command::new(bin("enclavectl"))
                .args(["policy", "suggest"])
                .arg(&audit),
        );
        assert!(ok, "{out}");
        if named && out.contains("names: [\"shop.lab.example\"]") {
            break out;
        }
        assert!(
            Instant::now() < end,
            "no record naming shop.lab.example, or no name zone proposed:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(suggested.contains("to: names-lab-example"), "{suggested}");
    eprintln!(
        "[{:>5.1}s] learn mode: the record names shop.lab.example; suggest proposes zone names-lab-example",
        t.elapsed().as_secs_f64()
    );

    let (ok, out) = enclave_tests::outcome(
        Command::new(bin("enclavectl"))
            .args(["audit", "verify"])
            .arg(&audit),
    );
    assert!(ok, "{out}");
    eprintln!(
        "[{:>5.1}s] audit records found; log verifies",
        t.elapsed().as_secs_f64()
    );
    enclave_tests::cri::remove_pods(&mut cri, &[&api, &lab]).await;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
