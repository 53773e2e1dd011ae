//! `nft -f` syntax for a rendered table, for review and for `nft` users.

use super::{AddrRange, Hook, KeyField, Match, NftSet, NftTable, NftVerdict};
use crate::packet::proto;
use std::fmt::Write;
use std::net::IpAddr;

impl NftTable {
    /// The table in `nft -f` syntax (`flush`-free: apply replaces the whole table).
    pub fn to_nft_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "table inet {} {{", self.name);
        for set in &self.sets {
            set_text(&mut s, set);
            s.push('\n');
        }
        for set in &self.name_sets {
            let _ = writeln!(
                s,
                "\tset {} {{\n\t\ttype {}\n\t\tflags timeout\n\t\tcomment \"addresses of zone {} this pod resolved (enclave-netd adds them)\"\n\t}}\n",
                set.name,
                if set.v6 { "ipv6_addr" } else { "ipv4_addr" },
                set.zone
            );
        }
        for (i, c) in self.chains.iter().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            let _ = writeln!(s, "\tchain {} {{", c.name);
            if let Some((hook, prio)) = c.hook {
                let h = match hook {
                    Hook::Input => "input",
                    Hook::Output => "output",
                    Hook::Forward => "forward",
                };
                let _ = writeln!(
                    s,
                    "\t\ttype filter hook {h} priority {prio}; policy accept;"
                );
            }
            for r in &c.rules {
                let mut parts: Vec<String> = Vec::new();
                let mut l4 = None;
                for m in &r.matches {
                    let word = match m {
                        Match::Iifname(n) => format!("iifname \"{n}\""),
                        Match::Oifname(n) => format!("oifname \"{n}\""),
                        Match::CtState { established: true } => {
                            "ct state established,related".into()
                        }
                        Match::CtState { established: false } => "ct state invalid".into(),
                        Match::L4Proto(p) => {
                            l4 = Some(*p);
                            format!("meta l4proto {}", proto_word(*p))
                        }
                        Match::Saddr(c) => format!("{} saddr {c}", fam(c.lo)),
                        Match::Daddr(c) => format!("{} daddr {c}", fam(c.lo)),
                        Match::SaddrNot(a) => format!("{} saddr != {a}", fam(*a)),
                        Match::Dport(r) => {
                            // `meta l4proto tcp tcp dport` reads twice; say it once.
                            if let Some(last) = parts.pop() {
                                if !last.starts_with("meta l4proto") {
                                    parts.push(last);
                                }
                            }
                            format!("{} dport {r}", l4.map_or("th", proto_word))
                        }
                        Match::InSet { set, key } => {
                            let fields: Vec<&str> = key
                                .iter()
                                .map(|f| match f {
                                    KeyField::Addr {
                                        v6: false,
                                        src: true,
                                    } => "ip saddr",
                                    KeyField::Addr {
                                        v6: false,
                                        src: false,
                                    } => "ip daddr",
                                    KeyField::Addr {
                                        v6: true,
                                        src: true,
                                    } => "ip6 saddr",
                                    KeyField::Addr {
                                        v6: true,
                                        src: false,
                                    } => "ip6 daddr",
                                    KeyField::L4Proto => "meta l4proto",
                                    KeyField::Dport => "th dport",
                                })
                                .collect();
                            format!("{} @{set}", fields.join(" . "))
                        }
                        Match::Icmpv6Type(t) => {
                            if let Some(last) = parts.pop() {
                                if !last.starts_with("meta l4proto") {
                                    parts.push(last);
                                }
                            }
                            format!("icmpv6 type {t}")
                        }
                    };
                    parts.push(word);
                }
                parts.push("counter".into());
                parts.push(match &r.verdict {
                    NftVerdict::Accept => "accept".into(),
                    NftVerdict::Drop => "drop".into(),
                    NftVerdict::Jump(c) => format!("jump {c}"),
                });
                let _ = writeln!(
                    s,
                    "\t\t{} comment \"{}\"",
                    parts.join(" "),
                    r.comment.replace('"', "'")
                );
            }
            let _ = writeln!(s, "\t}}");
        }
        s.push_str("}\n");
        s
    }
}

fn set_text(s: &mut String, set: &NftSet) {
    let types: Vec<&str> = set
        .key
        .iter()
        .map(|f| match f {
            KeyField::Addr { v6: false, .. } => "ipv4_addr",
            KeyField::Addr { v6: true, .. } => "ipv6_addr",
            KeyField::L4Proto => "inet_proto",
            KeyField::Dport => "inet_service",
        })
        .collect();
    let _ = writeln!(s, "\tset {} {{", set.name);
    let _ = writeln!(s, "\t\ttype {}", types.join(" . "));
    let _ = writeln!(s, "\t\tflags interval");
    let elements: Vec<String> = set
        .elements
        .iter()
        .map(|e| {
            let parts: Vec<String> = set
                .key
                .iter()
                .zip(e)
                .map(|(f, &(lo, hi))| match f {
                    KeyField::Addr { v6, .. } => AddrRange::from_bits(lo, hi, *v6).to_string(),
                    _ if lo == hi => lo.to_string(),
                    _ => format!("{lo}-{hi}"),
                })
                .collect();
            parts.join(" . ")
        })
        .collect();
    let _ = writeln!(
        s,
        "\t\telements = {{ {} }}",
        elements.join(",\n\t\t\t     ")
    );
    let _ = writeln!(s, "\t}}");
}

fn fam(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

fn proto_word(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMP => "icmp",
        proto::ICMPV6 => "ipv6-icmp",
        _ => "th",
    }
}
