//! The host-kernel wall: a workload's zone policy rendered as an nftables table.
//!
//! [`render`] turns the policy, as it applies to one workload, into a small IR
//! ([`NftTable`]); [`NftTable::to_nft_text`] prints it in `nft -f` syntax for review, and
//! [`apply`] installs it through netlink (`nftnl`) in a network namespace, atomically and
//! idempotently, with a counter on every rule. The kernel layer is L4 and stateful
//! (conntrack); application protocols are enforced by `enclave-netd` and noted in comments.

mod addrs;
mod apply;
mod kernel_sets;
pub mod model;
mod names;
mod sets;
mod text;

pub use addrs::{ipv4_mapped, AddrRange, ZoneAddrs};
pub use apply::{apply, remove, NftError};
pub use names::NameSetWriter;
pub use sets::{Element, KeyField, NftSet, Span, SET_MIN_ELEMENTS};

use crate::identity::PeerDirectory;
use crate::packet::proto;
use crate::policy::{Action, CompiledPolicy, Mode, PortRange, Protocol, WorkloadIdentity, ZoneId};
use std::net::IpAddr;

/// Where the workload sits relative to the namespace the table goes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The namespace's own stack is the workload (input/output hooks).
    Local,
    /// The workload's traffic is forwarded through this namespace on `interface`.
    Forward {
        /// The interface facing the workload (the pod's tap).
        interface: String,
    },
    /// The workload's NIC is bridged with the pod's CNI interface in this namespace (the
    /// shim's pod plumbing), and `bridge-nf-call-iptables` / `-ip6tables` send bridged IP
    /// traffic through the inet hooks. Interfaces are not visible there (both sides are the
    /// bridge), so direction comes from the workload's addresses, and a frame that is
    /// neither from nor to them is dropped as spoofed.
    Bridged,
}

/// Base chain hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Local input.
    Input,
    /// Local output.
    Output,
    /// Forwarding.
    Forward,
}

/// Rule verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftVerdict {
    /// Accept.
    Accept,
    /// Drop.
    Drop,
    /// Jump to a chain.
    Jump(String),
}

/// One match of a rule (all matches of a rule must hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Input interface name.
    Iifname(String),
    /// Output interface name.
    Oifname(String),
    /// Conntrack state is one of: established/related (`true`) or invalid (`false`).
    CtState {
        /// `true`: established or related; `false`: invalid.
        established: bool,
    },
    /// Layer 4 protocol number.
    L4Proto(u8),
    /// Source address in the range.
    Saddr(AddrRange),
    /// Destination address in the range.
    Daddr(AddrRange),
    /// Source address is not this one (anti-spoofing).
    SaddrNot(IpAddr),
    /// Destination port in the range (the protocol must be matched before).
    Dport(PortRange),
    /// ICMPv6 type.
    Icmpv6Type(u8),
    /// The packet's key (the fields the set names, concatenated) is in the set.
    InSet {
        /// The set's name.
        set: String,
        /// Its key.
        key: Vec<KeyField>,
    },
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    /// Matches.
    pub matches: Vec<Match>,
    /// Verdict.
    pub verdict: NftVerdict,
    /// Comment (names the policy rule); every rule also counts.
    pub comment: String,
}

/// One chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    /// Name.
    pub name: String,
    /// Base chain hook and priority (policy is always accept: rules decide).
    pub hook: Option<(Hook, i32)>,
    /// Rules in order.
    pub rules: Vec<NftRule>,
}

/// A table of family `inet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    /// Name.
    pub name: String,
    /// Named sets the chains look up (created before the chains).
    pub sets: Vec<NftSet>,
    /// Sets of addresses netd learns from the pod's DNS answers (one per name zone and
    /// family), created empty with per-element timeouts; netd adds to them.
    pub name_sets: Vec<NameSet>,
    /// Chains.
    pub chains: Vec<NftChain>,
}

/// A set of a name zone's addresses, filled at run time by netd ([`NameSetWriter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameSet {
    /// The set's name in the table ([`name_set`]).
    pub name: String,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// The zone, for comments.
    pub zone: String,
}

