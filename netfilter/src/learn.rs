//! Rules proposed from observed flows (learn-mode audit records).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// One observed flow, as read back from an audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedFlow {
    /// Source zone.
    pub src_zone: String,
    /// Destination zone.
    pub dst_zone: String,
    /// Source IP (to help name unknown peers).
    pub src_ip: Option<String>,
    /// Destination IP.
    pub dst_ip: Option<String>,
    /// Protocol name.
    pub proto: String,
    /// Source port (0 when none).
    pub sport: u16,
    /// Destination port (0 when none).
    pub dport: u16,
    /// App detected.
    pub app: Option<String>,
    /// Verdict word: allowed, denied, would-deny, learned.
    pub outcome: String,
    /// The allow rule that covers the flow, if any.
    pub rule: Option<String>,
    /// The deny rule that covers the flow, if any (learn mode let it through).
    pub denied_by: Option<String>,
    /// The DNS name the pod resolved the destination from, when netd saw it.
    pub dst_name: Option<String>,
}

impl ObservedFlow {
    /// Reads a flow from an OCSF record written by the audit log; `None` for other records.
    pub fn from_record(v: &serde_json::Value) -> Option<ObservedFlow> {
        if v.get("class_uid")?.as_u64()? != 4001 {
            return None;
        }
        let s = |p: &[&str]| -> Option<String> {
            let mut cur = v;
            for k in p {
                cur = cur.get(k)?;
            }
            cur.as_str().map(str::to_string)
        };
        let outcome = match v.get("disposition_id")?.as_u64()? {
            1 => "allowed",
            2 => "denied",
            15 => "would-deny",
            17 => "learned",
            _ => "other",
        };
        Some(ObservedFlow {
            src_zone: s(&["src_endpoint", "zone"]).unwrap_or_else(|| "unknown".into()),
            dst_zone: s(&["dst_endpoint", "zone"]).unwrap_or_else(|| "unknown".into()),
            src_ip: s(&["src_endpoint", "ip"]),
            dst_ip: s(&["dst_endpoint", "ip"]),
            proto: s(&["connection_info", "protocol_name"]).unwrap_or_else(|| "none".into()),
            sport: v
                .get("src_endpoint")?
                .get("port")
                .and_then(|p| p.as_u64())
                .unwrap_or(0) as u16,
            dport: v
                .get("dst_endpoint")?
                .get("port")
                .and_then(|p| p.as_u64())
                .unwrap_or(0) as u16,
            app: s(&["unmapped", "enclave", "app_protocol_detected"]),
            outcome: outcome.into(),
            rule: s(&["firewall_rule", "name"])
                .filter(|_| s(&["firewall_rule", "type"]).as_deref() != Some("deny")),
            denied_by: s(&["firewall_rule", "name"])
                .filter(|_| s(&["firewall_rule", "type"]).as_deref() == Some("deny")),
            dst_name: s(&["unmapped", "enclave", "dst_name"]),
        })
    }
}

