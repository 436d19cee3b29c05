//! `[[view]]` declarations ([`ViewSpec`], plain config data) compiled into the same [`View`] a
//! Rust user registers by hand, with errors that name the field.

use serde_json::{Map, Value};

use std::sync::Arc;

use bytes::Bytes;

use super::expr::{key_text, Filter, KeyExpr, Path};
use super::{IncludeStats, Lookup, RowError, View};
use crate::config::ViewSpec;
use crate::types::{check_on_demand_budget, Mode, DEFAULT_ON_DEMAND_BYTES};

impl ViewSpec {
    /// Parses the expressions and builds the view. Errors name the field (`where`,
    /// `include.price.key`, ...) and say what is wrong.
    pub(crate) fn compile(&self) -> Result<View, (String, String)> {
        match self.mode {
            Mode::OnDemand => {
                check_on_demand_budget(self.max_bytes, self.idle, "rows")
                    .map_err(|(field, message)| (field.to_string(), message))?;
            }
            Mode::Full => {
                if self.max_bytes.is_some() || self.idle.is_some() {
                    return Err((
                        "mode".into(),
                        "max_bytes and idle apply only to mode = \"on_demand\"".into(),
                    ));
                }
            }
        }
        let filter = match &self.filter {
            Some(f) => Some(Filter::parse(f).map_err(|e| ("where".to_string(), e))?),
            None => None,
        };
        let mut reads: Vec<String> = Vec::new();
        let mut includes = Vec::new();
        for inc in &self.include.0 {
            if inc.name.is_empty() {
                return Err(("include".into(), "an include needs a name".into()));
            }
            let key =
                KeyExpr::parse(&inc.key).map_err(|e| (format!("include.{}.key", inc.name), e))?;
            let slot = match reads.iter().position(|r| *r == inc.source) {
                Some(s) => s,
                None => {
                    reads.push(inc.source.clone());
                    reads.len() - 1
                }
            };
            if includes.iter().any(|i: &Included| i.name == inc.name) {
                return Err((
                    format!("include.{}", inc.name),
                    format!("include '{}' is declared twice", inc.name),
                ));
            }
            includes.push(Included {
                name: inc.name.clone(),
                slot,
                key,
                parse: true,
                view: self.name.clone(),
                source: inc.source.clone(),
                key_text: inc.key.clone(),
                stats: Arc::new(IncludeStats::default()),
            });
        }
        let select = match &self.select {
            Some(items) => {
                if items.is_empty() {
                    return Err((
                        "select".into(),
                        "selects no fields (leave it out to keep every field)".into(),
                    ));
                }
                let mut out: Vec<(Path, String)> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let sel = parse_select(item).map_err(|e| (format!("select[{i}]"), e))?;
                    if out.iter().any(|(_, n)| *n == sel.1) {
                        return Err((
                            format!("select[{i}]"),
                            format!("field '{}' is selected twice", sel.1),
                        ));
                    }
                    out.push(sel);
                }
                Some(out)
            }
            None => None,
        };
        let group_by = match &self.group_by {
            Some(g) => Some(Path::parse(g).map_err(|e| ("group_by".to_string(), e))?),
            None => None,
        };
        // An include is parsed only if something reads into it; otherwise its bytes are
        // checked to be JSON and embedded as they are.
        let mut read_fields: Vec<&str> = Vec::new();
        for i in &includes {
            read_fields.extend(i.key.paths().map(Path::first));
        }
        if let Some(f) = &filter {
            f.paths(&mut |p| read_fields.push(p.first()));
        }
        if let Some(g) = &group_by {
            read_fields.push(g.first());
        }
        for (p, _) in select.iter().flatten() {
            read_fields.push(p.first());
        }
        let parse: Vec<bool> = includes
            .iter()
            .map(|i| read_fields.contains(&i.name.as_str()))
            .collect();
        for (inc, parse) in includes.iter_mut().zip(parse) {
            inc.parse = parse;
        }
        let mut bare: Vec<(String, std::sync::atomic::AtomicU64)> = Vec::new();
        if let Some(f) = &filter {
            f.compared_fields(&mut |p| {
                let name = p.first().to_string();
                // An include is a field every row has (null or not).
                if !includes.iter().any(|i| i.name == name) && !bare.iter().any(|(b, _)| *b == name)
                {
                    bare.push((name, Default::default()));
                }
            });
        }
        let view = View::declared(
            &self.name,
            &self.from,
            Declared {
                filter,
                includes,
                select,
                group_by,
                filter_check: FilterCheck {
                    view: self.name.clone(),
                    rows: Default::default(),
                    bare,
                    warned: Default::default(),
                },
            },
        );
        let view = view.reading(reads).described(self.describe_body());
        Ok(match self.mode {
            Mode::OnDemand => view.on_demand(
                self.max_bytes.map_or(DEFAULT_ON_DEMAND_BYTES, |b| b.0),
                self.idle.map(|d| d.0),
            ),
            Mode::Full => view,
        })
    }

    fn describe_body(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.mode == Mode::OnDemand {
            let budget = self.max_bytes.map_or(DEFAULT_ON_DEMAND_BYTES, |b| b.0);
            match self.idle {
                Some(idle) => lines.push(format!(
                    "on_demand: rows computed when read, within {budget} bytes, idle {:?}",
                    idle.0
                )),
                None => lines.push(format!(
                    "on_demand: rows computed when read, within {budget} bytes"
                )),
            }
        }
        match &self.filter {
            Some(f) => lines.push(format!("from {} where {f}", self.from)),
            None => lines.push(format!("from {}", self.from)),
        }
        for i in &self.include.0 {
            lines.push(format!("include {} = {}[{}]", i.name, i.source, i.key));
        }
        if let Some(g) = &self.group_by {
            lines.push(format!("group_by {g}"));
        }
        if let Some(s) = &self.select {
            lines.push(format!("select {}", s.join(", ")));
        }
        lines
    }
}

