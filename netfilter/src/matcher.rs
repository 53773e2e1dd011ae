//! The per-frame decision for one workload: what `enclave-netd` asks of every frame.
//!
//! [`Enforcer::decide`] takes a whole Ethernet frame to or from the workload and returns
//! pass or drop, a reason, and (for decisions worth keeping) a [`FlowEvent`] for the audit
//! log. In order: parse (total), link checks (VLAN tags, MAC anti-spoofing), ARP / NDP /
//! DHCP by their own rules, IP anti-spoofing, fragments, connection tracking, and for new
//! flows the zone policy with L7 detection and the zone's mode.
//!
//! The caller passes the time, so the fast path makes no syscalls; it allocates nothing.
//! The frame is the caller's private copy: guest memory must not be read twice.

use crate::conntrack::{
    addr128, addr_from128, Admission, FlowEntry, FlowKey, FlowTable, FragKey, FragTable, L7Pending,
    TableStats, TcpState, Timeouts,
};
use crate::identity::PeerDirectory;
use crate::inspect::stream::Budget;
use crate::inspect::{Detected, FlowInspector, Step as InspectStep, Threat};
use crate::l7::{self, Detection, Side, DETECT_BYTES};
use crate::packet::{
    proto, ArpPacket, EthernetHeader, Frame, IcmpMessage, IpPacket, MacAddr, Net, TcpFlags,
    ARP_REPLY, ARP_REQUEST, L4,
};
use crate::policy::{
    AppProto, CompiledPolicy, Inspect, Lookup, Mode, OnFinding, ResponseAction, RuleId,
    WorkloadIdentity, ZoneId,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// Which way a frame travels, seen from the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the workload (guest → network).
    Egress,
    /// To the workload (network → guest).
    Ingress,
}

/// Pass or drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the frame.
    Pass,
    /// Drop it.
    Drop,
}

macro_rules! reasons {
    ($($(#[$m:meta])* $v:ident => $s:literal,)*) => {
        /// Why a frame got its verdict. Every reason has a counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Reason { $($(#[$m])* $v,)* }
        impl Reason {
            /// All reasons, in counter order.
            pub const ALL: &'static [Reason] = &[$(Reason::$v,)*];
            /// Number of reasons.
            pub const COUNT: usize = Reason::ALL.len();
            /// Stable snake-case name (audit records, metrics).
            pub fn as_str(self) -> &'static str { match self { $(Reason::$v => $s,)* } }
        }
    };
}

reasons! {
    /// Part of a tracked flow.
    Established => "established",
    /// A new flow a rule allows.
    NewFlowAllowed => "new_flow_allowed",
    /// A new flow whose app is still being detected.
    AppPending => "app_pending",
    /// Passed in monitor mode although the policy denies it.
    Monitored => "monitored",
    /// Passed in learn mode.
    Learned => "learned",
    /// ICMP error about a tracked flow.
    Related => "related",
    /// ARP that passed the anti-spoofing checks.
    Arp => "arp",
    /// Neighbour discovery that passed the checks.
    Ndp => "ndp",
    /// DHCP client traffic.
    Dhcp => "dhcp",
    /// Later fragment of an allowed packet.
    Fragment => "fragment",
    /// Not a parsable frame.
    Malformed => "malformed",
    /// VLAN-tagged frame (a workload has no business tagging).
    VlanTagged => "vlan_tagged",
    /// Source MAC is not the workload's.
    SpoofedMac => "spoofed_mac",
    /// Source IP is not the workload's.
    SpoofedIp => "spoofed_ip",
    /// Not addressed to the workload.
    NotForWorkload => "not_for_workload",
    /// ARP with a forged sender, or an unsupported operation.
    BadArp => "bad_arp",
    /// Router advertisement or redirect from the workload.
    RogueRouter => "rogue_router",
    /// DHCP server traffic from the workload.
    RogueDhcp => "rogue_dhcp",
    /// Neither IP nor ARP.
    UnsupportedEthertype => "unsupported_ethertype",
    /// IPv4 source route option or IPv6 type 0 routing header.
    SourceRouted => "source_routed",
    /// Fragment of a packet whose first fragment was not allowed (or not seen).
    FragmentUnknown => "fragment_unknown",
    /// Fragment that could overwrite the transport header.
    FragmentOverlap => "fragment_overlap",
    /// TCP segment that is not a SYN and has no flow, or does not fit the flow's state.
    TcpInvalid => "tcp_invalid",
    /// ICMP error about no tracked flow.
    UnrelatedIcmpError => "unrelated_icmp_error",
    /// No rule allows the flow (default deny).
    NoRule => "no_rule",
    /// A deny rule matches.
    DenyRule => "deny_rule",
    /// The payload is not the app the rule requires.
    AppMismatch => "app_mismatch",
    /// The flow was cut earlier (app mismatch or a reload).
    FlowCut => "flow_cut",
    /// Out-of-order or altered payload while the app is being detected.
    AppReorder => "app_reorder",
    /// Inspection found a threat and the rule says deny: the flow is cut.
    ThreatDetected => "threat",
    /// Inspection found card data or an SSN and the rule says deny: the flow is cut.
    DataLeak => "data_leak",
    /// A segment of an inspected flow that cannot be checked now (beyond the window, over
    /// the pod's inspection budget): dropped, and the sender retransmits it.
    InspectHeld => "inspect_held",
    /// The pod is quarantined by a response rule: only the rules it keeps pass.
    Quarantined => "quarantined",
    /// A request the rule does not allow inside its protocol: the flow is cut.
    RequestDenied => "request_denied",
}

impl Reason {
    /// The verdict that goes with this reason.
    pub fn verdict(self) -> Verdict {
        match self {
            Reason::Established
            | Reason::NewFlowAllowed
            | Reason::AppPending
            | Reason::Monitored
            | Reason::Learned
            | Reason::Related
            | Reason::Arp
            | Reason::Ndp
            | Reason::Dhcp
            | Reason::Fragment => Verdict::Pass,
            _ => Verdict::Drop,
        }
    }
}

/// What kind of decision an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A new flow was allowed (with its app, if the rule required one).
    Allowed,
    /// A frame or flow was denied.
    Denied,
    /// Monitor mode: the policy would deny this, and it passed.
    WouldDeny,
    /// Learn mode: a flow was observed.
    Learned,
}

/// A decision worth an audit record. Plain data; names are resolved when it is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowEvent {
    /// What happened.
    pub kind: EventKind,
    /// Why.
    pub reason: Reason,
    /// Direction seen from the workload.
    pub dir: Direction,
    /// IP protocol (0 for non-IP frames).
    pub proto: u8,
    /// Source MAC.
    pub src_mac: MacAddr,
    /// Destination MAC.
    pub dst_mac: MacAddr,
    /// Source address (unspecified for non-IP frames).
    pub src: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// Zone of the source.
    pub src_zone: ZoneId,
    /// Zone of the destination.
    pub dst_zone: ZoneId,
    /// The rule that decided, if any.
    pub rule: Option<RuleId>,
    /// Apps a rule required (bit per [`AppProto::index`]).
    pub app_required: u32,
    /// App detected from the payload.
    pub app_detected: Option<AppProto>,
    /// Mode of the workload's zone.
    pub mode: Mode,
}

/// An inspection finding, with what was done about it. Findings are rare: they carry
/// strings, and wait in the enforcer until the caller takes them
/// ([`Enforcer::take_findings`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// What was found.
    pub threat: Threat,
    /// What the rule said to do (`deny` cut the flow).
    pub action: OnFinding,
    /// What was seen, masked.
    pub detail: String,
    /// For DLP: the match masked, and the card brand.
    pub data: Option<(String, Option<&'static str>)>,
    /// True when the flow's initiator sent it.
    pub from_client: bool,
    /// The flow, as its initiator opened it (zones, rule, app).
    pub flow: FlowEvent,
}

/// A response rule that applies to a finding about bytes this pod sent: the caller
/// records it and carries out what the enforcer cannot (a restart, a webhook).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseEvent {
    /// The response rule's name.
    pub response: String,
    /// Its actions.
    pub actions: Vec<ResponseAction>,
    /// False in monitor mode: recorded as what would have been done, nothing done.
    pub acted: bool,
    /// The finding it answers.
    pub threat: Threat,
    /// What the finding saw (masked).
    pub detail: String,
    /// The flow.
    pub flow: FlowEvent,
}

/// The state of a quarantined pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantine {
    /// The response rule that put it there.
    pub response: String,
    /// The threat that set it off.
    pub threat: Threat,
    /// Names of the rules whose flows it keeps.
    pub keep: Vec<String>,
    /// When (the enforcer's clock, nanoseconds).
    pub since: u64,
}

