//! The control API: JSON lines over a Unix socket, one request per line, one response per
//! request. Before the VM starts it takes `configure` and `start`; afterwards `pause`,
//! `resume`, `shutdown`, `info` and `metrics`. Requests are untrusted input: oversized or
//! malformed lines get an error response, never a crash.
//!
//! ```text
//! -> {"action":"info"}
//! <- {"ok":true,"result":{"state":"running",...}}
//! -> {"action":"nope"}
//! <- {"ok":false,"error":"unknown variant `nope`, expected one of ..."}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::VmConfig;
use crate::cpu::{RunState, StopReason};
use crate::metrics::Metrics;
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::vmm::VmInfo;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Sets the VM configuration (before start).
    Configure {
        /// The VM, as in a config file.
        config: Box<VmConfig>,
    },
    /// Boots the configured VM.
    Start,
    /// Stops the vCPUs.
    Pause,
    /// Restarts paused vCPUs.
    Resume,
    /// Stops the VM; the process exits 0.
    Shutdown,
    /// VM state and layout.
    Info,
    /// Counters.
    Metrics,
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| e.to_string())
}

/// The listening socket.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Binds the socket (replacing a stale one).
    pub fn bind(path: &Path) -> std::io::Result<ApiServer> {
        let _ = std::fs::remove_file(path);
        Ok(ApiServer {
            listener: UnixListener::bind(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Before start: serves requests until a valid `configure` has been followed by
    /// `start`; returns the config.
    pub fn wait_for_start(&self) -> std::io::Result<VmConfig> {
        let mut config: Option<VmConfig> = None;
        loop {
            let (stream, _) = self.listener.accept()?;
            let started = std::cell::Cell::new(false);
            serve_connection(stream, &started, |req| {
                match req {
                Request::Configure { config: c } => match c.validate() {
                    Ok(()) => {
                        config = Some(*c);
                        Ok(Value::Null)
                    }
                    Err((field, msg)) => Err(format!("api request: field `{field}`: {msg}")),
                },
                Request::Start => match &config {
                    Some(_) => {
                        started.set(true);
                        Ok(Value::Null)
                    }
                    None => Err("start before configure: send {\"action\":\"configure\",\"config\":{...}} first".into()),
                },
                Request::Info => Ok(json!({"state": "not started", "configured": config.is_some()})),
                _ => Err("the VM has not started".into()),
            }
            });
            if started.get() {
                if let Some(c) = config.take() {
                    return Ok(c);
                }
            }
        }
    }

    /// After start: serves requests on a thread of its own (with its own seccomp filter).
    pub fn spawn(self, ctl: Control, mode: SeccompMode) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = seccomp::install(ThreadKind::Api, mode) {
                    ctl.state.request_stop(StopReason::VmmError(format!(
                        "seccomp for the API thread: {e}"
                    )));
                    return;
                }
                loop {
                    let Ok((stream, _)) = self.listener.accept() else {
                        continue;
                    };
                    serve_connection(stream, &std::cell::Cell::new(false), |req| ctl.handle(req));
                }
            })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Serves one client until it hangs up, or until `done` is set (the VM was started from this
/// connection: the rest of the API is served by the API thread, on new connections).
fn serve_connection(
    stream: UnixStream,
    done: &std::cell::Cell<bool>,
    mut handle: impl FnMut(Request) -> Result<Value, String>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream.take(u64::MAX));
    let mut line = String::new();
    loop {
        line.clear();
        // Bound the line: read at most MAX_REQUEST + 1 bytes of it.
        let inner = reader.get_mut();
        inner.set_limit(MAX_REQUEST as u64 + 1);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = if line.len() > MAX_REQUEST {
            json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
        } else {
            match parse_request(line.trim()).and_then(&mut handle) {
                Ok(Value::Null) => json!({"ok": true}),
                Ok(v) => json!({"ok": true, "result": v}),
                Err(e) => json!({"ok": false, "error": e}),
            }
        };
        if writeln!(out, "{resp}").is_err() || line.len() > MAX_REQUEST || done.get() {
            return;
        }
    }
}

/// What the API thread controls.
pub struct Control {
    /// Run state.
    pub state: Arc<RunState>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// vCPU threads to kick on pause.
    pub vcpu_threads: Vec<libc::pthread_t>,
    /// Produces the info document.
    pub info: Box<dyn Fn() -> VmInfo + Send>,
}

impl Control {
    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::Configure { .. } | Request::Start => Err("the VM is already running".into()),
            Request::Pause => {
                self.state.set_paused(true);
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.state.parked.load(Ordering::SeqCst) < self.vcpu_threads.len() as u64 {
                    if self.state.stop.load(Ordering::SeqCst) {
                        return Err("the VM is stopping".into());
                    }
                    if Instant::now() > deadline {
                        return Err("vCPUs did not pause within 2 s".into());
                    }
                    for t in &self.vcpu_threads {
                        crate::vmm::kick(*t);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(Value::Null)
            }
            Request::Resume => {
                self.state.set_paused(false);
                Ok(Value::Null)
            }
            Request::Shutdown => {
                self.state.request_stop(StopReason::ApiShutdown);
                Ok(Value::Null)
            }
            Request::Info => serde_json::to_value((self.info)()).map_err(|e| e.to_string()),
            Request::Metrics => {
                serde_json::to_value(self.metrics.snapshot()).map_err(|e| e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_request(r#"{"action":"pause"}"#).unwrap(),
            Request::Pause
        );
        assert!(parse_request(r#"{"action":"nope"}"#)
            .unwrap_err()
            .contains("unknown variant"));
        assert!(parse_request("not json").is_err());
        let r =
            parse_request(r#"{"action":"configure","config":{"kernel":"/k","vcpus":2}}"#).unwrap();
        assert!(matches!(r, Request::Configure { .. }));
    }
}
