//! OCSF Network Activity (4001) records built from matcher events.
//!
//! Mapping (OCSF 1.1.0, profiles `security_control` and `container`): `action_id` 1/2
//! (allowed/denied), `disposition_id` (1 allowed, 2 blocked, 15 detected for monitor mode,
//! 17 logged for learn mode), `policy` (name, version), `firewall_rule` (the deciding rule),
//! `src_endpoint` / `dst_endpoint` (ip, port, mac, zone, pod), `connection_info` (protocol,
//! direction). What OCSF has no attribute for (namespace, app protocol, reason, mode) is
//! under `unmapped.enclave`.

use crate::identity::PeerDirectory;
use crate::matcher::{Direction, EventKind, Finding, FlowEvent};
use crate::packet::{proto_name, MacAddr};
use crate::policy::{AppProto, CompiledPolicy, OnFinding, WorkloadIdentity, ZoneId};
use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// An OCSF Base Event (class 0, activity Other): the operational records (a writer's start,
/// a policy reload, a recovered torn tail) that share the chain with the flow records.
/// Callers add `unmapped` and whatever else they know.
pub fn base_event(severity_id: u8, severity: &str, message: &str, log_name: &str) -> Value {
    json!({
        "class_uid": 0,
        "class_name": "Base Event",
        "category_uid": 0,
        "category_name": "Uncategorized",
        "activity_id": 99,
        "activity_name": "Other",
        "type_uid": 99,
        "type_name": "Base Event: Other",
        "time": super::now_ms(),
        "severity_id": severity_id,
        "severity": severity,
        "message": message,
        "metadata": {"version": "1.1.0", "product": {"name": "Enclave", "vendor_name": "Enclave"}, "log_name": log_name},
    })
}

/// What a record needs besides the event: names for ids.
#[derive(Debug, Clone)]
pub struct AuditContext {
    /// The policy in force.
    pub policy: Arc<CompiledPolicy>,
    /// Peer identities.
    pub peers: Arc<PeerDirectory>,
    /// The guarded workload.
    pub local: Arc<WorkloadIdentity>,
    /// The workload's IP addresses (to name its own endpoint).
    pub local_ips: Vec<IpAddr>,
    /// Node name.
    pub node: String,
    /// Name of the component writing (`enclave-netd`, `enclavectl demo`).
    pub component: String,
}

/// Builds records for one context.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    cx: AuditContext,
}

impl RecordBuilder {
    /// A builder for `cx`.
    pub fn new(cx: AuditContext) -> Self {
        RecordBuilder { cx }
    }

    /// The context.
    pub fn context(&self) -> &AuditContext {
        &self.cx
    }

    fn endpoint(&self, ip: IpAddr, port: u16, mac: MacAddr, zone: ZoneId) -> Value {
        let p = self.cx.policy.policy();
        let mut m = Map::new();
        if !ip.is_unspecified() {
            m.insert("ip".into(), json!(ip.to_string()));
        }
        if port != 0 {
            m.insert("port".into(), json!(port));
        }
        if mac != MacAddr::default() {
            m.insert("mac".into(), json!(mac.to_string()));
        }
        m.insert("zone".into(), json!(p.zone_name(zone)));
        if let Some(w) = self.who(ip) {
            m.insert("name".into(), json!(w.name));
            m.insert(
                "container".into(),
                json!({"orchestrator": "kubernetes", "name": w.name}),
            );
        }
        Value::Object(m)
    }

    /// The workload at `ip`: the guarded one, or a peer the node knows.
    fn who(&self, ip: IpAddr) -> Option<&WorkloadIdentity> {
        if self.cx.local_ips.contains(&ip) {
            Some(self.cx.local.as_ref())
        } else {
            self.cx.peers.get(ip).map(|p| p.identity.as_ref())
        }
    }

    /// Pod and namespace of an endpoint, for `unmapped.enclave` (OCSF has no namespace).
    fn k8s(&self, ip: IpAddr) -> Value {
        self.who(ip).map_or(
            Value::Null,
            |w| json!({"pod": w.name, "namespace": w.namespace}),
        )
    }

