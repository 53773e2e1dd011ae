//! Reading a policy: YAML → serde document → validated [`Policy`] → [`CompiledPolicy`].

use super::compile::{CompiledPolicy, Finding};
use super::model::*;
use super::span::SpanIndex;
use super::{Diagnostic, LoadedPolicy, PolicyError, Severity};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The largest policy file read: a generated policy of 10,000 rules is about 0.8 MiB.
pub const MAX_POLICY_BYTES: usize = 16 << 20;
/// The deepest nesting of collections a policy may have (the schema needs 5).
pub const MAX_NESTING: usize = 64;
/// The longest message a diagnostic carries; a longer one (a value echoed back) is cut.
pub const MAX_MESSAGE_CHARS: usize = 240;

/// Loads and compiles a policy file.
pub fn load_file(path: impl AsRef<Path>) -> Result<LoadedPolicy, PolicyError> {
    use std::io::Read;
    let path = path.as_ref();
    let read_err = |source| PolicyError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_POLICY_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(read_err)?;
    let file = path.display().to_string();
    let src = match std::str::from_utf8(&bytes) {
        Ok(s) => s,
        Err(e) => {
            let at = e.valid_up_to();
            let pos = pos_of(&bytes[..at]);
            return Err(invalid(
                &file,
                pos,
                format!(
                    "not UTF-8 text: byte offset {at} is not valid UTF-8 (a policy is YAML text)"
                ),
            ));
        }
    };
    load_str(src, &file)
}

/// Line and column (1-based) just after `before`.
fn pos_of(before: &[u8]) -> super::Pos {
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
    super::Pos { line, col }
}

fn invalid(file: &str, pos: super::Pos, message: String) -> PolicyError {
    PolicyError::Invalid {
        diagnostics: vec![Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            pos,
            field: "(document)".into(),
            message,
        }],
    }
}

