//! Subscriptions to sources, and the fan-out of applied changes to them (gRPC Watch and
//! WebSocket alike).
//!
//! Subscriptions are indexed by (source, key) and by (source, prefix), so a change costs one
//! lookup per prefix length of its key, not one per subscriber. Each change that anyone wants is
//! wrapped in one [`Change`] shared by every subscriber; its wire encoding (the WebSocket JSON
//! after the subscription id) is computed once, by whichever consumer needs it first, and then
//! shared too.
//!
//! Each consumer (a WebSocket connection, a Watch stream) owns one bounded, conflating queue:
//! a FIFO of (subscription, key) slots holding the latest change of each. A newer change of a
//! pending slot replaces it in place, so a slow reader gets the latest value per key rather than
//! every intermediate one. Past the bound the queue drops everything and is marked lagged; its
//! consumer then tells each subscription `reset` and sends the current rows again. The writer
//! never waits: a publish takes each target queue's mutex for a hash insert and never `.await`s,
//! so a slow consumer costs the writer nothing and fast consumers never wait for it.
//!
//! Invariants a consumer sees, per subscription: optional current rows, `Synced`, then changes;
//! per key in version order, never the same version twice (the version of every row sent is
//! remembered until a newer change of that key passes, so changes that race the read of the
//! current rows are dropped).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::store::{Event, Source};

/// Identifies one subscription within the hub.
pub type SubId = u64;

/// Most slots moved out of a queue per lock.
const DRAIN_BATCH: usize = 256;

/// One applied change, shared by every subscriber that wants it.
#[derive(Debug)]
pub struct Change {
    pub source: Arc<str>,
    pub key: Arc<str>,
    pub version: u64,
    /// `None` = deleted.
    pub value: Option<Bytes>,
    encoded: OnceLock<Box<str>>,
}

impl Change {
    pub(crate) fn new(source: Arc<str>, key: Arc<str>, version: u64, value: Option<Bytes>) -> Self {
        Change {
            source,
            key,
            version,
            value,
            encoded: OnceLock::new(),
        }
    }

    /// The change's encoding by `encode`, computed on first use and shared afterwards. Every
    /// caller must pass the same function (there is one wire encoding per change).
    pub(crate) fn encoded(&self, encode: fn(&Change) -> String) -> &str {
        self.encoded.get_or_init(|| encode(self).into_boxed_str())
    }
}

/// What a subscriber watches in one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Keys(Vec<String>),
    /// `""` = every key.
    Prefix(String),
}

impl Selection {
    /// Keys deduplicated (a key named twice is watched once).
    fn normalized(self) -> Selection {
        match self {
            Selection::Keys(keys) => {
                let mut uniq = HashSet::new();
                Selection::Keys(
                    keys.into_iter()
                        .filter(|k| uniq.insert(k.clone()))
                        .collect(),
                )
            }
            p => p,
        }
    }
}

/// Counters of the hub.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Queues that overflowed their bound and were reset (resent current rows).
    pub lagged: AtomicU64,
    /// Changes queued to consumers.
    pub delivered: AtomicU64,
    /// Queued changes replaced in place by a newer change of the same key.
    pub conflated: AtomicU64,
    /// Consumers closed because they kept falling behind.
    pub too_slow: AtomicU64,
}

/// A snapshot of one consumer's queue, for tests, metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// What the consumer is: "ws 127.0.0.1:53412", "watch".
    pub label: String,
    /// Slots pending now.
    pub queued: usize,
    /// The most slots ever pending at once.
    pub high_water: usize,
    pub bound: usize,
    /// Changes replaced in place by a newer change of the same key.
    pub conflated: u64,
    /// Times the queue overflowed and its subscriptions were reset.
    pub resets: u64,
}

type PendingKey = (SubId, Arc<str>);

#[derive(Default)]
struct QueueState {
    order: VecDeque<PendingKey>,
    latest: HashMap<PendingKey, Arc<Change>>,
    /// Overflowed: nothing is queued until the consumer has re-read the current rows.
    lagged: bool,
    /// Subscriptions whose source started over (origin epoch changed), with the reason.
    restarts: Vec<(SubId, Arc<str>)>,
    high_water: usize,
    conflated: u64,
    resets: u64,
}

/// The producer side of one consumer's queue, as the hub's index holds it.
struct QueueShared {
    label: String,
    bound: usize,
    state: Mutex<QueueState>,
    wake: Notify,
}

impl QueueShared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A poisoned lock means a panic while holding it; every mutation leaves the state
        // consistent (single inserts/removes), so keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
