//! A stand-in for the Kubernetes API server, for tests: no kube-apiserver is packaged for
//! these machines, so tests serve the part of the API enclave-node uses themselves —
//! list and watch of `/api/v1/pods` and `/api/v1/namespaces` with the real JSON shapes:
//! resourceVersions, ADDED / MODIFIED / DELETED events, BOOKMARKs, and `410 Gone` (an
//! `ERROR` event with a `Status` of code 410) for a watch from a compacted resourceVersion.
//! The test publishes each pod object itself, as the kubelet would after `RunPodSandbox`
//! (IP, labels, nodeName). It can stop listening (the API server is down: open watches are
//! cut and connections refused) and start again on the same port with its state kept.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Res {
    Pods,
    Namespaces,
}

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    /// (resourceVersion, resource, type, object)
    events: Vec<(u64, Res, &'static str, Value)>,
    /// Watches from below this resourceVersion get 410 Gone.
    compacted_below: u64,
    /// Requests served, by path (for tests that check what the client asked).
    requests: Vec<String>,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    up: AtomicBool,
    conns: Mutex<BTreeMap<u64, TcpStream>>,
    next_conn: std::sync::atomic::AtomicU64,
}

/// The stand-in API server. Stops on drop.
pub struct FakeApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

/// A pod as the test publishes it.
pub struct PodObject<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// uid (a new pod at an old address has a new one).
    pub uid: &'a str,
    /// Labels.
    pub labels: &'a [(&'a str, &'a str)],
    /// status.podIP.
    pub ip: &'a str,
    /// spec.nodeName.
    pub node: &'a str,
}

/// Now, as the API server writes timestamps (RFC 3339, whole seconds).
fn now_rfc3339() -> String {
    let secs = enclave_netfilter::audit::now_ms() / 1000;
    enclave_netfilter::audit::rfc3339(secs * 1000).replace(".000Z", "Z")
}

