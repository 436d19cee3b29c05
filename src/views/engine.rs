//! The view engine: runs inside the single writer, after each step, and brings every view up to
//! date with the changes that step applied.
//!
//! Each view row remembers the `(source, key)` pairs its computation read; a reverse index maps
//! each pair back to the rows. A change to `(source, key)` marks dirty the rows that read it
//! (and, in views whose `from` is that source, the row of that key); views are then processed
//! in dependency order, so a view's changes mark rows of the views reading it before those are
//! processed. A recomputed row whose serialized bytes did not change emits nothing.
//!
//! Versions: each view has its own counter, bumped once per step that changed the view; every
//! row written in that step carries it, so per-key versions only grow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::{Compute, Lookup, Read, RowError, SourceId, View, ViewStats};
use crate::store::on_demand::Slot;
use crate::store::view_cache::{Replaced, RowAnswer};
use crate::store::{Clock, Event, Source, Store, ViewCache};

type Dep = (SourceId, Arc<str>);

/// Which rows read a key: (view index, key in the view's `from`).
type Readers = HashSet<(usize, Arc<str>)>;

#[derive(Default)]
struct RowState {
    deps: Vec<Dep>,
    /// For grouped views: the group this key is a member of.
    group: Option<Arc<str>>,
}

struct ViewState {
    name: Arc<str>,
    id: SourceId,
    source: Arc<Source>,
    from: SourceId,
    from_name: Arc<str>,
    reads: Vec<Read>,
    inputs: Vec<Arc<Source>>,
    compute: Compute,
    grouped: bool,
    rows: HashMap<Arc<str>, RowState>,
    /// Rows kept at their last good value while an input they read is not JSON.
    stale: HashSet<Arc<str>>,
    dirty: HashSet<Arc<str>>,
    /// Grouped views: members (by `from` key, so sorted) of each group, serialized.
    groups: HashMap<Arc<str>, BTreeMap<Arc<str>, Bytes>>,
    dirty_groups: HashSet<Arc<str>>,
    version: u64,
    stats: Arc<ViewStats>,
    /// An on_demand view: its resident rows. Only rows resident here are tracked in `rows`
    /// (with `from[key]` as their first dependency), and nothing is written to `source`.
    lazy: Option<Arc<ViewCache>>,
}

/// Hashes a pointer address: events name their source with the source's own `Arc<str>`, so
/// finding the source of an event costs a multiply instead of hashing its name.
#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ByAddr = HashMap<usize, SourceId, std::hash::BuildHasherDefault<AddrHasher>>;

fn addr(name: &Arc<str>) -> usize {
    Arc::as_ptr(name).cast::<u8>() as usize
}

pub(crate) struct Engine {
    sources: Vec<Arc<Source>>,
    by_name: HashMap<Arc<str>, SourceId>,
    /// The same, by the address of each source's name.
    by_addr: ByAddr,
    /// Per source: the views (indexes) whose `from` it is.
    from_of: Vec<Vec<usize>>,
    /// Per source: key -> rows that read it.
    reverse: Vec<HashMap<Arc<str>, Readers>>,
    /// In dependency order.
    views: Vec<ViewState>,
    /// Some view has not been marked synced yet.
    pending_sync: bool,
}