/// The outcome for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Pass or drop.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// An audit event, for decisions worth keeping.
    pub event: Option<FlowEvent>,
}

/// The workload this enforcer guards.
#[derive(Debug, Clone)]
pub struct LocalWorkload {
    /// Identity (zone comes from it).
    pub identity: Arc<WorkloadIdentity>,
    /// The NIC's MAC.
    pub mac: MacAddr,
    /// IPv4 addresses.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses (the EUI-64 link-local of `mac` is always added).
    pub ipv6: Vec<Ipv6Addr>,
    /// Whether the workload may act as a DHCP client.
    pub dhcp: bool,
}

/// Sizing of the tables.
#[derive(Debug, Clone, Copy)]
pub struct EnforcerConfig {
    /// Flow table slots.
    pub flows: usize,
    /// Fragment table slots.
    pub fragments: usize,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Decide established IPv4 TCP/UDP frames from their raw bytes (the flow cache). Off
    /// only to test that both paths agree.
    pub fast_path: bool,
    /// Bytes all inspected flows may hold for reassembly together.
    pub inspect_budget: usize,
}

impl Default for EnforcerConfig {
    fn default() -> Self {
        EnforcerConfig {
            flows: 16384,
            fragments: 1024,
            timeouts: Timeouts::default(),
            fast_path: true,
            inspect_budget: crate::inspect::POD_BUDGET,
        }
    }
}

/// Counters of one enforcer.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Frames per reason.
    pub frames: [u64; Reason::COUNT],
    /// Bytes per reason.
    pub bytes: [u64; Reason::COUNT],
    /// New flows decided per rule (allowed or denied by it).
    pub rule_flows: Vec<u64>,
    /// New flows denied by default deny.
    pub default_deny_flows: u64,
    /// Frames decided by the flow cache (a subset of `established`).
    pub fast_path_frames: u64,
    /// Inspection findings per threat ([`Threat`] order), alerts and denials together.
    pub findings: [u64; Threat::COUNT],
    /// Payload bytes handed to inspection.
    pub inspected_bytes: u64,
}

/// Decides frames for one workload.
pub struct Enforcer {
    policy: Arc<CompiledPolicy>,
    peers: Arc<PeerDirectory>,
    local: LocalWorkload,
    link_local: Ipv6Addr,
    zone: ZoneId,
    mode: Mode,
    flows: FlowTable,
    frags: FragTable,
    timeouts: Timeouts,
    counters: Counters,
    fast_path: bool,
    own_v4: Vec<u32>,
    budget: Budget,
    findings: Vec<Finding>,
    responses: Vec<ResponseEvent>,
    cuts: Vec<FlowEvent>,
    quarantine: Option<Quarantine>,
    names: crate::names::NameTable,
}

const ALL_APPS: [Option<RuleId>; AppProto::COUNT] = [Some(RuleId(u32::MAX)); AppProto::COUNT];

/// A reload made ready without the enforcer: the new policy and peers, and for each new
/// rule the old rule of the same name whose counter it carries on.
#[derive(Debug, Clone)]
pub struct PreparedReload {
    base: Arc<CompiledPolicy>,
    policy: Arc<CompiledPolicy>,
    peers: Arc<PeerDirectory>,
    carry: Vec<Option<usize>>,
}

impl PreparedReload {
    /// Prepares the move from `current` (the enforcer's policy now, [`Enforcer::policy`])
    /// to `policy` and `peers`.
    pub fn new(
        current: &Arc<CompiledPolicy>,
        policy: Arc<CompiledPolicy>,
        peers: Arc<PeerDirectory>,
    ) -> PreparedReload {
        let old: std::collections::HashMap<&str, usize> = current
            .policy()
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let carry = policy
            .policy()
            .rules
            .iter()
            .map(|r| old.get(r.name.as_str()).copied())
            .collect();
        PreparedReload {
            base: current.clone(),
            policy,
            peers,
            carry,
        }
    }
}

/// The guarded workload's identity as the peer directory knows it: the runtime knows a pod's
/// name, namespace and `enclave.io/*` annotations (CRI passes no labels), while the cluster
/// map knows its labels and its namespace's labels. The directory's entry for one of the
/// workload's own addresses is adopted when it names the same pod.
fn adopt_identity(local: &mut LocalWorkload, peers: &PeerDirectory) {
    let own = local
        .ipv4
        .iter()
        .map(|a| IpAddr::V4(*a))
        .chain(local.ipv6.iter().map(|a| IpAddr::V6(*a)));
    let me = &local.identity;
    if let Some(p) = peers.same_pod(own, &me.namespace, &me.name) {
        if p.identity != *me {
            local.identity = p.identity.clone();
        }
    }
}

impl Enforcer {
    /// An enforcer for `local` under `policy`, resolving peers through `peers`.
    pub fn new(
        policy: Arc<CompiledPolicy>,
        peers: Arc<PeerDirectory>,
        local: LocalWorkload,
        cfg: EnforcerConfig,
    ) -> Self {
        let mut local = local;
        adopt_identity(&mut local, &peers);
        let zone = policy.policy().zone_of_workload(&local.identity);
        let mode = policy.policy().zone_mode(zone);
        let rules = policy.policy().rules.len();
        Enforcer {
            link_local: local.mac.ipv6_link_local(),
            zone,
            mode,
            flows: FlowTable::new(cfg.flows),
            frags: FragTable::new(cfg.fragments),
            timeouts: cfg.timeouts,
            fast_path: cfg.fast_path,
            own_v4: local.ipv4.iter().map(|a| u32::from(*a)).collect(),
            counters: Counters {
                frames: [0; Reason::COUNT],
                bytes: [0; Reason::COUNT],
                rule_flows: vec![0; rules],
                default_deny_flows: 0,
                fast_path_frames: 0,
                findings: [0; Threat::COUNT],
                inspected_bytes: 0,
            },
            budget: Budget::new(cfg.inspect_budget),
            findings: Vec::new(),
            responses: Vec::new(),
            cuts: Vec::new(),
            quarantine: None,
            names: {
                let mut n = crate::names::NameTable::new(policy.policy());
                n.set_learn_all(mode == Mode::Learn);
                n
            },
            policy,
            peers,
            local,
        }
    }

    /// Addresses learned from DNS answers, or used by a new flow, since the last call
    /// (what the nftables name sets must hold).
    pub fn take_learned_names(&mut self) -> Vec<crate::names::Learned> {
        self.names.take_learned()
    }

    /// Queues every learned address again (the nftables table was rendered anew).
    pub fn replay_names(&mut self, now: u64) {
        self.names.replay(now);
    }

    /// The pod's learned names, for reports and metrics.
    pub fn names(&self) -> &crate::names::NameTable {
        &self.names
    }

    /// The inspection findings since the last call (the caller records them).
    pub fn take_findings(&mut self) -> Vec<Finding> {
        std::mem::take(&mut self.findings)
    }

    /// Whether findings, responses or flows cut by a quarantine wait to be taken.
    pub fn has_findings(&self) -> bool {
        !self.findings.is_empty() || !self.responses.is_empty() || !self.cuts.is_empty()
    }

    /// The responses decided since the last call.
    pub fn take_responses(&mut self) -> Vec<ResponseEvent> {
        std::mem::take(&mut self.responses)
    }

    /// The flows a quarantine cut since the last call (each to be recorded).
    pub fn take_cuts(&mut self) -> Vec<FlowEvent> {
        std::mem::take(&mut self.cuts)
    }

    /// The quarantine in force, if any.
    pub fn quarantine(&self) -> Option<&Quarantine> {
        self.quarantine.as_ref()
    }

    /// Ends the quarantine; the pod's flows are decided by the policy again (flows cut stay
    /// cut). Returns the quarantine that ended.
    pub fn release(&mut self) -> Option<Quarantine> {
        self.quarantine.take()
    }

