//! Subscriptions to sources, and the fan-out of applied changes to them.
//!
//! Subscriptions are indexed by (source, key) and by (source, prefix), so a change costs one
//! lookup per prefix length of its key, not one per subscriber. Each change is wrapped in one
//! `Arc` shared by every subscriber that wants it.
//!
//! Each subscriber has a bounded queue. The writer never waits on it: when it is full the
//! subscriber is marked lagged and skipped, and the subscriber catches up on its own by a reset
//! (discard what is queued, re-read the current rows). So a slow subscriber costs the writer
//! nothing and other subscribers never wait for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, Notify};

use crate::store::{Event, Source};

type SubId = u64;

#[derive(Debug)]
enum HubMsg {
    Event(Arc<Event>),
    Reset(Arc<str>),
}

#[derive(Debug)]
struct Shared {
    tx: mpsc::Sender<HubMsg>,
    lagged: AtomicBool,
    wake: Notify,
}

#[derive(Default)]
struct SourceSubs {
    keys: HashMap<Arc<str>, Vec<SubId>>,
    prefixes: HashMap<Arc<str>, Vec<SubId>>,
    subs: HashMap<SubId, Arc<Shared>>,
}

/// Counters of the hub.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Subscribers that overflowed their queue and were reset.
    pub lagged: AtomicU64,
    /// Events queued to subscribers.
    pub delivered: AtomicU64,
}

/// The subscription registry and dispatcher.
#[derive(Default)]
pub struct Hub {
    inner: RwLock<HashMap<Arc<str>, SourceSubs>>,
    next_id: AtomicU64,
    stats: HubStats,
}

/// What a subscriber watches in one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Keys(Vec<String>),
    /// `""` = every key.
    Prefix(String),
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
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.values().map(|s| s.subs.len()).sum()
    }

    fn subscribe(
        self: &Arc<Self>,
        source: &Arc<str>,
        sel: &Selection,
        queue: usize,
    ) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let shared = Arc::new(Shared {
            tx,
            lagged: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let subs = inner.entry(source.clone()).or_default();
        match sel {
            Selection::Keys(keys) => {
                for k in keys {
                    subs.keys.entry(Arc::from(k.as_str())).or_default().push(id);
                }
            }
            Selection::Prefix(p) => subs
                .prefixes
                .entry(Arc::from(p.as_str()))
                .or_default()
                .push(id),
        }
        subs.subs.insert(id, shared.clone());
        Subscription {
            id,
            source: source.clone(),
            selection: sel.clone(),
            rx,
            shared,
            hub: self.clone(),
        }
    }

    fn unsubscribe(&self, id: SubId, source: &Arc<str>, sel: &Selection) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = inner.get_mut(source) else {
            return;
        };
        fn drop_id(map: &mut HashMap<Arc<str>, Vec<SubId>>, k: &str, id: SubId) {
            if let Some(v) = map.get_mut(k) {
                v.retain(|x| *x != id);
                if v.is_empty() {
                    map.remove(k);
                }
            }
        }
        match sel {
            Selection::Keys(keys) => {
                for k in keys {
                    drop_id(&mut subs.keys, k, id);
                }
            }
            Selection::Prefix(p) => drop_id(&mut subs.prefixes, p, id),
        }
        subs.subs.remove(&id);
        if subs.subs.is_empty() {
            inner.remove(source);
        }
    }

    /// Hands applied changes to the subscribers that want them. Never waits.
    pub fn publish(&self, events: &[Event]) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if inner.is_empty() {
            return;
        }
        let mut targets: Vec<SubId> = Vec::new();
        for ev in events {
            let Some(subs) = inner.get(&ev.source) else {
                continue;
            };
            targets.clear();
            if let Some(ids) = subs.keys.get(&ev.key) {
                targets.extend_from_slice(ids);
            }
            if !subs.prefixes.is_empty() {
                let key: &str = &ev.key;
                for end in key.char_indices().map(|(i, _)| i).chain([key.len()]) {
                    if let Some(ids) = subs.prefixes.get(&key[..end]) {
                        targets.extend_from_slice(ids);
                    }
                }
            }
            if targets.is_empty() {
                continue;
            }
            let shared_ev = Arc::new(ev.clone());
            for id in &targets {
                if let Some(s) = subs.subs.get(id) {
                    self.offer(s, HubMsg::Event(shared_ev.clone()));
                }
            }
        }
    }

    /// Tells every subscriber of `source` to start over from the current rows.
    pub fn reset_source(&self, source: &str, reason: &str) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = inner.get(source) else {
            return;
        };
        let reason: Arc<str> = Arc::from(reason);
        for s in subs.subs.values() {
            self.offer(s, HubMsg::Reset(reason.clone()));
        }
    }

    fn offer(&self, s: &Shared, msg: HubMsg) {
        if s.lagged.load(Ordering::Acquire) {
            return;
        }
        match s.tx.try_send(msg) {
            Ok(()) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.lagged.store(true, Ordering::Release);
                self.stats.lagged.fetch_add(1, Ordering::Relaxed);
                s.wake.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// A registered interest; dropping it unregisters.
struct Subscription {
    id: SubId,
    source: Arc<str>,
    selection: Selection,
    rx: mpsc::Receiver<HubMsg>,
    shared: Arc<Shared>,
    hub: Arc<Hub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id, &self.source, &self.selection);
    }
}

