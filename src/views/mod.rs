//! Views: named keyspaces derived from topics and other views, maintained incrementally by the
//! single writer.
//!
//! A view has one row per key of its `from` source, computed by a function that may read other
//! sources through a [`Lookup`]. Every read is recorded, so the engine knows which rows a change
//! to `(source, key)` affects and recomputes exactly those, views of views in dependency order,
//! within the writer step that applied the change: once a step is applied, no view is behind its
//! inputs. Declarative `[[view]]` tables ([`ViewSpec`]) compile to the same [`View`] a Rust user
//! registers with [`View::map`] or [`View::group`].
//!
//! Invariant (tested against a from-scratch oracle): after any sequence of changes, every view
//! row equals what computing it from scratch over the current sources gives.

mod engine;
pub(crate) mod expr;
mod spec;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::store::{Clock, Source, Store};
use crate::types::{check_name, Mode};

pub use crate::config::{Include, Includes, ViewSpec};

pub(crate) use engine::Engine;

/// What a map view computes for one key of its `from` source: the row, or `None` for no row.
pub trait RowFn: Send + Sync + 'static {
    fn row(
        &self,
        key: &str,
        value: Value,
        lookup: &mut Lookup<'_>,
    ) -> Result<Option<Value>, RowError>;
}

/// What a grouped view computes for one key of its `from` source: the group it belongs to and
/// its member row, or `None` when it belongs to no group.
pub trait MemberFn: Send + Sync + 'static {
    fn member(
        &self,
        key: &str,
        value: Value,
        lookup: &mut Lookup<'_>,
    ) -> Result<Option<(String, Value)>, RowError>;
}

struct MapClosure<F>(F);

