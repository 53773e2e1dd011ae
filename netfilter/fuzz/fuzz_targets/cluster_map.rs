//! The cluster map a node reads from its peer directory: written by enclave-node, but a
//! netd must survive any bytes there (a truncated write, another program, an attacker with
//! the directory). Parsed, turned into the identities netd keeps, and put in a directory
//! under a policy with label selectors.
#![no_main]

use enclave_netfilter::identity::{ClusterMap, ClusterPeers, PeerDirectory};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {name: f, version: 1}\nspec:\n  zones:\n    - {name: db, selector: {namespaceSelector: {matchLabels: {pci: cde}}, matchExpressions: [{key: app, operator: In, values: [db]}]}}\n  rules: []\n";

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClusterMap::parse(data) {
        let c = enclave_netfilter::policy::load_str(POLICY, "f.yaml").expect("policy");
        let known = ClusterPeers::from(m);
        let d = PeerDirectory::build_node(c.compiled.policy(), &[], Some(&known));
        assert!(d.len() <= known.pods.iter().map(|(ips, _)| ips.len()).sum());
    }
});