impl Engine {
    /// Adds a source per view to `store` (views are in dependency order and their sources exist).
    pub(crate) fn new(views: Vec<View>, store: &mut Store, clock: Clock) -> Engine {
        let mut sources: Vec<Arc<Source>> = store.sources().to_vec();
        let mut by_name: HashMap<Arc<str>, SourceId> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name().clone(), i))
            .collect();
        let mut states = Vec::with_capacity(views.len());
        for v in views {
            let resolve = |name: &str| -> (SourceId, Arc<Source>) {
                // The graph was checked: every name resolves, and earlier views come first.
                let id = by_name[name];
                (id, sources[id].clone())
            };
            let (from, from_src) = resolve(&v.from);
            let reads: Vec<Read> = v
                .reads
                .iter()
                .map(|r| {
                    let (id, source) = resolve(r);
                    Read {
                        name: source.name().clone(),
                        id,
                        source,
                    }
                })
                .collect();
            let mut inputs = vec![from_src.clone()];
            for r in &reads {
                if !inputs.iter().any(|s| Arc::ptr_eq(s, &r.source)) {
                    inputs.push(r.source.clone());
                }
            }
            let lazy = v
                .on_demand
                .map(|(max_bytes, idle)| ViewCache::new(&v.name, max_bytes, idle));
            let mut source = Source::view(&v.name, inputs.clone(), clock);
            if let Some(cache) = &lazy {
                source = source.with_view_cache(cache.clone());
            }
            let source = store.add(source);
            let id = sources.len();
            sources.push(source.clone());
            by_name.insert(source.name().clone(), id);
            let grouped = match &v.compute {
                Compute::Map(_) => false,
                Compute::Group(_) => true,
                Compute::Declared(d) => d.grouped(),
            };
            let includes = match &v.compute {
                Compute::Declared(d) => d.include_stats(),
                _ => Vec::new(),
            };
            states.push(ViewState {
                grouped,
                name: source.name().clone(),
                id,
                source,
                from,
                from_name: from_src.name().clone(),
                reads,
                inputs,
                compute: v.compute,
                rows: HashMap::new(),
                stale: HashSet::new(),
                dirty: HashSet::new(),
                groups: HashMap::new(),
                dirty_groups: HashSet::new(),
                version: 0,
                stats: Arc::new(ViewStats {
                    includes,
                    ..ViewStats::default()
                }),
                lazy,
            });
        }
        // An on_demand view tracks `from[key]` as a dependency of each resident row instead:
        // a change to a key whose row is not resident concerns nobody.
        let mut from_of = vec![Vec::new(); sources.len()];
        for (i, v) in states.iter().enumerate() {
            if v.lazy.is_none() {
                from_of[v.from].push(i);
            }
        }
        let by_addr = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (addr(s.name()), i))
            .collect();
        Engine {
            by_addr,
            reverse: vec![HashMap::new(); sources.len()],
            sources,
            by_name,
            from_of,
            views: states,
            pending_sync: true,
        }
    }

    /// Whether some view reads `source` (as its `from` or through a lookup).
    pub(crate) fn reads(&self, source: &str) -> bool {
        self.views
            .iter()
            .any(|v| v.inputs.iter().any(|s| s.name().as_ref() == source))
    }

    /// Every source of the store, views included.
    pub(crate) fn sources(&self) -> &[Arc<Source>] {
        &self.sources
    }

    pub(crate) fn stats(&self) -> HashMap<String, Arc<ViewStats>> {
        self.views
            .iter()
            .map(|v| (v.name.to_string(), v.stats.clone()))
            .collect()
    }

    /// Marks dirty every row that `(source, key)` feeds.
    fn mark(&mut self, source: SourceId, key: &Arc<str>) {
        for &v in &self.from_of[source] {
            self.views[v].dirty.insert(key.clone());
        }
        if self.reverse[source].is_empty() {
            return;
        }
        if let Some(readers) = self.reverse[source].get(key) {
            for (v, k) in readers {
                self.views[*v].dirty.insert(k.clone());
            }
        }
    }

    /// Recomputes the dirty rows of every view, in dependency order; returns the view changes.
    fn run(&mut self, events: &[Event]) -> Vec<Event> {
        for ev in events {
            if let Some(id) = self.source_id(&ev.source) {
                self.mark(id, &ev.key);
            }
        }
        let mut out = Vec::new();
        for vi in 0..self.views.len() {
            if self.views[vi].dirty.is_empty() {
                continue;
            }
            let changed: Vec<Arc<str>> = if self.views[vi].lazy.is_some() {
                self.process_lazy(vi)
            } else {
                let start = out.len();
                self.process(vi, &mut out);
                out[start..].iter().map(|e| e.key.clone()).collect()
            };
            let id = self.views[vi].id;
            for key in &changed {
                self.mark(id, key);
            }
        }
        if self.pending_sync {
            self.pending_sync = false;
            for v in &self.views {
                if v.source.is_synced() {
                    continue;
                }
                if v.inputs.iter().all(|s| s.is_synced()) {
                    v.source.mark_synced();
                    // A view left empty by its first build over inputs that have rows is
                    // almost always a mistake (a `where` or `group_by` that matches nothing).
                    let from_rows = self.sources[v.from].len();
                    if v.lazy.is_none() && v.source.is_empty() && from_rows > 0 {
                        tracing::warn!(
                            view = %v.name,
                            from = %v.from_name,
                            from_rows,
                            recomputed = v.stats.recomputes.load(Ordering::Relaxed),
                            "view is empty after its first build although its from has rows: check its where, group_by and includes"
                        );
                    }
                } else {
                    self.pending_sync = true;
                }
            }
        }
        out
    }

    fn process(&mut self, vi: usize, out: &mut Vec<Event>) {
        let v = &mut self.views[vi];
        let dirty: Vec<Arc<str>> = v.dirty.drain().collect();
        let next = v.version + 1;
        let before = out.len();
        for key in dirty {
            let state = v.rows.remove(&key).unwrap_or_default();
            // Full views read only full sources: nothing is ever missing.
            let (result, deps) = compute(v, &self.sources, &key, &state.deps, &mut Vec::new());
            let result = settle(v, &key, result);
            let keep = matches!(result, Settled::KeepLast);
            // Only a row that exists is stale; a key that never had one simply has none.
            let held = if v.grouped {
                state.group.is_some()
            } else {
                v.source.get(&key).is_some()
            };
            if keep && held {
                v.stale.insert(key.clone());
                v.stats.kept.fetch_add(1, Ordering::Relaxed);
            } else {
                v.stale.remove(&key);
            }
            v.stats.stale.store(v.stale.len() as u64, Ordering::Relaxed);
            let result = result.row();
            set_deps(
                &mut self.reverse,
                &self.sources,
                vi,
                &key,
                &state.deps,
                &deps,
            );
            if keep {
                // The row (and its group membership) stays as it was; it is recomputed when
                // what it read changes again.
                if state.group.is_some() || !deps.is_empty() {
                    v.rows.insert(
                        key,
                        RowState {
                            deps,
                            group: state.group,
                        },
                    );
                }
            } else if v.grouped {
                let group = regroup(v, &key, state.group, result);
                if group.is_some() || !deps.is_empty() {
                    v.rows.insert(key, RowState { deps, group });
                }
            } else {
                let new = result.map(|(_, b)| b);
                emit(v, key.clone(), new, next, out);
                if !deps.is_empty() {
                    v.rows.insert(key, RowState { deps, group: None });
                }
            }
        }
        let groups: Vec<Arc<str>> = v.dirty_groups.drain().collect();
        for g in groups {
            let bytes = v.groups.get(&g).filter(|m| !m.is_empty()).map(|members| {
                let len = members.values().map(|b| b.len() + 1).sum::<usize>() + 1;
                let mut buf = Vec::with_capacity(len);
                buf.push(b'[');
                for (i, m) in members.values().enumerate() {
                    if i > 0 {
                        buf.push(b',');
                    }
                    buf.extend_from_slice(m);
                }
                buf.push(b']');
                Bytes::from(buf)
            });
            if bytes.is_none() {
                v.groups.remove(&g);
            }
            emit(v, g, bytes, next, out);
        }
        if out.len() > before {
            v.version = next;
            v.source.set_version(next);
            v.stats
                .changes
                .fetch_add((out.len() - before) as u64, Ordering::Relaxed);
        }
    }
}