struct Target {
    sub: SubId,
    queue: Arc<QueueShared>,
}

#[derive(Default)]
struct SourceSubs {
    keys: HashMap<Arc<str>, Vec<Target>>,
    prefixes: HashMap<Arc<str>, Vec<Target>>,
    count: usize,
}

/// The subscription registry and dispatcher.
#[derive(Default)]
pub struct Hub {
    index: RwLock<HashMap<Arc<str>, SourceSubs>>,
    queues: Mutex<HashMap<u64, Arc<QueueShared>>>,
    next_id: AtomicU64,
    stats: HubStats,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// Current number of subscriptions.
    pub fn subscriptions(&self) -> usize {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.values().map(|s| s.count).sum()
    }

    /// The queue of every live consumer.
    pub fn queues(&self) -> Vec<QueueInfo> {
        let queues: Vec<Arc<QueueShared>> = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        queues
            .iter()
            .map(|q| {
                let st = q.lock();
                QueueInfo {
                    label: q.label.clone(),
                    queued: st.order.len(),
                    high_water: st.high_water,
                    bound: q.bound,
                    conflated: st.conflated,
                    resets: st.resets,
                }
            })
            .collect()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn register(&self, sub: SubId, source: &Arc<str>, sel: &Selection, queue: &Arc<QueueShared>) {
        let target = Target {
            sub,
            queue: queue.clone(),
        };
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let subs = index.entry(source.clone()).or_default();
        match sel {
            Selection::Keys(keys) => {
                for k in keys {
                    subs.keys
                        .entry(Arc::from(k.as_str()))
                        .or_default()
                        .push(target.clone());
                }
            }
            Selection::Prefix(p) => subs
                .prefixes
                .entry(Arc::from(p.as_str()))
                .or_default()
                .push(target),
        }
        subs.count += 1;
    }

    fn unregister(&self, sub: SubId, source: &Arc<str>, sel: &Selection) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = index.get_mut(source) else {
            return;
        };
        fn drop_sub(map: &mut HashMap<Arc<str>, Vec<Target>>, k: &str, sub: SubId) {
            if let Some(v) = map.get_mut(k) {
                v.retain(|t| t.sub != sub);
                if v.is_empty() {
                    map.remove(k);
                }
            }
        }
        match sel {
            Selection::Keys(keys) => {
                for k in keys {
                    drop_sub(&mut subs.keys, k, sub);
                }
            }
            Selection::Prefix(p) => drop_sub(&mut subs.prefixes, p, sub),
        }
        subs.count = subs.count.saturating_sub(1);
        if subs.count == 0 {
            index.remove(source);
        }
    }

    /// Hands applied changes to the subscribers that want them. Never waits.
    pub fn publish(&self, events: &[Event]) {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        if index.is_empty() {
            return;
        }
        let mut targets: Vec<&Target> = Vec::new();
        for ev in events {
            let Some(subs) = index.get(&ev.source) else {
                continue;
            };
            targets.clear();
            if let Some(ts) = subs.keys.get(&ev.key) {
                targets.extend(ts);
            }
            if !subs.prefixes.is_empty() {
                let key: &str = &ev.key;
                for end in key.char_indices().map(|(i, _)| i).chain([key.len()]) {
                    if let Some(ts) = subs.prefixes.get(&key[..end]) {
                        targets.extend(ts);
                    }
                }
            }
            if targets.is_empty() {
                continue;
            }
            let change = Arc::new(Change::new(
                ev.source.clone(),
                ev.key.clone(),
                ev.version,
                ev.value.clone(),
            ));
            for t in &targets {
                self.offer(t, &change);
            }
        }
    }

