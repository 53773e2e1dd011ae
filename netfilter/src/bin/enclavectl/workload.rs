//! Naming workloads and zones on the command line.

use super::{fail, Fail};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
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
                "--workload: unknown key `{other}` (use ns, pod, ip, zone, label.K, annotation.K)"
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
    if s.contains('/') {
        let w = inv.find(s).ok_or_else(|| {
            fail(format!(
                "`{s}` is not in the inventory (pass --inventory FILE)"
            ))
        })?;
        let z = p.zone_of_workload(&w.identity());
        return Ok((z, format!("{s} in zone `{}`", p.zone_name(z))));
    }
    let zones: Vec<&str> = p.zones.iter().map(|z| z.name.as_str()).collect();
    Err(fail(format!(
        "`{s}` is not a zone ({}), an IP address or NAMESPACE/POD",
        zones.join(", ")
    )))
}