/// `"path"` or `"path as name"`.
fn parse_select(item: &str) -> Result<(Path, String), String> {
    let parts: Vec<&str> = item.split_whitespace().collect();
    match parts.as_slice() {
        [p] => {
            let path = Path::parse(p)?;
            let name = path.last().to_string();
            Ok((path, name))
        }
        [p, "as", n] => Ok((Path::parse(p)?, (*n).to_string())),
        _ => Err(format!(
            "expected \"field\" or \"field.path as name\", got {item:?}"
        )),
    }
}

struct Included {
    name: String,
    slot: usize,
    key: KeyExpr,
    /// Something reads into this include (a later key, the filter, group_by or select).
    parse: bool,
    /// For the diagnostics: the view, the source read and the key as written.
    view: String,
    source: String,
    key_text: String,
    stats: Arc<IncludeStats>,
}

/// Misses before "most rows miss" is judged: fewer say little.
const WARN_AFTER_MISSES: u64 = 5;

impl Included {
    /// Counts one lookup (`found`: the key expression's value, and whether the source had a
    /// row there; `None` while an on_demand input is being fetched) and, the first time most
    /// lookups have missed, logs why with what the row does have.
    fn count(&self, row: &Map<String, Value>, key: Option<&str>, found: Option<bool>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(found) = found else { return };
        let st = &self.stats;
        let evaluated = st.evaluated.fetch_add(1, Relaxed) + 1;
        let (missed, what) = match key {
            None => (st.key_missing.fetch_add(1, Relaxed) + 1, "no field"),
            Some(_) if !found => (st.lookup_missing.fetch_add(1, Relaxed) + 1, "no row"),
            Some(_) => return,
        };
        if missed < WARN_AFTER_MISSES || missed * 2 <= evaluated || st.warned.swap(true, Relaxed) {
            return;
        }
        if what == "no field" {
            let fields: Vec<&str> = row.keys().map(String::as_str).collect();
            let wanted: Vec<&str> = self.key.paths().map(Path::first).collect();
            let hint = wanted
                .iter()
                .filter(|w| !row.contains_key(**w))
                .find_map(|w| did_you_mean(w, &fields).map(|m| format!("; did you mean '{m}'?")))
                .unwrap_or_default();
            tracing::warn!(
                view = %self.view,
                include = %self.name,
                key = %self.key_text,
                missed,
                of = evaluated,
                fields = %fields.join(", "),
                "include key finds no field in most rows: the include is null in them{hint}"
            );
        } else {
            tracing::warn!(
                view = %self.view,
                include = %self.name,
                key = %self.key_text,
                source = %self.source,
                missed,
                of = evaluated,
                example = %key.unwrap_or_default(),
                "include key finds no row of its source in most rows: the include is null in them"
            );
        }
    }
}