    fn offer(&self, t: &Target, change: &Arc<Change>) {
        let q = &t.queue;
        let mut st = q.lock();
        if st.lagged {
            return;
        }
        let slot: PendingKey = (t.sub, change.key.clone());
        if let Some(old) = st.latest.get_mut(&slot) {
            *old = change.clone();
            st.conflated += 1;
            drop(st);
            self.stats.conflated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if st.order.len() >= q.bound {
            st.order = VecDeque::new();
            st.latest = HashMap::new();
            st.lagged = true;
            st.resets += 1;
            let first = st.resets == 1;
            drop(st);
            self.stats.lagged.fetch_add(1, Ordering::Relaxed);
            if first {
                warn!(consumer = %q.label, bound = q.bound, "subscriber fell behind its queue bound; resetting it (logged once per subscriber)");
            } else {
                debug!(consumer = %q.label, "subscriber fell behind again");
            }
            q.wake.notify_one();
            return;
        }
        let was_empty = st.order.is_empty();
        st.order.push_back(slot.clone());
        st.latest.insert(slot, change.clone());
        st.high_water = st.high_water.max(st.order.len());
        drop(st);
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        if was_empty {
            q.wake.notify_one();
        }
    }

    /// Tells every subscriber of `source` to start over from the current rows.
    pub fn reset_source(&self, source: &str, reason: &str) {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = index.get(source) else {
            return;
        };
        let reason: Arc<str> = Arc::from(reason);
        for t in subs.keys.values().chain(subs.prefixes.values()).flatten() {
            let mut st = t.queue.lock();
            if !st.restarts.iter().any(|(s, _)| *s == t.sub) {
                st.restarts.push((t.sub, reason.clone()));
            }
            drop(st);
            t.queue.wake.notify_one();
        }
    }
}

/// How many overflow resets a consumer may take before it is given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetLimit {
    /// More than this many resets ...
    pub max: u32,
    /// ... within this long: [`Delivery::TooSlow`].
    pub window: Duration,
}

/// What a consumer is told, in order.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A current row, sent after a subscribe (if asked) or a reset.
    Row { sub: SubId, change: Arc<Change> },
    /// A change applied since; `change.value == None` = deleted.
    Change { sub: SubId, change: Arc<Change> },
    /// The current rows of `sub` (if asked) have all been sent; the source's version.
    Synced { sub: SubId, version: u64 },
    /// Start over: what was sent may be out of date; rows (if asked) and `Synced` follow.
    Reset { sub: SubId, reason: Arc<str> },
    /// The consumer kept overflowing its queue beyond its [`ResetLimit`]; it should close.
    TooSlow,
}

struct SubState {
    source: Arc<Source>,
    selection: Selection,
    initial: bool,
    started: bool,
    /// Per key, the version of the row last sent from a read of the current rows; a queued
    /// change at or below it is already known to the subscriber.
    seen: HashMap<Arc<str>, u64>,
}

/// One consumer of the hub: its subscriptions and its bounded, conflating queue. Dropping it
/// unregisters everything.
pub struct Subscriber {
    hub: Arc<Hub>,
    id: u64,
    queue: Arc<QueueShared>,
    subs: HashMap<SubId, SubState>,
    pending: VecDeque<Delivery>,
    limit: Option<ResetLimit>,
    reset_times: VecDeque<Instant>,
    drained: Vec<(PendingKey, Arc<Change>)>,
}

