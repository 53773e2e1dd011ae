//! `enclavectl segmentation test`: probes from inside every zone's pod VM to every other
//! zone, the CIDR zones and the internet, set against the intent and netd's records; a
//! self-contained HTML report and its JSON, with the report's hash in the audit chain.

use crate::{fail, Fail};
use enclave_netfilter::audit::{base_event, AuditLog, AuditLogConfig, SyncPolicy};
use enclave_netfilter::segtest::{self, PlannedProbe};
use enclave_netfilter::{graph, learn, node};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum SegmentationCmd {
    /// Probes every zone pair from inside the pods' VMs (real connections through the
    /// guest kernel, enclave-netd and nftables), sets each outcome against the intent and
    /// the audit records netd wrote, and writes an HTML report and its JSON. Exits 1 when
    /// a flow the intent denies got through (a failure); intended flows that did not get
    /// through are warnings. Nothing leaves the node: probes to addresses off the pod
    /// network carry TTL 1.
    Test(TestArgs),
}

#[derive(clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    node: crate::NodeDirs,
    /// The node's audit log (netd's records of each probe are read from it; the run is
    /// recorded in it).
    #[arg(long, default_value = node::AUDIT_LOG)]
    audit_log: PathBuf,
    /// The intent to test against: an approved policy file (default: the policy in force,
    /// which then tests that enforcement does what the policy says).
    #[arg(long)]
    intent: Option<PathBuf>,
    /// Ports probed between every pair besides those the policy opens.
    #[arg(long, value_delimiter = ',', default_values_t = segtest::COMMON_PORTS)]
    ports: Vec<u16>,
    /// Where the report goes (`segmentation-<time>.html` and `.json`).
    #[arg(long, short, default_value = "/var/log/enclave/segmentation")]
    out: PathBuf,
    /// How long a probe waits for an answer, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    timeout_ms: u32,
    /// Probes started per second, per pod.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Run only if the policy in force (or the intent) changed since the last report in
    /// --out, or that report is older than --max-age-days (for a schedule that also
    /// follows policy changes: run it often with this flag).
    #[arg(long)]
    if_changed: bool,
    /// With --if-changed: the longest gap between two tests.
    #[arg(long, default_value_t = 30)]
    max_age_days: u64,
    /// Reports older than this many days are removed from --out (PCI DSS 11.4.1 asks for
    /// 12 months; the default keeps a little more).
    #[arg(long, default_value_t = 400)]
    keep_days: u64,
}

/// The newest report in `dir`: (its JSON, its age in days).
fn last_report(dir: &Path) -> Option<(Value, u64)> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("segmentation-"))
        })
        .max()?;
    let age = std::fs::metadata(&newest)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or(u64::MAX, |d| d.as_secs() / 86_400);
    let v = serde_json::from_slice(&std::fs::read(&newest).ok()?).ok()?;
    Some((v, age))
}

/// Removes reports older than `days` from `dir`; returns how many.
fn prune(dir: &Path, days: u64) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for p in rd.flatten().map(|e| e.path()) {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|d| d.as_secs() / 86_400 > days);
        if name.starts_with("segmentation-") && old && std::fs::remove_file(&p).is_ok() {
            n += 1;
        }
    }
    n
}

