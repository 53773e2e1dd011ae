//! The segmentation test an assessor reads, end to end: the four-pod PCI CDE setup through
//! CRI (web, api, db and cache, each in its own microVM behind its enclave-netd and
//! nftables table, under configs/policies/pci-cde.yaml), then `enclavectl segmentation
//! test`, whose probes run inside each pod's VM through the guest agent.
//! - Under the template: every probe observes what the policy intends (no failure, no
//!   warning); the report is written as HTML and JSON, its hash is in the audit chain, and
//!   a real headless browser (Debian's chromium) loads it without errors and screenshots it.
//! - Under a deliberately leaky policy (the guardrail narrowed, a rule letting `web` reach
//!   `cde-db` on 5432), tested against the approved template as the intent: the test fails
//!   and names the pair, the port and the rule that let it through.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use enclave_tests::cri::{cri_client, records, run_pod, CriNode, PodSpec};
use enclave_tests::skip_or_fail;
use sha2::Digest;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-enclave-v2")).with_file_name(name)
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `enclavectl segmentation test` on the node: (exit code, output, the report's JSON, the
/// HTML report's path).
fn segmentation(
    node: &CriNode,
    out: &Path,
    intent: Option<&Path>,
) -> (i32, String, serde_json::Value, PathBuf) {
    let mut c = node.segmentation_test(&bin("enclavectl"), out);
    if let Some(i) = intent {
        c.arg("--intent").arg(i);
    }
    let o = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let html = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no report in {}: {text}", out.display()));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(html.with_extension("json")).unwrap()).unwrap();
    (o.status.code().unwrap_or(-1), text, json, html)
}

/// Loads `html` in headless chromium: no console error, the DOM has the report's title;
/// and a screenshot of it. Returns the screenshot's size in bytes.
fn browser_check(html: &Path, shot: &Path) -> usize {
    let url = format!("file://{}", html.display());
    let o = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
        ])
        .arg(&url)
        .output()
        .unwrap();
    let (dom, log) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "chromium: {log}");
    assert!(dom.contains("Segmentation test"), "the report's DOM: {dom}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(
        console.is_empty(),
        "console messages while loading the report: {console:?}"
    );
    let o = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1280,2400",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "chromium screenshot: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::metadata(shot)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

