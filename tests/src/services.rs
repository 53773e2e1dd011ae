//! Services a test or the pod demo runs on a CRI node's pod bridge, in the node's network
//! namespace: extra addresses, TLS servers (Debian's `openssl s_server`) and a DNS server
//! (Debian's `dnsmasq`). Each process is killed when its [`Service`] is dropped.

use crate::cri::CriNode;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A process in the node's namespace, killed on drop.
pub struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command run inside the node's network namespace.
pub fn in_node(node: &CriNode, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &node.netns.name]).args(args);
    c
}

/// Runs `c`; its stdout, or the reason it failed.
fn run(c: &mut Command) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{c:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Adds `addrs` (host routes) to the bridge that holds the node's address `node_ip` (CNI
/// makes the bridge with the first pod).
pub fn add_addresses(node: &CriNode, node_ip: &str, addrs: &[&str]) -> Result<(), String> {
    let shown = run(&mut in_node(node, &["ip", "-o", "-4", "addr", "show"]))?;
    let dev = shown
        .lines()
        .find(|l| l.contains(&format!("inet {node_ip}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| format!("no bridge holds {node_ip} yet (start a pod first)"))?
        .to_string();
    for a in addrs {
        run(&mut in_node(
            node,
            &["ip", "addr", "add", &format!("{a}/32"), "dev", &dev],
        ))?;
    }
    Ok(())
}

/// A TLS server (`openssl s_server -www`, a self-signed certificate for `cn`) on port 443
/// of each address in `addrs`.
pub fn tls_servers(
    node: &CriNode,
    dir: &Path,
    cn: &str,
    addrs: &[&str],
) -> Result<Vec<Service>, String> {
    let (cert, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))?;
    addrs
        .iter()
        .map(|a| {
            let log = std::fs::File::create(dir.join(format!("s_server-{a}.log")))
                .map_err(|e| e.to_string())?;
            in_node(
                node,
                &[
                    "openssl",
                    "s_server",
                    "-www",
                    "-accept",
                    &format!("{a}:443"),
                ],
            )
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map(Service)
            .map_err(|e| format!("openssl s_server: {e}"))
        })
        .collect()
}

/// dnsmasq on `listen`:53 answering each `(name, address)` of `answers` with TTL 300, and
/// nothing else (no upstream); its query log in `dir/dnsmasq.log`.
pub fn dnsmasq(
    node: &CriNode,
    dir: &Path,
    listen: &str,
    answers: &[(&str, &str)],
) -> Result<Service, String> {
    let mut c = in_node(
        node,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={listen}"),
            "--local-ttl=300",
            "--log-queries",
        ],
    );
    for (name, addr) in answers {
        c.arg(format!("--address=/{name}/{addr}"));
    }
    c.arg(format!(
        "--log-facility={}",
        dir.join("dnsmasq.log").display()
    ))
    .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .map(Service)
    .map_err(|e| format!("dnsmasq (apt-get install dnsmasq-base): {e}"))
}
