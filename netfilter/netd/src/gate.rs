//! The decision on every frame: the netfilter matcher for the pod, the audit record of
//! every decision worth keeping (written before the frame moves), reloads and metrics.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use enclave_netfilter::audit::{base_event, now_ms, AuditContext, AuditLog, RecordBuilder};
use enclave_netfilter::capture::{self, CaptureMeta, Ring};
use enclave_netfilter::conntrack::FlowKey;
use enclave_netfilter::identity::ClusterPeers;
use enclave_netfilter::matcher::{
    Direction, Enforcer, EnforcerConfig, EventKind, FlowEvent, Reason, ResponseEvent, Verdict,
};
use enclave_netfilter::node::{NodeView, RegistryEntry};
use enclave_netfilter::policy::ResponseAction;
use serde_json::json;

/// Denial records per second a pod may cause, and the burst: a guest spraying denied
/// frames must not fill the node's disk. Suppressed records are counted, and the count is
/// written in a summary record once the budget allows.
const DENIAL_RATE: u64 = 100;
const DENIAL_BURST: u64 = 200;

/// Token bucket for denial records.
struct Budget {
    tokens: u64,
    last: u64,
}

impl Budget {
    fn take(&mut self, now: u64) -> bool {
        let refill = now.saturating_sub(self.last) / (1_000_000_000 / DENIAL_RATE);
        if refill > 0 {
            self.tokens = (self.tokens + refill).min(DENIAL_BURST);
            self.last = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Where the gate's inputs come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The node's policy directory.
    pub policy_dir: PathBuf,
    /// The node's pod registry.
    pub registry: PathBuf,
    /// The node's peer directory (the cluster's pods, from enclave-node), if any.
    pub peer_dir: Option<PathBuf>,
    /// This pod.
    pub pod: RegistryEntry,
    /// Node name for records.
    pub node: String,
}

/// What the control thread reads a new view from.
pub struct ReloadSources {
    /// The node's policy directory.
    pub policy_dir: PathBuf,
    /// The node's pod registry.
    pub registry: PathBuf,
    /// The node's peer directory.
    pub peer_dir: Option<PathBuf>,
    /// The cluster map in use.
    pub cluster: Option<std::sync::Arc<ClusterPeers>>,
    /// The policy file in force.
    pub policy_file: PathBuf,
}

/// Audit counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditStats {
    /// Records written.
    pub records: u64,
    /// Denial records left out by the rate limit.
    pub suppressed: u64,
    /// Records that could not be written (their frames were dropped).
    pub errors: u64,
    /// Policy reloads done.
    pub reloads: u64,
    /// Policy reloads refused (the old policy stayed).
    pub reload_errors: u64,
    /// Changes of peers put in force (without a policy reload).
    pub peer_updates: u64,
    /// Cluster maps that could not be read (the last good one stayed in use).
    pub peer_map_errors: u64,
    /// Response records written.
    pub responses: u64,
}

/// netd's exit status when a response rule restarts the pod.
pub const RESTART_EXIT: i32 = 75;

/// The pod's captures: the ring of recent frames and the file sections are appended to
/// (opened before privileges were dropped).
pub struct Captures {
    ring: Ring,
    file: std::fs::File,
    path: PathBuf,
    written: u64,
    max: u64,
    /// Wall-clock nanoseconds at the gate's `t0`.
    wall0: u64,
    /// The last capture, reused for a second record about the same flow and frame.
    last: Option<(FlowKey, u64, serde_json::Value)>,
    pushes: u64,
    interface: String,
    /// Sections written.
    pub count: u64,
    /// Captures not written (the file reached its limit, or a write failed).
    pub skipped: u64,
}

impl Captures {
    /// Captures of the frames on `interface` (the tap), appended to `path` (created 0640 if
    /// missing), at most `max` bytes in all.
    pub fn open(path: PathBuf, max: u64, interface: &str) -> Result<Captures, String> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        let wall0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Captures {
            ring: Ring::new(capture::RING_FRAMES),
            file,
            path,
            written,
            max,
            wall0,
            last: None,
            pushes: 0,
            interface: interface.to_string(),
            count: 0,
            skipped: 0,
        })
    }

    fn push(&mut self, now: u64, dir: Direction, frame: &[u8]) {
        self.ring.push(self.wall0 + now, dir, frame);
        self.pushes += 1;
    }

    /// Captures the flow of `ev` for a record about `event`; what the record says of it.
    fn take(&mut self, ev: &FlowEvent, event: &str, pod: &str) -> serde_json::Value {
        use std::io::Write as _;
        let key = FlowKey::new(ev.proto, ev.src, ev.sport, ev.dst, ev.dport).0;
        if let Some((k, p, v)) = &self.last {
            if *k == key && *p == self.pushes {
                return v.clone();
            }
        }
        let meta = CaptureMeta {
            event: event.to_string(),
            pod: pod.to_string(),
            flow: format!(
                "{} {}:{} -> {}:{}",
                enclave_netfilter::packet::proto_name(ev.proto),
                ev.src,
                ev.sport,
                ev.dst,
                ev.dport
            ),
            interface: self.interface.clone(),
        };
        let v = match capture::capture(&self.ring, &key, &meta) {
            None => json!({"frames": 0}),
            Some(c) if self.written + c.bytes.len() as u64 > self.max => {
                self.skipped += 1;
                json!({"skipped": format!("{} reached its limit of {} bytes", self.path.display(), self.max)})
            }
            Some(c) => match self.file.write_all(&c.bytes) {
                Ok(()) => {
                    self.written += c.bytes.len() as u64;
                    self.count += 1;
                    json!({"uid": c.uid, "file": self.path.display().to_string(), "frames": c.frames, "numbers_masked": c.masked})
                }
                Err(e) => {
                    self.skipped += 1;
                    json!({"skipped": format!("{}: {e}", self.path.display())})
                }
            },
        };
        self.last = Some((key, self.pushes, v.clone()));
        v
    }
}