    /// The OCSF record of `ev` at `time_ms` (Unix milliseconds). The log adds the chain.
    pub fn record(&self, ev: &FlowEvent, time_ms: u64) -> Value {
        let p = self.cx.policy.policy();
        let (activity_id, activity) = match (ev.kind, ev.reason) {
            (
                EventKind::Denied,
                crate::matcher::Reason::AppMismatch
                | crate::matcher::Reason::FlowCut
                | crate::matcher::Reason::ThreatDetected
                | crate::matcher::Reason::DataLeak
                | crate::matcher::Reason::RequestDenied,
            ) => (3, "Reset"),
            (EventKind::Denied, _) => (5, "Refuse"),
            _ => (1, "Open"),
        };
        let (action_id, action, disp_id, disp) = match ev.kind {
            EventKind::Allowed => (1, "Allowed", 1, "Allowed"),
            EventKind::Denied => (2, "Denied", 2, "Blocked"),
            EventKind::WouldDeny => (1, "Allowed", 15, "Detected"),
            EventKind::Learned => (1, "Allowed", 17, "Logged"),
        };
        let (severity_id, severity) = match (ev.kind, ev.reason) {
            (EventKind::Denied, r)
                if r.as_str().starts_with("spoofed") || r.as_str().starts_with("rogue") =>
            {
                (4, "High")
            }
            (EventKind::Denied, _) => (3, "Medium"),
            (EventKind::WouldDeny, _) => (2, "Low"),
            _ => (1, "Informational"),
        };
        let rule = ev.rule.and_then(|r| p.rule(r).map(|rule| (r, rule)));
        let required: Vec<&str> = AppProto::ALL
            .iter()
            .filter(|a| ev.app_required & (1 << a.index()) != 0)
            .map(|a| a.as_str())
            .collect();
        let (direction_id, direction) = match ev.dir {
            Direction::Ingress => (1, "Inbound"),
            Direction::Egress => (2, "Outbound"),
        };
        let mut r = json!({
            "category_uid": 4,
            "category_name": "Network Activity",
            "class_uid": 4001,
            "class_name": "Network Activity",
            "activity_id": activity_id,
            "activity_name": activity,
            "type_uid": 400100 + activity_id,
            "type_name": format!("Network Activity: {activity}"),
            "time": time_ms,
            "severity_id": severity_id,
            "severity": severity,
            "status_id": if action_id == 1 { 1 } else { 2 },
            "status": if action_id == 1 { "Success" } else { "Failure" },
            "action_id": action_id,
            "action": action,
            "disposition_id": disp_id,
            "disposition": disp,
            "message": self.message(ev),
            "metadata": {
                "version": "1.1.0",
                "product": {"name": "Enclave", "vendor_name": "Enclave", "version": env!("CARGO_PKG_VERSION")},
                "log_name": self.cx.component,
                "profiles": ["security_control", "container"],
            },
            "device": {"hostname": self.cx.node, "type_id": 6, "type": "Virtual"},
            "src_endpoint": self.endpoint(ev.src, ev.sport, ev.src_mac, ev.src_zone),
            "dst_endpoint": self.endpoint(ev.dst, ev.dport, ev.dst_mac, ev.dst_zone),
            "connection_info": {
                "protocol_num": ev.proto,
                "protocol_name": if ev.proto == 0 { "none" } else { proto_name(ev.proto) },
                "protocol_ver_id": match ev.src { IpAddr::V4(_) if ev.proto != 0 => 4, IpAddr::V6(_) => 6, _ => 0 },
                "direction_id": direction_id,
                "direction": direction,
            },
            "policy": {"name": p.name, "version": p.version, "uid": format!("{}@{}", p.name, p.version)},
            "unmapped": {"enclave": {
                "reason": ev.reason.as_str(),
                "mode": ev.mode.as_str(),
                "workload": {
                    "name": self.cx.local.name,
                    "namespace": self.cx.local.namespace,
                },
                "src": self.k8s(ev.src),
                "dst": self.k8s(ev.dst),
                "app_protocol_required": required,
                "app_protocol_detected": ev.app_detected.map(|a| a.as_str()),
            }},
        });
        if let (Some((id, rule)), Some(obj)) = (rule, r.as_object_mut()) {
            let mut fr = json!({"name": rule.name, "uid": format!("{}/{}", p.name, id.0), "type": rule.action_str()});
            if let (Some(d), Some(o)) = (&rule.description, fr.as_object_mut()) {
                o.insert("desc".into(), json!(d));
            }
            obj.insert("firewall_rule".into(), fr);
        }
        r
    }

