//! Enclave's enforcement core: zone policies, per-frame decisions, audit, nftables.
//!
//! `netfilter` depends on nothing else of Enclave's. The VMM never links it; the shim and
//! `enclave-netd` do. Layout:
//! - [`policy`]: the zone policy model, loading with located errors, compilation;
//! - [`packet`]: total parsers for frames a guest wrote;
//! - [`l7`]: application protocol detection from the first payload bytes;
//! - [`conntrack`]: bounded connection and fragment tracking;
//! - [`identity`]: who a peer address is (workload registry, CIDR zones);
//! - [`matcher`]: the per-frame decision for one workload;
//! - [`audit`]: OCSF records, the hash-chained log, its verifier;
//! - [`nft`]: the same policy rendered for nftables and applied through netlink;
//! - [`node`]: the node's policy directory, pod registry and reload;
//! - [`learn`] and [`graph`]: rules proposed from observed flows, and pictures of flows;
//! - [`yaml`]: the one YAML reader of policies and inventories (values and positions).

pub mod audit;
pub mod capture;
pub mod conntrack;
pub mod graph;
pub mod identity;
pub mod inspect;
pub mod l7;
pub mod learn;
pub mod matcher;
pub mod names;
pub mod nft;
pub mod node;
pub mod packet;
pub mod policy;
pub mod segtest;
pub mod yaml;