impl FakeApiServer {
    /// Listens on a free loopback port.
    pub fn start() -> FakeApiServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = FakeApiServer {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    rv: 100,
                    ..Default::default()
                }),
                changed: Condvar::new(),
                up: AtomicBool::new(false),
                conns: Mutex::new(BTreeMap::new()),
                next_conn: std::sync::atomic::AtomicU64::new(0),
            }),
            addr,
        };
        s.listen(l);
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn listen(&self, l: TcpListener) {
        self.inner.up.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while inner.up.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let id = inner.next_conn.fetch_add(1, Ordering::SeqCst);
                        if let Ok(c2) = c.try_clone() {
                            inner.conns.lock().unwrap().insert(id, c2);
                        }
                        let inner = inner.clone();
                        std::thread::spawn(move || {
                            serve(&inner, c);
                            // The last handle: the connection closes.
                            inner.conns.lock().unwrap().remove(&id);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            // Dropping `l` closes the port: connections are refused until `resume`.
        });
    }

    /// The API server goes down: the port closes and open connections (watches) are cut.
    pub fn stop(&self) {
        self.inner.up.store(false, Ordering::SeqCst);
        for c in self.inner.conns.lock().unwrap().values() {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.inner.changed.notify_all();
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Cuts the open connections (watches among them) and keeps listening, as a load
    /// balancer in front of the API server may.
    pub fn cut_watches(&self) {
        for c in self.inner.conns.lock().unwrap().values() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// The API server is back on the same port, with its state.
    pub fn resume(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let l = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.listen(l);
    }

    /// Forgets the event history: watches from a resourceVersion older than the current one
    /// get 410 Gone and the client must relist.
    pub fn compact(&self) {
        let mut st = self.inner.state.lock().unwrap();
        st.compacted_below = st.rv;
        st.events.clear();
    }

    fn event(&self, res: Res, kind: &'static str, mut obj: Value) -> Value {
        let mut st = self.inner.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push((rv, res, kind, obj.clone()));
        drop(st);
        self.inner.changed.notify_all();
        obj
    }

    /// Adds or changes a namespace.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let obj = json!({"metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels,
            "creationTimestamp": now_rfc3339()}, "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}});
        let existed = self
            .inner
            .state
            .lock()
            .unwrap()
            .namespaces
            .contains_key(name);
        let obj = self.event(
            Res::Namespaces,
            if existed { "MODIFIED" } else { "ADDED" },
            obj,
        );
        self.inner
            .state
            .lock()
            .unwrap()
            .namespaces
            .insert(name.into(), obj);
    }

    /// Adds or changes a pod, Running at `ip` on `node`, as the kubelet reports it.
    pub fn put_pod(&self, p: &PodObject) {
        let labels: BTreeMap<&str, &str> = p.labels.iter().copied().collect();
        let obj = json!({"metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid,
            "labels": labels, "creationTimestamp": now_rfc3339()},
            "spec": {"nodeName": p.node, "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}]}});
        self.put_raw_pod(obj);
    }

    /// Adds or changes a pod given as raw JSON (malformed ones included).
    pub fn put_raw_pod(&self, obj: Value) {
        let key = (
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        let existed = self.inner.state.lock().unwrap().pods.contains_key(&key);
        let obj = self.event(Res::Pods, if existed { "MODIFIED" } else { "ADDED" }, obj);
        self.inner.state.lock().unwrap().pods.insert(key, obj);
    }

    /// Deletes a pod and records no event (history lost: only a relist shows it).
    pub fn delete_pod_silently(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let mut st = self.inner.state.lock().unwrap();
        st.pods.remove(&key);
        st.rv += 1;
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let obj = self.inner.state.lock().unwrap().pods.remove(&key);
        if let Some(obj) = obj {
            self.event(Res::Pods, "DELETED", obj);
        }
    }

    /// Paths of the requests served so far.
    pub fn requests(&self) -> Vec<String> {
        self.inner.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn respond(c: &mut TcpStream, code: u16, body: &Value) {
    let body = body.to_string();
    let reason = if code == 200 { "OK" } else { "Error" };
    let _ = c.write_all(
        format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

fn chunk(c: &mut TcpStream, line: &Value) -> bool {
    let mut s = line.to_string();
    s.push('\n');
    c.write_all(format!("{:x}\r\n{s}\r\n", s.len()).as_bytes())
        .and_then(|()| c.flush())
        .is_ok()
}

fn serve(inner: &Inner, mut c: TcpStream) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => return,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let target = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let q: BTreeMap<&str, &str> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    inner.state.lock().unwrap().requests.push(target.clone());
    let res = match path {
        "/api/v1/pods" => Res::Pods,
        "/api/v1/namespaces" => Res::Namespaces,
        _ => {
            return respond(
                &mut c,
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("the stand-in API server does not serve {path}"), "reason": "NotFound", "code": 404}),
            )
        }
    };
    if q.get("watch").is_some_and(|w| *w == "true" || *w == "1") {
        return watch(inner, c, res, &q);
    }
    let st = inner.state.lock().unwrap();
    let items: Vec<Value> = match res {
        Res::Pods => st.pods.values().cloned().collect(),
        Res::Namespaces => st.namespaces.values().cloned().collect(),
    };
    let kind = match res {
        Res::Pods => "PodList",
        Res::Namespaces => "NamespaceList",
    };
    // Pages: `limit`, and a `continue` token (here, the offset) while more remain.
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let from: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let total = items.len();
    let items: Vec<Value> = items.into_iter().skip(from).take(limit).collect();
    let mut meta = json!({"resourceVersion": st.rv.to_string()});
    if from + items.len() < total {
        meta["continue"] = json!((from + items.len()).to_string());
        meta["remainingItemCount"] = json!(total - from - items.len());
    }
    let body = json!({"kind": kind, "apiVersion": "v1", "metadata": meta, "items": items});
    drop(st);
    respond(&mut c, 200, &body);
}

fn watch(inner: &Inner, mut c: TcpStream, res: Res, q: &BTreeMap<&str, &str>) {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| *b == "true");
    if c.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .is_err()
    {
        return;
    }
    let end = Instant::now() + Duration::from_secs(timeout);
    let mut sent = from;
    let mut st = inner.state.lock().unwrap();
    if from != 0 && from < st.compacted_below {
        drop(st);
        chunk(
            &mut c,
            &json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": format!("too old resource version: {from}"),
                "reason": "Expired", "code": 410}}),
        );
        let _ = c.write_all(b"0\r\n\r\n");
        return;
    }
    let mut last_bookmark = Instant::now();
    while inner.up.load(Ordering::SeqCst) && Instant::now() < end {
        let news: Vec<(u64, &'static str, Value)> = st
            .events
            .iter()
            .filter(|(rv, r, _, _)| *rv > sent && *r == res)
            .map(|(rv, _, t, o)| (*rv, *t, o.clone()))
            .collect();
        let rv_now = st.rv;
        drop(st);
        for (rv, t, o) in news {
            if !chunk(&mut c, &json!({"type": t, "object": o})) {
                return;
            }
            sent = rv;
        }
        if bookmarks && last_bookmark.elapsed() > Duration::from_secs(1) {
            last_bookmark = Instant::now();
            let kind = if res == Res::Pods { "Pod" } else { "Namespace" };
            if !chunk(
                &mut c,
                &json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
                    "metadata": {"resourceVersion": rv_now.to_string()}}}),
            ) {
                return;
            }
            sent = sent.max(rv_now);
        }
        st = inner.state.lock().unwrap();
        st = inner
            .changed
            .wait_timeout(st, Duration::from_millis(250))
            .unwrap()
            .0;
    }
    drop(st);
    if inner.up.load(Ordering::SeqCst) {
        let _ = c.write_all(b"0\r\n\r\n");
    }
}