/// The enforcing part.
pub struct Enforcing {
    enforcer: Enforcer,
    builder: RecordBuilder,
    log: AuditLog,
    budget: Budget,
    pending_suppressed: u64,
    sources: Sources,
    policy_file: PathBuf,
    /// The cluster map in use (the last good one).
    cluster: Option<std::sync::Arc<ClusterPeers>>,
    /// Audit counters.
    pub audit: AuditStats,
    /// Packet captures, when the pod has a capture file.
    pub captures: Option<Captures>,
    /// Where addresses learned for name zones go (the shim adds them to the nftables
    /// table's sets): a datagram socket connected before the privilege drop.
    pub names_out: Option<std::os::unix::net::UnixDatagram>,
    /// Learned addresses the shim's socket did not take (full, or gone).
    pub names_lost: u64,
    /// The gate's clock origin (the matcher's `now` is nanoseconds since it).
    t0: Instant,
}

/// Decides frames: enforcing, or (for the benchmark's baseline) passing everything.
pub struct Gate {
    enforcing: Option<Enforcing>,
    t0: Instant,
    /// TCP resets for the frame just dropped: back to its sender, and on to its receiver.
    resets: (Option<Vec<u8>>, Option<Vec<u8>>),
    reset_budget: Budget,
}

/// Resets per second netd sends for a pod's cut flows (each answers a frame it dropped).
const RESET_RATE_BURST: u64 = 200;

/// The resets of the connection `frame` belongs to: back to its sender, and (with `on`)
/// on to its receiver; none when the frame is not a TCP segment or is itself a reset.
fn tcp_resets(frame: &[u8], on: bool) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    use enclave_netfilter::packet::{build, Frame, Net, TcpFlags, L4};
    let Ok(f) = Frame::parse(frame) else {
        return (None, None);
    };
    let Net::Ip(ip) = f.net else {
        return (None, None);
    };
    let L4::Tcp(t) = ip.l4 else {
        return (None, None);
    };
    if t.flags.has(TcpFlags::RST) {
        return (None, None);
    }
    let ends = build::Ends {
        src_mac: f.eth.src,
        dst_mac: f.eth.dst,
        src: ip.src,
        dst: ip.dst,
        sport: t.sport,
        dport: t.dport,
    };
    let len = t.payload.len() as u32
        + u32::from(t.flags.has(TcpFlags::SYN))
        + u32::from(t.flags.has(TcpFlags::FIN));
    // Back: as the receiver would, from the segment's sequence space, acknowledging it.
    let seq = if t.flags.has(TcpFlags::ACK) { t.ack } else { 0 };
    let back = build::tcp(
        &ends.reversed(),
        TcpFlags::RST | TcpFlags::ACK,
        seq,
        t.seq.wrapping_add(len),
        b"",
    );
    // On: as the sender would, at the sequence number the receiver expects.
    let forward = on.then(|| build::tcp(&ends, TcpFlags::RST | TcpFlags::ACK, t.seq, t.ack, b""));
    (Some(back), forward)
}

impl Gate {
    /// A gate that passes every frame (no policy, no audit).
    pub fn forward_only() -> Gate {
        Gate {
            enforcing: None,
            t0: Instant::now(),
            resets: (None, None),
            reset_budget: Budget {
                tokens: RESET_RATE_BURST,
                last: 0,
            },
        }
    }

