//! Guest network configuration from what the shim sends: interfaces (found by MAC),
//! addresses, MTU, routes and DNS. Uses the classic socket ioctls, which cover what a pod
//! interface needs without a netlink stack in PID 1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use enclave_agent_protocol::messages::{ConfigureNetworkRequest, Dns};

use crate::sys::{self, Result};

fn socket(family: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys::os_err("socket"));
    }
    // SAFETY: a fresh fd owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
        return Err(format!("interface name {name:?} is not valid"));
    }
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl<T>(fd: &OwnedFd, req: libc::Ioctl, arg: &mut T, what: &str) -> Result<()> {
    // SAFETY: `arg` is the structure this request reads or writes, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) } != 0 {
        return Err(sys::os_err(what));
    }
    Ok(())
}

/// Brings an interface up.
pub fn link_up(name: &str) -> Result<()> {
    let s = socket(libc::AF_INET)?;
    let mut r = ifreq(name)?;
    ioctl(&s, libc::SIOCGIFFLAGS, &mut r, "get flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(&s, libc::SIOCSIFFLAGS, &mut r, &format!("bring {name} up"))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("mac {s:?}: expected six hex octets"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| format!("mac {s:?}: {p:?} is not a hex octet"))?;
    }
    Ok(mac)
}

/// The interface whose MAC address is `mac`.
pub fn find_by_mac(mac: &str) -> Result<String> {
    let want = parse_mac(mac)?;
    for e in std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("/sys/class/net: {e}"))?
        .flatten()
    {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if parse_mac(addr.trim()).ok() == Some(want) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!("no interface with mac {mac}"))
}

fn parse_cidr(field: &str, s: &str) -> Result<(IpAddr, u8)> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{field}: {s:?} is not address/prefix"))?;
    let ip: IpAddr = a
        .parse()
        .map_err(|_| format!("{field}: {a:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("{field}: prefix {p:?} is not 0-{max}"))?;
    Ok((ip, prefix))
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The IPv4 netmask of a prefix length (0-32).
fn v4_netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn ifindex(name: &str) -> Result<libc::c_int> {
    let s = socket(libc::AF_INET)?;
    let mut r = ifreq(name)?;
    ioctl(&s, libc::SIOCGIFINDEX, &mut r, "get ifindex")?;
    // SAFETY: SIOCGIFINDEX filled the index member.
    Ok(unsafe { r.ifr_ifru.ifru_ifindex })
}

#[repr(C)]
struct In6Ifreq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn add_address(name: &str, ip: IpAddr, prefix: u8) -> Result<()> {
    match ip {
        IpAddr::V4(v4) => {
            let s = socket(libc::AF_INET)?;
            let mut r = ifreq(name)?;
            r.ifr_ifru.ifru_addr = sockaddr_in(v4);
            ioctl(
                &s,
                libc::SIOCSIFADDR,
                &mut r,
                &format!("set address {v4} on {name}"),
            )?;
            r.ifr_ifru.ifru_netmask = sockaddr_in(v4_netmask(prefix));
            ioctl(
                &s,
                libc::SIOCSIFNETMASK,
                &mut r,
                &format!("set netmask /{prefix} on {name}"),
            )
        }
        IpAddr::V6(v6) => {
            let s = socket(libc::AF_INET6)?;
            let mut r = In6Ifreq {
                addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                prefixlen: prefix as u32,
                ifindex: ifindex(name)?,
            };
            ioctl(
                &s,
                libc::SIOCSIFADDR,
                &mut r,
                &format!("set address {v6}/{prefix} on {name}"),
            )
        }
    }
}

fn add_route(dest: &str, gateway: &str, dev: &str) -> Result<()> {
    let (dst, prefix) = match dest {
        "default" | "" => (None, 0),
        d => {
            let (ip, p) = parse_cidr("routes.destination", d)?;
            (Some(ip), p)
        }
    };
    let gw: Option<IpAddr> = if gateway.is_empty() {
        None
    } else {
        Some(
            gateway
                .parse()
                .map_err(|_| format!("routes.gateway: {gateway:?} is not an IP address"))?,
        )
    };
    let v6 = dst
        .map(|d| d.is_ipv6())
        .or(gw.map(|g| g.is_ipv6()))
        .unwrap_or(false);
    if !v6 {
        let s = socket(libc::AF_INET)?;
        // SAFETY: rtentry is plain data; zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        let d4 = match dst {
            Some(IpAddr::V4(d)) => d,
            Some(_) => return Err("routes: mixed address families".into()),
            None => Ipv4Addr::UNSPECIFIED,
        };
        rt.rt_dst = sockaddr_in(d4);
        rt.rt_genmask = sockaddr_in(v4_netmask(prefix));
        rt.rt_flags = libc::RTF_UP;
        if let Some(g) = gw {
            let IpAddr::V4(g4) = g else {
                return Err("routes: mixed address families".into());
            };
            rt.rt_gateway = sockaddr_in(g4);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        let devname = sys::cstr(dev, "route device")?;
        rt.rt_dev = devname.as_ptr() as *mut libc::c_char;
        return ioctl(
            &s,
            libc::SIOCADDRT,
            &mut rt,
            &format!("add route {dest} via {gateway:?} dev {dev}"),
        );
    }
    let s = socket(libc::AF_INET6)?;
    let zero = libc::in6_addr { s6_addr: [0; 16] };
    let v6addr = |ip: Option<IpAddr>| match ip {
        Some(IpAddr::V6(a)) => Ok(libc::in6_addr {
            s6_addr: a.octets(),
        }),
        None => Ok(libc::in6_addr {
            s6_addr: Ipv6Addr::UNSPECIFIED.octets(),
        }),
        Some(_) => Err("routes: mixed address families".to_string()),
    };
    let mut rt = In6Rtmsg {
        dst: v6addr(dst)?,
        src: zero,
        gateway: v6addr(gw)?,
        kind: 0,
        dst_len: prefix as u16,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: (libc::RTF_UP | if gw.is_some() { libc::RTF_GATEWAY } else { 0 }) as u32,
        ifindex: ifindex(dev)?,
    };
    ioctl(
        &s,
        libc::SIOCADDRT,
        &mut rt,
        &format!("add route {dest} via {gateway:?} dev {dev}"),
    )
}

fn resolv_conf(d: &Dns) -> Result<String> {
    let mut out = String::from("# written by enclave-agent\n");
    for (i, n) in d.nameservers.iter().enumerate() {
        n.parse::<IpAddr>()
            .map_err(|_| format!("dns.nameservers[{i}]: {n:?} is not an IP address"))?;
        out += &format!("nameserver {n}\n");
    }
    let word = |field: &str, v: &[String]| -> Result<()> {
        for (i, s) in v.iter().enumerate() {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("dns.{field}[{i}]: {s:?} must be one word"));
            }
        }
        Ok(())
    };
    word("searches", &d.searches)?;
    word("options", &d.options)?;
    if !d.searches.is_empty() {
        out += &format!("search {}\n", d.searches.join(" "));
    }
    if !d.options.is_empty() {
        out += &format!("options {}\n", d.options.join(" "));
    }
    Ok(out)
}

