//! Sends the records that response rules mark `webhook` to an HTTP endpoint, as JSON POSTs.
//!
//! Like the syslog exporter it tails the node's audit log from a cursor kept on disk, in a
//! process of its own: netd (which may not open sockets) never waits for it, and a receiver
//! that is down costs nothing but a backlog, which the next run sends. Each record is
//! posted on its own, in log order; a refused or failed POST is tried again with a growing
//! pause, and after the last try the record is counted as failed and passed over, so one
//! record a receiver keeps rejecting cannot hold up the rest. A run sends at most `batch`
//! records (the queue is the log itself, bounded by what one run takes from it).
//!
//! Plain `http://` only: a TLS endpoint needs a local relay (stunnel, a sidecar).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the sender stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebhookCursor {
    /// Bytes of the log already looked at.
    pub offset: u64,
    /// Records posted.
    pub sent: u64,
    /// Records given up on after every try.
    pub failed: u64,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookRun {
    /// Records posted.
    pub sent: u64,
    /// Records given up on.
    pub failed: u64,
    /// Bytes of the log not yet looked at after the run.
    pub backlog: u64,
    /// The last error, if a POST failed.
    pub last_error: Option<String>,
}

/// An `http://host:port/path` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    path: String,
}

impl Endpoint {
    /// Parses `http://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url}: only http:// URLs (for https, post to a local TLS relay)")
        })?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(|c| c == '[' || c == ']').to_string(),
                p.parse()
                    .map_err(|_| format!("{url}: port {p:?} is not a number"))?,
            ),
            _ => (hostport.to_string(), 80),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        Ok(Endpoint {
            host,
            port,
            path: path.to_string(),
        })
    }

    /// POSTs `body` as JSON; Ok on a 2xx answer.
    pub fn post(&self, body: &[u8], timeout: Duration) -> Result<(), String> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.host))?;
        let mut s =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
        let _ = s.set_read_timeout(Some(timeout));
        let _ = s.set_write_timeout(Some(timeout));
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: enclavectl-webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(body))
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut status = String::new();
        BufReader::new(s.take(512))
            .read_line(&mut status)
            .map_err(|e| format!("{addr}: reading the answer: {e}"))?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{addr}: not an HTTP answer: {:?}", status.trim()))?;
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(format!("{addr}: HTTP {code}"))
        }
    }
}

/// The sender for one log.
pub struct WebhookSender {
    log: PathBuf,
    to: Endpoint,
    state: PathBuf,
    /// The cursor (read from and saved to the state file).
    pub cursor: WebhookCursor,
    /// Tries per record.
    pub tries: u32,
    /// Pause before the second try; doubled for each further one.
    pub backoff: Duration,
    /// Timeout of one POST.
    pub timeout: Duration,
}

impl WebhookSender {
    /// A sender of `log`'s marked records to `url`, keeping its cursor in `state`.
    pub fn new(log: &Path, url: &str, state: &Path) -> Result<WebhookSender, String> {
        let cursor = match std::fs::read(state) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{}: not a webhook cursor: {e}", state.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => WebhookCursor::default(),
            Err(e) => return Err(format!("{}: {e}", state.display())),
        };
        Ok(WebhookSender {
            log: log.to_path_buf(),
            to: Endpoint::parse(url)?,
            state: state.to_path_buf(),
            cursor,
            tries: 4,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
        })
    }

    fn save(&self) -> Result<(), String> {
        let tmp = self.state.with_extension("tmp");
        let b = serde_json::to_vec(&self.cursor).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, b)
            .and_then(|()| std::fs::rename(&tmp, &self.state))
            .map_err(|e| format!("{}: {e}", self.state.display()))
    }

    /// Looks at up to `batch` new records and posts the marked ones.
    pub fn run_once(&mut self, batch: usize) -> Result<WebhookRun, String> {
        let mut f =
            std::fs::File::open(&self.log).map_err(|e| format!("{}: {e}", self.log.display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if self.cursor.offset > len {
            return Err(format!(
                "{} is shorter ({len} bytes) than the cursor ({}): the log was replaced; remove {} to start over",
                self.log.display(),
                self.cursor.offset,
                self.state.display()
            ));
        }
        f.seek(SeekFrom::Start(self.cursor.offset))
            .map_err(|e| e.to_string())?;
        let mut r = BufReader::new(f);
        let mut run = WebhookRun::default();
        let mut line = Vec::new();
        for _ in 0..batch {
            line.clear();
            let n = r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // the end, or a line still being written
            }
            let marked = serde_json::from_slice::<serde_json::Value>(&line)
                .ok()
                .is_some_and(|v| v["unmapped"]["enclave"]["webhook"] == true);
            if marked {
                let body = line.trim_ascii_end();
                let mut pause = self.backoff;
                let mut result = Err(String::new());
                for attempt in 0..self.tries.max(1) {
                    if attempt > 0 {
                        std::thread::sleep(pause);
                        pause *= 2;
                    }
                    result = self.to.post(body, self.timeout);
                    if result.is_ok() {
                        break;
                    }
                }
                match result {
                    Ok(()) => {
                        run.sent += 1;
                        self.cursor.sent += 1;
                    }
                    Err(e) => {
                        run.failed += 1;
                        self.cursor.failed += 1;
                        run.last_error = Some(e);
                    }
                }
            }
            self.cursor.offset += n as u64;
            if marked {
                self.save()?;
            }
        }
        self.save()?;
        run.backlog = len.saturating_sub(self.cursor.offset);
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("http://127.0.0.1:9000/hooks/enclave")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 9000, "/hooks/enclave")
        );
        let e = Endpoint::parse("http://siem.local").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((e.port, e.path.as_str()), (80, "/"));
        assert!(Endpoint::parse("https://x/")
            .unwrap_err()
            .contains("only http://"));
        assert!(Endpoint::parse("http://:80/").is_err());
        assert!(Endpoint::parse("http://h:port/")
            .unwrap_err()
            .contains("not a number"));
    }
}
