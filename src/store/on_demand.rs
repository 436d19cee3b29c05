//! An `on_demand` replica: only the keys read lately, in a moka cache bounded by bytes.
//!
//! A miss runs one load per key however many readers wait (moka's `try_get_with`): the key is
//! subscribed on the origin's feed stream and fetched with `Feed.Fetch`. Keys the origin does not
//! have are cached as absent. Eviction (size or `idle`) and invalidation unsubscribe the key.
//!
//! The race Redis client-side caching documents (a fetched value and a pushed change crossing,
//! leaving a stale entry forever) is closed with versions: every value carries the origin
//! version that wrote it (a Fetch's absent key: the Fetch's position), and a write replaces a
//! resident value only with a newer one. A change pushed while its key is still loading is
//! parked beside the load and applied, if newer, once the fetched value is in. Subscribing
//! before fetching covers the rest: changes after the subscription are pushed, and the keyed
//! snapshot that answers the subscription carries the value as of that moment.
//!
//! Views over the topic (on_demand views, `views::engine`) pin the keys their resident rows read:
//! a pinned key stays subscribed whether or not it is resident, and its newest pushed value is
//! kept beside the pin, where the writer reads it without waiting.
//!
//! Invariant: a key is subscribed on the feed stream while it is resident, loading or pinned. Requests
//! to the feed go through one ordered queue (`KeyOp`), and the feed client drops an
//! unsubscribe for a key that is resident or loading again by the time it is sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use dashmap::DashMap;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use tokio::sync::Notify;

/// Bytes counted per resident key besides its key and value: moka's entry, the key's `Arc`, the
/// slot and the access-order nodes, so that `max_bytes` bounds memory, not just payload.
pub const ENTRY_OVERHEAD: u64 = 160;

/// Longest wait for one `Feed.Fetch`.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A resident key: its value (`None` = the origin does not have it) and the origin version
/// that value is current at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub value: Option<Bytes>,
    pub version: u64,
}

/// Why a read-through could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OnDemandError {
    #[error("the origin of '{0}' is not connected; the key is not resident")]
    NotConnected(Arc<str>),
    #[error("Fetch of '{topic}' failed: {message}")]
    Fetch { topic: Arc<str>, message: String },
    #[error("Fetch of '{0}' took longer than {FETCH_TIMEOUT:?}")]
    Timeout(Arc<str>),
}

/// What one Fetch of a key answered: the origin's version at the time, and the key's value and
/// version if the origin has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub at: u64,
    pub entry: Option<(Bytes, u64)>,
}

/// Point reads from an origin, for misses. The store does no network I/O: the feed client
/// implements this over `Feed.Fetch` and installs it while its stream is up.
pub trait Fetcher: Send + Sync {
    /// Fetches `key` of `topic`; the error is the origin's message.
    fn fetch<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, String>> + Send + 'a>>;
}

/// A request for the feed stream, in the order reads and evictions made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyOp {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

/// Counters of one on_demand source.
#[derive(Debug, Default)]
pub struct OnDemandStats {
    /// Reads answered from a resident key (absent keys included).
    pub hits: AtomicU64,
    /// Reads of a key that was not resident.
    pub misses: AtomicU64,
    /// `Feed.Fetch` calls made.
    pub fetches: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Misses that waited for another reader's load instead of fetching.
    pub coalesced: AtomicU64,
    /// Keys dropped for size or `idle`.
    pub evictions: AtomicU64,
    /// Pushed changes (and keyed snapshot entries) applied to resident or loading keys.
    pub pushed: AtomicU64,
    /// Pushed changes for keys no longer resident (an unsubscribe was in flight).
    pub stray: AtomicU64,
    /// Keys sent in `Subscribe` / `Unsubscribe` requests.
    pub subscribed: AtomicU64,
    pub unsubscribed: AtomicU64,
}

#[derive(Debug, Default)]
struct KeyOps {
    queue: Mutex<VecDeque<KeyOp>>,
    waker: OnceLock<Arc<Notify>>,
}

impl KeyOps {
    fn push(&self, op: KeyOp) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(op);
        if let Some(w) = self.waker.get() {
            w.notify_one();
        }
    }
}

/// A key pinned by view rows (and by view loads in progress): how many, and the newest value
/// known for it (`None` until a fetch supplies it or a push sets it).
#[derive(Debug, Default)]
struct Pin {
    count: u32,
    slot: Option<Slot>,
}

/// A load in progress: its generation (so that only its own guard removes it) and the newest
/// value the stream pushed meanwhile.
type Loading = (u64, Option<Slot>);

