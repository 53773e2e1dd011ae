#![no_main]
//! Control-API lines: any bytes must parse or give an error, never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = enclave_vmm::api::parse_request(line);
    }
});
