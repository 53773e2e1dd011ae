//! A pod network without containerd, as CNI leaves it: a "pod" network namespace whose
//! `eth0` (10.99.0.2/24) is a veth to a "peer" namespace (`veth-peer`, 10.99.0.1/24). Used by
//! the pod network tests and the pod network benchmark.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support

use std::path::PathBuf;
use std::process::Command;

/// The pod's address.
pub const POD_IP: &str = "10.99.0.2";
/// The peer's address.
pub const PEER_IP: &str = "10.99.0.1";

/// Runs a command and asserts that it succeeded.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The MAC of `dev` in namespace `ns`, as `aa:bb:..`.
pub fn mac_of(ns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", dev])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// The two namespaces, deleted on drop.
pub struct PodPair {
    /// The pod namespace's name.
    pub pod: String,
    /// The peer namespace's name.
    pub peer: String,
}

impl PodPair {
    /// Makes `enc-<tag>-<pid>` and `enc-<tag>p-<pid>` with the veth between them.
    pub fn new(tag: &str) -> PodPair {
        let id = std::process::id();
        let p = PodPair {
            pod: format!("enc-{tag}-{id}"),
            peer: format!("enc-{tag}p-{id}"),
        };
        for n in [&p.pod, &p.peer] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
        }
        sh(&[
            "ip",
            "link",
            "add",
            "veth-pod",
            "netns",
            &p.pod,
            "type",
            "veth",
            "peer",
            "name",
            "veth-peer",
            "netns",
            &p.peer,
        ]);
        sh(&[
            "ip", "-n", &p.pod, "link", "set", "veth-pod", "name", "eth0",
        ]);
        sh(&[
            "ip",
            "-n",
            &p.pod,
            "addr",
            "add",
            &format!("{POD_IP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &p.pod, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &p.peer,
            "addr",
            "add",
            &format!("{PEER_IP}/24"),
            "dev",
            "veth-peer",
        ]);
        sh(&["ip", "-n", &p.peer, "link", "set", "veth-peer", "up"]);
        sh(&["ip", "-n", &p.peer, "link", "set", "lo", "up"]);
        p
    }

    /// The pod namespace's file.
    pub fn pod_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.pod))
    }

    /// The peer namespace's file.
    pub fn peer_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.peer))
    }
}

impl Drop for PodPair {
    fn drop(&mut self) {
        for n in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}
