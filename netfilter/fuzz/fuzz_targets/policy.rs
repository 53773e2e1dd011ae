//! Policy files from an untrusted source (a ConfigMap anyone with namespace write access
//! might edit): loading must give a policy or located diagnostics, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(enclave_netfilter::policy::PolicyError::Invalid { diagnostics }) =
            enclave_netfilter::policy::load_str(s, "fuzz.yaml")
        {
            assert!(!diagnostics.is_empty());
        }
    }
});
