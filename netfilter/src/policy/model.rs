//! The zone policy as written (serde) and as validated (plain data, no I/O).

pub use super::selector::Selector;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// The API version this build reads.
pub const API_VERSION: &str = "enclave.io/v1alpha1";
/// The document kind.
pub const KIND: &str = "ZonePolicy";
/// The zone every peer falls into when nothing else claims it. Default deny covers it.
pub const UNKNOWN_ZONE: &str = "unknown";
/// The annotation that assigns a workload to a zone by name.
pub const ZONE_ANNOTATION: &str = "enclave.io/zone";

// ---------------------------------------------------------------------------------------
// As written.

/// A policy file as written. Unknown fields are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyDocument {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Name, version, description.
    pub metadata: MetadataDoc,
    /// Zones and rules.
    pub spec: SpecDoc,
}

/// Policy identity; both name and version go into every audit record.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataDoc {
    /// Policy name.
    pub name: String,
    /// Policy version (string or number).
    pub version: StringOrNumber,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// A scalar that may be written as a number or a string.
#[derive(Debug, Clone)]
pub enum StringOrNumber {
    /// `version: "2026.11"`.
    Str(String),
    /// `version: 3`.
    Int(i64),
    /// `version: 1.2`.
    Float(f64),
}

impl fmt::Display for StringOrNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringOrNumber::Str(s) => f.write_str(s),
            StringOrNumber::Int(i) => write!(f, "{i}"),
            StringOrNumber::Float(x) => write!(f, "{x}"),
        }
    }
}

/// Zones and rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SpecDoc {
    /// Mode of zones that do not set their own, and of the `unknown` zone.
    #[serde(default)]
    pub default_mode: Mode,
    /// The zones.
    pub zones: Vec<ZoneDoc>,
    /// Allow and deny rules; everything not allowed is denied.
    #[serde(default)]
    pub rules: Vec<RuleDoc>,
    /// What happens to a pod that inspection catches sending an attack or card data.
    #[serde(default)]
    pub responses: Vec<ResponseDoc>,
    /// How long an address learned from a DNS answer stays in its name zone.
    #[serde(default)]
    pub names: Option<NamesTtlDoc>,
}

/// The TTL bounds of addresses learned from DNS answers, in seconds.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamesTtlDoc {
    /// Floor: an answer's TTL below this counts as this (clients cache answers longer than
    /// they say). Default 60.
    #[serde(default)]
    pub min_ttl_seconds: Option<u32>,
    /// Cap: an answer's TTL above this counts as this. Default 86,400.
    #[serde(default)]
    pub max_ttl_seconds: Option<u32>,
}

/// The TTL bounds in force (validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamesTtl {
    /// Floor, seconds.
    pub min: u32,
    /// Cap, seconds.
    pub max: u32,
}

impl Default for NamesTtl {
    fn default() -> Self {
        NamesTtl {
            min: 60,
            max: 86_400,
        }
    }
}

/// A response rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResponseDoc {
    /// Name, in audit records.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Zones of the pods it applies to (the pod that sent the bytes); none: every zone.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Threat ids it applies to (`SQL.Injection`, `DLP.CreditCard`, ...); none: all.
    #[serde(default)]
    pub threats: Vec<String>,
    /// The least severity it applies to: `low`, `medium` or `high`.
    #[serde(default)]
    pub min_severity: Option<String>,
    /// `quarantine`, `restart`, `webhook`.
    pub actions: Vec<ResponseAction>,
    /// Rules whose flows a quarantined pod keeps (new and live); none: it keeps nothing.
    #[serde(default)]
    pub keep: Vec<String>,
}

/// What a response does.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ResponseAction {
    /// netd cuts the pod's flows and drops everything but the rules in `keep`; the VM
    /// keeps running for forensics until `enclavectl node quarantine release`.
    Quarantine,
    /// netd records it and exits; the shim stops the pod, and the orchestrator recreates it.
    Restart,
    /// The record is marked for the node's webhook sender (`enclavectl audit webhook`).
    Webhook,
}

impl ResponseAction {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseAction::Quarantine => "quarantine",
            ResponseAction::Restart => "restart",
            ResponseAction::Webhook => "webhook",
        }
    }
}