/// Sends `req` to a pod's probe socket and returns its results.
fn ask(socket: &Path, req: &Value, wait: Duration) -> Result<Vec<Value>, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("{}: {e} (is the pod's shim running?)", socket.display()))?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let v: Value =
        serde_json::from_str(&line).map_err(|e| format!("{}: answer: {e}", socket.display()))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("{}: {e}", socket.display()));
    }
    Ok(v["results"].as_array().cloned().unwrap_or_default())
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn run(cmd: SegmentationCmd) -> Result<u8, Fail> {
    let SegmentationCmd::Test(a) = cmd;
    let view = node::NodeView::load(
        &a.node.policy_dir,
        &a.node.registry,
        Some(&a.node.peer_dir),
        None,
    )
    .map_err(fail)?;
    let live = view.policy.policy();
    let intent = match &a.intent {
        Some(f) => std::sync::Arc::new(
            enclave_netfilter::policy::load_file(f)
                .map_err(|e| fail(e.to_string()))?
                .compiled,
        ),
        None => view.policy.clone(),
    };
    let intent_file = a.intent.clone().unwrap_or_else(|| view.policy_file.clone());
    let file_sha = |f: &Path| std::fs::read(f).map(|b| sha256(&b)).unwrap_or_default();
    let pruned = prune(&a.out, a.keep_days);
    if pruned > 0 {
        println!(
            "removed {pruned} report file(s) older than {} days from {}",
            a.keep_days,
            a.out.display()
        );
    }
    if a.if_changed {
        if let Some((last, age)) = last_report(&a.out) {
            let same = last["policy"]["sha256"] == file_sha(&view.policy_file).as_str()
                && last["intent"]["sha256"] == file_sha(&intent_file).as_str();
            if same && age < a.max_age_days {
                println!(
                    "up to date: the last report ({} days old, result {}) tested this policy and intent; next test within {} days or at the next policy change",
                    age,
                    last["result"].as_str().unwrap_or("?"),
                    a.max_age_days - age
                );
                return Ok(0);
            }
        }
    }
    // One pod per zone probes; every pod of the node may be a target.
    let mut pods = Vec::new();
    let mut sockets = std::collections::HashMap::new();
    for e in &view.entries {
        let Some(ip) = e.ips.iter().find(|i| i.is_ipv4()).copied() else {
            continue;
        };
        let zone = live
            .zone_name(view.peers.zone_of(&view.policy, ip))
            .to_string();
        if let Some(s) = e.probe_socket() {
            sockets.insert(e.reference(), s);
        }
        pods.push((zone, e.reference(), ip));
    }
    if pods.is_empty() {
        println!(
            "no pods registered in {}: nothing to probe from (the test needs a pod in each zone to test)",
            a.node.registry.display()
        );
        return Ok(2);
    }
    let (probers, targets, plan) = segtest::plan(live, &pods, &a.ports);
    println!(
        "segmentation test: {} zones with pods on this node, {} targets, {} probes (rate {}/s per pod, timeout {} ms)",
        probers.len(),
        targets.len(),
        plan.len(),
        a.rate,
        a.timeout_ms
    );
    let mut outcomes: Vec<Option<Value>> = vec![None; plan.len()];
    for (pi, p) in probers.iter().enumerate() {
        let mine: Vec<(usize, &PlannedProbe)> = plan
            .iter()
            .enumerate()
            .filter(|(_, q)| q.from == pi)
            .collect();
        let Some(sock) = sockets.get(&p.pod) else {
            println!(
                "  {} ({}): no probe socket; its probes are inconclusive",
                p.pod, p.zone
            );
            continue;
        };
        for chunk in mine.chunks(256) {
            let req = json!({
                "targets": chunk.iter().map(|(_, q)| {
                    let t = &targets[q.to];
                    json!({"proto": q.proto, "addr": t.ip.to_string(), "port": q.port, "ttl": if t.off_node { 1 } else { 0 }})
                }).collect::<Vec<_>>(),
                "timeout_ms": a.timeout_ms,
                "rate": a.rate,
            });
            let wait = Duration::from_millis(
                u64::from(a.timeout_ms)
                    + 1000 * chunk.len() as u64 / u64::from(a.rate.max(1))
                    + 10_000,
            );
            match ask(sock, &req, wait) {
                Ok(results) => {
                    for ((i, _), r) in chunk.iter().zip(results) {
                        outcomes[*i] = Some(r);
                    }
                }
                Err(e) => println!("  {} ({}): {e}", p.pod, p.zone),
            }
        }
        println!(
            "  probed from {} ({}, {}): {} probes",
            p.pod,
            p.zone,
            p.ip,
            mine.len()
        );
    }
    // netd writes each new flow's record before the frame moves; give the log a moment.
    std::thread::sleep(Duration::from_millis(500));
    let recs = records(&a.audit_log);
    let mut rows = Vec::new();
    let mut flows = Vec::new();
    let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
    for (i, q) in plan.iter().enumerate() {
        let (p, t) = (&probers[q.from], &targets[q.to]);
        let (allow, intent_rule) = segtest::intend(&intent, &p.zone, &t.zone, q.proto, q.port);
        let o = outcomes[i].clone().unwrap_or_else(
            || json!({"outcome": "error", "local_port": 0, "ms": 0, "detail": "not probed"}),
        );
        let outcome = o["outcome"].as_str().unwrap_or("error").to_string();
        let sport = o["local_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0);
        let ev = segtest::evidence(&recs, q.proto, p.ip, sport, t.ip, q.port);
        // The picture draws what the probes observed: reached (green) or blocked (red).
        let reached = matches!(
            outcome.as_str(),
            "connected" | "answered" | "refused" | "unreachable"
        );
        flows.push(learn::ObservedFlow {
            src_zone: p.zone.clone(),
            dst_zone: t.zone.clone(),
            src_ip: Some(p.ip.to_string()),
            dst_ip: Some(t.ip.to_string()),
            proto: q.proto.to_string(),
            sport,
            dport: q.port,
            app: None,
            outcome: if reached { "allowed" } else { "denied" }.into(),
            rule: None,
            denied_by: None,
            dst_name: None,
        });
        let (verdict, why) = segtest::judge(allow, q.proto, &outcome, &ev);
        *counts.entry(verdict).or_default() += 1;
        rows.push(json!({
            "from": p.zone, "from_pod": p.pod, "to": t.zone, "to_what": t.what, "to_ip": t.ip.to_string(),
            "proto": q.proto, "port": q.port, "ttl": if t.off_node { 1 } else { 0 },
            "intended": if allow { "allow" } else { "deny" }, "intent_rule": intent_rule,
            "outcome": outcome, "local_port": sport, "ms": o["ms"], "detail": o["detail"],
            "evidence": ev.iter().map(|e| json!({"seq": e.seq, "disposition": e.disposition, "rule": e.rule, "message": e.message, "by": e.by})).collect::<Vec<_>>(),
            "verdict": verdict, "why": why,
        }));
    }
    // The counters behind each failure and warning: how many new flows netd decided by
    // the rule its record names, from that pod's netd (its `metrics` control request).
    let mut metrics: std::collections::HashMap<String, String> = Default::default();
    for row in rows.iter_mut() {
        if row["verdict"] != "FAIL" && row["verdict"] != "warn" {
            continue;
        }
        let mut counters = Vec::new();
        for e in row["evidence"].as_array().cloned().unwrap_or_default() {
            let (Some(by), Some(rule)) = (e["by"].as_str(), e["rule"].as_str()) else {
                continue;
            };
            let Some(entry) = view.entries.iter().find(|x| x.name == by) else {
                continue;
            };
            let text = metrics.entry(by.to_string()).or_insert_with(|| {
                entry
                    .control
                    .as_deref()
                    .and_then(|c| node::control_request(c, "metrics").ok())
                    .unwrap_or_default()
            });
            let want = format!("rule=\"{rule}\"");
            if let Some(n) = text
                .lines()
                .find(|l| l.starts_with("enclave_netd_rule_flows_total{") && l.contains(&want))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
            {
                let c = json!({"pod": by, "counter": "enclave_netd_rule_flows_total", "rule": rule, "value": n});
                if !counters.contains(&c) {
                    counters.push(c);
                }
            }
        }
        row["counters"] = Value::Array(counters);
    }
    let fails = counts.get("FAIL").copied().unwrap_or(0);
    let result = if fails > 0 {
        "FAIL"
    } else if counts.get("warn").copied().unwrap_or(0) > 0 {
        "warn"
    } else {
        "pass"
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let now = enclave_netfilter::audit::now_ms();
    let report = json!({
        "node": host,
        "time": enclave_netfilter::audit::rfc3339(now),
        "result": result,
        "counts": {"probes": plan.len(), "pass": counts.get("pass").copied().unwrap_or(0), "fail": fails,
                   "warn": counts.get("warn").copied().unwrap_or(0), "inconclusive": counts.get("inconclusive").copied().unwrap_or(0)},
        "policy": {"describe": format!("{} version {} ({})", live.name, live.version, view.policy_file.display()), "sha256": file_sha(&view.policy_file)},
        "intent": {"describe": format!("{} version {} ({})", intent.policy().name, intent.policy().version, intent_file.display()), "sha256": file_sha(&intent_file)},
        "audit_log": a.audit_log.display().to_string(),
        "zones": segtest::zone_rows(live, &probers),
        "method": format!(
            "From one pod of each zone with pods on this node, the Enclave guest agent inside the pod's microVM opened a TCP connection (or sent a UDP datagram; a DNS query on port 53) to one pod of every other zone, an address of every CIDR zone and an address standing for the internet, on the ports the policy opens between the pair and on {}; {} probes per second per pod, {} ms each. Every probe crosses the guest kernel, the pod's enclave-netd and the pod's nftables table, as an attacker's packet would. Probes to addresses off the pod network carried TTL 1 and died at the node's first routing hop: the ICMP error coming back shows they passed both walls, and nothing left the node. Each outcome is set against the intent and against the audit records netd wrote for the probe's flow (found by its source port). Reached: connected, answered, refused (the target's host answered) or unreachable (a router answered). Blocked: no answer within the timeout.",
            a.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", "), a.rate, a.timeout_ms),
        "probes": rows,
    });
    let mut zones: Vec<String> = live.zones.iter().map(|z| z.name.clone()).collect();
    zones.push("unknown".into());
    let cde = graph::cde_zones(Some(live), &zones);
    let svg = graph::svg(&flows, &zones, &cde);
    let html = segtest::html(&report, &svg);
    std::fs::create_dir_all(&a.out).map_err(|e| fail(format!("{}: {e}", a.out.display())))?;
    let stamp = enclave_netfilter::audit::rfc3339(now).replace(':', "");
    let html_path = a.out.join(format!("segmentation-{stamp}.html"));
    let json_path = html_path.with_extension("json");
    let json_text = serde_json::to_string_pretty(&report).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&html_path, &html).map_err(|e| fail(format!("{}: {e}", html_path.display())))?;
    std::fs::write(&json_path, &json_text)
        .map_err(|e| fail(format!("{}: {e}", json_path.display())))?;
    // The run, and the report's hashes, in the audit chain.
    let mut rec = base_event(
        if fails > 0 { 4 } else { 1 },
        if fails > 0 { "High" } else { "Informational" },
        &format!(
            "segmentation test {result}: {} probes, {} pass, {fails} fail, {} warn; report {} sha256 {}",
            plan.len(),
            counts.get("pass").copied().unwrap_or(0),
            counts.get("warn").copied().unwrap_or(0),
            html_path.display(),
            sha256(html.as_bytes())
        ),
        "enclave-segmentation",
    );
    rec["unmapped"] = json!({"enclave": {"segmentation": {
        "result": result, "report": html_path.display().to_string(), "report_sha256": sha256(html.as_bytes()),
        "json": json_path.display().to_string(), "json_sha256": sha256(json_text.as_bytes()),
        "intent_sha256": report["intent"]["sha256"], "policy_sha256": report["policy"]["sha256"],
    }}});
    let recorded = AuditLog::open_shared(AuditLogConfig::node(
        a.audit_log.clone(),
        SyncPolicy::Always,
    ))
    .and_then(|mut l| l.append(rec))
    .map_err(|e| {
        fail(format!(
            "recording the run in {}: {e}",
            a.audit_log.display()
        ))
    })?;
    // What a person reads first: the failures and warnings.
    for r in report["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["verdict"] == "FAIL" || r["verdict"] == "warn")
    {
        println!(
            "  {:<5} {} → {} ({}) {}/{}: {}",
            r["verdict"].as_str().unwrap_or(""),
            r["from"].as_str().unwrap_or(""),
            r["to"].as_str().unwrap_or(""),
            r["to_what"].as_str().unwrap_or(""),
            r["proto"].as_str().unwrap_or(""),
            r["port"],
            r["why"].as_str().unwrap_or("")
        );
    }
    println!(
        "result: {result} ({} pass, {fails} fail, {} warn, {} inconclusive)\nreport: {}\n        {}\nrecorded in the audit chain as seq {} (report sha256 {})",
        counts.get("pass").copied().unwrap_or(0),
        counts.get("warn").copied().unwrap_or(0),
        counts.get("inconclusive").copied().unwrap_or(0),
        html_path.display(),
        json_path.display(),
        recorded.seq,
        sha256(html.as_bytes())
    );
    Ok(if fails > 0 { 1 } else { 0 })
}
