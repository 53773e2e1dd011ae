//! The inspector's parsers over arbitrary bytes: the SQL tokenizer and both injection
//! checks, HTTP request heads and bodies, the DLP scanner (whole and streamed, and masking),
//! DNS tunneling, TLS hello versions, capture files (pcapng sections) and the masking of
//! captured frames. Checked besides "no panic": after masking, no
//! unmasked card number is left.
#![no_main]

use enclave_netfilter::capture;
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
    let _ = proto::hello_sni(data);
    let _ = proto::dns_query_name(data);
    let _ = proto::read_name(data, usize::from(data.first().copied().unwrap_or(0)));
    let _ = proto::is_http_request_line(data);
    let _ = enclave_netfilter::names::parse_answer(data);

    let mut masked = data.to_vec();
    dlp::mask_in_place(&mut masked);
    for m in dlp::scan(&masked, true, true) {
        assert!(m.masked.contains('*') || m.kind == dlp::DataKind::Ssn, "{m:?}");
    }
    // Capture files read back by enclavectl, and frames masked before they are saved.
    let (secs, _) = capture::sections(data);
    for s in secs {
        assert!(s.offset + s.len <= data.len());
    }
    let _ = capture::key_of(data);
    let mut frame = data.to_vec();
    let _ = capture::mask_frame(&mut frame);
    assert_eq!(frame.len(), data.len());
    let cut = data.len() / 2;
    let mut s = dlp::StreamScanner::default();
    let _ = s.feed(&data[..cut]);
    let _ = s.feed(&data[cut..]);
});