/// The field of `fields` closest to `wanted` (edit distance at most 2, or one contains the
/// other ignoring `_`), if any.
fn did_you_mean<'a>(wanted: &str, fields: &[&'a str]) -> Option<&'a str> {
    let squash = |s: &str| s.replace('_', "").to_ascii_lowercase();
    let w = squash(wanted);
    fields
        .iter()
        .map(|f| {
            let d = edit_distance(wanted, f);
            let close = d <= 2 || squash(f) == w || (w.len() >= 3 && squash(f).contains(&w));
            (close, d, *f)
        })
        .filter(|(close, _, _)| *close)
        .min_by_key(|(_, d, _)| *d)
        .map(|(_, _, f)| f)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A compiled declaration: includes, then the filter, then the group key and the selection.
pub(crate) struct Declared {
    filter: Option<Filter>,
    includes: Vec<Included>,
    select: Option<Vec<(Path, String)>>,
    group_by: Option<Path>,
    filter_check: FilterCheck,
}

/// Watches the bare words a `where` compares (`status == paid`): one that no row has as a
/// field was most likely meant as text, and the filter silently matches nothing.
struct FilterCheck {
    view: String,
    rows: std::sync::atomic::AtomicU64,
    /// Each bare word, and in how many rows it was absent.
    bare: Vec<(String, std::sync::atomic::AtomicU64)>,
    warned: std::sync::atomic::AtomicBool,
}

impl FilterCheck {
    fn count(&self, row: &Map<String, Value>) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.bare.is_empty() || self.warned.load(Relaxed) {
            return;
        }
        let rows = self.rows.fetch_add(1, Relaxed) + 1;
        for (word, absent) in &self.bare {
            let absent = if row.contains_key(word) {
                absent.load(Relaxed)
            } else {
                absent.fetch_add(1, Relaxed) + 1
            };
            if rows >= WARN_AFTER_MISSES && absent == rows && !self.warned.swap(true, Relaxed) {
                let fields: Vec<&str> = row.keys().map(String::as_str).collect();
                tracing::warn!(
                    view = %self.view,
                    field = %word,
                    rows,
                    fields = %fields.join(", "),
                    "where compares '{word}' as a field, and no row has it: if it is text, quote it ('{word}')"
                );
            }
        }
    }
}

impl Declared {
    pub(crate) fn grouped(&self) -> bool {
        self.group_by.is_some()
    }

    /// The counters of each include, in declaration order.
    pub(crate) fn include_stats(&self) -> Vec<(String, Arc<IncludeStats>)> {
        self.includes
            .iter()
            .map(|i| (i.name.clone(), i.stats.clone()))
            .collect()
    }

    /// The serialized row built from `value`, with its group key when grouped; `None` when
    /// filtered out (or, grouped, when the group field is not a string or a number).
    pub(crate) fn compute(
        &self,
        key: &str,
        value: Value,
        lookup: &mut Lookup<'_>,
    ) -> Result<Option<(Option<String>, Bytes)>, RowError> {
        let Value::Object(mut row) = value else {
            return Err(RowError::NotObject {
                input: lookup.from_name().to_string(),
                key: key.to_string(),
            });
        };
        // Fields of `value` keep their positions (an include named like one replaces it there);
        // new fields follow in declaration order. Includes that nothing reads into are not put
        // in the map at all: `tail` and `in_place` say where their bytes go when writing.
        let from_fields = row.len();
        let mut tail: Vec<Tail<'_>> = Vec::new();
        let mut in_place: Vec<(&str, Bytes)> = Vec::new();
        for inc in &self.includes {
            let existing = row.contains_key(&inc.name);
            if inc.parse {
                let pending = lookup.pending();
                let k = inc.key.eval(&row);
                let v = match &k {
                    Some(k) => lookup.get_slot(inc.slot, k)?,
                    None => None,
                };
                let found = (lookup.pending() == pending).then_some(v.is_some());
                inc.count(&row, k.as_deref(), found);
                let v = v.unwrap_or(Value::Null);
                if !existing {
                    tail.push(Tail::Parsed(&inc.name));
                }
                row.insert(inc.name.clone(), v);
            } else {
                let pending = lookup.pending();
                let k = inc.key.eval(&row);
                let b = match &k {
                    Some(k) => lookup.raw_slot(inc.slot, k)?,
                    None => None,
                };
                let found = (lookup.pending() == pending).then_some(b.is_some());
                inc.count(&row, k.as_deref(), found);
                if existing {
                    row.insert(inc.name.clone(), Value::Null);
                    if let Some(b) = b {
                        in_place.push((&inc.name, b));
                    }
                } else {
                    tail.push(Tail::Raw(&inc.name, b));
                }
            }
        }
        if let Some(f) = &self.filter {
            self.filter_check.count(&row);
            if !f.matches(&row) {
                return Ok(None);
            }
        }
        let group = match &self.group_by {
            Some(g) => match g.get(&row).and_then(key_text) {
                Some(k) => Some(k.into_owned()),
                None => return Ok(None),
            },
            None => None,
        };
        let bytes = match &self.select {
            Some(sel) => {
                // Selected paths only read parsed includes (see `compile`).
                let mut out = Map::with_capacity(sel.len());
                for (path, name) in sel {
                    if let Some(v) = path.get(&row) {
                        out.insert(name.clone(), v.clone());
                    }
                }
                serde_json::to_vec(&out).map_err(serialize_error)?
            }
            None => write_row(&row, from_fields, &in_place, &tail)?,
        };
        Ok(Some((group, Bytes::from(bytes))))
    }
}

