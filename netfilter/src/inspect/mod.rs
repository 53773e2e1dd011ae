//! Inspection inside allowed flows: attacks and card data in the bytes of flows a rule
//! asks to inspect (`inspect: {threats: alert|deny, dlp: alert|deny}`).
//!
//! Each inspected TCP flow reassembles both directions ([`stream`]) and hands the bytes,
//! in order and once, to the detectors: the client's requests are framed by protocol
//! (HTTP/1.x, PostgreSQL, MySQL, TLS hellos, line protocols such as Redis) and checked for
//! SQL injection ([`sqli`]), request smuggling and a second protocol inside the agreed
//! one; both directions are scanned for card numbers and SSNs when the flow crosses a zone
//! boundary ([`dlp`]). UDP datagrams are checked one by one (DNS tunneling, DLP). Flows
//! that are not inspected never reach this module: their entry has no inspector and the
//! flow cache decides them as before.

pub mod dlp;
pub mod http;
pub mod proto;
pub mod sqli;
pub mod stream;

use crate::policy::{AppProto, Inspect, RequestRules};
use std::sync::Arc;
use stream::{Budget, HalfStream, Outcome, Refusal};

/// Bytes of one protocol message (a query, a request head, a form body) the inspector
/// assembles; a longer one is skipped by its length (DLP still reads every byte).
pub const MESSAGE_MAX: usize = 64 * 1024;

/// Default budget of held stream bytes per pod (all its inspected flows together).
pub const POD_BUDGET: usize = 16 * 1024 * 1024;