/// The name of the set holding name zone `zone`'s addresses of one family.
pub fn name_set(zone: ZoneId, v6: bool) -> String {
    format!("names_{}_{}", zone.0, if v6 { "v6" } else { "v4" })
}

/// The workload a table is rendered for.
#[derive(Debug, Clone)]
pub struct NftWorkload<'a> {
    /// Identity (its zone follows from it).
    pub identity: &'a WorkloadIdentity,
    /// Its addresses.
    pub ips: &'a [IpAddr],
}

const NDP_TYPES: [u8; 5] = [133, 134, 135, 136, 143];

/// A table name for a workload: `enclave_<namespace>_<pod>`, sanitised.
pub fn table_name(w: &WorkloadIdentity) -> String {
    let raw = format!("enclave_{}_{}", w.namespace, w.name);
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(200);
    s
}

/// Renders the policy as it applies to `w` into a table: one rule per address range ×
/// port range, then every long run of rules with the same verdict folded into set lookups
/// (see [`NftSet`]), so the first packet of a new flow costs a few lookups whatever the
/// policy's size.
pub fn render(
    policy: &CompiledPolicy,
    peers: &PeerDirectory,
    w: &NftWorkload<'_>,
    placement: &Placement,
) -> NftTable {
    fold_into_sets(render_rules(policy, peers, w, placement), SET_MIN_ELEMENTS)
}

/// Folds every run of same-verdict rules with at least `min_elements` elements of one key
/// shape into a set lookup ([`render`] does this with [`SET_MIN_ELEMENTS`]). Decides every
/// packet as `table` does.
pub fn fold_into_sets(table: NftTable, min_elements: usize) -> NftTable {
    sets::fold(table, min_elements.max(1))
}

