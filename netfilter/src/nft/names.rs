//! netd's side of the name sets: the addresses a pod resolved for a name zone, added to
//! the pod's nftables table as they are learned, each with its remaining TTL as the
//! element's timeout (the kernel drops it when it runs out).
//!
//! The socket is opened while netd still holds CAP_NET_ADMIN, in the pod's network
//! namespace; the kernel checks the capability of the socket's opener, so netd keeps
//! this one ability after it drops every privilege, and its seccomp filter already allows
//! the `sendto` and `recvfrom` the writes use.

use super::apply::send_on;
use super::kernel_sets::NameElem;
use std::ffi::CString;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// Adds learned addresses to one table's name sets.
pub struct NameSetWriter {
    socket: mnl::Socket,
    table: CString,
    /// Writes the kernel refused (no such table or set yet: the next flow writes again).
    pub errors: u64,
    /// Writes that went through.
    pub written: u64,
}

impl std::fmt::Debug for NameSetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameSetWriter")
            .field("table", &self.table)
            .field("errors", &self.errors)
            .field("written", &self.written)
            .finish()
    }
}

impl NameSetWriter {
    /// Opens a netfilter socket in the caller's network namespace for table `table`.
    pub fn open(table: &str) -> std::io::Result<Self> {
        let table = CString::new(table)
            .map_err(|_| std::io::Error::other(format!("table name {table:?} has a NUL")))?;
        Ok(NameSetWriter {
            socket: mnl::Socket::new(mnl::Bus::Netfilter)?,
            table,
            errors: 0,
            written: 0,
        })
    }

    /// Adds `ip` to set `set` for `ttl` seconds (an existing element keeps its own
    /// timeout: a new flow writes again, so the set holds what netd allows).
    pub fn add(&mut self, set: &str, ip: IpAddr, ttl: u32) -> std::io::Result<()> {
        let name = CString::new(set).map_err(|_| std::io::Error::other("set name has a NUL"))?;
        let mut batch = nftnl::Batch::new();
        batch.add(
            &NameElem::new(&self.table, &name, ip, u64::from(ttl.max(1)) * 1000),
            nftnl::MsgType::Add,
        );
        let mut msg: Vec<u8> = batch.finalize().iter().flatten().copied().collect();
        super::apply::clear_ack_flags(&mut msg);
        let r = send_on(self.socket.as_raw_fd(), &msg);
        match &r {
            Ok(()) => self.written += 1,
            Err(_) => self.errors += 1,
        }
        r
    }
}