    /// The OCSF Detection Finding (class 2004) of an inspection finding at `time_ms`.
    ///
    /// Mapping (OCSF 1.1.0, profile `security_control`): `finding_info` (uid, title, the
    /// threat id in `types`, the analytic that found it), `action_id`/`disposition_id`
    /// (2/2 denied and blocked, or 1/19 allowed and alerted), `evidences[0]` with both
    /// endpoints and the connection, `firewall_rule` (the rule that allowed the flow and
    /// asked for inspection). The masked match (card numbers: first six and last four at
    /// most) is under `unmapped.enclave.data`; no record carries a full PAN.
    pub fn finding(&self, f: &Finding, time_ms: u64) -> Value {
        let p = self.cx.policy.policy();
        let ev = &f.flow;
        let deny = f.action == OnFinding::Deny;
        let (action_id, action, disp_id, disp) = if deny {
            (2, "Denied", 2, "Blocked")
        } else {
            (1, "Allowed", 19, "Alert")
        };
        let (direction_id, direction) = match ev.dir {
            Direction::Ingress => (1, "Inbound"),
            Direction::Egress => (2, "Outbound"),
        };
        let (fz, tz) = (p.zone_name(ev.src_zone), p.zone_name(ev.dst_zone));
        let sender = if f.from_client {
            sock(ev.src, ev.sport)
        } else {
            sock(ev.dst, ev.dport)
        };
        let message = format!(
            "{} {} → {} [{fz} → {tz}]: {} ({}), sent by {sender}; {}",
            if ev.proto == 0 {
                "frame"
            } else {
                proto_name(ev.proto)
            },
            sock(ev.src, ev.sport),
            sock(ev.dst, ev.dport),
            f.threat.id(),
            f.detail,
            if deny {
                "flow cut"
            } else {
                "alert only, the flow goes on"
            }
        );
        let uid = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(format!("{time_ms}|{message}").as_bytes());
            super::hex(&h.finalize()[..16])
        };
        let category = if f.threat.is_dlp() {
            "Data Loss"
        } else {
            "Threat"
        };
        let mut r = json!({
            "category_uid": 2,
            "category_name": "Findings",
            "class_uid": 2004,
            "class_name": "Detection Finding",
            "activity_id": 1,
            "activity_name": "Create",
            "type_uid": 200401,
            "type_name": "Detection Finding: Create",
            "time": time_ms,
            "severity_id": f.threat.severity_id(),
            "severity": f.threat.severity(),
            "status_id": 1,
            "status": "New",
            "action_id": action_id,
            "action": action,
            "disposition_id": disp_id,
            "disposition": disp,
            "message": message,
            "metadata": {
                "version": "1.1.0",
                "product": {"name": "Enclave", "vendor_name": "Enclave", "version": env!("CARGO_PKG_VERSION")},
                "log_name": self.cx.component,
                "profiles": ["security_control", "container"],
            },
            "finding_info": {
                "uid": uid,
                "title": format!("{}: {}", f.threat.id(), f.detail),
                "types": [f.threat.id(), category],
                "analytic": {"name": f.threat.id(), "type_id": 1, "type": "Rule", "uid": f.threat.id()},
            },
            "device": {"hostname": self.cx.node, "type_id": 6, "type": "Virtual"},
            "evidences": [{
                "src_endpoint": self.endpoint(ev.src, ev.sport, ev.src_mac, ev.src_zone),
                "dst_endpoint": self.endpoint(ev.dst, ev.dport, ev.dst_mac, ev.dst_zone),
                "connection_info": {
                    "protocol_num": ev.proto,
                    "protocol_name": if ev.proto == 0 { "none" } else { proto_name(ev.proto) },
                    "direction_id": direction_id,
                    "direction": direction,
                },
            }],
            "policy": {"name": p.name, "version": p.version, "uid": format!("{}@{}", p.name, p.version)},
            "unmapped": {"enclave": {
                "threat": f.threat.id(),
                "action": f.action.as_str(),
                "detail": f.detail,
                "sent_by": if f.from_client { "initiator" } else { "responder" },
                "mode": ev.mode.as_str(),
                "workload": {"name": self.cx.local.name, "namespace": self.cx.local.namespace},
                "src": self.k8s(ev.src),
                "dst": self.k8s(ev.dst),
                "app_protocol_detected": ev.app_detected.map(|a| a.as_str()),
            }},
        });
        if let Some((masked, brand)) = &f.data {
            r["unmapped"]["enclave"]["data"] = json!({"masked": masked, "brand": brand});
        }
        if let Some(rule) = ev.rule.and_then(|id| p.rule(id).map(|r| (id, r))) {
            r["firewall_rule"] = json!({"name": rule.1.name, "uid": format!("{}/{}", p.name, (rule.0).0), "type": rule.1.action_str()});
        }
        r
    }

    /// One sentence for people reading the log.
    pub fn message(&self, ev: &FlowEvent) -> String {
        let p = self.cx.policy.policy();
        let (fz, tz) = (p.zone_name(ev.src_zone), p.zone_name(ev.dst_zone));
        let what = if ev.proto == 0 {
            format!("frame {} → {}", ev.src_mac, ev.dst_mac)
        } else {
            format!(
                "{} {} → {}",
                proto_name(ev.proto),
                sock(ev.src, ev.sport),
                sock(ev.dst, ev.dport)
            )
        };
        let rule = ev
            .rule
            .and_then(|r| p.rule(r))
            .map(|r| format!(" by rule `{}`", r.name))
            .unwrap_or_default();
        let app = ev
            .app_detected
            .map(|a| format!(" ({a})"))
            .unwrap_or_default();
        let why = match (ev.kind, ev.reason.as_str()) {
            (EventKind::Allowed, _) => format!("allowed{rule}{app}"),
            (EventKind::Learned, _) => format!("observed in learn mode{app}"),
            (EventKind::WouldDeny, r) => {
                format!("would be denied ({r}){rule}; passed in monitor mode")
            }
            (EventKind::Denied, "no_rule") => {
                format!("denied: no rule allows zone {fz} to reach zone {tz} on this port")
            }
            (EventKind::Denied, "app_mismatch") => {
                let got = ev
                    .app_detected
                    .map_or("unrecognised".to_string(), |a| a.to_string());
                format!("cut{rule}: payload is {got}, not the required app")
            }
            (EventKind::Denied, "threat") => {
                format!("cut{rule}: inspection found a threat (see the finding record)")
            }
            (EventKind::Denied, "request_denied") => {
                format!("cut{rule}: a request the rule does not allow (see the finding record)")
            }
            (EventKind::Denied, "data_leak") => {
                format!("cut{rule}: inspection found card data or an SSN (see the finding record)")
            }
            (EventKind::Denied, r) => format!("denied ({r}){rule}"),
        };
        format!("{what} [{fz} → {tz}] {why}")
    }
}

fn sock(ip: IpAddr, port: u16) -> String {
    match (ip, port) {
        (ip, 0) => ip.to_string(),
        (IpAddr::V6(a), p) => format!("[{a}]:{p}"),
        (a, p) => format!("{a}:{p}"),
    }
}

impl crate::policy::Rule {
    /// `allow` or `deny`.
    pub fn action_str(&self) -> &'static str {
        match self.action {
            crate::policy::Action::Allow => "allow",
            crate::policy::Action::Deny => "deny",
        }
    }
}
