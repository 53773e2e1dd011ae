//! The pod network carried into the guest. CNI has made the pod's network namespace with an
//! interface (`eth0`, the pod IP, a default route). The shim adds a tap next to it and
//! bridges the two, and the guest's NIC takes the interface's MAC and addresses. The tap is owned by
//! enclave-netd, the vhost-user net backend the VM's NIC talks to — the only way the
//! guest's frames leave the VM, and the place the zone policy is enforced.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the guest needs to take over the pod's interface.
#[derive(Debug, Clone, PartialEq)]
pub struct PodNet {
    /// The pod's network namespace file.
    pub netns: PathBuf,
    /// The CNI interface's name (eth0).
    pub ifname: String,
    /// Its MAC: the guest NIC uses it, so the pod's peers need not learn a new one.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses in CIDR form.
    pub addresses: Vec<String>,
    /// The default gateway, if any.
    pub gateway: Option<String>,
}

/// The tap the shim adds in the pod namespace.
pub const TAP: &str = "tap0";

/// The network namespace path in an OCI spec, if it names one.
pub fn netns_of(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

fn in_netns(netns: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .map_err(|e| format!("nsenter {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "in the pod network namespace, `{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Reads the pod interface CNI made (the first non-loopback one).
pub fn discover(netns: &Path) -> Result<PodNet, String> {
    let links: serde_json::Value =
        serde_json::from_str(&in_netns(netns, &["ip", "-j", "addr", "show"])?)
            .map_err(|e| format!("ip -j addr: {e}"))?;
    let link = links
        .as_array()
        .and_then(|l| {
            l.iter().find(|l| {
                l["ifname"] != "lo"
                    && l["ifname"] != TAP
                    && l["ifname"] != BRIDGE
                    && l["link_type"] == "ether"
            })
        })
        .ok_or("the pod network namespace has no ethernet interface (did CNI run?)")?;
    let addresses = link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["scope"] == "global")
                .filter_map(|a| {
                    Some(format!(
                        "{}/{}",
                        a["local"].as_str()?,
                        a["prefixlen"].as_u64()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let routes: serde_json::Value =
        serde_json::from_str(&in_netns(netns, &["ip", "-j", "route", "show", "default"])?)
            .unwrap_or_default();
    let gateway = routes
        .as_array()
        .and_then(|r| r.first())
        .and_then(|r| r["gateway"].as_str())
        .map(String::from);
    Ok(PodNet {
        netns: netns.to_path_buf(),
        ifname: link["ifname"].as_str().unwrap_or("eth0").into(),
        mac: link["address"]
            .as_str()
            .ok_or("pod interface without a MAC")?
            .into(),
        mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
        addresses,
        gateway,
    })
}

/// The bridge joining the pod interface and the tap.
pub const BRIDGE: &str = "enc0";

/// A locally administered MAC for the pod interface once the guest has taken its own: the
/// bridge must not treat frames to the guest's MAC as its own port's.
fn port_mac(guest: &str) -> String {
    let mut b: Vec<u8> = guest
        .split(':')
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    b.resize(6, 0);
    b[0] = (b[0] | 0x02) & 0xfe;
    b[5] ^= 0xff;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Adds the tap and bridges it with the pod interface. Bridged IP traffic goes through the
/// namespace's netfilter hooks (`bridge-nf-call-iptables` / `-ip6tables`), where the pod's
/// nftables table (the second wall) sees every frame between the two; the guest answers for
/// the pod's MAC and IP, the namespace's own stack keeps out of the way.
pub fn plumb(net: &PodNet) -> Result<(), String> {
    let ns = &net.netns;
    let mtu = net.mtu.to_string();
    let pm = port_mac(&net.mac);
    in_netns(ns, &["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])?;
    in_netns(ns, &["ip", "link", "set", TAP, "mtu", &mtu])?;
    in_netns(ns, &["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    in_netns(
        ns,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{BRIDGE}.disable_ipv6=1"),
        ],
    )?;
    for k in [
        "net.bridge.bridge-nf-call-iptables=1",
        "net.bridge.bridge-nf-call-ip6tables=1",
    ] {
        in_netns(ns, &["sysctl", "-qw", k])?;
    }
    // The guest owns the pod's addresses now: the namespace's own stack must not answer ARP
    // for them or speak on the bridge.
    in_netns(ns, &["ip", "addr", "flush", "dev", &net.ifname])?;
    for dev in [net.ifname.as_str(), TAP] {
        in_netns(
            ns,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
            ],
        )?;
    }
    in_netns(ns, &["ip", "link", "set", &net.ifname, "address", &pm])?;
    in_netns(ns, &["ip", "link", "set", BRIDGE, "mtu", &mtu, "up"])?;
    for port in [net.ifname.as_str(), TAP] {
        in_netns(ns, &["ip", "link", "set", port, "master", BRIDGE, "up"])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bridge_port_gets_a_local_mac_of_its_own() {
        assert_eq!(port_mac("0a:58:0a:58:4d:05"), "0a:58:0a:58:4d:fa");
        assert_eq!(port_mac("01:00:00:00:00:00"), "02:00:00:00:00:ff");
    }

    #[test]
    fn the_network_namespace_comes_from_the_spec() {
        let s = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(netns_of(&s), Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(
            netns_of(&serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}})),
            None
        );
    }
}
