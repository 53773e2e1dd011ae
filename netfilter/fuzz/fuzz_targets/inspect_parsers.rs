//! The inspector's parsers over arbitrary bytes: the SQL tokenizer and both injection
//! checks, HTTP request heads and bodies, the DLP scanner (whole and streamed, and masking),
//! DNS tunneling and TLS hello versions. Checked besides "no panic": after masking, no
//! unmasked card number is left.
#![no_main]

use enclave_netfilter::inspect::{dlp, http, proto, sqli};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sqli::tokenize(data, None);
    let _ = sqli::tokenize(data, Some(b'\''));
    let _ = sqli::in_query(data);
    let _ = sqli::in_input(data);
    let _ = http::head(data);
    let _ = http::body(http::BodyKind::Form, data);
    let _ = http::body(http::BodyKind::Json, data);
    let _ = http::url_decode(data);
    let _ = proto::dns_tunnel(data);
    let _ = proto::hello_version(data);
    let _ = proto::is_http_request_line(data);

    let mut masked = data.to_vec();
    dlp::mask_in_place(&mut masked);
    for m in dlp::scan(&masked, true, true) {
        assert!(m.masked.contains('*') || m.kind == dlp::DataKind::Ssn, "{m:?}");
    }
    let cut = data.len() / 2;
    let mut s = dlp::StreamScanner::default();
    let _ = s.feed(&data[..cut]);
    let _ = s.feed(&data[cut..]);
});
