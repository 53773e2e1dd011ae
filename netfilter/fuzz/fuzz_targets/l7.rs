//! Every application protocol detector, from both sides, over arbitrary payload bytes.
#![no_main]

use enclave_netfilter::l7::{detect, identify, Side};
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
});
