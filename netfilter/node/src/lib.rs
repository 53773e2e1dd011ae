//! `enclave-node`: who every pod of the cluster is, for the enforcement on this node.
//!
//! It watches Pods and Namespaces through the Kubernetes API (kube's watcher), keeps each
//! pod's addresses, labels, `enclave.io/*` annotations, node and its namespace's labels
//! ([`store::Store`]), and publishes them as one [`ClusterMap`] file in the node's peer
//! directory, renamed into place so no reader sees half of one. Every shim on the node
//! follows that file for its pod (the nftables table) and its enclave-netd (`peers`).
//!
//! [`ClusterMap`]: enclave_netfilter::identity::ClusterMap

pub mod metrics;
pub mod pod;
pub mod store;
