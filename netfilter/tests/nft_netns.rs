#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The nftables layer for real: network namespaces and a veth pair made here, the policy
//! applied through netlink, TCP connections that succeed or are dropped, and the kernel's
//! counters read back.
//!
//! Needs root, `ip` and `nft`. Without them the test says SKIPPED and why; with
//! `ENCLAVE_REQUIRE_PRIVILEGED=1` (set by CI) a missing prerequisite is a failure.

use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::nft::{self, NftWorkload, Placement};
use enclave_netfilter::policy;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: nft-test, version: 1}
spec:
  zones:
    - name: app
      selector: {namespaces: [shop]}
    - name: trusted
      cidrs: [10.77.0.2/32]
    - name: other
      cidrs: [10.77.0.3/32]
  rules:
    - {name: trusted-to-app, from: trusted, to: app, protocol: tcp, ports: [8080]}
    - {name: app-to-trusted, from: app, to: trusted, protocol: tcp, ports: ["9000-9010"]}
"#;

fn prerequisites() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces and nftables need CAP_NET_ADMIN)".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            return Err(format!(
                "`{tool}` not installed (apt-get install iproute2 nftables)"
            ));
        }
    }
    Ok(())
}

fn skip_or_fail(why: String) {
    if std::env::var("ENCLAVE_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("privileged test required but cannot run: {why}");
    }
    eprintln!("SKIPPED nft_netns: {why}");
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("ip netns exec")
    }
    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: joins the namespace for this thread only, from a file we own.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A veth pair: `a_dev` in `a`, `b_dev` in `b`.
fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    sh(&[
        "ip", "link", "add", a_dev, "netns", &a.0, "type", "veth", "peer", "name", b_dev, "netns",
        &b.0,
    ]);
}

/// Brings `dev` and the loopback of `ns` up.
fn set_up(ns: &Netns, dev: &str) {
    assert!(ns.exec(&["ip", "link", "set", dev, "up"]).status.success());
    assert!(ns.exec(&["ip", "link", "set", "lo", "up"]).status.success());
}

/// Connects to `dst` from `src` in `ns`; true when the handshake completes.
fn connects(ns: &Netns, src: &str, dst: &str) -> bool {
    let src: std::net::IpAddr = src.parse().expect("src");
    let dst: SocketAddr = dst.parse().expect("dst");
    ns.run(move || tcp_connect(src, dst).is_ok())
        .join()
        .expect("connect thread")
}

/// A TCP connect from `src` with a 700 ms timeout.
fn tcp_connect(src: std::net::IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_millis(700))?;
    Ok(s.into())
}

