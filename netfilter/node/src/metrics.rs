//! enclave-node's counters, served as Prometheus text on a plain TCP port.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Pods with an address in the map.
    pub pods: AtomicU64,
    /// Namespaces known.
    pub namespaces: AtomicU64,
    /// 1 while the API server cannot be reached (the last map stays in force).
    pub stale: AtomicU64,
    /// Maps written.
    pub writes: AtomicU64,
    /// Maps that could not be written.
    pub write_errors: AtomicU64,
    /// Watch and list errors.
    pub watch_errors: AtomicU64,
    /// Relists (first lists included).
    pub relists: AtomicU64,
    /// Objects refused as malformed.
    pub refused: AtomicU64,
    /// Generation of the last map written.
    pub generation: AtomicU64,
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, v) in [
            ("enclave_node_pods", "gauge", "Pods with an address in the cluster map.", g(&self.pods)),
            ("enclave_node_namespaces", "gauge", "Namespaces known.", g(&self.namespaces)),
            ("enclave_node_map_stale", "gauge", "1 while the API server cannot be reached: the last map stays in force, marked stale.", g(&self.stale)),
            ("enclave_node_map_generation", "gauge", "Generation of the last cluster map written.", g(&self.generation)),
            ("enclave_node_map_writes_total", "counter", "Cluster maps written.", g(&self.writes)),
            ("enclave_node_map_write_errors_total", "counter", "Cluster maps that could not be written.", g(&self.write_errors)),
            ("enclave_node_watch_errors_total", "counter", "Errors of the pod and namespace watches.", g(&self.watch_errors)),
            ("enclave_node_relists_total", "counter", "Full lists of pods or namespaces (the first ones included).", g(&self.relists)),
            ("enclave_node_objects_refused_total", "counter", "API objects refused as malformed.", g(&self.refused)),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        out
    }
}

/// Serves `GET /metrics` (any path) on `listener` from a thread of its own.
pub fn serve(listener: TcpListener, m: Arc<Metrics>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req);
            let body = m.render();
            let _ = c.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
}