macro_rules! threats {
    ($($(#[$m:meta])* $v:ident => $id:literal, $sev:literal, $dlp:literal,)*) => {
        /// What the inspector detects. Ids follow the names the field uses (NeuVector's
        /// threat names where one exists).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Threat { $($(#[$m])* $v,)* }
        impl Threat {
            /// All of them, in counter order.
            pub const ALL: &'static [Threat] = &[$(Threat::$v,)*];
            /// Number of threats.
            pub const COUNT: usize = Threat::ALL.len();
            /// The threat id in records and metrics.
            pub fn id(self) -> &'static str { match self { $(Threat::$v => $id,)* } }
            /// OCSF severity id (2 low, 3 medium, 4 high).
            pub fn severity_id(self) -> u8 { match self { $(Threat::$v => $sev,)* } }
            /// Whether this is a data-loss finding (decided by `dlp`) or a threat
            /// (decided by `threats`).
            pub fn is_dlp(self) -> bool { match self { $(Threat::$v => $dlp,)* } }
        }
    };
}

threats! {
    /// SQL injection in a query message or in HTTP user input.
    SqlInjection => "SQL.Injection", 4, false,
    /// Conflicting or malformed message framing in an HTTP request head.
    HttpSmuggling => "HTTP.Request.Smuggling", 4, false,
    /// A second protocol inside a flow agreed as another (an HTTP request in Redis).
    ProtocolMismatch => "Protocol.Mismatch", 4, false,
    /// Data tunneled through DNS queries.
    DnsTunneling => "DNS.Tunneling", 3, false,
    /// A TCP SYN carrying data.
    TcpSynData => "TCP.SYN.Data", 2, false,
    /// A SYN answered with a SYN: the split handshake.
    TcpSplitHandshake => "TCP.Split.Handshake", 3, false,
    /// Different bytes sent twice for the same sequence numbers.
    TcpOverlap => "TCP.Overlap.Inconsistent", 4, false,
    /// An IPv4 packet that reassembles past 65,535 bytes.
    PingDeath => "Ping.Death", 3, false,
    /// A TLS client hello offering nothing newer than TLS 1.1.
    TlsVersion => "TLS.Version.Deprecated", 3, false,
    /// An SSL 2.0 or 3.0 hello.
    SslVersion => "SSL.Version.2or3", 4, false,
    /// A payment card number in cleartext.
    CreditCard => "DLP.CreditCard", 4, true,
    /// A US Social Security number in cleartext.
    Ssn => "DLP.SSN", 4, true,
    /// A request the rule does not allow inside its protocol (`http:`, `redis:`,
    /// `postgres:` on the rule): always refused in enforce mode.
    RequestDenied => "Policy.Request", 3, false,
}

impl Threat {
    /// OCSF severity name.
    pub fn severity(self) -> &'static str {
        match self.severity_id() {
            2 => "Low",
            3 => "Medium",
            _ => "High",
        }
    }
}

/// One detection, before the rule's action is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// What.
    pub threat: Threat,
    /// What was seen, for people (never holds a full PAN or SSN).
    pub detail: String,
    /// For DLP: the match, masked, and the card brand.
    pub data: Option<(String, Option<&'static str>)>,
    /// Which side sent it: true for the flow's initiator.
    pub from_client: bool,
}

impl Detected {
    /// A finding with its detail masked (no card number or SSN survives in it).
    pub fn new(threat: Threat, detail: String, from_client: bool) -> Self {
        let mut d = detail.into_bytes();
        dlp::mask_in_place(&mut d);
        Detected {
            threat,
            detail: String::from_utf8_lossy(&d).into_owned(),
            data: None,
            from_client,
        }
    }
}

/// What the inspector made of a segment or datagram.
#[derive(Debug)]
pub enum Step {
    /// Pass it; these were found in it (maybe none).
    Pass(Vec<Detected>),
    /// Drop it: its bytes cannot be checked now (the sender retransmits).
    Refused(Refusal),
}

/// The inspection state of one flow.
#[derive(Debug)]
pub struct FlowInspector {
    /// What the rule asks for.
    pub cfg: Inspect,
    /// DLP reads the initiator's bytes, the responder's.
    dlp_on: [bool; 2],
    halves: [Option<HalfStream>; 2],
    dlp: [dlp::StreamScanner; 2],
    client: Client,
    reported: u32,
    app: Option<AppProto>,
    dport: u16,
    requests: Arc<RequestRules>,
}

impl FlowInspector {
    /// An inspector for a flow under `cfg`; `tcp` for TCP (reassembled); `dlp_sides` says
    /// whose bytes DLP reads (the initiator's, the responder's: see
    /// [`crate::policy::Policy::dlp_sides`]).
    pub fn new(cfg: Inspect, tcp: bool, dlp_sides: [bool; 2], dport: u16, budget: &Budget) -> Self {
        FlowInspector {
            cfg,
            dlp_on: dlp_sides,
            halves: if tcp {
                [
                    Some(HalfStream::new(budget.clone())),
                    Some(HalfStream::new(budget.clone())),
                ]
            } else {
                [None, None]
            },
            dlp: Default::default(),
            client: Client::Start(Vec::new()),
            reported: 0,
            app: None,
            dport,
            requests: Arc::default(),
        }
    }

    /// What the flow's rule allows inside its protocol (checked on every request).
    pub fn set_requests(&mut self, r: Arc<RequestRules>) {
        self.requests = r;
    }

    /// A new configuration (after a policy reload, or once the rule is known);
    /// `dlp_sides` as for [`FlowInspector::new`].
    pub fn set_cfg(&mut self, cfg: Inspect, dlp_sides: [bool; 2]) {
        self.cfg = cfg;
        self.dlp_on = dlp_sides;
    }

    /// The app the flow was detected as (frames the client's messages by it).
    pub fn set_app(&mut self, app: Option<AppProto>) {
        self.app = app.or(self.app);
    }

    /// A SYN of side `client` (true: the initiator's).
    pub fn syn(&mut self, client: bool, isn: u32) {
        if let Some(h) = self.halves[usize::from(!client)].as_mut() {
            h.syn(isn);
        }
    }

    /// A TCP segment from side `client`.
    pub fn segment(&mut self, client: bool, seq: u32, ack: Option<u32>, payload: &[u8]) -> Step {
        let side = usize::from(!client);
        if let (Some(a), Some(other)) = (ack, self.halves[1 - side].as_mut()) {
            other.ack(a);
        }
        let Some(h) = self.halves[side].as_mut() else {
            return Step::Pass(Vec::new());
        };
        match h.segment(seq, payload) {
            Outcome::Refused(r) => Step::Refused(r),
            Outcome::Inconsistent => {
                let d = Detected::new(
                    Threat::TcpOverlap,
                    format!(
                        "{} resent bytes at sequence {seq} that differ from the ones first sent",
                        if client { "the client" } else { "the server" }
                    ),
                    client,
                );
                Step::Pass(self.fresh_findings(vec![d]))
            }
            Outcome::Pass { fresh } => {
                let found = self.bytes(client, &fresh);
                Step::Pass(self.fresh_findings(found))
            }
        }
    }

    /// A UDP datagram from side `client`.
    pub fn datagram(&mut self, client: bool, payload: &[u8]) -> Step {
        let mut found = Vec::new();
        if self.cfg.threats.is_some()
            && client
            && (self.app == Some(AppProto::Dns) || self.dport == 53)
        {
            if let Some(d) = proto::dns_tunnel(payload) {
                found.push(Detected::new(Threat::DnsTunneling, d, client));
            }
        }
        if client && self.requests.dns.is_some() {
            let refused = match proto::dns_query_name(payload) {
                Some(n) if self.requests.dns_allows(&n) => None,
                Some(n) => Some(format!(
                    "a DNS query for `{}` is not one the rule allows",
                    http::excerpt(n.as_bytes(), 120)
                )),
                None => Some("a datagram that is not a DNS query netd can read (the rule allows only some names)".into()),
            };
            if let Some(d) = refused {
                found.push(Detected::new(Threat::RequestDenied, d, client));
            }
        }
        if self.dlp_on[usize::from(!client)] {
            found.extend(dlp_found(dlp::scan(payload, true, true), client));
        }
        // Each query is judged: a refused name is reported every time (the datagram is
        // dropped, the flow goes on for the names the rule allows).
        let requests = found
            .iter()
            .filter(|d| d.threat == Threat::RequestDenied)
            .cloned();
        let again: Vec<Detected> = requests.collect();
        let mut out = self.fresh_findings(found);
        for d in again {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        Step::Pass(out)
    }

    /// Each threat is reported once per flow (a deny cuts the flow at the first).
    fn fresh_findings(&mut self, found: Vec<Detected>) -> Vec<Detected> {
        found
            .into_iter()
            .filter(|d| {
                let bit = 1u32 << (d.threat as u8);
                let new = self.reported & bit == 0;
                self.reported |= bit;
                new
            })
            .collect()
    }

    /// New in-order stream bytes from one side.
    fn bytes(&mut self, client: bool, b: &[u8]) -> Vec<Detected> {
        let mut found = Vec::new();
        if b.is_empty() {
            return found;
        }
        let side = usize::from(!client);
        if self.dlp_on[side] {
            found.extend(dlp_found(self.dlp[side].feed(b), client));
        }
        if client && (self.cfg.threats.is_some() || self.requests.any()) {
            self.client.feed(b, self.app, &self.requests, &mut found);
        }
        found
    }
}

fn dlp_found(m: Vec<dlp::DataMatch>, client: bool) -> impl Iterator<Item = Detected> {
    m.into_iter().map(move |m| {
        let (threat, what) = match m.kind {
            dlp::DataKind::Pan => (
                Threat::CreditCard,
                format!("a {} card number", m.brand.unwrap_or("payment")),
            ),
            dlp::DataKind::Ssn => (Threat::Ssn, "a US Social Security number".to_string()),
        };
        Detected {
            threat,
            detail: format!("{what} in cleartext: {}", m.masked),
            data: Some((m.masked, m.brand)),
            from_client: client,
        }
    })
}

/// The client's side of the stream, framed by its protocol.
#[derive(Debug)]
enum Client {
    /// Not yet known: the first bytes.
    Start(Vec<u8>),
    Http(HttpState),
    Postgres(PgState),
    Mysql(MyState),
    /// TLS: the first record, then nothing (encrypted).
    Tls(Vec<u8>),
    /// Redis: RESP commands (by their lengths) and inline commands.
    Redis(RespState),
    /// HTTP/2 with prior knowledge (gRPC too): each request's header block.
    H2(Box<crate::l7::h2::RequestReader>),
    /// A line protocol (Redis inline, SMTP...) or one not recognised: each line is checked
    /// for an HTTP request.
    Lines(Vec<u8>, &'static str),
    /// Nothing more to read (encrypted, or framing lost).
    Done,
}

impl Client {
    /// The framer can no longer follow the stream (too long a message, encryption, bytes
    /// that are not the protocol): nothing more is read. When the rule allows only some
    /// requests, that is a refusal: a request netd cannot read is not one it allows.
    fn lost(&mut self, rules: &RequestRules, what: &str, found: &mut Vec<Detected>) {
        if rules.any() {
            found.push(Detected::new(
                Threat::RequestDenied,
                format!("netd can no longer read this flow's {what} requests, and the rule allows only some"),
                true,
            ));
        }
        *self = Client::Done;
    }

    fn feed(
        &mut self,
        b: &[u8],
        app: Option<AppProto>,
        rules: &RequestRules,
        found: &mut Vec<Detected>,
    ) {
        if let Client::Start(buf) = self {
            buf.extend_from_slice(b);
            let side = crate::l7::Side::Client;
            let is = |a| crate::l7::detect(a, side, buf, false) == crate::l7::Detection::Match;
            let chosen = match app {
                Some(AppProto::Mysql) => Some(AppProto::Mysql),
                Some(a @ (AppProto::Grpc | AppProto::Http2)) => Some(a),
                _ if buf.starts_with(crate::l7::h2::PREFACE) => Some(AppProto::Http2),
                _ if is(AppProto::Http) => Some(AppProto::Http),
                _ if is(AppProto::Tls) => Some(AppProto::Tls),
                _ if is(AppProto::Postgres) => Some(AppProto::Postgres),
                _ if is(AppProto::Redis) => Some(AppProto::Redis),
                Some(a) => Some(a),
                None if buf.len() >= crate::l7::DETECT_BYTES => None,
                None => return,
            };
            let first = std::mem::take(buf);
            *self = match chosen {
                Some(AppProto::Http) => Client::Http(HttpState::default()),
                Some(AppProto::Tls) => Client::Tls(Vec::new()),
                Some(AppProto::Postgres) => Client::Postgres(PgState::default()),
                Some(AppProto::Mysql) => Client::Mysql(MyState::default()),
                Some(AppProto::Redis) => Client::Redis(RespState::default()),
                Some(AppProto::Grpc | AppProto::Http2) => Client::H2(Box::default()),
                // Text protocols: each line is checked for an HTTP request inside.
                Some(
                    AppProto::Dns
                    | AppProto::Smtp
                    | AppProto::Nats
                    | AppProto::Memcached
                    | AppProto::Sip
                    | AppProto::Rtsp
                    | AppProto::Syslog,
                )
                | None => Client::Lines(Vec::new(), "this"),
                // Binary protocols, or encrypted ones: nothing netd reads further.
                Some(_) => Client::Done,
            };
            return self.feed(&first, app, rules, found);
        }
        match self {
            Client::Http(h) => {
                if h.feed(b, rules, found) {
                    self.lost(rules, "HTTP", found);
                }
            }
            Client::Postgres(p) => {
                if p.feed(b, rules, found) {
                    self.lost(rules, "PostgreSQL", found);
                }
            }
            Client::Redis(r) => {
                if r.feed(b, rules, found) {
                    self.lost(rules, "Redis", found);
                }
            }
            Client::H2(r) => match r.feed(b) {
                Ok(reqs) => {
                    for q in reqs {
                        h2_request(&q, rules, found);
                    }
                }
                Err(e) => {
                    let e = format!("HTTP/2 ({e})");
                    self.lost(rules, &e, found);
                }
            },
            Client::Mysql(m) => {
                if m.feed(b, found) {
                    *self = Client::Done;
                }
            }
            Client::Tls(buf) => {
                buf.extend_from_slice(&b[..b.len().min(MESSAGE_MAX - buf.len().min(MESSAGE_MAX))]);
                let need = buf
                    .get(3..5)
                    .map(|l| 5 + usize::from(u16::from_be_bytes([l[0], l[1]])));
                let sslv2 = buf.first().is_some_and(|c| c & 0x80 != 0);
                if sslv2 || need.is_some_and(|n| buf.len() >= n) || buf.len() >= MESSAGE_MAX {
                    if rules.sni.is_some() {
                        sni_check(buf, rules, found);
                    }
                    if let Some((ssl, detail)) = proto::hello_version(buf) {
                        let t = if ssl {
                            Threat::SslVersion
                        } else {
                            Threat::TlsVersion
                        };
                        found.push(Detected::new(t, detail, true));
                    }
                    *self = Client::Done;
                }
            }
            Client::Lines(carry, what) => {
                let what = *what;
                lines(carry, b, |line| {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    found.extend(http_inside(line, what));
                });
            }
            Client::Start(_) | Client::Done => {}
        }
    }
}

/// Checks one HTTP/2 request against the rule's `grpc` and `http` lists.
fn h2_request(q: &crate::l7::h2::Request, rules: &RequestRules, found: &mut Vec<Detected>) {
    let path = http::target_for_record(&q.path, 100);
    if !rules.grpc.is_empty() {
        let refused = match q.grpc_call().filter(|_| q.is_grpc()) {
            Some((service, method)) if rules.grpc_allows(service, method) => None,
            Some((service, method)) => Some(format!(
                "gRPC call `{}/{}` is not one the rule allows",
                http::excerpt(service.as_bytes(), 80),
                http::excerpt(method.as_bytes(), 60)
            )),
            None => Some(format!(
                "`{} {path}` over HTTP/2 is not a gRPC call",
                q.method
            )),
        };
        if let Some(d) = refused {
            found.push(Detected::new(Threat::RequestDenied, d, true));
            return;
        }
    }
    if !rules.http_allows(&q.method, &q.path, q.authority.as_deref(), &q.headers) {
        found.push(Detected::new(
            Threat::RequestDenied,
            format!(
                "`{} {path}` (HTTP/2) is not a request the rule allows",
                http::excerpt(q.method.as_bytes(), 20)
            ),
            true,
        ));
    }
}

/// Checks a ClientHello's server name against the rule's `tls.sni`.
fn sni_check(hello: &[u8], rules: &RequestRules, found: &mut Vec<Detected>) {
    let detail = match proto::hello_sni(hello) {
        proto::Sni::Name(n) if rules.sni_allows(Some(&n)) => return,
        proto::Sni::Name(n) => format!("TLS server name `{n}` is not one the rule allows"),
        proto::Sni::Absent => {
            "a TLS hello without a server name (the rule allows only some)".into()
        }
        proto::Sni::Invalid => "a TLS hello whose server name is not a DNS name".into(),
        proto::Sni::NotHello => {
            "not a TLS hello netd can read (the rule allows only some server names)".into()
        }
    };
    found.push(Detected::new(Threat::RequestDenied, detail, true));
}

/// A second protocol: `line` (of a `what` flow) is an HTTP request line.
fn http_inside(line: &[u8], what: &str) -> Option<Detected> {
    proto::is_http_request_line(line).then(|| {
        Detected::new(
            Threat::ProtocolMismatch,
            format!(
                "an HTTP request (`{}`) inside {what} flow",
                http::excerpt(line, 80)
            ),
            true,
        )
    })
}

/// Calls `f` on every complete line of `carry` + `b`; keeps the unfinished end (at most
/// 4 KiB: a longer line is checked by its start only).
fn lines(carry: &mut Vec<u8>, b: &[u8], mut f: impl FnMut(&[u8])) {
    const LINE_MAX: usize = 4096;
    let mut rest = b;
    while let Some(nl) = rest.iter().position(|&c| c == b'\n') {
        if carry.is_empty() {
            f(&rest[..nl]);
        } else if carry.len() < LINE_MAX {
            carry.extend_from_slice(&rest[..nl.min(LINE_MAX - carry.len())]);
            f(carry);
            carry.clear();
        } else {
            carry.clear();
        }
        rest = &rest[nl + 1..];
    }
    if carry.len() < LINE_MAX {
        carry.extend_from_slice(&rest[..rest.len().min(LINE_MAX - carry.len())]);
    } else {
        // Past the limit: remember that a line is running, without its bytes.
        carry.truncate(LINE_MAX);
    }
}

#[derive(Debug, Default)]
struct HttpState {
    buf: Vec<u8>,
    phase: HttpPhase,
    requests: u32,
}

#[derive(Debug, Default)]
enum HttpPhase {
    #[default]
    Head,
    Body {
        left: u64,
        kind: http::BodyKind,
    },
    /// Chunked body: skipped to its last chunk (`0\r\n\r\n`); not parsed for injection.
    Chunked,
}

impl HttpState {
    /// True when the stream can no longer be followed.
    fn feed(&mut self, mut b: &[u8], rules: &RequestRules, found: &mut Vec<Detected>) -> bool {
        while !b.is_empty() {
            match &mut self.phase {
                HttpPhase::Head => {
                    let before = self.buf.len();
                    self.buf.extend_from_slice(b);
                    // Only the new bytes (and the three before them) can complete the
                    // blank line: a head trickled in byte by byte costs linear time.
                    let from = before.saturating_sub(3);
                    let Some(end) = find(&self.buf[from..], b"\r\n\r\n").map(|i| from + i + 4)
                    else {
                        if self.buf.len() > MESSAGE_MAX {
                            return true;
                        }
                        return false;
                    };
                    let used = end.saturating_sub(before);
                    b = &b[used.min(b.len())..];
                    let head = std::mem::take(&mut self.buf);
                    let head = &head[..end];
                    let Some(h) = http::head(head) else {
                        let what = if self.requests == 0 {
                            "the first request"
                        } else {
                            "a request"
                        };
                        found.push(Detected::new(
                            Threat::ProtocolMismatch,
                            format!(
                                "{what} on this HTTP flow is not HTTP/1.x: `{}`",
                                http::excerpt(head, 60)
                            ),
                            true,
                        ));
                        return true;
                    };
                    self.requests += 1;
                    if let Some(s) = &h.smuggling {
                        found.push(Detected::new(
                            Threat::HttpSmuggling,
                            format!("{s} in `{}`", h.line),
                            true,
                        ));
                    }
                    if !rules.http_allows(&h.method, &h.path, h.host.as_deref(), &h.header_names) {
                        found.push(Detected::new(
                            Threat::RequestDenied,
                            format!(
                                "`{} {}`{} is not a request the rule allows",
                                h.method,
                                http::target_for_record(&h.path, 80),
                                h.host
                                    .as_deref()
                                    .map(|x| format!(" (host {})", http::excerpt(x.as_bytes(), 60)))
                                    .unwrap_or_default()
                            ),
                            true,
                        ));
                    }
                    if let Some((shape, where_)) = &h.sqli {
                        found.push(Detected::new(
                            Threat::SqlInjection,
                            format!("{} in the {where_} of `{}`", shape.as_str(), h.line),
                            true,
                        ));
                    }
                    self.phase = match h.body {
                        http::Body::None | http::Body::Length(0) => HttpPhase::Head,
                        http::Body::Length(n) => HttpPhase::Body {
                            left: n,
                            kind: h.kind,
                        },
                        http::Body::Chunked => HttpPhase::Chunked,
                    };
                }
                HttpPhase::Body { left, kind } => {
                    let take = (*left).min(b.len() as u64) as usize;
                    if *kind != http::BodyKind::Other && self.buf.len() < MESSAGE_MAX {
                        let room = MESSAGE_MAX - self.buf.len();
                        self.buf.extend_from_slice(&b[..take.min(room)]);
                    }
                    *left -= take as u64;
                    b = &b[take..];
                    if *left == 0 {
                        let body = std::mem::take(&mut self.buf);
                        if let Some((shape, where_)) = http::body(*kind, &body) {
                            found.push(Detected::new(
                                Threat::SqlInjection,
                                format!("{} in a {where_} of a request body", shape.as_str()),
                                true,
                            ));
                        }
                        self.phase = HttpPhase::Head;
                    }
                }
                HttpPhase::Chunked => {
                    let keep = self.buf.len();
                    self.buf.extend_from_slice(b);
                    match find(&self.buf, b"0\r\n\r\n") {
                        Some(i) => {
                            let used = (i + 5).saturating_sub(keep);
                            b = &b[used.min(b.len())..];
                            self.buf.clear();
                            self.phase = HttpPhase::Head;
                        }
                        None => {
                            let n = self.buf.len();
                            self.buf.drain(..n.saturating_sub(4));
                            b = &[];
                        }
                    }
                }
            }
        }
        false
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Length-framed messages assembled out of a stream: the bytes so far, and how much of a
/// message too long to keep is still to be skipped.
#[derive(Debug, Default)]
struct Frames {
    buf: Vec<u8>,
    skip: u64,
}

impl Frames {
    /// The next piece of the stream, less what is being skipped.
    fn push(&mut self, b: &[u8]) {
        let n = self.skip.min(b.len() as u64) as usize;
        self.skip -= n as u64;
        self.buf.extend_from_slice(&b[n..]);
    }

    /// Passes over a message of `total` bytes (those not here yet too): one longer than
    /// [`MESSAGE_MAX`] is not kept.
    fn skip_message(&mut self, total: usize) {
        let here = self.buf.len().min(total);
        self.skip = (total - here) as u64;
        self.buf.drain(..here);
    }
}

/// A SQL injection finding for query text `q` of `dialect`, if it has one.
fn query_finding(q: &[u8], dialect: &str, found: &mut Vec<Detected>) {
    if let Some(hit) = sqli::in_query(q) {
        found.push(Detected::new(
            Threat::SqlInjection,
            format!(
                "{} in a {dialect} query: `{}`",
                hit.shape.as_str(),
                http::excerpt(q, 120)
            ),
            true,
        ));
    }
}

/// Redis client commands: RESP arrays of bulk strings, read by their lengths (so binary
/// arguments cannot shift the framing), and inline commands (a line of words). Each
/// command's name is checked against the rule; an inline line that is an HTTP request is a
/// second protocol.
#[derive(Debug, Default)]
struct RespState {
    f: Frames,
    /// Elements of the current array still to read, and whether the next is its first.
    left: u64,
    first: bool,
    commands: u32,
}

impl RespState {
    /// The line at the start of the buffer (without CRLF) and its length with it, if whole.
    fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
        let nl = buf.iter().position(|&c| c == b'\n')?;
        let l = &buf[..nl];
        Some((l.strip_suffix(b"\r").unwrap_or(l), nl + 1))
    }

    fn command(&mut self, name: &[u8], rules: &RequestRules, found: &mut Vec<Detected>) {
        self.commands += 1;
        let name = String::from_utf8_lossy(name);
        if !rules.redis_allows(&name) {
            found.push(Detected::new(
                Threat::RequestDenied,
                format!(
                    "Redis command `{}` is not one the rule allows",
                    http::excerpt(name.as_bytes(), 40)
                ),
                true,
            ));
        }
    }

    fn feed(&mut self, b: &[u8], rules: &RequestRules, found: &mut Vec<Detected>) -> bool {
        const LINE_MAX: usize = 64 * 1024;
        self.f.push(b);
        loop {
            let buf = &self.f.buf;
            if self.left == 0 {
                let Some((line, n)) = Self::line(buf) else {
                    return buf.len() > LINE_MAX;
                };
                if let Some(count) = line.strip_prefix(b"*") {
                    let Some(count) = std::str::from_utf8(count)
                        .ok()
                        .and_then(|c| c.parse::<u64>().ok())
                    else {
                        found.push(Detected::new(
                            Threat::ProtocolMismatch,
                            format!(
                                "a RESP array header that is not a count: `{}`",
                                http::excerpt(line, 40)
                            ),
                            true,
                        ));
                        return true;
                    };
                    (self.left, self.first) = (count, true);
                } else if !line.is_empty() {
                    // Inline command.
                    found.extend(http_inside(line, "redis"));
                    let name = line.split(|&c| c == b' ').next().unwrap_or(line).to_vec();
                    self.command(&name, rules, found);
                }
                self.f.buf.drain(..n);
                continue;
            }
            // An element: `$len` then len bytes and CRLF.
            let Some((line, n)) = Self::line(buf) else {
                return buf.len() > LINE_MAX;
            };
            let len = line
                .strip_prefix(b"$")
                .and_then(|l| std::str::from_utf8(l).ok()?.parse::<u64>().ok());
            let Some(len) = len else {
                found.push(Detected::new(
                    Threat::ProtocolMismatch,
                    format!(
                        "a RESP element that is not a bulk string: `{}`",
                        http::excerpt(line, 40)
                    ),
                    true,
                ));
                return true;
            };
            // Redis itself refuses a bulk string over 512 MiB; a larger length (up to
            // u64::MAX, which once overflowed this sum) is not a stream to follow.
            if len > 512 << 20 {
                found.push(Detected::new(
                    Threat::ProtocolMismatch,
                    format!("a RESP bulk string of {len} bytes (Redis allows 512 MiB)"),
                    true,
                ));
                return true;
            }
            let total = n as u64 + len + 2;
            if self.first {
                // The command name: short, kept whole (no command has a longer one).
                if len > 64 {
                    self.command(b"(a name over 64 bytes)", rules, found);
                    return true;
                }
                if total as usize > buf.len() {
                    return false;
                }
                let name = buf[n..n + len as usize].to_vec();
                self.f.buf.drain(..total as usize);
                self.command(&name, rules, found);
                self.first = false;
            } else {
                let total = usize::try_from(total).unwrap_or(usize::MAX);
                self.f.skip_message(total);
            }
            self.left -= 1;
        }
    }
}

/// PostgreSQL frontend messages.
#[derive(Debug, Default)]
struct PgState {
    f: Frames,
    started: bool,
}

impl PgState {
    fn feed(&mut self, b: &[u8], rules: &RequestRules, found: &mut Vec<Detected>) -> bool {
        self.f.push(b);
        loop {
            let buf = &self.f.buf;
            if !self.started {
                // Untyped: length, then the protocol code.
                if buf.first() == Some(&0x16) {
                    return true; // TLS after an SSLRequest
                }
                let Some(l) = buf.get(..8) else {
                    return false;
                };
                let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
                let code = u32::from_be_bytes([l[4], l[5], l[6], l[7]]);
                if !(8..=10_000).contains(&len) {
                    found.push(self.violation("a startup message of impossible length"));
                    return true;
                }
                if buf.len() < len {
                    return false;
                }
                match code {
                    80877103 | 80877104 => {} // SSL or GSS request: startup follows
                    196608 => {
                        // Protocol 3.0: key\0value\0 pairs; the database defaults to the user.
                        self.started = true;
                        let mut kv = buf[8..len].split(|&c| c == 0);
                        let (mut user, mut db) = (String::new(), None);
                        while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                            match k {
                                b"user" => user = String::from_utf8_lossy(v).into_owned(),
                                b"database" => db = Some(String::from_utf8_lossy(v).into_owned()),
                                _ => {}
                            }
                        }
                        let db = db.unwrap_or_else(|| user.clone());
                        if !rules.postgres_allows(&user, &db) {
                            found.push(Detected::new(
                                Threat::RequestDenied,
                                format!(
                                    "a PostgreSQL session as user `{}` on database `{}` is not one the rule allows",
                                    http::excerpt(user.as_bytes(), 60),
                                    http::excerpt(db.as_bytes(), 60)
                                ),
                                true,
                            ));
                        }
                    }
                    _ => return true, // cancel request, or unknown
                }
                self.f.buf.drain(..len);
                continue;
            }
            let Some(h) = buf.get(..5) else {
                return false;
            };
            let ty = h[0];
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
            if !b"BCdcfDEHFpPQSX".contains(&ty) || !(4..=(1 << 30)).contains(&len) {
                found.push(self.violation("a message that is not PostgreSQL's"));
                return true;
            }
            let total = 1 + len;
            if total > MESSAGE_MAX {
                self.f.skip_message(total);
                continue;
            }
            if buf.len() < total {
                return false;
            }
            let body = &buf[5..total];
            let query = match ty {
                b'Q' => Some(cstr(body)),
                b'P' => {
                    let name = cstr(body);
                    body.get(name.len() + 1..).map(cstr)
                }
                _ => None,
            };
            if let Some(q) = query {
                query_finding(q, "PostgreSQL", found);
            }
            self.f.buf.drain(..total);
        }
    }

    fn violation(&self, what: &str) -> Detected {
        let start = &self.f.buf[..self.f.buf.len().min(80)];
        let line = start.split(|&c| c == b'\n').next().unwrap_or(start);
        let http = if proto::is_http_request_line(line) {
            " (an HTTP request)"
        } else {
            ""
        };
        Detected::new(
            Threat::ProtocolMismatch,
            format!(
                "{what}{http} inside a postgres flow: `{}`",
                http::excerpt(start, 60)
            ),
            true,
        )
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// MySQL client packets.
#[derive(Debug, Default)]
struct MyState {
    f: Frames,
    packets: u32,
}

impl MyState {
    fn feed(&mut self, b: &[u8], found: &mut Vec<Detected>) -> bool {
        self.f.push(b);
        loop {
            let buf = &self.f.buf;
            let Some(h) = buf.get(..4) else {
                return false;
            };
            let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
            let seq = h[3];
            let total = 4 + len;
            if self.packets == 0 && len == 32 {
                return true; // an SSL request: TLS follows
            }
            if total > MESSAGE_MAX {
                self.f.skip_message(total);
                self.packets += 1;
                continue;
            }
            if buf.len() < total {
                return false;
            }
            self.packets += 1;
            let p = &buf[4..total];
            if self.packets > 1 && seq == 0 && matches!(p.first(), Some(0x03 | 0x16)) {
                query_finding(&p[1..], "MySQL", found);
            }
            self.f.buf.drain(..total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::OnFinding;

    fn inspector(cfg: Inspect) -> FlowInspector {
        let mut f = FlowInspector::new(cfg, true, [true, true], 0, &Budget::new(1 << 20));
        f.syn(true, 0);
        f.syn(false, 1000);
        f
    }

    fn ids(s: Step) -> Vec<&'static str> {
        match s {
            Step::Pass(v) => v.iter().map(|d| d.threat.id()).collect(),
            Step::Refused(r) => vec![r.as_str()],
        }
    }

    const BOTH: Inspect = Inspect {
        threats: Some(OnFinding::Deny),
        dlp: Some(OnFinding::Deny),
        dlp_flows: crate::policy::DlpFlows::CrossingZones,
    };

    #[test]
    fn redis_then_http_on_one_connection_is_a_second_protocol() {
        let mut f = inspector(BOTH);
        f.set_app(Some(AppProto::Redis));
        assert!(ids(f.segment(true, 1, None, b"PING\r\n")).is_empty());
        let got = ids(f.segment(true, 7, None, b"GET / HTTP/1.1\r\nHost: db\r\n\r\n"));
        assert_eq!(got, ["Protocol.Mismatch"]);
    }

    #[test]
    fn a_pattern_split_across_segments_is_seen() {
        let mut f = inspector(BOTH);
        let req = b"GET /search?q=x%27%20OR%20%271%27%3D%271 HTTP/1.1\r\nHost: a\r\n\r\n";
        let (a, b) = req.split_at(20);
        // The second half first (out of order), then the first.
        assert!(ids(f.segment(true, 1 + a.len() as u32, None, b)).is_empty());
        assert_eq!(ids(f.segment(true, 1, None, a)), ["SQL.Injection"]);
    }

    #[test]
    fn an_http_head_trickled_in_byte_by_byte_is_read_whole() {
        let mut f = inspector(BOTH);
        let req =
            b"GET /a HTTP/1.1\r\n\r\nGET /?q=1%20UNION%20SELECT%20pan HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut got = Vec::new();
        for (i, c) in req.iter().enumerate() {
            got.extend(ids(f.segment(true, 1 + i as u32, None, &[*c])));
        }
        assert_eq!(got, ["SQL.Injection"]);
    }

    #[test]
    fn postgres_queries_are_framed_and_checked() {
        let mut f = inspector(BOTH);
        let mut s = Vec::new();
        let params = b"user\0app\0database\0shop\0\0";
        s.extend_from_slice(&((params.len() + 8) as u32).to_be_bytes());
        s.extend_from_slice(b"\0\x03\0\0");
        s.extend_from_slice(params);
        let q = b"SELECT * FROM cards WHERE owner = '' OR '1'='1'\0";
        s.push(b'Q');
        s.extend_from_slice(&((q.len() + 4) as u32).to_be_bytes());
        s.extend_from_slice(q);
        // Byte by byte: framing survives any segmentation.
        let mut got = Vec::new();
        for (i, c) in s.iter().enumerate() {
            got.extend(ids(f.segment(true, 1 + i as u32, None, &[*c])));
        }
        assert_eq!(got, ["SQL.Injection"]);
    }

    #[test]
    fn card_numbers_in_a_response_and_ssns_are_found_masked() {
        let mut f = inspector(BOTH);
        match f.segment(
            false,
            1001,
            None,
            b"HTTP/1.1 200 OK\r\n\r\n{\"pan\":\"4111 1111 1111 1111\"}",
        ) {
            Step::Pass(v) => {
                assert_eq!(v.len(), 1);
                assert_eq!(v[0].threat, Threat::CreditCard);
                assert!(!v[0].from_client);
                assert!(v[0].detail.contains("411111******1111"), "{}", v[0].detail);
                assert!(!v[0].detail.contains("4111 1111 1111 1111"));
            }
            other => panic!("{other:?}"),
        }
        // Inside one zone, DLP does not look.
        let mut same = FlowInspector::new(BOTH, true, [false, false], 0, &Budget::new(1 << 20));
        same.syn(true, 0);
        assert!(ids(same.segment(true, 1, None, b"4111111111111111\n")).is_empty());
    }

    #[test]
    fn smuggling_and_a_non_http_second_request() {
        let mut f = inspector(BOTH);
        let got = ids(f.segment(
            true,
            1,
            None,
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ));
        assert_eq!(got, ["HTTP.Request.Smuggling"]);
        let mut g = inspector(BOTH);
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert!(ids(g.segment(true, 1, None, first)).is_empty());
        assert_eq!(
            ids(g.segment(
                true,
                1 + first.len() as u32,
                None,
                b"\x16\x03\x01garbage\r\n\r\n"
            )),
            ["Protocol.Mismatch"]
        );
    }

    #[test]
    fn resent_bytes_that_differ_are_an_evasion() {
        let mut f = inspector(BOTH);
        assert!(ids(f.segment(true, 1, None, b"PING\r\n")).is_empty());
        assert_eq!(
            ids(f.segment(true, 1, None, b"QUIT\r\n")),
            ["TCP.Overlap.Inconsistent"]
        );
    }

    #[test]
    fn dns_tunnels_in_datagrams() {
        let cfg = Inspect {
            threats: Some(OnFinding::Alert),
            ..Inspect::default()
        };
        let mut f = FlowInspector::new(cfg, false, [false, false], 53, &Budget::new(1 << 20));
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 55];
        m.extend_from_slice(&[b'a'; 55]);
        m.extend_from_slice(b"\x01t\x07example\x00\x00\x10\x00\x01");
        assert_eq!(ids(f.datagram(true, &m)), ["DNS.Tunneling"]);
    }
}
