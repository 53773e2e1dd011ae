//! enclave-netd's vhost-user relay over arbitrary bytes from the VMM side: the header parser
//! and the filter on every message, then the whole relay on a socket pair (framing, bounds,
//! end of stream). The VMM is not trusted to be well-formed.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use enclave_netd::proxy::{relay, Filter, Header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(60_000)];
    let mut f = Filter::default();
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&rest[..HEADER_LEN]);
        rest = &rest[HEADER_LEN..];
        let Ok(hdr) = Header::parse(&h) else { break };
        let n = (hdr.size as usize).min(rest.len());
        let _ = f.frontend(&hdr, &rest[..n]);
        rest = &rest[n..];
    }
    let (Ok((mut vmm, front)), Ok((back, _daemon))) = (UnixStream::pair(), UnixStream::pair())
    else {
        return;
    };
    if vmm.write_all(data).is_err() {
        return;
    }
    let _ = vmm.shutdown(std::net::Shutdown::Write);
    let _ = relay(front, back);
});