/// A validated response rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Zones it applies to (empty: all).
    pub zones: Vec<ZoneId>,
    /// Threats it applies to (empty: all).
    pub threats: Vec<crate::inspect::Threat>,
    /// Least OCSF severity id (2 low, 3 medium, 4 high).
    pub min_severity: u8,
    /// Its actions, in the order written.
    pub actions: Vec<ResponseAction>,
    /// Rules a quarantined pod keeps.
    pub keep: Vec<RuleId>,
    /// Line in its file.
    pub line: usize,
}

impl Response {
    /// Whether it applies to `threat` found in bytes a pod of zone `zone` sent.
    pub fn applies(&self, zone: ZoneId, threat: crate::inspect::Threat) -> bool {
        (self.zones.is_empty() || self.zones.contains(&zone))
            && (self.threats.is_empty() || self.threats.contains(&threat))
            && threat.severity_id() >= self.min_severity
    }
}

/// A zone as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneDoc {
    /// Name, referenced by rules.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Mode for workloads in this zone.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Where the zone stands in a PCI DSS assessment (drawn as the CDE boundary).
    #[serde(default)]
    pub scope: Option<Scope>,
    /// Workloads (pods) that belong to the zone.
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Addresses outside the cluster that belong to the zone.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// DNS names (`api.acquirer.example`, `*.psp.example`) whose addresses belong to the
    /// zone, for each pod, once that pod's own DNS answers resolve them.
    #[serde(default)]
    pub names: Vec<String>,
    /// Inspection of every allowed flow into or out of the zone, on top of what each rule
    /// asks (the stricter of the two applies).
    #[serde(default)]
    pub inspect: Option<Inspect>,
}

/// A zone's place in a PCI DSS assessment.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Stores, processes or transmits cardholder data: inside the CDE.
    Cde,
    /// Connected to the CDE or able to affect its security.
    Connected,
    /// Segmented off the CDE.
    OutOfScope,
}

/// A rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Name, used in audit records (default `rule-N`).
    #[serde(default)]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// `allow` (default) or `deny`; deny wins over allow.
    #[serde(default)]
    pub action: Action,
    /// Source zone(s).
    pub from: OneOrMany,
    /// Destination zone(s).
    pub to: OneOrMany,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or `any` (default).
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports: numbers or `"low-high"` ranges; empty means all.
    #[serde(default)]
    pub ports: Vec<PortDoc>,
    /// Application protocol the flow must be detected as.
    #[serde(default)]
    pub app: Option<AppProto>,
    /// Inspection of the allowed flows' bytes.
    #[serde(default)]
    pub inspect: Option<Inspect>,
    /// HTTP requests the rule allows (any of them); others are refused (needs `app: http`).
    #[serde(default)]
    pub http: Vec<HttpRequestsDoc>,
    /// Redis commands the rule allows; others are refused (needs `app: redis`).
    #[serde(default)]
    pub redis: Option<RedisCommandsDoc>,
    /// PostgreSQL databases and users the rule allows (needs `app: postgres`).
    #[serde(default)]
    pub postgres: Option<PostgresDoc>,
    /// gRPC services and methods the rule allows (needs `app: grpc`).
    #[serde(default)]
    pub grpc: Vec<GrpcDoc>,
    /// DNS names the rule lets a pod ask about (needs `app: dns`).
    #[serde(default)]
    pub dns: Option<NamesDoc>,
    /// TLS server names (SNI) the rule allows (needs `app: tls`).
    #[serde(default)]
    pub tls: Option<SniDoc>,
}

/// gRPC calls a rule allows: any method of `service` (none listed), or those listed.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcDoc {
    /// Full service name, `package.Service`.
    pub service: String,
    /// Method names (none: any).
    #[serde(default)]
    pub methods: Vec<String>,
}

/// DNS names a rule allows queries for: exact names, `*.x` (any name under `x`), or `*`.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamesDoc {
    /// Names or patterns.
    pub names: Vec<String>,
}

/// TLS server names a rule allows in the ClientHello's SNI (same patterns as DNS names).
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniDoc {
    /// Server names or patterns.
    pub sni: Vec<String>,
}

/// Whether DNS name `name` matches `pattern`: equal ignoring case and a final dot; `*.x`
/// matches every name under `x` (not `x` itself); `*` matches every name.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let p = pattern.trim_end_matches('.');
    let n = name.trim_end_matches('.');
    if p == "*" {
        return true;
    }
    match p.strip_prefix("*.") {
        Some(base) => {
            n.len() > base.len() + 1
                && n.as_bytes()[n.len() - base.len() - 1] == b'.'
                && n[n.len() - base.len()..].eq_ignore_ascii_case(base)
        }
        None => n.eq_ignore_ascii_case(p),
    }
}

