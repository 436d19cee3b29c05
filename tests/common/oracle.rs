//! The naive pieces of the view semantics that the view property tests recompute rows with:
//! independent of the engine (no shared code), so that a bug there is not also in the oracle.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value};

/// A topic's contents in the model.
pub type Topic = BTreeMap<String, Bytes>;

pub fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn path<'a>(row: &'a Map<String, Value>, p: &str) -> Option<&'a Value> {
    let mut parts = p.split('.');
    let mut v = row.get(parts.next()?)?;
    for seg in parts {
        v = v.as_object()?.get(seg)?;
    }
    Some(v)
}

/// `None` = the row is in error (not JSON somewhere it reads) and absent from the view.
pub fn lookup(t: &Topic, key: Option<String>) -> Option<Value> {
    let Some(k) = key else {
        return Some(Value::Null);
    };
    match t.get(&k) {
        None => Some(Value::Null),
        Some(b) => serde_json::from_slice(b).ok(),
    }
}
