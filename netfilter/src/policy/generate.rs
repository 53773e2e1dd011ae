//! Generated policies of a given size, the shape per-service generators produce: for
//! benchmarks, scale tests and demos of policies with thousands of rules.

/// What to generate: zone `app` (the pods of namespace `namespace`), 100 CIDR zones `p0` ..
/// `p99` (`10.100.0.0/24`, `10.100.1.0/24`, ...), and `rules` one-port TCP allow rules `r0`,
/// `r1`, ... between `app` and `p{i % 100}` on port `1000 + i % 60000`; then the
/// `extra_zones` and `extra_rules` given (YAML flow mappings, one list item each).
#[derive(Debug, Clone)]
pub struct ManyRules<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.version`.
    pub version: u32,
    /// The namespace whose pods make zone `app`.
    pub namespace: &'a str,
    /// How many generated rules.
    pub rules: usize,
    /// `true`: from `p{i}` to `app`; `false`: from `app` to `p{i}`.
    pub inbound: bool,
    /// Zones added after the generated ones.
    pub extra_zones: &'a [&'a str],
    /// Rules added after the generated ones.
    pub extra_rules: &'a [&'a str],
}

/// The number of CIDR zones [`ManyRules`] makes.
pub const PEER_ZONES: usize = 100;

impl ManyRules<'_> {
    /// The policy's YAML.
    pub fn yaml(&self) -> String {
        let mut s = format!(
            "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {{name: {}, version: {}}}\nspec:\n  zones:\n    - {{name: app, selector: {{namespaces: [{}]}}}}\n",
            self.name, self.version, self.namespace
        );
        for z in 0..PEER_ZONES {
            s.push_str(&format!(
                "    - {{name: p{z}, cidrs: [10.{}.{}.0/24]}}\n",
                100 + z / 256,
                z % 256
            ));
        }
        for z in self.extra_zones {
            s.push_str(&format!("    - {z}\n"));
        }
        s.push_str("  rules:\n");
        for i in 0..self.rules {
            let peer = format!("p{}", i % PEER_ZONES);
            let (from, to) = if self.inbound {
                (peer.as_str(), "app")
            } else {
                ("app", peer.as_str())
            };
            s.push_str(&format!(
                "    - {{name: r{i}, from: {from}, to: {to}, protocol: tcp, ports: [{}]}}\n",
                1000 + i % 60000
            ));
        }
        for r in self.extra_rules {
            s.push_str(&format!("    - {r}\n"));
        }
        s
    }
}

/// Zones that select [`cluster`]'s pods by labels (for [`ManyRules::extra_zones`]).
pub const CLUSTER_ZONES: [&str; 3] = [
    "{name: cde-db, selector: {namespaceSelector: {matchLabels: {pci: cde}}, matchLabels: {app: db}}}",
    "{name: cde-api, selector: {namespaceSelector: {matchLabels: {pci: cde}}, matchExpressions: [{key: app, operator: In, values: [api]}]}}",
    "{name: web, selector: {matchLabels: {app: web}}}",
];

/// A cluster map of `pods` pods in `namespaces` namespaces, as enclave-node would publish
/// it: pod `i` is `pod-{i}` in namespace `ns-{i % namespaces}` at 10.200.{i / 250}.{i % 250 + 1},
/// labelled `app` = api, db, web or worker (by `i % 4`); namespaces `ns-{n}` with
/// `n % 4 < 2` are labelled `pci: cde`.
pub fn cluster(pods: usize, namespaces: usize) -> crate::identity::ClusterMap {
    use crate::identity::{ClusterMap, ClusterPod, CLUSTER_MAP_FORMAT};
    let namespaces = namespaces.max(1);
    let pods = (0..pods)
        .map(|i| {
            let ns = i % namespaces;
            ClusterPod {
                uid: format!("00000000-0000-4000-8000-{i:012}"),
                namespace: format!("ns-{ns}"),
                name: format!("pod-{i}"),
                node: format!("node-{}", i % 50),
                ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                    10,
                    200 + (i / 62_500) as u8,
                    (i / 250 % 250) as u8,
                    (i % 250 + 1) as u8,
                ))],
                labels: [
                    (
                        "app".to_string(),
                        ["api", "db", "web", "worker"][i % 4].to_string(),
                    ),
                    (
                        "pod-template-hash".to_string(),
                        format!("{:08x}", i * 2_654_435_761 % 0xffff_ffff),
                    ),
                ]
                .into(),
                annotations: Default::default(),
                namespace_labels: if ns % 4 < 2 {
                    [
                        ("pci".to_string(), "cde".to_string()),
                        (
                            "kubernetes.io/metadata.name".to_string(),
                            format!("ns-{ns}"),
                        ),
                    ]
                    .into()
                } else {
                    [(
                        "kubernetes.io/metadata.name".to_string(),
                        format!("ns-{ns}"),
                    )]
                    .into()
                },
            }
        })
        .collect();
    ClusterMap {
        format: CLUSTER_MAP_FORMAT,
        generation: 1,
        written_unix_ms: 0,
        stale: false,
        pods,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_generated_policy_loads_with_every_rule() {
        let src = ManyRules {
            name: "gen",
            version: 3,
            namespace: "shop",
            rules: 250,
            inbound: true,
            extra_zones: &["{name: trusted, cidrs: [10.78.0.2/32]}"],
            extra_rules: &["{name: extra, from: trusted, to: app, protocol: tcp, ports: [8080]}"],
        }
        .yaml();
        let p = crate::policy::load_str(&src, "gen.yaml").unwrap().compiled;
        assert_eq!(p.policy().rules.len(), 251);
        assert_eq!(p.policy().zones.len(), 102);
        assert_eq!(p.policy().version, "3");
    }

    #[test]
    fn a_generated_cluster_puts_pods_in_their_label_selected_zones() {
        let src = ManyRules {
            name: "gen",
            version: 1,
            namespace: "app",
            rules: 10,
            inbound: false,
            extra_zones: &CLUSTER_ZONES,
            extra_rules: &[],
        }
        .yaml();
        let c = crate::policy::load_str(&src, "gen.yaml").unwrap().compiled;
        let m = cluster(10_000, 1_000);
        let peers =
            crate::identity::PeerDirectory::build_node(c.policy(), &[], Some(&m.clone().into()));
        assert_eq!(peers.len(), 10_000, "every address distinct");
        let zone = |i: usize| {
            let p = c.policy();
            p.zone_name(peers.zone_of(&c, m.pods[i].ips[0])).to_string()
        };
        // With 1,000 namespaces, api pods (i % 4 == 0) and db pods (i % 4 == 1) always land
        // in CDE namespaces (n % 4 < 2): a quarter of the pods in each zone.
        assert_eq!(zone(0), "cde-api");
        assert_eq!(zone(1), "cde-db");
        assert_eq!(zone(2), "web");
        assert_eq!(zone(3), "unknown"); // worker
        assert_eq!(zone(9_997), "cde-db");
        let counts = m.pods.iter().fold([0usize; 4], |mut n, p| {
            let z = c
                .policy()
                .zone_name(peers.zone_of(&c, p.ips[0]))
                .to_string();
            n[["cde-api", "cde-db", "web", "unknown"]
                .iter()
                .position(|x| *x == z)
                .unwrap()] += 1;
            n
        });
        assert_eq!(counts, [2_500; 4]);
        // Fewer namespaces than labels: a db pod in a namespace outside the CDE is unknown.
        let m = cluster(8, 3);
        let peers =
            crate::identity::PeerDirectory::build_node(c.policy(), &[], Some(&m.clone().into()));
        // pod 5: db in ns-2 (2 % 4 == 2: not CDE).
        assert_eq!(
            c.policy().zone_name(peers.zone_of(&c, m.pods[5].ips[0])),
            "unknown"
        );
    }
}