/// Refuses input whose size or nesting would make the YAML parsers slow or deep before
/// either of them runs: longer than [`MAX_POLICY_BYTES`], or collections nested deeper than
/// [`MAX_NESTING`] (flow `[`/`{` outside quotes and comments, and block nesting by
/// indentation and `- ` markers).
fn check_bounds(src: &str, file: &str) -> Result<(), PolicyError> {
    if src.len() > MAX_POLICY_BYTES {
        return Err(invalid(
            file,
            super::Pos { line: 1, col: 1 },
            format!(
                "the policy is larger than {} MiB; refused before parsing",
                MAX_POLICY_BYTES >> 20
            ),
        ));
    }
    let too_deep = |at: usize| {
        invalid(
            file,
            pos_of(&src.as_bytes()[..at]),
            format!("collections nested deeper than {MAX_NESTING} levels; refused before parsing"),
        )
    };
    let b = src.as_bytes();
    let (mut depth, mut i, mut line_start) = (0usize, 0usize, true);
    while i < b.len() {
        if line_start {
            // Block nesting: indentation and `- ` / `? ` markers at the start of a line.
            let start = i;
            let mut levels = 0usize;
            while i < b.len() {
                match b[i] {
                    b' ' => i += 1,
                    b'-' | b'?' if matches!(b.get(i + 1), None | Some(b' ' | b'\n')) => {
                        levels += 1;
                        i += 1;
                    }
                    _ => break,
                }
            }
            // Two columns of indentation make one level at the least.
            if levels + (i - start - levels) / 2 > MAX_NESTING {
                return Err(too_deep(start));
            }
            line_start = false;
            continue;
        }
        match b[i] {
            b'\n' => line_start = true,
            b'#' if i == 0 || b[i - 1].is_ascii_whitespace() => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if q == b'"' && b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(too_deep(i));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Cuts a message that echoes a long value back.
fn short(mut message: String) -> String {
    if message.chars().count() > MAX_MESSAGE_CHARS {
        let total = message.len();
        let cut: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
        message = format!("{cut}… (message cut; {total} bytes)");
    }
    message
}

/// Loads and compiles policy text; `file` names it in diagnostics.
pub fn load_str(src: &str, file: &str) -> Result<LoadedPolicy, PolicyError> {
    check_bounds(src, file)?;
    let located = |e: crate::yaml::YamlError| PolicyError::Invalid {
        diagnostics: vec![Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            pos: e.pos,
            field: e.field,
            message: short(e.message),
        }],
    };
    // One parser, read once: the value and where each field stands.
    let parsed = crate::yaml::parse(src).map_err(located)?;
    let doc: PolicyDocument = crate::yaml::typed(&parsed).map_err(located)?;
    let mut cx = Ctx {
        file,
        spans: parsed.spans,
        diags: Vec::new(),
    };
    let policy = cx.validate(doc);
    if cx.has_errors() {
        return Err(cx.finish_err());
    }
    let (compiled, findings) = CompiledPolicy::compile(policy);
    for f in findings {
        match f {
            Finding::Contradiction { rule, by } => {
                let (r, b) = (rule_name(&compiled, rule), rule_name(&compiled, by));
                cx.err(
                    format!("spec.rules[{}]", rule.0),
                    format!("allow rule `{r}` can never take effect: every flow it allows is denied by rule `{b}`"),
                );
            }
            Finding::Shadowed { rule, by } => {
                let (r, b) = (rule_name(&compiled, rule), rule_name(&compiled, by));
                cx.warn(
                    format!("spec.rules[{}]", rule.0),
                    format!("rule `{r}` is unreachable: rule `{b}` already decides every flow it covers"),
                );
            }
        }
    }
    if cx.has_errors() {
        return Err(cx.finish_err());
    }
    for limit in crate::nft::limits(compiled.policy()) {
        cx.push(limit.severity, limit.field, limit.message);
    }
    let (notes, warnings) = cx
        .diags
        .into_iter()
        .partition(|d| d.severity == Severity::Note);
    Ok(LoadedPolicy {
        compiled,
        warnings,
        notes,
    })
}

fn rule_name(c: &CompiledPolicy, id: RuleId) -> String {
    c.policy()
        .rule(id)
        .map_or_else(|| format!("#{}", id.0), |r| r.name.clone())
}

struct Ctx<'a> {
    file: &'a str,
    spans: SpanIndex,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn push(&mut self, severity: Severity, field: String, message: String) {
        let pos = self.spans.locate(&field);
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            pos,
            field,
            message: short(message),
        });
    }
    fn err(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(Severity::Error, field.into(), msg.into());
    }
    fn warn(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(Severity::Warning, field.into(), msg.into());
    }
    fn note(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(Severity::Note, field.into(), msg.into());
    }
    /// A note for each pair of zones whose selectors can both hold one pod, with an example
    /// pod and the rule that decides which zone it is in.
    fn overlaps(&mut self, zones: &[Zone]) {
        for (j, b) in zones.iter().enumerate() {
            for a in &zones[..j] {
                let (Some(sa), Some(sb)) = (&a.selector, &b.selector) else {
                    continue;
                };
                if let Some(w) = sa.common_witness(sb) {
                    let show = |m: &std::collections::BTreeMap<String, String>| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let mut pod = if w.namespace.is_empty() {
                        "any namespace".to_string()
                    } else {
                        format!("namespace {}", w.namespace)
                    };
                    if !w.namespace_labels.is_empty() {
                        pod.push_str(&format!(" (labelled {})", show(&w.namespace_labels)));
                    }
                    if !w.labels.is_empty() {
                        pod.push_str(&format!(", labels {}", show(&w.labels)));
                    }
                    if !w.annotations.is_empty() {
                        pod.push_str(&format!(", annotations {}", show(&w.annotations)));
                    }
                    self.note(
                        format!("spec.zones[{j}].selector"),
                        format!(
                            "zones `{}` and `{}` both select a pod in {pod}; it is in `{}`, first in file order (set `{ZONE_ANNOTATION}` to choose)",
                            a.name, b.name, a.name
                        ),
                    );
                }
            }
        }
    }
    fn has_errors(&self) -> bool {
        self.diags.iter().any(|d| d.severity == Severity::Error)
    }
    fn finish_err(mut self) -> PolicyError {
        self.diags
            .sort_by_key(|d| (d.severity, d.pos.line, d.pos.col));
        PolicyError::Invalid {
            diagnostics: self.diags,
        }
    }

    fn validate(&mut self, doc: PolicyDocument) -> Policy {
        if doc.api_version != API_VERSION {
            self.err(
                "apiVersion",
                format!(
                    "unsupported apiVersion `{}`, expected `{API_VERSION}`",
                    doc.api_version
                ),
            );
        }
        if doc.kind != KIND {
            self.err(
                "kind",
                format!("unsupported kind `{}`, expected `{KIND}`", doc.kind),
            );
        }
        if !is_name(&doc.metadata.name) {
            self.err("metadata.name", name_msg(&doc.metadata.name));
        }
        let version = doc.metadata.version.to_string();
        if version.trim().is_empty() {
            self.err(
                "metadata.version",
                "must not be empty; every audit record carries it",
            );
        }
        let default_mode = doc.spec.default_mode;
        let names_ttl = self.names_ttl(doc.spec.names);

        if doc.spec.zones.is_empty() {
            self.err("spec.zones", "at least one zone is required");
        }
        let mut zones = Vec::new();
        let mut seen = HashSet::new();
        let mut cidr_owner: HashMap<Cidr, String> = HashMap::new();
        for (i, z) in doc.spec.zones.into_iter().enumerate() {
            let at = format!("spec.zones[{i}]");
            if z.name == UNKNOWN_ZONE {
                self.err(
                    format!("{at}.name"),
                    "`unknown` is reserved for peers no zone claims",
                );
            } else if !is_name(&z.name) {
                self.err(format!("{at}.name"), name_msg(&z.name));
            } else if !seen.insert(z.name.clone()) {
                self.err(
                    format!("{at}.name"),
                    format!("zone `{}` is defined twice", z.name),
                );
            }
            if let Some(s) = &z.selector {
                if s.is_empty() {
                    self.err(format!("{at}.selector"), "an empty selector would select every workload; give namespaces, a namespaceSelector, matchLabels, matchExpressions or annotations");
                }
                let ns = s.namespace_selector.as_ref();
                let exprs = s
                    .match_expressions
                    .iter()
                    .enumerate()
                    .map(|(k, e)| (format!("{at}.selector.matchExpressions[{k}]"), e))
                    .chain(ns.into_iter().flat_map(|n| {
                        n.match_expressions.iter().enumerate().map(|(k, e)| {
                            (
                                format!("{at}.selector.namespaceSelector.matchExpressions[{k}]"),
                                e,
                            )
                        })
                    }));
                for (field, e) in exprs {
                    if let Some(why) = e.problem() {
                        self.err(field, why);
                    }
                }
            }
            if z.selector.is_none() && z.cidrs.is_empty() && z.names.is_empty() {
                self.err(
                    at.clone(),
                    format!(
                        "zone `{}` selects nothing: give a `selector`, `cidrs`, `names`, or a selector with cidrs",
                        z.name
                    ),
                );
            }
            if z.selector.is_some() && !z.names.is_empty() {
                self.err(
                    format!("{at}.names"),
                    "a zone of workloads (`selector`) cannot also be DNS names: give the names their own zone",
                );
            }
            let names = if z.names.is_empty() {
                Vec::new()
            } else {
                self.name_patterns(&z.names, &format!("{at}.names"))
            };
            let mut cidrs = Vec::new();
            for (j, c) in z.cidrs.iter().enumerate() {
                match Cidr::parse(c) {
                    Ok(c) => {
                        if let Some(other) = cidr_owner.get(&c) {
                            self.err(format!("{at}.cidrs[{j}]"), format!("{c} is already in zone `{other}`; a network belongs to one zone"));
                        } else {
                            cidr_owner.insert(c, z.name.clone());
                        }
                        cidrs.push(c);
                    }
                    Err(m) => self.err(format!("{at}.cidrs[{j}]"), m),
                }
            }
            zones.push(Zone {
                name: z.name,
                description: z.description,
                mode: z.mode.unwrap_or(default_mode),
                scope: z.scope,
                selector: z.selector,
                cidrs,
                names,
                inspect: z.inspect.unwrap_or_default(),
            });
        }

        self.overlaps(&zones);
        let zone_ids: HashMap<&str, ZoneId> = std::iter::once((UNKNOWN_ZONE, ZoneId::UNKNOWN))
            .chain(
                zones
                    .iter()
                    .enumerate()
                    .map(|(i, z)| (z.name.as_str(), ZoneId((i + 1) as u16))),
            )
            .collect();
        let mut rules = Vec::new();
        let mut rule_names = HashSet::new();
        for (i, r) in doc.spec.rules.into_iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            let name = r.name.clone().unwrap_or_else(|| format!("rule-{}", i + 1));
            if !is_name(&name) {
                self.err(format!("{at}.name"), name_msg(&name));
            } else if !rule_names.insert(name.clone()) {
                self.err(
                    format!("{at}.name"),
                    format!("rule name `{name}` is used twice; audit records must name one rule"),
                );
            }
            let from = self.zone_refs(&zone_ids, &r.from, &format!("{at}.from"));
            let to = self.zone_refs(&zone_ids, &r.to, &format!("{at}.to"));
            let ports = self.ports(&r, &at);
            if let Some(app) = r.app {
                if r.action == Action::Deny {
                    self.err(
                        format!("{at}.app"),
                        "a deny rule cannot name an app: it denies the ports whatever the payload",
                    );
                }
                let (tcp, udp) = crate::l7::transports(app);
                let ok = match r.protocol {
                    Protocol::Tcp => tcp,
                    Protocol::Udp => udp,
                    _ => false,
                };
                if !ok {
                    let want = match (tcp, udp) {
                        (true, true) => "tcp or udp",
                        (true, false) => "tcp",
                        _ => "udp",
                    };
                    self.err(
                        format!("{at}.app"),
                        format!(
                            "app `{app}` needs protocol {want}, not `{}`",
                            r.protocol.as_str()
                        ),
                    );
                }
            }
            let requests = self.request_rules(&r, &at);
            let inspect = r.inspect.unwrap_or_default();
            if inspect.any() && r.action == Action::Deny {
                self.err(
                    format!("{at}.inspect"),
                    "a deny rule cannot inspect: the flows it matches are dropped before any byte",
                );
            }
            rules.push(Rule {
                name,
                description: r.description,
                action: r.action,
                from,
                to,
                protocol: r.protocol,
                ports,
                app: r.app,
                inspect,
                requests: std::sync::Arc::new(requests),
                line: self.spans.locate(&at).line,
            });
        }
        let rule_ids: HashMap<&str, RuleId> = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), RuleId(i as u32)))
            .collect();
        let mut responses = Vec::new();
        let mut response_names = HashSet::new();
        for (i, r) in doc.spec.responses.into_iter().enumerate() {
            let at = format!("spec.responses[{i}]");
            if !is_name(&r.name) {
                self.err(format!("{at}.name"), name_msg(&r.name));
            } else if !response_names.insert(r.name.clone()) {
                self.err(
                    format!("{at}.name"),
                    format!("response name `{}` is used twice", r.name),
                );
            }
            let mut zones_of = Vec::new();
            for (j, z) in r.zones.iter().enumerate() {
                match zone_ids.get(z.as_str()) {
                    Some(id) => zones_of.push(*id),
                    None => self.err(format!("{at}.zones[{j}]"), format!("no zone named `{z}`")),
                }
            }
            let mut threats = Vec::new();
            for (j, t) in r.threats.iter().enumerate() {
                match crate::inspect::Threat::ALL.iter().find(|x| x.id() == t) {
                    Some(x) => threats.push(*x),
                    None => self.err(
                        format!("{at}.threats[{j}]"),
                        format!(
                            "unknown threat `{t}`; one of {}",
                            crate::inspect::Threat::ALL
                                .iter()
                                .map(|x| x.id())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
            let min_severity = match r.min_severity.as_deref() {
                None | Some("low") => 2,
                Some("medium") => 3,
                Some("high") => 4,
                Some(o) => {
                    self.err(
                        format!("{at}.minSeverity"),
                        format!("`{o}`: low, medium or high"),
                    );
                    2
                }
            };
            if r.actions.is_empty() {
                self.err(
                    format!("{at}.actions"),
                    "no action: give quarantine, restart or webhook",
                );
            }
            let mut keep = Vec::new();
            for (j, k) in r.keep.iter().enumerate() {
                match rule_ids.get(k.as_str()) {
                    Some(id) => keep.push(*id),
                    None => self.err(format!("{at}.keep[{j}]"), format!("no rule named `{k}`")),
                }
            }
            if !keep.is_empty() && !r.actions.contains(&ResponseAction::Quarantine) {
                self.err(
                    format!("{at}.keep"),
                    "keep applies to quarantine, which this response does not do",
                );
            }
            responses.push(Response {
                name: r.name,
                description: r.description,
                zones: zones_of,
                threats,
                min_severity,
                actions: r.actions,
                keep,
                line: self.spans.locate(&at).line,
            });
        }
        Policy {
            name: doc.metadata.name,
            version,
            description: doc.metadata.description,
            default_mode,
            zones,
            rules,
            responses,
            names_ttl,
        }
    }

    /// `spec.names`: TTL bounds of learned addresses, floor below cap, cap at most a week.
    fn names_ttl(&mut self, doc: Option<NamesTtlDoc>) -> NamesTtl {
        let d = NamesTtl::default();
        let Some(doc) = doc else { return d };
        let t = NamesTtl {
            min: doc.min_ttl_seconds.unwrap_or(d.min),
            max: doc.max_ttl_seconds.unwrap_or(d.max),
        };
        if t.max > 7 * 86_400 {
            self.err(
                "spec.names.maxTtlSeconds",
                format!("{} is more than a week (604800)", t.max),
            );
        }
        if t.min > t.max {
            self.err(
                "spec.names.minTtlSeconds",
                format!("the floor {} is above the cap {}", t.min, t.max),
            );
        }
        t
    }

    fn zone_refs(
        &mut self,
        ids: &HashMap<&str, ZoneId>,
        refs: &OneOrMany,
        at: &str,
    ) -> Vec<ZoneId> {
        let names = refs.names();
        if names.is_empty() {
            self.err(at, "at least one zone is required");
        }
        let many = matches!(refs, OneOrMany::Many(_));
        let mut out = Vec::new();
        for (j, n) in names.into_iter().enumerate() {
            let field = if many {
                format!("{at}[{j}]")
            } else {
                at.to_string()
            };
            match ids.get(n) {
                Some(id) => out.push(*id),
                None => {
                    let hint = closest(n, ids.keys().copied())
                        .map(|c| format!("; did you mean `{c}`?"))
                        .unwrap_or_default();
                    self.err(field, format!("no zone named `{n}`{hint}"));
                }
            }
        }
        out
    }

    /// A rule's `http`, `redis` and `postgres`, checked against its app and action.
    fn request_rules(&mut self, r: &RuleDoc, at: &str) -> RequestRules {
        const METHODS: &[&str] = &[
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ];
        let mut out = RequestRules::default();
        let needs = |app: AppProto, what: &str| -> Option<String> {
            (r.app != Some(app)).then(|| format!("`{what}` rules need `app: {app}` on the rule"))
        };
        if !r.http.is_empty() {
            if let Some(m) = needs(AppProto::Http, "http") {
                self.err(format!("{at}.http"), m);
            }
            for (i, h) in r.http.iter().enumerate() {
                for (j, m) in h.methods.iter().enumerate() {
                    if !METHODS.contains(&m.to_ascii_uppercase().as_str()) {
                        self.err(
                            format!("{at}.http[{i}].methods[{j}]"),
                            format!("`{m}` is not an HTTP method; one of {}", METHODS.join(", ")),
                        );
                    }
                }
                for (j, p) in h.paths.iter().enumerate() {
                    let star_inside = p.trim_end_matches('*').contains('*');
                    if !p.starts_with('/') || star_inside {
                        self.err(
                            format!("{at}.http[{i}].paths[{j}]"),
                            format!("`{p}`: a path starts with `/` and may end with `*` (a prefix), nowhere else"),
                        );
                    }
                }
            }
            out.http = r.http.clone();
        }
        if let Some(rd) = &r.redis {
            if let Some(m) = needs(AppProto::Redis, "redis") {
                self.err(format!("{at}.redis"), m);
            }
            for (j, c) in rd.commands.iter().enumerate() {
                if c.is_empty()
                    || !c
                        .chars()
                        .all(|ch| ch.is_ascii_alphabetic() || ch == '.' || ch == '_')
                {
                    self.err(
                        format!("{at}.redis.commands[{j}]"),
                        format!("`{c}` is not a Redis command name"),
                    );
                }
            }
            if rd.commands.is_empty() {
                self.err(
                    format!("{at}.redis.commands"),
                    "no command: the rule would refuse every one",
                );
            }
            out.redis = Some(rd.commands.iter().map(|c| c.to_ascii_uppercase()).collect());
        }
        if let Some(pg) = &r.postgres {
            if let Some(m) = needs(AppProto::Postgres, "postgres") {
                self.err(format!("{at}.postgres"), m);
            }
            out.postgres = Some(pg.clone());
        }
        if !r.grpc.is_empty() {
            if let Some(m) = needs(AppProto::Grpc, "grpc") {
                self.err(format!("{at}.grpc"), m);
            }
            for (i, g) in r.grpc.iter().enumerate() {
                let ident = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                };
                if !ident(&g.service) || g.service.starts_with('.') || g.service.ends_with('.') {
                    self.err(
                        format!("{at}.grpc[{i}].service"),
                        format!(
                            "`{}` is not a gRPC service name (`package.Service`)",
                            g.service
                        ),
                    );
                }
                for (j, m) in g.methods.iter().enumerate() {
                    if !ident(m) || m.contains('.') {
                        self.err(
                            format!("{at}.grpc[{i}].methods[{j}]"),
                            format!("`{m}` is not a gRPC method name"),
                        );
                    }
                }
            }
            out.grpc = r.grpc.clone();
        }
        if let Some(d) = &r.dns {
            if let Some(m) = needs(AppProto::Dns, "dns") {
                self.err(format!("{at}.dns"), m);
            }
            out.dns = Some(self.name_patterns(&d.names, &format!("{at}.dns.names")));
        }
        if let Some(t) = &r.tls {
            if let Some(m) = needs(AppProto::Tls, "tls") {
                self.err(format!("{at}.tls"), m);
            }
            out.sni = Some(self.name_patterns(&t.sni, &format!("{at}.tls.sni")));
        }
        if out.any() && r.action == Action::Deny {
            self.err(
                at.to_string(),
                "a deny rule cannot allow requests inside a protocol: it denies the whole flow",
            );
        }
        out
    }

    /// DNS name patterns, each checked; lower case.
    fn name_patterns(&mut self, names: &[String], at: &str) -> Vec<String> {
        if names.is_empty() {
            self.err(at.to_string(), "no name: the rule would refuse every one");
        }
        for (j, n) in names.iter().enumerate() {
            if let Err(e) = super::model::check_name_pattern(n) {
                self.err(format!("{at}[{j}]"), e);
            }
        }
        names
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect()
    }

    fn ports(&mut self, r: &RuleDoc, at: &str) -> Vec<PortRange> {
        if r.ports.is_empty() {
            return vec![PortRange::ALL];
        }
        if !r.protocol.has_ports() {
            self.err(
                format!("{at}.ports"),
                format!(
                    "ports need protocol tcp or udp, not `{}`",
                    r.protocol.as_str()
                ),
            );
            return vec![PortRange::ALL];
        }
        let mut out = Vec::new();
        for (j, p) in r.ports.iter().enumerate() {
            let field = format!("{at}.ports[{j}]");
            let parsed = match p {
                PortDoc::Num(n) => port(*n).map(|p| PortRange { lo: p, hi: p }),
                PortDoc::Range(s) => match s.split_once('-') {
                    Some((a, b)) => match (a.trim().parse::<i64>(), b.trim().parse::<i64>()) {
                        (Ok(a), Ok(b)) => match (port(a), port(b)) {
                            (Ok(lo), Ok(hi)) if lo <= hi => Ok(PortRange { lo, hi }),
                            (Ok(lo), Ok(hi)) => {
                                Err(format!("range `{s}` is backwards; write `{hi}-{lo}`"))
                            }
                            (Err(e), _) | (_, Err(e)) => Err(e),
                        },
                        _ => Err(format!(
                            "`{s}` is not a port range; expected \"low-high\" like \"8000-8080\""
                        )),
                    },
                    None => match s.trim().parse::<i64>() {
                        Ok(n) => port(n).map(|p| PortRange { lo: p, hi: p }),
                        Err(_) => Err(format!(
                            "`{s}` is not a port; expected a number 1-65535 or \"low-high\""
                        )),
                    },
                },
            };
            match parsed {
                Ok(p) => out.push(p),
                Err(m) => self.err(field, m),
            }
        }
        out
    }
}

fn port(n: i64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {n} is out of range; expected 1-65535"))
}

/// Lower-case letters, digits and `-`, starting with a letter, at most 63 characters.
fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !s.ends_with('-')
}

fn name_msg(s: &str) -> String {
    format!("`{s}` is not a valid name: use lower-case letters, digits and `-`, starting with a letter, at most 63 characters")
}

/// The candidate nearest to `s` by edit distance, if it is close enough to be a typo.
fn closest<'a>(s: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(s, c), c))
        .filter(|(d, c)| *d <= 1.max(c.len() / 3) && *d < s.len())
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
