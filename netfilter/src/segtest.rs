//! Segmentation tests (PCI DSS v4.0 11.4.5/11.4.6): what the policy intends between every
//! pair of zones on a node, against what real probes from inside the pods' VMs observe.
//!
//! [`plan`] picks, for every zone with a pod on the node, one pod to probe from, and as
//! targets one pod of every zone with pods, an address of every CIDR zone, and an
//! address for the internet (`unknown`); each pair is probed on the ports the policy
//! opens between them and on a set of common ports. Probes to addresses off the pod
//! network carry TTL 1: they die at the node's first routing hop, so nothing leaves the
//! node, and the ICMP error that comes back shows the walls let them out. [`judge`] sets
//! each outcome against the intent (the policy in force, or an approved one given as the
//! intent) and the records enclave-netd wrote for the probe's flow: an intended denial
//! that got through is a failure, an intended allow that did not is a warning.

use crate::policy::{CompiledPolicy, Lookup, Policy, Protocol, ZoneId};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Ports probed between every pair besides those the policy opens.
pub const COMMON_PORTS: [u16; 12] = [
    22, 23, 25, 80, 443, 445, 3306, 3389, 5432, 6379, 8080, 27017,
];

/// Where probes are sent from: one pod per zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prober {
    /// Its zone.
    pub zone: String,
    /// `namespace/name`.
    pub pod: String,
    /// Its address (the probes' source).
    pub ip: IpAddr,
}

/// Where probes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its zone (`unknown` for the internet).
    pub zone: String,
    /// What it is: `namespace/name`, `cidr 203.0.113.0/24`, `internet`.
    pub what: String,
    /// The address probed.
    pub ip: IpAddr,
    /// Off the pod network: probed with TTL 1.
    pub off_node: bool,
}

/// One probe of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedProbe {
    /// Index in the probers.
    pub from: usize,
    /// Index in the targets.
    pub to: usize,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// Destination port.
    pub port: u16,
}

/// An address to stand for the internet: TEST-NET-2 (RFC 5737), never routed, and probed
/// with TTL 1 in any case.
pub const INTERNET_PROBE: &str = "198.51.100.1";

/// A host address inside a CIDR zone's network (the first, or the network itself for a
/// host route).
fn host_in(c: &crate::policy::Cidr) -> IpAddr {
    let max = if c.addr.is_ipv4() { 32 } else { 128 };
    if c.len >= max - 1 {
        return c.addr;
    }
    match c.addr {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    }
}