impl Subscriber {
    /// A consumer with room for `bound` pending keys; `limit`, if any, gives it up when it
    /// keeps overflowing.
    pub fn new(
        hub: &Arc<Hub>,
        label: impl Into<String>,
        bound: usize,
        limit: Option<ResetLimit>,
    ) -> Self {
        let id = hub.next_id();
        let queue = Arc::new(QueueShared {
            label: label.into(),
            bound: bound.max(1),
            state: Mutex::new(QueueState::default()),
            wake: Notify::new(),
        });
        hub.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, queue.clone());
        Subscriber {
            hub: hub.clone(),
            id,
            queue,
            subs: HashMap::new(),
            pending: VecDeque::new(),
            limit,
            reset_times: VecDeque::new(),
            drained: Vec::new(),
        }
    }

    /// Number of open subscriptions.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Starts watching `selection` of `source`. Changes applied from now on are queued; the
    /// current rows (if `initial`) and `Synced` come first, once the source has synced.
    pub fn subscribe(&mut self, source: Arc<Source>, selection: Selection, initial: bool) -> SubId {
        let sub = self.hub.next_id();
        let selection = selection.normalized();
        self.hub
            .register(sub, source.name(), &selection, &self.queue);
        self.subs.insert(
            sub,
            SubState {
                source,
                selection,
                initial,
                started: false,
                seen: HashMap::new(),
            },
        );
        sub
    }

    /// Stops watching; nothing more is delivered for `sub`.
    pub fn unsubscribe(&mut self, sub: SubId) -> bool {
        let Some(state) = self.subs.remove(&sub) else {
            return false;
        };
        self.hub
            .unregister(sub, state.source.name(), &state.selection);
        {
            let mut st = self.queue.lock();
            let QueueState { order, latest, .. } = &mut *st;
            order.retain(|slot| {
                let keep = slot.0 != sub;
                if !keep {
                    latest.remove(slot);
                }
                keep
            });
            st.restarts.retain(|(s, _)| *s != sub);
        }
        self.pending.retain(|d| match d {
            Delivery::Row { sub: s, .. }
            | Delivery::Change { sub: s, .. }
            | Delivery::Synced { sub: s, .. }
            | Delivery::Reset { sub: s, .. } => *s != sub,
            Delivery::TooSlow => true,
        });
        true
    }

    /// Slots pending in the queue now.
    pub fn queued(&self) -> usize {
        self.queue.lock().order.len()
    }

    /// The next delivery, waiting for one. Cancel-safe: nothing is lost if the future is
    /// dropped. Pending forever while there are no subscriptions.
    pub async fn next(&mut self) -> Delivery {
        loop {
            if let Some(d) = self.try_next() {
                return d;
            }
            let unsynced: Vec<Arc<Source>> = self
                .subs
                .values()
                .filter(|s| !s.started)
                .map(|s| s.source.clone())
                .collect();
            if unsynced.is_empty() {
                self.queue.wake.notified().await;
            } else {
                let mut rxs: Vec<_> = unsynced.iter().map(|s| s.subscribe_changes()).collect();
                if unsynced.iter().any(|s| s.is_synced()) {
                    continue;
                }
                let changed = futures_util::future::select_all(
                    rxs.iter_mut().map(|rx| Box::pin(rx.changed())),
                );
                tokio::select! {
                    _ = self.queue.wake.notified() => {}
                    _ = changed => {}
                }
            }
        }
    }

    /// The next delivery if one is ready now.
    pub fn try_next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Some(d);
            }
            if !self.start_ready() && !self.fill() {
                return None;
            }
        }
    }

    /// Sends the current rows and `Synced` of subscriptions whose source has synced.
    fn start_ready(&mut self) -> bool {
        let ready: Vec<SubId> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.started && s.source.is_synced())
            .map(|(id, _)| *id)
            .collect();
        for sub in &ready {
            self.load_current(*sub);
        }
        !ready.is_empty()
    }

    /// Reads the current rows of `sub` (if it asked for them) into `pending`, then `Synced`.
    fn load_current(&mut self, sub: SubId) {
        let Some(state) = self.subs.get_mut(&sub) else {
            return;
        };
        state.started = true;
        state.seen.clear();
        if state.initial {
            let name = state.source.name().clone();
            let rows = match &state.selection {
                Selection::Keys(keys) => keys
                    .iter()
                    .filter_map(|k| state.source.get(k).map(|r| (Arc::from(k.as_str()), r)))
                    .collect(),
                Selection::Prefix(p) => state.source.keyspace().scan(p, None, usize::MAX),
            };
            for (key, row) in rows {
                state.seen.insert(key.clone(), row.version);
                self.pending.push_back(Delivery::Row {
                    sub,
                    change: Arc::new(Change::new(name.clone(), key, row.version, Some(row.value))),
                });
            }
        }
        self.pending.push_back(Delivery::Synced {
            sub,
            version: state.source.version(),
        });
    }

    /// Moves what the queue holds into `pending`: a reset after an overflow or a restarted
    /// source, otherwise a batch of changes. False if there was nothing.
    fn fill(&mut self) -> bool {
        let mut st = self.queue.lock();
        if st.lagged {
            st.lagged = false;
            drop(st);
            if self.too_many_resets() {
                self.hub.stats.too_slow.fetch_add(1, Ordering::Relaxed);
                self.pending.push_back(Delivery::TooSlow);
                return true;
            }
            let reason: Arc<str> = Arc::from("subscriber fell behind; current rows follow");
            let subs: Vec<SubId> = self.subs.keys().copied().collect();
            for sub in subs {
                self.restart(sub, reason.clone());
            }
            return true;
        }
        if !st.restarts.is_empty() {
            let restarts = std::mem::take(&mut st.restarts);
            {
                let QueueState { order, latest, .. } = &mut *st;
                order.retain(|slot| {
                    let keep = !restarts.iter().any(|(s, _)| *s == slot.0);
                    if !keep {
                        latest.remove(slot);
                    }
                    keep
                });
            }
            drop(st);
            for (sub, reason) in restarts {
                self.restart(sub, reason);
            }
            return true;
        }
        if st.order.is_empty() {
            return false;
        }
        let n = st.order.len().min(DRAIN_BATCH);
        self.drained.clear();
        for _ in 0..n {
            let Some(slot) = st.order.pop_front() else {
                break;
            };
            if let Some(change) = st.latest.remove(&slot) {
                self.drained.push((slot, change));
            }
        }
        drop(st);
        for ((sub, _), change) in self.drained.drain(..) {
            let Some(state) = self.subs.get_mut(&sub) else {
                continue;
            };
            if !state.started {
                // The source is still syncing: its current rows, read once it has, cover this.
                continue;
            }
            if let Some(&v) = state.seen.get(&change.key) {
                if change.version <= v {
                    continue;
                }
                state.seen.remove(&change.key);
            }
            self.pending.push_back(Delivery::Change { sub, change });
        }
        true
    }

    fn restart(&mut self, sub: SubId, reason: Arc<str>) {
        let Some(state) = self.subs.get(&sub) else {
            return;
        };
        if !state.started {
            return;
        }
        self.pending.retain(|d| match d {
            Delivery::Row { sub: s, .. }
            | Delivery::Change { sub: s, .. }
            | Delivery::Synced { sub: s, .. } => *s != sub,
            _ => true,
        });
        self.pending.push_back(Delivery::Reset { sub, reason });
        self.load_current(sub);
    }

    fn too_many_resets(&mut self) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        let now = Instant::now();
        self.reset_times.push_back(now);
        while self
            .reset_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > limit.window)
        {
            self.reset_times.pop_front();
        }
        self.reset_times.len() > limit.max as usize
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        for (sub, state) in self.subs.drain() {
            self.hub
                .unregister(sub, state.source.name(), &state.selection);
        }
        self.hub
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// What a watcher is told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Row {
        key: Arc<str>,
        version: u64,
        value: Bytes,
    },
    Deleted {
        key: Arc<str>,
        version: u64,
    },
    /// The current rows (if asked for) have all been sent; the source's version.
    Synced(u64),
    /// Start over: what was sent before may be out of date; rows (if asked) and Synced follow.
    Reset(Arc<str>),
}