/// Proposes allow rules (YAML, ready to paste under `spec.rules`) for learned flows that
/// no allow rule already covers. Flows of one zone pair, protocol and app share a rule.
pub fn suggest(flows: &[ObservedFlow]) -> String {
    #[derive(Default)]
    struct Group {
        ports: BTreeSet<u16>,
        count: usize,
        peers: BTreeSet<String>,
        denied_by: BTreeSet<String>,
    }
    let mut groups: BTreeMap<(String, String, String, Option<String>), Group> = BTreeMap::new();
    // Destinations in no zone that the pod reached by DNS name: a name zone per domain
    // (the name's last two labels), holding the names seen.
    let mut name_zones: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut learned = 0;
    for f in flows
        .iter()
        .filter(|f| f.outcome == "learned" && f.proto != "none")
    {
        learned += 1;
        // Already allowed by an allow rule: nothing to propose.
        if f.rule.is_some() {
            continue;
        }
        let dst_zone = match (&f.dst_name, f.dst_zone.as_str()) {
            (Some(n), "unknown") => {
                let labels: Vec<&str> = n.rsplit('.').take(2).collect();
                let domain: Vec<&str> = labels.into_iter().rev().collect();
                let zone = format!("names-{}", domain.join("-"));
                name_zones
                    .entry(zone.clone())
                    .or_default()
                    .insert(n.clone());
                zone
            }
            _ => f.dst_zone.clone(),
        };
        let by_name = dst_zone != f.dst_zone;
        let g = groups
            .entry((f.src_zone.clone(), dst_zone, f.proto.clone(), f.app.clone()))
            .or_default();
        if f.dport != 0 && (f.proto == "tcp" || f.proto == "udp") {
            g.ports.insert(f.dport);
        }
        g.count += 1;
        if let Some(d) = &f.denied_by {
            g.denied_by.insert(d.clone());
        }
        for (z, ip) in [(&f.src_zone, &f.src_ip), (&f.dst_zone, &f.dst_ip)] {
            if z == "unknown" && !(by_name && std::ptr::eq(z, &f.dst_zone)) {
                if let Some(ip) = ip {
                    g.peers.insert(ip.clone());
                }
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Proposed from {learned} learn-mode flow records; {} rule(s).",
        groups.len()
    );
    let _ = writeln!(out, "# Review each before adding it under spec.rules: learning records what happened, not what should.");
    if groups.is_empty() {
        let _ = writeln!(out, "rules: []");
        return out;
    }
    if !name_zones.is_empty() {
        let _ = writeln!(
            out,
            "# Destinations the pods reached by DNS name: one name zone per domain (add under spec.zones;"
        );
        let _ = writeln!(
            out,
            "# write \"*.DOMAIN\" to allow every name under it). netd learns their addresses from the pods' own answers."
        );
        let _ = writeln!(out, "zones:");
        for (zone, names) in &name_zones {
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            let _ = writeln!(out, "  - name: {zone}");
            let _ = writeln!(out, "    names: [{}]", quoted.join(", "));
        }
    }
    let _ = writeln!(out, "rules:");
    for ((from, to, proto, app), g) in &groups {
        let mut name = format!("learned-{from}-to-{to}-{proto}");
        if let Some(a) = app {
            let _ = write!(name, "-{a}");
        }
        name.truncate(63);
        let _ = writeln!(out, "  - name: {}", name.trim_end_matches('-'));
        if !g.peers.is_empty() {
            let ips: Vec<&str> = g.peers.iter().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "    # peer(s) in no zone: {}; give them a CIDR zone instead of `unknown`",
                ips.join(", ")
            );
        }
        if !g.denied_by.is_empty() {
            let rules: Vec<String> = g.denied_by.iter().map(|r| format!("`{r}`")).collect();
            let _ = writeln!(
                out,
                "    # CAUTION: deny rule {} covers these flows; this allow takes effect only if that rule is narrowed (the policy loader refuses a contradiction)",
                rules.join(", ")
            );
        }
        let _ = writeln!(out, "    from: {from}");
        let _ = writeln!(out, "    to: {to}");
        let proto_word = match proto.as_str() {
            "tcp" | "udp" | "icmp" | "icmpv6" => proto.as_str(),
            _ => "any",
        };
        let _ = writeln!(out, "    protocol: {proto_word}");
        if !g.ports.is_empty() {
            let ports: Vec<String> = g.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(out, "    ports: [{}]", ports.join(", "));
        }
        if let Some(a) = app {
            let _ = writeln!(out, "    app: {a}");
        }
        let _ = writeln!(out, "    # seen {} time(s)", g.count);
    }
    out
}

/// Reads observed flows from audit log files (lines that are not flow records are skipped).
/// A flow between two pods of the node is recorded by both pods' enforcers; it is kept once
/// (same 5-tuple, outcome and app).
pub fn read_flows(paths: &[std::path::PathBuf]) -> std::io::Result<Vec<ObservedFlow>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p)?;
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(f) = ObservedFlow::from_record(&v) {
                    let key = (
                        f.src_ip.clone(),
                        f.sport,
                        f.dst_ip.clone(),
                        f.dport,
                        f.proto.clone(),
                        f.outcome.clone(),
                        f.app.clone(),
                    );
                    // Flows without addresses (link-level denials) are each their own event.
                    if f.src_ip.is_none() || seen.insert(key) {
                        out.push(f);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(from: &str, to: &str, port: u16, app: Option<&str>, rule: Option<&str>) -> ObservedFlow {
        ObservedFlow {
            src_zone: from.into(),
            dst_zone: to.into(),
            src_ip: None,
            dst_ip: Some("198.51.100.9".into()),
            proto: "tcp".into(),
            sport: 40000,
            dport: port,
            app: app.map(str::to_string),
            outcome: "learned".into(),
            rule: rule.map(str::to_string),
            denied_by: None,
            dst_name: None,
        }
    }

    #[test]
    fn destinations_reached_by_name_become_a_name_zone() {
        let mut a = f("api", "unknown", 443, Some("tls"), None);
        a.dst_name = Some("eu.psp.example".into());
        let mut b = f("api", "unknown", 443, Some("tls"), None);
        b.dst_name = Some("us.psp.example".into());
        b.dst_ip = Some("198.51.100.10".into());
        let out = suggest(&[a, b, f("api", "unknown", 22, None, None)]);
        assert!(out.contains("- name: names-psp-example"), "{out}");
        assert!(
            out.contains(r#"names: ["eu.psp.example", "us.psp.example"]"#),
            "{out}"
        );
        assert!(out.contains("to: names-psp-example"), "{out}");
        // The flow without a name still says its peer is in no zone.
        assert!(out.contains("peer(s) in no zone: 198.51.100.9"), "{out}");
        let parsed: serde_json::Value =
            crate::yaml::from_str(&out).expect("suggest's output is YAML");
        assert_eq!(parsed["zones"][0]["names"][1], "us.psp.example");
    }

    #[test]
    fn a_flow_a_deny_rule_covers_is_proposed_with_a_caution() {
        let mut fl = f("web", "cde-db", 2222, Some("postgres"), None);
        fl.denied_by = Some("non-cde-not-to-cde-data".into());
        let out = suggest(&[fl]);
        assert!(out.contains("from: web"), "{out}");
        assert!(
            out.contains("CAUTION: deny rule `non-cde-not-to-cde-data`"),
            "{out}"
        );
    }

    #[test]
    fn the_rule_type_of_a_record_decides_allowed_or_denied_by() {
        let rec = |t: &str| {
            serde_json::json!({"class_uid": 4001, "disposition_id": 17,
                "src_endpoint": {"zone": "web", "ip": "10.0.0.1", "port": 4000},
                "dst_endpoint": {"zone": "db", "ip": "10.0.0.2", "port": 5432},
                "connection_info": {"protocol_name": "tcp"},
                "firewall_rule": {"name": "r", "type": t}})
        };
        let a = ObservedFlow::from_record(&rec("allow")).unwrap();
        assert_eq!(
            (a.rule.as_deref(), a.denied_by.as_deref()),
            (Some("r"), None)
        );
        let d = ObservedFlow::from_record(&rec("deny")).unwrap();
        assert_eq!(
            (d.rule.as_deref(), d.denied_by.as_deref()),
            (None, Some("r"))
        );
    }

    #[test]
    fn groups_ports_per_zone_pair_and_app_and_skips_covered_flows() {
        let out = suggest(&[
            f("web", "api", 8080, Some("http"), None),
            f("web", "api", 8081, Some("http"), None),
            f("api", "db", 5432, Some("postgres"), None),
            f("api", "db", 5432, Some("postgres"), Some("existing")),
        ]);
        assert!(out.contains("ports: [8080, 8081]"), "{out}");
        assert!(out.contains("app: postgres"), "{out}");
        assert!(out.contains("seen 1 time(s)"), "{out}");
        assert!(out.contains("2 rule(s)"), "{out}");
    }
}
