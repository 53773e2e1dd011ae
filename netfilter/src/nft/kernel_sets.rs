//! Netlink messages for concatenated interval sets and the expressions that look them up,
//! which the `nftnl` crate does not wrap (its sets have one fixed-size key and no interval
//! ends; its payload and meta loads always target register 1). Built on `nftnl-sys`
//! (libnftnl) the same way the crate builds its own.

use super::{KeyField, NftSet};
use nftnl::expr::Expression;
use nftnl::{MsgType, NlMsg, Rule};
use nftnl_sys as sys;
use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;

/// Elements per NEWSETELEM message: at most 2 × 24 key bytes plus attribute headers each
/// (under 80 bytes), so a message stays far below the 64 KiB a batch page can take.
const ELEMENTS_PER_MESSAGE: usize = 400;

/// `NFT_SET_CONCAT` (Linux 5.6): the key is a concatenation (not in the libc crate).
const NFT_SET_CONCAT: u32 = 0x80;

/// `nft`'s data type ids, concatenated 6 bits apiece, so `nft list ruleset` prints the
/// set's type and elements by name.
fn key_type(key: &[KeyField]) -> u32 {
    key.iter().fold(0u32, |acc, f| {
        let t = match f {
            KeyField::Addr { v6: false, .. } => 7,
            KeyField::Addr { v6: true, .. } => 8,
            KeyField::L4Proto => 12,
            KeyField::Dport => 13,
        };
        (acc << 6) | t
    })
}

fn alloc<T>(p: *mut T) -> NonNull<T> {
    NonNull::new(p)
        .unwrap_or_else(|| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u8>()))
}

/// An `nftnl_set` with the table, name, id and key of one of our sets.
struct RawSet(NonNull<sys::nftnl_set>);

impl RawSet {
    fn new(table: &CString, name: &CString, id: u32, key: &[KeyField]) -> RawSet {
        // SAFETY: allocation, checked for NULL.
        let s = alloc(unsafe { sys::nftnl_set_alloc() });
        let p = s.as_ptr();
        let key_len: usize = key.iter().map(|f| f.padded_len()).sum();
        let mut fields = [0u8; 16];
        for (slot, f) in fields.iter_mut().zip(key) {
            *slot = u8::try_from(f.width()).unwrap_or(16);
        }
        // SAFETY: `p` is a live set; strings are copied by libnftnl; `fields` outlives the
        // call, which copies `key.len()` bytes of it.
        unsafe {
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, libc::NFPROTO_INET as u32);
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, id);
            sys::nftnl_set_set_u32(
                p,
                sys::NFTNL_SET_FLAGS as u16,
                libc::NFT_SET_INTERVAL as u32 | NFT_SET_CONCAT,
            );
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, key_type(key));
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, key_len as u32);
            sys::nftnl_set_set_data(
                p,
                sys::NFTNL_SET_DESC_CONCAT as u16,
                fields.as_ptr().cast(),
                key.len() as u32,
            );
        }
        RawSet(s)
    }

    fn add(&mut self, start: &[u8], end: &[u8]) {
        // SAFETY: allocation, checked for NULL; libnftnl copies the key bytes; the element
        // is handed to (and then owned by) the live set.
        unsafe {
            let e = alloc(sys::nftnl_set_elem_alloc()).as_ptr();
            sys::nftnl_set_elem_set(
                e,
                sys::NFTNL_SET_ELEM_KEY as u16,
                start.as_ptr().cast(),
                start.len() as u32,
            );
            sys::nftnl_set_elem_set(
                e,
                sys::NFTNL_SET_ELEM_KEY_END as u16,
                end.as_ptr().cast(),
                end.len() as u32,
            );
            sys::nftnl_set_elem_add(self.0.as_ptr(), e);
        }
    }
}

impl Drop for RawSet {
    fn drop(&mut self) {
        // SAFETY: we own the set (and with it its elements).
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) };
    }
}

/// The NEWSET message of a set.
pub(super) struct SetDecl(RawSet);