    /// An enforcing gate for `sources.pod`, with its policy and peers read now.
    pub fn new_enforcing(sources: Sources, log: AuditLog) -> Result<Gate, String> {
        let view = NodeView::load(
            &sources.policy_dir,
            &sources.registry,
            sources.peer_dir.as_deref(),
            None,
        )?;
        for p in &view.problems {
            eprintln!("enclave-netd: registry: {p} (entry ignored)");
        }
        let mut audit = AuditStats::default();
        if let Some(p) = &view.cluster_problem {
            eprintln!("enclave-netd: peers: {p}");
            audit.peer_map_errors += 1;
        }
        let (policy, peers, policy_file, cluster) =
            (view.policy, view.peers, view.policy_file, view.cluster);
        let w = sources.pod.workload();
        let mac = w
            .mac
            .ok_or_else(|| format!("pod {}: no valid MAC", sources.pod.reference()))?;
        let local = w.local(mac);
        let enforcer = Enforcer::new(
            policy.clone(),
            peers.clone(),
            local,
            EnforcerConfig::default(),
        );
        let builder = RecordBuilder::new(AuditContext {
            policy,
            peers,
            local: enforcer.local().identity.clone(),
            local_ips: sources.pod.ips.clone(),
            node: sources.node.clone(),
            component: "enclave-netd".into(),
        });
        let mut e = Enforcing {
            enforcer,
            builder,
            log,
            budget: Budget {
                tokens: DENIAL_BURST,
                last: 0,
            },
            pending_suppressed: 0,
            sources,
            policy_file,
            cluster,
            audit,
            captures: None,
            names_out: None,
            names_lost: 0,
            t0: Instant::now(),
        };
        e.note(&format!(
            "enclave-netd started for pod {} (zone {}, mode {}) under policy {} version {} from {}",
            e.sources.pod.reference(),
            e.zone_name(),
            e.enforcer.mode().as_str(),
            e.enforcer.policy().policy().name,
            e.enforcer.policy().policy().version,
            e.policy_file.display()
        ))
        .map_err(|err| format!("audit log: {err}"))?;
        let t0 = e.t0;
        Ok(Gate {
            enforcing: Some(e),
            t0,
            resets: (None, None),
            reset_budget: Budget {
                tokens: RESET_RATE_BURST,
                last: 0,
            },
        })
    }

    /// The enforcing part, if any.
    pub fn enforcing(&self) -> Option<&Enforcing> {
        self.enforcing.as_ref()
    }

    /// The enforcing part, if any, to reload.
    pub fn enforcing_mut(&mut self) -> Option<&mut Enforcing> {
        self.enforcing.as_mut()
    }

    /// Whether `frame` (Ethernet, without the virtio-net header) may pass. Its audit record,
    /// if it gets one, is written first; a record that cannot be written drops the frame.
    #[inline]
    pub fn pass(&mut self, dir: Direction, frame: &[u8]) -> bool {
        let Some(e) = self.enforcing.as_mut() else {
            return true;
        };
        let now = self.t0.elapsed().as_nanos() as u64;
        let fast_before = e.enforcer.counters().fast_path_frames;
        let d = e.enforcer.decide(dir, frame, now);
        // Frames the full path decided go to the capture ring (the flow cache's do not:
        // they belong to established flows that nothing inspects).
        if let Some(c) = e.captures.as_mut() {
            if e.enforcer.counters().fast_path_frames == fast_before {
                c.push(now, dir, frame);
            }
        }
        if e.names_out.is_some() {
            e.send_names();
        }
        if e.enforcer.has_findings() && !e.write_findings() && d.verdict == Verdict::Pass {
            return false;
        }
        if let Some(ev) = &d.event {
            if !e.record(ev, now) {
                return false;
            }
        }
        if d.verdict == Verdict::Pass {
            return true;
        }
        // A connection netd cut (inspection, an L7 mismatch, a reload, a quarantine) is
        // reset rather than left to time out: the sender of each frame it drops gets a
        // reset back, and when the cut happens on this frame the receiver gets one too.
        let (back, on) = match d.reason {
            Reason::ThreatDetected | Reason::DataLeak | Reason::AppMismatch => (true, true),
            Reason::FlowCut | Reason::Quarantined => (true, false),
            _ => (false, false),
        };
        if back && self.reset_budget.take(now) {
            self.resets = tcp_resets(frame, on);
        }
        false
    }

