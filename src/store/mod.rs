//! Sources: versioned keyspaces that readers name (topic replicas and views), with the freshness
//! state readers are told about.
//!
//! Readers go through [`Source::get`] and friends: lock-free loads, no `.await`. Only the writer
//! task mutates (the `pub(crate)` methods), so per-key versions and the source version move
//! forward in the order the writer applied them.
//!
//! A snapshot never shows half-applied to readers: it is staged into a fresh [`Keyspace`] and
//! swapped in with one atomic pointer store.

mod keyspace;
pub mod on_demand;
pub mod view_cache;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use tokio::sync::watch;

use crate::types::Mode;

pub(crate) use keyspace::Staging;
pub use keyspace::{Keyspace, RowRef};
pub use on_demand::{Fetched, Fetcher, OnDemand, OnDemandError, OnDemandStats, Slot};
pub use view_cache::{RowAnswer, RowDesk, RowRequest, ViewCache};

/// A stored value and the version that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub value: Bytes,
    pub version: u64,
}

/// One change applied to a source, as handed to views and subscribers. `value: None` = deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub source: Arc<str>,
    pub key: Arc<str>,
    pub version: u64,
    pub value: Option<Bytes>,
}

/// What a source is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A replica of a topic of the named origin.
    Topic { origin: Arc<str> },
    /// A view maintained by the sidecar.
    View,
}

/// A monotonic millisecond clock shared by a store, so that freshness can live in atomics.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// A named, versioned keyspace that readers can read, scan and watch.
#[derive(Debug)]
pub struct Source {
    name: Arc<str>,
    kind: SourceKind,
    mode: Mode,
    rows: ArcSwap<Keyspace>,
    epoch: ArcSwap<String>,
    version: AtomicU64,
    /// The version whose changes every view has also been brought up to (the writer moves it
    /// after each flush): what `ReadOptions.after` waits for.
    visible: AtomicU64,
    synced: AtomicBool,
    connected: AtomicBool,
    /// Why the origin refused this topic's subscription, while it does (retried with backoff).
    failure: ArcSwapOption<String>,
    /// The cause of the feed's last failure.
    last_error: ArcSwapOption<String>,
    /// Clock ms when the origin last confirmed this source current (0 = never).
    last_heard_ms: AtomicU64,
    /// How far the origin's copy trails what it follows (ms, bytes), as of its last Progress.
    upstream_lag: (AtomicU64, AtomicU64),
    upstream_copied: AtomicU64,
    live_window_ms: u64,
    clock: Clock,
    /// Ticks on every applied version and on sync, so that waiting readers wake up.
    changed: watch::Sender<u64>,
    /// A sequence lock over change batches: odd while the writer is applying one. Multi-key
    /// readers retry when it moved, so they see each version of a topic whole.
    writes: AtomicU64,
    /// A sequence lock over a change of epoch: odd while the epoch and the version are being
    /// replaced together (see `position`).
    moves: AtomicU64,
    /// For a view: the sources it reads, whose freshness it reports.
    inputs: Vec<Arc<Source>>,
    /// For an `on_demand` topic: its resident keys (the keyspace above stays empty).
    on_demand: Option<Arc<OnDemand>>,
    /// For an `on_demand` view: its resident rows (the keyspace above stays empty).
    view_cache: Option<Arc<ViewCache>>,
}

/// What an `on_demand` topic or view holds (see [`Source::held`]).
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// Hits, misses, fetches (for a view: rounds of fetching a row's inputs), coalesced waits,
    /// evictions.
    pub stats: &'a OnDemandStats,
    /// Resident keys (absent keys included) and their weighed bytes, as of the last
    /// housekeeping.
    pub keys: u64,
    pub bytes: u64,
    pub max_bytes: u64,
}

/// What the writer can read of an input now, without waiting.
pub(crate) enum Resident {
    /// The value (`None` = the key is absent).
    Value(Option<bytes::Bytes>),
    /// An on_demand input that is not resident (or not pinned) yet.
    Missing,
}