/// Checks a DNS name pattern as written: labels of letters, digits, `-` and `_`, a `*.`
/// prefix at most.
pub fn check_name_pattern(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    let body = p.strip_prefix("*.").unwrap_or(p).trim_end_matches('.');
    let ok = !body.is_empty()
        && body.len() <= 253
        && body.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{p}` is not a DNS name or pattern: labels of letters, digits, `-` and `_`, `*.` only at the start"
        ))
    }
}

/// One kind of HTTP request a rule allows: any of `methods` (none: any), to any of
/// `paths` (exact, or a prefix ending in `*`; none: any), for any of `hosts` (`*.x`
/// wildcards; none: any), carrying every header in `headers`.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestsDoc {
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Headers that must be present.
    #[serde(default)]
    pub headers: Vec<String>,
}

/// The Redis commands a rule allows.
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisCommandsDoc {
    /// Command names (case does not matter).
    pub commands: Vec<String>,
}

/// The PostgreSQL databases and users a rule allows (none: any).
#[derive(Debug, Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresDoc {
    /// Databases.
    #[serde(default)]
    pub databases: Vec<String>,
    /// Users.
    #[serde(default)]
    pub users: Vec<String>,
}

/// What a rule allows inside its protocol, validated: checked on every request of a flow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestRules {
    /// HTTP: any of these (none: no HTTP rule).
    pub http: Vec<HttpRequestsDoc>,
    /// Redis: these commands, upper case.
    pub redis: Option<Vec<String>>,
    /// PostgreSQL: these databases and users.
    pub postgres: Option<PostgresDoc>,
    /// gRPC: any of these (none: no gRPC rule).
    pub grpc: Vec<GrpcDoc>,
    /// DNS: queries only for these names.
    pub dns: Option<Vec<String>>,
    /// TLS: hellos only for these server names.
    pub sni: Option<Vec<String>>,
}

impl RequestRules {
    /// Whether the rule says anything inside its protocol.
    pub fn any(&self) -> bool {
        !self.http.is_empty()
            || self.redis.is_some()
            || self.postgres.is_some()
            || !self.grpc.is_empty()
            || self.dns.is_some()
            || self.sni.is_some()
    }

    /// Whether a gRPC call passes.
    pub fn grpc_allows(&self, service: &str, method: &str) -> bool {
        self.grpc.is_empty()
            || self.grpc.iter().any(|g| {
                g.service == service
                    && (g.methods.is_empty() || g.methods.iter().any(|m| m == method))
            })
    }

    /// Whether a DNS query for `name` passes.
    pub fn dns_allows(&self, name: &str) -> bool {
        self.dns
            .as_ref()
            .map_or(true, |ns| ns.iter().any(|p| name_matches(p, name)))
    }

    /// Whether a TLS hello for server name `sni` (none sent: `None`) passes.
    pub fn sni_allows(&self, sni: Option<&str>) -> bool {
        self.sni.as_ref().map_or(true, |ns| {
            sni.is_some_and(|s| ns.iter().any(|p| name_matches(p, s)))
        })
    }

    /// Whether an HTTP request passes (`headers`: the names the request carries).
    pub fn http_allows(
        &self,
        method: &str,
        path: &str,
        host: Option<&str>,
        headers: &[String],
    ) -> bool {
        if self.http.is_empty() {
            return true;
        }
        let host = host.map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase());
        self.http.iter().any(|r| {
            let method_ok =
                r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
            let path_ok = r.paths.is_empty()
                || r.paths.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => path == p,
                });
            let host_ok = r.hosts.is_empty()
                || host.as_deref().is_some_and(|h| {
                    r.hosts.iter().any(|w| match w.strip_prefix("*.") {
                        Some(base) => h.len() > base.len() + 1 && h.ends_with(&format!(".{base}")),
                        None => h == w.to_ascii_lowercase(),
                    })
                });
            let headers_ok = r
                .headers
                .iter()
                .all(|want| headers.iter().any(|h| h.eq_ignore_ascii_case(want)));
            method_ok && path_ok && host_ok && headers_ok
        })
    }

    /// Whether a Redis command passes.
    pub fn redis_allows(&self, command: &str) -> bool {
        self.redis
            .as_ref()
            .map_or(true, |c| c.iter().any(|x| x.eq_ignore_ascii_case(command)))
    }

    /// Whether a PostgreSQL session for `user` on `database` passes.
    pub fn postgres_allows(&self, user: &str, database: &str) -> bool {
        self.postgres.as_ref().map_or(true, |p| {
            (p.users.is_empty() || p.users.iter().any(|u| u == user))
                && (p.databases.is_empty() || p.databases.iter().any(|d| d == database))
        })
    }
}

/// What a rule asks netd to look for inside the flows it allows, and what to do on a
/// finding. Written `inspect: {threats: deny, dlp: alert}`; a part left out is not
/// inspected.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Inspect {
    /// Attacks: SQL injection, request smuggling, a second protocol, DNS tunneling, TCP
    /// evasions, old TLS.
    #[serde(default)]
    pub threats: Option<OnFinding>,
    /// Card numbers and SSNs in cleartext, in flows between two different zones.
    #[serde(default)]
    pub dlp: Option<OnFinding>,
    /// Which data `dlp` looks at.
    #[serde(default)]
    pub dlp_flows: DlpFlows,
}

/// Which bytes of a flow DLP reads.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum DlpFlows {
    /// Both directions of a flow whose ends are in different zones.
    #[default]
    CrossingZones,
    /// Only what a zone with `scope: cde` sends to a zone without it: card data leaving
    /// the cardholder-data environment (a checkout posting a card number to the CDE is
    /// not a leak; the CDE answering with one is).
    LeavingCde,
}

impl Inspect {
    /// Whether anything is inspected.
    pub fn any(self) -> bool {
        self.threats.is_some() || self.dlp.is_some()
    }

    /// The stricter of two (for a flow that could still be allowed by either rule).
    pub fn merge(self, o: Inspect) -> Inspect {
        let max = |a: Option<OnFinding>, b: Option<OnFinding>| a.max(b);
        Inspect {
            threats: max(self.threats, o.threats),
            dlp: max(self.dlp, o.dlp),
            // Only a side that reads card data has a say; between two that do, reading
            // more is the stricter choice.
            dlp_flows: match (self.dlp, o.dlp) {
                (Some(_), None) => self.dlp_flows,
                (None, Some(_)) => o.dlp_flows,
                _ if self.dlp_flows == o.dlp_flows => self.dlp_flows,
                _ => DlpFlows::CrossingZones,
            },
        }
    }
}

/// What happens on an inspection finding.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum OnFinding {
    /// Record it; the flow goes on.
    Alert,
    /// Record it, drop the frame that carried it and cut the flow.
    Deny,
}

impl OnFinding {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFinding::Alert => "alert",
            OnFinding::Deny => "deny",
        }
    }
}

/// One zone name or a list of them.
#[derive(Debug, Clone)]
pub enum OneOrMany {
    /// `from: web`.
    One(String),
    /// `from: [web, api]`.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// A port as written.
#[derive(Debug, Clone)]
pub enum PortDoc {
    /// `443`.
    Num(i64),
    /// `"8000-8080"`.
    Range(String),
}

// Hand-written visitors, so that a wrong type is reported at the value itself with what
// was expected (serde's untagged enums report the enclosing mapping).

struct Expect<T>(&'static str, std::marker::PhantomData<T>);

macro_rules! visit_scalars {
    ($t:ty, $what:literal, |$v:ident| { str => $s:expr, int => $i:expr, float => $f:expr $(, seq => |$seq:ident| $sq:expr)? }) => {
        impl<'de> serde::de::Visitor<'de> for Expect<$t> {
            type Value = $t;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
            fn visit_str<E: serde::de::Error>(self, $v: &str) -> Result<$t, E> {
                $s
            }
            fn visit_i64<E: serde::de::Error>(self, $v: i64) -> Result<$t, E> {
                $i
            }
            fn visit_u64<E: serde::de::Error>(self, $v: u64) -> Result<$t, E> {
                let $v = i64::try_from($v).unwrap_or(i64::MAX);
                $i
            }
            fn visit_f64<E: serde::de::Error>(self, $v: f64) -> Result<$t, E> {
                $f
            }
            $(
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut $seq: A) -> Result<$t, A::Error> {
                $sq
            }
            )?
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                d.deserialize_any(Expect::<$t>($what, std::marker::PhantomData))
            }
        }
    };
}

visit_scalars!(StringOrNumber, "a string or a number", |v| {
    str => Ok(StringOrNumber::Str(v.to_string())),
    int => Ok(StringOrNumber::Int(v)),
    float => Ok(StringOrNumber::Float(v))
});

visit_scalars!(PortDoc, "a port number or a \"low-high\" range string", |v| {
    str => Ok(PortDoc::Range(v.to_string())),
    int => Ok(PortDoc::Num(v)),
    float => Err(E::custom(format!("{v} is not a whole port number")))
});

visit_scalars!(OneOrMany, "a zone name or a list of zone names", |v| {
    str => Ok(OneOrMany::One(v.to_string())),
    int => Err(E::invalid_type(serde::de::Unexpected::Signed(v), &"a zone name or a list of zone names")),
    float => Err(E::invalid_type(serde::de::Unexpected::Float(v), &"a zone name or a list of zone names")),
    seq => |seq| {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            out.push(s);
        }
        Ok(OneOrMany::Many(out))
    }
});

// ---------------------------------------------------------------------------------------
// Shared enums.

/// What happens to flows of a zone that the policy does not allow.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denied flows are dropped.
    #[default]
    Enforce,
    /// Denied flows pass and are logged as `would deny`.
    Monitor,
    /// Every new flow passes and is recorded, to propose rules.
    Learn,
}

impl Mode {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
            Mode::Learn => "learn",
        }
    }
}

/// Rule action.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Allow matching flows.
    #[default]
    Allow,
    /// Deny matching flows, whatever allows them.
    Deny,
}

/// Transport protocol selector.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6 (beyond the neighbour discovery that anti-spoofing handles).
    Icmpv6,
    /// Any IP protocol.
    #[default]
    Any,
}

impl Protocol {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
            Protocol::Any => "any",
        }
    }

    /// True for protocols with ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// Application protocols detected from payload bytes.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AppProto {
    /// HTTP/1.x requests (and the HTTP/2 prior-knowledge preface).
    Http,
    /// TLS (a ClientHello).
    Tls,
    /// DNS over UDP or TCP.
    Dns,
    /// Redis RESP.
    Redis,
    /// PostgreSQL wire protocol (startup, SSL or GSS request).
    Postgres,
    /// MySQL client/server protocol (server greeting).
    Mysql,
    /// gRPC: HTTP/2 whose first request has `content-type: application/grpc`.
    Grpc,
    /// HTTP/2 with prior knowledge (the connection preface).
    Http2,
    /// SSH (the client's `SSH-2.0-` identification).
    Ssh,
    /// Apache Kafka (a request header with a known API key).
    Kafka,
    /// MongoDB wire protocol (OP_MSG, OP_QUERY or OP_COMPRESSED).
    Mongodb,
    /// Microsoft SQL Server TDS (PRELOGIN, LOGIN7 or a SQL batch).
    Mssql,
    /// Oracle Net TNS (a CONNECT packet).
    Oracle,
    /// Cassandra CQL native protocol (OPTIONS or STARTUP).
    Cassandra,
    /// memcached, text or binary protocol.
    Memcached,
    /// AMQP 0-9-1 or 1.0 (the protocol header).
    Amqp,
    /// MQTT 3.1, 3.1.1 or 5 (a CONNECT packet).
    Mqtt,
    /// NATS (the server's `INFO {` greeting).
    Nats,
    /// Apache ZooKeeper (a ConnectRequest or a four-letter word).
    Zookeeper,
    /// LDAP (a BER LDAPMessage with a request operation).
    Ldap,
    /// SMTP (the server's 220 greeting).
    Smtp,
    /// SIP (a request line ending `SIP/2.0`).
    Sip,
    /// RTSP (a request line ending `RTSP/1.0`).
    Rtsp,
    /// NTP over UDP (a client-mode packet).
    Ntp,
    /// DHCP over UDP (a BOOTREQUEST with the magic cookie).
    Dhcp,
    /// Syslog (`<PRI>` then an RFC 5424 or RFC 3164 header).
    Syslog,
}

impl AppProto {
    /// All of them, in index order (also the order learn mode tries them in: the more
    /// specific first, gRPC before HTTP/2 before HTTP).
    pub const ALL: [AppProto; AppProto::COUNT] = [
        AppProto::Http,
        AppProto::Tls,
        AppProto::Dns,
        AppProto::Redis,
        AppProto::Postgres,
        AppProto::Mysql,
        AppProto::Grpc,
        AppProto::Http2,
        AppProto::Ssh,
        AppProto::Kafka,
        AppProto::Mongodb,
        AppProto::Mssql,
        AppProto::Oracle,
        AppProto::Cassandra,
        AppProto::Memcached,
        AppProto::Amqp,
        AppProto::Mqtt,
        AppProto::Nats,
        AppProto::Zookeeper,
        AppProto::Ldap,
        AppProto::Smtp,
        AppProto::Sip,
        AppProto::Rtsp,
        AppProto::Ntp,
        AppProto::Dhcp,
        AppProto::Syslog,
    ];
    /// Number of variants.
    pub const COUNT: usize = 26;

    /// Dense index, for per-app arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProto::Http => "http",
            AppProto::Tls => "tls",
            AppProto::Dns => "dns",
            AppProto::Redis => "redis",
            AppProto::Postgres => "postgres",
            AppProto::Mysql => "mysql",
            AppProto::Grpc => "grpc",
            AppProto::Http2 => "http2",
            AppProto::Ssh => "ssh",
            AppProto::Kafka => "kafka",
            AppProto::Mongodb => "mongodb",
            AppProto::Mssql => "mssql",
            AppProto::Oracle => "oracle",
            AppProto::Cassandra => "cassandra",
            AppProto::Memcached => "memcached",
            AppProto::Amqp => "amqp",
            AppProto::Mqtt => "mqtt",
            AppProto::Nats => "nats",
            AppProto::Zookeeper => "zookeeper",
            AppProto::Ldap => "ldap",
            AppProto::Smtp => "smtp",
            AppProto::Sip => "sip",
            AppProto::Rtsp => "rtsp",
            AppProto::Ntp => "ntp",
            AppProto::Dhcp => "dhcp",
            AppProto::Syslog => "syslog",
        }
    }

    /// Parses a lower-case name.
    pub fn from_name(s: &str) -> Option<AppProto> {
        AppProto::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for AppProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------
// Validated.

/// Index of a zone: 0 is `unknown`, `i + 1` is `Policy::zones[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ZoneId(pub u16);

impl ZoneId {
    /// The `unknown` zone.
    pub const UNKNOWN: ZoneId = ZoneId(0);
}

/// Index of a rule in `Policy::rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u32);

/// An IP network, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::y/n`; a bare address is a host route. Host bits must be 0.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("prefix length `{l}` is not between 0 and {max}"))?,
        };
        let c = Cidr { addr, len };
        let net = c.network();
        if net != addr {
            return Err(format!(
                "`{s}` has host bits set; the network is {net}/{len}"
            ));
        }
        Ok(c)
    }

    /// The address with host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & v4_mask(self.len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & v6_mask(self.len)).into()),
        }
    }

    /// True when `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & v4_mask(self.len) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & v6_mask(self.len) == u128::from(n),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Netmask of an IPv4 prefix length.
