//! `[[view]]` declarations as written in TOML: plain data, compiled and checked by `views`.
//!
//! The order of `[view.include]` entries is meaningful (a key may read an earlier include), so
//! the table is read into a list in document order, never through a sorted map.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::types::{ByteSize, Dur, Mode};

/// A `[[view]]` declaration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    expecting = "a [[view]] table with name, from and optional where, include, select, group_by, mode"
)]
pub struct ViewSpec {
    pub name: String,
    /// The source (topic or view) with one row per key.
    pub from: String,
    /// A filter over the row (after includes): rows that do not match are absent.
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
    /// Lookups added as fields, in declaration order.
    #[serde(default)]
    pub include: Includes,
    /// Fields to keep (`"path"` or `"path as name"`); every field when absent.
    #[serde(default)]
    pub select: Option<Vec<String>>,
    /// Makes the view an index: one row per distinct value of this field.
    #[serde(default)]
    pub group_by: Option<String>,
    /// `"full"` (every row, maintained by the writer) or `"on_demand"` (rows computed when
    /// first read and kept within `max_bytes`). A view over an on_demand source must be
    /// on_demand.
    #[serde(default = "full")]
    pub mode: Mode,
    /// The byte budget of an on_demand view (default 64 MiB).
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// An on_demand view drops rows not read (or changed) for this long.
    #[serde(default)]
    pub idle: Option<Dur>,
}

fn full() -> Mode {
    Mode::Full
}

/// `[view.include]`: named lookups in declaration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Includes(pub Vec<Include>);

/// One lookup: the field `name` gets the value of `source[key]`, or `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub name: String,
    pub source: String,
    pub key: String,
}

impl<'de> Deserialize<'de> for Includes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            source: String,
            key: String,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Includes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of includes: name = { source = \"...\", key = \"...\" }")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Includes, A::Error> {
                let mut out: Vec<Include> = Vec::new();
                while let Some((name, t)) = map.next_entry::<String, Table>()? {
                    if out.iter().any(|i| i.name == name) {
                        return Err(de::Error::custom(format!("duplicate include '{name}'")));
                    }
                    out.push(Include {
                        name,
                        source: t.source,
                        key: t.key,
                    });
                }
                Ok(Includes(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl ViewSpec {
    /// A view with one row per key of `from`, unchanged until includes, a filter or a selection
    /// are added.
    pub fn new(name: impl Into<String>, from: impl Into<String>) -> Self {
        ViewSpec {
            name: name.into(),
            from: from.into(),
            filter: None,
            include: Includes::default(),
            select: None,
            group_by: None,
            mode: Mode::Full,
            max_bytes: None,
            idle: None,
        }
    }

    /// Makes the view on_demand within `max_bytes` (see the `mode` field).
    pub fn on_demand(mut self, max_bytes: u64) -> Self {
        self.mode = Mode::OnDemand;
        self.max_bytes = Some(ByteSize(max_bytes));
        self
    }

    pub fn filter(mut self, expr: impl Into<String>) -> Self {
        self.filter = Some(expr.into());
        self
    }

    pub fn include(
        mut self,
        name: impl Into<String>,
        source: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        self.include.0.push(Include {
            name: name.into(),
            source: source.into(),
            key: key.into(),
        });
        self
    }

    pub fn select<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Self {
        self.select = Some(fields.into_iter().map(Into::into).collect());
        self
    }

    pub fn group_by(mut self, field: impl Into<String>) -> Self {
        self.group_by = Some(field.into());
        self
    }

    /// The sources this view reads, each with the field that names it.
    pub fn edges(&self) -> Vec<(String, &str)> {
        let mut e = vec![("from".to_string(), self.from.as_str())];
        for i in &self.include.0 {
            e.push((format!("include.{}.source", i.name), i.source.as_str()));
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_keep_declaration_order() {
        #[derive(Deserialize)]
        struct Cfg {
            view: Vec<ViewSpec>,
        }
        let cfg: Cfg = toml::from_str(
            r#"
            [[view]]
            name = "v"
            from = "products"
            [view.include]
            zeta  = { source = "a", key = "id" }
            alpha = { source = "b", key = "zeta.x" }
            mid   = { source = "a", key = "'lit' + id" }
            "#,
        )
        .unwrap();
        let names: Vec<_> = cfg.view[0]
            .include
            .0
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
    }

    #[test]
    fn unknown_keys_in_views_are_errors() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Cfg {
            view: Vec<ViewSpec>,
        }
        let err = toml::from_str::<Cfg>("[[view]]\nname = \"v\"\nfrom = \"a\"\nwhere_ = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("where_"), "{err}");
        let err = toml::from_str::<Cfg>(
            "[[view]]\nname = \"v\"\nfrom = \"a\"\n[view.include]\np = { source = \"s\", kye = \"id\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("kye"), "{err}");
    }
}
