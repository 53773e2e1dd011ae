//! Network probes from inside the guest, for segmentation tests: each target gets a TCP
//! connect (or a UDP datagram) from the pod's own network stack, so it crosses the guest
//! kernel, enclave-netd and the pod's nftables table exactly as an attacker's packet would.
//! Non-blocking sockets, started at the requested rate, all watched with one poll; nothing
//! is sent after the handshake (a TCP probe is closed as soon as it is decided).

use enclave_agent_protocol::messages::{ProbeRequest, ProbeResponse, ProbeResult};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Targets per request.
const MAX_TARGETS: usize = 256;

struct Pending {
    fd: Option<OwnedFd>,
    udp: bool,
    started: Option<Instant>,
    result: Option<ProbeResult>,
    local_port: u32,
}

fn result(outcome: &str, started: Instant, local_port: u32, detail: String) -> ProbeResult {
    ProbeResult {
        outcome: outcome.into(),
        local_port,
        ms: started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
        detail,
    }
}

/// A DNS query for `probe.enclave.invalid` (a UDP probe to port 53 carries one, so an
/// `app: dns` rule sees DNS).
fn dns_probe() -> Vec<u8> {
    let mut m = vec![0x5e, 0x9a, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in ["probe", "enclave", "invalid"] {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

fn sockaddr(sa: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family-specific view is written
    // within its size.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut st as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut st as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

fn local_port(fd: i32) -> u32 {
    // SAFETY: getsockname into a zeroed storage of the size we pass.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above; fd is ours.
    if unsafe { libc::getsockname(fd, &mut st as *mut _ as *mut libc::sockaddr, &mut len) } != 0 {
        return 0;
    }
    // sin_port and sin6_port sit at the same offset, right after the family.
    // SAFETY: both layouts begin with family then port.
    let sin = unsafe { &*(&st as *const _ as *const libc::sockaddr_in) };
    u32::from(u16::from_be(sin.sin_port))
}

/// setsockopt of an int option (a failure leaves the default: the probe still runs).
fn set_int(fd: i32, level: i32, opt: i32, v: libc::c_int) {
    // SAFETY: setsockopt with a c_int of the size we pass, on the caller's fd.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn outcome_of(err: i32) -> &'static str {
    match err {
        libc::ECONNREFUSED => "refused",
        libc::EHOSTUNREACH | libc::ENETUNREACH => "unreachable",
        libc::ETIMEDOUT => "timeout",
        _ => "error",
    }
}

/// Opens, configures and starts one probe; an immediate outcome goes in `result`.
fn start(p: &mut Pending, sa: SocketAddr, ttl: u32) {
    let now = Instant::now();
    p.started = Some(now);
    let family = if sa.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let ty = if p.udp {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM
    };
    // SAFETY: plain socket creation; the fd is owned below.
    let raw = unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        p.result = Some(result(
            "error",
            now,
            0,
            format!("socket: {}", std::io::Error::last_os_error()),
        ));
        return;
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let v4 = sa.is_ipv4();
    if ttl > 0 {
        let (level, opt) = if v4 {
            (libc::IPPROTO_IP, libc::IP_TTL)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
        };
        set_int(raw, level, opt, ttl.min(255) as libc::c_int);
    }
    if p.udp {
        // ICMP errors reach a connected UDP socket only with IP_RECVERR.
        let (level, opt) = if v4 {
            (libc::IPPROTO_IP, libc::IP_RECVERR)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        };
        set_int(raw, level, opt, 1);
    }
    let (st, len) = sockaddr(sa);
    // SAFETY: connect with the address and length built above.
    let rc = unsafe { libc::connect(raw, &st as *const _ as *const libc::sockaddr, len) };
    if rc != 0 && errno() != libc::EINPROGRESS {
        let e = errno();
        p.result = Some(result(
            outcome_of(e),
            now,
            0,
            std::io::Error::from_raw_os_error(e).to_string(),
        ));
        return;
    }
    p.local_port = local_port(raw);
    if p.udp {
        let payload = if sa.port() == 53 {
            dns_probe()
        } else {
            b"enclave-probe".to_vec()
        };
        // SAFETY: sending our own buffer on our connected socket.
        let n = unsafe { libc::send(raw, payload.as_ptr().cast(), payload.len(), 0) };
        if n < 0 {
            let e = errno();
            p.result = Some(result(
                outcome_of(e),
                now,
                p.local_port,
                std::io::Error::from_raw_os_error(e).to_string(),
            ));
            return;
        }
    }
    p.fd = Some(fd);
}

/// What a socket that poll woke up for says.
fn settle(p: &mut Pending, revents: i16) {
    let (Some(fd), Some(started)) = (p.fd.as_ref(), p.started) else {
        return;
    };
    let raw = fd.as_raw_fd();
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the size we pass, on our fd.
    unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    let r = if err != 0 {
        result(
            outcome_of(err),
            started,
            p.local_port,
            std::io::Error::from_raw_os_error(err).to_string(),
        )
    } else if p.udp {
        if revents & libc::POLLIN != 0 {
            result("answered", started, p.local_port, String::new())
        } else {
            return;
        }
    } else if revents & libc::POLLOUT != 0 {
        result("connected", started, p.local_port, String::new())
    } else {
        return;
    };
    p.result = Some(r);
    p.fd = None;
}

/// Runs the probes of `req`.
pub fn run(req: &ProbeRequest) -> Result<ProbeResponse, String> {
    if req.targets.len() > MAX_TARGETS {
        return Err(format!(
            "{} targets: at most {MAX_TARGETS}",
            req.targets.len()
        ));
    }
    if !(1..=10_000).contains(&req.timeout_ms) || !(1..=1000).contains(&req.rate) {
        return Err(format!(
            "timeout {} ms (1–10000) or rate {}/s (1–1000) out of range",
            req.timeout_ms, req.rate
        ));
    }
    let mut targets = Vec::with_capacity(req.targets.len());
    for (i, t) in req.targets.iter().enumerate() {
        let ip: IpAddr = t
            .addr
            .parse()
            .map_err(|_| format!("targets[{i}].addr: `{}` is not an address", t.addr))?;
        let port = u16::try_from(t.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("targets[{i}].port: {} is not 1–65535", t.port))?;
        let udp = match t.proto.as_str() {
            "tcp" => false,
            "udp" => true,
            o => return Err(format!("targets[{i}].proto: `{o}` is not tcp or udp")),
        };
        if t.ttl > 255 {
            return Err(format!("targets[{i}].ttl: {} is over 255", t.ttl));
        }
        targets.push((SocketAddr::new(ip, port), udp, t.ttl));
    }
    let timeout = Duration::from_millis(u64::from(req.timeout_ms));
    let gap = Duration::from_secs(1) / req.rate;
    let mut pending: Vec<Pending> = targets
        .iter()
        .map(|(_, udp, _)| Pending {
            fd: None,
            udp: *udp,
            started: None,
            result: None,
            local_port: 0,
        })
        .collect();
    let begin = Instant::now();
    let mut next = 0usize;
    loop {
        // Start what the rate allows by now.
        while next < targets.len() && begin.elapsed() >= gap * next as u32 {
            let (sa, _, ttl) = targets[next];
            start(&mut pending[next], sa, ttl);
            next += 1;
        }
        // Time out what has waited long enough.
        for p in pending.iter_mut().filter(|p| p.result.is_none()) {
            if let (Some(_), Some(s)) = (p.fd.as_ref(), p.started) {
                if s.elapsed() >= timeout {
                    p.result = Some(result("timeout", s, p.local_port, String::new()));
                    p.fd = None;
                }
            }
        }
        let live: Vec<usize> = (0..pending.len())
            .filter(|i| pending[*i].fd.is_some())
            .collect();
        if live.is_empty() && next == targets.len() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = live
            .iter()
            .map(|i| libc::pollfd {
                fd: pending[*i].fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: if pending[*i].udp {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                },
                revents: 0,
            })
            .collect();
        // SAFETY: poll over our own array of pollfds; a short wait keeps the rate and the
        // timeouts honest.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        if n > 0 {
            for (k, i) in live.iter().enumerate() {
                if fds[k].revents != 0 {
                    settle(&mut pending[*i], fds[k].revents);
                }
            }
        }
    }
    Ok(ProbeResponse {
        results: pending
            .into_iter()
            .map(|p| {
                p.result
                    .unwrap_or_else(|| result("error", begin, 0, "not started".into()))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use enclave_agent_protocol::messages::ProbeTarget;

    fn t(proto: &str, addr: &str, port: u16) -> ProbeTarget {
        ProbeTarget {
            proto: proto.into(),
            addr: addr.into(),
            port: u32::from(port),
            ttl: 0,
        }
    }

    #[test]
    fn a_listener_connects_a_closed_port_refuses_and_udp_says_so_too() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = l.local_addr().expect("addr").port();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        drop(closed);
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_open = u.local_addr().expect("addr").port();
        let r = run(&ProbeRequest {
            targets: vec![
                t("tcp", "127.0.0.1", open),
                t("tcp", "127.0.0.1", closed_port),
                t("udp", "127.0.0.1", closed_port),
            ],
            timeout_ms: 1000,
            rate: 100,
        })
        .expect("runs");
        let o: Vec<&str> = r.results.iter().map(|x| x.outcome.as_str()).collect();
        assert_eq!(o, ["connected", "refused", "refused"], "{r:?}");
        assert!(r.results[0].local_port > 0);
        // A UDP probe to a socket that reads and never answers: timeout.
        let r = run(&ProbeRequest {
            targets: vec![t("udp", "127.0.0.1", udp_open)],
            timeout_ms: 200,
            rate: 10,
        })
        .expect("runs");
        assert_eq!(r.results[0].outcome, "timeout");
        let mut buf = [0u8; 64];
        assert_eq!(u.recv(&mut buf).expect("the datagram arrived"), 13);
    }

    #[test]
    fn bad_requests_are_refused_with_the_field() {
        for (bad, want) in [
            (t("sctp", "127.0.0.1", 1), "targets[0].proto"),
            (t("tcp", "localhost", 1), "targets[0].addr"),
            (t("tcp", "127.0.0.1", 0), "targets[0].port"),
        ] {
            let e = run(&ProbeRequest {
                targets: vec![bad],
                timeout_ms: 100,
                rate: 10,
            })
            .expect_err("refused");
            assert!(e.contains(want), "{e}");
        }
        let many = vec![t("tcp", "127.0.0.1", 1); 257];
        assert!(run(&ProbeRequest {
            targets: many,
            timeout_ms: 100,
            rate: 10
        })
        .is_err());
        assert!(run(&ProbeRequest {
            targets: vec![],
            timeout_ms: 0,
            rate: 10
        })
        .is_err());
    }
}
