//! Requests of the Redis protocol listener, as a client sends them (a pipeline of RESP arrays
//! of bulk strings, or inline lines): parsed into commands until one is incomplete, or refused
//! with a protocol error; never a panic, never unbounded recursion or allocation.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = viewcar::internals::fuzz_resp_request(data) {
        let _ = e.to_string();
    }
});