/// The keys of one on_demand topic read lately.
pub struct OnDemand {
    topic: Arc<str>,
    max_bytes: u64,
    cache: Cache<Arc<str>, Slot>,
    loading: DashMap<Arc<str>, Loading>,
    pins: DashMap<Arc<str>, Pin>,
    generation: AtomicU64,
    ops: Arc<KeyOps>,
    fetcher: ArcSwapOption<Box<dyn Fetcher>>,
    epoch: ArcSwap<String>,
    stats: Arc<OnDemandStats>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand")
            .field("topic", &self.topic)
            .field("max_bytes", &self.max_bytes)
            .field("resident", &self.cache.entry_count())
            .finish()
    }
}

/// moka's weight of a resident key (or view row): key, value and [`ENTRY_OVERHEAD`].
pub(crate) fn weight(key: &str, slot: &Slot) -> u32 {
    let w = key.len() as u64 + slot.value.as_ref().map_or(0, |v| v.len() as u64) + ENTRY_OVERHEAD;
    u32::try_from(w).unwrap_or(u32::MAX)
}

impl OnDemand {
    /// An empty replica of `topic` holding at most `max_bytes` (keys, values and
    /// [`ENTRY_OVERHEAD`] per key), dropping keys not read for `idle`.
    pub fn new(topic: &str, max_bytes: u64, idle: Option<Duration>) -> Arc<Self> {
        let ops = Arc::new(KeyOps::default());
        let stats = Arc::new(OnDemandStats::default());
        let listener = {
            let ops = ops.clone();
            let stats = stats.clone();
            move |key: Arc<Arc<str>>, _slot: Slot, cause: RemovalCause| {
                if cause == RemovalCause::Replaced {
                    return;
                }
                if cause.was_evicted() {
                    stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                ops.push(KeyOp::Unsubscribe((*key).clone()));
            }
        };
        let mut builder = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &Arc<str>, s: &Slot| weight(k, s))
            .eviction_listener(listener);
        if let Some(idle) = idle {
            builder = builder.time_to_idle(idle);
        }
        Arc::new(OnDemand {
            topic: Arc::from(topic),
            max_bytes,
            cache: builder.build(),
            loading: DashMap::new(),
            pins: DashMap::new(),
            generation: AtomicU64::new(0),
            ops,
            fetcher: ArcSwapOption::empty(),
            epoch: ArcSwap::from_pointee(String::new()),
            stats,
        })
    }

    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn idle(&self) -> Option<Duration> {
        self.cache.policy().time_to_idle()
    }

    pub fn stats(&self) -> &Arc<OnDemandStats> {
        &self.stats
    }

    /// Keys resident now (absent keys included). Eviction is applied in moka's housekeeping, so
    /// this can be briefly above what the budget holds; [`OnDemand::sync`] settles it.
    pub fn resident_keys(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Weighed bytes resident now (see [`OnDemand::resident_keys`]).
    pub fn resident_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending housekeeping: evictions and their unsubscribes happen now.
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// The resident value of `key`, without loading it or counting a read.
    pub async fn peek(&self, key: &str) -> Option<Slot> {
        self.cache.get(key).await
    }

    /// Reads `key`: from memory when resident, otherwise loaded once for every waiting reader.
    pub async fn get(self: &Arc<Self>, key: &str) -> Result<Slot, OnDemandError> {
        if let Some(slot) = self.cache.get(key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(slot);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(key);
        let mut guard = LoadGuard {
            od: self.clone(),
            key: key.clone(),
            generation: None,
        };
        let got = self
            .cache
            .try_get_with(key.clone(), self.load(&key, &mut guard.generation))
            .await;
        if guard.generation.is_none() {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        drop(guard);
        got.map_err(|e| (*e).clone())
    }

    /// Subscribes `key` on the feed, then fetches it. Runs once per miss, whoever waits.
    async fn load(
        &self,
        key: &Arc<str>,
        generation: &mut Option<u64>,
    ) -> Result<Slot, OnDemandError> {
        let g = self.generation.fetch_add(1, Ordering::Relaxed);
        *generation = Some(g);
        self.loading.insert(key.clone(), (g, None));
        self.ops.push(KeyOp::Subscribe(key.clone()));
        let Some(client) = self.fetcher.load_full() else {
            return Err(OnDemandError::NotConnected(self.topic.clone()));
        };
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, client.fetch(&self.topic, key)).await;
        let resp = match fetched {
            Err(_) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                return Err(OnDemandError::Timeout(self.topic.clone()));
            }
            Ok(Err(message)) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                return Err(OnDemandError::Fetch {
                    topic: self.topic.clone(),
                    message,
                });
            }
            Ok(Ok(r)) => r,
        };
        let mut slot = match resp.entry {
            Some((value, version)) => Slot {
                value: Some(value),
                version,
            },
            None => Slot {
                value: None,
                version: resp.at,
            },
        };
        if let Some(pushed) = self.loading.get(key).and_then(|l| l.1.clone()) {
            if pushed.version > slot.version {
                slot = pushed;
            }
        }
        Ok(slot)
    }

