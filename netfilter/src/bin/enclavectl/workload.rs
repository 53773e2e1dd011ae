//! Naming workloads and zones on the command line.

use super::{fail, Fail};
use enclave_netfilter::identity::{ClusterPeers, Inventory, PeerDirectory};
use enclave_netfilter::policy::{CompiledPolicy, WorkloadIdentity, ZoneId, ZONE_ANNOTATION};
use std::net::IpAddr;

/// A workload named on the command line.
pub struct CliWorkload {
    pub identity: WorkloadIdentity,
    pub ips: Vec<IpAddr>,
}

/// `NAMESPACE/POD` from the inventory, or `ns=..,pod=..,ip=..,label.K=V,zone=Z` inline.
pub fn parse(s: &str, inv: &Inventory) -> Result<CliWorkload, Fail> {
    if !s.contains('=') {
        let w = inv.find(s).ok_or_else(|| {
            let known: Vec<String> = inv.workloads.iter().map(|w| w.reference()).collect();
            fail(format!(
                "--workload `{s}` is not in the inventory{}",
                if known.is_empty() {
                    " (pass --inventory FILE, or describe it inline: ns=NS,pod=NAME,ip=IP)"
                        .to_string()
                } else {
                    format!("; known: {}", known.join(", "))
                }
            ))
        })?;
        return Ok(CliWorkload {
            identity: w.identity(),
            ips: w.ips.clone(),
        });
    }
    let mut w = CliWorkload {
        identity: WorkloadIdentity::default(),
        ips: Vec::new(),
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| fail(format!("--workload: `{part}` is not KEY=VALUE")))?;
        match k {
            "ns" | "namespace" => w.identity.namespace = v.into(),
            "pod" | "name" => w.identity.name = v.into(),
            "ip" => w.ips.push(
                v.parse()
                    .map_err(|_| fail(format!("--workload: ip `{v}` is not an IP address")))?,
            ),
            "zone" => {
                w.identity
                    .annotations
                    .insert(ZONE_ANNOTATION.into(), v.into());
            }
            k if k.starts_with("nslabel.") => {
                w.identity
                    .namespace_labels
                    .insert(k["nslabel.".len()..].into(), v.into());
            }
            k if k.starts_with("label.") => {
                w.identity
                    .labels
                    .insert(k["label.".len()..].into(), v.into());
            }
            k if k.starts_with("annotation.") => {
                w.identity
                    .annotations
                    .insert(k["annotation.".len()..].into(), v.into());
            }
            other => {
                return Err(fail(format!(
                "--workload: unknown key `{other}` (use ns, pod, ip, zone, label.K, nslabel.K, annotation.K)"
            )))
            }
        }
    }
    if w.identity.name.is_empty() {
        w.identity.name = "workload".into();
    }
    Ok(w)
}

/// A zone named as a zone, an IP address or a workload reference.
pub fn resolve_zone(
    c: &CompiledPolicy,
    peers: &PeerDirectory,
    inv: &Inventory,
    cluster: Option<&ClusterPeers>,
    s: &str,
) -> Result<(ZoneId, String), Fail> {
    let p = c.policy();
    if let Some(z) = p.zone_id(s.strip_prefix("zone:").unwrap_or(s)) {
        return Ok((z, format!("zone `{}`", p.zone_name(z))));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        let z = peers.zone_of(c, ip);
        let who = peers
            .get(ip)
            .map(|p| format!(" ({}/{})", p.identity.namespace, p.identity.name))
            .unwrap_or_default();
        return Ok((z, format!("{ip}{who} in zone `{}`", p.zone_name(z))));
    }
    if s.contains('=') {
        let w = parse(s, inv)?;
        let z = p.zone_of_workload(&w.identity);
        return Ok((z, describe(c, &w.identity, z)));
    }
    if s.contains('/') {
        let identity = match (inv.find(s), cluster.and_then(|m| m.find(s))) {
            (Some(w), _) => w.identity(),
            (None, Some(w)) => (**w).clone(),
            (None, None) => {
                return Err(fail(format!(
                    "`{s}` is not in the inventory or the cluster map (pass --inventory FILE or --peers DIR, or describe it inline: ns=NS,pod=NAME,label.K=V,nslabel.K=V)"
                )))
            }
        };
        let z = p.zone_of_workload(&identity);
        return Ok((z, describe(c, &identity, z)));
    }
    // A DNS name: the name zone whose names match it (its addresses join that zone for
    // a pod once the pod resolves it).
    if s.contains('.') && enclave_netfilter::policy::check_name_pattern(s).is_ok() {
        let name = s.trim_end_matches('.').to_ascii_lowercase();
        if let Some((i, z)) = p.zones.iter().enumerate().find(|(_, z)| {
            z.names
                .iter()
                .any(|n| enclave_netfilter::policy::name_matches(n, &name))
        }) {
            let pattern = z
                .names
                .iter()
                .find(|n| enclave_netfilter::policy::name_matches(n, &name))
                .cloned()
                .unwrap_or_default();
            return Ok((
                ZoneId((i + 1) as u16),
                format!(
                    "{name} in name zone `{}`\n{name}: matches `{pattern}`; its addresses join the zone for a pod once that pod's own DNS answer names them, for the answer's TTL ({}–{} s); an address the pod never resolved is not in it",
                    z.name, p.names_ttl.min, p.names_ttl.max
                ),
            ));
        }
        return Ok((
            ZoneId::UNKNOWN,
            format!("{name} in zone `unknown` (no zone lists this name; its addresses are whatever zone their CIDR says)"),
        ));
    }
    let zones: Vec<&str> = p.zones.iter().map(|z| z.name.as_str()).collect();
    Err(fail(format!(
        "`{s}` is not a zone ({}), an IP address, NAMESPACE/POD or a DNS name",
        zones.join(", ")
    )))
}

/// `namespace/pod in zone `z``, then a line with its labels and what put it in that zone.
fn describe(c: &CompiledPolicy, w: &WorkloadIdentity, z: ZoneId) -> String {
    let p = c.policy();
    let show = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut facts = Vec::new();
    if !w.labels.is_empty() {
        facts.push(format!("labels {}", show(&w.labels)));
    }
    if !w.namespace_labels.is_empty() {
        facts.push(format!("namespace labels {}", show(&w.namespace_labels)));
    }
    let facts = if facts.is_empty() {
        String::new()
    } else {
        format!(" ({})", facts.join("; "))
    };
    let why = if let Some(v) = w.annotations.get(ZONE_ANNOTATION) {
        format!("its {ZONE_ANNOTATION} annotation names `{v}`")
    } else if let Some(v) = w.labels.get(ZONE_ANNOTATION) {
        format!("its {ZONE_ANNOTATION} label names `{v}`")
    } else if z == ZoneId::UNKNOWN {
        "no zone's selector matches it".to_string()
    } else {
        let others: Vec<&str> = p
            .zones
            .iter()
            .skip(z.0 as usize)
            .filter(|o| o.selector.as_ref().is_some_and(|s| s.matches(w)))
            .map(|o| o.name.as_str())
            .collect();
        if others.is_empty() {
            format!("zone `{}`'s selector matches it", p.zone_name(z))
        } else {
            format!(
                "zone `{}`'s selector matches it, and comes before {} in the file",
                p.zone_name(z),
                others.join(", ")
            )
        }
    };
    format!(
        "{}/{} in zone `{}`\n  {}/{}{facts}: {why}",
        w.namespace,
        w.name,
        p.zone_name(z),
        w.namespace,
        w.name
    )
}
