//! Seed data loaded into an origin at start: a JSON object `{"topic": {"key": value}}` or
//! NDJSON lines `{"topic": "t", "key": "k", "value": v}` (a `"deleted": true` line deletes).
//! Values are stored as their JSON text. Each topic's seed becomes one version.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;

use super::{Origin, PublishError, Put};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: topic '{topic}': {source}")]
    Publish {
        file: String,
        topic: String,
        source: PublishError,
    },
}

/// Loads `path` into `origin`; returns the number of keys written.
pub(crate) fn load(origin: &Origin, path: &Path) -> Result<usize, SeedError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
        file: file.clone(),
        source,
    })?;
    let by_topic = parse(&file, &text)?;
    let mut n = 0;
    for (topic, rows) in by_topic {
        n += rows.len();
        let puts: Vec<Put> = rows
            .into_iter()
            .map(|(key, value)| Put { key, value })
            .collect();
        if puts.is_empty() {
            continue;
        }
        origin
            .publish_inner(&topic, puts, false)
            .map_err(|source| SeedError::Publish {
                file: file.clone(),
                topic: topic.clone(),
                source,
            })?;
    }
    Ok(n)
}

type Rows = BTreeMap<String, BTreeMap<String, Option<Bytes>>>;

pub(crate) fn parse(file: &str, text: &str) -> Result<Rows, SeedError> {
    let err = |line: usize, message: String| SeedError::Parse {
        file: file.to_string(),
        line,
        message,
    };
    let mut out: Rows = BTreeMap::new();
    let trimmed = text.trim_start();
    // A whole-file object whose values are objects is the JSON form; anything else is NDJSON.
    if trimmed.starts_with('{') {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text)
        {
            if map.values().all(|v| v.is_object()) && !map.contains_key("topic") {
                for (topic, rows) in map {
                    let serde_json::Value::Object(rows) = rows else {
                        continue;
                    };
                    let t = out.entry(topic).or_default();
                    for (k, v) in rows {
                        t.insert(k, Some(Bytes::from(v.to_string())));
                    }
                }
                return Ok(out);
            }
            // A whole-file object that is not an NDJSON line: the JSON form, with a topic that
            // does not map keys to values.
            if !map.contains_key("topic") {
                if let Some((topic, v)) = map.iter().find(|(_, v)| !v.is_object()) {
                    let held = match v {
                        serde_json::Value::Array(_) => "an array",
                        serde_json::Value::String(_) => "a string",
                        serde_json::Value::Number(_) => "a number",
                        serde_json::Value::Bool(_) => "a boolean",
                        _ => "null",
                    };
                    return Err(err(
                        1,
                        format!(
                            "topic '{topic}' holds {held}; the JSON form maps each topic to an \
                             object of key -> value: {{\"{topic}\": {{\"k1\": {{...}}, \"k2\": 7}}}}"
                        ),
                    ));
                }
            }
        }
    }
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(line_no, format!("invalid JSON: {e}")))?;
        let topic = v
            .get("topic")
            .and_then(|t| t.as_str())
            .ok_or_else(|| err(line_no, "expected a string field \"topic\"".into()))?;
        let key = v
            .get("key")
            .and_then(|t| t.as_str())
            .ok_or_else(|| err(line_no, "expected a string field \"key\"".into()))?;
        let deleted = v.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false);
        let value = if deleted {
            None
        } else {
            let value = v.get("value").ok_or_else(|| {
                err(
                    line_no,
                    "expected a field \"value\" (or \"deleted\": true)".into(),
                )
            })?;
            Some(Bytes::from(value.to_string()))
        };
        out.entry(topic.to_string())
            .or_default()
            .insert(key.to_string(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_ndjson_forms() {
        let rows = parse("s.json", r#"{"prices": {"p1": {"amount": 5}, "p2": 7}}"#).unwrap();
        assert_eq!(
            rows["prices"]["p1"].as_deref(),
            Some(&br#"{"amount":5}"#[..])
        );
        let rows = parse(
            "s.ndjson",
            "{\"topic\":\"a\",\"key\":\"k\",\"value\":1}\n\n{\"topic\":\"a\",\"key\":\"j\",\"deleted\":true}\n",
        )
        .unwrap();
        assert_eq!(rows["a"]["k"].as_deref(), Some(&b"1"[..]));
        assert_eq!(rows["a"]["j"], None);
        let e = parse("s.ndjson", "{\"topic\":\"a\"}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "s.ndjson:1: expected a string field \"key\"");
    }

    /// `{"orders": [1, 2]}` once got an NDJSON message ("expected a string field \"topic\"").
    #[test]
    fn a_json_form_with_a_topic_that_is_not_an_object_says_so() {
        let e = parse("s.json", r#"{"orders": [1, 2]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("topic 'orders' holds an array") && e.contains("key -> value"),
            "{e}"
        );
    }
}
