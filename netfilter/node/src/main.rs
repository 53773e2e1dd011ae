//! `enclave-node`: publishes the cluster's pods to the node's peer directory (see lib.rs).

use enclave_netfilter::identity::CLUSTER_MAP_FILE;
use enclave_node::metrics::{self, Metrics};
use enclave_node::pod::{namespace_from_json, pod_from_json};
use enclave_node::store::Store;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "\
enclave-node: the cluster's pods, from the Kubernetes API, for the enforcement on this node

Watches Pods and Namespaces cluster-wide (list and watch only) and keeps, for every pod with
an address, its namespace, name, node, labels, enclave.io/* annotations and its namespace's
labels. Publishes them as PEER_DIR/cluster.json, written whole and renamed into place; every
enclave shim on the node follows that file for its pod's nftables table and enclave-netd.
When the API server cannot be reached the last map stays in force, marked stale; when it
returns, both watches relist and the map catches up. Run it unprivileged: it needs no
capability and writes only the peer directory.

USAGE:
    enclave-node [OPTIONS]

OPTIONS:
    --peer-dir DIR         where to publish the map [/run/enclave/peers]
    --api-server URL       the API server, without credentials (tests, a local proxy such
                           as `kubectl proxy`); default: the in-cluster service account, or
                           KUBECONFIG / ~/.kube/config
    --metrics ADDR         serve Prometheus text on ADDR, or `off` [127.0.0.1:9479]
    --coalesce-ms N        changes within N ms make one write [100]
    --probe-secs N         while stale, try the API server every N s [2]
    -h, --help             this text
";

struct Args {
    peer_dir: PathBuf,
    api_server: Option<String>,
    metrics: Option<String>,
    coalesce: Duration,
    probe: Duration,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut a = Args {
        peer_dir: enclave_netfilter::node::PEER_DIR.into(),
        api_server: None,
        metrics: Some("127.0.0.1:9479".into()),
        coalesce: Duration::from_millis(100),
        probe: Duration::from_secs(2),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{k} needs a value (see --help)"))
        };
        let num = |v: String, what: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{what}: `{v}` is not a whole number"))
        };
        match k.as_str() {
            "-h" | "--help" => return Ok(None),
            "--peer-dir" => a.peer_dir = val()?.into(),
            "--api-server" => a.api_server = Some(val()?),
            "--metrics" => {
                let v = val()?;
                a.metrics = (v != "off").then_some(v);
            }
            "--coalesce-ms" => a.coalesce = Duration::from_millis(num(val()?, "--coalesce-ms")?),
            "--probe-secs" => a.probe = Duration::from_secs(num(val()?, "--probe-secs")?.max(1)),
            other => return Err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("enclave-node: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("enclave-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enclave-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Ev {
    Pods(Result<Event<DynamicObject>, watcher::Error>),
    Namespaces(Result<Event<DynamicObject>, watcher::Error>),
}

fn watches(client: &kube::Client) -> futures::stream::BoxStream<'static, Ev> {
    let pods: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<Pod>(&()));
    let nss: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<Namespace>(&()));
    let cfg = watcher::Config::default();
    let p = watcher::watcher(pods, cfg.clone())
        .default_backoff()
        .map(Ev::Pods);
    let n = watcher::watcher(nss, cfg)
        .default_backoff()
        .map(Ev::Namespaces);
    futures::stream::select(p, n).boxed()
}

async fn run(a: Args) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("enclave-node: warning: running as root; it needs no privilege (run it as any user that can write {})", a.peer_dir.display());
    }
    std::fs::create_dir_all(&a.peer_dir)
        .map_err(|e| format!("peer directory {}: {e}", a.peer_dir.display()))?;
    let config = match &a.api_server {
        Some(url) => kube::Config::new(
            url.parse()
                .map_err(|e| format!("--api-server `{url}`: {e}"))?,
        ),
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes API to talk to: {e}"))?,
    };
    let client = kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
    let m = Arc::new(Metrics::default());
    if let Some(addr) = &a.metrics {
        let l = std::net::TcpListener::bind(addr).map_err(|e| format!("--metrics {addr}: {e}"))?;
        metrics::serve(l, m.clone());
    }
    eprintln!(
        "enclave-node: watching pods and namespaces; publishing {}",
        a.peer_dir.join(CLUSTER_MAP_FILE).display()
    );
    let mut store = Store::default();
    let mut stream = watches(&client);
    // The map is first written once both first lists are complete: until then a map from an
    // earlier run (or none) stays.
    let (mut pods_listed, mut ns_listed) = (false, false);
    let mut stale = false;
    let mut stale_written = false;
    let mut generation = 0u64;
    let mut last_probe = Instant::now();
    let mut tick = tokio::time::interval(a.coalesce.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ns_api: Api<Namespace> = Api::all(client.clone());
    loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else {
                    stream = watches(&client);
                    continue;
                };
                match ev {
                    Ev::Pods(Ok(e)) => on_pod(&mut store, &m, e, &mut pods_listed),
                    Ev::Namespaces(Ok(e)) => on_namespace(&mut store, &m, e, &mut ns_listed),
                    Ev::Pods(Err(e)) | Ev::Namespaces(Err(e)) => {
                        m.watch_errors.fetch_add(1, Ordering::Relaxed);
                        if matches!(&e, watcher::Error::WatchError(s) if s.code == 410) {
                            // Expired: the watcher relists by itself; the API server is fine.
                            eprintln!("enclave-node: watch expired (410 Gone); relisting");
                        } else if !stale {
                            eprintln!("enclave-node: the API server cannot be reached ({e}); the last map stays in force, marked stale");
                            stale = true;
                            last_probe = Instant::now();
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if stale && last_probe.elapsed() >= a.probe {
                    last_probe = Instant::now();
                    let probe = tokio::time::timeout(
                        Duration::from_secs(5),
                        ns_api.list_metadata(&ListParams::default().limit(1)),
                    )
                    .await;
                    if matches!(probe, Ok(Ok(_))) {
                        // Back: both watches start over with a full list; the map stays
                        // stale until both are complete.
                        eprintln!("enclave-node: the API server answers again; relisting");
                        stream = watches(&client);
                        pods_listed = false;
                        ns_listed = false;
                        stale = false;
                    }
                }
                let listed = pods_listed && ns_listed;
                let stale_now = stale || !listed;
                let publish = (listed && store.dirty) || (generation > 0 && stale_now != stale_written);
                if publish {
                    generation += 1;
                    let map = store.map(generation, now_ms(), stale_now);
                    match map.write_dir(&a.peer_dir) {
                        Ok(()) => {
                            store.dirty = false;
                            stale_written = stale_now;
                            m.writes.fetch_add(1, Ordering::Relaxed);
                            m.generation.store(generation, Ordering::Relaxed);
                            m.pods.store(map.pods.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            m.write_errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("enclave-node: {e}");
                        }
                    }
                }
                m.stale.store(u64::from(stale), Ordering::Relaxed);
                m.namespaces.store(store.namespace_count() as u64, Ordering::Relaxed);
            }
        }
    }
}

fn uid_of(o: &DynamicObject) -> String {
    o.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            o.metadata.namespace.as_deref().unwrap_or(""),
            o.metadata.name.as_deref().unwrap_or("")
        )
    })
}

fn refused(m: &Metrics, e: &enclave_node::pod::Refused) {
    m.refused.fetch_add(1, Ordering::Relaxed);
    eprintln!("enclave-node: refused {e}");
}

fn on_pod(store: &mut Store, m: &Metrics, e: Event<DynamicObject>, listed: &mut bool) {
    let read = |o: DynamicObject| -> (String, Option<enclave_node::pod::PodRec>) {
        let uid = uid_of(&o);
        let rec = serde_json::to_value(&o)
            .map_err(|e| enclave_node::pod::Refused {
                object: format!("pod {uid}"),
                why: e.to_string(),
            })
            .and_then(pod_from_json)
            .unwrap_or_else(|e| {
                refused(m, &e);
                None
            });
        (uid, rec)
    };
    match e {
        Event::Apply(o) => {
            let (uid, rec) = read(o);
            store.apply_pod(&uid, rec);
        }
        Event::Delete(o) => store.delete_pod(&uid_of(&o)),
        Event::Init => {
            m.relists.fetch_add(1, Ordering::Relaxed);
            store.pods_relist_begin();
        }
        Event::InitApply(o) => {
            let (uid, rec) = read(o);
            store.pods_relist_item(&uid, rec);
        }
        Event::InitDone => {
            store.pods_relist_done();
            *listed = true;
        }
    }
}

fn on_namespace(store: &mut Store, m: &Metrics, e: Event<DynamicObject>, listed: &mut bool) {
    let read = |o: DynamicObject| {
        serde_json::to_value(&o)
            .map_err(|e| enclave_node::pod::Refused {
                object: "namespace".into(),
                why: e.to_string(),
            })
            .and_then(namespace_from_json)
            .map_err(|e| refused(m, &e))
            .ok()
    };
    match e {
        Event::Apply(o) => {
            if let Some((n, l)) = read(o) {
                store.apply_namespace(n, l);
            }
        }
        Event::Delete(o) => {
            if let Some(n) = &o.metadata.name {
                store.delete_namespace(n);
            }
        }
        Event::Init => {
            m.relists.fetch_add(1, Ordering::Relaxed);
            store.ns_relist_begin();
        }
        Event::InitApply(o) => {
            if let Some((n, l)) = read(o) {
                store.ns_relist_item(n, l);
            }
        }
        Event::InitDone => {
            store.ns_relist_done();
            *listed = true;
        }
    }
}