/// Applies a network configuration. Everything is checked before anything changes.
pub fn configure(req: &ConfigureNetworkRequest) -> Result<()> {
    let mut plan = Vec::new();
    for (i, itf) in req.interfaces.iter().enumerate() {
        let name = find_by_mac(&itf.mac).map_err(|e| format!("interfaces[{i}].mac: {e}"))?;
        let addrs = itf
            .addresses
            .iter()
            .enumerate()
            .map(|(j, a)| parse_cidr(&format!("interfaces[{i}].addresses[{j}]"), a))
            .collect::<Result<Vec<_>>>()?;
        if !itf.name.is_empty() {
            ifreq(&itf.name).map_err(|e| format!("interfaces[{i}].name: {e}"))?;
        }
        if itf.mtu != 0 && !(68..=65535).contains(&itf.mtu) {
            return Err(format!("interfaces[{i}].mtu: {} is not 68-65535", itf.mtu));
        }
        plan.push((name, itf, addrs));
    }
    let resolv = req.dns.as_ref().map(resolv_conf).transpose()?;
    let mut names = std::collections::HashMap::new();
    for (mut name, itf, addrs) in plan {
        if !itf.name.is_empty() && itf.name != name {
            let s = socket(libc::AF_INET)?;
            let mut r = ifreq(&name)?;
            let mut newname = [0 as libc::c_char; libc::IFNAMSIZ];
            for (d, c) in newname.iter_mut().zip(itf.name.bytes()) {
                *d = c as libc::c_char;
            }
            r.ifr_ifru.ifru_newname = newname;
            ioctl(
                &s,
                libc::SIOCSIFNAME,
                &mut r,
                &format!("rename {name} to {}", itf.name),
            )?;
            name = itf.name.clone();
        }
        if itf.mtu != 0 {
            let s = socket(libc::AF_INET)?;
            let mut r = ifreq(&name)?;
            r.ifr_ifru.ifru_mtu = itf.mtu as libc::c_int;
            ioctl(
                &s,
                libc::SIOCSIFMTU,
                &mut r,
                &format!("set mtu {} on {name}", itf.mtu),
            )?;
        }
        link_up(&name)?;
        for (ip, prefix) in addrs {
            add_address(&name, ip, prefix)?;
        }
        names.insert(itf.mac.to_ascii_lowercase(), name);
    }
    for (i, r) in req.routes.iter().enumerate() {
        let dev = match names.get(&r.device_mac.to_ascii_lowercase()) {
            Some(n) => n.clone(),
            None => {
                find_by_mac(&r.device_mac).map_err(|e| format!("routes[{i}].device_mac: {e}"))?
            }
        };
        add_route(&r.destination, &r.gateway, &dev).map_err(|e| format!("routes[{i}]: {e}"))?;
    }
    if let Some(text) = resolv {
        for p in ["/etc/resolv.conf", "/run/enclave/resolv.conf"] {
            let _ = sys::mkdir_p(
                std::path::Path::new(p)
                    .parent()
                    .unwrap_or(std::path::Path::new("/")),
            );
            std::fs::write(p, &text).map_err(|e| format!("write {p}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_names_fields() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 1]
        );
        assert!(parse_mac("52:54:00").is_err());
        assert!(parse_mac("zz:54:00:00:00:00")
            .unwrap_err()
            .contains("\"zz\""));
        assert_eq!(
            parse_cidr("f", "10.1.2.3/24").unwrap(),
            ("10.1.2.3".parse().unwrap(), 24)
        );
        assert!(parse_cidr("f", "10.1.2.3/33")
            .unwrap_err()
            .starts_with("f: prefix"));
        assert!(parse_cidr("f", "fd00::1/129").is_err());
        assert!(parse_cidr("f", "fd00::1/64").is_ok());
        assert_eq!(v4_netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(v4_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(v4_netmask(32), Ipv4Addr::BROADCAST);
        let d = Dns {
            nameservers: vec!["10.0.0.10".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(resolv_conf(&d).unwrap(), "# written by enclave-agent\nnameserver 10.0.0.10\nsearch svc.cluster.local\noptions ndots:5\n");
        let bad = Dns {
            searches: vec!["a\nnameserver 6.6.6.6".into()],
            ..Default::default()
        };
        assert!(resolv_conf(&bad)
            .unwrap_err()
            .starts_with("dns.searches[0]"));
    }
}