impl<F> RowFn for MapClosure<F>
where
    F: Fn(&str, Value, &mut Lookup<'_>) -> Result<Option<Value>, RowError> + Send + Sync + 'static,
{
    fn row(
        &self,
        key: &str,
        value: Value,
        lookup: &mut Lookup<'_>,
    ) -> Result<Option<Value>, RowError> {
        (self.0)(key, value, lookup)
    }
}

struct GroupClosure<F>(F);

impl<F> MemberFn for GroupClosure<F>
where
    F: Fn(&str, Value, &mut Lookup<'_>) -> Result<Option<(String, Value)>, RowError>
        + Send
        + Sync
        + 'static,
{
    fn member(
        &self,
        key: &str,
        value: Value,
        lookup: &mut Lookup<'_>,
    ) -> Result<Option<(String, Value)>, RowError> {
        (self.0)(key, value, lookup)
    }
}

#[derive(Clone)]
pub(crate) enum Compute {
    Map(Arc<dyn RowFn>),
    Group(Arc<dyn MemberFn>),
    /// A `[[view]]` declaration: computes the serialized row directly, embedding included
    /// values that nothing else reads as they are instead of parsing and re-serializing them.
    Declared(Arc<spec::Declared>),
}

/// A view definition: its name, the source it has a row per key of, the other sources it may
/// read, and the function computing a row.
///
/// ```
/// use serde_json::json;
/// use viewcar::views::View;
///
/// // One row per product: its name and its price amount (or null).
/// let view = View::map("product_price", "products", |key, product, lookup| {
///     let price = lookup.get("prices", key)?;
///     Ok(Some(json!({
///         "name": product["name"],
///         "amount": price.as_ref().map(|p| p["amount"].clone()),
///     })))
/// })
/// .reading(["prices"]);
/// assert_eq!(view.name(), "product_price");
/// ```
#[derive(Clone)]
pub struct View {
    name: String,
    from: String,
    reads: Vec<String>,
    compute: Compute,
    description: Vec<String>,
    /// On_demand: rows computed on first read and kept within (max_bytes, idle).
    on_demand: Option<(u64, Option<Duration>)>,
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("name", &self.name)
            .field("from", &self.from)
            .field("reads", &self.reads)
            .field(
                "grouped",
                &match &self.compute {
                    Compute::Group(_) => true,
                    Compute::Declared(d) => d.grouped(),
                    Compute::Map(_) => false,
                },
            )
            .field("on_demand", &self.on_demand)
            .finish()
    }
}

impl View {
    /// A view with at most one row per key of `from`, computed by `f` from the key and the
    /// parsed `from` value.
    pub fn map<F>(name: impl Into<String>, from: impl Into<String>, f: F) -> View
    where
        F: Fn(&str, Value, &mut Lookup<'_>) -> Result<Option<Value>, RowError>
            + Send
            + Sync
            + 'static,
    {
        Self::with_fn(name, from, MapClosure(f))
    }

    /// An index: `f` puts each key of `from` in a group (or none); the view has one row per
    /// non-empty group, a JSON array of its members sorted by their key in `from`.
    pub fn group<F>(name: impl Into<String>, from: impl Into<String>, f: F) -> View
    where
        F: Fn(&str, Value, &mut Lookup<'_>) -> Result<Option<(String, Value)>, RowError>
            + Send
            + Sync
            + 'static,
    {
        Self::with_group_fn(name, from, GroupClosure(f))
    }

    /// [`View::map`] with a [`RowFn`] implementation.
    pub fn with_fn(name: impl Into<String>, from: impl Into<String>, f: impl RowFn) -> View {
        View {
            name: name.into(),
            from: from.into(),
            reads: Vec::new(),
            compute: Compute::Map(Arc::new(f)),
            description: Vec::new(),
            on_demand: None,
        }
    }

    /// [`View::group`] with a [`MemberFn`] implementation.
    pub fn with_group_fn(
        name: impl Into<String>,
        from: impl Into<String>,
        f: impl MemberFn,
    ) -> View {
        View {
            name: name.into(),
            from: from.into(),
            reads: Vec::new(),
            compute: Compute::Group(Arc::new(f)),
            description: Vec::new(),
            on_demand: None,
        }
    }

    /// Declares the sources the function may read with [`Lookup::get`]. Reading another one is
    /// an error for that row: the declared reads are what orders views of views.
    pub fn reading<S: Into<String>>(mut self, sources: impl IntoIterator<Item = S>) -> View {
        for s in sources {
            let s = s.into();
            if !self.reads.contains(&s) {
                self.reads.push(s);
            }
        }
        self
    }

    pub(crate) fn declared(
        name: impl Into<String>,
        from: impl Into<String>,
        d: spec::Declared,
    ) -> View {
        View {
            name: name.into(),
            from: from.into(),
            reads: Vec::new(),
            compute: Compute::Declared(Arc::new(d)),
            description: Vec::new(),
            on_demand: None,
        }
    }

    /// Makes the view on_demand: a row is computed when first read (fetching the on_demand
    /// inputs it misses), kept while it is read within `max_bytes` (and `idle`), and kept
    /// current by push while resident. Required for a view that reads an on_demand source;
    /// not available for grouped views (a group's members are not known without every key).
    pub fn on_demand(mut self, max_bytes: u64, idle: Option<Duration>) -> View {
        self.on_demand = Some((max_bytes, idle));
        self
    }

    /// True for an on_demand view.
    pub fn is_on_demand(&self) -> bool {
        self.on_demand.is_some()
    }

    fn grouped(&self) -> bool {
        match &self.compute {
            Compute::Group(_) => true,
            Compute::Declared(d) => d.grouped(),
            Compute::Map(_) => false,
        }
    }

    fn described(mut self, lines: Vec<String>) -> View {
        self.description = lines;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn from(&self) -> &str {
        &self.from
    }

    pub fn reads(&self) -> &[String] {
        &self.reads
    }

    fn edges(&self) -> Vec<(String, &str)> {
        let mut e = vec![("from".to_string(), self.from.as_str())];
        for r in &self.reads {
            e.push(("reads".to_string(), r.as_str()));
        }
        e
    }
}

/// Why one row could not be computed. The error is counted in [`ViewStats::errors`] and logged,
/// and the row is recomputed when what it read changes. Meanwhile the row is left out of the
/// view, except for [`RowError::NotJson`]: a malformed input keeps the row at its last good
/// value (counted in [`ViewStats::kept`]), so that one bad write is not seen as a delete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("{input}[{key}] is not JSON: {error}")]
    NotJson {
        input: String,
        key: String,
        error: String,
    },
    #[error("{input}[{key}] is not a JSON object")]
    NotObject { input: String, key: String },
    #[error("reads '{0}', which the view does not declare (View::reading)")]
    Undeclared(String),

    #[error("{0}")]
    Other(String),
}

/// Counters of one view.
#[derive(Debug, Default)]
pub struct ViewStats {
    /// Rows computed (each call of the view's function).
    pub recomputes: AtomicU64,
    /// Rows that could not be computed ([`RowError`]).
    pub errors: AtomicU64,
    /// Row upserts and deletes emitted.
    pub changes: AtomicU64,
    /// Rows kept at their last good value because an input they read is not JSON (each time).
    pub kept: AtomicU64,
    /// Rows held at their last good value now: stale until the bad input is fixed or deleted.
    pub stale: AtomicU64,
    /// Per include of a declared view (in declaration order): how its lookups went.
    pub includes: Vec<(String, Arc<IncludeStats>)>,
}

/// How the lookups of one include of a declared view went: a key expression that finds no
/// field, or a key that finds no row, leaves the include `null` without any error, so these
/// counters (in `/metrics` and `/status`) and a warning are how such a mistake shows.
#[derive(Debug, Default)]
pub struct IncludeStats {
    /// Rows whose include key was evaluated (each computation of a row).
    pub evaluated: AtomicU64,
    /// ... of which the key expression found no field (or a null) in the row.
    pub key_missing: AtomicU64,
    /// ... of which the source had no row at the key.
    pub lookup_missing: AtomicU64,
    /// The "most rows miss" warning was logged (once per include).
    pub(crate) warned: std::sync::atomic::AtomicBool,
}

pub(crate) type SourceId = usize;

/// A source a view may read, resolved.
pub(crate) struct Read {
    pub(crate) name: Arc<str>,
    pub(crate) id: SourceId,
    pub(crate) source: Arc<Source>,
}

/// The handle a view function reads other sources through. Every read, found or not, is
/// recorded as a dependency of the row being computed.
pub struct Lookup<'a> {
    from: &'a str,
    reads: &'a [Read],
    deps: &'a mut Vec<(SourceId, Arc<str>)>,
    /// What the previous computation of this row read, in order: a read of the same key reuses
    /// its `Arc<str>` instead of allocating one.
    hint: &'a [(SourceId, Arc<str>)],
    /// Reads of on_demand inputs that are not held yet (read as absent meanwhile).
    missing: &'a mut Vec<(SourceId, Arc<str>)>,
}

impl<'a> Lookup<'a> {
    pub(crate) fn new(
        from: &'a str,
        reads: &'a [Read],
        deps: &'a mut Vec<(SourceId, Arc<str>)>,
        hint: &'a [(SourceId, Arc<str>)],
        missing: &'a mut Vec<(SourceId, Arc<str>)>,
    ) -> Self {
        Lookup {
            from,
            reads,
            deps,
            hint,
            missing,
        }
    }

    /// The value of `source[key]` parsed as JSON, or `None` when absent.
    pub fn get(&mut self, source: &str, key: &str) -> Result<Option<Value>, RowError> {
        let slot = self.slot(source)?;
        self.get_slot(slot, key)
    }

    /// The raw value of `source[key]`, or `None` when absent.
    pub fn get_bytes(&mut self, source: &str, key: &str) -> Result<Option<Bytes>, RowError> {
        let slot = self.slot(source)?;
        self.bytes_slot(slot, key)
    }

    /// The name of the source the row comes from.
    pub fn from_name(&self) -> &str {
        self.from
    }

    fn slot(&self, source: &str) -> Result<usize, RowError> {
        self.reads
            .iter()
            .position(|r| &*r.name == source)
            .ok_or_else(|| RowError::Undeclared(source.to_string()))
    }

    fn bytes_slot(&mut self, slot: usize, key: &str) -> Result<Option<Bytes>, RowError> {
        Ok(self.read_slot(slot, key, Bytes::copy_from_slice))
    }

    /// Calls `f` with the value of `source[key]` in place; `None` when absent (or not held
    /// yet: an on_demand input, recorded as missing).
    fn read_slot<T>(&mut self, slot: usize, key: &str, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let read = &self.reads[slot];
        let key: Arc<str> = match self.hint.get(self.deps.len()) {
            Some((id, k)) if *id == read.id && **k == *key => k.clone(),
            _ => Arc::from(key),
        };
        let row = read.source.with_resident(&key, |v| v.map(f));
        self.deps.push((read.id, key.clone()));
        match row {
            Some(v) => v,
            None => {
                // Read as absent so that the computation goes on and finds the other inputs it
                // misses in this round; the engine discards a row computed with a miss.
                self.missing.push((read.id, key));
                None
            }
        }
    }

    /// Reads of inputs that are not held yet, so far (an on_demand input: not a miss).
    pub(crate) fn pending(&self) -> usize {
        self.missing.len()
    }

    fn not_json(&self, slot: usize, key: &str, e: serde_json::Error) -> RowError {
        RowError::NotJson {
            input: self.reads[slot].name.to_string(),
            key: key.to_string(),
            error: e.to_string(),
        }
    }

    pub(crate) fn get_slot(&mut self, slot: usize, key: &str) -> Result<Option<Value>, RowError> {
        // Parsed in place: a full input's value is not copied out first.
        match self.read_slot(slot, key, |b| serde_json::from_slice::<Value>(b)) {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(e)) => Err(self.not_json(slot, key, e)),
        }
    }

    /// Like [`Lookup::get_slot`] but without building the value: only checks that it is JSON.
    pub(crate) fn raw_slot(&mut self, slot: usize, key: &str) -> Result<Option<Bytes>, RowError> {
        let Some(bytes) = self.bytes_slot(slot, key)? else {
            return Ok(None);
        };
        match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            Ok(_) => Ok(Some(bytes)),
            Err(e) => Err(self.not_json(slot, key, e)),
        }
    }
}