pub fn v4_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// Netmask of an IPv6 prefix length.
pub fn v6_mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

/// An inclusive destination port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A validated zone.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Effective mode.
    pub mode: Mode,
    /// Its PCI DSS scope, when the policy says.
    pub scope: Option<Scope>,
    /// Workload selector.
    pub selector: Option<Selector>,
    /// External networks.
    pub cidrs: Vec<Cidr>,
    /// DNS names and patterns (lower case) whose resolved addresses join the zone, per pod.
    pub names: Vec<String>,
    /// Inspection of every allowed flow into or out of the zone.
    pub inspect: Inspect,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name (given, or `rule-N` with N from 1).
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Allow or deny.
    pub action: Action,
    /// Source zones.
    pub from: Vec<ZoneId>,
    /// Destination zones.
    pub to: Vec<ZoneId>,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination ports (`[PortRange::ALL]` when not given or not applicable).
    pub ports: Vec<PortRange>,
    /// Required application protocol.
    pub app: Option<AppProto>,
    /// Inspection of the allowed flows' bytes.
    pub inspect: Inspect,
    /// What the rule allows inside its protocol.
    pub requests: std::sync::Arc<RequestRules>,
    /// Line of the rule in its source file (0 when built in code).
    pub line: usize,
}

/// A validated policy: pure data, ready to compile.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Free text.
    pub description: Option<String>,
    /// Mode of zones without their own, and of `unknown`.
    pub default_mode: Mode,
    /// Zones; `ZoneId(i + 1)` is `zones[i]`.
    pub zones: Vec<Zone>,
    /// Rules; `RuleId(i)` is `rules[i]`.
    pub rules: Vec<Rule>,
    /// Response rules, in file order (every one that applies acts).
    pub responses: Vec<Response>,
    /// TTL bounds of addresses learned from DNS answers.
    pub names_ttl: NamesTtl,
}

