//! Segmentation probes, from the shim's side: `enclavectl segmentation test` asks the shim
//! of each pod, on `probe.sock` beside netd's control socket (mode 0600: root only), to
//! probe targets from inside the pod's VM; the shim passes the request to the guest agent
//! (which connects from the pod's own network stack) and answers with the results. One
//! JSON request per connection:
//!
//! ```json
//! {"targets": [{"proto": "tcp", "addr": "10.88.77.3", "port": 5432, "ttl": 0}],
//!  "timeout_ms": 1500, "rate": 50}
//! ```
//!
//! answered by `{"results": [{"outcome": "refused", "local_port": 40312, "ms": 3}]}` or
//! `{"error": "..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use enclave_agent_protocol::client::Client;
use enclave_agent_protocol::messages::{Probe, ProbeRequest, ProbeTarget};
use serde_json::{json, Value};

/// The largest request line read.
const MAX_REQUEST: u64 = 64 * 1024;

/// The request as the agent takes it, from JSON (field errors name the field).
pub fn parse(line: &str) -> Result<ProbeRequest, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let num = |v: &Value, k: &str, d: u64| -> Result<u32, String> {
        match v.get(k) {
            None => Ok(d as u32),
            Some(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("`{k}` is not a whole number")),
        }
    };
    let targets = v
        .get("targets")
        .and_then(Value::as_array)
        .ok_or("`targets` is missing or not a list")?
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let s = |k: &str| {
                t.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("targets[{i}].{k} is missing or not text"))
            };
            Ok(ProbeTarget {
                proto: s("proto")?,
                addr: s("addr")?,
                port: num(t, "port", 0).map_err(|e| format!("targets[{i}]: {e}"))?,
                ttl: num(t, "ttl", 0).map_err(|e| format!("targets[{i}]: {e}"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ProbeRequest {
        targets,
        timeout_ms: num(&v, "timeout_ms", 1500)?,
        rate: num(&v, "rate", 50)?,
    })
}

/// Serves `socket` on a thread for the life of the shim.
pub fn serve(socket: &Path, agent: Arc<Client>) -> Result<(), String> {
    let l = crate::confine::bind_root_only(socket, |p| UnixListener::bind(p))?;
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            for c in l.incoming().flatten() {
                let mut line = String::new();
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                let r = BufReader::new((&c).take(MAX_REQUEST)).read_line(&mut line);
                let answer = match r.map_err(|e| e.to_string()).and_then(|_| parse(&line)) {
                    Err(e) => json!({ "error": e }),
                    Ok(req) => {
                        // Every probe starts by n / rate and ends a timeout later.
                        let wait = u64::from(req.timeout_ms)
                            + 1000 * req.targets.len() as u64 / u64::from(req.rate.max(1))
                            + 5000;
                        match agent.call_timeout::<Probe>(&req, Some(Duration::from_millis(wait))) {
                            Ok(resp) => json!({
                                "results": resp.results.iter().map(|r| json!({
                                    "outcome": r.outcome,
                                    "local_port": r.local_port,
                                    "ms": r.ms,
                                    "detail": r.detail,
                                })).collect::<Vec<_>>()
                            }),
                            Err(e) => json!({ "error": format!("the guest agent: {e}") }),
                        }
                    }
                };
                let _ = (&c).write_all(format!("{answer}\n").as_bytes());
            }
        })
        .map_err(|e| format!("probe thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn requests_parse_and_bad_fields_are_named() {
        let r = parse(
            r#"{"targets":[{"proto":"tcp","addr":"10.0.0.2","port":5432}],"timeout_ms":900}"#,
        )
        .expect("parses");
        assert_eq!((r.targets[0].port, r.timeout_ms, r.rate), (5432, 900, 50));
        for (bad, want) in [
            ("{}", "`targets` is missing"),
            (r#"{"targets":[{"addr":"x","port":1}]}"#, "targets[0].proto"),
            (
                r#"{"targets":[{"proto":"tcp","addr":"x","port":-1}]}"#,
                "targets[0]: `port`",
            ),
            ("nope", "not JSON"),
        ] {
            let e = parse(bad).expect_err("refused");
            assert!(e.contains(want), "{e}");
        }
    }
}