/// The plan: probers and targets from the pods on the node (`pods`: zone, reference,
/// address), every CIDR zone and the internet; per pair, the ports `policy` opens from the
/// prober's zone to the target's (at most 16) and `extra` ports, over TCP, and UDP where a
/// rule opens UDP.
pub fn plan(
    policy: &Policy,
    pods: &[(String, String, IpAddr)],
    extra: &[u16],
) -> (Vec<Prober>, Vec<Target>, Vec<PlannedProbe>) {
    let mut probers: Vec<Prober> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for (zone, pod, ip) in pods {
        if !probers.iter().any(|p| p.zone == *zone) {
            probers.push(Prober {
                zone: zone.clone(),
                pod: pod.clone(),
                ip: *ip,
            });
            targets.push(Target {
                zone: zone.clone(),
                what: pod.clone(),
                ip: *ip,
                off_node: false,
            });
        }
    }
    for z in &policy.zones {
        if let Some(c) = z.cidrs.iter().find(|c| c.addr.is_ipv4()) {
            targets.push(Target {
                zone: z.name.clone(),
                what: format!("cidr {c}"),
                ip: host_in(c),
                off_node: true,
            });
        }
    }
    if let Ok(ip) = INTERNET_PROBE.parse::<IpAddr>() {
        targets.push(Target {
            zone: "unknown".into(),
            what: "internet".into(),
            ip,
            off_node: true,
        });
    }
    let mut probes = Vec::new();
    for (fi, p) in probers.iter().enumerate() {
        let from = policy.zone_id(&p.zone).unwrap_or(ZoneId::UNKNOWN);
        for (ti, t) in targets.iter().enumerate() {
            if t.ip == p.ip {
                continue;
            }
            let to = policy.zone_id(&t.zone).unwrap_or(ZoneId::UNKNOWN);
            let mut ports: BTreeMap<(&'static str, u16), ()> = BTreeMap::new();
            for r in policy
                .rules
                .iter()
                .filter(|r| r.from.contains(&from) && r.to.contains(&to))
            {
                let protos: &[&'static str] = match r.protocol {
                    Protocol::Tcp => &["tcp"],
                    Protocol::Udp => &["udp"],
                    Protocol::Any => &["tcp"],
                    _ => &[],
                };
                for proto in protos {
                    for pr in &r.ports {
                        if pr.lo > 0 && ports.len() < 16 {
                            ports.insert((proto, pr.lo), ());
                        }
                    }
                }
            }
            for p in extra {
                ports.insert(("tcp", *p), ());
            }
            for (proto, port) in ports.into_keys() {
                probes.push(PlannedProbe {
                    from: fi,
                    to: ti,
                    proto,
                    port,
                });
            }
        }
    }
    (probers, targets, probes)
}

/// What the intent policy says of a flow: allowed (by which rule), or denied (by which
/// rule, or by default).
pub fn intend(
    intent: &CompiledPolicy,
    from: &str,
    to: &str,
    proto: &str,
    port: u16,
) -> (bool, String) {
    let p = intent.policy();
    let id = |z: &str| p.zone_id(z).unwrap_or(ZoneId::UNKNOWN);
    let ip_proto = if proto == "udp" { 17 } else { 6 };
    let name = |r: crate::policy::RuleId| {
        p.rules
            .get(r.0 as usize)
            .map_or_else(|| "?".to_string(), |r| r.name.clone())
    };
    match intent.lookup(id(from), id(to), ip_proto, port) {
        Lookup::Allowed(r) => (true, format!("rule `{}`", name(r))),
        Lookup::NeedsApp(c) => {
            let r = c.iter().flatten().next().copied();
            (
                true,
                r.map_or_else(String::new, |r| {
                    format!(
                        "rule `{}` (the handshake; its app is checked on the payload)",
                        name(r)
                    )
                }),
            )
        }
        Lookup::Denied(r) => (false, format!("deny rule `{}`", name(r))),
        Lookup::NoRule => (false, "default deny".into()),
    }
}

/// What netd recorded about a probe's flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The record's sequence number in the audit chain.
    pub seq: u64,
    /// `allowed`, `denied`, ...
    pub disposition: String,
    /// The rule it names.
    pub rule: Option<String>,
    /// The record's message.
    pub message: String,
    /// The pod whose netd wrote it.
    pub by: String,
}

