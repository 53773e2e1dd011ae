//! `enclavectl`: check, explain and render zone policies; verify audit logs; propose rules
//! from learned flows; draw flows; run the policy demo.
//!
//! Exit codes: 0 success; 1 the thing checked is bad (policy errors, broken audit chain);
//! 2 the command could not run (unreadable file, bad arguments).

mod capture;
mod demo;
mod doctor;
mod segmentation;
mod workload;

use clap::{Parser, Subcommand};
use enclave_netfilter::audit::{self, Head, VerifyOptions};
use enclave_netfilter::identity::{Inventory, PeerDirectory};
use enclave_netfilter::nft::{self, NftWorkload, Placement};
use enclave_netfilter::policy::{self, LoadedPolicy, Lookup, PolicyError, Severity};
use enclave_netfilter::{graph, learn};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "enclavectl", version, about = "Enclave zone policy, audit and flow tool", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Zone policies: check, explain, render and apply.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Audit logs: verify chains, show heads.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Observed flows.
    #[command(subcommand)]
    Flows(FlowsCmd),
    /// Runs frames of a PCI CDE scenario through the matcher and shows decisions and the
    /// verified audit log.
    Demo(demo::DemoArgs),
    /// This node's pods: reload their enforcement after a policy change, read counters.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Packet captures netd wrote for denials and inspection findings.
    #[command(subcommand)]
    Capture(capture::CaptureCmd),
    /// Segmentation tests: probes between every zone pair from inside the pods' VMs, and
    /// the report an assessor keeps (PCI DSS 11.4.5).
    #[command(subcommand)]
    Segmentation(segmentation::SegmentationCmd),
}

/// Where a node keeps its policy, its pods and the cluster's.
#[derive(clap::Args)]
pub struct NodeDirs {
    /// The node's policy directory.
    #[arg(long, default_value = enclave_netfilter::node::POLICY_DIR)]
    pub policy_dir: PathBuf,
    /// The node's pod registry.
    #[arg(long, default_value = enclave_netfilter::node::REGISTRY_DIR)]
    pub registry: PathBuf,
    /// The node's peer directory (the cluster's pods, from enclave-node).
    #[arg(long, default_value = enclave_netfilter::node::PEER_DIR)]
    pub peer_dir: PathBuf,
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Re-reads the policy directory and the registry; re-applies every pod's nftables
    /// table and asks every enclave-netd to reload (flows still allowed go on, flows now
    /// denied are cut and recorded). Run it after changing the policy directory.
    Reload {
        #[command(flatten)]
        node: NodeDirs,
    },
    /// Lists the registered pods and their enclave-netd's frame counts.
    Status {
        /// The node's pod registry.
        #[arg(long, default_value = enclave_netfilter::node::REGISTRY_DIR)]
        registry: PathBuf,
    },
    /// Prints every pod's enclave-netd counters (Prometheus text), for a node exporter's
    /// textfile collector or a scrape proxy.
    Metrics {
        /// The node's pod registry.
        #[arg(long, default_value = enclave_netfilter::node::REGISTRY_DIR)]
        registry: PathBuf,
    },
    /// Pods a response rule quarantined: list them, or release one.
    #[command(subcommand)]
    Quarantine(QuarantineCmd),
    /// Checks what this node needs for Enclave (KVM, kernel devices, nftables, cgroups,
    /// containerd and its runtime config, binaries, the guest image, the policy, the pod
    /// registry and cluster map, the audit log, its sealing and heads) and says how to fix
    /// each miss. Exits 1 when a check fails.
    Doctor {
        #[command(flatten)]
        paths: doctor::Paths,
    },
}

