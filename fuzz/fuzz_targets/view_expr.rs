//! View expressions: the first line is parsed as a key expression and as a `where` filter, and
//! each is evaluated on the row that follows (a JSON object) or on a fixed row.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use viewcar::internals::{fuzz_filter, fuzz_key};

fn fixed_row() -> Map<String, Value> {
    let v = json!({
        "id": "p1", "sku": "A-1", "n": 3, "price": {"amount": 999, "cur": "EUR"},
        "tags": ["x", "y"], "ok": true, "none": null, "f": 1.5, "neg": -2
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, row) = text.split_once('\n').unwrap_or((text, ""));
    let row = match serde_json::from_str::<Value>(row) {
        Ok(Value::Object(m)) => m,
        _ => fixed_row(),
    };
    let _ = fuzz_key(expr, &row);
    let _ = fuzz_filter(expr, &row);
});
