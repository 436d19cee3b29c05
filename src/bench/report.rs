//! Collects every figure of a run: as JSON (`bench.json`, one object per scenario) and as the
//! plain-text tables printed at the end.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::load::Summary;
use super::BenchArgs;

/// A plain-text table.
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let n = self.headers.len();
        let mut width = vec![0; n];
        for r in std::iter::once(&self.headers).chain(self.rows.iter()) {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let _ = writeln!(out, "\n{}", self.title);
        let line = |out: &mut String, r: &[String]| {
            let cells: Vec<String> = (0..n)
                .map(|i| {
                    let c = r.get(i).map_or("", String::as_str);
                    if i == 0 {
                        format!("{c:<w$}", w = width[i])
                    } else {
                        format!("{c:>w$}", w = width[i])
                    }
                })
                .collect();
            let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
        };
        line(out, &self.headers);
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "  {}", rule.join("  "));
        for r in &self.rows {
            line(out, r);
        }
    }
}

/// Every figure of one harness run.
pub struct Report {
    json: Map<String, Value>,
    tables: Vec<Table>,
    notes: Vec<String>,
}

/// Microseconds as a short human figure.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}ms", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}us")
    } else {
        format!("{v:.2}us")
    }
}

/// A count per second as a short human figure.
pub fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M/s", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

/// The usual latency columns of a summary.
pub fn latency_cells(s: &Summary) -> Vec<String> {
    vec![
        rate(s.throughput),
        us(s.p50_us),
        us(s.p90_us),
        us(s.p99_us),
        us(s.p999_us),
        s.errors.to_string(),
    ]
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu,
        "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "os": std::env::consts::OS,
    })
}

impl Report {
    pub fn new(args: &BenchArgs) -> Report {
        let mut json = Map::new();
        json.insert("machine".into(), machine());
        json.insert(
            "command".into(),
            Value::String(std::env::args().collect::<Vec<_>>().join(" ")),
        );
        json.insert(
            "mode".into(),
            Value::String(
                if args.smoke {
                    "smoke"
                } else if args.quick {
                    "quick"
                } else {
                    "full"
                }
                .into(),
            ),
        );
        Report {
            json,
            tables: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Sets `scenario.key` in the JSON.
    pub fn set(&mut self, scenario: &str, key: &str, value: Value) {
        let entry = self
            .json
            .entry(scenario.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(key.to_string(), value);
        }
    }

    /// Appends to the array `scenario.key` in the JSON.
    pub fn push(&mut self, scenario: &str, key: &str, value: Value) {
        let entry = self
            .json
            .entry(scenario.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            let arr = m
                .entry(key.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = arr {
                a.push(value);
            }
        }
    }

    pub fn get(&self, scenario: &str, key: &str) -> Option<&Value> {
        self.json.get(scenario)?.get(key)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            t.render(&mut out);
        }
        if !self.notes.is_empty() {
            out.push_str("\nNotes\n");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        out
    }

    pub fn add_table(&mut self, t: Table) {
        self.tables.push(t);
    }

    /// A remark printed under the tables and kept in the JSON (`scenario.notes`).
    pub fn note(&mut self, scenario: &str, text: impl Into<String>) {
        let text = text.into();
        self.notes.push(format!("{scenario}: {text}"));
        self.push(scenario, "notes", Value::String(text));
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.json.insert(
            "elapsed_s".into(),
            json!((elapsed.as_secs_f64() * 10.0).round() / 10.0),
        );
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&Value::Object(self.json.clone()))
            .map_err(std::io::Error::other)?;
        std::fs::write(dir.join("bench.json"), text + "\n")
    }
}
