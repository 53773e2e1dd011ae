//! Every application protocol detector, from both sides, over arbitrary payload bytes;
//! the HPACK decoder and the HTTP/2 request reader (fed whole, then split at a point the
//! input picks).
#![no_main]

use enclave_netfilter::l7::{detect, h2, hpack, identify, Side};
use enclave_netfilter::policy::AppProto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for app in AppProto::ALL {
        for side in [Side::Client, Side::Server] {
            let _ = detect(app, side, data, false);
            let _ = detect(app, side, data, true);
        }
    }
    let _ = identify(Side::Client, data, false);
    let _ = identify(Side::Server, data, true);

    let mut dec = hpack::Decoder::default();
    let _ = dec.decode(data);
    let _ = dec.decode(data);
    let mut out = Vec::new();
    let _ = hpack::huffman_decode(data, &mut out);

    // As an HTTP/2 stream after the preface, whole and in two pieces.
    let mut stream = h2::PREFACE.to_vec();
    stream.extend_from_slice(data);
    let whole = h2::RequestReader::default().feed(&stream);
    let cut = usize::from(data.first().copied().unwrap_or(0)) % (stream.len() + 1);
    let mut r = h2::RequestReader::default();
    let split = r.feed(&stream[..cut]).and_then(|mut a| {
        a.extend(r.feed(&stream[cut..])?);
        Ok(a)
    });
    // Feeding in pieces finds the same requests as feeding at once.
    if let (Ok(w), Ok(s)) = (&whole, &split) {
        assert_eq!(w, s);
    }
});