/// Computes the row of `key` in view `v`: the group (grouped views) and serialized row, or
/// nothing; plus what the computation read (besides `from[key]`, which is implied).
#[allow(clippy::type_complexity)]
fn compute(
    v: &ViewState,
    sources: &[Arc<Source>],
    key: &Arc<str>,
    hint: &[Dep],
    missing: &mut Vec<Dep>,
) -> (Result<Option<(Option<String>, Bytes)>, RowError>, Vec<Dep>) {
    let mut deps = Vec::new();
    if v.lazy.is_some() {
        deps.push((v.from, key.clone()));
    }
    // Parsed in place: a full input's value is not copied out first.
    let parsed = sources[v.from].with_resident(key, |value| {
        value.map(serde_json::from_slice::<serde_json::Value>)
    });
    let parsed = match parsed {
        Some(Some(parsed)) => parsed,
        Some(None) => return (Ok(None), deps),
        None => {
            missing.push((v.from, key.clone()));
            return (Ok(None), deps);
        }
    };
    v.stats.recomputes.fetch_add(1, Ordering::Relaxed);
    let value = match parsed {
        Ok(value) => value,
        Err(e) => {
            return (
                Err(RowError::NotJson {
                    input: v.from_name.to_string(),
                    key: key.to_string(),
                    error: e.to_string(),
                }),
                deps,
            )
        }
    };
    let mut lookup = Lookup::new(&v.from_name, &v.reads, &mut deps, hint, missing);
    if let Compute::Declared(d) = &v.compute {
        let result = d.compute(key, value, &mut lookup);
        return (result, deps);
    }
    let computed = match &v.compute {
        Compute::Map(f) => f.row(key, value, &mut lookup).map(|r| r.map(|v| (None, v))),
        Compute::Group(f) => f
            .member(key, value, &mut lookup)
            .map(|r| r.map(|(g, v)| (Some(g), v))),
        Compute::Declared(_) => Ok(None),
    };
    let result = computed.and_then(|r| match r {
        None => Ok(None),
        Some((g, value)) => serde_json::to_vec(&value)
            .map(|b| Some((g, Bytes::from(b))))
            .map_err(|e| RowError::Other(format!("cannot serialize the row: {e}"))),
    });
    (result, deps)
}