    /// Applies a pushed value (a change or a keyed snapshot entry) to a resident or loading
    /// key, if it is newer than what is there. Returns false for a key that is neither.
    pub(crate) async fn apply(&self, key: &str, slot: Slot) -> bool {
        let mut wanted = false;
        if let Some(mut p) = self.pins.get_mut(key) {
            if p.slot.as_ref().is_none_or(|cur| slot.version > cur.version) {
                p.slot = Some(slot.clone());
            }
            wanted = true;
        }
        if let Some(mut l) = self.loading.get_mut(key) {
            if l.1.as_ref().is_none_or(|p| slot.version > p.version) {
                l.1 = Some(slot.clone());
            }
            wanted = true;
        }
        let resident = self.put_if_newer(Arc::from(key), slot).await;
        let applied = wanted || resident;
        if applied {
            self.stats.pushed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.stray.fetch_add(1, Ordering::Relaxed);
        }
        applied
    }

    /// Replaces a resident value with a newer one; never makes a key resident.
    async fn put_if_newer(&self, key: Arc<str>, slot: Slot) -> bool {
        let mut resident = false;
        let resident_ref = &mut resident;
        self.cache
            .entry(key)
            .and_compute_with(|cur| {
                let op = match cur {
                    Some(e) => {
                        *resident_ref = true;
                        if e.value().version < slot.version {
                            Op::Put(slot)
                        } else {
                            Op::Nop
                        }
                    }
                    None => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        resident
    }

    /// True while `key` is resident, loading or pinned: it must stay subscribed.
    pub(crate) fn wanted(&self, key: &str) -> bool {
        self.loading.contains_key(key)
            || self.pins.contains_key(key)
            || self.cache.contains_key(key)
    }

    /// Every key that must be subscribed: resident, loading or pinned.
    pub(crate) fn wanted_keys(&self) -> Vec<Arc<str>> {
        let mut keys: Vec<Arc<str>> = self.cache.iter().map(|(k, _)| (*k).clone()).collect();
        keys.extend(self.loading.iter().map(|e| e.key().clone()));
        keys.extend(self.pins.iter().map(|e| e.key().clone()));
        keys.sort();
        keys.dedup();
        keys
    }

    /// Takes the queued feed requests, in order.
    pub(crate) fn take_ops(&self) -> VecDeque<KeyOp> {
        std::mem::take(&mut *self.ops.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts back requests the feed could not send yet, ahead of newer ones.
    pub(crate) fn requeue(&self, mut ops: VecDeque<KeyOp>) {
        let mut q = self.ops.queue.lock().unwrap_or_else(|p| p.into_inner());
        ops.extend(q.drain(..));
        *q = ops;
    }

    /// Queues a subscribe of every wanted key: their keyed snapshots refresh them after the
    /// stream may have missed changes (a gap, a catch-up).
    pub(crate) fn refresh_all(&self) {
        for k in self.wanted_keys() {
            self.ops.push(KeyOp::Subscribe(k));
        }
    }

    /// Wakes `waker` whenever a feed request is queued. Set once, by the feed client.
    pub(crate) fn set_waker(&self, waker: Arc<Notify>) {
        let _ = self.ops.waker.set(waker);
    }

    /// The Fetch client on the feed's channel, while connected.
    pub(crate) fn set_fetcher(&self, fetcher: Option<Box<dyn Fetcher>>) {
        self.fetcher.store(fetcher.map(Arc::new));
    }

    /// Notes the origin epoch the stream reports. Versions of another epoch are not comparable,
    /// so a new epoch drops every resident key (readers load them again).
    /// Returns true when resident and pinned values were dropped.
    pub(crate) fn observe_epoch(&self, epoch: &str) -> bool {
        let cur = self.epoch.load();
        if cur.as_str() == epoch {
            return false;
        }
        let had = !cur.is_empty();
        self.epoch.store(Arc::new(epoch.to_string()));
        if had {
            self.cache.invalidate_all();
            // Pinned values too: the rows reading them are dropped (and computed again when
            // read) once the writer sees these keys touched.
            for mut p in self.pins.iter_mut() {
                p.slot = None;
            }
        }
        had
    }

    /// The origin epoch the resident values belong to ("" before the first).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn epoch(&self) -> Arc<String> {
        self.epoch.load_full()
    }

    /// Adds a pin on `key` (created without a value when new). The key stays subscribed until
    /// every pin is released with [`OnDemand::unpin`].
    pub(crate) fn pin(&self, key: &Arc<str>) {
        self.pins.entry(key.clone()).or_default().count += 1;
    }

    /// Releases one pin; the last one drops the pinned value and, unless the key is resident
    /// or loading, unsubscribes it.
    pub(crate) fn unpin(&self, key: &Arc<str>) {
        let gone = self
            .pins
            .remove_if_mut(key, |_, p| {
                p.count = p.count.saturating_sub(1);
                p.count == 0
            })
            .is_some();
        if gone && !self.wanted(key) {
            self.ops.push(KeyOp::Unsubscribe(key.clone()));
        }
    }

    /// The value of a pinned key: `None` when not pinned or not known yet.
    pub(crate) fn pinned(&self, key: &str) -> Option<Slot> {
        self.pins.get(key).and_then(|p| p.slot.clone())
    }

    /// True if some view row reads this topic (or a view load is fetching from it).
    pub(crate) fn has_pins(&self) -> bool {
        !self.pins.is_empty()
    }

    /// Every pinned key.
    pub(crate) fn pinned_keys(&self) -> Vec<Arc<str>> {
        self.pins.iter().map(|e| e.key().clone()).collect()
    }

    /// Pinned keys now (view rows' inputs and view loads in progress).
    pub fn pinned_count(&self) -> u64 {
        self.pins.len() as u64
    }

    /// Gives a pinned key the value a read fetched, unless a newer one was pushed meanwhile.
    pub(crate) fn supply(&self, key: &str, slot: Slot) {
        if let Some(mut p) = self.pins.get_mut(key) {
            if p.slot.as_ref().is_none_or(|cur| slot.version > cur.version) {
                p.slot = Some(slot);
            }
        }
    }
}

/// Ends a load however the reader left (answered, failed or cancelled): the parked push is
/// applied if newer than what was inserted, and a key that did not become resident is
/// unsubscribed.
struct LoadGuard {
    od: Arc<OnDemand>,
    key: Arc<str>,
    generation: Option<u64>,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let Some(g) = self.generation else { return };
        let parked = self
            .od
            .loading
            .remove_if(&self.key, |_, l| l.0 == g)
            .and_then(|(_, l)| l.1);
        if let Some(slot) = parked {
            let od = self.od.clone();
            let key = self.key.clone();
            // `put_if_newer` awaits moka's per-key lock; a Drop cannot, so it runs beside.
            tokio::spawn(async move {
                od.put_if_newer(key, slot).await;
            });
        }
        if !self.od.wanted(&self.key) {
            self.od.ops.push(KeyOp::Unsubscribe(self.key.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(v: &str, version: u64) -> Slot {
        Slot {
            value: Some(Bytes::from(v.to_string())),
            version,
        }
    }

    #[tokio::test]
    async fn a_push_replaces_only_an_older_resident_value() {
        let od = OnDemand::new("t", 1 << 20, None);
        assert!(!od.apply("k", slot("a", 5)).await, "not resident: not kept");
        od.cache.insert(Arc::from("k"), slot("a", 5)).await;
        assert!(od.apply("k", slot("b", 4)).await);
        assert_eq!(od.peek("k").await, Some(slot("a", 5)));
        od.apply("k", slot("c", 6)).await;
        assert_eq!(od.peek("k").await, Some(slot("c", 6)));
        od.apply(
            "k",
            Slot {
                value: None,
                version: 7,
            },
        )
        .await;
        assert_eq!(od.peek("k").await.unwrap().value, None);
    }

    #[test]
    fn the_idle_expiry_is_the_cache_policy() {
        let idle = Duration::from_secs(5);
        assert_eq!(OnDemand::new("t", 1 << 20, Some(idle)).idle(), Some(idle));
        assert_eq!(OnDemand::new("t", 1 << 20, None).idle(), None);
    }

    #[tokio::test]
    async fn a_miss_without_a_feed_fails_and_unsubscribes() {
        let od = OnDemand::new("t", 1 << 20, None);
        let e = od.get("k").await.unwrap_err();
        assert!(matches!(e, OnDemandError::NotConnected(_)));
        let ops: Vec<_> = od.take_ops().into_iter().collect();
        assert_eq!(
            ops,
            vec![
                KeyOp::Subscribe(Arc::from("k")),
                KeyOp::Unsubscribe(Arc::from("k"))
            ]
        );
        assert!(!od.wanted("k"));
    }

    #[tokio::test]
    async fn eviction_is_bounded_by_bytes_and_unsubscribes() {
        let od = OnDemand::new("t", 100 * (ENTRY_OVERHEAD + 12), None);
        for i in 0..1000 {
            od.cache
                .insert(Arc::from(format!("k{i:03}").as_str()), slot("12345678", 1))
                .await;
        }
        od.sync().await;
        assert!(od.resident_bytes() <= od.max_bytes());
        let unsubs = od
            .take_ops()
            .into_iter()
            .filter(|o| matches!(o, KeyOp::Unsubscribe(_)))
            .count() as u64;
        assert_eq!(unsubs + od.resident_keys(), 1000);
        assert_eq!(od.stats.evictions.load(Ordering::Relaxed), unsubs);
    }
}