impl Policy {
    /// What netd inspects in a flow from zone `from` to zone `to` that `rule` allows: the
    /// rule's `inspect`, made stricter by either zone's (none without a rule).
    pub fn flow_inspect(&self, rule: Option<RuleId>, from: ZoneId, to: ZoneId) -> Inspect {
        let Some(r) = rule.and_then(|r| self.rules.get(r.0 as usize)) else {
            return Inspect::default();
        };
        let zone = |z: ZoneId| match z.0 {
            0 => Inspect::default(),
            n => self
                .zones
                .get(usize::from(n) - 1)
                .map_or(Inspect::default(), |z| z.inspect),
        };
        r.inspect.merge(zone(from)).merge(zone(to))
    }

    /// The PCI DSS scope of a zone, if the policy gives one (`unknown` has none).
    pub fn zone_scope(&self, id: ZoneId) -> Option<Scope> {
        match id.0 {
            0 => None,
            n => self.zones.get(usize::from(n) - 1).and_then(|z| z.scope),
        }
    }

    /// Which sides of a flow from zone `from` to zone `to` DLP reads under `cfg`:
    /// `[initiator's bytes, responder's bytes]`.
    pub fn dlp_sides(&self, cfg: Inspect, from: ZoneId, to: ZoneId) -> [bool; 2] {
        if cfg.dlp.is_none() || from == to {
            return [false, false];
        }
        match cfg.dlp_flows {
            DlpFlows::CrossingZones => [true, true],
            DlpFlows::LeavingCde => {
                let cde = |z| self.zone_scope(z) == Some(Scope::Cde);
                [cde(from) && !cde(to), cde(to) && !cde(from)]
            }
        }
    }

