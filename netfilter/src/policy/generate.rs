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
}