#[derive(Subcommand)]
enum QuarantineCmd {
    /// Lists every pod on the node with its quarantine (the response, the threat, the rules
    /// it keeps).
    List {
        /// The node's pod registry.
        #[arg(long, default_value = enclave_netfilter::node::REGISTRY_DIR)]
        registry: PathBuf,
    },
    /// Ends a pod's quarantine: its flows are decided by the policy again (recorded).
    Release {
        /// The pod, NAMESPACE/NAME.
        pod: String,
        /// The node's pod registry.
        #[arg(long, default_value = enclave_netfilter::node::REGISTRY_DIR)]
        registry: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validates policy files; prints errors and warnings with file:line:column and field.
    Check {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat warnings (unreachable rules, ranges the kernel wall drops) as errors; notes (what
        /// enclave-netd alone enforces) never are.
        #[arg(long)]
        strict: bool,
    },
    /// Says whether a flow is allowed and which rule decides, in words.
    Explain {
        /// Policy file.
        file: PathBuf,
        /// Source: a zone name, an IP address, NAMESPACE/POD (from --inventory or --peers),
        /// or a pod inline: `ns=NS,pod=NAME[,label.K=V][,nslabel.K=V][,zone=Z]`.
        #[arg(long)]
        from: String,
        /// Destination, written as --from.
        #[arg(long)]
        to: String,
        /// Protocol: tcp, udp, icmp, icmpv6.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Destination port.
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Application protocol the payload would be detected as.
        #[arg(long)]
        app: Option<String>,
        /// Workload inventory (YAML) for NAMESPACE/POD references.
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// The cluster's pods as enclave-node publishes them: a peer directory
        /// (/run/enclave/peers) or its cluster.json.
        #[arg(long)]
        peers: Option<PathBuf>,
    },
    /// Prints the nftables table the host-kernel layer would install for a workload.
    Render {
        /// Render for nftables (the only backend so far).
        #[arg(long, required = true)]
        nft: bool,
        /// Policy file.
        file: PathBuf,
        /// The workload: NAMESPACE/POD from --inventory, or inline
        /// `ns=NS,pod=NAME,ip=IP[,ip=IP][,label.K=V][,zone=ZONE]`.
        #[arg(long)]
        workload: String,
        /// Workload inventory (YAML): peers' addresses, and NAMESPACE/POD references.
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// The workload's traffic is forwarded through the namespace on this interface
        /// (a pod's tap); without it the namespace's own stack is the workload.
        #[arg(long)]
        forward: Option<String>,
    },
    /// Installs (or replaces) a workload's table in a network namespace through netlink.
    Apply {
        /// Policy file.
        file: PathBuf,
        /// The workload (as for `render`).
        #[arg(long)]
        workload: String,
        /// Workload inventory (YAML).
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Network namespace: a name under /run/netns or a path (/proc/PID/ns/net).
        #[arg(long)]
        netns: Option<String>,
        /// Forwarding interface (as for `render`).
        #[arg(long)]
        forward: Option<String>,
    },
    /// Removes a workload's table from a network namespace.
    Remove {
        /// The workload (as for `render`), to name its table.
        #[arg(long)]
        workload: String,
        /// Workload inventory (YAML).
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Network namespace.
        #[arg(long)]
        netns: Option<String>,
    },
    /// Proposes allow rules from the learn-mode records of audit logs.
    Suggest {
        /// Audit log files.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verifies the hash chain of audit log files (any order) and says where it breaks;
    /// with --key, every seal; with --heads, that the log holds every head exported off the
    /// node.
    Verify {
        /// Log files of one chain (the active file and rotated ones).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A head file (`<log>.head`, or a copy kept off the node): the log must reach it.
        #[arg(long)]
        head: Option<PathBuf>,
        /// Heads exported off the node (`audit export`), as the receiver stored them (one
        /// per line; anything before the JSON on a line is ignored).
        #[arg(long)]
        heads: Option<PathBuf>,
        /// A file holding the verification key `audit keygen` printed (kept off the node).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Fail when records after the last exported head are not yet anchored.
        #[arg(long)]
        require_anchored: bool,
        /// Accept a chain that starts after the first record (older files archived).
        #[arg(long)]
        allow_partial: bool,
    },
    /// Makes the sealing key of a node's audit log: writes `<log>.key` (the node's evolving
    /// key, mode 0600) and prints the verification key once, for the auditor to keep off
    /// the node. Refuses to replace an existing key.
    Keygen {
        /// The node's audit log.
        #[arg(long, default_value = "/var/log/enclave/audit.log")]
        log: PathBuf,
        /// Seconds per epoch: how long a key lives on the node before it is erased (and how
        /// much of the newest log someone who takes the node can rewrite).
        #[arg(long, default_value_t = 900)]
        epoch_secs: u64,
    },
    /// Ships the audit log off the node to a syslog receiver (RFC 5424 over TCP): every
    /// record, then a signed head; from a cursor kept on disk, so a receiver that is down
    /// loses nothing. Runs every --interval seconds, or once.
    Export {
        /// The node's audit log.
        #[arg(long, default_value = "/var/log/enclave/audit.log")]
        log: PathBuf,
        /// The receiver, HOST:PORT (TCP, octet-counted frames).
        #[arg(long)]
        to: String,
        /// The cursor file (default `<log>.export`).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Seconds between runs.
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// One run, then exit (status 1 when the receiver could not be reached).
        #[arg(long)]
        once: bool,
        /// Send again from this record on (a receiver that crashed loses what it had not
        /// written yet; `audit verify --heads` on its copy names the missing records).
        #[arg(long)]
        resend_from: Option<u64>,
        /// After every run, write the exporter's counters here (Prometheus text, for a
        /// node exporter's textfile collector).
        #[arg(long)]
        metrics: Option<PathBuf>,
    },
    /// Posts the records response rules mark `webhook` (response records) to an HTTP
    /// endpoint as JSON, in log order, from a cursor kept on disk; a failed POST is tried
    /// again with a growing pause, then counted and passed over. Runs every --interval
    /// seconds, or once.
    Webhook {
        /// The node's audit log.
        #[arg(long, default_value = "/var/log/enclave/audit.log")]
        log: PathBuf,
        /// The endpoint, http://HOST[:PORT][/PATH].
        #[arg(long)]
        url: String,
        /// The cursor file (default `<log>.webhook`).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Tries per record before it is counted as failed.
        #[arg(long, default_value_t = 4)]
        tries: u32,
        /// Records looked at per run (the most one run takes from the log).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Seconds between runs.
        #[arg(long, default_value_t = 5)]
        interval: u64,
        /// One run, then exit (status 1 when a record could not be delivered).
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum FlowsCmd {
    /// Draws zones and observed flows from audit logs (SVG or Graphviz DOT by extension): zones
    /// in layers (rust-sugiyama), the CDE zones (`scope: cde` in --policy, else named cde-*)
    /// inside a drawn boundary, one line per zone pair, direction and outcome, and one label per
    /// pair and direction placed where it overlaps no other label and no zone.
    Graph {
        /// Audit log files.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Output file: `.svg` or `.dot`.
        #[arg(short, long)]
        output: PathBuf,
        /// A policy whose zones are drawn even without flows.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

/// A failure that ends the command: message and exit code.
pub struct Fail(pub String, pub u8);

impl From<PolicyError> for Fail {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Invalid { .. } => Fail(e.to_string(), 1),
            PolicyError::Read { .. } => Fail(e.to_string(), 2),
        }
    }
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail(msg.into(), 2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Policy(c) => policy_cmd(c),
        Cmd::Audit(c) => audit_cmd(c),
        Cmd::Flows(c) => flows_cmd(c),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Node(c) => node_cmd(c),
        Cmd::Capture(c) => capture::run(c),
        Cmd::Segmentation(c) => segmentation::run(c),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(Fail(msg, code)) => {
            eprintln!("{msg}");
            ExitCode::from(code)
        }
    }
}

/// Loads a policy, printing its warnings to stderr.
pub fn load_policy(p: &Path) -> Result<LoadedPolicy, Fail> {
    let l = policy::load_file(p)?;
    for w in &l.warnings {
        eprintln!("{w}");
    }
    Ok(l)
}

fn load_inventory(p: &Option<PathBuf>) -> Result<Inventory, Fail> {
    match p {
        Some(p) => Inventory::load(p).map_err(|e| fail(e.to_string())),
        None => Ok(Inventory::default()),
    }
}

fn policy_cmd(c: PolicyCmd) -> Result<u8, Fail> {
    match c {
        PolicyCmd::Check { files, strict } => {
            let mut code = 0;
            for f in &files {
                match policy::load_file(f) {
                    Ok(l) => {
                        for w in l.warnings.iter().chain(&l.notes) {
                            println!("{w}");
                        }
                        let p = l.compiled.policy();
                        let (warnings, notes) = (l.warnings.len(), l.notes.len());
                        let bad = strict && warnings > 0;
                        println!(
                            "{}: {} `{}` version {}: {} zones, {} rules, {} port intervals{}",
                            f.display(),
                            if bad { "REFUSED (--strict)" } else { "OK" },
                            p.name,
                            p.version,
                            p.zones.len(),
                            p.rules.len(),
                            l.compiled.interval_count(),
                            match (warnings, notes) {
                                (0, 0) => String::new(),
                                (w, 0) => format!(", {w} warning(s)"),
                                (0, n) => format!(", {n} note(s)"),
                                (w, n) => format!(", {w} warning(s), {n} note(s)"),
                            },
                        );
                        if bad {
                            code = code.max(1);
                        }
                    }
                    Err(PolicyError::Invalid { diagnostics }) => {
                        for d in &diagnostics {
                            println!("{d}");
                        }
                        let errors = diagnostics
                            .iter()
                            .filter(|d| d.severity == Severity::Error)
                            .count();
                        println!("{}: INVALID: {errors} error(s)", f.display());
                        code = code.max(1);
                    }
                    Err(e @ PolicyError::Read { .. }) => {
                        eprintln!("{e}");
                        code = 2;
                    }
                }
            }
            Ok(code)
        }
        PolicyCmd::Explain {
            file,
            from,
            to,
            proto,
            port,
            app,
            inventory,
            peers,
        } => {
            let l = load_policy(&file)?;
            let inv = load_inventory(&inventory)?;
            let cluster = match &peers {
                None => None,
                Some(p) => {
                    let dir = if p.is_dir() {
                        p.clone()
                    } else {
                        p.parent().map(Path::to_path_buf).unwrap_or_default()
                    };
                    let map = enclave_netfilter::identity::ClusterMap::load_dir(&dir)
                        .map_err(fail)?
                        .ok_or_else(|| {
                            fail(format!(
                                "--peers: no cluster map in {} (is enclave-node running?)",
                                dir.display()
                            ))
                        })?;
                    Some(enclave_netfilter::identity::ClusterPeers::from(map))
                }
            };
            let c = &l.compiled;
            let peers = PeerDirectory::build_node(c.policy(), &inv.workloads, cluster.as_ref());
            let (fz, fdesc) = workload::resolve_zone(c, &peers, &inv, cluster.as_ref(), &from)?;
            let (tz, tdesc) = workload::resolve_zone(c, &peers, &inv, cluster.as_ref(), &to)?;
            let ip_proto = match proto.as_str() {
                "tcp" => 6,
                "udp" => 17,
                "icmp" => 1,
                "icmpv6" => 58,
                other => {
                    return Err(fail(format!(
                        "--proto: `{other}` is not one of tcp, udp, icmp, icmpv6"
                    )))
                }
            };
            if (ip_proto == 6 || ip_proto == 17) && port == 0 {
                return Err(fail("--port is required for tcp and udp"));
            }
            let app = match app.as_deref() {
                None => None,
                Some(a) => Some(policy::AppProto::from_name(a).ok_or_else(|| {
                    let all: Vec<&str> = policy::AppProto::ALL.iter().map(|a| a.as_str()).collect();
                    fail(format!("--app: `{a}` is not one of {}", all.join(", ")))
                })?),
            };
            let p = c.policy();
            let flow = if port != 0 {
                format!("{proto}/{port}")
            } else {
                proto.clone()
            };
            // A pod's description carries a second line: what put it in its zone.
            let (fdesc, fwhy) = fdesc.split_once('\n').unwrap_or((&fdesc, ""));
            let (tdesc, twhy) = tdesc.split_once('\n').unwrap_or((&tdesc, ""));
            println!("flow: {fdesc} → {tdesc}, {flow}");
            for why in [fwhy, twhy].into_iter().filter(|w| !w.is_empty()) {
                println!("{why}");
            }
            let rule_desc = |id: policy::RuleId| {
                let r = &p.rules[id.0 as usize];
                let d = r
                    .description
                    .as_deref()
                    .map(|d| format!(" — {d}"))
                    .unwrap_or_default();
                format!("rule `{}` ({} line {}){d}", r.name, file.display(), r.line)
            };
            let verdict = match c.lookup(fz, tz, ip_proto, port) {
                Lookup::Allowed(r) => format!("ALLOW by {}", rule_desc(r)),
                Lookup::Denied(r) => format!("DENY by {}", rule_desc(r)),
                Lookup::NoRule => format!(
                    "DENY by default: no rule allows zone `{}` to reach zone `{}` over {flow}",
                    p.zone_name(fz),
                    p.zone_name(tz)
                ),
                Lookup::NeedsApp(cands) => {
                    let apps: Vec<String> = policy::AppProto::ALL
                        .iter()
                        .filter(|a| cands[a.index()].is_some())
                        .map(|a| a.to_string())
                        .collect();
                    match app {
                        Some(a) if cands[a.index()].is_some() => {
                            let r = cands[a.index()].unwrap_or(policy::RuleId(0));
                            format!("ALLOW by {}, because the payload is detected as {a}", rule_desc(r))
                        }
                        Some(a) => format!(
                            "DENY: {flow} is open to {} only; a {a} payload is cut at its first bytes and logged as app_mismatch",
                            apps.join(" or ")
                        ),
                        None => {
                            let first = cands.iter().flatten().next().copied().unwrap_or(policy::RuleId(0));
                            format!(
                                "ALLOW only if the payload is detected as {} ({}); any other payload is cut and logged (pass --app to decide)",
                                apps.join(" or "),
                                rule_desc(first)
                            )
                        }
                    }
                }
            };
            println!("verdict: {verdict}");
            // What netd looks for inside the flow, when the deciding rule asks.
            let inspecting = match c.lookup(fz, tz, ip_proto, port) {
                Lookup::Allowed(r) => Some(r),
                Lookup::NeedsApp(cands) => app
                    .and_then(|a| cands[a.index()])
                    .or_else(|| cands.iter().flatten().next().copied()),
                _ => None,
            };
            if let Some(r) = inspecting {
                let i = p.rules[r.0 as usize].inspect;
                if let Some(line) = inspect_line(p, i, fz, tz) {
                    println!("inside the flow: {line}");
                }
                if let Some(line) = requests_line(&p.rules[r.0 as usize].requests) {
                    println!("requests: {line}; any other is refused and the connection reset (a DNS query: that datagram dropped)");
                }
            }
            for (who, z) in [("source", fz), ("destination", tz)] {
                let m = p.zone_mode(z);
                if m != policy::Mode::Enforce {
                    println!("note: the {who} zone `{}` is in {} mode: a denied flow is logged and passed there", p.zone_name(z), m.as_str());
                }
            }
            Ok(0)
        }
        PolicyCmd::Render {
            nft: _,
            file,
            workload,
            inventory,
            forward,
        } => {
            let l = load_policy(&file)?;
            let inv = load_inventory(&inventory)?;
            let w = workload::parse(&workload, &inv)?;
            let peers = PeerDirectory::build(l.compiled.policy(), &inv.workloads);
            let placement = forward.map_or(Placement::Local, |interface| Placement::Forward {
                interface,
            });
            let t = nft::render(
                &l.compiled,
                &peers,
                &NftWorkload {
                    identity: &w.identity,
                    ips: &w.ips,
                },
                &placement,
            );
            let zone = l.compiled.policy().zone_of_workload(&w.identity);
            println!(
                "# workload {}/{} in zone `{}`; {} rules, {} set elements",
                w.identity.namespace,
                w.identity.name,
                l.compiled.policy().zone_name(zone),
                t.rule_count(),
                t.element_count()
            );
            print!("{}", t.to_nft_text());
            Ok(0)
        }
        PolicyCmd::Apply {
            file,
            workload,
            inventory,
            netns,
            forward,
        } => {
            let l = load_policy(&file)?;
            let inv = load_inventory(&inventory)?;
            let w = workload::parse(&workload, &inv)?;
            let peers = PeerDirectory::build(l.compiled.policy(), &inv.workloads);
            let placement = forward.map_or(Placement::Local, |interface| Placement::Forward {
                interface,
            });
            let t = nft::render(
                &l.compiled,
                &peers,
                &NftWorkload {
                    identity: &w.identity,
                    ips: &w.ips,
                },
                &placement,
            );
            let ns = netns.map(|n| netns_path(&n));
            nft::apply(&t, ns.as_deref()).map_err(|e| fail(e.to_string()))?;
            println!(
                "applied table inet {} ({} rules, {} set elements) in {}",
                t.name,
                t.rule_count(),
                t.element_count(),
                ns.map_or("this network namespace".into(), |p| p.display().to_string())
            );
            Ok(0)
        }
        PolicyCmd::Remove {
            workload,
            inventory,
            netns,
        } => {
            let inv = load_inventory(&inventory)?;
            let w = workload::parse(&workload, &inv)?;
            let name = nft::table_name(&w.identity);
            let ns = netns.map(|n| netns_path(&n));
            nft::remove(&name, ns.as_deref()).map_err(|e| fail(e.to_string()))?;
            println!("removed table inet {name}");
            Ok(0)
        }
        PolicyCmd::Suggest { logs } => {
            let flows =
                learn::read_flows(&logs).map_err(|e| fail(format!("cannot read logs: {e}")))?;
            print!("{}", learn::suggest(&flows));
            Ok(0)
        }
    }
}

fn netns_path(n: &str) -> PathBuf {
    if n.contains('/') {
        PathBuf::from(n)
    } else {
        Path::new("/run/netns").join(n)
    }
}

fn audit_cmd(c: AuditCmd) -> Result<u8, Fail> {
    match c {
        AuditCmd::Verify {
            files,
            head,
            heads,
            key_file,
            require_anchored,
            allow_partial,
        } => {
            let head: Option<Head> = match head {
                Some(h) => Some(
                    audit::read_head(&h)
                        .map_err(|e| fail(e.to_string()))?
                        .ok_or_else(|| fail(format!("head file {} does not exist", h.display())))?,
                ),
                None => None,
            };
            let heads = match &heads {
                Some(p) => audit::read_heads(
                    &std::fs::read_to_string(p)
                        .map_err(|e| fail(format!("{}: {e}", p.display())))?,
                ),
                None => Vec::new(),
            };
            let key = match &key_file {
                Some(p) => Some(
                    audit::seal::VerificationKey::parse(
                        &std::fs::read_to_string(p)
                            .map_err(|e| fail(format!("{}: {e}", p.display())))?,
                    )
                    .map_err(|e| fail(format!("{}: {e}", p.display())))?,
                ),
                None => None,
            };
            let rep = audit::verify(
                &files,
                &VerifyOptions {
                    head: head.clone(),
                    heads: heads.clone(),
                    key: key.clone(),
                    allow_partial,
                },
            )
            .map_err(|e| fail(e.to_string()))?;
            for p in &rep.problems {
                println!("BROKEN: {p}");
            }
            for (f, l, after) in &rep.recoveries {
                println!("note: {f}:{l}: crash recovery recorded after seq {after} (torn record kept aside)");
            }
            if rep.sealed > 0 && key.is_none() {
                println!("note: {} records are sealed but their seals were not checked: pass --key-file with the verification key", rep.sealed);
            }
            if rep.sealed > 0 && rep.unsealed_before_sealing > 0 {
                println!(
                    "note: the first {} records were written before the log had a sealing key",
                    rep.unsealed_before_sealing
                );
            }
            if let Some((a, b)) = rep.unanchored {
                println!("{}: records seq {a}..{b} are not yet anchored by an exported head (written after the last one)", if require_anchored { "BROKEN" } else { "note" });
            }
            let unanchored_fails = require_anchored && rep.unanchored.is_some();
            if rep.ok() && !unanchored_fails {
                let mut what = vec![format!("{} file(s), chain intact", rep.files.len())];
                if rep.seals_checked > 0 {
                    what.push(format!(
                        "{} seals verified, {} epochs closed",
                        rep.seals_checked, rep.epochs_closed
                    ));
                }
                if let Some(a) = rep.anchored_to {
                    what.push(format!("anchored by heads up to seq {a}"));
                }
                println!(
                    "OK: {} records, seq {}..{}, {}; last record sha256 {}",
                    rep.records,
                    rep.first_seq,
                    rep.last_seq,
                    what.join(", "),
                    rep.last_hash
                );
                if rep.anchored_to.is_none() {
                    println!("note: without --head or --heads, records cut off the end cannot be told from a log that ended there; compare the last sha256 with a head kept off the node");
                }
                Ok(0)
            } else {
                println!(
                    "FAILED: {} problem(s) in {} records",
                    rep.problems.len() + usize::from(unanchored_fails),
                    rep.records
                );
                Ok(1)
            }
        }
        AuditCmd::Keygen { log, epoch_secs } => {
            let key = audit::seal::key_path(&log);
            let vk = audit::seal::SealState::create(
                &key,
                audit::now_ms(),
                epoch_secs.saturating_mul(1000),
            )
            .map_err(|e| fail(format!("{}: {e}", key.display())))?;
            println!("Sealing key written to {} (the node's; it evolves every {epoch_secs} s and the old one is erased).", key.display());
            println!(
                "enclave-netd seals every record of {} from its next start.",
                log.display()
            );
            println!();
            println!(
                "Verification key (printed once; keep it off this node, e.g. with your auditor):"
            );
            println!();
            println!("{}", vk.encode());
            println!();
            println!(
                "Check with: enclavectl audit verify --key-file FILE --heads EXPORTED-HEADS {}",
                log.display()
            );
            Ok(0)
        }
        AuditCmd::Export {
            log,
            to,
            state,
            interval,
            once,
            resend_from,
            metrics,
        } => {
            let state = state.unwrap_or_else(|| {
                let mut s = log.as_os_str().to_owned();
                s.push(".export");
                PathBuf::from(s)
            });
            let mut ex =
                audit::Exporter::new(&log, &to, &state).map_err(|e| fail(e.to_string()))?;
            if let Some(seq) = resend_from {
                ex.rewind_to(seq).map_err(|e| fail(e.to_string()))?;
            }
            loop {
                let result = ex.run_once();
                if let Some(m) = &metrics {
                    let backlog = result.as_ref().map_or_else(
                        |_| {
                            std::fs::metadata(&log)
                                .map_or(0, |md| md.len().saturating_sub(ex.cursor.offset))
                        },
                        |r| r.backlog,
                    );
                    let text = format!(
                        "# HELP enclave_audit_export_records_total Records sent off the node.\n# TYPE enclave_audit_export_records_total counter\nenclave_audit_export_records_total {}\n# HELP enclave_audit_export_failed_runs_total Runs that could not reach the receiver.\n# TYPE enclave_audit_export_failed_runs_total counter\nenclave_audit_export_failed_runs_total {}\n# HELP enclave_audit_export_backlog_bytes Bytes of the log not yet sent.\n# TYPE enclave_audit_export_backlog_bytes gauge\nenclave_audit_export_backlog_bytes {backlog}\n# HELP enclave_audit_export_last_seq The last record sent.\n# TYPE enclave_audit_export_last_seq gauge\nenclave_audit_export_last_seq {}\n",
                        ex.cursor.exported, ex.cursor.failures, ex.cursor.seq
                    );
                    let tmp = m.with_extension("tmp");
                    if std::fs::write(&tmp, text)
                        .and_then(|()| std::fs::rename(&tmp, m))
                        .is_err()
                    {
                        eprintln!("cannot write {}", m.display());
                    }
                }
                match result {
                    Ok(r) => println!(
                        "exported {} records to {to}; head seq {}; {} bytes behind; {} in all, {} failed runs",
                        r.records,
                        r.head.as_ref().map_or(0, |h| h.seq),
                        r.backlog,
                        ex.cursor.exported,
                        ex.cursor.failures
                    ),
                    Err(e) => {
                        eprintln!("export to {to} failed (records wait in the log; retried): {e}");
                        if once {
                            return Ok(1);
                        }
                    }
                }
                if once {
                    return Ok(0);
                }
                std::thread::sleep(std::time::Duration::from_secs(interval.max(1)));
            }
        }
        AuditCmd::Webhook {
            log,
            url,
            state,
            tries,
            batch,
            interval,
            once,
        } => {
            let state = state.unwrap_or_else(|| {
                let mut s = log.as_os_str().to_owned();
                s.push(".webhook");
                PathBuf::from(s)
            });
            let mut w = audit::WebhookSender::new(&log, &url, &state).map_err(fail)?;
            w.tries = tries;
            loop {
                match w.run_once(batch.max(1)) {
                    Ok(r) => {
                        println!(
                            "posted {} records to {url}, {} failed; {} bytes behind; {} posted in all, {} failed",
                            r.sent, r.failed, r.backlog, w.cursor.sent, w.cursor.failed
                        );
                        if let Some(e) = &r.last_error {
                            eprintln!("last failure: {e}");
                        }
                        if once {
                            return Ok(u8::from(r.failed > 0));
                        }
                    }
                    Err(e) => {
                        eprintln!("webhook: {e}");
                        if once {
                            return Ok(2);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_secs(interval.max(1)));
            }
        }
    }
}

fn node_cmd(c: NodeCmd) -> Result<u8, Fail> {
    use enclave_netfilter::node;
    match c {
        NodeCmd::Reload {
            node:
                NodeDirs {
                    policy_dir,
                    registry,
                    peer_dir,
                },
        } => {
            let (file, pods, problems) =
                node::reload_all(&policy_dir, &registry, Some(&peer_dir)).map_err(fail)?;
            println!("policy {}: {} pods", file.display(), pods.len());
            if pods.is_empty() {
                println!(
                    "  nothing to reload: no pods registered in {} (the policy loads; pods started from now on get it)",
                    registry.display()
                );
            }
            for p in &problems {
                println!("  peers: {p}");
            }
            let mut code = 0;
            for p in &pods {
                let nft = match &p.nft {
                    Ok(n) => format!("nftables {n} rules"),
                    Err(e) => {
                        code = 1;
                        format!("nftables FAILED: {e}")
                    }
                };
                let netd = match &p.netd {
                    Ok(a) => a.trim().to_string(),
                    Err(e) => {
                        code = 1;
                        format!("enclave-netd FAILED: {e}")
                    }
                };
                println!("  {}: {nft}; {netd}", p.pod);
            }
            Ok(code)
        }
        NodeCmd::Doctor { paths } => Ok(doctor::print(&doctor::run(&paths))),
        NodeCmd::Quarantine(QuarantineCmd::List { registry }) => {
            let (entries, problems) = node::read_registry(&registry);
            for p in &problems {
                println!("registry: {p}");
            }
            if entries.is_empty() {
                println!("no pods: none registered in {}", registry.display());
                return Ok(0);
            }
            let mut n = 0;
            for e in &entries {
                let st = e
                    .control
                    .as_deref()
                    .map(|c| node::control_request(c, "quarantine"))
                    .unwrap_or_else(|| Err("no control socket".into()));
                match st {
                    Ok(s) if s.starts_with("quarantined") => {
                        n += 1;
                        println!("{}\t{}", e.reference(), s.trim());
                    }
                    Ok(_) => {}
                    Err(err) => println!("{}\tnetd unreachable: {err}", e.reference()),
                }
            }
            if n == 0 {
                println!("no pod quarantined ({} pods on this node)", entries.len());
            }
            Ok(0)
        }
        NodeCmd::Quarantine(QuarantineCmd::Release { pod, registry }) => {
            let (entries, _) = node::read_registry(&registry);
            let e = entries
                .iter()
                .find(|e| e.reference() == pod)
                .ok_or_else(|| Fail(format!("no pod {pod} in {}", registry.display()), 1))?;
            let c = e
                .control
                .as_deref()
                .ok_or_else(|| fail(format!("pod {pod} has no control socket")))?;
            let answer = node::control_request(c, "release").map_err(fail)?;
            let answer = answer.trim();
            match answer.strip_prefix("ok ") {
                Some(what) => {
                    println!("{what}");
                    Ok(0)
                }
                None => Err(Fail(answer.trim_start_matches("error ").to_string(), 1)),
            }
        }
        NodeCmd::Status { registry } => {
            let (entries, problems) = node::read_registry(&registry);
            for p in &problems {
                println!("registry: {p}");
            }
            if entries.is_empty() {
                println!(
                    "no pods: none registered in {} (this node runs no enclave pods, or the shims use another [network] registry; `enclavectl node doctor` checks the node)",
                    registry.display()
                );
                return Ok(0);
            }
            println!("POD\tADDRESSES\tZONE\tENCLAVE-NETD");
            for e in &entries {
                let st = e
                    .control
                    .as_deref()
                    .map(|c| node::control_request(c, "status"))
                    .unwrap_or_else(|| Err("no control socket".into()));
                let ips: Vec<String> = e.ips.iter().map(|i| i.to_string()).collect();
                // The zone netd decides by (labels from the cluster map included), else the
                // annotation.
                let (st, zone) = match st {
                    Ok(s) => {
                        let s = s.trim().to_string();
                        match s.rsplit_once(" zone ") {
                            Some((head, z)) => (head.to_string(), z.to_string()),
                            None => (s, String::new()),
                        }
                    }
                    Err(e) => (format!("netd unreachable: {e}"), String::new()),
                };
                let zone = if zone.is_empty() {
                    e.annotations
                        .get("enclave.io/zone")
                        .map_or("-".to_string(), |z| z.clone())
                } else {
                    zone
                };
                println!("{}\t{}\t{zone}\t{st}", e.reference(), ips.join(","));
            }
            Ok(0)
        }
        NodeCmd::Metrics { registry } => {
            let (entries, _) = node::read_registry(&registry);
            if entries.is_empty() {
                // A comment keeps the output valid Prometheus text.
                println!("# no pods: none registered in {}", registry.display());
                return Ok(0);
            }
            let mut seen_help = std::collections::HashSet::new();
            for e in &entries {
                let Some(c) = e.control.as_deref() else {
                    continue;
                };
                match node::control_request(c, "metrics") {
                    Ok(text) => {
                        for line in text.lines() {
                            // One HELP/TYPE per metric family in the merged output.
                            if line.starts_with('#') && !seen_help.insert(line.to_string()) {
                                continue;
                            }
                            println!("{line}");
                        }
                    }
                    Err(err) => eprintln!("{}: {err}", e.reference()),
                }
            }
            Ok(0)
        }
    }
}

fn flows_cmd(c: FlowsCmd) -> Result<u8, Fail> {
    match c {
        FlowsCmd::Graph {
            logs,
            output,
            policy,
        } => {
            let flows =
                learn::read_flows(&logs).map_err(|e| fail(format!("cannot read logs: {e}")))?;
            let loaded = policy.as_ref().map(|p| load_policy(p)).transpose()?;
            let zones: Vec<String> = loaded
                .iter()
                .flat_map(|l| l.compiled.policy().zones.iter().map(|z| z.name.clone()))
                .collect();
            let mut all = zones.clone();
            all.extend(
                flows
                    .iter()
                    .flat_map(|f| [f.src_zone.clone(), f.dst_zone.clone()]),
            );
            let cde = graph::cde_zones(loaded.as_ref().map(|l| l.compiled.policy()), &all);
            let body = match output.extension().and_then(|e| e.to_str()) {
                Some("svg") => graph::svg(&flows, &zones, &cde),
                Some("dot") | Some("gv") => graph::dot(&flows, &zones),
                _ => {
                    return Err(fail(format!(
                        "{}: the output must end in .svg or .dot",
                        output.display()
                    )))
                }
            };
            std::fs::write(&output, body)
                .map_err(|e| fail(format!("cannot write {}: {e}", output.display())))?;
            println!("wrote {} ({} flows)", output.display(), flows.len());
            Ok(0)
        }
    }
}

/// What a rule's `inspect:` means for a flow from `fz` to `tz`, in words.
/// What a rule allows inside its protocol, in words (none when it says nothing).
fn requests_line(q: &policy::RequestRules) -> Option<String> {
    let list = |v: &[String]| v.join(", ");
    let mut parts = Vec::new();
    for h in &q.http {
        let mut w = Vec::new();
        w.push(if h.methods.is_empty() {
            "any method".to_string()
        } else {
            list(&h.methods)
        });
        if !h.paths.is_empty() {
            w.push(format!("to {}", list(&h.paths)));
        }
        if !h.hosts.is_empty() {
            w.push(format!("for host {}", list(&h.hosts)));
        }
        if !h.headers.is_empty() {
            w.push(format!("with header {}", list(&h.headers)));
        }
        parts.push(format!("HTTP {}", w.join(" ")));
    }
    for g in &q.grpc {
        parts.push(if g.methods.is_empty() {
            format!("gRPC {}/*", g.service)
        } else {
            format!("gRPC {}/{{{}}}", g.service, list(&g.methods))
        });
    }
    if let Some(c) = &q.redis {
        parts.push(format!("Redis commands {}", list(c)));
    }
    if let Some(pg) = &q.postgres {
        let users = if pg.users.is_empty() {
            "any user".into()
        } else {
            format!("user {}", list(&pg.users))
        };
        let dbs = if pg.databases.is_empty() {
            "any database".into()
        } else {
            format!("database {}", list(&pg.databases))
        };
        parts.push(format!("PostgreSQL sessions as {users} on {dbs}"));
    }
    if let Some(n) = &q.dns {
        parts.push(format!("DNS queries for {}", list(n)));
    }
    if let Some(n) = &q.sni {
        parts.push(format!("TLS to server names {}", list(n)));
    }
    (!parts.is_empty()).then(|| format!("only {}", parts.join("; ")))
}

fn inspect_line(
    p: &policy::Policy,
    i: policy::Inspect,
    fz: policy::ZoneId,
    tz: policy::ZoneId,
) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(a) = i.threats {
        parts.push(format!(
            "attacks (SQL injection, request smuggling, a second protocol, DNS tunneling, TCP evasions, old TLS) are {}",
            if a == policy::OnFinding::Deny { "cut" } else { "alerted" }
        ));
    }
    if let Some(a) = i.dlp {
        let verb = if a == policy::OnFinding::Deny {
            "cut"
        } else {
            "alerted"
        };
        match p.dlp_sides(i, fz, tz) {
            [false, false] => parts
                .push("card data is not read (both ends in one zone, or none in the CDE)".into()),
            [true, true] => parts.push(format!(
                "card numbers and SSNs in cleartext either way are {verb}"
            )),
            [true, false] => parts.push(format!(
                "card numbers and SSNs the source sends (leaving the CDE) are {verb}"
            )),
            [false, true] => parts.push(format!(
                "card numbers and SSNs the destination answers with (leaving the CDE) are {verb}"
            )),
        }
    }
    (!parts.is_empty()).then(|| format!("{} (docs/inspection.md)", parts.join("; ")))
}
