//! Audit log files given to the verifier can be anything (that is the point of verifying).
#![no_main]

use enclave_netfilter::audit::{verify, VerifyOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("enclave-fuzz-audit-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join("audit.log");
    if std::fs::write(&p, data).is_ok() {
        let r = verify(&[p], &VerifyOptions::default()).expect("reading a file we wrote");
        assert!(r.ok() || !r.problems.is_empty());
    }
});