/// Moves `key` between groups of a grouped view; returns its group now.
fn regroup(
    v: &mut ViewState,
    key: &Arc<str>,
    old: Option<Arc<str>>,
    new: Option<(Option<String>, Bytes)>,
) -> Option<Arc<str>> {
    let new = new.and_then(|(g, b)| Some((g?, b)));
    if let (Some(og), Some((ng, nb))) = (&old, &new) {
        if **og == **ng {
            let members = v.groups.entry(og.clone()).or_default();
            if members.get(key) != Some(nb) {
                members.insert(key.clone(), nb.clone());
                v.dirty_groups.insert(og.clone());
            }
            return old;
        }
    }
    if let Some(og) = old {
        if let Some(members) = v.groups.get_mut(&og) {
            members.remove(key);
        }
        v.dirty_groups.insert(og);
    }
    let (ng, nb) = new?;
    let g: Arc<str> = match v.groups.get_key_value(ng.as_str()) {
        Some((k, _)) => k.clone(),
        None => Arc::from(ng),
    };
    v.groups
        .entry(g.clone())
        .or_default()
        .insert(key.clone(), nb);
    v.dirty_groups.insert(g.clone());
    Some(g)
}

/// Writes `new` as the row `key` of view `v` if it differs from the current row.
fn emit(v: &ViewState, key: Arc<str>, new: Option<Bytes>, version: u64, out: &mut Vec<Event>) {
    // Compared in place: the current row is not copied out to be compared.
    let cur = v.source.with_row(&key, |cur| match (cur, &new) {
        (None, _) => None,
        (Some(c), Some(n)) => Some(c.value == &n[..]),
        (Some(_), None) => Some(false),
    });
    match (cur, new) {
        (None, None) | (Some(true), Some(_)) => {}
        (_, Some(n)) => {
            v.source.put(&key, version, &n);
            out.push(Event {
                source: v.name.clone(),
                key,
                version,
                value: Some(n),
            });
        }
        (Some(_), None) => {
            v.source.remove(&key);
            out.push(Event {
                source: v.name.clone(),
                key,
                version,
                value: None,
            });
        }
    }
}

/// Updates the reverse index for row `key` of view `vi`, whose reads changed from `old` to `new`,
/// and the pins on on_demand inputs (one per distinct input key a row reads).
fn set_deps(
    reverse: &mut [HashMap<Arc<str>, Readers>],
    sources: &[Arc<Source>],
    vi: usize,
    key: &Arc<str>,
    old: &[Dep],
    new: &[Dep],
) {
    if old == new {
        return;
    }
    for (i, d) in old.iter().enumerate() {
        if new.contains(d) || old[..i].contains(d) {
            continue;
        }
        if let Some(readers) = reverse[d.0].get_mut(&d.1) {
            readers.remove(&(vi, key.clone()));
            if readers.is_empty() {
                reverse[d.0].remove(&d.1);
            }
        }
        if let Some(od) = sources[d.0].on_demand() {
            od.unpin(&d.1);
        }
    }
    for (i, d) in new.iter().enumerate() {
        if old.contains(d) || new[..i].contains(d) {
            continue;
        }
        reverse[d.0]
            .entry(d.1.clone())
            .or_default()
            .insert((vi, key.clone()));
        if let Some(od) = sources[d.0].on_demand() {
            od.pin(&d.1);
        }
    }
}

impl Engine {
    /// Recomputes the dirty resident rows of on_demand view `vi`; returns the keys whose row
    /// changed or was dropped (their readers are marked in turn).
    fn process_lazy(&mut self, vi: usize) -> Vec<Arc<str>> {
        let Some(cache) = self.views[vi].lazy.clone() else {
            return Vec::new();
        };
        let dirty: Vec<Arc<str>> = self.views[vi].dirty.drain().collect();
        let next = self.views[vi].version + 1;
        let mut changed = Vec::new();
        for key in dirty {
            // Only resident rows are tracked; a row evicted meanwhile is forgotten.
            let Some(state) = self.views[vi].rows.remove(&key) else {
                continue;
            };
            if !cache.contains(&key) {
                self.untrack(vi, &key, &state.deps);
                continue;
            }
            let Ok((value, deps)) = self.compute_held(vi, &key, &state.deps) else {
                // An input is no longer held (a new origin epoch dropped its value, or a
                // view row it read was evicted): the row goes too, and is computed again
                // when read. Rows reading it are dropped in turn.
                cache.invalidate(&key);
                changed.push(key);
                continue;
            };
            let slot = Slot {
                value,
                version: next,
            };
            match cache.replace(key.clone(), slot) {
                Replaced::NotResident => self.untrack(vi, &key, &state.deps),
                r => {
                    self.track(vi, key.clone(), &state.deps, deps);
                    if r == Replaced::Changed {
                        changed.push(key);
                    }
                }
            }
        }
        if !changed.is_empty() {
            let v = &mut self.views[vi];
            v.version = next;
            v.source.set_version(next);
            v.stats
                .changes
                .fetch_add(changed.len() as u64, Ordering::Relaxed);
        }
        changed
    }