#[test]
fn policy_applied_through_netlink_passes_allowed_and_drops_denied_connections() {
    if let Err(why) = prerequisites() {
        return skip_or_fail(why);
    }
    let id = std::process::id();
    let w = Netns::new(format!("encl-w-{id}"));
    let p = Netns::new(format!("encl-t-{id}"));
    let o = Netns::new(format!("encl-o-{id}"));
    // One veth pair per peer: the workload (10.77.0.1) sees `trusted` and `other` on their own links.
    for (wdev, pdev, peer) in [("vw", "vp", &p), ("xw", "xo", &o)] {
        veth(&w, &format!("{wdev}{id}"), peer, &format!("{pdev}{id}"));
    }
    for (ns, dev, addr) in [
        (&w, format!("vw{id}"), "10.77.0.1/32"),
        (&p, format!("vp{id}"), "10.77.0.2/32"),
        (&w, format!("xw{id}"), "10.77.0.1/32"),
        (&o, format!("xo{id}"), "10.77.0.3/32"),
    ] {
        assert!(
            ns.exec(&["ip", "addr", "add", addr, "dev", &dev])
                .status
                .success()
                || addr == "10.77.0.1/32"
        );
        set_up(ns, &dev);
    }
    for (dst, dev) in [("10.77.0.2/32", "vw"), ("10.77.0.3/32", "xw")] {
        let dev = format!("{dev}{id}");
        assert!(w
            .exec(&["ip", "route", "add", dst, "dev", &dev])
            .status
            .success());
    }
    assert!(p
        .exec(&[
            "ip",
            "route",
            "add",
            "10.77.0.1/32",
            "dev",
            &format!("vp{id}")
        ])
        .status
        .success());
    assert!(o
        .exec(&[
            "ip",
            "route",
            "add",
            "10.77.0.1/32",
            "dev",
            &format!("xo{id}")
        ])
        .status
        .success());

    // The workload listens on an allowed and a not-allowed port.
    let listeners = w
        .run(|| {
            let a = TcpListener::bind("10.77.0.1:8080").expect("bind 8080");
            let b = TcpListener::bind("10.77.0.1:9090").expect("bind 9090");
            (a, b)
        })
        .join()
        .expect("listeners");
    assert!(
        connects(&p, "10.77.0.2", "10.77.0.1:9090"),
        "before the policy, everything connects"
    );

    let loaded = policy::load_str(POLICY, "nft-test.yaml").expect("policy");
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: web, namespace: shop, ips: [10.77.0.1]}\n",
    )
    .expect("inventory");
    let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
    let ident = inv.workloads[0].identity();
    let ips = inv.workloads[0].ips.clone();
    let table = nft::render(
        &loaded.compiled,
        &peers,
        &NftWorkload {
            identity: &ident,
            ips: &ips,
        },
        &Placement::Local,
    );
    nft::apply(&table, Some(&w.path())).expect("apply through netlink");

    assert!(
        connects(&p, "10.77.0.2", "10.77.0.1:8080"),
        "trusted → app :8080 is allowed"
    );
    assert!(
        !connects(&p, "10.77.0.2", "10.77.0.1:9090"),
        "trusted → app :9090 is not"
    );
    assert!(
        !connects(&o, "10.77.0.3", "10.77.0.1:8080"),
        "other → app :8080 is not"
    );

    let listing = w.exec(&["nft", "-j", "list", "table", "inet", &table.name]);
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&listing.stdout).expect("nft json");
    let counter = |comment: &str, chain: &str| -> u64 {
        json["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| {
                r["chain"] == chain
                    && r["comment"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(comment))
            })
            .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
            .sum()
    };
    assert!(
        counter("allow rule trusted-to-app", "to_workload") >= 1,
        "allow rule counted"
    );
    let dropped = counter("default deny", "to_workload");
    assert!(
        dropped >= 2,
        "both denied SYNs (and retransmits) counted, got {dropped}"
    );

    // Re-applying gives the same ruleset; removing leaves nothing; removing again is fine.
    // Counters differ between listings; everything else must not.
    let strip = |b: &[u8]| {
        let text = String::from_utf8_lossy(b).to_string();
        let mut out = String::new();
        let mut words = text.split(' ').peekable();
        while let Some(w) = words.next() {
            out.push_str(w);
            out.push(' ');
            if w.ends_with("counter") && words.peek() == Some(&"packets") {
                for _ in 0..4 {
                    words.next();
                }
            }
        }
        out
    };
    let before = strip(
        &w.exec(&["nft", "list", "table", "inet", &table.name])
            .stdout,
    );
    nft::apply(&table, Some(&w.path())).expect("re-apply");
    let after = strip(
        &w.exec(&["nft", "list", "table", "inet", &table.name])
            .stdout,
    );
    assert_eq!(before, after);
    assert!(connects(&p, "10.77.0.2", "10.77.0.1:8080"));
    nft::remove(&table.name, Some(&w.path())).expect("remove");
    assert!(
        !w.exec(&["nft", "list", "table", "inet", &table.name])
            .status
            .success(),
        "table gone"
    );
    nft::remove(&table.name, Some(&w.path())).expect("remove twice is not an error");
    assert!(
        connects(&o, "10.77.0.3", "10.77.0.1:9090"),
        "without the table, traffic flows again"
    );
    drop(listeners);
}

/// A policy of `n` rules into zone `app` from 100 CIDR zones (one port each, the shape of a
/// generated per-service policy); then a port range for `p7`, four deny rules that take
/// ports of it back, and the one rule that lets `trusted` reach :8080.
fn large_policy(n: usize) -> String {
    policy::generate::ManyRules {
        name: "large",
        version: 1,
        namespace: "shop",
        rules: n,
        inbound: true,
        extra_zones: &["{name: trusted, cidrs: [10.78.0.2/32]}"],
        extra_rules: &[
            "{name: p7-range, from: p7, to: app, protocol: tcp, ports: [\"2000-2100\"]}",
            "{name: no-p7-a, action: deny, from: p7, to: app, protocol: tcp, ports: [2001]}",
            "{name: no-p7-b, action: deny, from: p7, to: app, protocol: tcp, ports: [2003]}",
            "{name: no-p7-c, action: deny, from: p7, to: app, protocol: tcp, ports: [2005]}",
            "{name: no-p7-d, action: deny, from: p7, to: app, protocol: tcp, ports: [\"2040-2060\"]}",
            "{name: trusted-to-app, from: trusted, to: app, protocol: tcp, ports: [8080]}",
        ],
    }
    .yaml()
}

