//! The sidecar's config file: parsed and validated, or refused with an error; never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = viewcar::SidecarConfig::parse("fuzz.toml", text) {
        let _ = e.to_string();
    }
});