/// Finds the records of the flow `src:sport → dst:dport` (proto) in audit records.
pub fn evidence(
    records: &[Value],
    proto: &str,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
) -> Vec<Evidence> {
    records
        .iter()
        .filter(|r| r["class_uid"] == 4001)
        .filter(|r| {
            r["connection_info"]["protocol_name"] == proto
                && r["src_endpoint"]["ip"] == src.to_string()
                && r["src_endpoint"]["port"] == sport
                && r["dst_endpoint"]["ip"] == dst.to_string()
                && r["dst_endpoint"]["port"] == dport
        })
        .map(|r| Evidence {
            seq: r["metadata"]["sequence"].as_u64().unwrap_or(0),
            disposition: r["disposition"].as_str().unwrap_or("").to_ascii_lowercase(),
            rule: r["firewall_rule"]["name"].as_str().map(str::to_string),
            message: r["message"].as_str().unwrap_or("").to_string(),
            by: r["unmapped"]["enclave"]["workload"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        })
        .collect()
}

/// The verdict of one probe: `pass`, `FAIL`, `warn` or `inconclusive`, and why.
pub fn judge(
    intended_allow: bool,
    proto: &str,
    outcome: &str,
    ev: &[Evidence],
) -> (&'static str, String) {
    let reached = matches!(
        outcome,
        "connected" | "answered" | "refused" | "unreachable"
    );
    let netd_allowed = ev.iter().any(|e| e.disposition == "allowed");
    let netd_denied = ev.iter().find(|e| e.disposition != "allowed");
    let allowed_by = ev
        .iter()
        .find(|e| e.disposition == "allowed")
        .and_then(|e| e.rule.clone())
        .map(|r| format!(", allowed by rule `{r}`"))
        .unwrap_or_default();
    match (intended_allow, reached, outcome) {
        (_, _, "error") => ("inconclusive", "the probe could not be sent".into()),
        (true, true, _) => ("pass", format!("reached ({outcome}){allowed_by}")),
        (false, false, _) => (
            "pass",
            match netd_denied {
                Some(e) => format!("blocked: {}", e.message),
                None => "blocked (no answer; no flow record: dropped before a new flow)".into(),
            },
        ),
        (false, true, _) => ("FAIL", format!("intended to be denied, but reached ({outcome}){allowed_by}")),
        (true, false, _) if ev.iter().any(|e| e.message.contains("request the rule does not allow")) => (
            "inconclusive",
            "the rule opens the flow, but allows only some requests inside it, and the probe's own was not one of them".into(),
        ),
        (true, false, _) if proto == "udp" && netd_allowed => (
            "inconclusive",
            "netd allowed it; nothing answered (a UDP service need not answer)".into(),
        ),
        (true, false, _) => (
            "warn",
            match netd_denied {
                Some(e) => format!("intended to be allowed, but blocked: {}", e.message),
                None => "intended to be allowed, but nothing answered".into(),
            },
        ),
    }
}

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report as one self-contained HTML page (no script, no external resource): scope,
/// method, the summary, each failure and warning with its evidence, the matrix, and the
/// flow picture (`svg`, drawn from the probes' own flow records).
pub fn html(report: &Value, svg: &str) -> String {
    let s = |v: &Value| esc(v.as_str().unwrap_or(""));
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Enclave segmentation test</title>\n<style>\nbody{font-family:sans-serif;margin:2em;color:#222;max-width:1200px}\ntable{border-collapse:collapse;margin:1em 0;font-size:13px}\nth,td{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top}\nth{background:#eee}\n.pass{color:#176c2a}.FAIL{color:#fff;background:#b3261e;font-weight:bold}.warn{background:#ffe08a}.inconclusive{color:#666}\n.summary span{margin-right:1.5em}\ncode{background:#f3f3f3;padding:0 3px}\nfigure{border:1px solid #ddd;padding:1em;overflow:auto}\n</style></head><body>\n");
    h.push_str(&format!(
        "<h1>Segmentation test: {}</h1>\n<p class=\"summary\"><span>result: <b class=\"{}\">{}</b></span><span>{} probes</span><span>{} pass</span><span>{} fail</span><span>{} warn</span><span>{} inconclusive</span></p>\n",
        s(&report["node"]),
        s(&report["result"]),
        s(&report["result"]),
        report["counts"]["probes"],
        report["counts"]["pass"],
        report["counts"]["fail"],
        report["counts"]["warn"],
        report["counts"]["inconclusive"]
    ));
    h.push_str("<h2>Scope</h2>\n<table>\n");
    for (k, v) in [
        ("node", &report["node"]),
        ("time (UTC)", &report["time"]),
        ("policy in force", &report["policy"]["describe"]),
        ("policy file sha256", &report["policy"]["sha256"]),
        ("intent", &report["intent"]["describe"]),
        ("intent file sha256", &report["intent"]["sha256"]),
        ("audit log", &report["audit_log"]),
    ] {
        h.push_str(&format!(
            "<tr><th>{k}</th><td><code>{}</code></td></tr>\n",
            s(v)
        ));
    }
    h.push_str("</table>\n<table><tr><th>zone</th><th>scope</th><th>probed from</th></tr>\n");
    for z in report["zones"].as_array().into_iter().flatten() {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            s(&z["name"]),
            s(&z["scope"]),
            s(&z["prober"])
        ));
    }
    h.push_str("</table>\n<h2>Method</h2>\n<p>");
    h.push_str(&s(&report["method"]));
    h.push_str("</p>\n");
    let rows: Vec<&Value> = report["probes"].as_array().into_iter().flatten().collect();
    let bad: Vec<&&Value> = rows
        .iter()
        .filter(|r| r["verdict"] == "FAIL" || r["verdict"] == "warn")
        .collect();
    h.push_str("<h2>Failures and warnings</h2>\n");
    if bad.is_empty() {
        h.push_str("<p>None: every probe observed what the intent says.</p>\n");
    }
    for r in bad {
        h.push_str(&format!(
            "<h3 class=\"{}\">{}: {} → {} ({}) {}/{}</h3>\n<p>{}</p>\n<ul>\n",
            s(&r["verdict"]),
            s(&r["verdict"]),
            s(&r["from"]),
            s(&r["to"]),
            s(&r["to_what"]),
            s(&r["proto"]),
            r["port"],
            s(&r["why"])
        ));
        h.push_str(&format!(
            "<li>intended: {} ({})</li>\n",
            s(&r["intended"]),
            s(&r["intent_rule"])
        ));
        h.push_str(&format!(
            "<li>probe: from {} (source port {}), outcome <code>{}</code> after {} ms</li>\n",
            s(&r["from_pod"]),
            r["local_port"],
            s(&r["outcome"]),
            r["ms"]
        ));
        for e in r["evidence"].as_array().into_iter().flatten() {
            h.push_str(&format!(
                "<li>audit record seq {} (by {}): {}</li>\n",
                e["seq"],
                s(&e["by"]),
                s(&e["message"])
            ));
        }
        for c in r["counters"].as_array().into_iter().flatten() {
            h.push_str(&format!(
                "<li>counter on {}'s enclave-netd: <code>{}{{rule=\"{}\"}} {}</code> (new flows that rule decided)</li>\n",
                s(&c["pod"]),
                s(&c["counter"]),
                s(&c["rule"]),
                c["value"]
            ));
        }
        h.push_str("</ul>\n");
    }
    // The matrix: one cell per zone pair, the ports seen open, and the verdicts.
    let mut froms: Vec<String> = Vec::new();
    let mut tos: Vec<String> = Vec::new();
    for r in &rows {
        let (f, t) = (s(&r["from"]), s(&r["to"]));
        if !froms.contains(&f) {
            froms.push(f);
        }
        if !tos.contains(&t) {
            tos.push(t);
        }
    }
    h.push_str("<h2>Matrix</h2>\n<p>Rows probe from, columns are probed; each cell lists the ports observed open and the probes' verdicts.</p>\n<table><tr><th>from \\ to</th>");
    for t in &tos {
        h.push_str(&format!("<th>{t}</th>"));
    }
    h.push_str("</tr>\n");
    for f in &froms {
        h.push_str(&format!("<tr><th>{f}</th>"));
        for t in &tos {
            let cell: Vec<&&Value> = rows
                .iter()
                .filter(|r| s(&r["from"]) == *f && s(&r["to"]) == *t)
                .collect();
            if cell.is_empty() {
                h.push_str("<td>-</td>");
                continue;
            }
            let open: Vec<String> = cell
                .iter()
                .filter(|r| {
                    matches!(
                        r["outcome"].as_str(),
                        Some("connected" | "answered" | "refused" | "unreachable")
                    )
                })
                .map(|r| format!("{}/{}", s(&r["proto"]), r["port"]))
                .collect();
            let count = |v: &str| cell.iter().filter(|r| r["verdict"] == v).count();
            let (fails, warns) = (count("FAIL"), count("warn"));
            let class = if fails > 0 {
                "FAIL"
            } else if warns > 0 {
                "warn"
            } else {
                "pass"
            };
            h.push_str(&format!(
                "<td class=\"{class}\">{}<br><small>{} probes: {} pass{}{}</small></td>",
                if open.is_empty() {
                    "nothing open".to_string()
                } else {
                    format!("open: {}", open.join(", "))
                },
                cell.len(),
                count("pass"),
                if fails > 0 {
                    format!(", {fails} FAIL")
                } else {
                    String::new()
                },
                if warns > 0 {
                    format!(", {warns} warn")
                } else {
                    String::new()
                }
            ));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<h2>What the probes observed</h2>\n<p>Zones in the cardholder-data environment are drawn inside the dashed boundary; one edge per zone pair and direction, green where probes got through (the ports listed), red where they were blocked, with counts.</p>\n<figure>\n");
    h.push_str(svg);
    h.push_str("\n</figure>\n");
    h.push_str("<h2>Every probe</h2>\n<table><tr><th>from</th><th>to</th><th>port</th><th>intended</th><th>observed</th><th>verdict</th><th>why</th></tr>\n");
    for r in &rows {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{} <small>({})</small></td><td>{}/{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>\n",
            s(&r["from"]),
            s(&r["to"]),
            s(&r["to_what"]),
            s(&r["proto"]),
            r["port"],
            s(&r["intended"]),
            s(&r["outcome"]),
            s(&r["verdict"]),
            s(&r["verdict"]),
            s(&r["why"])
        ));
    }
    h.push_str("</table>\n<p><small>Written by <code>enclavectl segmentation test</code>. The report's SHA-256 is recorded in the node's audit chain (a Compliance Finding record naming this file); <code>enclavectl audit verify</code> checks the chain.</small></p>\n</body></html>\n");
    h
}

/// The zones' rows for the report.
pub fn zone_rows(policy: &Policy, probers: &[Prober]) -> Value {
    Value::Array(
        policy
            .zones
            .iter()
            .map(|z| {
                json!({
                    "name": z.name,
                    "scope": z.scope.map(|s| match s {
                        crate::policy::Scope::Cde => "cde",
                        crate::policy::Scope::Connected => "connected",
                        crate::policy::Scope::OutOfScope => "out-of-scope",
                    }).unwrap_or("-"),
                    "prober": probers.iter().find(|p| p.zone == z.name).map_or("(no pod on this node)".to_string(), |p| format!("{} {}", p.pod, p.ip)),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(d: &str, rule: &str) -> Evidence {
        Evidence {
            seq: 7,
            disposition: d.into(),
            rule: Some(rule.into()),
            message: format!("{d} by rule `{rule}`"),
            by: "web".into(),
        }
    }

    #[test]
    fn an_intended_denial_that_got_through_fails_and_names_the_rule() {
        let (v, why) = judge(false, "tcp", "refused", &[ev("allowed", "leaky-web-to-db")]);
        assert_eq!(v, "FAIL");
        assert!(why.contains("`leaky-web-to-db`"), "{why}");
        assert_eq!(
            judge(false, "tcp", "timeout", &[ev("denied", "x")]).0,
            "pass"
        );
        assert_eq!(judge(true, "tcp", "connected", &[]).0, "pass");
        assert_eq!(
            judge(true, "tcp", "timeout", &[ev("denied", "x")]).0,
            "warn"
        );
        assert_eq!(
            judge(true, "udp", "timeout", &[ev("allowed", "dns")]).0,
            "inconclusive"
        );
        assert_eq!(
            judge(false, "tcp", "unreachable", &[]).0,
            "FAIL",
            "a probe that left the pod"
        );
    }

    #[test]
    fn the_plan_covers_every_zone_pair_cidrs_and_the_internet() {
        let l = crate::policy::load_str(
            "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {name: p, version: 1}\nspec:\n  zones:\n    - {name: a, selector: {namespaces: [a]}}\n    - {name: b, selector: {namespaces: [b]}}\n    - {name: ext, cidrs: [203.0.113.0/24]}\n  rules:\n    - {name: ab, from: a, to: b, protocol: tcp, ports: [9000]}\n    - {name: dns, from: a, to: ext, protocol: udp, ports: [53]}\n",
            "p.yaml",
        )
        .expect("loads");
        let pods = vec![
            (
                "a".to_string(),
                "a/a-0".to_string(),
                "10.0.0.2".parse().expect("ip"),
            ),
            (
                "b".to_string(),
                "b/b-0".to_string(),
                "10.0.0.3".parse().expect("ip"),
            ),
        ];
        let (probers, targets, probes) = plan(l.compiled.policy(), &pods, &[22]);
        assert_eq!(probers.len(), 2);
        assert_eq!(targets.len(), 4, "{targets:?}");
        assert_eq!(targets[2].ip.to_string(), "203.0.113.1");
        assert!(targets[2].off_node && targets[3].off_node);
        let has = |f: usize, t: usize, proto: &str, port: u16| {
            probes
                .iter()
                .any(|p| p.from == f && p.to == t && p.proto == proto && p.port == port)
        };
        assert!(has(0, 1, "tcp", 9000) && has(0, 1, "tcp", 22));
        assert!(has(0, 2, "udp", 53) && has(1, 3, "tcp", 22));
        assert!(
            !probes.iter().any(|p| p.from == 0 && p.to == 0),
            "no probe to itself"
        );
        assert!(intend(&l.compiled, "a", "b", "tcp", 9000).0);
        assert_eq!(
            intend(&l.compiled, "b", "a", "tcp", 9000),
            (false, "default deny".into())
        );
    }
}