/// Renders the policy as it applies to `w` into a table of plain rules, one per address
/// range × port range and no sets: the reference [`render`] folds, and the baseline its
/// benchmark compares with.
pub fn render_rules(
    policy: &CompiledPolicy,
    peers: &PeerDirectory,
    w: &NftWorkload<'_>,
    placement: &Placement,
) -> NftTable {
    let p = policy.policy();
    let zone = p.zone_of_workload(w.identity);
    let mode = p.zone_mode(zone);
    // The addresses of every zone, as netd resolves them (disjoint across zones).
    let zones = ZoneAddrs::new(policy, peers, w.ips);
    let all_known = zones.known();

    let mut to_w = vec![
        rule(
            vec![Match::CtState { established: true }],
            NftVerdict::Accept,
            "established and related flows",
        ),
        rule(
            vec![Match::CtState { established: false }],
            NftVerdict::Drop,
            "invalid conntrack state",
        ),
    ];
    for (matches, what) in [
        (
            Match::Saddr(AddrRange::of_cidr(addrs::ipv4_mapped())),
            "source",
        ),
        (
            Match::Daddr(AddrRange::of_cidr(addrs::ipv4_mapped())),
            "destination",
        ),
    ] {
        to_w.push(NftRule {
            matches: vec![matches],
            verdict: NftVerdict::Drop,
            comment: format!("IPv4-mapped IPv6 {what} address (never on the wire)"),
        });
    }
    let mut from_w = to_w.clone();
    for t in NDP_TYPES {
        let ndp = vec![Match::L4Proto(proto::ICMPV6), Match::Icmpv6Type(t)];
        to_w.push(rule(
            ndp.clone(),
            NftVerdict::Accept,
            "IPv6 neighbour discovery",
        ));
        if t != 134 {
            from_w.push(rule(ndp, NftVerdict::Accept, "IPv6 neighbour discovery"));
        }
    }
    if matches!(placement, Placement::Forward { .. }) {
        for ip in w.ips {
            // One address per family can be pinned this way; netd checks them all.
            if w.ips.iter().filter(|o| o.is_ipv4() == ip.is_ipv4()).count() == 1 {
                from_w.push(NftRule {
                    matches: vec![Match::SaddrNot(*ip)],
                    verdict: NftVerdict::Drop,
                    comment: format!("anti-spoofing: only {ip} may leave the workload"),
                });
            }
        }
    }

    // Name zones: their addresses are learned by netd for this pod and put in sets. Their
    // rules come first (denies, then allows): netd decides a learned address as the name
    // zone ahead of any CIDR zone that also holds it.
    let mut name_sets = Vec::new();
    for (i, z) in p.zones.iter().enumerate() {
        if z.names.is_empty() {
            continue;
        }
        for v6 in [false, true] {
            name_sets.push(NameSet {
                name: name_set(ZoneId((i + 1) as u16), v6),
                v6,
                zone: z.name.clone(),
            });
        }
    }
    let mut named_denies = Vec::new();
    let mut named_allows = Vec::new();
    for r in p.rules.iter().filter(|r| r.from.contains(&zone)) {
        for &pz in &r.to {
            let Some(z) =
                pz.0.checked_sub(1)
                    .and_then(|i| p.zones.get(usize::from(i)))
            else {
                continue;
            };
            if z.names.is_empty() {
                continue;
            }
            let enforce_deny = r.action == Action::Deny && mode == Mode::Enforce;
            for v6 in [false, true] {
                for l4 in l4_matches(r.protocol, &r.ports) {
                    let mut m = vec![Match::InSet {
                        set: name_set(pz, v6),
                        key: vec![KeyField::Addr { v6, src: false }],
                    }];
                    m.extend(l4);
                    let nr = NftRule {
                        matches: m,
                        verdict: if enforce_deny {
                            NftVerdict::Drop
                        } else {
                            NftVerdict::Accept
                        },
                        comment: format!(
                            "{} rule {} to names of zone {} (learned by enclave-netd)",
                            if r.action == Action::Allow {
                                "allow"
                            } else {
                                "deny"
                            },
                            r.name,
                            z.name
                        ),
                    };
                    if r.action == Action::Deny {
                        named_denies.push(nr);
                    } else {
                        named_allows.push(nr);
                    }
                }
            }
        }
    }
    from_w.extend(named_denies);
    from_w.extend(named_allows);

    // Deny rules first, then allows for known zones, then allows for `unknown` behind a
    // guard that drops every known address (so `unknown` never widens to a known zone).
    for (dir_rules, egress) in [(&mut from_w, true), (&mut to_w, false)] {
        let mut denies = Vec::new();
        let mut allows = Vec::new();
        let mut unknown_allows = Vec::new();
        for r in &p.rules {
            let (ours, peers_of) = if egress {
                (&r.from, &r.to)
            } else {
                (&r.to, &r.from)
            };
            if !ours.contains(&zone) {
                continue;
            }
            let app = r
                .app
                .map(|a| format!("; app {a} enforced by enclave-netd"))
                .unwrap_or_default();
            let comment = format!(
                "{} rule {}{app}",
                if r.action == Action::Allow {
                    "allow"
                } else {
                    "deny"
                },
                r.name
            );
            // Outside enforce mode a deny rule only counts (netd records the would-be
            // denial); the kernel wall must not block what the zone's mode lets through.
            let verdict = if r.action == Action::Allow || mode != Mode::Enforce {
                NftVerdict::Accept
            } else {
                NftVerdict::Drop
            };
            let comment = if r.action == Action::Deny && mode != Mode::Enforce {
                format!(
                    "{comment} (zone in {} mode: counted, passed)",
                    mode.as_str()
                )
            } else {
                comment
            };
            for &pz in peers_of {
                let addrs = zones.of(pz);
                if pz != ZoneId::UNKNOWN && addrs.is_empty() {
                    continue;
                }
                let addr_matches: Vec<Option<Match>> = if pz == ZoneId::UNKNOWN {
                    vec![None]
                } else {
                    addrs
                        .iter()
                        .map(|c| {
                            Some(if egress {
                                Match::Daddr(*c)
                            } else {
                                Match::Saddr(*c)
                            })
                        })
                        .collect()
                };
                for am in addr_matches {
                    for l4 in l4_matches(r.protocol, &r.ports) {
                        let mut m: Vec<Match> = am.iter().cloned().collect();
                        m.extend(l4);
                        let nr = NftRule {
                            matches: m,
                            verdict: verdict.clone(),
                            comment: comment.clone(),
                        };
                        match (r.action, pz == ZoneId::UNKNOWN) {
                            (Action::Deny, _) => denies.push(nr),
                            (Action::Allow, false) => allows.push(nr),
                            (Action::Allow, true) => unknown_allows.push(nr),
                        }
                    }
                }
            }
        }
        dir_rules.extend(denies);
        dir_rules.extend(allows);
        if !unknown_allows.is_empty() {
            for c in &all_known {
                let m = if egress {
                    Match::Daddr(*c)
                } else {
                    Match::Saddr(*c)
                };
                // Outside enforce mode the wall passes what it would drop, as for denies.
                dir_rules.push(NftRule {
                    matches: vec![m],
                    verdict: if mode == Mode::Enforce {
                        NftVerdict::Drop
                    } else {
                        NftVerdict::Accept
                    },
                    comment: "known zone not allowed above".into(),
                });
            }
            dir_rules.extend(unknown_allows);
        }
        let (verdict, comment) = match mode {
            Mode::Enforce => (NftVerdict::Drop, "default deny".to_string()),
            m => (
                NftVerdict::Accept,
                format!(
                    "default deny (zone in {} mode: counted, passed)",
                    m.as_str()
                ),
            ),
        };
        dir_rules.push(NftRule {
            matches: vec![],
            verdict,
            comment,
        });
    }

    let mut chains = Vec::new();
    match placement {
        Placement::Local => {
            chains.push(NftChain {
                name: "input".into(),
                hook: Some((Hook::Input, 0)),
                rules: vec![
                    rule(
                        vec![Match::Iifname("lo".into())],
                        NftVerdict::Accept,
                        "loopback",
                    ),
                    rule(
                        vec![],
                        NftVerdict::Jump("to_workload".into()),
                        "zone policy, inbound",
                    ),
                ],
            });
            chains.push(NftChain {
                name: "output".into(),
                hook: Some((Hook::Output, 0)),
                rules: vec![
                    rule(
                        vec![Match::Oifname("lo".into())],
                        NftVerdict::Accept,
                        "loopback",
                    ),
                    rule(
                        vec![],
                        NftVerdict::Jump("from_workload".into()),
                        "zone policy, outbound",
                    ),
                ],
            });
        }
        Placement::Forward { interface } => {
            chains.push(NftChain {
                name: "forward".into(),
                hook: Some((Hook::Forward, 0)),
                rules: vec![
                    rule(
                        vec![Match::Oifname(interface.clone())],
                        NftVerdict::Jump("to_workload".into()),
                        "zone policy, inbound",
                    ),
                    rule(
                        vec![Match::Iifname(interface.clone())],
                        NftVerdict::Jump("from_workload".into()),
                        "zone policy, outbound",
                    ),
                ],
            });
        }
        Placement::Bridged => {
            let mut rules = Vec::new();
            for ip in w.ips {
                rules.push(rule(
                    vec![Match::Daddr(AddrRange::host(*ip))],
                    NftVerdict::Jump("to_workload".into()),
                    "zone policy, inbound",
                ));
                rules.push(rule(
                    vec![Match::Saddr(AddrRange::host(*ip))],
                    NftVerdict::Jump("from_workload".into()),
                    "zone policy, outbound",
                ));
            }
            for t in NDP_TYPES {
                rules.push(rule(
                    vec![Match::L4Proto(proto::ICMPV6), Match::Icmpv6Type(t)],
                    NftVerdict::Accept,
                    "IPv6 neighbour discovery (link-local)",
                ));
            }
            rules.push(rule(
                vec![],
                NftVerdict::Drop,
                "anti-spoofing: neither from nor to the workload's addresses",
            ));
            chains.push(NftChain {
                name: "forward".into(),
                hook: Some((Hook::Forward, 0)),
                rules,
            });
        }
    }
    chains.push(NftChain {
        name: "to_workload".into(),
        hook: None,
        rules: to_w,
    });
    chains.push(NftChain {
        name: "from_workload".into(),
        hook: None,
        rules: from_w,
    });
    NftTable {
        name: table_name(w.identity),
        sets: Vec::new(),
        name_sets,
        chains,
    }
}