    /// The resets for the frame [`Gate::pass`] just dropped: (back to its sender, on to
    /// its receiver).
    pub fn take_resets(&mut self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        std::mem::take(&mut self.resets)
    }
}

impl Enforcing {
    /// The name of the pod's zone under the policy in force.
    pub fn zone_name(&self) -> String {
        self.enforcer
            .policy()
            .policy()
            .zone_name(self.enforcer.zone())
            .to_string()
    }

    /// Writes the record of `ev`; false if it could not be written.
    fn record(&mut self, ev: &FlowEvent, now: u64) -> bool {
        if ev.kind == EventKind::Denied && !self.budget.take(now) {
            self.audit.suppressed += 1;
            self.pending_suppressed += 1;
            return true;
        }
        if self.pending_suppressed > 0 {
            let n = self.pending_suppressed;
            self.pending_suppressed = 0;
            let _ = self.note(&format!(
                "{n} denial records of pod {} were not written (more than {DENIAL_RATE}/s); the denials were enforced and are counted in enclave_netd_frames_total",
                self.sources.pod.reference()
            ));
        }
        self.write(ev)
    }

    /// Writes the Detection Finding records of what inspection found (never rate-limited:
    /// each threat is reported once per flow, and a deny cuts the flow); false if one could
    /// not be written.
    /// Hands learned name-zone addresses to the shim: `SET ADDRESS TTL` per datagram.
    fn send_names(&mut self) {
        let learned = self.enforcer.take_learned_names();
        let Some(sock) = &self.names_out else { return };
        for l in learned {
            let set = enclave_netfilter::nft::name_set(l.zone, l.ip.is_ipv6());
            let msg = format!("{set} {} {}", l.ip, l.ttl);
            if sock.send(msg.as_bytes()).is_err() {
                self.names_lost += 1;
            }
        }
    }

    fn write_findings(&mut self) -> bool {
        let mut ok = true;
        let mut restart = None;
        for f in self.enforcer.take_findings() {
            let mut rec = self.builder.finding(&f, now_ms());
            let pod = self.sources.pod.reference();
            if let Some(c) = self.captures.as_mut() {
                rec["unmapped"]["enclave"]["capture"] = c.take(&f.flow, f.threat.id(), &pod);
            }
            match self.log.append(rec) {
                Ok(_) => self.audit.records += 1,
                Err(err) => {
                    self.audit.errors += 1;
                    eprintln!(
                        "enclave-netd: audit log: {err} (a {} finding)",
                        f.threat.id()
                    );
                    ok = false;
                }
            }
        }
        for r in self.enforcer.take_responses() {
            if r.acted && r.actions.contains(&ResponseAction::Restart) {
                restart = Some(r.response.clone());
            }
            if !self.write_response(&r) {
                ok = false;
            }
        }
        for ev in self.enforcer.take_cuts() {
            ok &= self.write(&ev);
        }
        if let Some(name) = restart {
            // The shim sees netd gone, stops the VM, and the orchestrator starts the pod
            // again (with a fresh netd): the response's record above says why.
            eprintln!(
                "enclave-netd: response `{name}` restarts pod {}: exiting {RESTART_EXIT}",
                self.sources.pod.reference()
            );
            std::process::exit(RESTART_EXIT);
        }
        ok
    }

    /// The record of a response (an OCSF Base Event: what was done, to which pod, about
    /// which finding); records marked `webhook` are what `enclavectl audit webhook` sends.
    fn write_response(&mut self, r: &ResponseEvent) -> bool {
        let p = self.enforcer.policy().policy();
        let actions: Vec<&str> = r.actions.iter().map(|a| a.as_str()).collect();
        let keep = self
            .enforcer
            .quarantine()
            .filter(|q| q.response == r.response)
            .map(|q| q.keep.clone())
            .unwrap_or_default();
        let message = format!(
            "response `{}` to {} in bytes pod {} sent ({}): {}{}",
            r.response,
            r.threat.id(),
            self.sources.pod.reference(),
            r.detail,
            actions.join(", "),
            if r.acted {
                String::new()
            } else {
                " (monitor mode: recorded, not carried out)".into()
            }
        );
        let mut rec = self.operational(4, "High", &message);
        rec["unmapped"]["enclave"]["webhook"] = json!(r.actions.contains(&ResponseAction::Webhook));
        rec["unmapped"]["enclave"]["response"] = json!({
                "name": r.response,
                "actions": actions,
                "acted": r.acted,
                "threat": r.threat.id(),
                "detail": r.detail,
                "keep": keep,
                "flow": {
                    "protocol": enclave_netfilter::packet::proto_name(r.flow.proto),
                    "src": format!("{}:{}", r.flow.src, r.flow.sport),
                    "dst": format!("{}:{}", r.flow.dst, r.flow.dport),
                    "src_zone": p.zone_name(r.flow.src_zone),
                    "dst_zone": p.zone_name(r.flow.dst_zone),
                },
        });
        match self.log.append(rec) {
            Ok(_) => {
                self.audit.records += 1;
                self.audit.responses += 1;
                true
            }
            Err(e) => {
                self.audit.errors += 1;
                eprintln!("enclave-netd: audit log: {e} (a response record)");
                false
            }
        }
    }