    /// Name of a zone id.
    pub fn zone_name(&self, id: ZoneId) -> &str {
        match id.0 {
            0 => UNKNOWN_ZONE,
            n => self
                .zones
                .get(usize::from(n) - 1)
                .map_or(UNKNOWN_ZONE, |z| z.name.as_str()),
        }
    }

    /// Id of a zone name (`unknown` included).
    pub fn zone_id(&self, name: &str) -> Option<ZoneId> {
        if name == UNKNOWN_ZONE {
            return Some(ZoneId::UNKNOWN);
        }
        self.zones
            .iter()
            .position(|z| z.name == name)
            .map(|i| ZoneId((i + 1) as u16))
    }

    /// Mode of a zone.
    pub fn zone_mode(&self, id: ZoneId) -> Mode {
        match id.0 {
            0 => self.default_mode,
            n => self
                .zones
                .get(usize::from(n) - 1)
                .map_or(self.default_mode, |z| z.mode),
        }
    }

    /// The zone of a workload: the zone its `enclave.io/zone` annotation (or, without one, its
    /// `enclave.io/zone` label) names (`unknown` when it names none: a mistyped name fails
    /// closed rather than falling into a broader selector's zone); without either, the first
    /// zone (in file order) whose selector matches, else `unknown`.
    pub fn zone_of_workload(&self, w: &WorkloadIdentity) -> ZoneId {
        if let Some(z) = w
            .annotations
            .get(ZONE_ANNOTATION)
            .or_else(|| w.labels.get(ZONE_ANNOTATION))
        {
            return self.zone_id(z).unwrap_or(ZoneId::UNKNOWN);
        }
        self.zones
            .iter()
            .position(|z| z.selector.as_ref().is_some_and(|s| s.matches(w)))
            .map_or(ZoneId::UNKNOWN, |i| ZoneId((i + 1) as u16))
    }

    /// A rule by id.
    pub fn rule(&self, id: RuleId) -> Option<&Rule> {
        self.rules.get(id.0 as usize)
    }
}

/// Who a workload is, as the runtime knows it from the pod sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadIdentity {
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Labels of the pod's namespace (known from the Kubernetes API; empty otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, String>,
}