    /// Computes row `key` of on_demand view `vi` from what is held now; `old` is what it read
    /// before. When an input is not held, the row stops being tracked (its dependency entries
    /// and pins go) and the inputs to fetch are returned instead.
    #[allow(clippy::type_complexity)]
    fn compute_held(
        &mut self,
        vi: usize,
        key: &Arc<str>,
        old: &[Dep],
    ) -> Result<(Option<Bytes>, Vec<Dep>), Vec<Dep>> {
        let v = &self.views[vi];
        let mut missing = Vec::new();
        let (result, deps) = compute(v, &self.sources, key, old, &mut missing);
        if !missing.is_empty() {
            self.untrack(vi, key, old);
            return Err(missing);
        }
        // An on_demand view row is computed when read: with no last good value at hand, a
        // malformed input leaves it out.
        Ok((settle(v, key, result).row().map(|(_, b)| b), deps))
    }

    /// Tracks row `key` of view `vi` as reading `deps`; it read `old` before.
    fn track(&mut self, vi: usize, key: Arc<str>, old: &[Dep], deps: Vec<Dep>) {
        set_deps(&mut self.reverse, &self.sources, vi, &key, old, &deps);
        self.views[vi]
            .rows
            .insert(key, RowState { deps, group: None });
    }

    /// Drops the dependency entries (and pins) of row `key` of view `vi`, which read `old`.
    fn untrack(&mut self, vi: usize, key: &Arc<str>, old: &[Dep]) {
        set_deps(&mut self.reverse, &self.sources, vi, key, old, &[]);
    }

    /// Forgets the evicted rows of on_demand views: their dependency entries go, the pins on
    /// their inputs are released, and rows of other views that read them are marked.
    fn drain_evictions(&mut self) {
        for vi in 0..self.views.len() {
            let Some(cache) = self.views[vi].lazy.clone() else {
                continue;
            };
            for key in cache.take_evicted() {
                // Only the writer inserts: a key resident again was computed anew since.
                if cache.contains(&key) {
                    continue;
                }
                let Some(state) = self.views[vi].rows.remove(&key) else {
                    continue;
                };
                self.untrack(vi, &key, &state.deps);
                let id = self.views[vi].id;
                self.mark(id, &key);
            }
        }
    }

    fn dirty(&self) -> bool {
        self.views.iter().any(|v| !v.dirty.is_empty())
    }

    fn source_id(&self, name: &Arc<str>) -> Option<SourceId> {
        match self.by_addr.get(&addr(name)) {
            Some(&id) => Some(id),
            None => self.by_name.get(name).copied(),
        }
    }
}

/// What becomes of a row after its computation.
enum Settled {
    /// The row now (`None`: absent, or its computation failed).
    Row(Option<(Option<String>, Bytes)>),
    /// An input is not JSON: the row stays at its last good value.
    KeepLast,
}

impl Settled {
    fn row(self) -> Option<(Option<String>, Bytes)> {
        match self {
            Settled::Row(r) => r,
            Settled::KeepLast => None,
        }
    }
}

/// The row a computation gave; a failure is counted and logged.
#[allow(clippy::type_complexity)]
fn settle(
    v: &ViewState,
    key: &str,
    result: Result<Option<(Option<String>, Bytes)>, RowError>,
) -> Settled {
    match result {
        Ok(r) => Settled::Row(r),
        Err(e) => {
            let n = v.stats.errors.fetch_add(1, Ordering::Relaxed);
            if n == 0 || n.is_power_of_two() {
                warn!(view = %v.name, key = %key, error = %e, errors = n + 1, "view row not computed");
            } else {
                debug!(view = %v.name, key = %key, error = %e, "view row not computed");
            }
            match e {
                RowError::NotJson { .. } => Settled::KeepLast,
                _ => Settled::Row(None),
            }
        }
    }
}

/// What the writer calls: the engine runs inside the writer's step.
impl Engine {
    /// Brings the views up to date with `events` (already applied to their sources) and returns
    /// the changes it made to views.
    pub(crate) fn apply(&mut self, events: &[Event]) -> Vec<Event> {
        self.drain_evictions();
        if events.is_empty() && !self.pending_sync && !self.dirty() {
            return Vec::new();
        }
        self.run(events)
    }

    /// Marks for recomputation the rows that read `keys` of `source` (pinned on_demand keys
    /// whose value changed); they are recomputed at the next [`Engine::apply`].
    pub(crate) fn touch(&mut self, source: &Arc<Source>, keys: &[Arc<str>]) {
        let Some(id) = self.source_id(source.name()) else {
            return;
        };
        for key in keys {
            self.mark(id, key);
        }
    }

