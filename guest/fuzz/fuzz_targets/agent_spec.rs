//! The OCI spec and process JSON the agent parses and validates before spawning anything.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code, missing_docs)]
#[path = "../../agent/src/spec.rs"]
mod spec;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = serde_json::from_slice::<spec::Spec>(data) {
        if let Some(mut p) = s.process {
            let _ = p.validate("process");
        }
        for m in &s.mounts {
            let _ = spec::check_container_path("m", &m.destination);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = spec::check_id("id", text);
        let _ = spec::check_rootfs(text);
    }
});