#[test]
fn a_policy_of_ten_thousand_rules_applies_and_enforces() {
    if let Err(why) = prerequisites() {
        return skip_or_fail(why);
    }
    let id = std::process::id();
    let w = Netns::new(format!("encl-lw-{id}"));
    let p = Netns::new(format!("encl-lp-{id}"));
    veth(&w, &format!("lw{id}"), &p, &format!("lp{id}"));
    for (ns, dev, addr) in [
        (&w, format!("lw{id}"), "10.78.0.1/24"),
        (&p, format!("lp{id}"), "10.78.0.2/24"),
        // An address of CIDR zone p7 (10.100.7.0/24), whose rules are r7, r107, r207, ...
        (&p, format!("lp{id}"), "10.100.7.9/32"),
    ] {
        assert!(ns
            .exec(&["ip", "addr", "add", addr, "dev", &dev])
            .status
            .success());
        set_up(ns, &dev);
    }
    assert!(w
        .exec(&[
            "ip",
            "route",
            "add",
            "10.100.7.9/32",
            "dev",
            &format!("lw{id}")
        ])
        .status
        .success());
    const PORTS: [u16; 10] = [8080, 9090, 1007, 1008, 1107, 2000, 2001, 2002, 2050, 2100];
    let listeners = w
        .run(|| {
            PORTS
                .iter()
                .map(|port| TcpListener::bind(("10.78.0.1", *port)).expect("bind"))
                .collect::<Vec<_>>()
        })
        .join()
        .expect("listeners");

    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: web, namespace: shop, ips: [10.78.0.1]}\n",
    )
    .expect("inventory");
    let ident = inv.workloads[0].identity();
    let ips = inv.workloads[0].ips.clone();
    let render = |src: &str| {
        let loaded = policy::load_str(src, "large.yaml").expect("policy");
        let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
        nft::render(
            &loaded.compiled,
            &peers,
            &NftWorkload {
                identity: &ident,
                ips: &ips,
            },
            &Placement::Local,
        )
    };
    let table = render(&large_policy(10_000));
    // Every generated rule and the extras are folded: the first packet of a new flow meets
    // a few set lookups, not 10,000 rules.
    assert!(table.rule_count() < 40, "{} rules", table.rule_count());
    assert!(
        table.element_count() >= 10_000,
        "{} set elements",
        table.element_count()
    );
    let t0 = std::time::Instant::now();
    nft::apply(&table, Some(&w.path())).expect("apply 10,000 rules through netlink");
    eprintln!(
        "applied {} nftables rules and {} set elements in {:?}",
        table.rule_count(),
        table.element_count(),
        t0.elapsed()
    );
    let verdicts: Vec<(&str, u16, bool)> = vec![
        ("10.78.0.2", 8080, true),   // trusted-to-app, the last rule
        ("10.78.0.2", 9090, false),  // no rule
        ("10.78.0.2", 1007, false),  // p7's port, but trusted is not p7
        ("10.100.7.9", 1007, true),  // r7
        ("10.100.7.9", 1107, true),  // r107
        ("10.100.7.9", 1008, false), // r8 is p8's
        ("10.100.7.9", 2000, true),  // p7-range
        ("10.100.7.9", 2001, false), // p7-range, taken back by no-p7-a
        ("10.100.7.9", 2002, true),  // p7-range
        ("10.100.7.9", 2050, false), // p7-range, inside no-p7-d's range
        ("10.100.7.9", 2100, true),  // p7-range
        ("10.100.7.9", 8080, false), // trusted's port, not p7's
    ];
    let check = |what: &str| {
        for (src, port, allowed) in &verdicts {
            assert_eq!(
                connects(&p, src, &format!("10.78.0.1:{port}")),
                *allowed,
                "{what}: {src} -> :{port} should be {}",
                if *allowed { "allowed" } else { "dropped" }
            );
        }
    };
    check("10,000-rule table");

    // A table the kernel refuses (a jump to a chain that does not exist) is an error, and
    // the table in force stays as it was.
    let mut bad = table.clone();
    bad.chains[0].rules.insert(
        0,
        nft::NftRule {
            matches: vec![],
            verdict: nft::NftVerdict::Jump("no_such_chain".into()),
            comment: "broken".into(),
        },
    );
    let e = nft::apply(&bad, Some(&w.path())).expect_err("a jump to nowhere is refused");
    assert!(e.to_string().contains("No such file"), "{e}");
    check("after a refused table, the old one");
    drop(listeners);
}