impl Source {
    pub fn new(
        name: &str,
        kind: SourceKind,
        mode: Mode,
        clock: Clock,
        live_window: Duration,
    ) -> Self {
        Source {
            name: Arc::from(name),
            kind,
            mode,
            rows: ArcSwap::from_pointee(Keyspace::new()),
            epoch: ArcSwap::from_pointee(String::new()),
            version: AtomicU64::new(0),
            visible: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            failure: ArcSwapOption::empty(),
            last_error: ArcSwapOption::empty(),
            last_heard_ms: AtomicU64::new(0),
            upstream_lag: (AtomicU64::new(0), AtomicU64::new(0)),
            upstream_copied: AtomicU64::new(0),
            live_window_ms: u64::try_from(live_window.as_millis()).unwrap_or(u64::MAX),
            clock,
            changed: watch::channel(0).0,
            writes: AtomicU64::new(0),
            moves: AtomicU64::new(0),
            inputs: Vec::new(),
            on_demand: None,
            view_cache: None,
        }
    }

    /// An `on_demand` topic replica whose keys live in `keys`.
    pub fn with_on_demand(self, keys: Arc<OnDemand>) -> Self {
        Source {
            on_demand: Some(keys),
            ..self
        }
    }

    /// The resident keys of an `on_demand` topic; `None` for full replicas and views.
    pub fn on_demand(&self) -> Option<&Arc<OnDemand>> {
        self.on_demand.as_ref()
    }

    /// The resident rows of an `on_demand` view; `None` for other sources.
    pub fn view_cache(&self) -> Option<&Arc<ViewCache>> {
        self.view_cache.as_ref()
    }

    /// An `on_demand` view whose rows live in `rows`.
    pub(crate) fn with_view_cache(self, rows: Arc<ViewCache>) -> Self {
        Source {
            view_cache: Some(rows),
            mode: Mode::OnDemand,
            ..self
        }
    }

    /// True for on_demand topics and views: only the keys read lately are held, so Scan and
    /// Watch are not served from them.
    pub fn is_on_demand(&self) -> bool {
        self.on_demand.is_some() || self.view_cache.is_some()
    }

    /// For the writer: the value of `key` as far as it is held now. A full source always has
    /// the answer; an on_demand topic has it for pinned keys whose value is known, an
    /// on_demand view for resident rows.
    pub(crate) fn resident(&self, key: &str) -> Resident {
        if let Some(od) = &self.on_demand {
            return match od.pinned(key) {
                Some(slot) => Resident::Value(slot.value),
                None => Resident::Missing,
            };
        }
        if let Some(vc) = &self.view_cache {
            return match vc.resident(key) {
                Some(slot) => Resident::Value(slot.value),
                None => Resident::Missing,
            };
        }
        Resident::Value(self.get(key).map(|r| r.value))
    }