fn rule(matches: Vec<Match>, verdict: NftVerdict, comment: &str) -> NftRule {
    NftRule {
        matches,
        verdict,
        comment: comment.to_string(),
    }
}

/// Protocol and port matches of a rule, one alternative per element.
fn l4_matches(p: Protocol, ports: &[PortRange]) -> Vec<Vec<Match>> {
    let with_ports = |proto: u8| -> Vec<Vec<Match>> {
        ports
            .iter()
            .map(|r| {
                if *r == PortRange::ALL {
                    vec![Match::L4Proto(proto)]
                } else {
                    vec![Match::L4Proto(proto), Match::Dport(*r)]
                }
            })
            .collect()
    };
    match p {
        Protocol::Tcp => with_ports(proto::TCP),
        Protocol::Udp => with_ports(proto::UDP),
        Protocol::Icmp => vec![vec![Match::L4Proto(proto::ICMP)]],
        Protocol::Icmpv6 => vec![vec![Match::L4Proto(proto::ICMPV6)]],
        Protocol::Any => vec![vec![]],
    }
}

/// Something in a policy the kernel wall does not enforce as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// How much it matters: a warning where the wall refuses what the policy allows, a note
    /// where netd alone enforces part of a rule.
    pub severity: crate::policy::Severity,
    /// The policy field, like `spec.rules[3].app`.
    pub field: String,
    /// What the wall does instead.
    pub message: String,
}