fn serialize_error(e: serde_json::Error) -> RowError {
    RowError::Other(format!("cannot serialize the row: {e}"))
}

/// A field added after the fields of the `from` value.
enum Tail<'a> {
    /// Parsed: its value is in the row map.
    Parsed(&'a str),
    /// Embedded as it is (`None`: absent, written as `null`).
    Raw(&'a str, Option<Bytes>),
}

/// Serializes the row: the first `from_fields` entries of `row` (with the bytes of `in_place`
/// for the fields they name), then `tail`.
fn write_row(
    row: &Map<String, Value>,
    from_fields: usize,
    in_place: &[(&str, Bytes)],
    tail: &[Tail<'_>],
) -> Result<Vec<u8>, RowError> {
    let raw_len: usize = tail
        .iter()
        .map(|t| match t {
            Tail::Raw(_, Some(b)) => b.len(),
            _ => 0,
        })
        .sum();
    let mut out = Vec::with_capacity(192 + raw_len);
    out.push(b'{');
    let mut first = true;
    let mut field = |out: &mut Vec<u8>, k: &str| -> Result<(), RowError> {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, k).map_err(serialize_error)?;
        out.push(b':');
        Ok(())
    };
    for (k, v) in row.iter().take(from_fields) {
        field(&mut out, k)?;
        match in_place.iter().find(|(n, _)| *n == k) {
            Some((_, b)) => out.extend_from_slice(b),
            None => serde_json::to_writer(&mut out, v).map_err(serialize_error)?,
        }
    }
    for t in tail {
        match t {
            Tail::Parsed(name) => {
                field(&mut out, name)?;
                let v = row.get(*name).unwrap_or(&Value::Null);
                serde_json::to_writer(&mut out, v).map_err(serialize_error)?;
            }
            Tail::Raw(name, b) => {
                field(&mut out, name)?;
                match b {
                    Some(b) => out.extend_from_slice(b),
                    None => out.extend_from_slice(b"null"),
                }
            }
        }
    }
    out.push(b'}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_name_the_field() {
        let field = |s: ViewSpec| s.compile().err().map(|(f, _)| f);
        assert_eq!(
            field(ViewSpec::new("v", "a").filter("x ==")),
            Some("where".into())
        );
        assert_eq!(
            field(ViewSpec::new("v", "a").include("p", "s", "id +")),
            Some("include.p.key".into())
        );
        assert_eq!(
            field(ViewSpec::new("v", "a").select(["id", "a b c"])),
            Some("select[1]".into())
        );
        assert_eq!(
            field(ViewSpec::new("v", "a").group_by("a..b")),
            Some("group_by".into())
        );
        assert_eq!(
            field(ViewSpec::new("v", "a").select(["id", "x as id"])),
            Some("select[1]".into())
        );
        assert!(ViewSpec::new("v", "a")
            .filter("status == 'active'")
            .include("p", "s", "id")
            .select(["id", "p.amount as price"])
            .group_by("category")
            .compile()
            .is_ok());
    }
}