/// One NEWSETELEM message: up to [`ELEMENTS_PER_MESSAGE`] elements of a set.
pub(super) struct SetElems(RawSet);

/// Writes the header of message `kind` for the set, then its payload (`elements`: the
/// set's elements rather than the set itself).
///
/// # Safety
///
/// `buf` must have room for the message (what `NlMsg::write` promises its caller).
unsafe fn write_set_msg(set: &RawSet, buf: *mut c_void, seq: u32, kind: i32, elements: bool) {
    // SAFETY: `buf` has room for a message (this function's contract); the set is live.
    unsafe {
        let h = sys::nftnl_nlmsg_build_hdr(
            buf.cast::<c_char>(),
            kind as u16,
            libc::NFPROTO_INET as u16,
            (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
            seq,
        );
        if elements {
            sys::nftnl_set_elems_nlmsg_build_payload(h, set.0.as_ptr());
        } else {
            sys::nftnl_set_nlmsg_build_payload(h, set.0.as_ptr());
        }
    }
}

// SAFETY: `write` writes one message no larger than the buffer `Batch` guarantees
// (`nft_nlmsg_maxsize`): a set declaration is a few hundred bytes.
unsafe impl NlMsg for SetDecl {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the trait's contract is the helper's.
        unsafe { write_set_msg(&self.0, buf, seq, libc::NFT_MSG_NEWSET, false) }
    }
}

// SAFETY: as above; an element message holds at most ELEMENTS_PER_MESSAGE elements of at
// most 80 bytes each, well inside the buffer.
unsafe impl NlMsg for SetElems {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the trait's contract is the helper's.
        unsafe { write_set_msg(&self.0, buf, seq, libc::NFT_MSG_NEWSETELEM, true) }
    }
}

/// The messages that create `set` (id `id`) in `table` and fill it.
pub(super) fn set_messages(
    table: &CString,
    name: &CString,
    id: u32,
    set: &NftSet,
) -> (SetDecl, Vec<SetElems>) {
    let decl = SetDecl(RawSet::new(table, name, id, &set.key));
    let mut chunks = Vec::new();
    for elements in set.elements.chunks(ELEMENTS_PER_MESSAGE) {
        let mut raw = RawSet::new(table, name, id, &set.key);
        for e in elements {
            let (mut start, mut end) = (Vec::new(), Vec::new());
            for (f, (lo, hi)) in set.key.iter().zip(e) {
                f.encode(*lo, &mut start);
                f.encode(*hi, &mut end);
            }
            raw.add(&start, &end);
        }
        chunks.push(SetElems(raw));
    }
    (decl, chunks)
}

/// Loads one key field into a 32-bit register.
pub(super) struct Load {
    field: KeyField,
    /// `NFT_REG32_00 + n`.
    dreg: u32,
}

impl Load {
    /// The loads that put `key` in consecutive registers from `NFT_REG32_00`, where the
    /// lookup reads it.
    pub(super) fn of(key: &[KeyField]) -> Vec<Load> {
        let mut reg = libc::NFT_REG32_00 as u32;
        key.iter()
            .map(|f| {
                let l = Load {
                    field: *f,
                    dreg: reg,
                };
                reg += (f.padded_len() / 4) as u32;
                l
            })
            .collect()
    }
}