/// A view set that cannot be built.
/// A view that cannot be built: which view (with its index among the declared `[[view]]`s, when
/// it was declared in the config), which field, and what is wrong. The caller reports it as a
/// config error of its file ([`ViewError::config_field`]).
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("view '{view}': {field}: {message}")]
    Invalid {
        index: Option<usize>,
        view: String,
        field: String,
        message: String,
    },
    #[error("no topic named '{0}'")]
    UnknownTopic(String),
}

impl ViewError {
    /// The config field at fault: `view[1].include.p.source` for a declared view.
    pub fn config_field(&self) -> String {
        match self {
            ViewError::Invalid {
                index: Some(i),
                field,
                ..
            } => format!("view[{i}].{field}"),
            ViewError::Invalid { view, field, .. } => format!("view '{view}'.{field}"),
            ViewError::UnknownTopic(_) => "view".to_string(),
        }
    }

    /// What is wrong, naming the view.
    pub fn config_message(&self) -> String {
        match self {
            ViewError::Invalid { view, message, .. } => format!("view '{view}': {message}"),
            e => e.to_string(),
        }
    }
}

/// A view graph problem: which view (by index), which field, what is wrong.
struct GraphError {
    view: usize,
    field: String,
    message: String,
}

/// Checks names, sources and cycles, and returns the views in dependency order (every view
/// after the views it reads; otherwise in declaration order).
fn order_views(
    views: &[(&str, Vec<(String, &str)>)],
    sources: &HashSet<String>,
) -> Result<Vec<usize>, GraphError> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, (name, _)) in views.iter().enumerate() {
        if let Err(message) = check_name(name) {
            return Err(GraphError {
                view: i,
                field: "name".into(),
                message,
            });
        }
        if sources.contains(*name) || index.insert(name, i).is_some() {
            return Err(GraphError {
                view: i,
                field: "name".into(),
                message: format!("duplicate source name '{name}'"),
            });
        }
    }
    for (i, (_, edges)) in views.iter().enumerate() {
        for (field, src) in edges {
            if !sources.contains(*src) && !index.contains_key(src) {
                let mut known: Vec<&str> = sources.iter().map(String::as_str).collect();
                known.extend(index.keys());
                known.sort_unstable();
                return Err(GraphError {
                    view: i,
                    field: field.clone(),
                    message: format!(
                        "unknown source '{src}' (known: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                });
            }
        }
    }
    // Depth-first, emitting a view after everything it reads; a view met again while still on
    // the path closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; views.len()];
    let mut order = Vec::with_capacity(views.len());
    for root in 0..views.len() {
        if marks[root] != Mark::New {
            continue;
        }
        // (view, next edge to follow)
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        marks[root] = Mark::OnPath;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            let edges = &views[v].1;
            if *next == edges.len() {
                marks[v] = Mark::Done;
                order.push(v);
                stack.pop();
                continue;
            }
            let (field, src) = &edges[*next];
            *next += 1;
            let Some(&w) = index.get(src) else { continue };
            match marks[w] {
                Mark::Done => {}
                Mark::New => {
                    marks[w] = Mark::OnPath;
                    stack.push((w, 0));
                }
                Mark::OnPath => {
                    let start = stack.iter().position(|(x, _)| *x == w).unwrap_or(0);
                    let mut path: Vec<&str> =
                        stack[start..].iter().map(|(x, _)| views[*x].0).collect();
                    path.push(views[w].0);
                    return Err(GraphError {
                        view: v,
                        field: field.clone(),
                        message: format!("views form a cycle: {}", path.join(" -> ")),
                    });
                }
            }
        }
    }
    Ok(order)
}

/// A view for [`require_on_demand`]: its name, edges (field, source) and whether it is on_demand.
type Marked<'a> = (&'a str, Vec<(String, &'a str)>, bool);

/// A view that reads on_demand data (an on_demand topic or view) must be on_demand itself: a
/// full view has every row, and its inputs do not. `views` are (name, edges, on_demand); the
/// error names the view, the field and the source.
fn require_on_demand(
    views: &[Marked<'_>],
    on_demand_topics: &HashSet<String>,
) -> Result<(), GraphError> {
    let lazy: HashSet<&str> = views
        .iter()
        .filter(|(_, _, od)| *od)
        .map(|(n, _, _)| *n)
        .collect();
    for (i, (name, edges, od)) in views.iter().enumerate() {
        if *od {
            continue;
        }
        for (field, src) in edges {
            let what = if on_demand_topics.contains(*src) {
                "an on_demand topic"
            } else if lazy.contains(src) {
                "an on_demand view"
            } else {
                continue;
            };
            return Err(GraphError {
                view: i,
                field: field.clone(),
                message: format!(
                    "reads '{src}', {what}, which holds only the keys read lately; a view over \
                     on_demand data must be on_demand itself: declare view '{name}' \
                     mode = \"on_demand\" (with max_bytes), or '{src}' mode = \"full\""
                ),
            });
        }
    }
    Ok(())
}

/// The views of a sidecar, ready to be attached to its store.
pub(crate) struct ViewSet {
    engine: Engine,
}

impl ViewSet {
    /// The engine, for the writer to run.
    pub(crate) fn into_engine(self) -> Engine {
        self.engine
    }

    /// Counters of every view, by name.
    pub(crate) fn stats(&self) -> HashMap<String, Arc<ViewStats>> {
        self.engine.stats()
    }
}

/// A topic views may read: its name and whether it is on_demand.
pub type TopicInfo<'a> = (&'a str, Mode);

/// The one check of a view graph: compiles `specs` (errors name the field), adds `extra` views
/// (registered from Rust), and checks names, sources, cycles and the on_demand rules against
/// `topics`. Returns the views in dependency order (every view after the views it reads;
/// otherwise in declaration order).
pub fn plan(
    specs: &[ViewSpec],
    extra: Vec<View>,
    topics: &[TopicInfo<'_>],
) -> Result<Vec<View>, ViewError> {
    let declared = specs.len();
    let mut views = Vec::with_capacity(specs.len() + extra.len());
    for (i, s) in specs.iter().enumerate() {
        let v = s.compile().map_err(|(field, message)| ViewError::Invalid {
            index: Some(i),
            view: s.name.clone(),
            field,
            message,
        })?;
        views.push(v);
    }
    views.extend(extra);
    let invalid = |views: &[View], e: GraphError| ViewError::Invalid {
        index: (e.view < declared).then_some(e.view),
        view: views[e.view].name.clone(),
        field: e.field,
        message: e.message,
    };
    let names: HashSet<String> = topics.iter().map(|(n, _)| n.to_string()).collect();
    // A declared view's edges name its config fields (`include.price.source`); a view
    // registered from Rust has only the sources it reads.
    let edges: Vec<Vec<(String, &str)>> = specs
        .iter()
        .map(ViewSpec::edges)
        .chain(views[declared..].iter().map(View::edges))
        .collect();
    let graph: Vec<_> = views
        .iter()
        .zip(&edges)
        .map(|(v, e)| (v.name.as_str(), e.clone()))
        .collect();
    let order = order_views(&graph, &names).map_err(|e| invalid(&views, e))?;
    let on_demand_topics: HashSet<String> = topics
        .iter()
        .filter(|(_, m)| *m == Mode::OnDemand)
        .map(|(n, _)| n.to_string())
        .collect();
    let marked: Vec<_> = views
        .iter()
        .zip(edges)
        .map(|(v, e)| (v.name.as_str(), e, v.is_on_demand()))
        .collect();
    require_on_demand(&marked, &on_demand_topics).map_err(|e| invalid(&views, e))?;
    if let Some(i) = views.iter().position(|v| v.is_on_demand() && v.grouped()) {
        return Err(invalid(
            &views,
            GraphError {
                view: i,
                field: "group_by".into(),
                message: "an on_demand view cannot group: a group's members are only known \
                          from every key (declare it mode = \"full\", over full sources)"
                    .into(),
            },
        ));
    }
    let mut slots: Vec<Option<View>> = views.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// [`plan`] for a config's `[[view]]`s alone: what `viewcar check` runs.
pub fn check(specs: &[ViewSpec], topics: &[TopicInfo<'_>]) -> Result<(), ViewError> {
    plan(specs, Vec::new(), topics).map(|_| ())
}

/// Plans the views (see [`plan`]) over the sources already in `store`, adds a source per view,
/// and returns the engine that maintains them (`None` when there are no views).
pub(crate) fn build(
    specs: &[ViewSpec],
    extra: Vec<View>,
    store: &mut Store,
    clock: Clock,
) -> Result<Option<ViewSet>, ViewError> {
    if specs.is_empty() && extra.is_empty() {
        return Ok(None);
    }
    let topics: Vec<TopicInfo<'_>> = store
        .sources()
        .iter()
        .map(|s| (&**s.name(), s.mode()))
        .collect();
    let ordered = plan(specs, extra, &topics)?;
    Ok(Some(ViewSet {
        engine: Engine::new(ordered, store, clock),
    }))
}

/// The view graph for `viewcar check`: every view in dependency order, with what it reads.
pub fn describe(specs: &[ViewSpec]) -> String {
    use std::fmt::Write;
    if specs.is_empty() {
        return "views: none\n".into();
    }
    let graph: Vec<_> = specs.iter().map(|s| (s.name.as_str(), s.edges())).collect();
    // The sources a view reads that are not views are topics (the config is valid).
    let names: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let topics: HashSet<String> = graph
        .iter()
        .flat_map(|(_, e)| e.iter().map(|(_, s)| *s))
        .filter(|s| !names.contains(s))
        .map(str::to_string)
        .collect();
    let order = order_views(&graph, &topics).unwrap_or_else(|_| (0..specs.len()).collect());
    let mut out = String::new();
    let _ = writeln!(out, "views, in dependency order:");
    for i in order {
        let s = &specs[i];
        let mut reads: Vec<&str> = Vec::new();
        for (_, src) in s.edges() {
            if !reads.contains(&src) {
                reads.push(src);
            }
        }
        let kind = if s.group_by.is_some() {
            "index"
        } else {
            "view"
        };
        let _ = writeln!(out, "  {kind} {} <- {}", s.name, reads.join(", "));
        let body = match s.compile() {
            Ok(v) => v.description,
            Err(_) => Vec::new(),
        };
        for line in body {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Checks `specs` over topics `products`, `prices` and `brands`, of which `on_demand` are
    /// on_demand; the error as a config error reports it.
    fn check_with(specs: &[ViewSpec], on_demand: &[&str]) -> Result<(), String> {
        let topics: Vec<TopicInfo<'_>> = ["products", "prices", "brands", "users"]
            .into_iter()
            .map(|t| {
                let mode = if on_demand.contains(&t) {
                    Mode::OnDemand
                } else {
                    Mode::Full
                };
                (t, mode)
            })
            .collect();
        super::check(specs, &topics)
            .map_err(|e| format!("t.toml: {}: {}", e.config_field(), e.config_message()))
    }

    fn check(specs: &[ViewSpec]) -> Result<(), String> {
        check_with(specs, &[])
    }

    #[test]
    fn views_over_on_demand_data_must_be_on_demand() {
        let specs = [
            ViewSpec::new("top", "mid").include("b", "brands", "brand_id"),
            ViewSpec::new("mid", "products").include("p", "prices", "id"),
            ViewSpec::new("plain", "brands"),
        ];
        check(&specs).unwrap();
        assert!(check_with(&specs, &["users"]).is_ok());
        let refused =
            |specs: &[ViewSpec], on_demand: &[&str]| check_with(specs, on_demand).unwrap_err();
        // The view reading the topic is named, with the field and the way out.
        let e = refused(&specs, &["prices"]);
        assert!(
            e.contains("view[1].include.p.source: view 'mid': reads 'prices', an on_demand topic"),
            "{e}"
        );
        assert!(e.contains("declare view 'mid' mode = \"on_demand\""), "{e}");
        // Declared on_demand, it is accepted; a full view over it is not.
        let specs = [
            ViewSpec::new("top", "mid").include("b", "brands", "brand_id"),
            ViewSpec::new("mid", "products")
                .include("p", "prices", "id")
                .on_demand(1 << 20),
        ];
        let e = refused(&specs, &["prices"]);
        assert!(
            e.contains("view[0].from: view 'top': reads 'mid', an on_demand view"),
            "{e}"
        );
        let specs = [specs[0].clone().on_demand(1 << 20), specs[1].clone()];
        assert!(check_with(&specs, &["prices"]).is_ok());
        // An on_demand view cannot group, and budgets have a floor.
        let e = check(&[ViewSpec::new("g", "products")
            .group_by("x")
            .on_demand(1 << 20)])
        .unwrap_err();
        assert!(e.contains("view[0].group_by"), "{e}");
        let e = check(&[ViewSpec::new("s", "products").on_demand(100)]).unwrap_err();
        assert!(e.contains("view[0].max_bytes"), "{e}");
    }

    #[test]
    fn graph_is_ordered_by_dependencies() {
        let specs = [
            ViewSpec::new("top", "mid").include("b", "brands", "brand_id"),
            ViewSpec::new("mid", "base"),
            ViewSpec::new("base", "products").include("p", "prices", "id"),
        ];
        check(&specs).unwrap();
        let graph: Vec<_> = specs.iter().map(|s| (s.name.as_str(), s.edges())).collect();
        let order = order_views(&graph, &topics(&["products", "prices", "brands"])).ok();
        assert_eq!(order, Some(vec![2, 1, 0]));
        let text = describe(&specs);
        let pos = |n: &str| text.find(n).unwrap();
        assert!(
            pos("view base") < pos("view mid") && pos("view mid") < pos("view top"),
            "{text}"
        );
        assert!(text.contains("include p = prices[id]"), "{text}");
    }

    #[test]
    fn unknown_source_names_view_and_field() {
        let err = check(&[ViewSpec::new("v", "products").include("x", "nope", "id")]).unwrap_err();
        assert!(err.contains("view[0].include.x.source"), "{err}");
        assert!(
            err.contains("view 'v'") && err.contains("unknown source 'nope'"),
            "{err}"
        );
        let err = check(&[ViewSpec::new("v", "prodcts")]).unwrap_err();
        assert!(
            err.contains("view[0].from") && err.contains("'prodcts'"),
            "{err}"
        );
    }

    #[test]
    fn cycles_name_the_path() {
        let err = check(&[
            ViewSpec::new("a", "products").include("x", "b", "id"),
            ViewSpec::new("b", "a"),
        ])
        .unwrap_err();
        assert!(
            err.contains("cycle: a -> b -> a") || err.contains("cycle: b -> a -> b"),
            "{err}"
        );
        let err = check(&[ViewSpec::new("self", "self")]).unwrap_err();
        assert!(
            err.contains("view[0].from") && err.contains("self -> self"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_are_errors() {
        let err =
            check(&[ViewSpec::new("v", "products"), ViewSpec::new("v", "prices")]).unwrap_err();
        assert!(
            err.contains("view[1].name") && err.contains("duplicate source name 'v'"),
            "{err}"
        );
        let err = check(&[ViewSpec::new("prices", "products")]).unwrap_err();
        assert!(
            err.contains("view[0].name") && err.contains("'prices'"),
            "{err}"
        );
    }

    #[test]
    fn bad_expressions_name_the_field() {
        let err = check(&[ViewSpec::new("v", "products").filter("status = 'x'")]).unwrap_err();
        assert!(
            err.contains("view[0].where") && err.contains("view 'v'"),
            "{err}"
        );
        let err =
            check(&[ViewSpec::new("v", "products").include("p", "prices", "id +")]).unwrap_err();
        assert!(err.contains("view[0].include.p.key"), "{err}");
    }
}