/// One watch of one source (gRPC Watch): current rows (optionally), `Synced`, then every change,
/// per key in version order and without duplicates. A watcher that falls behind gets the latest
/// value per key; past its queue bound, `Reset` and the current rows again.
pub struct Watcher {
    subscriber: Subscriber,
}

impl Watcher {
    /// Registers the watch. Changes applied from now on are queued (up to `queue` keys).
    pub fn new(
        hub: &Arc<Hub>,
        source: Arc<Source>,
        selection: Selection,
        initial: bool,
        queue: usize,
    ) -> Self {
        let mut subscriber = Subscriber::new(hub, "watch", queue, None);
        subscriber.subscribe(source, selection, initial);
        Watcher { subscriber }
    }

    /// The next update. Cancel-safe.
    pub async fn next(&mut self) -> Option<Update> {
        Some(match self.subscriber.next().await {
            Delivery::Row { change, .. } | Delivery::Change { change, .. } => match &change.value {
                Some(value) => Update::Row {
                    key: change.key.clone(),
                    version: change.version,
                    value: value.clone(),
                },
                None => Update::Deleted {
                    key: change.key.clone(),
                    version: change.version,
                },
            },
            Delivery::Synced { version, .. } => Update::Synced(version),
            Delivery::Reset { reason, .. } => Update::Reset(reason),
            // A watcher has no reset limit.
            Delivery::TooSlow => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Clock, Row, SourceKind};
    use crate::types::Mode;

    fn source() -> Arc<Source> {
        let s = crate::store::tests::test_source();
        s.mark_synced();
        Arc::new(s)
    }

    /// Applies `key = value` at `version` to the source and publishes it.
    fn apply(hub: &Hub, src: &Source, key: &str, version: u64, value: &str) {
        let value = Bytes::from(value.to_string());
        src.put(
            Arc::from(key),
            Row {
                value: value.clone(),
                version,
            },
        );
        src.set_version(version);
        hub.publish(&[Event {
            source: src.name().clone(),
            key: Arc::from(key),
            version,
            value: Some(value),
        }]);
    }

    fn drain(s: &mut Subscriber) -> Vec<String> {
        std::iter::from_fn(|| s.try_next())
            .map(|d| match d {
                Delivery::Row { change, .. } => format!("row {}@{}", change.key, change.version),
                Delivery::Change { change, .. } => {
                    format!("change {}@{}", change.key, change.version)
                }
                Delivery::Synced { version, .. } => format!("synced {version}"),
                Delivery::Reset { .. } => "reset".to_string(),
                Delivery::TooSlow => "too slow".to_string(),
            })
            .collect()
    }

    #[test]
    fn a_pending_key_keeps_only_its_latest_change() {
        let hub = Arc::new(Hub::new());
        let src = source();
        let mut s = Subscriber::new(&hub, "t", 8, None);
        s.subscribe(src.clone(), Selection::Prefix(String::new()), false);
        assert_eq!(drain(&mut s), ["synced 0"]);
        apply(&hub, &src, "a", 1, "1");
        apply(&hub, &src, "b", 2, "2");
        apply(&hub, &src, "a", 3, "3");
        assert_eq!(s.queued(), 2);
        assert_eq!(drain(&mut s), ["change a@3", "change b@2"]);
        assert_eq!(hub.stats().conflated.load(Ordering::Relaxed), 1);
        assert_eq!(hub.queues()[0].conflated, 1);
    }

    #[test]
    fn past_its_bound_a_queue_is_reset_and_resent_the_current_rows() {
        let hub = Arc::new(Hub::new());
        let src = source();
        let mut s = Subscriber::new(&hub, "t", 2, None);
        s.subscribe(
            src.clone(),
            Selection::Keys(vec!["a".into(), "b".into(), "c".into()]),
            true,
        );
        assert_eq!(drain(&mut s), ["synced 0"]);
        apply(&hub, &src, "a", 1, "1");
        apply(&hub, &src, "b", 2, "2");
        apply(&hub, &src, "c", 3, "3");
        let info = &hub.queues()[0];
        assert!(info.high_water <= 2 && info.resets == 1, "{info:?}");
        assert_eq!(
            drain(&mut s),
            ["reset", "row a@1", "row b@2", "row c@3", "synced 3"]
        );
        // A change racing the re-read is not told twice.
        hub.publish(&[Event {
            source: src.name().clone(),
            key: Arc::from("c"),
            version: 3,
            value: Some(Bytes::from_static(b"3")),
        }]);
        apply(&hub, &src, "a", 4, "4");
        assert_eq!(drain(&mut s), ["change a@4"]);
    }

    #[test]
    fn a_consumer_reset_too_often_is_given_up() {
        let hub = Arc::new(Hub::new());
        let src = source();
        let limit = ResetLimit {
            max: 2,
            window: Duration::from_secs(60),
        };
        let mut s = Subscriber::new(&hub, "t", 1, Some(limit));
        s.subscribe(src.clone(), Selection::Prefix(String::new()), false);
        drain(&mut s);
        let mut v = 0;
        let mut overflow = |s: &mut Subscriber| {
            v += 2;
            apply(&hub, &src, "a", v - 1, "x");
            apply(&hub, &src, "b", v, "y");
            drain(s)
        };
        assert_eq!(overflow(&mut s), ["reset", "synced 2"]);
        assert_eq!(overflow(&mut s), ["reset", "synced 4"]);
        assert_eq!(overflow(&mut s), ["too slow"]);
        assert_eq!(hub.stats().too_slow.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn dropping_a_subscriber_unregisters_it() {
        let hub = Arc::new(Hub::new());
        let src = source();
        let mut s = Subscriber::new(&hub, "t", 4, None);
        let a = s.subscribe(src.clone(), Selection::Keys(vec!["a".into()]), false);
        s.subscribe(src.clone(), Selection::Prefix("b".into()), false);
        assert_eq!(hub.subscriptions(), 2);
        apply(&hub, &src, "a", 1, "1");
        assert!(s.unsubscribe(a));
        assert_eq!(s.queued(), 0);
        assert_eq!(hub.subscriptions(), 1);
        drop(s);
        assert_eq!(hub.subscriptions(), 0);
        assert!(hub.queues().is_empty());
    }

    #[tokio::test]
    async fn a_subscription_waits_for_its_source_to_sync() {
        let hub = Arc::new(Hub::new());
        let src = Arc::new(Source::new(
            "t",
            SourceKind::View,
            Mode::Full,
            Clock::new(),
            Duration::from_secs(60),
        ));
        let mut w = Watcher::new(&hub, src.clone(), Selection::Prefix(String::new()), true, 4);
        let waiting = tokio::spawn(async move { w.next().await });
        tokio::task::yield_now().await;
        src.put(
            Arc::from("a"),
            Row {
                value: Bytes::from_static(b"1"),
                version: 5,
            },
        );
        src.set_version(5);
        src.mark_synced();
        let first = waiting.await.expect("task");
        assert_eq!(
            first,
            Some(Update::Row {
                key: Arc::from("a"),
                version: 5,
                value: Bytes::from_static(b"1")
            })
        );
    }
}
