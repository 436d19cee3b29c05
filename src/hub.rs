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
//! per key in version order, never the same version twice.
//!
//! The current rows are not copied up front: a cursor walks the keyspace (or the watched keys)
//! one page at a time as the consumer drains, so a subscriber to a million-key source holds a
//! page, not the source. Each page is read under the hub's gate (see [`Hub::write_gate`]), after
//! moving everything already queued out of the queue: a row read is then either in what was
//! moved (and that change is dropped, the row covers it) or changed after the read (and its
//! change is newer). While the cursor walks, a change of a key the cursor has not reached yet is
//! dropped (its page will read it); one of a key already sent is delivered.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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

/// Current rows read per page of a subscription's cursor.
const PAGE_ROWS: usize = 256;

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
    /// Consumers (WebSocket, Watch) closed because a send to them waited past its deadline.
    pub send_timeouts: AtomicU64,
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
    /// SipHash (std's): for an on_demand topic the origin sends changes of the keys readers
    /// asked for, so readers have a say in these keys, and offers run on the writer.
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
    /// The lengths of the prefixes watched, each with how many prefixes have it: a change is
    /// looked up under these lengths only, not under every prefix of its key.
    prefix_lens: BTreeMap<usize, usize>,
    count: usize,
}

/// The subscription registry and dispatcher.
#[derive(Default)]
pub struct Hub {
    /// Held for writing from a change applied to a keyspace until it is queued; for reading
    /// while a cursor reads a page of current rows.
    gate: RwLock<()>,
    /// Wakes cursors that found the gate held.
    gate_open: Notify,
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