    /// Ends the pod's quarantine (the control socket's `release`), recorded; what ended.
    pub fn release(&mut self, by: &str) -> Result<String, String> {
        let q = self
            .enforcer
            .release()
            .ok_or_else(|| format!("pod {} is not quarantined", self.sources.pod.reference()))?;
        let what = format!(
            "pod {} released from quarantine (response `{}`, after {}) by {by}",
            self.sources.pod.reference(),
            q.response,
            q.threat.id()
        );
        self.note(&what)?;
        Ok(what)
    }

    /// The quarantine in force, in one line.
    pub fn quarantine_line(&self) -> String {
        match self.enforcer.quarantine() {
            Some(q) => format!(
                "quarantined response {} threat {} keep {}\n",
                q.response,
                q.threat.id(),
                if q.keep.is_empty() {
                    "-".to_string()
                } else {
                    q.keep.join(",")
                }
            ),
            None => "not quarantined\n".into(),
        }
    }

    /// Writes the record of `ev` now; false (counted, and said on stderr) if it could not be.
    fn write(&mut self, ev: &FlowEvent) -> bool {
        let mut rec = self.builder.record(ev, now_ms());
        // The DNS name the pod resolved for the peer, when it did (name zones, learn mode).
        if ev.dir == Direction::Egress && self.enforcer.names().active() {
            let now = self.t0.elapsed().as_nanos() as u64;
            if let Some(name) = self.enforcer.names().name_of(ev.dst, now) {
                rec["unmapped"]["enclave"]["dst_name"] = name.into();
            }
        }
        if ev.kind == EventKind::Denied && ev.proto != 0 {
            let pod = self.sources.pod.reference();
            if let Some(c) = self.captures.as_mut() {
                rec["unmapped"]["enclave"]["capture"] = c.take(ev, ev.reason.as_str(), &pod);
            }
        }
        match self.log.append(rec) {
            Ok(_) => {
                self.audit.records += 1;
                true
            }
            Err(err) => {
                self.audit.errors += 1;
                if self.audit.errors == 1 || self.audit.errors.is_power_of_two() {
                    eprintln!(
                        "enclave-netd: audit log: {err} (frames are dropped until it is writable)"
                    );
                }
                false
            }
        }
    }

    /// A Base Event about this pod (start, reload, suppression, a response), with the
    /// policy in force and the pod's node, name, namespace and zone.
    fn operational(&self, severity_id: u8, severity: &str, message: &str) -> serde_json::Value {
        let p = self.enforcer.policy().policy();
        let mut rec = base_event(severity_id, severity, message, "enclave-netd");
        rec["metadata"]["product"]["feature"] = json!({"name": "enclave-netd"});
        rec["policy"] = json!({"name": p.name, "version": p.version});
        rec["unmapped"] = json!({"enclave": {
            "node": self.sources.node,
            "pod": self.sources.pod.name,
            "namespace": self.sources.pod.namespace,
            "zone": self.zone_name(),
        }});
        rec
    }

    /// An operational record (start, reload, suppression) in the same chain.
    fn note(&mut self, message: &str) -> Result<(), String> {
        let rec = self.operational(1, "Informational", message);
        self.log
            .append(rec)
            .map(|_| ())
            .map_err(|e| e.to_string())?;
        self.audit.records += 1;
        Ok(())
    }

    /// The policy in force now (what a reload is prepared against).
    pub fn current_policy(&self) -> std::sync::Arc<enclave_netfilter::policy::CompiledPolicy> {
        self.enforcer.policy().clone()
    }

    /// Where a reload reads from: the policy directory, the registry and the peer directory
    /// (with the cluster map in use, kept if the one on disk is broken). The control thread
    /// reads and compiles the node's view from them without holding the datapath lock, then
    /// hands it to [`Enforcing::swap_in`] under the lock.
    pub fn sources(&self) -> ReloadSources {
        ReloadSources {
            policy_dir: self.sources.policy_dir.clone(),
            registry: self.sources.registry.clone(),
            peer_dir: self.sources.peer_dir.clone(),
            cluster: self.cluster.clone(),
            policy_file: self.policy_file.clone(),
        }
    }