#[tokio::test(flavor = "current_thread")]
async fn segmentation_test_reports_the_cde_boundary_and_fails_on_a_leaky_policy() {
    let test = "segmentation_test_reports_the_cde_boundary_and_fails_on_a_leaky_policy";
    if let Err(e) = enclave_tests::cri::prerequisites(&[("chromium", "/usr/bin/chromium")]) {
        return skip_or_fail(test, &e);
    }
    if !bin("enclavectl").exists() || !bin("enclave-netd").exists() {
        return skip_or_fail(
            test,
            "enclavectl / enclave-netd not built (cargo build --workspace --bins)",
        );
    }
    enclave_tests::cri::clean_node();
    let dir = std::env::temp_dir().join(format!("enclave-seg-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let template_file = workspace().join("configs/policies/pci-cde.yaml");
    let template = std::fs::read_to_string(&template_file).unwrap();
    let node = CriNode::start_with_policy(
        &dir,
        &bin(""),
        &format!("enclave-seg-{}", std::process::id()),
        &template,
    );
    let mut cri = cri_client(&node.containerd.sock()).await;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let t = Instant::now();
    let serve = |port: u16| {
        format!("mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p {port} -h /www")
    };
    let mut pods = Vec::new();
    for (who, script) in [
        (("web", "storefront", "web"), serve(8080)),
        (("api", "payments", "cde-api"), serve(8080)),
        (
            ("db", "payments", "cde-db"),
            "while true; do nc -l -p 5432 > /dev/null; done".to_string(),
        ),
        (
            ("cache", "payments", "cde-cache"),
            "while true; do nc -l -p 6379 > /dev/null; done".to_string(),
        ),
    ] {
        pods.push(
            run_pod(
                &mut cri,
                &node,
                &logs,
                PodSpec {
                    who,
                    image: None,
                    script: &script,
                    net_admin: false,
                },
            )
            .await,
        );
    }
    eprintln!("[{:>5.1}s] four PCI pods up", t.elapsed().as_secs_f64());

    // --- The template: every probe as intended.
    let reports = dir.join("reports");
    let (code, out, report, html) = segmentation(&node, &reports, None);
    eprintln!(
        "[{:>5.1}s] segmentation test under the template:\n{out}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["result"], "pass", "{out}");
    let probes = report["probes"].as_array().unwrap();
    assert!(probes.len() >= 100, "{} probes", probes.len());
    let row = |from: &str, to: &str, port: u64| {
        probes
            .iter()
            .find(|r| {
                r["from"] == from && r["to"] == to && r["port"] == port && r["proto"] == "tcp"
            })
            .unwrap_or_else(|| panic!("no probe {from} → {to}:{port}"))
            .clone()
    };
    // An intended flow, seen through: connected to the api's HTTP server, netd's record
    // names the rule.
    let r = row("web", "cde-api", 8080);
    assert_eq!(
        (
            r["intended"].as_str(),
            r["outcome"].as_str(),
            r["verdict"].as_str()
        ),
        (Some("allow"), Some("connected"), Some("pass")),
        "{r}"
    );
    // (A bare connect on an app rule's port has no payload yet: netd records the flow
    // when the app is detected, so there is no record to show; the intent names the rule.)
    assert!(
        r["intent_rule"].as_str().unwrap().contains("`web-to-api`"),
        "{r}"
    );
    // A denied one, blocked, with the guardrail's record.
    let r = row("web", "cde-db", 5432);
    assert_eq!(
        (
            r["intended"].as_str(),
            r["outcome"].as_str(),
            r["verdict"].as_str()
        ),
        (Some("deny"), Some("timeout"), Some("pass")),
        "{r}"
    );
    assert!(
        r["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["rule"] == "non-cde-not-to-cde-data" && e["disposition"] == "blocked"),
        "netd's record of the denial, by the guardrail: {r}"
    );
    // The internet: denied from the CDE, and the probe never left the node (TTL 1).
    let r = row("cde-api", "unknown", 443);
    assert_eq!(
        (r["ttl"].as_u64(), r["verdict"].as_str()),
        (Some(1), Some("pass")),
        "{r}"
    );
    assert_eq!(report["counts"]["fail"], 0);
    assert_eq!(report["counts"]["warn"], 0, "{out}");
    // The report's hash is in the audit chain, and the chain verifies.
    let html_bytes = std::fs::read(&html).unwrap();
    let digest: String = sha2::Sha256::digest(&html_bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let rec = records(&node.audit_log)
        .into_iter()
        .find(|r| r["unmapped"]["enclave"]["segmentation"]["report_sha256"] == digest.as_str())
        .expect("a record with the report's sha256");
    assert_eq!(rec["unmapped"]["enclave"]["segmentation"]["result"], "pass");
    let (ok, v) = enclave_tests::outcome(
        Command::new(bin("enclavectl"))
            .args(["audit", "verify"])
            .arg(&node.audit_log),
    );
    assert!(ok, "{v}");
    // The page in a real browser.
    let html_text = String::from_utf8_lossy(&html_bytes);
    // Self-contained: nothing fetched (the SVG's namespace URI is a name, not a fetch).
    for fetch in ["src=", "href=", "<script", "<link", "@import"] {
        assert!(
            !html_text.contains(fetch),
            "the report would fetch something: {fetch}"
        );
    }
    assert_eq!(
        html_text.matches("url(").count(),
        html_text.matches("url(#").count(),
        "only references inside the page (the SVG's arrow markers)"
    );
    assert!(
        html_text
            .replace("xmlns=\"http://www.w3.org/2000/svg\"", "")
            .matches("http")
            .count()
            == 0,
        "the report is self-contained"
    );
    assert!(
        html_text.contains("<svg") && html_text.contains("cde-db"),
        "the flow picture is in it"
    );
    let shot = dir.join("report.png");
    let size = browser_check(&html, &shot);
    // Kept for people: the report and its screenshot under target/segmentation-e2e/.
    let keep = workspace().join("target/segmentation-e2e");
    let _ = std::fs::create_dir_all(&keep);
    let _ = std::fs::copy(&html, keep.join("report.html"));
    let _ = std::fs::copy(&shot, keep.join("report.png"));
    assert!(size > 20_000, "screenshot of {size} bytes");
    eprintln!("[{:>5.1}s] report {} ({} bytes) in the audit chain; chromium loads it, screenshot {} bytes", t.elapsed().as_secs_f64(), html.display(), html_bytes.len(), size);

    // --- A leaky policy: the guardrail narrowed, web allowed to the cardholder database.
    let leaky = template
        .replace("      to: [cde-db, cde-cache]", "      to: [cde-cache]")
        .replace(
            "  rules:\n",
            "  rules:\n    - {name: leaky-web-to-db, from: web, to: cde-db, protocol: tcp, ports: [5432]}\n",
        );
    assert_ne!(leaky, template);
    std::fs::write(node.policy_dir.join("policy.yaml"), &leaky).unwrap();
    let reloaded = node.reload(&bin("enclavectl"));
    eprintln!(
        "[{:>5.1}s] leaky policy in force: {}",
        t.elapsed().as_secs_f64(),
        reloaded.lines().next().unwrap_or("")
    );
    let (code, out, report, _) = segmentation(&node, &reports, Some(&template_file));
    eprintln!(
        "[{:>5.1}s] segmentation test against the approved template:\n{out}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(report["result"], "FAIL");
    let r = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["from"] == "web" && r["to"] == "cde-db" && r["port"] == 5432 && r["proto"] == "tcp"
        })
        .unwrap()
        .clone();
    assert_eq!(r["verdict"], "FAIL", "{r}");
    assert!(
        r["why"].as_str().unwrap().contains("`leaky-web-to-db`"),
        "{r}"
    );
    // Its evidence: netd's record and its counter of flows by that rule.
    assert!(
        r["counters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["rule"] == "leaky-web-to-db" && c["value"].as_u64() >= Some(1)),
        "{r}"
    );
    assert!(
        out.lines().any(|l| l.contains("FAIL")
            && l.contains("web → cde-db")
            && l.contains("tcp/5432")
            && l.contains("leaky-web-to-db")),
        "the failure names the pair, the port and the rule:\n{out}"
    );
    enclave_tests::cri::remove_pods(&mut cri, &pods.iter().collect::<Vec<_>>()).await;
    let left = enclave_tests::containerd::leftovers("/run/enclave/k8s.io/");
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