/// What netlink installs is what the rendered text says: a table with sets of both
/// families, port ranges, a deny set, the `unknown` guard and plain rules is applied through
/// netlink in one namespace and fed to `nft -f` as text in another, and the kernel lists
/// the two the same, byte for byte.
#[test]
fn the_table_netlink_installs_is_the_one_its_text_describes() {
    if let Err(why) = prerequisites() {
        return skip_or_fail(why);
    }
    const RICH: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: rich, version: 1}
spec:
  zones:
    - {name: app, selector: {namespaces: [shop]}}
    - {name: wide, cidrs: [10.0.0.0/8, "fd00::/16"]}
    - {name: narrow, cidrs: [10.1.2.0/24, "fd00:1::/32"]}
    - {name: peers, selector: {namespaces: [peers]}}
  rules:
    - {name: w1, from: wide, to: app, protocol: tcp, ports: [80, 443, "8000-8100"]}
    - {name: w2, from: wide, to: app, protocol: udp, ports: [53]}
    - {name: n1, from: narrow, to: app, protocol: tcp, ports: ["1-1024"]}
    - {name: n2, from: narrow, to: app, protocol: icmp}
    - {name: p1, from: peers, to: app, protocol: any}
    - {name: no1, action: deny, from: wide, to: app, protocol: tcp, ports: [8001]}
    - {name: no2, action: deny, from: wide, to: app, protocol: tcp, ports: [8003]}
    - {name: no3, action: deny, from: wide, to: app, protocol: tcp, ports: ["8050-8060"]}
    - {name: no4, action: deny, from: narrow, to: app, protocol: tcp, ports: [22]}
    - {name: out1, from: app, to: unknown, protocol: tcp, ports: [443, 8443, 9443, 10443]}
    - {name: out2, from: app, to: wide, protocol: tcp, ports: [5432]}
"#;
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: web, namespace: shop, ips: [10.1.2.5, 'fd00:1::5']}\n  - {name: p, namespace: peers, ips: [10.1.2.9, 10.7.0.1, 'fd00:1::9']}\n",
    )
    .expect("inventory");
    let loaded = policy::load_str(RICH, "rich.yaml").expect("policy");
    let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
    let ident = inv.workloads[0].identity();
    let table = nft::render(
        &loaded.compiled,
        &peers,
        &NftWorkload {
            identity: &ident,
            ips: &inv.workloads[0].ips,
        },
        &Placement::Bridged,
    );
    let shapes: std::collections::BTreeSet<Vec<nft::KeyField>> =
        table.sets.iter().map(|s| s.key.clone()).collect();
    assert!(shapes.len() >= 4, "{:?}", shapes);
    let id = std::process::id();
    let by_netlink = Netns::new(format!("encl-nl-{id}"));
    let by_text = Netns::new(format!("encl-tx-{id}"));
    nft::apply(&table, Some(&by_netlink.path())).expect("apply through netlink");
    let file = std::env::temp_dir().join(format!("enclave-rich-{id}.nft"));
    std::fs::write(&file, table.to_nft_text()).expect("write text");
    let loaded_text = by_text.exec(&["nft", "-f", file.to_str().expect("path")]);
    let _ = std::fs::remove_file(&file);
    assert!(
        loaded_text.status.success(),
        "nft -f refused the text: {}\n{}",
        String::from_utf8_lossy(&loaded_text.stderr),
        table.to_nft_text()
    );
    let list = |ns: &Netns| {
        let out = ns.exec(&["nft", "list", "ruleset"]);
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let (a, b) = (list(&by_netlink), list(&by_text));
    assert!(a.contains("flags interval"), "{a}");
    assert_eq!(a, b, "netlink installed:\n{a}\nthe text installs:\n{b}");
}

const NAMES_POLICY: &str = r#"
apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: nft-names, version: 1}
spec:
  zones:
    - {name: app, selector: {namespaces: [shop]}}
    - {name: acquirer, names: [api.acquirer.example]}
    - {name: internet, cidrs: [0.0.0.0/0]}
  rules:
    - {name: app-to-acquirer, from: app, to: acquirer, protocol: tcp, ports: [443]}
    - {name: no-internet, action: deny, from: app, to: internet}
