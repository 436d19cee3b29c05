//! `[postgres]` in origin.toml: the origin takes its topics from a Postgres database by logical
//! replication (`pgoutput`) instead of from `Publish`. Plain data, checked by [`PostgresConfig::
//! validate`] with errors that name the key.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::{check_name, ConfigError, Dur};

/// Where the rows come from and how they are followed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq URL (`postgres://user@host:5432/db`) or key=value string; a host may be a
    /// socket directory.
    pub url: String,
    /// The publication the slot decodes; created for `tables` when absent, and a listed table
    /// missing from it is added.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// The replication slot of this origin (one per origin replica); created when absent.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Tables of schema `public`, each served as the topic of the same name: a name, or
    /// `{ name = "t", key = ["a", "b"] }` to choose the columns that make the key (default: the
    /// primary key, else the replica identity index).
    pub tables: Vec<TableSpec>,
    /// TLS towards the database: `disable`, `prefer` (the default) or `require`.
    #[serde(default)]
    pub tls: PgTls,
    /// Rows fetched per round trip during the initial copy.
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: usize,
    /// How often the origin tells the database how far it has consumed (standby status).
    #[serde(default = "default_status_interval")]
    pub status_interval: Dur,
    /// Retry after a failure: the wait starts at `retry_min` and doubles up to `retry_max`,
    /// each wait drawn at random below it (full jitter).
    #[serde(default = "default_retry_min")]
    pub retry_min: Dur,
    #[serde(default = "default_retry_max")]
    pub retry_max: Dur,
}

/// A table of `[postgres] tables`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TableSpec {
    Name(String),
    #[serde(rename_all = "snake_case")]
    Table {
        name: String,
        #[serde(default)]
        key: Vec<String>,
    },
}

impl TableSpec {
    pub fn name(&self) -> &str {
        match self {
            TableSpec::Name(n) | TableSpec::Table { name: n, .. } => n,
        }
    }

    /// The key columns chosen in the config; empty = the table's primary key.
    pub fn key(&self) -> &[String] {
        match self {
            TableSpec::Name(_) => &[],
            TableSpec::Table { key, .. } => key,
        }
    }
}

/// TLS towards the database (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgTls {
    Disable,
    #[default]
    Prefer,
    Require,
}

impl PgTls {
    pub fn as_str(self) -> &'static str {
        match self {
            PgTls::Disable => "disable",
            PgTls::Prefer => "prefer",
            PgTls::Require => "require",
        }
    }
}

fn default_publication() -> String {
    "viewcar".into()
}
fn default_slot() -> String {
    "viewcar".into()
}
fn default_chunk_rows() -> usize {
    10_000
}
fn default_status_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_retry_min() -> Dur {
    Dur(Duration::from_millis(200))
}
fn default_retry_max() -> Dur {
    Dur(Duration::from_secs(30))
}

/// Postgres identifiers the origin creates or names: lower case, so that they need no quoting.
fn check_ident(file: &str, field: &str, s: &str) -> Result<(), ConfigError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            field,
            format!(
                "{s:?} is not a plain Postgres name (lower-case letters, digits and _, at most 63, not starting with a digit)"
            ),
        ))
    }
}

impl PostgresConfig {
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let url = self.url.trim();
        if url.is_empty() {
            return Err(ConfigError::invalid(file, "postgres.url", "is empty"));
        }
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.contains('='))
        {
            return Err(ConfigError::invalid(
                file,
                "postgres.url",
                "expected postgres://user@host:port/db or a key=value string such as \"host=/run/postgresql dbname=app\"",
            ));
        }
        check_ident(file, "postgres.publication", &self.publication)?;
        check_ident(file, "postgres.slot", &self.slot)?;
        if self.tables.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "postgres.tables",
                "lists no table; name at least one",
            ));
        }
        let mut seen = HashSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            let at = format!("postgres.tables[{i}]");
            check_ident(file, &at, t.name())?;
            check_name(file, &at, t.name())?;
            if !seen.insert(t.name()) {
                return Err(ConfigError::invalid(
                    file,
                    at,
                    format!("table '{}' is listed twice", t.name()),
                ));
            }
            if let TableSpec::Table { key, .. } = t {
                let mut cols = HashSet::new();
                for (j, k) in key.iter().enumerate() {
                    check_ident(file, &format!("{at}.key[{j}]"), k)?;
                    if !cols.insert(k) {
                        return Err(ConfigError::invalid(
                            file,
                            format!("{at}.key[{j}]"),
                            format!("column '{k}' is listed twice"),
                        ));
                    }
                }
            }
        }
        if self.snapshot_chunk_rows == 0 {
            return Err(ConfigError::invalid(
                file,
                "postgres.snapshot_chunk_rows",
                "must be at least 1",
            ));
        }
        if self.status_interval.0 < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                file,
                "postgres.status_interval",
                "must be at least 100ms",
            ));
        }
        if self.retry_min.0.is_zero() {
            return Err(ConfigError::invalid(
                file,
                "postgres.retry_min",
                "must be above 0",
            ));
        }
        if self.retry_max < self.retry_min {
            return Err(ConfigError::invalid(
                file,
                "postgres.retry_max",
                "must be at least retry_min",
            ));
        }
        Ok(())
    }

    /// Table names in config order.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name().to_string()).collect()
    }
}