    /// Held by the writer from the first change of a batch applied to a keyspace until
    /// [`Hub::publish`] has queued the batch: a page of current rows is never read in between,
    /// so what a page reads has either been queued already or changes after the read.
    pub fn write_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Called after a [`Hub::write_gate`] guard is dropped: cursors waiting for it read on.
    pub fn gate_opened(&self) {
        self.gate_open.notify_waiters();
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
            Selection::Prefix(p) => {
                let targets = subs.prefixes.entry(Arc::from(p.as_str())).or_default();
                if targets.is_empty() {
                    *subs.prefix_lens.entry(p.len()).or_default() += 1;
                }
                targets.push(target);
            }
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
            Selection::Prefix(p) => {
                let had = subs.prefixes.contains_key(p.as_str());
                drop_sub(&mut subs.prefixes, p, sub);
                if had && !subs.prefixes.contains_key(p.as_str()) {
                    if let Some(n) = subs.prefix_lens.get_mut(&p.len()) {
                        *n -= 1;
                        if *n == 0 {
                            subs.prefix_lens.remove(&p.len());
                        }
                    }
                }
            }
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
            let key: &str = &ev.key;
            for &len in subs.prefix_lens.range(..=key.len()).map(|(len, _)| len) {
                if let Some(ts) = key.get(..len).and_then(|p| subs.prefixes.get(p)) {
                    targets.extend(ts);
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
        enum Offered {
            Conflated,
            Queued { was_empty: bool },
            Overflow,
        }
        let offered = {
            let QueueState { order, latest, .. } = &mut *st;
            let full = order.len() >= q.bound;
            match latest.entry(slot) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    *e.get_mut() = change.clone();
                    Offered::Conflated
                }
                std::collections::hash_map::Entry::Vacant(e) if !full => {
                    let was_empty = order.is_empty();
                    order.push_back(e.key().clone());
                    e.insert(change.clone());
                    Offered::Queued { was_empty }
                }
                std::collections::hash_map::Entry::Vacant(_) => Offered::Overflow,
            }
        };
        let was_empty = match offered {
            Offered::Queued { was_empty } => was_empty,
            Offered::Conflated => {
                st.conflated += 1;
                drop(st);
                self.stats.conflated.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Offered::Overflow => {
                st.order = VecDeque::new();
                st.latest = HashMap::default();
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
        };
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
    /// Walking the current rows; `None` once `Synced` has been sent (or without `initial`).
    cursor: Option<Cursor>,
    /// Without `initial`: the version its `Synced` carries, read when it subscribed (or, if
    /// its source had not synced yet, when it did). A change at or below it is covered by it:
    /// the writer moves a source's version before it publishes the batch's changes, so such a
    /// change can still reach the queue after the subscription was registered.
    from: Option<u64>,
}

/// Where a subscription's walk over its current rows stands.
struct Cursor {
    /// The last key sent (`None`: none yet); for a prefix, keys are walked in order.
    last: Option<Arc<str>>,
    /// For a key list: the position of each watched key, and how many have been read.
    positions: Option<HashMap<Arc<str>, usize>>,
    read: usize,
}

impl Cursor {
    fn new(selection: &Selection) -> Self {
        let positions = match selection {
            Selection::Keys(keys) => Some(
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| (Arc::from(k.as_str()), i))
                    .collect(),
            ),
            Selection::Prefix(_) => None,
        };
        Cursor {
            last: None,
            positions,
            read: 0,
        }
    }

    /// Whether the row of `key` has been sent already (a change of it is news), as opposed
    /// to one a later page will read.
    fn passed(&self, key: &str) -> bool {
        match &self.positions {
            Some(pos) => pos.get(key).is_some_and(|&i| i < self.read),
            None => self.last.as_deref().is_some_and(|l| key <= l),
        }
    }
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
    /// A cursor's page was not read because the writer held the gate.
    gate_busy: bool,
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
            gate_busy: false,
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
        // Read after registering: every change above it is published after this point, so it
        // reaches the queue (a client told it is subscribed gets every later change).
        let from = (!initial && source.is_synced()).then(|| source.version());
        self.subs.insert(
            sub,
            SubState {
                source,
                selection,
                initial,
                started: false,
                cursor: None,
                from,
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
            if self.gate_busy {
                // The writer is between applying a batch and queueing it: read the page once it
                // has (registered before trying again, so the wake-up cannot be missed).
                let hub = self.hub.clone();
                let opened = hub.gate_open.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if let Some(d) = self.try_next() {
                    return d;
                }
                if self.gate_busy {
                    opened.await;
                }
                continue;
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
            if !self.start_ready() && !self.fill() && !self.read_page() {
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

    /// Starts sending the current rows of `sub` (if it asked for them; a page at a time, see
    /// [`Subscriber::read_page`]), then `Synced`.
    fn load_current(&mut self, sub: SubId) {
        let Some(state) = self.subs.get_mut(&sub) else {
            return;
        };
        state.started = true;
        if state.initial {
            state.cursor = Some(Cursor::new(&state.selection));
        } else {
            state.cursor = None;
            let version = *state.from.get_or_insert_with(|| state.source.version());
            self.pending.push_back(Delivery::Synced { sub, version });
        }
    }

    /// Reads the next page of current rows of one subscription whose cursor is walking, into
    /// `pending` (with `Synced` after the last page). Under the hub's gate, everything queued
    /// is moved out first and judged against the cursor as it was before this page, so a
    /// change the page's read already covers is dropped. False if no cursor is walking.
    fn read_page(&mut self) -> bool {
        self.gate_busy = false;
        let Some((&sub, _)) = self.subs.iter().find(|(_, s)| s.cursor.is_some()) else {
            return false;
        };
        let hub = self.hub.clone();
        let gate = match hub.gate.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                // Never block a runtime thread on the writer's batch: `next` waits for it.
                self.gate_busy = true;
                return false;
            }
        };
        self.take_queued(usize::MAX);
        let Some(state) = self.subs.get_mut(&sub) else {
            return false;
        };
        let Some(cursor) = state.cursor.as_mut() else {
            return false;
        };
        let rows: Vec<(Arc<str>, crate::store::Row)>;
        let done;
        match &state.selection {
            Selection::Keys(keys) => {
                let end = (cursor.read + PAGE_ROWS).min(keys.len());
                rows = keys[cursor.read..end]
                    .iter()
                    .filter_map(|k| state.source.get(k).map(|r| (Arc::from(k.as_str()), r)))
                    .collect();
                done = end == keys.len();
            }
            Selection::Prefix(p) => {
                rows = state
                    .source
                    .keyspace()
                    .scan(p, cursor.last.as_deref(), PAGE_ROWS);
                done = rows.len() < PAGE_ROWS;
            }
        }
        let version = state.source.version();
        drop(gate);
        // What was queued before this page: news only for keys an earlier page sent.
        self.deliver_taken();
        let Some(state) = self.subs.get_mut(&sub) else {
            return true;
        };
        let Some(cursor) = state.cursor.as_mut() else {
            return true;
        };
        let name = state.source.name().clone();
        if let Selection::Keys(keys) = &state.selection {
            cursor.read = (cursor.read + PAGE_ROWS).min(keys.len());
        }
        if let Some((key, _)) = rows.last() {
            cursor.last = Some(key.clone());
        }
        for (key, row) in rows {
            self.pending.push_back(Delivery::Row {
                sub,
                change: Arc::new(Change::new(name.clone(), key, row.version, Some(row.value))),
            });
        }
        if done {
            state.cursor = None;
            self.pending.push_back(Delivery::Synced { sub, version });
        }
        true
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
        drop(st);
        self.take_queued(DRAIN_BATCH);
        self.deliver_taken();
        true
    }

    /// Moves up to `most` queued changes into `drained`.
    fn take_queued(&mut self, most: usize) {
        let mut st = self.queue.lock();
        let n = st.order.len().min(most);
        for _ in 0..n {
            let Some(slot) = st.order.pop_front() else {
                break;
            };
            if let Some(change) = st.latest.remove(&slot) {
                self.drained.push((slot, change));
            }
        }
    }

    /// Turns the changes in `drained` into deliveries, dropping those the current rows cover.
    fn deliver_taken(&mut self) {
        for ((sub, _), change) in self.drained.drain(..) {
            let Some(state) = self.subs.get(&sub) else {
                continue;
            };
            if !state.started {
                // The source is still syncing: its current rows, read once it has, cover this.
                continue;
            }
            if let Some(cursor) = &state.cursor {
                if !cursor.passed(&change.key) {
                    // A page still to be read covers this key.
                    continue;
                }
            } else if state.from.is_some_and(|v| change.version <= v) {
                // Applied before the subscription, published after it: its `Synced` covers it.
                continue;
            }
            self.pending.push_back(Delivery::Change { sub, change });
        }
    }

    fn restart(&mut self, sub: SubId, reason: Arc<str>) {
        let Some(state) = self.subs.get_mut(&sub) else {
            return;
        };
        if !state.started {
            return;
        }
        // Starting over: its `Synced` carries the version of now (of a new epoch, perhaps).
        state.from = None;
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
    use crate::store::{Clock, SourceKind};
    use crate::types::Mode;

    fn source() -> Arc<Source> {
        let s = crate::store::tests::test_source();
        s.mark_synced();
        Arc::new(s)
    }

    /// Applies `key = value` at `version` to the source and publishes it.
    fn apply(hub: &Hub, src: &Source, key: &str, version: u64, value: &str) {
        let value = Bytes::from(value.to_string());
        src.put(key, version, &value);
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
    fn prefixes_of_every_length_match_and_stop_matching_once_unsubscribed() {
        let hub = Arc::new(Hub::new());
        let src = source();
        let mut subs: Vec<(Subscriber, SubId)> = ["", "é", "éa", "b", "éa"]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut s = Subscriber::new(&hub, format!("t{i}"), 64, None);
                let id = s.subscribe(src.clone(), Selection::Prefix(p.to_string()), false);
                assert_eq!(drain(&mut s), ["synced 0"]);
                (s, id)
            })
            .collect();
        // "é" is two bytes: its first byte is no prefix of "éa" nor of anything else.
        for (v, key) in ["éa1", "é", "b2", "c", "\u{e8}"].iter().enumerate() {
            apply(&hub, &src, key, v as u64 + 1, "x");
        }
        let got: Vec<Vec<String>> = subs.iter_mut().map(|(s, _)| drain(s)).collect();
        assert_eq!(
            got,
            [
                vec![
                    "change éa1@1",
                    "change é@2",
                    "change b2@3",
                    "change c@4",
                    "change è@5"
                ],
                vec!["change éa1@1", "change é@2"],
                vec!["change éa1@1"],
                vec!["change b2@3"],
                vec!["change éa1@1"],
            ]
        );
        // One of the two "éa" subscriptions goes: the other still matches; then "é" goes.
        let (s, id) = &mut subs[2];
        assert!(s.unsubscribe(*id));
        let (s, id) = &mut subs[1];
        assert!(s.unsubscribe(*id));
        apply(&hub, &src, "éa2", 6, "x");
        let got: Vec<Vec<String>> = subs.iter_mut().map(|(s, _)| drain(s)).collect();
        assert_eq!(
            got,
            [
                vec!["change éa2@6"],
                vec![],
                vec![],
                vec![],
                vec!["change éa2@6"],
            ]
        );
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
    fn a_change_published_after_the_subscription_that_covers_it_is_not_sent() {
        let hub = Arc::new(Hub::new());
        let src = source();
        // The writer has applied version 1 (the source's version moved) but not yet published
        // it when the subscription is registered.
        let value = Bytes::from_static(b"1");
        src.put("a", 1, &value);
        src.set_version(1);
        let mut s = Subscriber::new(&hub, "t", 8, None);
        s.subscribe(src.clone(), Selection::Prefix(String::new()), false);
        hub.publish(&[Event {
            source: src.name().clone(),
            key: Arc::from("a"),
            version: 1,
            value: Some(value),
        }]);
        apply(&hub, &src, "b", 2, "2");
        assert_eq!(drain(&mut s), ["synced 1", "change b@2"]);
    }

    #[test]
    fn a_change_after_the_subscription_is_sent_even_before_the_first_read() {
        // A Redis SUBSCRIBE replies once registered; its consumer reads later. What changed
        // in between is news to it.
        let hub = Arc::new(Hub::new());
        let src = source();
        apply(&hub, &src, "a", 1, "1");
        let mut s = Subscriber::new(&hub, "t", 8, None);
        s.subscribe(src.clone(), Selection::Keys(vec!["a".into()]), false);
        apply(&hub, &src, "a", 2, "2");
        assert_eq!(drain(&mut s), ["synced 1", "change a@2"]);
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
        apply(&hub, &src, "a", 4, "4");
        assert_eq!(drain(&mut s), ["change a@4"]);
    }

    #[test]
    fn a_change_queued_before_a_page_is_read_is_told_once() {
        let hub = Arc::new(Hub::new());
        let src = source();
        apply(&hub, &src, "a", 1, "1");
        let mut s = Subscriber::new(&hub, "t", 8, None);
        s.subscribe(src.clone(), Selection::Prefix(String::new()), true);
        // Queued before the cursor's first page: the page reads a@2, the change is dropped.
        apply(&hub, &src, "a", 2, "2");
        apply(&hub, &src, "b", 3, "3");
        assert_eq!(drain(&mut s), ["row a@2", "row b@3", "synced 3"]);
    }

    #[test]
    fn current_rows_are_read_a_page_at_a_time() {
        let hub = Arc::new(Hub::new());
        let src = source();
        let n = PAGE_ROWS * 2 + 10;
        for i in 0..n {
            apply(&hub, &src, &format!("k{i:04}"), i as u64 + 1, "v");
        }
        let mut s = Subscriber::new(&hub, "t", 4, None);
        s.subscribe(src.clone(), Selection::Prefix("k".into()), true);
        let first = s.try_next();
        assert!(matches!(first, Some(Delivery::Row { .. })));
        // One page is held, not the source.
        assert_eq!(s.pending.len(), PAGE_ROWS - 1);
        // A change behind the cursor is news; one ahead of it is read by its page.
        apply(&hub, &src, "k0000", 1000, "new");
        apply(&hub, &src, &format!("k{:04}", n - 1), 1001, "new");
        let rest = drain(&mut s);
        assert_eq!(rest.len(), n - 1 + 2, "{:?}", &rest[rest.len() - 3..]);
        assert!(rest.contains(&"change k0000@1000".to_string()));
        assert!(rest.contains(&format!("row k{:04}@1001", n - 1)));
        assert_eq!(rest.last().map(String::as_str), Some("synced 1001"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the interleaving of changes and reads, a subscriber with initial rows
        /// ends up with the source's content, sees each key's versions rising (never one
        /// twice), is told `Synced` once, and holds at most a page beyond its queue bound.
        #[test]
        fn a_walking_cursor_agrees_with_the_source(
            start in 0usize..700,
            steps in proptest::collection::vec((0u8..4, 0usize..800, proptest::bool::ANY), 0..300),
            bound in 1usize..64,
            prefix in proptest::sample::select(vec!["", "k0", "k05"]),
        ) {
            let hub = Arc::new(Hub::new());
            let src = source();
            let mut version = 0;
            for i in 0..start {
                version += 1;
                apply(&hub, &src, &format!("k{i:03}"), version, "v");
            }
            let mut s = Subscriber::new(&hub, "t", bound, None);
            s.subscribe(src.clone(), Selection::Prefix(prefix.to_string()), true);
            let mut seen: HashMap<Arc<str>, (u64, Option<Bytes>)> = HashMap::new();
            let mut synced = 0;
            let mut take = |s: &mut Subscriber, n: usize, seen: &mut HashMap<_, _>| -> Result<(), proptest::test_runner::TestCaseError> {
                for _ in 0..n {
                    proptest::prop_assert!(s.pending.len() <= PAGE_ROWS + bound);
                    let Some(d) = s.try_next() else { break };
                    let change = match d {
                        Delivery::Row { change, .. } | Delivery::Change { change, .. } => change,
                        Delivery::Synced { .. } => { synced += 1; continue; }
                        Delivery::Reset { .. } => { seen.clear(); synced = 0; continue; }
                        Delivery::TooSlow => return Err(proptest::test_runner::TestCaseError::fail("too slow")),
                    };
                    if let Some((v, _)) = seen.get(&change.key) {
                        proptest::prop_assert!(change.version > *v, "{} went from {} to {}", change.key, v, change.version);
                    }
                    seen.insert(change.key.clone(), (change.version, change.value.clone()));
                }
                Ok(())
            };
            for (what, key, del) in steps {
                if what == 0 {
                    take(&mut s, key % 300, &mut seen)?;
                    continue;
                }
                version += 1;
                let key = format!("k{key:03}");
                if del && src.get(&key).is_some() {
                    src.remove(&key);
                    src.set_version(version);
                    hub.publish(&[Event { source: src.name().clone(), key: Arc::from(key.as_str()), version, value: None }]);
                } else {
                    apply(&hub, &src, &key, version, &version.to_string());
                }
            }
            take(&mut s, usize::MAX, &mut seen)?;
            proptest::prop_assert_eq!(synced, 1);
            let held: HashMap<Arc<str>, Bytes> = seen
                .into_iter()
                .filter_map(|(k, (_, v))| Some((k, v?)))
                .collect();
            let want: HashMap<Arc<str>, Bytes> = src
                .keyspace()
                .scan(prefix, None, usize::MAX)
                .into_iter()
                .map(|(k, r)| (k, r.value))
                .collect();
            proptest::prop_assert_eq!(held, want);
        }
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
        src.put("a", 5, &Bytes::from_static(b"1"));
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