impl Expression for Load {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // `meta l4proto`, or a payload load: (base, offset, length).
        let (kind, attrs): (&std::ffi::CStr, Vec<(u32, u32)>) = match self.field {
            KeyField::L4Proto => (
                c"meta",
                vec![
                    (sys::NFTNL_EXPR_META_KEY, libc::NFT_META_L4PROTO as u32),
                    (sys::NFTNL_EXPR_META_DREG, self.dreg),
                ],
            ),
            f => {
                let (base, offset) = match f {
                    KeyField::Addr { v6: false, src } => (1, if src { 12 } else { 16 }),
                    KeyField::Addr { v6: true, src } => (1, if src { 8 } else { 24 }),
                    _ => (libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32, 2),
                };
                (
                    c"payload",
                    vec![
                        (sys::NFTNL_EXPR_PAYLOAD_BASE, base),
                        (sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset),
                        (sys::NFTNL_EXPR_PAYLOAD_LEN, f.width() as u32),
                        (sys::NFTNL_EXPR_PAYLOAD_DREG, self.dreg),
                    ],
                )
            }
        };
        // SAFETY: allocation checked for NULL; attributes set on the live expression, which
        // the rule then owns.
        unsafe {
            let e = alloc(sys::nftnl_expr_alloc(kind.as_ptr()));
            for (attr, v) in attrs {
                sys::nftnl_expr_set_u32(e.as_ptr(), attr as u16, v);
            }
            e
        }
    }
}

/// Looks the key in registers from `NFT_REG32_00` up in a set of this batch.
pub(super) struct Lookup {
    pub(super) set: CString,
    pub(super) id: u32,
}

impl Expression for Lookup {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: allocation checked for NULL; libnftnl copies the name.
        unsafe {
            let e = alloc(sys::nftnl_expr_alloc(c"lookup".as_ptr()));
            sys::nftnl_expr_set_u32(
                e.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SREG as u16,
                libc::NFT_REG32_00 as u32,
            );
            sys::nftnl_expr_set_str(
                e.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.set.as_ptr(),
            );
            sys::nftnl_expr_set_u32(e.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SET_ID as u16, self.id);
            e
        }
    }
}

/// `NFT_SET_TIMEOUT`: elements carry a timeout (Linux 4.1).
const NFT_SET_TIMEOUT: u32 = 0x10;

/// An `nftnl_set` naming an existing or new plain (hash) set of addresses.
fn raw_addr_set(table: &CString, name: &CString, id: Option<u32>, v6: bool) -> RawSet {
    // SAFETY: allocation, checked for NULL.
    let s = alloc(unsafe { sys::nftnl_set_alloc() });
    let p = s.as_ptr();
    let key = [KeyField::Addr { v6, src: false }];
    // SAFETY: `p` is a live set; libnftnl copies the strings.
    unsafe {
        sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, libc::NFPROTO_INET as u32);
        sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        if let Some(id) = id {
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, id);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, NFT_SET_TIMEOUT);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, key_type(&key));
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, if v6 { 16 } else { 4 });
        }
    }
    RawSet(s)
}

/// The NEWSET message of a name zone's address set (empty, elements with timeouts).
pub(super) fn name_set_decl(table: &CString, name: &CString, id: u32, v6: bool) -> SetDecl {
    SetDecl(raw_addr_set(table, name, Some(id), v6))
}

/// A NEWSETELEM message adding one address, with a timeout, to an existing set.
pub(super) struct NameElem(RawSet);

impl NameElem {
    pub(super) fn new(
        table: &CString,
        name: &CString,
        ip: std::net::IpAddr,
        timeout_ms: u64,
    ) -> Self {
        let set = raw_addr_set(table, name, None, ip.is_ipv6());
        let key: Vec<u8> = match ip {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        };
        // SAFETY: allocation checked for NULL; libnftnl copies the key; the element is
        // handed to (and then owned by) the live set.
        unsafe {
            let e = alloc(sys::nftnl_set_elem_alloc()).as_ptr();
            sys::nftnl_set_elem_set(
                e,
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast(),
                key.len() as u32,
            );
            sys::nftnl_set_elem_set_u64(e, sys::NFTNL_SET_ELEM_TIMEOUT as u16, timeout_ms);
            sys::nftnl_set_elem_add(set.0.as_ptr(), e);
        }
        NameElem(set)
    }
}

// SAFETY: one element of at most 16 key bytes and a timeout: far inside the buffer.
unsafe impl NlMsg for NameElem {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the trait's contract is the helper's.
        unsafe { write_set_msg(&self.0, buf, seq, libc::NFT_MSG_NEWSETELEM, true) }
    }
}