/// What `viewcar check` prints for an origin.toml with `[postgres]` (a password in the URL is
/// not printed).
pub fn describe_origin(cfg: &super::OriginConfig) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "listen = {}", cfg.listen);
    if let Some(pg) = &cfg.postgres {
        let _ = writeln!(out, "postgres {}", redact(&pg.url));
        let _ = writeln!(
            out,
            "  publication {}, slot {}, tls {}",
            pg.publication,
            pg.slot,
            pg.tls.as_str()
        );
        for t in &pg.tables {
            let key = if t.key().is_empty() {
                "primary key".to_string()
            } else {
                t.key().join(", ")
            };
            let _ = writeln!(
                out,
                "  topic {} <- table public.{} (key: {key})",
                t.name(),
                t.name()
            );
        }
    }
    out
}

/// The URL without its password: `postgres://user:secret@host` -> `postgres://user:***@host`,
/// `password=secret` -> `password=***`.
fn redact(url: &str) -> String {
    if let Some(rest) = url.split_once("://") {
        if let Some((auth, host)) = rest.1.split_once('@') {
            if let Some((user, _)) = auth.split_once(':') {
                return format!("{}://{user}:***@{host}", rest.0);
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use crate::config::OriginConfig;

    fn err(text: &str) -> String {
        OriginConfig::parse("o.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn passwords_are_not_described() {
        assert_eq!(
            super::redact("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            super::redact("host=h password=pw dbname=d"),
            "host=h password=*** dbname=d"
        );
    }

    #[test]
    fn postgres_section_parses() {
        let cfg = OriginConfig::parse(
            "o.toml",
            r#"
[postgres]
url = "postgres://viewcar@127.0.0.1:5432/app"
publication = "viewcar"
slot = "viewcar_origin_a"
tables = ["products", { name = "prices", key = ["sku", "region"] }]
tls = "disable"
snapshot_chunk_rows = 500
status_interval = "1s"
"#,
        )
        .unwrap();
        let pg = cfg.postgres.unwrap();
        assert_eq!(pg.table_names(), ["products", "prices"]);
        assert_eq!(pg.tables[1].key(), ["sku", "region"]);
        assert_eq!(pg.snapshot_chunk_rows, 500);
    }

    #[test]
    fn postgres_errors_name_the_key() {
        let base = "url = \"postgres://u@h/db\"\n";
        let cases = [
            ("[postgres]\nurl = \"\"\ntables = [\"a\"]\n", "postgres.url"),
            (
                "[postgres]\nurl = \"mysql://x\"\ntables = [\"a\"]\n",
                "postgres.url",
            ),
            (
                &format!("[postgres]\n{base}tables = []\n"),
                "postgres.tables",
            ),
            (
                &format!("[postgres]\n{base}tables = [\"A b\"]\n"),
                "postgres.tables[0]",
            ),
            (
                &format!("[postgres]\n{base}tables = [\"a\", \"a\"]\n"),
                "postgres.tables[1]",
            ),
            (
                &format!("[postgres]\n{base}slot = \"Bad-Slot\"\ntables = [\"a\"]\n"),
                "postgres.slot",
            ),
            (
                &format!("[postgres]\n{base}tables = [{{ name = \"a\", key = [\"x\", \"x\"] }}]\n"),
                "postgres.tables[0].key[1]",
            ),
            (
                &format!("[postgres]\n{base}tables = [\"a\"]\nsnapshot_chunk_rows = 0\n"),
                "postgres.snapshot_chunk_rows",
            ),
            (
                &format!("[postgres]\n{base}tables = [\"a\"]\nstatus_interval = \"1ms\"\n"),
                "postgres.status_interval",
            ),
            (
                &format!("[postgres]\n{base}tables = [\"a\"]\ntls = \"maybe\"\n"),
                "tls",
            ),
            (
                &format!("[postgres]\n{base}tables = [\"a\"]\nslots = \"x\"\n"),
                "slots",
            ),
            (
                &format!("seed = \"s.json\"\n[postgres]\n{base}tables = [\"a\"]\n"),
                "seed",
            ),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