    /// Puts the pod in quarantine by hand or by a response: every live flow whose rule is
    /// not in `keep` is cut (and waits in [`Enforcer::take_cuts`]); new flows pass only by
    /// a rule in `keep`.
    pub fn enter_quarantine(&mut self, q: Quarantine) {
        let keep: Vec<RuleId> = self
            .policy
            .policy()
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| q.keep.contains(&r.name))
            .map(|(i, _)| RuleId(i as u32))
            .collect();
        let mode = self.mode;
        for (k, e) in self.flows.iter_mut() {
            if e.admission == Admission::Cut || e.rule.is_some_and(|r| keep.contains(&r)) {
                continue;
            }
            e.admission = Admission::Cut;
            if matches!(e.tcp, Some(TcpState::Closing | TcpState::Reset)) {
                continue;
            }
            self.cuts
                .push(flow_event_of(k, e, Reason::Quarantined, e.rule, mode));
        }
        self.quarantine = Some(q);
    }

    /// Whether a quarantine lets a new flow by `rule` through.
    fn kept(&self, rule: Option<RuleId>) -> bool {
        match (&self.quarantine, rule) {
            (None, _) => true,
            (Some(q), Some(r)) => self
                .policy
                .policy()
                .rules
                .get(r.0 as usize)
                .is_some_and(|r| q.keep.contains(&r.name)),
            (Some(_), None) => false,
        }
    }

    /// The response rules that apply to the findings from index `from` on.
    fn respond(&mut self, from: usize, now: u64) {
        let policy = self.policy.clone();
        let rules = &policy.policy().responses;
        for i in from..self.findings.len() {
            let f = &self.findings[i];
            // A pod answers only for bytes it sent itself (the peer's netd, if it has one,
            // answers for the peer).
            let local_sent = f.from_client == (f.flow.dir == Direction::Egress);
            if !local_sent {
                continue;
            }
            let (threat, detail, flow) = (f.threat, f.detail.clone(), f.flow);
            let zone = self.zone;
            for r in rules.iter().filter(|r| r.applies(zone, threat)) {
                let acted = self.mode == Mode::Enforce;
                self.responses.push(ResponseEvent {
                    response: r.name.clone(),
                    actions: r.actions.clone(),
                    acted,
                    threat,
                    detail: detail.clone(),
                    flow,
                });
                if acted
                    && self.quarantine.is_none()
                    && r.actions.contains(&ResponseAction::Quarantine)
                {
                    let keep = r
                        .keep
                        .iter()
                        .filter_map(|id| policy.policy().rules.get(id.0 as usize))
                        .map(|r| r.name.clone())
                        .collect();
                    self.enter_quarantine(Quarantine {
                        response: r.name.clone(),
                        threat,
                        keep,
                        since: now,
                    });
                }
            }
        }
    }

    /// Bytes inspected flows hold for reassembly now, and the budget.
    pub fn inspect_held(&self) -> (usize, usize) {
        (self.budget.used(), self.budget.limit())
    }

    /// The workload's zone.
    pub fn zone(&self) -> ZoneId {
        self.zone
    }

    /// The workload's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<CompiledPolicy> {
        &self.policy
    }

    /// The peer directory in force.
    pub fn peers(&self) -> &Arc<PeerDirectory> {
        &self.peers
    }

    /// The guarded workload.
    pub fn local(&self) -> &LocalWorkload {
        &self.local
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Flow table counters.
    pub fn flow_stats(&self) -> TableStats {
        self.flows.stats()
    }

    /// Decides one frame. `now` is a monotonic time in nanoseconds.
    pub fn decide(&mut self, dir: Direction, frame: &[u8], now: u64) -> Decision {
        let findings = self.findings.len();
        let d = match self
            .fast_path
            .then(|| self.established_fast(dir, frame, now))
            .flatten()
        {
            Some(d) => d,
            None => self.decide_inner(dir, frame, now),
        };
        if self.findings.len() > findings && !self.policy.policy().responses.is_empty() {
            self.respond(findings, now);
        }
        let i = d.reason as usize;
        self.counters.frames[i] += 1;
        self.counters.bytes[i] += frame.len() as u64;
        d
    }

    #[inline]
    fn decide_inner(&mut self, dir: Direction, frame: &[u8], now: u64) -> Decision {
        let f = match Frame::parse(frame) {
            Ok(f) => f,
            Err(_) => return self.drop_link(Reason::Malformed, dir, None),
        };
        if f.eth.vlan_count > 0 {
            return self.drop_link(Reason::VlanTagged, dir, Some(&f.eth));
        }
        // Compared on the frame's bytes (the parse succeeded, so they are there): reading
        // back the parsed copy at another width stalls store forwarding on the hot path.
        let own = &self.local.mac.0[..];
        match dir {
            Direction::Egress if frame.get(6..12) != Some(own) => {
                return self.drop_link(Reason::SpoofedMac, dir, Some(&f.eth));
            }
            Direction::Ingress if frame.get(..6) != Some(own) && !f.eth.dst.is_multicast() => {
                return quiet(Reason::NotForWorkload);
            }
            _ => {}
        }
        match f.net {
            Net::Arp(a) => self.arp(dir, &f.eth, &a),
            Net::Ip(ip) => self.ip(dir, &f.eth, &ip, now),
            Net::Other(_) => self.drop_link(Reason::UnsupportedEthertype, dir, Some(&f.eth)),
        }
    }

    /// The flow cache: an established IPv4 TCP/UDP frame decided from its raw bytes, with
    /// the same checks the full path makes for such a frame (link untagged, MAC and IP the
    /// workload's, no options, not a fragment, no SYN/FIN/RST, flow established with no
    /// detection pending). `None` sends the frame down the full path, which decides every
    /// other case.
    #[inline]
    fn established_fast(&mut self, dir: Direction, f: &[u8], now: u64) -> Option<Decision> {
        let be16 = |o: usize| f.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let be32 = |o: usize| {
            f.get(o..o + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        if be16(12)? != crate::packet::ETHERTYPE_IPV4
            || *f.get(14)? != 0x45
            || self.quarantine.is_some()
        {
            return None;
        }
        let own_mac = &self.local.mac.0[..];
        let mac = match dir {
            Direction::Egress => f.get(6..12)?,
            Direction::Ingress => f.get(..6)?,
        };
        if mac != own_mac {
            return None;
        }
        let total = usize::from(be16(16)?);
        let proto = *f.get(23)?;
        if total < 28
            || 14 + total > f.len()
            || be16(20)? & 0x3fff != 0
            || !(proto == proto::TCP || proto == proto::UDP)
        {
            return None;
        }
        let (src, dst) = (be32(26)?, be32(30)?);
        if !self
            .own_v4
            .contains(&if dir == Direction::Egress { src } else { dst })
        {
            return None;
        }
        let (sport, dport) = (be16(34)?, be16(36)?);
        if proto == proto::UDP && self.names.active() && (sport == 53 || dport == 53) {
            return None; // DNS answers teach name zones: the full path reads them.
        }
        if proto == proto::TCP {
            let doff = usize::from(*f.get(46)? >> 4) * 4;
            let flags = *f.get(47)?;
            if doff < 20
                || 20 + doff > total
                || flags & (TcpFlags::SYN | TcpFlags::FIN | TcpFlags::RST) != 0
            {
                return None;
            }
        } else {
            let ulen = usize::from(be16(38)?);
            if ulen < 8 || 20 + ulen > total || matches!(sport, 67 | 68) || matches!(dport, 67 | 68)
            {
                return None;
            }
        }
        let (key, src_is_a) = FlowKey::new(
            proto,
            IpAddr::V4(src.into()),
            sport,
            IpAddr::V4(dst.into()),
            dport,
        );
        let to = self.timeouts;
        let (e, expires) = self.flows.get_mut_exp_fast(&key, now)?;
        if e.admission == Admission::Cut
            || e.l7.is_some()
            || e.inspect.is_some()
            || !matches!(e.tcp, None | Some(TcpState::Established))
        {
            return None;
        }
        let orig = src_is_a == e.a_is_initiator;
        let side = usize::from(!orig);
        e.frames[side] += 1;
        e.bytes[side] += total as u64;
        e.replied |= !orig;
        *expires = now + expiry(e, &to);
        self.counters.fast_path_frames += 1;
        Some(quiet(Reason::Established))
    }

    /// A drop for a link-level reason, audited (except where noted by the caller).
    fn drop_link(&self, reason: Reason, dir: Direction, eth: Option<&EthernetHeader>) -> Decision {
        let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let ev = FlowEvent {
            kind: EventKind::Denied,
            reason,
            dir,
            proto: 0,
            src_mac: eth.map_or(MacAddr::default(), |e| e.src),
            dst_mac: eth.map_or(MacAddr::default(), |e| e.dst),
            src: unspecified,
            sport: 0,
            dst: unspecified,
            dport: 0,
            src_zone: if dir == Direction::Egress {
                self.zone
            } else {
                ZoneId::UNKNOWN
            },
            dst_zone: if dir == Direction::Egress {
                ZoneId::UNKNOWN
            } else {
                self.zone
            },
            rule: None,
            app_required: 0,
            app_detected: None,
            mode: self.mode,
        };
        Decision {
            verdict: Verdict::Drop,
            reason,
            event: Some(ev),
        }
    }

    fn is_own_v4(&self, a: Ipv4Addr) -> bool {
        self.local.ipv4.contains(&a)
    }

    fn is_own_ip(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.is_own_v4(a),
            IpAddr::V6(a) => a == self.link_local || self.local.ipv6.contains(&a),
        }
    }

    fn arp(&self, dir: Direction, eth: &EthernetHeader, a: &ArpPacket) -> Decision {
        if a.op != ARP_REQUEST && a.op != ARP_REPLY {
            return self.drop_link(Reason::BadArp, dir, Some(eth));
        }
        let ok = match dir {
            // The sender must be us, claiming our own address (or 0.0.0.0 for a probe).
            Direction::Egress => {
                a.sha == self.local.mac && (self.is_own_v4(a.spa) || a.spa.is_unspecified())
            }
            // Only ARP about our addresses reaches us.
            Direction::Ingress => self.is_own_v4(a.tpa),
        };
        if ok {
            quiet(Reason::Arp)
        } else if dir == Direction::Egress {
            self.drop_link(Reason::BadArp, dir, Some(eth))
        } else {
            quiet(Reason::NotForWorkload)
        }
    }

    #[inline]
    fn ip(
        &mut self,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        now: u64,
    ) -> Decision {
        if ip.source_routed {
            return self.deny_ip(Reason::SourceRouted, dir, eth, ip, None);
        }
        // Link-local control traffic, each by its own rules.
        if let L4::Icmp(m) = &ip.l4 {
            if ip.proto == proto::ICMPV6 && matches!(m.ty, 130..=137 | 143) {
                return self.ndp(dir, eth, ip, m);
            }
        }
        if let L4::Udp(u) = &ip.l4 {
            let (client, server) = if ip.is_v6() { (546, 547) } else { (68, 67) };
            if (u.sport, u.dport) == (client, server) || (u.sport, u.dport) == (server, client) {
                return self.dhcp(dir, eth, ip, u.sport == server);
            }
        }
        match dir {
            Direction::Egress if !self.is_own_ip(ip.src) => {
                return self.deny_ip(Reason::SpoofedIp, dir, eth, ip, None);
            }
            Direction::Ingress if !self.is_own_ip(ip.dst) => return quiet(Reason::NotForWorkload),
            _ => {}
        }
        if let (Some(fr), false) = (ip.frag, ip.is_v6()) {
            // The IPv4 header is at least 20 bytes: a fragment whose end lies past 65,535
            // bytes of payload makes a datagram no receiver may build (ping of death).
            let end = usize::from(fr.offset) * 8 + ip.len.saturating_sub(20);
            if end > 65535 {
                let ev = self.event(EventKind::Denied, Reason::ThreatDetected, dir, eth, ip);
                self.counters.findings[Threat::PingDeath as usize] += 1;
                self.findings.push(Finding {
                    threat: Threat::PingDeath,
                    action: OnFinding::Deny,
                    detail: format!(
                        "a {} fragment at offset {} that reassembles to {end} bytes of payload, past 65,535",
                        crate::packet::proto_name(ip.proto),
                        usize::from(fr.offset) * 8
                    ),
                    data: None,
                    from_client: dir == Direction::Egress,
                    flow: ev,
                });
                return Decision {
                    verdict: Verdict::Drop,
                    reason: Reason::ThreatDetected,
                    event: Some(ev),
                };
            }
        }
        if let Some(fr) = ip.frag {
            if fr.offset != 0 {
                let min_off = if ip.proto == proto::TCP { 20 } else { 8 };
                if usize::from(fr.offset) * 8 < min_off {
                    return self.deny_ip(Reason::FragmentOverlap, dir, eth, ip, None);
                }
                let key = FragKey {
                    src: addr128(ip.src),
                    dst: addr128(ip.dst),
                    id: fr.id,
                    proto: ip.proto,
                };
                return match self.frags.get_mut(&key, now) {
                    Some(true) => quiet(Reason::Fragment),
                    _ => quiet(Reason::FragmentUnknown),
                };
            }
        }
        let d = self.flow(dir, eth, ip, now);
        if let (Some(fr), Verdict::Pass) = (ip.frag, d.verdict) {
            let key = FragKey {
                src: addr128(ip.src),
                dst: addr128(ip.dst),
                id: fr.id,
                proto: ip.proto,
            };
            self.frags
                .insert(key, true, now, now + self.timeouts.fragment);
        }
        d
    }

    fn ndp(
        &self,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        m: &IcmpMessage<'_>,
    ) -> Decision {
        let unspecified = ip.src == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        match (dir, m.ty) {
            // Router advertisements and redirects come from routers, never from a pod.
            (Direction::Egress, 134 | 137) => self.deny_ip(Reason::RogueRouter, dir, eth, ip, None),
            (Direction::Egress, _) => {
                // Our own address (or :: for duplicate address detection and MLD), and for
                // NA, the target must be ours.
                let target_ok = m.ty != 136
                    || m.body.get(..16).is_some_and(|t| {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(t);
                        self.is_own_ip(IpAddr::V6(Ipv6Addr::from(a)))
                    });
                if (self.is_own_ip(ip.src) || unspecified) && target_ok && ip.ttl == 255
                    || matches!(m.ty, 130..=132 | 143) && (self.is_own_ip(ip.src) || unspecified)
                {
                    quiet(Reason::Ndp)
                } else {
                    self.deny_ip(Reason::SpoofedIp, dir, eth, ip, None)
                }
            }
            (Direction::Ingress, 137) => quiet(Reason::NotForWorkload),
            // NDP must arrive with hop limit 255 (RFC 4861): it was not routed.
            (Direction::Ingress, 133..=136) if ip.ttl != 255 => quiet(Reason::NotForWorkload),
            (Direction::Ingress, _) => quiet(Reason::Ndp),
        }
    }

    fn dhcp(
        &self,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        from_server: bool,
    ) -> Decision {
        if !self.local.dhcp {
            return self.deny_ip(Reason::RogueDhcp, dir, eth, ip, None);
        }
        match (dir, from_server) {
            (Direction::Egress, true) => self.deny_ip(Reason::RogueDhcp, dir, eth, ip, None),
            (Direction::Egress, false)
                if self.is_own_ip(ip.src)
                    || ip.src.is_unspecified()
                    || ip.src == IpAddr::V6(self.link_local) =>
            {
                quiet(Reason::Dhcp)
            }
            (Direction::Egress, false) => self.deny_ip(Reason::SpoofedIp, dir, eth, ip, None),
            (Direction::Ingress, true) => quiet(Reason::Dhcp),
            (Direction::Ingress, false) => quiet(Reason::NotForWorkload),
        }
    }

    fn event(
        &self,
        kind: EventKind,
        reason: Reason,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
    ) -> FlowEvent {
        let (sport, dport) = ip.l4.ports();
        let (src_zone, dst_zone) = match dir {
            Direction::Egress => (self.zone, self.peers.zone_of(&self.policy, ip.dst)),
            Direction::Ingress => (self.peers.zone_of(&self.policy, ip.src), self.zone),
        };
        FlowEvent {
            kind,
            reason,
            dir,
            proto: ip.proto,
            src_mac: eth.src,
            dst_mac: eth.dst,
            src: ip.src,
            sport,
            dst: ip.dst,
            dport,
            src_zone,
            dst_zone,
            rule: None,
            app_required: 0,
            app_detected: None,
            mode: self.mode,
        }
    }

    fn deny_ip(
        &self,
        reason: Reason,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        rule: Option<RuleId>,
    ) -> Decision {
        let mut ev = self.event(EventKind::Denied, reason, dir, eth, ip);
        ev.rule = rule;
        Decision {
            verdict: Verdict::Drop,
            reason,
            event: Some(ev),
        }
    }

    /// The flow key of a packet: ports for TCP/UDP, the echo identifier for ICMP echo.
    fn key_of(ip: &IpPacket<'_>) -> (FlowKey, bool) {
        let (sport, dport) = match &ip.l4 {
            L4::Icmp(m) => match (ip.proto, m.ty) {
                (proto::ICMP, 8) | (proto::ICMPV6, 128) => (m.echo_id(), 0),
                (proto::ICMP, 0) | (proto::ICMPV6, 129) => (0, m.echo_id()),
                _ => (0, 0),
            },
            l4 => l4.ports(),
        };
        FlowKey::new(ip.proto, ip.src, sport, ip.dst, dport)
    }

    #[inline]
    fn flow(
        &mut self,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        now: u64,
    ) -> Decision {
        if let L4::Icmp(m) = &ip.l4 {
            if is_icmp_error(ip.proto, m.ty) {
                return self.related(ip, m, now);
            }
        }
        let (key, src_is_a) = Self::key_of(ip);
        if self.names.active() {
            if let L4::Udp(u) = &ip.l4 {
                // DNS to and from the pod's resolvers: queries remembered, answers learned
                // (only frames the rest of the path lets through).
                let d = self.flow_decision(dir, eth, ip, key, src_is_a, now);
                if d.verdict == Verdict::Pass {
                    match dir {
                        Direction::Egress if u.dport == 53 => {
                            self.names.query(ip.dst, u.sport, u.payload, now);
                        }
                        Direction::Ingress if u.sport == 53 => {
                            self.names.answer(ip.src, u.dport, u.payload, now);
                        }
                        _ => {}
                    }
                }
                return d;
            }
        }
        self.flow_decision(dir, eth, ip, key, src_is_a, now)
    }

    #[inline]
    fn flow_decision(
        &mut self,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        key: FlowKey,
        src_is_a: bool,
        now: u64,
    ) -> Decision {
        let outcome = self.track(&key, src_is_a, ip, now);
        let (orig, step, info) = match outcome {
            Tracked::Quiet(r) => return quiet(r),
            Tracked::New => return self.new_flow(dir, eth, ip, key, src_is_a, now),
            Tracked::Step { orig, step, info } => (orig, step, info),
        };
        let (kind, reason, app) = match (info.cut, step) {
            (Some(r), _) => (EventKind::Denied, r, info.app),
            (None, L7Step::Decided { kind, reason, app }) => (kind, reason, app),
            (None, L7Step::Reorder) => return quiet(Reason::AppReorder),
            (None, L7Step::Pass) => return quiet(Reason::Established),
        };
        let mut ev = self.event(kind, reason, dir, eth, ip);
        // Record the flow the way its initiator opened it.
        if !orig {
            std::mem::swap(&mut ev.src, &mut ev.dst);
            std::mem::swap(&mut ev.sport, &mut ev.dport);
            std::mem::swap(&mut ev.src_mac, &mut ev.dst_mac);
            ev.dir = if info.outbound {
                Direction::Egress
            } else {
                Direction::Ingress
            };
        }
        (ev.src_zone, ev.dst_zone) = info.zones;
        ev.rule = info.rule;
        ev.app_required = if self.mode == Mode::Learn {
            0
        } else {
            info.required
        };
        ev.app_detected = app;
        if kind == EventKind::Allowed {
            if let Some(r) = info.rule {
                self.counters.rule_flows[r.0 as usize] += 1;
            }
        }
        let verdict = if kind == EventKind::Denied {
            Verdict::Drop
        } else {
            Verdict::Pass
        };
        Decision {
            verdict,
            reason,
            event: Some(ev),
        }
    }

    /// Looks the packet up in the flow table and advances the flow's state.
    #[inline]
    fn track(&mut self, key: &FlowKey, src_is_a: bool, ip: &IpPacket<'_>, now: u64) -> Tracked {
        let mode = self.mode;
        let to = self.timeouts;
        let Some((e, expires)) = self.flows.get_mut_exp(key, now) else {
            return Tracked::New;
        };
        let orig = src_is_a == e.a_is_initiator;
        if e.admission == Admission::Cut {
            return Tracked::Quiet(Reason::FlowCut);
        }
        if let (L4::Tcp(t), Some(st)) = (&ip.l4, e.tcp) {
            match st.advance(orig, t.flags) {
                Some(next) => e.tcp = Some(next),
                None if orig
                    && t.flags.has(TcpFlags::SYN)
                    && !t.flags.has(TcpFlags::ACK)
                    && matches!(st, TcpState::Reset | TcpState::Closing | TcpState::FinWait) =>
                {
                    self.flows.remove(key);
                    return Tracked::New;
                }
                None => {
                    // A SYN answered with a SYN: the split handshake.
                    let split = st == TcpState::SynSent
                        && !orig
                        && t.flags.has(TcpFlags::SYN)
                        && !t.flags.has(TcpFlags::ACK);
                    if let (true, Some(fi)) = (split, e.inspect.as_ref()) {
                        if fi.cfg.threats.is_some() {
                            let info = FlowInfo::of(e, 0);
                            let found = vec![Detected::new(
                                Threat::TcpSplitHandshake,
                                "the responder answered the SYN with a SYN of its own".into(),
                                false,
                            )];
                            let flow = finding_flow(ip, orig, &info, mode);
                            let cfg = fi.cfg;
                            if report(&mut self.findings, &mut self.counters, found, cfg, flow)
                                .is_some()
                            {
                                e.admission = Admission::Cut;
                            }
                        }
                    }
                    return Tracked::Quiet(Reason::TcpInvalid);
                }
            }
        }
        let side = usize::from(!orig);
        e.frames[side] += 1;
        e.bytes[side] += ip.len as u64;
        e.replied |= !orig;
        *expires = now + expiry(e, &to);
        let required = e.l7.as_ref().map_or(0, |p| app_mask(&p.candidates));
        let step = step_l7(e, orig, ip, mode);
        if let L7Step::Decided { kind, app, .. } = step {
            e.l7 = None;
            e.app = app;
            match kind {
                EventKind::Denied => e.admission = Admission::Cut,
                EventKind::WouldDeny => e.admission = Admission::Monitored,
                _ => {}
            }
            settle_inspection(&self.policy, e, app);
        }
        let mut info = FlowInfo::of(e, required);
        let inspected = !matches!(step, L7Step::Reorder) && e.admission != Admission::Cut;
        if let (true, Some(fi)) = (inspected, e.inspect.as_mut()) {
            let s = match &ip.l4 {
                L4::Tcp(t) => {
                    let ack = t.flags.has(TcpFlags::ACK).then_some(t.ack);
                    if t.flags.has(TcpFlags::SYN) {
                        fi.syn(orig, t.seq);
                        fi.segment(orig, t.seq.wrapping_add(1), ack, t.payload)
                    } else {
                        fi.segment(orig, t.seq, ack, t.payload)
                    }
                }
                L4::Udp(u) => fi.datagram(orig, u.payload),
                _ => InspectStep::Pass(Vec::new()),
            };
            let cfg = fi.cfg;
            self.counters.inspected_bytes += ip.l4.payload().len() as u64;
            match s {
                InspectStep::Refused(_) => return Tracked::Quiet(Reason::InspectHeld),
                InspectStep::Pass(found) if !found.is_empty() => {
                    let flow = finding_flow(ip, orig, &info, mode);
                    info.cut = report(&mut self.findings, &mut self.counters, found, cfg, flow);
                    // A refused DNS query drops that datagram; the flow goes on for the
                    // names the rule allows (resolvers reuse one socket for many queries).
                    let one_datagram =
                        matches!(ip.l4, L4::Udp(_)) && info.cut == Some(Reason::RequestDenied);
                    if info.cut.is_some() && !one_datagram {
                        e.admission = Admission::Cut;
                    }
                }
                InspectStep::Pass(_) => {}
            }
        }
        Tracked::Step { orig, step, info }
    }

    fn new_flow(
        &mut self,
        dir: Direction,
        eth: &EthernetHeader,
        ip: &IpPacket<'_>,
        key: FlowKey,
        src_is_a: bool,
        now: u64,
    ) -> Decision {
        if let L4::Tcp(t) = &ip.l4 {
            if !t.flags.has(TcpFlags::SYN)
                || t.flags.has(TcpFlags::ACK)
                || t.flags.has(TcpFlags::RST)
            {
                return quiet(Reason::TcpInvalid);
            }
        }
        let (_, dport) = ip.l4.ports();
        let peer = if dir == Direction::Egress {
            ip.dst
        } else {
            ip.src
        };
        let mut peer_zone = self.peers.zone_of(&self.policy, peer);
        if dir == Direction::Egress && self.names.active() && !self.peers.is_workload(peer) {
            // An address this pod resolved from a name zone's name is in that zone (for
            // this pod), ahead of CIDR zones: the first such zone a rule allows.
            let from = self.zone;
            let allowed = self.names.zones_of(peer, now).map(|(z, _, _)| z).find(|z| {
                *z != ZoneId::UNKNOWN
                    && !matches!(
                        self.policy.lookup(from, *z, ip.proto, dport),
                        Lookup::NoRule | Lookup::Denied(_)
                    )
            });
            if let Some(z) = allowed {
                peer_zone = z;
                self.names.touch(peer, z, now);
            }
        }
        let (from, to) = if dir == Direction::Egress {
            (self.zone, peer_zone)
        } else {
            (peer_zone, self.zone)
        };
        let mut lookup = self.policy.lookup(from, to, ip.proto, dport);
        if self.quarantine.is_some() {
            // Only the rules the quarantine keeps still allow.
            lookup = match lookup {
                Lookup::Allowed(r) if self.kept(Some(r)) => lookup,
                Lookup::NeedsApp(mut c) => {
                    for slot in c.iter_mut() {
                        if !self.kept(*slot) {
                            *slot = None;
                        }
                    }
                    if c.iter().any(Option::is_some) {
                        Lookup::NeedsApp(c)
                    } else {
                        Lookup::NoRule
                    }
                }
                _ => Lookup::NoRule,
            };
            if lookup == Lookup::NoRule && self.mode == Mode::Enforce {
                return self
                    .deny_ip(Reason::Quarantined, dir, eth, ip, None)
                    .with_zones(from, to);
            }
        }

        let mut entry = FlowEntry {
            a_is_initiator: src_is_a,
            outbound: dir == Direction::Egress,
            tcp: matches!(ip.l4, L4::Tcp(_)).then_some(TcpState::SynSent),
            replied: false,
            admission: Admission::Allowed,
            rule: None,
            app: None,
            l7: None,
            zones: (from, to),
            frames: [1, 0],
            bytes: [ip.len as u64, 0],
            inspect: None,
        };
        let mut ev = self.event(EventKind::Allowed, Reason::NewFlowAllowed, dir, eth, ip);
        ev.src_zone = from;
        ev.dst_zone = to;

        let (reason, emit) = match (self.mode, lookup) {
            (Mode::Learn, l) => {
                entry.admission = Admission::Learned;
                entry.rule = match l {
                    Lookup::Allowed(r) | Lookup::Denied(r) => Some(r),
                    _ => None,
                };
                entry.l7 = Some(Box::new(L7Pending::new(ALL_APPS)));
                ev.kind = EventKind::Learned;
                ev.reason = Reason::Learned;
                ev.rule = entry.rule;
                // Recorded when the app is known (first payload); a flow with no payload
                // is recorded now.
                (
                    Reason::Learned,
                    ip.l4.payload().is_empty() && !matches!(ip.l4, L4::Tcp(_)),
                )
            }
            (_, Lookup::Allowed(r)) => {
                entry.rule = Some(r);
                self.counters.rule_flows[r.0 as usize] += 1;
                ev.rule = Some(r);
                (Reason::NewFlowAllowed, true)
            }
            (_, Lookup::NeedsApp(c)) => {
                entry.l7 = Some(Box::new(L7Pending::new(c)));
                entry.rule = c.iter().flatten().next().copied();
                (Reason::AppPending, false)
            }
            (Mode::Monitor, l) => {
                let rule = if let Lookup::Denied(r) = l {
                    Some(r)
                } else {
                    None
                };
                entry.admission = Admission::Monitored;
                entry.rule = rule;
                ev.kind = EventKind::WouldDeny;
                ev.reason = if rule.is_some() {
                    Reason::DenyRule
                } else {
                    Reason::NoRule
                };
                ev.rule = rule;
                (Reason::Monitored, true)
            }
            (Mode::Enforce, l) => {
                let (reason, rule) = match l {
                    Lookup::Denied(r) => (Reason::DenyRule, Some(r)),
                    _ => (Reason::NoRule, None),
                };
                match rule {
                    Some(r) => self.counters.rule_flows[r.0 as usize] += 1,
                    None => self.counters.default_deny_flows += 1,
                }
                return self
                    .deny_ip(reason, dir, eth, ip, rule)
                    .with_zones(from, to);
            }
        };
        if let L4::Tcp(t) = &ip.l4 {
            if let Some(p) = entry.l7.as_mut() {
                p.next_seq[0] = Some(t.seq.wrapping_add(1));
            }
        }
        // Inspection as the rule asks (while the app is detected, as the strictest of the
        // rules that could still allow the flow asks).
        // Rules that allow only some requests inside their protocol need the inspector too.
        let pol = self.policy.policy();
        let (cfg, requests) = match (self.mode, lookup) {
            (Mode::Learn, _) => (Inspect::default(), None),
            (_, Lookup::Allowed(r)) => (
                pol.flow_inspect(Some(r), from, to),
                Some(rule_requests(&self.policy, Some(r))),
            ),
            (_, Lookup::NeedsApp(c)) => (
                c.iter().fold(Inspect::default(), |a, r| {
                    a.merge(pol.flow_inspect(*r, from, to))
                }),
                c.iter()
                    .map(|r| rule_requests(&self.policy, *r))
                    .find(|q| q.any()),
            ),
            _ => (Inspect::default(), None),
        };
        let mut syn_found = Vec::new();
        let wants_requests = requests.as_ref().is_some_and(|q| q.any());
        if (cfg.any() || wants_requests) && matches!(ip.l4, L4::Tcp(_) | L4::Udp(_)) {
            let tcp = matches!(ip.l4, L4::Tcp(_));
            let sides = self.policy.policy().dlp_sides(cfg, from, to);
            let mut fi = FlowInspector::new(cfg, tcp, sides, dport, &self.budget);
            if let (Lookup::Allowed(_), Some(q)) = (lookup, requests) {
                fi.set_requests(q);
            }
            if let L4::Tcp(t) = &ip.l4 {
                fi.syn(true, t.seq);
                if !t.payload.is_empty() && cfg.threats.is_some() {
                    syn_found.push(Detected::new(
                        Threat::TcpSynData,
                        format!("a SYN carrying {} bytes of data", t.payload.len()),
                        true,
                    ));
                }
            }
            entry.inspect = Some(Box::new(fi));
        }
        let info = FlowInfo::of(&entry, required_of(lookup));
        if !syn_found.is_empty() {
            let flow = finding_flow(ip, true, &info, self.mode);
            if let Some(r) = report(&mut self.findings, &mut self.counters, syn_found, cfg, flow) {
                return self
                    .deny_ip(r, dir, eth, ip, entry.rule)
                    .with_zones(from, to);
            }
        }
        let expires = now + expiry(&entry, &self.timeouts);
        let mut d = Decision {
            verdict: Verdict::Pass,
            reason,
            event: emit.then_some(ev),
        };
        // A first datagram carries the payload: detect now.
        if entry.l7.is_some() && !ip.l4.payload().is_empty() {
            if let L7Step::Decided { kind, reason, app } = step_l7(&mut entry, true, ip, self.mode)
            {
                entry.l7 = None;
                entry.app = app;
                settle_inspection(&self.policy, &mut entry, app);
                ev.kind = kind;
                ev.reason = reason;
                ev.rule = entry.rule;
                ev.app_detected = app;
                ev.app_required = if self.mode == Mode::Learn {
                    0
                } else {
                    required_of(lookup)
                };
                match kind {
                    EventKind::Denied => entry.admission = Admission::Cut,
                    EventKind::WouldDeny => entry.admission = Admission::Monitored,
                    _ => {}
                }
                d = Decision {
                    verdict: if kind == EventKind::Denied {
                        Verdict::Drop
                    } else {
                        Verdict::Pass
                    },
                    reason,
                    event: Some(ev),
                };
            }
        }
        if let (L4::Udp(u), Verdict::Pass) = (&ip.l4, d.verdict) {
            if let Some(fi) = entry.inspect.as_mut() {
                fi.set_app(entry.app);
                self.counters.inspected_bytes += u.payload.len() as u64;
                if let InspectStep::Pass(found) = fi.datagram(true, u.payload) {
                    if !found.is_empty() {
                        let cfg = fi.cfg;
                        let flow =
                            finding_flow(ip, true, &FlowInfo::of(&entry, info.required), self.mode);
                        if let Some(r) =
                            report(&mut self.findings, &mut self.counters, found, cfg, flow)
                        {
                            if r != Reason::RequestDenied {
                                entry.admission = Admission::Cut;
                            }
                            let mut ev = flow;
                            ev.kind = EventKind::Denied;
                            ev.reason = r;
                            d = Decision {
                                verdict: Verdict::Drop,
                                reason: r,
                                event: Some(ev),
                            };
                        }
                    }
                }
            }
        }
        self.flows.insert(key, entry, now, expires);
        d
    }

    /// ICMP errors pass when they are about a tracked, uncut flow.
    fn related(&mut self, ip: &IpPacket<'_>, m: &IcmpMessage<'_>, now: u64) -> Decision {
        let inner = if ip.is_v6() {
            inner_v6(m.body)
        } else {
            inner_v4(m.body)
        };
        if let Some((p, s, sp, d, dp)) = inner {
            let (key, _) = FlowKey::new(p, s, sp, d, dp);
            if let Some(e) = self.flows.get_mut(&key, now) {
                if e.admission != Admission::Cut {
                    return quiet(Reason::Related);
                }
            }
        }
        quiet(Reason::UnrelatedIcmpError)
    }

    /// Installs a new policy and peer directory. Live flows are decided again: those still
    /// allowed keep going (their rule updated), those now denied are cut and reported.
    pub fn reload(
        &mut self,
        policy: Arc<CompiledPolicy>,
        peers: Arc<PeerDirectory>,
    ) -> Vec<FlowEvent> {
        let prepared = PreparedReload::new(&self.policy, policy, peers);
        self.install(prepared)
    }

    /// [`Enforcer::reload`] with the work that does not need the enforcer done beforehand
    /// ([`PreparedReload::new`], e.g. while frames are still being decided), so that the
    /// caller holds the enforcer only for the swap and the flow re-decisions.
    pub fn install(&mut self, prepared: PreparedReload) -> Vec<FlowEvent> {
        let PreparedReload {
            base,
            policy,
            peers,
            carry,
        } = prepared;
        if !Arc::ptr_eq(&base, &self.policy) {
            // Prepared against another policy (a reload raced this one): map again.
            return self.reload(policy, peers);
        }
        adopt_identity(&mut self.local, &peers);
        self.zone = policy.policy().zone_of_workload(&self.local.identity);
        self.mode = policy.policy().zone_mode(self.zone);
        self.names.set_learn_all(self.mode == Mode::Learn);
        self.names.set_policy(policy.policy());
        // Counters are monotonic (Prometheus): a rule keeps its count across a reload when
        // the new policy has a rule of the same name.
        let old = std::mem::take(&mut self.counters.rule_flows);
        self.counters.rule_flows = carry
            .iter()
            .map(|c| c.and_then(|i| old.get(i).copied()).unwrap_or(0))
            .collect();
        self.policy = policy;
        self.peers = peers;
        let mut events = Vec::new();
        let (zone, mode) = (self.zone, self.mode);
        let (pol, peers) = (self.policy.clone(), self.peers.clone());
        for (k, e) in self.flows.iter_mut() {
            if e.admission == Admission::Cut {
                continue;
            }
            let (ia, ip_, ib, ip_b) = (k.a, k.pa, k.b, k.pb);
            let ((src, _), (dst, dport)) = if e.a_is_initiator {
                ((ia, ip_), (ib, ip_b))
            } else {
                ((ib, ip_b), (ia, ip_))
            };
            let (src, dst) = (addr_from128(src), addr_from128(dst));
            let peer = if e.outbound { dst } else { src };
            let peer_zone = peers.zone_of(&pol, peer);
            let (from, to) = if e.outbound {
                (zone, peer_zone)
            } else {
                (peer_zone, zone)
            };
            e.zones = (from, to);
            let verdict = pol.lookup(from, to, k.proto, dport);
            let allowed = match verdict {
                Lookup::Allowed(r) => {
                    e.rule = Some(r);
                    true
                }
                Lookup::NeedsApp(c) => match e.app {
                    Some(app) if c[app.index()].is_some() => {
                        e.rule = c[app.index()];
                        true
                    }
                    // Still detecting: keep going with the new candidates.
                    None if e.l7.is_some() => {
                        if let Some(p) = e.l7.as_mut() {
                            p.candidates = c;
                        }
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if allowed {
                let cfg = pol.policy().flow_inspect(e.rule, from, to);
                let sides = pol.policy().dlp_sides(cfg, from, to);
                let requests = rule_requests(&pol, e.rule);
                let wanted = cfg.any() || requests.any();
                if let Some(fi) = e.inspect.as_mut() {
                    fi.set_requests(requests.clone());
                }
                match (e.inspect.as_mut(), wanted) {
                    (Some(fi), true) => fi.set_cfg(cfg, sides),
                    (Some(_), false) => e.inspect = None,
                    (None, true) if matches!(k.proto, proto::TCP | proto::UDP) => {
                        // Picked up mid-stream: reassembly starts at the next segment.
                        let mut fi = FlowInspector::new(
                            cfg,
                            k.proto == proto::TCP,
                            sides,
                            dport,
                            &self.budget,
                        );
                        fi.set_app(e.app);
                        fi.set_requests(requests);
                        e.inspect = Some(Box::new(fi));
                    }
                    _ => {}
                }
            }
            if allowed || mode != Mode::Enforce {
                if !allowed {
                    e.admission = if mode == Mode::Learn {
                        Admission::Learned
                    } else {
                        Admission::Monitored
                    };
                }
                continue;
            }
            e.admission = Admission::Cut;
            // A connection that already ended has nothing left to cut: no record.
            if matches!(e.tcp, Some(TcpState::Closing | TcpState::Reset)) {
                continue;
            }
            let rule = if let Lookup::Denied(r) = verdict {
                Some(r)
            } else {
                None
            };
            events.push(flow_event_of(k, e, Reason::FlowCut, rule, mode));
        }
        events
    }
}

impl Decision {
    fn with_zones(mut self, from: ZoneId, to: ZoneId) -> Self {
        if let Some(ev) = self.event.as_mut() {
            ev.src_zone = from;
            ev.dst_zone = to;
        }
        self
    }
}

#[inline]
fn quiet(reason: Reason) -> Decision {
    Decision {
        verdict: reason.verdict(),
        reason,
        event: None,
    }
}

fn app_mask(c: &[Option<RuleId>; AppProto::COUNT]) -> u32 {
    c.iter()
        .enumerate()
        .filter(|(_, r)| r.is_some())
        .fold(0, |m, (i, _)| m | 1 << i)
}

fn required_of(l: Lookup) -> u32 {
    match l {
        Lookup::NeedsApp(c) => app_mask(&c),
        _ => 0,
    }
}

fn is_icmp_error(p: u8, ty: u8) -> bool {
    match p {
        proto::ICMP => matches!(ty, 3 | 11 | 12),
        proto::ICMPV6 => matches!(ty, 1..=4),
        _ => false,
    }
}

type Tuple = (u8, IpAddr, u16, IpAddr, u16);

/// The flow an ICMPv4 error quotes (header plus 8 bytes of transport). The quoted bytes
/// are the guest's: every read is bounds-checked as a whole slice.
fn inner_v4(b: &[u8]) -> Option<Tuple> {
    let first = *b.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 {
        return None;
    }
    let p = *b.get(9)?;
    let s: [u8; 4] = b.get(12..16)?.try_into().ok()?;
    let d: [u8; 4] = b.get(16..20)?.try_into().ok()?;
    let ports = b.get(ihl..ihl.checked_add(4)?)?;
    let sp = u16::from_be_bytes([ports[0], ports[1]]);
    let dp = u16::from_be_bytes([ports[2], ports[3]]);
    Some((p, IpAddr::V4(s.into()), sp, IpAddr::V4(d.into()), dp))
}

/// The flow an ICMPv6 error quotes (no extension headers followed).
fn inner_v6(b: &[u8]) -> Option<Tuple> {
    if *b.first()? >> 4 != 6 {
        return None;
    }
    let p = *b.get(6)?;
    let s: [u8; 16] = b.get(8..24)?.try_into().ok()?;
    let d: [u8; 16] = b.get(24..40)?.try_into().ok()?;
    let ports = b.get(40..44)?;
    let sp = u16::from_be_bytes([ports[0], ports[1]]);
    let dp = u16::from_be_bytes([ports[2], ports[3]]);
    Some((p, IpAddr::V6(s.into()), sp, IpAddr::V6(d.into()), dp))
}

#[inline]
fn expiry(e: &FlowEntry, t: &Timeouts) -> u64 {
    match e.tcp {
        Some(TcpState::SynSent | TcpState::SynRecv) => t.tcp_handshake,
        Some(TcpState::Established) => t.tcp_established,
        Some(TcpState::FinWait | TcpState::Closing | TcpState::Reset) => t.tcp_closing,
        None if e.replied => t.udp_stream,
        None => t.udp.max(t.other),
    }
}

/// What the flow table said about a packet.
enum Tracked {
    /// No live flow (or one that a new SYN restarts).
    New,
    /// A verdict with nothing to record.
    Quiet(Reason),
    /// A tracked packet, and what detection made of it.
    Step {
        orig: bool,
        step: L7Step,
        info: FlowInfo,
    },
}

/// What an event about a tracked flow needs from its entry.
struct FlowInfo {
    rule: Option<RuleId>,
    required: u32,
    zones: (ZoneId, ZoneId),
    outbound: bool,
    app: Option<AppProto>,
    /// Inspection cut the flow, for this reason.
    cut: Option<Reason>,
}

impl FlowInfo {
    /// What `e` says of its flow (`required`: the apps its rules asked for).
    fn of(e: &FlowEntry, required: u32) -> FlowInfo {
        FlowInfo {
            rule: e.rule,
            required,
            zones: e.zones,
            outbound: e.outbound,
            app: e.app,
            cut: None,
        }
    }
}

/// The record of a live flow, from its table entry, as its initiator opened it.
fn flow_event_of(
    k: &FlowKey,
    e: &FlowEntry,
    reason: Reason,
    rule: Option<RuleId>,
    mode: Mode,
) -> FlowEvent {
    let ((src, sport), (dst, dport)) = if e.a_is_initiator {
        ((k.a, k.pa), (k.b, k.pb))
    } else {
        ((k.b, k.pb), (k.a, k.pa))
    };
    FlowEvent {
        kind: EventKind::Denied,
        reason,
        dir: if e.outbound {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        proto: k.proto,
        src_mac: MacAddr::default(),
        dst_mac: MacAddr::default(),
        src: addr_from128(src),
        sport,
        dst: addr_from128(dst),
        dport,
        src_zone: e.zones.0,
        dst_zone: e.zones.1,
        rule,
        app_required: 0,
        app_detected: e.app,
        mode,
    }
}

/// Once detection names the flow's rule: inspect as that rule says (the candidates'
/// strictest until then), with its request rules; no inspector if it asks for nothing.
fn settle_inspection(policy: &CompiledPolicy, e: &mut FlowEntry, app: Option<AppProto>) {
    if let Some(fi) = e.inspect.as_mut() {
        let cfg = policy.policy().flow_inspect(e.rule, e.zones.0, e.zones.1);
        let requests = rule_requests(policy, e.rule);
        let keep = cfg.any() || requests.any();
        fi.set_requests(requests);
        fi.set_app(app);
        fi.set_cfg(cfg, policy.policy().dlp_sides(cfg, e.zones.0, e.zones.1));
        if !keep {
            e.inspect = None;
        }
    }
}

/// What a rule allows inside its protocol (nothing said for no rule).
fn rule_requests(
    policy: &CompiledPolicy,
    rule: Option<RuleId>,
) -> Arc<crate::policy::RequestRules> {
    rule.and_then(|r| policy.policy().rules.get(r.0 as usize))
        .map_or_else(Arc::default, |r| r.requests.clone())
}

/// The flow of a packet as its initiator opened it, for a finding's record.
fn finding_flow(ip: &IpPacket<'_>, orig: bool, info: &FlowInfo, mode: Mode) -> FlowEvent {
    let (sport, dport) = ip.l4.ports();
    let ((src, sport), (dst, dport)) = if orig {
        ((ip.src, sport), (ip.dst, dport))
    } else {
        ((ip.dst, dport), (ip.src, sport))
    };
    FlowEvent {
        kind: EventKind::Allowed,
        reason: Reason::Established,
        dir: if info.outbound {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        proto: ip.proto,
        src_mac: MacAddr::default(),
        dst_mac: MacAddr::default(),
        src,
        sport,
        dst,
        dport,
        src_zone: info.zones.0,
        dst_zone: info.zones.1,
        rule: info.rule,
        app_required: info.required,
        app_detected: info.app,
        mode,
    }
}

/// Records findings with the action `cfg` gives each; the reason to cut the flow, if one
/// of them is to be denied (a data leak before a threat when both are).
fn report(
    out: &mut Vec<Finding>,
    counters: &mut Counters,
    found: Vec<Detected>,
    cfg: Inspect,
    flow: FlowEvent,
) -> Option<Reason> {
    let mut cut = None;
    for d in found {
        let action = if d.threat == Threat::RequestDenied {
            // The rule's own terms: a request outside them is refused whatever `inspect`
            // says.
            Some(OnFinding::Deny)
        } else if d.threat.is_dlp() {
            cfg.dlp
        } else {
            cfg.threats
        };
        let Some(action) = action else { continue };
        // Monitor mode records what inspection would have cut.
        let action = if flow.mode == Mode::Enforce {
            action
        } else {
            OnFinding::Alert
        };
        counters.findings[d.threat as usize] += 1;
        if action == OnFinding::Deny {
            let r = match d.threat {
                t if t.is_dlp() => Reason::DataLeak,
                Threat::RequestDenied => Reason::RequestDenied,
                _ => Reason::ThreatDetected,
            };
            cut = Some(cut.map_or(r, |c: Reason| if c == Reason::DataLeak { c } else { r }));
        }
        out.push(Finding {
            threat: d.threat,
            action,
            detail: d.detail,
            data: d.data,
            from_client: d.from_client,
            flow,
        });
    }
    cut
}

enum L7Step {
    /// Nothing to decide (or not yet): pass.
    Pass,
    /// Payload out of order or altered while detecting: drop this segment.
    Reorder,
    /// Detection finished.
    Decided {
        kind: EventKind,
        reason: Reason,
        app: Option<AppProto>,
    },
}

/// Feeds a packet's payload to the flow's pending detection.
#[inline]
fn step_l7(e: &mut FlowEntry, orig: bool, ip: &IpPacket<'_>, mode: Mode) -> L7Step {
    let Some(p) = e.l7.as_mut() else {
        return L7Step::Pass;
    };
    let side_i = usize::from(!orig);
    let side = if orig { Side::Client } else { Side::Server };
    let datagram = !matches!(ip.l4, L4::Tcp(_));
    if let L4::Tcp(t) = &ip.l4 {
        if t.flags.has(TcpFlags::SYN) {
            p.next_seq[side_i] = Some(t.seq.wrapping_add(1));
        }
    }
    let payload = ip.l4.payload();
    if payload.is_empty() {
        return L7Step::Pass;
    }
    let held = usize::from(p.len[side_i]);
    if let L4::Tcp(t) = &ip.l4 {
        let expect = *p.next_seq[side_i].get_or_insert(t.seq);
        if t.seq != expect {
            // A retransmission of bytes already held passes only if it is byte-identical.
            let back = expect.wrapping_sub(t.seq) as usize;
            let same = back <= held
                && payload.len() <= back
                && p.buf[side_i][held - back..held - back + payload.len()] == *payload;
            return if same { L7Step::Pass } else { L7Step::Reorder };
        }
        p.next_seq[side_i] = Some(t.seq.wrapping_add(payload.len() as u32));
    }
    let take = payload.len().min(DETECT_BYTES - held);
    p.buf[side_i][held..held + take].copy_from_slice(&payload[..take]);
    p.len[side_i] = (held + take) as u16;
    // A datagram is judged whole: a DNS query whose name runs past the first 64 bytes is
    // still DNS (a stream's first bytes are all a detector gets).
    let data = if datagram {
        payload
    } else {
        &p.buf[side_i][..held + take]
    };

    if mode == Mode::Learn {
        let app = l7::identify(side, data, datagram);
        let full = held + take == DETECT_BYTES;
        return if app.is_some() || datagram || full {
            L7Step::Decided {
                kind: EventKind::Learned,
                reason: Reason::Learned,
                app,
            }
        } else {
            L7Step::Pass
        };
    }
    let mut pending = false;
    for app in AppProto::ALL {
        let Some(rule) = p.candidates[app.index()] else {
            continue;
        };
        match l7::detect(app, side, data, datagram) {
            Detection::Match => {
                e.rule = Some(rule);
                return L7Step::Decided {
                    kind: EventKind::Allowed,
                    reason: Reason::NewFlowAllowed,
                    app: Some(app),
                };
            }
            Detection::NeedMore => pending = true,
            Detection::NoMatch => {}
        }
    }
    if pending && held + take < DETECT_BYTES {
        return L7Step::Pass;
    }
    let app = l7::identify(side, data, datagram);
    match mode {
        Mode::Monitor => L7Step::Decided {
            kind: EventKind::WouldDeny,
            reason: Reason::AppMismatch,
            app,
        },
        _ => L7Step::Decided {
            kind: EventKind::Denied,
            reason: Reason::AppMismatch,
            app,
        },
    }
}