    /// Calls `f` with the row of `key` in this source's keyspace (`None` = absent), in place,
    /// under its shard's read lock: nothing is copied out.
    pub fn with_row<T>(&self, key: &str, f: impl FnOnce(Option<RowRef<'_>>) -> T) -> T {
        self.rows.load().with_opt(key, f)
    }

    /// For the writer: calls `f` with the value of `key` as far as it is held now (`None` =
    /// absent), in place where the source is full; `None` when an on_demand source does not
    /// hold it (see [`Source::resident`]).
    pub(crate) fn with_resident<T>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&[u8]>) -> T,
    ) -> Option<T> {
        if self.on_demand.is_some() || self.view_cache.is_some() {
            return match self.resident(key) {
                Resident::Value(v) => Some(f(v.as_deref())),
                Resident::Missing => None,
            };
        }
        Some(self.rows.load().with_opt(key, |r| f(r.map(|r| r.value))))
    }

    /// A view's source. It is as fresh and as connected as the least fresh of `inputs`.
    pub(crate) fn view(name: &str, inputs: Vec<Arc<Source>>, clock: Clock) -> Self {
        Source {
            inputs,
            ..Source::new(name, SourceKind::View, Mode::Full, clock, Duration::ZERO)
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// For a view: the names of the sources it reads directly (its `from` and includes).
    pub fn input_names(&self) -> Vec<Arc<str>> {
        self.inputs.iter().map(|s| s.name().clone()).collect()
    }

    pub fn kind(&self) -> &SourceKind {
        &self.kind
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn is_view(&self) -> bool {
        self.kind == SourceKind::View
    }

    /// The origin this source replicates, if it is a topic replica.
    pub fn origin(&self) -> Option<&str> {
        match &self.kind {
            SourceKind::Topic { origin } => Some(origin),
            SourceKind::View => None,
        }
    }

    /// A point read: lock-free, never waits.
    pub fn get(&self, key: &str) -> Option<Row> {
        self.rows.load().get(key)
    }

    /// The current keyspace; it stays whole even if a snapshot swaps in meanwhile.
    pub fn keyspace(&self) -> Arc<Keyspace> {
        self.rows.load_full()
    }

    /// Keys held (an `on_demand` topic or view: resident keys, absent ones included).
    pub fn len(&self) -> usize {
        match self.held() {
            Some(h) => usize::try_from(h.keys).unwrap_or(usize::MAX),
            None => self.rows.load().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (an `on_demand` topic or view: weighed bytes, per-key overhead included).
    pub fn bytes(&self) -> u64 {
        match self.held() {
            Some(h) => h.bytes,
            None => self.rows.load().bytes(),
        }
    }

    /// What an `on_demand` topic or view holds and how its reads went; `None` for full sources.
    pub fn held(&self) -> Option<Held<'_>> {
        if let Some(od) = &self.on_demand {
            return Some(Held {
                stats: od.stats(),
                keys: od.resident_keys(),
                bytes: od.resident_bytes(),
                max_bytes: od.max_bytes(),
            });
        }
        let rows = self.view_cache.as_ref()?;
        Some(Held {
            stats: rows.stats(),
            keys: rows.resident_keys(),
            bytes: rows.resident_bytes(),
            max_bytes: rows.max_bytes(),
        })
    }

    /// Runs the pending housekeeping (evictions) of an `on_demand` topic or view, so that what
    /// [`Source::held`] reports is settled. Nothing for full sources.
    pub async fn settle(&self) {
        if let Some(od) = &self.on_demand {
            od.sync().await;
        }
        if let Some(rows) = &self.view_cache {
            rows.sync();
        }
    }

    /// Reads `key` of an `on_demand` topic or view through its cache: a topic's miss is one
    /// Fetch, a view's miss computes the row once (fetching its missing inputs). `None` for
    /// full sources, which are read with [`Source::get`].
    pub async fn read_through(&self, key: &str) -> Option<Result<Slot, OnDemandError>> {
        if let Some(od) = &self.on_demand {
            return Some(od.get(key).await);
        }
        Some(self.view_cache.as_ref()?.get(key).await)
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> Arc<String> {
        self.epoch.load_full()
    }

    /// The epoch and the version applied in it, read together. `epoch()` and `version()` read
    /// apart can pair a new epoch with the previous epoch's version (a position that does not
    /// exist, after which that epoch's version seems to go back); this never does. Within one
    /// epoch, successive calls never return a smaller version.
    pub fn position(&self) -> (Arc<String>, u64) {
        loop {
            let seq = self.moves.load(Ordering::Acquire);
            if seq.is_multiple_of(2) {
                let epoch = self.epoch.load_full();
                let version = self.version.load(Ordering::Acquire);
                std::sync::atomic::fence(Ordering::Acquire);
                if self.moves.load(Ordering::Relaxed) == seq {
                    return (epoch, version);
                }
            }
            std::hint::spin_loop();
        }
    }

    /// True once the first snapshot (or, for a view, every input) has been applied. Once true it
    /// stays true: a later resnapshot swaps atomically, so readers always have whole data.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Why the origin refuses this topic now (`None` when it does not): for a view, the first
    /// failure among what it reads.
    pub fn failure(&self) -> Option<Arc<String>> {
        if !self.inputs.is_empty() {
            return self.inputs.iter().find_map(|s| s.failure());
        }
        self.failure.load_full()
    }

    pub(crate) fn set_failure(&self, reason: Option<String>) {
        self.failure.store(reason.map(Arc::new));
    }

    /// The cause of this source's feed's last failure (any source of one origin shares it);
    /// for a view, the first of its inputs'.
    pub fn last_error(&self) -> Option<Arc<String>> {
        if !self.inputs.is_empty() {
            return self.inputs.iter().find_map(|s| s.last_error());
        }
        self.last_error.load_full()
    }

    pub(crate) fn set_last_error(&self, cause: &str) {
        self.last_error.store(Some(Arc::new(cause.to_string())));
    }

    pub fn is_connected(&self) -> bool {
        if !self.inputs.is_empty() {
            return self.inputs.iter().all(|s| s.is_connected());
        }
        self.connected.load(Ordering::Relaxed)
    }

    /// 0 while the source is live (a view: while all it reads are live); otherwise ms since the
    /// origin last confirmed it current. Never-synced sources report ms since start.
    /// How far the origin's copy of this source trails the system it follows (a Postgres
    /// table's replication lag): (ms, bytes), as of the origin's last Progress.
    pub fn upstream_lag(&self) -> (u64, u64) {
        (
            self.upstream_lag.0.load(Ordering::Relaxed),
            self.upstream_lag.1.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_upstream_lag(&self, ms: u64, bytes: u64) {
        self.upstream_lag.0.store(ms, Ordering::Relaxed);
        self.upstream_lag.1.store(bytes, Ordering::Relaxed);
    }

    /// Rows read so far by the origin's copy of the system it follows that is not loaded yet
    /// (a Postgres table's initial copy), as of the origin's last Progress; 0 when none runs.
    pub fn upstream_copied_rows(&self) -> u64 {
        self.upstream_copied.load(Ordering::Relaxed)
    }

    pub(crate) fn set_upstream_copied(&self, rows: u64) {
        self.upstream_copied.store(rows, Ordering::Relaxed);
    }

    pub fn staleness_ms(&self) -> u64 {
        if !self.inputs.is_empty() {
            return self
                .inputs
                .iter()
                .map(|s| s.staleness_ms())
                .max()
                .unwrap_or(0);
        }
        let now = self.clock.now_ms();
        let heard = self.last_heard_ms.load(Ordering::Relaxed);
        let since = now.saturating_sub(heard);
        if self.is_connected() && since <= self.live_window_ms {
            0
        } else {
            since
        }
    }

    /// A receiver that changes whenever the source applies a version or syncs.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The batch sequence before a multi-key read: `None` while a batch is being applied.
    pub fn read_begin(&self) -> Option<u64> {
        let seq = self.writes.load(Ordering::Acquire);
        seq.is_multiple_of(2).then_some(seq)
    }

    /// True if no batch was applied since `read_begin` returned `seq`: what was read in
    /// between belongs to whole versions.
    pub fn read_settled(&self, seq: u64) -> bool {
        std::sync::atomic::fence(Ordering::Acquire);
        self.writes.load(Ordering::Relaxed) == seq
    }

    // ----- writer side -----

    /// Inserts or replaces `key`; returns the previous row's version.
    pub(crate) fn put(&self, key: &str, version: u64, value: &[u8]) -> Option<u64> {
        self.rows.load().put(key, version, value)
    }

    /// Brackets the application of one change batch (see `read_begin`).
    pub(crate) fn begin_batch(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
    }

    pub(crate) fn end_batch(&self) {
        self.writes.fetch_add(1, Ordering::Release);
    }

    /// Removes `key`; returns the removed row's version.
    pub(crate) fn remove(&self, key: &str) -> Option<u64> {
        self.rows.load().remove(key)
    }

    /// Replaces every row at once; returns the old keyspace.
    pub(crate) fn swap(&self, keyspace: Keyspace) -> Arc<Keyspace> {
        self.rows.swap(Arc::new(keyspace))
    }

    /// Moves the source to `version` of `epoch` and wakes waiters. A new epoch and its version
    /// are replaced under `moves`, so that `position` sees both or neither.
    pub(crate) fn set_position(&self, epoch: &str, version: u64) {
        if self.epoch.load().as_str() == epoch {
            self.set_version(version);
            return;
        }
        self.moves.fetch_add(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.epoch.store(Arc::new(epoch.to_string()));
        self.version.store(version, Ordering::Release);
        self.moves.fetch_add(1, Ordering::Release);
        self.changed.send_replace(version);
    }

    /// The version whose changes are visible everywhere: in this source and in every view
    /// derived from it. It trails [`Source::version`] while the writer is between applying a
    /// batch and deriving the views from it.
    pub fn visible_version(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// Marks the current version visible (the views are up to date with it) and wakes
    /// waiters.
    pub(crate) fn make_visible(&self) {
        let v = self.version();
        // Called for every view at every flush: a plain load when nothing moved, so the cache
        // line readers load `visible` from is not written (and taken from them) each time.
        if self.visible.load(Ordering::Acquire) == v {
            return;
        }
        if self.visible.swap(v, Ordering::AcqRel) != v {
            self.changed.send_replace(v);
        }
    }

    /// Advances the source version (never backwards within an epoch) and wakes waiters.
    pub(crate) fn set_version(&self, version: u64) {
        self.version.store(version, Ordering::Release);
        self.changed.send_replace(version);
    }

    pub(crate) fn mark_synced(&self) {
        if !self.synced.swap(true, Ordering::AcqRel) {
            self.changed.send_replace(self.version());
        }
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        if !connected && self.connected.load(Ordering::Relaxed) {
            // The data was current up to the moment the stream went away.
            self.heard();
        }
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub(crate) fn heard(&self) {
        self.last_heard_ms
            .store(self.clock.now_ms(), Ordering::Relaxed);
    }
}

/// Every source of a sidecar, by name. The set is fixed when the sidecar starts.
#[derive(Debug, Default)]
pub struct Store {
    sources: HashMap<Arc<str>, Arc<Source>>,
    order: Vec<Arc<Source>>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, source: Source) -> Arc<Source> {
        let s = Arc::new(source);
        self.sources.insert(s.name.clone(), s.clone());
        self.order.push(s.clone());
        s
    }

    pub fn source(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.get(name)
    }

    /// Sources in the order they were declared.
    pub fn sources(&self) -> &[Arc<Source>] {
        &self.order
    }

    /// [`Source::settle`] for every source: a status or a scrape reports settled figures.
    pub async fn settle(&self) {
        for s in &self.order {
            s.settle().await;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A new epoch starts at a lower version: a reader of `position` never pairs it with the
    /// previous epoch's version, so no epoch's version ever seems to go back.
    #[test]
    fn position_never_pairs_a_new_epoch_with_the_old_version() {
        let s = Arc::new(Source::new(
            "t",
            SourceKind::Topic { origin: "o".into() },
            Mode::Full,
            Clock::new(),
            Duration::from_secs(1),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut last = (Arc::new(String::new()), 0);
                while !stop.load(Ordering::Relaxed) {
                    let now = s.position();
                    assert!(now.0 != last.0 || now.1 >= last.1, "{now:?} after {last:?}");
                    last = now;
                }
            })
        };
        for e in 0..20_000u64 {
            let epoch = format!("e{e}");
            s.set_position(&epoch, 0);
            s.set_position(&epoch, 1_000);
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("the reader saw a version go back");
    }

    #[test]
    fn keyspace_tracks_bytes_and_order() {
        let ks = Keyspace::new();
        ks.put("b", 1, b"xx");
        ks.put("a", 1, b"y");
        ks.put("ab", 2, b"zzz");
        assert_eq!(ks.bytes(), 3 + 2 + 5);
        ks.put("a", 3, b"yyyy");
        assert_eq!(ks.bytes(), 3 + 5 + 5);
        let got: Vec<_> = ks.scan("a", None, 10).into_iter().map(|(k, _)| k).collect();
        assert_eq!(got, vec![Arc::from("a"), Arc::from("ab")]);
        let got: Vec<_> = ks
            .scan("a", Some("a"), 10)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, vec![Arc::from("ab")]);
        assert_eq!(ks.remove("ab"), Some(2));
        assert_eq!(ks.bytes(), 3 + 5);
        assert_eq!(ks.keys(), vec![Arc::from("a"), Arc::from("b")]);
    }

    #[test]
    fn staging_builds_the_index_once_and_keeps_later_rows() {
        let mut st = Staging::with_capacity(0);
        st.put(b"c", 1, b"1");
        st.put(b"a", 1, b"22");
        st.put(b"b", 1, b"333");
        st.put(b"a", 2, b"4444");
        assert_eq!(st.len(), 3);
        let ks = st.finish();
        assert_eq!(
            ks.keys(),
            vec![Arc::from("a"), Arc::from("b"), Arc::from("c")]
        );
        assert_eq!(ks.get("a").unwrap().version, 2);
        assert_eq!(ks.bytes(), (1 + 4) + (1 + 3) + (1 + 1));
        let got: Vec<_> = ks
            .scan("", Some("a"), 10)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, vec![Arc::from("b"), Arc::from("c")]);
        let mut seen = Vec::new();
        ks.for_each(|r| seen.push((r.key.to_string(), r.version)));
        assert_eq!(
            seen,
            vec![("a".into(), 2), ("b".into(), 1), ("c".into(), 1)]
        );
        // A staged keyspace is an ordinary one once finished.
        ks.put("d", 3, b"5");
        assert_eq!(ks.remove("b"), Some(1));
        assert_eq!(
            ks.keys(),
            vec![Arc::from("a"), Arc::from("c"), Arc::from("d")]
        );
    }

    /// A full source `t` with a live window of a minute, for unit tests here and in the hub.
    pub(crate) fn test_source() -> Source {
        Source::new(
            "t",
            SourceKind::View,
            Mode::Full,
            Clock::new(),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn staleness_is_zero_only_while_live() {
        let s = test_source();
        s.set_connected(true);
        s.heard();
        assert_eq!(s.staleness_ms(), 0);
        s.set_connected(false);
        // Disconnected: measured from the moment it was last heard, so it only grows.
        let a = s.staleness_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.staleness_ms() >= a + 5);
    }
}