    /// Computes the row of `key` in on_demand view `view` from what is resident, and keeps it.
    pub(crate) fn row(&mut self, view: &str, key: Arc<str>) -> RowAnswer {
        let found = self
            .views
            .iter()
            .enumerate()
            .find_map(|(vi, v)| Some((vi, v.lazy.clone()?)).filter(|_| &*v.name == view));
        let Some((vi, cache)) = found else {
            return RowAnswer::Refused(format!("no on_demand view named '{view}'"));
        };
        if self.views[vi].rows.contains_key(&key) {
            if let Some(slot) = cache.resident(&key) {
                return RowAnswer::Row(slot);
            }
        }
        // Not tracked, or tracked but evicted and not drained yet: computed from scratch.
        let state = self.views[vi].rows.remove(&key).unwrap_or_default();
        let (value, deps) = match self.compute_held(vi, &key, &state.deps) {
            Ok(computed) => computed,
            Err(mut missing) => {
                // A key read twice is fetched once.
                missing.sort_unstable();
                missing.dedup();
                return RowAnswer::Missing(
                    missing
                        .into_iter()
                        .map(|(id, k)| (self.sources[id].clone(), k))
                        .collect(),
                );
            }
        };
        // A row made resident gets a version of its own, so that per-key versions only grow
        // across evictions.
        let v = &mut self.views[vi];
        let next = v.version + 1;
        v.version = next;
        v.source.set_version(next);
        let slot = Slot {
            value,
            version: next,
        };
        self.track(vi, key.clone(), &state.deps, deps);
        cache.insert(key, slot.clone());
        RowAnswer::Row(slot)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use bytes::Bytes;
    use serde_json::{json, Value};

    use crate::store::Event;
    use crate::views::{RowError, View, ViewSpec};
    use crate::writer::Standalone;

    fn put(key: &str, v: Value) -> (String, Option<Bytes>) {
        (key.to_string(), Some(Bytes::from(v.to_string())))
    }

    fn del(key: &str) -> (String, Option<Bytes>) {
        (key.to_string(), None)
    }

    fn row(s: &Standalone, view: &str, key: &str) -> Option<String> {
        let r = s.store().source(view)?.get(key)?;
        Some(String::from_utf8(r.value.to_vec()).unwrap())
    }

    fn view_events<'a>(events: &'a [Event], view: &str) -> Vec<&'a Event> {
        events.iter().filter(|e| &*e.source == view).collect()
    }

    fn page() -> ViewSpec {
        ViewSpec::new("page", "products")
            .filter("status == 'active'")
            .include("price", "prices", "id")
            .include("brand", "brands", "brand_id")
            .include("country", "countries", "brand.country_id")
    }

    #[test]
    fn includes_are_added_in_order_and_null_when_absent() {
        let mut s = Standalone::new(
            &["products", "prices", "brands", "countries"],
            &[page()],
            vec![],
        )
        .unwrap();
        s.apply("brands", vec![put("b1", json!({"country_id": "DE"}))])
            .unwrap();
        s.apply(
            "products",
            vec![put(
                "p1",
                json!({"id": "p1", "status": "active", "brand_id": "b1"}),
            )],
        )
        .unwrap();
        assert_eq!(
            row(&s, "page", "p1").unwrap(),
            r#"{"id":"p1","status":"active","brand_id":"b1","price":null,"brand":{"country_id":"DE"},"country":null}"#
        );
        s.apply("countries", vec![put("DE", json!({"name": "Germany"}))])
            .unwrap();
        assert!(row(&s, "page", "p1")
            .unwrap()
            .ends_with(r#""country":{"name":"Germany"}}"#));
        // Deleting a looked-up key sets the include to null, and cascades through later keys.
        let ev = s.apply("brands", vec![del("b1")]).unwrap();
        assert_eq!(view_events(&ev, "page").len(), 1);
        assert!(row(&s, "page", "p1")
            .unwrap()
            .ends_with(r#""brand":null,"country":null}"#));
        // A row that no longer matches the filter is deleted.
        let ev = s
            .apply(
                "products",
                vec![put(
                    "p1",
                    json!({"id": "p1", "status": "discontinued", "brand_id": "b1"}),
                )],
            )
            .unwrap();
        let pv = view_events(&ev, "page");
        assert_eq!(pv.len(), 1);
        assert_eq!(pv[0].value, None);
        assert_eq!(row(&s, "page", "p1"), None);
    }

    #[test]
    fn an_include_named_like_a_field_replaces_it_in_place() {
        let spec = ViewSpec::new("v", "products")
            .include("brand_id", "brands", "brand_id")
            .include("extra", "brands", "'b1'")
            .include("again", "brands", "'b' + n");
        let mut s = Standalone::new(&["products", "brands"], &[spec], vec![]).unwrap();
        s.apply("brands", vec![put("b1", json!({"n": 1}))]).unwrap();
        s.apply(
            "products",
            vec![put("p1", json!({"id": "p1", "brand_id": "b1", "n": 1}))],
        )
        .unwrap();
        assert_eq!(
            row(&s, "v", "p1").unwrap(),
            r#"{"id":"p1","brand_id":{"n":1},"n":1,"extra":{"n":1},"again":{"n":1}}"#
        );
        s.apply("brands", vec![del("b1")]).unwrap();
        assert_eq!(
            row(&s, "v", "p1").unwrap(),
            r#"{"id":"p1","brand_id":null,"n":1,"extra":null,"again":null}"#
        );
    }

    #[test]
    fn unchanged_rows_emit_nothing_and_versions_grow() {
        let mut s = Standalone::new(
            &["products", "prices", "brands", "countries"],
            &[page()],
            vec![],
        )
        .unwrap();
        let src = s.store().source("page").unwrap().clone();
        assert!(src.is_synced());
        assert_eq!(src.version(), 0);
        s.apply(
            "products",
            vec![
                put("p1", json!({"id": "p1", "status": "active"})),
                put("p2", json!({"id": "p2", "status": "active"})),
            ],
        )
        .unwrap();
        assert_eq!(src.version(), 1);
        assert_eq!(src.get("p1").unwrap().version, 1);
        // A price nobody reads: no recompute, nothing emitted.
        let stats = s.view_stats("page").unwrap().clone();
        let before = stats.recomputes.load(Ordering::Relaxed);
        let ev = s.apply("prices", vec![put("zz", json!(1))]).unwrap();
        assert_eq!(view_events(&ev, "page").len(), 0);
        assert_eq!(stats.recomputes.load(Ordering::Relaxed), before);
        // Re-putting the same value recomputes the row but emits nothing and keeps the version.
        let ev = s
            .apply(
                "products",
                vec![put("p1", json!({"id": "p1", "status": "active"}))],
            )
            .unwrap();
        assert_eq!(view_events(&ev, "page").len(), 0);
        assert_eq!(stats.recomputes.load(Ordering::Relaxed), before + 1);
        assert_eq!(src.version(), 1);
        s.apply("prices", vec![put("p2", json!({"amount": 3}))])
            .unwrap();
        assert_eq!(src.version(), 2);
        assert_eq!(src.get("p2").unwrap().version, 2);
        assert_eq!(src.get("p1").unwrap().version, 1);
    }

    #[test]
    fn groups_move_and_empty_groups_are_deleted() {
        let spec = ViewSpec::new("by_cat", "products")
            .group_by("category")
            .select(["id", "price.amount as amount"])
            .include("price", "prices", "id");
        let mut s = Standalone::new(&["products", "prices"], &[spec], vec![]).unwrap();
        s.apply(
            "products",
            vec![
                put("p2", json!({"id": "p2", "category": "a"})),
                put("p1", json!({"id": "p1", "category": "a"})),
                put("p3", json!({"id": "p3", "category": 7})),
                put("p4", json!({"id": "p4"})),
            ],
        )
        .unwrap();
        assert_eq!(
            row(&s, "by_cat", "a").unwrap(),
            r#"[{"id":"p1"},{"id":"p2"}]"#
        );
        assert_eq!(row(&s, "by_cat", "7").unwrap(), r#"[{"id":"p3"}]"#);
        s.apply("prices", vec![put("p2", json!({"amount": 5}))])
            .unwrap();
        assert_eq!(
            row(&s, "by_cat", "a").unwrap(),
            r#"[{"id":"p1"},{"id":"p2","amount":5}]"#
        );
        // p3 moves from "7" to "a": "7" is now empty and deleted.
        let ev = s
            .apply(
                "products",
                vec![put("p3", json!({"id": "p3", "category": "a"}))],
            )
            .unwrap();
        assert_eq!(view_events(&ev, "by_cat").len(), 2);
        assert_eq!(row(&s, "by_cat", "7"), None);
        assert_eq!(
            row(&s, "by_cat", "a").unwrap(),
            r#"[{"id":"p1"},{"id":"p2","amount":5},{"id":"p3"}]"#
        );
        s.apply("products", vec![del("p1"), del("p2"), del("p3")])
            .unwrap();
        assert_eq!(row(&s, "by_cat", "a"), None);
        assert!(s.store().source("by_cat").unwrap().is_empty());
    }

    #[test]
    fn views_of_views_are_updated_in_the_same_step() {
        let specs = [
            // Declared before what it reads: dependency order, not declaration order, counts.
            ViewSpec::new("by_country", "page")
                .group_by("country.name")
                .select(["id"]),
            page(),
        ];
        let mut s = Standalone::new(
            &["products", "prices", "brands", "countries"],
            &specs,
            vec![],
        )
        .unwrap();
        s.apply_many(vec![
            ("countries", vec![put("DE", json!({"name": "Germany"}))]),
            ("brands", vec![put("b1", json!({"country_id": "DE"}))]),
            (
                "products",
                vec![put(
                    "p1",
                    json!({"id": "p1", "status": "active", "brand_id": "b1"}),
                )],
            ),
        ])
        .unwrap();
        assert_eq!(
            row(&s, "by_country", "Germany").unwrap(),
            r#"[{"id":"p1"}]"#
        );
        let ev = s
            .apply("countries", vec![put("DE", json!({"name": "Deutschland"}))])
            .unwrap();
        let names: Vec<&str> = ev.iter().map(|e| &*e.source).collect();
        assert_eq!(names, ["countries", "page", "by_country", "by_country"]);
        assert_eq!(row(&s, "by_country", "Germany"), None);
        assert_eq!(
            row(&s, "by_country", "Deutschland").unwrap(),
            r#"[{"id":"p1"}]"#
        );
    }

    #[test]
    fn values_that_are_not_json_are_counted_row_errors() {
        let mut s = Standalone::new(
            &["products", "prices", "brands", "countries"],
            &[page()],
            vec![],
        )
        .unwrap();
        s.apply(
            "products",
            vec![
                (
                    "bad".to_string(),
                    Some(Bytes::from_static(b"\xff not json")),
                ),
                put("p1", json!({"id": "p1", "status": "active"})),
                put("n", json!(5)),
            ],
        )
        .unwrap();
        let stats = s.view_stats("page").unwrap().clone();
        assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
        assert_eq!(row(&s, "page", "bad"), None);
        assert_eq!(row(&s, "page", "n"), None);
        assert!(row(&s, "page", "p1").is_some());
        // An include that is not JSON: the row stays at its last good value, counted and
        // marked stale, until the value is fixed.
        let good = row(&s, "page", "p1");
        s.apply(
            "prices",
            vec![("p1".into(), Some(Bytes::from_static(b"{")))],
        )
        .unwrap();
        assert_eq!(stats.errors.load(Ordering::Relaxed), 3);
        assert_eq!(row(&s, "page", "p1"), good);
        assert_eq!(stats.kept.load(Ordering::Relaxed), 1);
        assert_eq!(stats.stale.load(Ordering::Relaxed), 1);
        // So does a `from` value that is not JSON.
        s.apply(
            "products",
            vec![("p1".into(), Some(Bytes::from_static(b"\xff")))],
        )
        .unwrap();
        assert_eq!(row(&s, "page", "p1"), good);
        s.apply(
            "products",
            vec![put("p1", json!({"id": "p1", "status": "active"}))],
        )
        .unwrap();
        assert_eq!(row(&s, "page", "p1"), good);
        s.apply("prices", vec![put("p1", json!({"amount": 1}))])
            .unwrap();
        assert!(row(&s, "page", "p1")
            .unwrap()
            .contains(r#""price":{"amount":1}"#));
        assert_eq!(stats.stale.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn rust_views_read_through_the_lookup_and_are_tracked() {
        let view = View::map("priced", "products", |key, product, lookup| {
            let price = lookup.get("prices", key)?;
            let amount = price.and_then(|p| p.get("amount").cloned());
            Ok(Some(json!({"name": product["name"], "amount": amount})))
        })
        .reading(["prices"]);
        let sneaky = View::map("sneaky", "products", |key, _, lookup| {
            lookup.get("prices", key)?;
            Ok(Some(json!(1)))
        });
        let mut s = Standalone::new(&["products", "prices"], &[], vec![view, sneaky]).unwrap();
        s.apply("products", vec![put("p1", json!({"name": "x"}))])
            .unwrap();
        assert_eq!(
            row(&s, "priced", "p1").unwrap(),
            r#"{"name":"x","amount":null}"#
        );
        s.apply("prices", vec![put("p1", json!({"amount": 9}))])
            .unwrap();
        assert_eq!(
            row(&s, "priced", "p1").unwrap(),
            r#"{"name":"x","amount":9}"#
        );
        // Reading an undeclared source is an error for the row, not a silent untracked read.
        assert_eq!(row(&s, "sneaky", "p1"), None);
        let stats = s.view_stats("sneaky").unwrap();
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
        let _ = RowError::Undeclared("prices".into());
    }

    #[test]
    fn a_view_syncs_once_all_its_inputs_have() {
        let s = Standalone::new(
            &["products", "prices", "brands", "countries"],
            &[page()],
            vec![],
        )
        .unwrap();
        let src = s.store().source("page").unwrap();
        assert!(src.is_synced());
        assert!(src.is_connected());
        assert_eq!(src.staleness_ms(), 0);
    }
}