    /// Puts a view read by [`NodeView::load`] in force, with its swap prepared against the
    /// policy now in force: flows still allowed go on, flows now denied are cut and
    /// recorded. A view that did not load is recorded as a refusal and leaves the old policy
    /// in force.
    pub fn swap_in(
        &mut self,
        view: Result<(NodeView, enclave_netfilter::matcher::PreparedReload), String>,
    ) -> Result<String, String> {
        self.swap(view, false)
    }

    /// Puts a view with new peers (and the policy in force) in force: flows whose peer
    /// changed zone, or left, are re-decided as a reload does. Recorded when it cuts flows or
    /// the cluster map could not be read.
    pub fn swap_in_peers(
        &mut self,
        view: (NodeView, enclave_netfilter::matcher::PreparedReload),
    ) -> Result<String, String> {
        self.swap(Ok(view), true)
    }

    fn swap(
        &mut self,
        view: Result<(NodeView, enclave_netfilter::matcher::PreparedReload), String>,
        peers_only: bool,
    ) -> Result<String, String> {
        let (view, prepared) = match view {
            Ok(v) => v,
            Err(e) => {
                self.audit.reload_errors += 1;
                let _ = self.note(&format!(
                    "policy reload refused, the previous policy stays in force: {e}"
                ));
                return Err(e);
            }
        };
        let (policy, peers) = (view.policy.clone(), view.peers.clone());
        let cut = self.enforcer.install(prepared);
        // Whoever sent this re-rendered the pod's nftables table, emptying its name sets:
        // every address still learned goes to the shim again.
        if self.names_out.is_some() {
            self.enforcer
                .replay_names(self.t0.elapsed().as_nanos() as u64);
            self.send_names();
        }
        let cx = self.builder.context().clone();
        self.builder = RecordBuilder::new(AuditContext {
            policy: policy.clone(),
            peers,
            local: self.enforcer.local().identity.clone(),
            ..cx
        });
        self.policy_file = view.policy_file;
        if let Some(p) = &view.cluster_problem {
            self.audit.peer_map_errors += 1;
            eprintln!("enclave-netd: peers: {p}");
        }
        self.cluster = view.cluster;
        let cluster = match &self.cluster {
            Some(m) => format!(
                "; {} cluster pods (map generation {}{})",
                m.pods.len(),
                m.generation,
                if m.stale {
                    ", stale: enclave-node cannot reach the API server"
                } else {
                    ""
                }
            ),
            None => String::new(),
        };
        let problems = view
            .problems
            .iter()
            .map(|p| format!("registry: {p}"))
            .chain(view.cluster_problem.iter().map(|p| format!("peers: {p}")))
            .collect::<Vec<_>>();
        let summary = format!(
            "{} {} version {} from {} in force for pod {} (zone {}, mode {}); {} known pods{cluster}; {} flows cut{}",
            if peers_only { "peers changed; policy" } else { "policy" },
            policy.policy().name,
            policy.policy().version,
            self.policy_file.display(),
            self.sources.pod.reference(),
            self.zone_name(),
            self.enforcer.mode().as_str(),
            view.entries.len(),
            cut.len(),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; {}", problems.join("; "))
            }
        );
        if peers_only {
            self.audit.peer_updates += 1;
            if !cut.is_empty() || !problems.is_empty() {
                self.note(&summary)?;
            }
        } else {
            self.audit.reloads += 1;
            self.note(&summary)?;
        }
        for ev in &cut {
            self.write(ev);
        }
        Ok(summary)
    }

    /// The labels that name this pod in metrics.
    pub fn labels(&self) -> String {
        let pod = &self.sources.pod;
        format!(
            "pod=\"{}\",namespace=\"{}\",zone=\"{}\"",
            esc(&pod.name),
            esc(&pod.namespace),
            esc(&self.zone_name())
        )
    }

    /// Prometheus text exposition of the counters.
    pub fn metrics(&self, out: &mut String) {
        let p = self.enforcer.policy().policy();
        let labels = self.labels();
        let c = self.enforcer.counters();
        let _ = writeln!(
            out,
            "# HELP enclave_netd_frames_total Frames decided, by reason and verdict.\n# TYPE enclave_netd_frames_total counter"
        );
        for r in Reason::ALL {
            let n = c.frames[*r as usize];
            if n == 0 {
                continue;
            }
            let v = if r.verdict() == Verdict::Pass {
                "pass"
            } else {
                "drop"
            };
            let _ = writeln!(
                out,
                "enclave_netd_frames_total{{{labels},reason=\"{}\",verdict=\"{v}\"}} {n}",
                r.as_str()
            );
        }
        let names = self.enforcer.names();
        let _ = writeln!(
            out,
            "# HELP enclave_netd_name_addresses Addresses this pod resolved for name zones, held now.\n# TYPE enclave_netd_name_addresses gauge\nenclave_netd_name_addresses{{{labels}}} {}",
            names.len()
        );
        let _ = writeln!(
            out,
            "# HELP enclave_netd_name_answers_ignored_total DNS answers that matched no query the pod sent (forged or late).\n# TYPE enclave_netd_name_answers_ignored_total counter\nenclave_netd_name_answers_ignored_total{{{labels}}} {}",
            names.unsolicited
        );
        let _ = writeln!(
            out,
            "# HELP enclave_netd_name_addresses_lost_total Learned addresses not kept (table full) or not handed to the shim.\n# TYPE enclave_netd_name_addresses_lost_total counter\nenclave_netd_name_addresses_lost_total{{{labels}}} {}",
            names.dropped + self.names_lost
        );
        let _ = writeln!(
            out,
            "# HELP enclave_netd_bytes_total Bytes decided, by reason.\n# TYPE enclave_netd_bytes_total counter"
        );
        for r in Reason::ALL {
            let n = c.bytes[*r as usize];
            if n > 0 {
                let _ = writeln!(
                    out,
                    "enclave_netd_bytes_total{{{labels},reason=\"{}\"}} {n}",
                    r.as_str()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP enclave_netd_rule_flows_total New flows decided by each rule.\n# TYPE enclave_netd_rule_flows_total counter"
        );
        for (i, rule) in p.rules.iter().enumerate() {
            let n = c.rule_flows.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "enclave_netd_rule_flows_total{{{labels},rule=\"{}\",action=\"{}\"}} {n}",
                esc(&rule.name),
                if rule.action == enclave_netfilter::policy::Action::Allow {
                    "allow"
                } else {
                    "deny"
                }
            );
        }
        let _ = writeln!(
            out,
            "# HELP enclave_netd_findings_total Inspection findings (threats and card data), alerted or denied.\n# TYPE enclave_netd_findings_total counter"
        );
        for t in enclave_netfilter::inspect::Threat::ALL {
            let n = c.findings[*t as usize];
            if n > 0 {
                let _ = writeln!(
                    out,
                    "enclave_netd_findings_total{{{labels},threat=\"{}\"}} {n}",
                    t.id()
                );
            }
        }
        let (held, budget) = self.enforcer.inspect_held();
        let _ = writeln!(
            out,
            "# HELP enclave_netd_inspected_bytes_total Payload bytes handed to inspection.\n# TYPE enclave_netd_inspected_bytes_total counter\nenclave_netd_inspected_bytes_total{{{labels}}} {}",
            c.inspected_bytes
        );
        let _ = writeln!(
            out,
            "# HELP enclave_netd_inspect_held_bytes Bytes inspected flows hold for reassembly.\n# TYPE enclave_netd_inspect_held_bytes gauge\nenclave_netd_inspect_held_bytes{{{labels}}} {held}\n# HELP enclave_netd_inspect_budget_bytes The pod's reassembly budget.\n# TYPE enclave_netd_inspect_budget_bytes gauge\nenclave_netd_inspect_budget_bytes{{{labels}}} {budget}"
        );
        let _ = writeln!(
            out,
            "# HELP enclave_netd_responses_total Response rules carried out (or, in monitor mode, recorded).\n# TYPE enclave_netd_responses_total counter\nenclave_netd_responses_total{{{labels}}} {}\n# HELP enclave_netd_quarantined 1 while a response rule holds the pod in quarantine.\n# TYPE enclave_netd_quarantined gauge\nenclave_netd_quarantined{{{labels}}} {}",
            self.audit.responses,
            u64::from(self.enforcer.quarantine().is_some())
        );
        if let Some(c) = &self.captures {
            let _ = writeln!(
                out,
                "# HELP enclave_netd_captures_total Packet captures written (one pcapng section each).\n# TYPE enclave_netd_captures_total counter\nenclave_netd_captures_total{{{labels}}} {}\n# HELP enclave_netd_captures_skipped_total Captures not written (the file reached its limit, or a write failed).\n# TYPE enclave_netd_captures_skipped_total counter\nenclave_netd_captures_skipped_total{{{labels}}} {}",
                c.count, c.skipped
            );
        }
        let a = self.audit;
        let ft = self.enforcer.flow_stats();
        for (name, help, kind, v) in [
            (
                "enclave_netd_default_deny_flows_total",
                "New flows no rule allowed.",
                "counter",
                c.default_deny_flows,
            ),
            (
                "enclave_netd_fast_path_frames_total",
                "Established frames decided from the flow cache.",
                "counter",
                c.fast_path_frames,
            ),
            (
                "enclave_netd_audit_records_total",
                "Audit records written.",
                "counter",
                a.records,
            ),
            (
                "enclave_netd_audit_suppressed_total",
                "Denial records left out by the rate limit.",
                "counter",
                a.suppressed,
            ),
            (
                "enclave_netd_audit_errors_total",
                "Audit records that could not be written (their frames were dropped).",
                "counter",
                a.errors,
            ),
            (
                "enclave_netd_reloads_total",
                "Policy reloads done.",
                "counter",
                a.reloads,
            ),
            (
                "enclave_netd_reload_errors_total",
                "Policy reloads refused.",
                "counter",
                a.reload_errors,
            ),
            (
                "enclave_netd_peer_updates_total",
                "Changes of peers (the registry or the cluster map) put in force.",
                "counter",
                a.peer_updates,
            ),
            (
                "enclave_netd_peer_map_errors_total",
                "Cluster maps that could not be read; the last good one stayed in use.",
                "counter",
                a.peer_map_errors,
            ),
            (
                "enclave_netd_peer_map_stale",
                "1 while the cluster map in use is marked stale (enclave-node cannot reach the API server).",
                "gauge",
                u64::from(self.cluster.as_ref().is_some_and(|m| m.stale)),
            ),
            (
                "enclave_netd_peer_map_generation",
                "Generation of the cluster map in use (0: none).",
                "gauge",
                self.cluster.as_ref().map_or(0, |m| m.generation),
            ),
            (
                "enclave_netd_flows",
                "Flows in the connection table.",
                "gauge",
                ft.entries,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP enclave_netd_policy_info The policy in force.\n# TYPE enclave_netd_policy_info gauge\nenclave_netd_policy_info{{{labels},policy=\"{}\",version=\"{}\",mode=\"{}\"}} 1",
            esc(&p.name),
            esc(&p.version),
            self.enforcer.mode().as_str()
        );
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denial_budget_refills_at_its_rate() {
        let mut b = Budget {
            tokens: DENIAL_BURST,
            last: 0,
        };
        let taken = (0..1000).filter(|_| b.take(0)).count() as u64;
        assert_eq!(taken, DENIAL_BURST);
        // One second later: DENIAL_RATE more.
        let taken = (0..1000).filter(|_| b.take(1_000_000_000)).count() as u64;
        assert_eq!(taken, DENIAL_RATE);
    }
}

#[cfg(test)]
mod reset_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::tcp_resets;
    use enclave_netfilter::packet::{build, Frame, MacAddr, Net, TcpFlags as F, L4};

    fn tcp_of(frame: &[u8]) -> (std::net::IpAddr, u16, u32, u32, u8) {
        let f = Frame::parse(frame).unwrap();
        let Net::Ip(ip) = f.net else { panic!("not IP") };
        let L4::Tcp(t) = ip.l4 else { panic!("not TCP") };
        (ip.src, t.sport, t.seq, t.ack, t.flags.0)
    }

    #[test]
    fn resets_sit_where_each_end_expects_them() {
        let e = build::Ends {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: 40000,
            dport: 5432,
        };
        let seg = build::tcp(&e, F::ACK | F::PSH, 1000, 7000, b"select");
        let (back, on) = tcp_resets(&seg, true);
        // Back to the sender: from the receiver's side, acknowledging the segment.
        let (src, sport, seq, ack, flags) = tcp_of(&back.unwrap());
        assert_eq!((src, sport, seq, ack), (e.dst, 5432, 7000, 1006));
        assert_eq!(flags & (F::RST | F::ACK), F::RST | F::ACK);
        // On to the receiver: at the sequence number it expects from the sender.
        let (src, sport, seq, ack, _) = tcp_of(&on.unwrap());
        assert!(
            tcp_resets(&seg, false).1.is_none(),
            "no reset on without `on`"
        );
        assert_eq!((src, sport, seq, ack), (e.src, 40000, 1000, 7000));
        // No reset for a reset, or for what is not TCP.
        assert_eq!(
            tcp_resets(&build::tcp(&e, F::RST, 1, 0, b""), true),
            (None, None)
        );
        assert_eq!(tcp_resets(&build::udp(&e, b"x"), true), (None, None));
    }
}
