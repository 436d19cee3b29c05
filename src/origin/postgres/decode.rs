//! Rows to entries, as DESIGN.md fixes them: key = the key columns' text joined with `/`;
//! value = a JSON object of every column (integers, floats, numerics and booleans as JSON,
//! json/jsonb nested, NULL as null, everything else as a string). A transaction's row changes
//! are folded into one change per key and topic ([`Txn`]), which is what one version carries.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use pg_walstream::{ColumnValue, RowData};
use serde_json::{Map, Value};

use crate::pb::feed::v1 as pb;

/// Type OIDs with a JSON form of their own (`pg_type.oid`, fixed since Postgres 7).
mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// What the origin knows of one replicated table.
#[derive(Debug, Clone)]
pub(crate) struct TableMeta {
    /// The table, and the topic it feeds.
    pub name: String,
    /// The columns whose text makes the key, in order.
    pub key: Vec<String>,
    /// Column name -> type OID.
    pub types: HashMap<String, u32>,
}

impl TableMeta {
    /// The entry key of `row`, or `None` when a key column is missing from it (a row image
    /// that does not carry the key, such as an unchanged TOASTed key column).
    pub fn key_of(&self, row: &RowData) -> Option<String> {
        let mut key = String::new();
        for (i, col) in self.key.iter().enumerate() {
            if i > 0 {
                key.push('/');
            }
            match row.get(col)? {
                ColumnValue::Null => {}
                v => key.push_str(&String::from_utf8_lossy(v.as_bytes())),
            }
        }
        Some(key)
    }

    /// The JSON object of `row`. Columns absent from it (unchanged TOASTed values, which the
    /// database does not resend) are taken from `previous`, the key's current value.
    pub fn value_of(&self, row: &RowData, previous: Option<&[u8]>) -> Bytes {
        let mut obj = Map::with_capacity(row.len());
        for (name, v) in row.iter() {
            let ty = self.types.get(&**name).copied().unwrap_or(0);
            obj.insert(name.to_string(), json_of(ty, v));
        }
        if obj.len() < self.types.len() {
            if let Some(Value::Object(prev)) =
                previous.and_then(|p| serde_json::from_slice::<Value>(p).ok())
            {
                for (k, v) in prev {
                    if !obj.contains_key(&k) && self.types.contains_key(&k) {
                        obj.insert(k, v);
                    }
                }
            }
        }
        // A map of JSON values always serializes.
        Bytes::from(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
    }
}

/// One column value as JSON, by its type.
pub(crate) fn json_of(ty: u32, v: &ColumnValue) -> Value {
    let text = match v {
        ColumnValue::Null => return Value::Null,
        v => String::from_utf8_lossy(v.as_bytes()),
    };
    match ty {
        oid::BOOL => match &*text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => Value::String(text.into_owned()),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.into_owned())),
        oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC => match text.parse::<f64>() {
            // Integral numerics stay exact as integers; NaN and infinities have no JSON number.
            _ if ty == oid::NUMERIC && text.parse::<i64>().is_ok() => {
                Value::from(text.parse::<i64>().unwrap_or_default())
            }
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(text.into_owned())),
            _ => Value::String(text.into_owned()),
        },
        oid::JSON | oid::JSONB => {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
        }
        _ => Value::String(text.into_owned()),
    }
}

/// The changes of one transaction, folded per topic and key: the last change of a key wins,
/// which is what applying them in order would leave.
#[derive(Debug, Default)]
pub(crate) struct Txn {
    /// topic -> key -> new value (`None` = deleted).
    pub topics: BTreeMap<String, BTreeMap<String, Option<Bytes>>>,
}

impl Txn {
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// The value `key` of `topic` has at this point of the transaction: `Some(None)` when the
    /// transaction deleted it, `None` when it has not touched it.
    pub fn pending(&self, topic: &str, key: &str) -> Option<Option<&Bytes>> {
        self.topics
            .get(topic)
            .and_then(|t| t.get(key))
            .map(Option::as_ref)
    }

    pub fn put(&mut self, topic: &str, key: String, value: Bytes) {
        self.topic(topic).insert(key, Some(value));
    }

    pub fn delete(&mut self, topic: &str, key: String) {
        self.topic(topic).insert(key, None);
    }

    /// Deletes every key of `topic` that exists now: `existing` (the keys before the
    /// transaction) and those this transaction put.
    pub fn truncate(&mut self, topic: &str, existing: impl IntoIterator<Item = String>) {
        let t = self.topic(topic);
        for v in t.values_mut() {
            *v = None;
        }
        for k in existing {
            t.insert(k, None);
        }
    }

    fn topic(&mut self, topic: &str) -> &mut BTreeMap<String, Option<Bytes>> {
        self.topics.entry(topic.to_string()).or_default()
    }

    /// Per topic, the changes as the feed carries them.
    pub fn into_changes(self) -> Vec<(String, Vec<pb::Change>)> {
        self.topics
            .into_iter()
            .map(|(topic, keys)| {
                let changes = keys
                    .into_iter()
                    .map(|(key, value)| match value {
                        Some(value) => pb::Change {
                            key,
                            value,
                            deleted: false,
                        },
                        None => pb::Change {
                            key,
                            value: Bytes::new(),
                            deleted: true,
                        },
                    })
                    .collect();
                (topic, changes)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> TableMeta {
        TableMeta {
            name: "t".into(),
            key: vec!["a".into(), "b".into()],
            types: [
                ("a", oid::INT4),
                ("b", 25),
                ("n", oid::NUMERIC),
                ("f", oid::FLOAT8),
                ("ok", oid::BOOL),
                ("doc", oid::JSONB),
                ("big", 25),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        }
    }

    #[test]
    fn rows_become_keys_and_json() {
        let row = RowData::from_pairs(vec![
            ("a", ColumnValue::text("7")),
            ("b", ColumnValue::text("x y")),
            ("n", ColumnValue::text("12.50")),
            ("f", ColumnValue::text("NaN")),
            ("ok", ColumnValue::text("t")),
            ("doc", ColumnValue::text(r#"{"k":[1,2]}"#)),
            ("big", ColumnValue::Null),
        ]);
        let m = meta();
        assert_eq!(m.key_of(&row).unwrap(), "7/x y");
        let v: Value = serde_json::from_slice(&m.value_of(&row, None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 7, "b": "x y", "n": 12.5, "f": "NaN", "ok": true, "doc": {"k": [1, 2]}, "big": null})
        );
    }

    #[test]
    fn unchanged_toast_is_kept_from_the_previous_row() {
        let m = meta();
        let prev = br#"{"a":1,"b":"k","big":"long text"}"#;
        let row = RowData::from_pairs(vec![
            ("a", ColumnValue::text("1")),
            ("b", ColumnValue::text("k")),
        ]);
        let v: Value = serde_json::from_slice(&m.value_of(&row, Some(prev))).unwrap();
        assert_eq!(v["big"], "long text");
    }

    #[test]
    fn a_transaction_folds_to_the_last_change_per_key() {
        let mut t = Txn::default();
        t.put("p", "1".into(), Bytes::from_static(b"a"));
        t.put("p", "2".into(), Bytes::from_static(b"b"));
        t.truncate("p", ["3".to_string()]);
        t.put("p", "2".into(), Bytes::from_static(b"c"));
        let changes = t.into_changes();
        let keys: Vec<(String, bool)> = changes[0]
            .1
            .iter()
            .map(|c| (c.key.clone(), c.deleted))
            .collect();
        assert_eq!(
            keys,
            [("1".into(), true), ("2".into(), false), ("3".into(), true)]
        );
    }
}