/// What the nftables layer cannot express of `policy`, by field, for `policy check`.
pub fn limits(policy: &crate::policy::Policy) -> Vec<Limit> {
    use crate::policy::Severity;
    let mut out = Vec::new();
    let mapped = AddrRange::of_cidr(addrs::ipv4_mapped());
    for (i, z) in policy.zones.iter().enumerate() {
        for (j, c) in z.cidrs.iter().enumerate() {
            let r = AddrRange::of_cidr(*c);
            if mapped.contains(r.lo) && mapped.contains(r.hi) {
                out.push(Limit {
                    severity: Severity::Warning,
                    field: format!("spec.zones[{i}].cidrs[{j}]"),
                    message: format!(
                        "`{c}` is IPv4-mapped IPv6: the kernel wall drops such addresses (never valid on the wire, a known way past IPv4 filters), so zone `{}` gets no traffic from them; write the IPv4 CIDR",
                        z.name
                    ),
                });
            }
        }
    }
    for (i, r) in policy.rules.iter().enumerate() {
        if let (Some(app), Action::Allow) = (r.app, r.action) {
            out.push(Limit {
                severity: Severity::Note,
                field: format!("spec.rules[{i}].app"),
                message: format!(
                    "the kernel wall (nftables) allows {} for rule `{}` whatever the payload; `{app}` is checked by enclave-netd alone",
                    ports_text(r.protocol, &r.ports),
                    r.name,
                ),
            });
        }
    }
    out
}

/// `tcp/80,8000-8080`, `udp` (every port), `icmp`.
fn ports_text(p: Protocol, ports: &[PortRange]) -> String {
    let list: Vec<String> = ports
        .iter()
        .filter(|r| **r != PortRange::ALL)
        .map(|r| {
            if r.lo == r.hi {
                r.lo.to_string()
            } else {
                format!("{}-{}", r.lo, r.hi)
            }
        })
        .collect();
    if list.is_empty() {
        p.as_str().to_string()
    } else {
        format!("{}/{}", p.as_str(), list.join(","))
    }
}

impl NftTable {
    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// Number of set elements.
    pub fn element_count(&self) -> usize {
        self.sets.iter().map(|s| s.elements.len()).sum()
    }
}