"#;

#[test]
fn a_name_set_opens_the_wall_to_that_address_until_its_timeout_and_netd_could_not_write_it() {
    if let Err(why) = prerequisites() {
        return skip_or_fail(why);
    }
    let id = std::process::id();
    let w = Netns::new(format!("encl-nw-{id}"));
    let p = Netns::new(format!("encl-np-{id}"));
    veth(&w, &format!("nw{id}"), &p, &format!("np{id}"));
    assert!(w
        .exec(&[
            "ip",
            "addr",
            "add",
            "10.78.0.1/24",
            "dev",
            &format!("nw{id}")
        ])
        .status
        .success());
    for a in ["10.78.0.2/24", "10.78.0.3/24"] {
        assert!(p
            .exec(&["ip", "addr", "add", a, "dev", &format!("np{id}")])
            .status
            .success());
    }
    set_up(&w, &format!("nw{id}"));
    set_up(&p, &format!("np{id}"));
    let listeners = p
        .run(|| {
            (
                TcpListener::bind("10.78.0.2:443").expect("bind .2"),
                TcpListener::bind("10.78.0.3:443").expect("bind .3"),
            )
        })
        .join()
        .expect("listeners");

    let loaded = policy::load_str(NAMES_POLICY, "names.yaml").expect("policy");
    let inv: Inventory = enclave_netfilter::yaml::from_str(
        "workloads:\n  - {name: api, namespace: shop, ips: [10.78.0.1]}\n",
    )
    .expect("inventory");
    let peers = PeerDirectory::build(loaded.compiled.policy(), &inv.workloads);
    let ident = inv.workloads[0].identity();
    let ips = inv.workloads[0].ips.clone();
    let table = nft::render(
        &loaded.compiled,
        &peers,
        &NftWorkload {
            identity: &ident,
            ips: &ips,
        },
        &Placement::Local,
    );
    assert!(
        table.to_nft_text().contains("flags timeout"),
        "{}",
        table.to_nft_text()
    );
    nft::apply(&table, Some(&w.path())).expect("apply");
    assert!(
        !connects(&w, "10.78.0.1", "10.78.0.2:443"),
        "not resolved yet: internet, denied"
    );

    // Why netd cannot write the set itself: a socket opened with CAP_NET_ADMIN, then the
    // thread dropped to nobody (setresuid on this thread only clears its capabilities), is
    // refused, because nfnetlink checks the sender's capability as well as the opener's.
    let name = table.name.clone();
    let set_name = nft::name_set(policy::ZoneId(2), false);
    let (set2, name2) = (set_name.clone(), name.clone());
    let dropped = w
        .run(move || {
            let mut writer = nft::NameSetWriter::open(&name2).expect("open");
            // SAFETY: raw setresuid changes only this thread's credentials.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0);
            writer
                .add(&set2, "10.78.0.2".parse().unwrap(), 3)
                .map_err(|e| e.raw_os_error())
        })
        .join()
        .expect("writer thread");
    assert_eq!(
        dropped,
        Err(Some(libc::EPERM)),
        "a thread without the capability is refused"
    );
    // The shim's way: a thread of a root process, in the pod's namespace, writes.
    let written = w
        .run(move || {
            let mut writer = nft::NameSetWriter::open(&name).expect("open");
            writer
                .add(&set_name, "10.78.0.2".parse().unwrap(), 3)
                .map_err(|e| e.to_string())
        })
        .join()
        .expect("writer thread");
    assert_eq!(
        written,
        Ok(()),
        "root in the pod's namespace writes the set"
    );

    let set = w.exec(&["nft", "list", "set", "inet", &table.name, "names_2_v4"]);
    let text = String::from_utf8_lossy(&set.stdout);
    assert!(
        text.contains("10.78.0.2") && text.contains("expires"),
        "{text}"
    );
    assert!(
        connects(&w, "10.78.0.1", "10.78.0.2:443"),
        "the resolved address is reachable"
    );
    assert!(
        !connects(&w, "10.78.0.1", "10.78.0.3:443"),
        "an address never resolved is not"
    );
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !connects(&w, "10.78.0.1", "10.78.0.2:443"),
        "the element timed out"
    );
    drop(listeners);
}
