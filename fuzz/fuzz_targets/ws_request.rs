//! A client's WebSocket text message: parsed into a request, or refused with an `error` frame
//! that is itself well-formed JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8 by the protocol; tungstenite rejects anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(frame) = viewcar::internals::fuzz_ws_request(text) {
        let v: serde_json::Value = serde_json::from_str(&frame).expect("an error frame is JSON");
        assert_eq!(v["type"], "error", "{frame}");
        assert!(v["message"].is_string(), "{frame}");
    }
});
