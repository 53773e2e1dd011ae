//! The pod's name sets, from the shim's side. enclave-netd learns the addresses of name
//! zones from the pod's DNS answers but holds no privilege to touch nftables; it sends
//! each one here (`SET ADDRESS TTL`, one datagram each) and this thread, in the pod's
//! network namespace, adds it to the pod's table with the TTL as the element's timeout.
//! What arrives is checked: a name set of the table, an address of the set's family, a
//! TTL of at most a week. netd sends every address again whenever the table is rendered
//! anew (it is told through its control socket right after), so a replaced table is
//! refilled.

use std::net::IpAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// The largest TTL accepted (the policy's cap is at most this).
const MAX_TTL: u32 = 7 * 86_400;

/// Parses one datagram: the set name, the address and the TTL.
pub fn parse(msg: &[u8]) -> Result<(String, IpAddr, u32), String> {
    let text = std::str::from_utf8(msg).map_err(|_| "not text".to_string())?;
    let mut parts = text.split(' ');
    let (Some(set), Some(ip), Some(ttl), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("`{}`: want `SET ADDRESS TTL`", text.escape_debug()));
    };
    let family = set
        .strip_prefix("names_")
        .and_then(|r| r.rsplit_once('_'))
        .filter(|(zone, _)| {
            !zone.is_empty() && zone.len() <= 5 && zone.bytes().all(|b| b.is_ascii_digit())
        })
        .map(|(_, f)| f)
        .ok_or_else(|| format!("`{set}` is not a name set"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("`{ip}` is not an address"))?;
    match (family, ip) {
        ("v4", IpAddr::V4(_)) | ("v6", IpAddr::V6(_)) => {}
        _ => return Err(format!("{ip} does not belong in {set}")),
    }
    let ttl: u32 = ttl
        .parse()
        .ok()
        .filter(|t| (1..=MAX_TTL).contains(t))
        .ok_or_else(|| format!("TTL `{ttl}` is not 1..={MAX_TTL}"))?;
    Ok((set.to_string(), ip, ttl))
}

/// Binds `socket` (only root may connect: netd does before it drops privileges) and
/// serves it on a thread inside `netns`, writing to `table`.
pub fn serve(socket: &Path, netns: &Path, table: String) -> Result<(), String> {
    let sock = crate::confine::bind_root_only(socket, |p| UnixDatagram::bind(p))?;
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    std::thread::Builder::new()
        .name("name-sets".into())
        .spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: joins the pod's network namespace for this thread only, from a file
            // we own; the thread serves the pod's sets and nothing else.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "enclave-shim: name sets: setns: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            let mut writer = match enclave_netfilter::nft::NameSetWriter::open(&table) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("enclave-shim: name sets: {e}");
                    return;
                }
            };
            let mut buf = [0u8; 256];
            let mut complaints = 0u32;
            while let Ok(n) = sock.recv(&mut buf) {
                let r = parse(&buf[..n]).and_then(|(set, ip, ttl)| {
                    writer
                        .add(&set, ip, ttl)
                        .map_err(|e| format!("adding {ip} to {set}: {e}"))
                });
                if let Err(e) = r {
                    // Said a few times, then counted quietly (netd may be misbehaving).
                    complaints += 1;
                    if complaints <= 10 {
                        eprintln!("enclave-shim: name sets of {table}: {e}");
                    }
                }
            }
        })
        .map_err(|e| format!("name-sets thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn only_name_sets_with_addresses_of_their_family_and_sane_ttls_pass() {
        assert!(parse(b"names_3_v4 192.0.2.10 120").is_ok());
        assert!(parse(b"names_3_v6 2001:db8::1 60").is_ok());
        for bad in [
            &b"names_3_v4 2001:db8::1 60"[..],
            b"names_3_v6 192.0.2.1 60",
            b"from_workload_1 192.0.2.1 60",
            b"names__v4 192.0.2.1 60",
            b"names_3_v4 192.0.2.1 0",
            b"names_3_v4 192.0.2.1 9999999",
            b"names_3_v4 192.0.2.1 60 extra",
            b"names_3_v4\xff 192.0.2.1 60",
            b"",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