/// What a watcher is told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Row {
        key: Arc<str>,
        version: u64,
        value: bytes::Bytes,
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

/// One watch of one source: current rows (optionally), `Synced`, then every change, per key in
/// version order and without duplicates. A watcher that falls behind its queue bound gets
/// `Reset` and the current rows again instead of every intermediate change.
pub struct Watcher {
    sub: Subscription,
    source: Arc<Source>,
    initial: bool,
    /// Per key, the last version told (a delete included), so that the changes racing the
    /// initial read are never told twice or out of order.
    seen: HashMap<Arc<str>, u64>,
    pending: VecDeque<Update>,
    started: bool,
}

impl Watcher {
    /// Registers the watch. Changes applied from now on are queued (up to `queue`).
    pub fn new(
        hub: &Arc<Hub>,
        source: Arc<Source>,
        selection: Selection,
        initial: bool,
        queue: usize,
    ) -> Self {
        let selection = match selection {
            Selection::Keys(keys) => {
                let mut uniq = HashSet::new();
                Selection::Keys(
                    keys.into_iter()
                        .filter(|k| uniq.insert(k.clone()))
                        .collect(),
                )
            }
            p => p,
        };
        let sub = hub.subscribe(source.name(), &selection, queue);
        Watcher {
            sub,
            source,
            initial,
            seen: HashMap::new(),
            pending: VecDeque::new(),
            started: false,
        }
    }

    /// The next update; `None` only if the hub is gone.
    pub async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(u) = self.pending.pop_front() {
                return Some(u);
            }
            if !self.started {
                self.wait_synced().await;
                self.started = true;
                self.load_current();
                continue;
            }
            if self.sub.shared.lagged.load(Ordering::Acquire) {
                self.catch_up("subscriber fell behind; current rows follow");
                continue;
            }
            let msg = tokio::select! {
                biased;
                _ = self.sub.shared.wake.notified() => continue,
                m = self.sub.rx.recv() => m?,
            };
            match msg {
                HubMsg::Event(ev) => self.consider(&ev),
                HubMsg::Reset(reason) => {
                    self.seen.clear();
                    self.pending.push_back(Update::Reset(reason));
                    self.load_current();
                }
            }
        }
    }

    async fn wait_synced(&mut self) {
        let mut changes = self.source.subscribe_changes();
        while !self.source.is_synced() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Drops what is queued, clears the lagged mark, and re-reads the current rows; changes
    /// that race the re-read are deduplicated by version.
    fn catch_up(&mut self, reason: &str) {
        while self.sub.rx.try_recv().is_ok() {}
        self.sub.shared.lagged.store(false, Ordering::Release);
        self.seen.clear();
        self.pending.push_back(Update::Reset(Arc::from(reason)));
        self.load_current();
    }

    fn load_current(&mut self) {
        if self.initial {
            let rows = self.current_rows();
            for (key, row) in rows {
                self.seen.insert(key.clone(), row.version);
                self.pending.push_back(Update::Row {
                    key,
                    version: row.version,
                    value: row.value,
                });
            }
        }
        self.pending
            .push_back(Update::Synced(self.source.version()));
    }

    fn current_rows(&self) -> Vec<(Arc<str>, crate::store::Row)> {
        match &self.sub.selection {
            Selection::Keys(keys) => keys
                .iter()
                .filter_map(|k| self.source.get(k).map(|r| (Arc::from(k.as_str()), r)))
                .collect(),
            Selection::Prefix(p) => self.source.keyspace().scan(p, None, usize::MAX),
        }
    }

    fn consider(&mut self, ev: &Event) {
        if let Some(&v) = self.seen.get(&ev.key) {
            if ev.version <= v {
                return;
            }
        }
        self.seen.insert(ev.key.clone(), ev.version);
        self.pending.push_back(match &ev.value {
            Some(value) => Update::Row {
                key: ev.key.clone(),
                version: ev.version,
                value: value.clone(),
            },
            None => Update::Deleted {
                key: ev.key.clone(),
                version: ev.version,
            },
        });
    }
}
