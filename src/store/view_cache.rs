//! The resident rows of an on_demand view: rows computed on first read, kept within a byte
//! budget while they are read, and maintained by push like any view row while resident.
//!
//! Only the writer computes rows (so a row and the pushes to what it read are ordered), and it
//! never waits: it computes from what is resident. A read that misses asks the writer for the
//! row ([`RowRequest::Row`], through the [`RowDesk`] the writer provides); when an input is not resident the writer answers with the missing
//! `(source, key)` pairs, the reader fetches them (on_demand topics through their cache, pinning
//! each key first so that no push to it is lost; on_demand views by reading their row) and asks
//! again. Chained lookups (a brand, then its country) take one round per link.
//!
//! Eviction (size or `idle`) is reported to the writer, which drops the row's dependency
//! entries and releases the pins on its inputs; rows of other views that read an evicted row
//! are dropped with it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use moka::notification::RemovalCause;
use moka::ops::compute::Op as CacheOp;
use moka::sync::Cache;
use tokio::sync::{oneshot, OnceCell};

use super::on_demand::{weight, OnDemandError, OnDemandStats, Slot};
use super::{OnDemand, Source};

/// Most rounds of fetching inputs one row read takes before giving up: a chain of lookups
/// longer than this, or inputs evicted again before the row could be computed every time.
pub const MAX_ROUNDS: usize = 16;

/// What an on_demand view asks of the writer, the only task that computes rows.
#[derive(Debug)]
pub enum RowRequest {
    /// The row of `key` in the on_demand view `view`.
    Row {
        view: Arc<str>,
        key: Arc<str>,
        reply: oneshot::Sender<RowAnswer>,
    },
    /// Rows were evicted: their inputs can be released.
    Evicted,
}

/// Where a view cache sends its [`RowRequest`]s: the writer's queue. A trait, so that the
/// store does not know the writer that sits above it.
pub trait RowDesk: Send + Sync {
    /// Queues a request, waiting while the queue is full; false once the writer is gone.
    fn ask(&self, request: RowRequest) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
    /// Queues a request if there is room now; never waits.
    fn tell(&self, request: RowRequest);
}

/// What the writer answers to a row request.
#[derive(Debug)]
pub enum RowAnswer {
    /// The row, now resident (`value: None` = the view has no row for the key).
    Row(Slot),
    /// Inputs to fetch first.
    Missing(Vec<(Arc<Source>, Arc<str>)>),
    /// The request cannot be answered (no such on_demand view).
    Refused(String),
}

/// What [`ViewCache::replace`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replaced {
    NotResident,
    Same,
    Changed,
}

type Load = Arc<OnceCell<Result<Slot, OnDemandError>>>;

#[derive(Default)]
struct Shared {
    evicted: Mutex<Vec<Arc<str>>>,
    writer: OnceLock<Arc<dyn RowDesk>>,
}

/// The resident rows of one on_demand view.
pub struct ViewCache {
    name: Arc<str>,
    max_bytes: u64,
    cache: Cache<Arc<str>, Slot>,
    loads: DashMap<Arc<str>, Load>,
    shared: Arc<Shared>,
    stats: Arc<OnDemandStats>,
}

impl std::fmt::Debug for ViewCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewCache")
            .field("name", &self.name)
            .field("max_bytes", &self.max_bytes)
            .field("resident", &self.cache.entry_count())
            .finish()
    }
}

/// Releases a pin taken while a row's inputs were fetched.
struct Pinned {
    od: Arc<OnDemand>,
    key: Arc<str>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.od.unpin(&self.key);
    }
}

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, OnDemandError>> + Send>>;

impl ViewCache {
    /// An empty cache for view `name` holding at most `max_bytes` (keys, rows and
    /// [`ENTRY_OVERHEAD`](super::on_demand::ENTRY_OVERHEAD) per key), dropping rows not read for `idle`.
    pub fn new(name: &str, max_bytes: u64, idle: Option<Duration>) -> Arc<Self> {
        let shared = Arc::new(Shared::default());
        let stats = Arc::new(OnDemandStats::default());
        let listener = {
            let shared = shared.clone();
            let stats = stats.clone();
            move |key: Arc<Arc<str>>, _slot: Slot, cause: RemovalCause| {
                if cause == RemovalCause::Replaced {
                    return;
                }
                if cause.was_evicted() {
                    stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                shared
                    .evicted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((*key).clone());
                // Wake the writer to release the row's inputs; when its queue is full it is
                // busy and drains the evictions at its next step anyway.
                if let Some(w) = shared.writer.get() {
                    w.tell(RowRequest::Evicted);
                }
            }
        };
        let mut builder = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &Arc<str>, s: &Slot| weight(k, s))
            .eviction_listener(listener);
        if let Some(idle) = idle {
            builder = builder.time_to_idle(idle);
        }
        Arc::new(ViewCache {
            name: Arc::from(name),
            max_bytes,
            cache: builder.build(),
            loads: DashMap::new(),
            shared,
            stats,
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn idle(&self) -> Option<Duration> {
        self.cache.policy().time_to_idle()
    }

    /// Counters: hits, misses, `fetches` = rounds that fetched missing inputs, coalesced waits,
    /// evictions.
    pub fn stats(&self) -> &Arc<OnDemandStats> {
        &self.stats
    }

    /// Rows resident now (rows the view does not have included). Eviction runs in moka's
    /// housekeeping; [`ViewCache::sync`] settles it.
    pub fn resident_keys(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Weighed bytes resident now.
    pub fn resident_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending housekeeping: evictions are reported now.
    pub fn sync(&self) {
        self.cache.run_pending_tasks();
    }

    /// The resident row of `key`, without computing it or counting a read.
    pub fn peek(&self, key: &str) -> Option<Slot> {
        self.cache.get(key)
    }

    /// Where row requests and eviction reports go. Set once, when the writer starts.
    pub(crate) fn set_writer(&self, writer: Arc<dyn RowDesk>) {
        let _ = self.shared.writer.set(writer);
    }

    /// Reads the row of `key`: from memory when resident, otherwise computed once for every
    /// waiting reader.
    pub async fn get(self: &Arc<Self>, key: &str) -> Result<Slot, OnDemandError> {
        if let Some(slot) = self.cache.get(key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(slot);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(key);
        let cell = self.loads.entry(key.clone()).or_default().clone();
        let mut ran = false;
        let got = cell
            .get_or_init(|| {
                ran = true;
                self.clone().load(key.clone())
            })
            .await
            .clone();
        self.loads.remove_if(&key, |_, c| Arc::ptr_eq(c, &cell));
        if !ran {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        got
    }

    fn stopped(&self) -> OnDemandError {
        OnDemandError::Fetch {
            topic: self.name.clone(),
            message: "the sidecar is stopping".into(),
        }
    }

    /// Asks the writer for the row until it can compute it, fetching what it misses between.
    /// (Boxed: a view's load reads the rows of the views it reads.)
    fn load(self: Arc<Self>, key: Arc<str>) -> Boxed<Slot> {
        Box::pin(async move { self.load_rounds(key).await })
    }

    async fn load_rounds(&self, key: Arc<str>) -> Result<Slot, OnDemandError> {
        // Pins taken for this read; released once the row is resident (its own dependencies
        // pin what it read) or the read gives up.
        let mut pins: Vec<Pinned> = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let writer = self.shared.writer.get().ok_or_else(|| self.stopped())?;
            let (tx, rx) = oneshot::channel();
            let request = RowRequest::Row {
                view: self.name.clone(),
                key: key.clone(),
                reply: tx,
            };
            if !writer.ask(request).await {
                return Err(self.stopped());
            }
            let missing = match rx.await.map_err(|_| self.stopped())? {
                RowAnswer::Row(slot) => return Ok(slot),
                RowAnswer::Refused(message) => {
                    return Err(OnDemandError::Fetch {
                        topic: self.name.clone(),
                        message,
                    })
                }
                RowAnswer::Missing(missing) => missing,
            };
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            // Pin before reading: a push to the key from now on is kept beside the pin, and
            // the value read is at least as new as any push before.
            for (source, k) in &missing {
                if let Some(od) = source.on_demand() {
                    od.pin(k);
                    pins.push(Pinned {
                        od: od.clone(),
                        key: k.clone(),
                    });
                }
            }
            let fetches = missing.into_iter().map(|(source, k)| -> Boxed<()> {
                Box::pin(async move {
                    if let Some(od) = source.on_demand() {
                        let slot = od.get(&k).await?;
                        od.supply(&k, slot);
                    } else if let Some(vc) = source.view_cache() {
                        vc.get(&k).await?;
                    }
                    Ok(())
                })
            });
            let results = futures_util::future::join_all(fetches).await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        }
        Err(OnDemandError::Fetch {
            topic: self.name.clone(),
            message: format!(
                "the row's inputs were still not resident after {MAX_ROUNDS} rounds of fetching \
                 (a longer chain of lookups, or budgets too small to hold one row's inputs)"
            ),
        })
    }

    // ----- for the writer -----

    /// The resident row of `key` (counts as a read for eviction order, not in the stats).
    pub(crate) fn resident(&self, key: &str) -> Option<Slot> {
        self.cache.get(key)
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.cache.contains_key(key)
    }

    pub(crate) fn insert(&self, key: Arc<str>, slot: Slot) {
        self.cache.insert(key, slot);
    }

    /// Replaces the row of a resident key if its value differs; stores nothing for a key that
    /// is not resident.
    pub(crate) fn replace(&self, key: Arc<str>, slot: Slot) -> Replaced {
        let mut outcome = Replaced::NotResident;
        self.cache.entry(key).and_compute_with(|cur| match cur {
            Some(e) if e.value().value == slot.value => {
                outcome = Replaced::Same;
                CacheOp::Nop
            }
            Some(_) => {
                outcome = Replaced::Changed;
                CacheOp::Put(slot)
            }
            None => CacheOp::Nop,
        });
        outcome
    }

    pub(crate) fn invalidate(&self, key: &str) {
        self.cache.invalidate(key);
    }

    /// Keys removed since the last call (evicted or invalidated).
    pub(crate) fn take_evicted(&self) -> Vec<Arc<str>> {
        std::mem::take(
            &mut *self
                .shared
                .evicted
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }
}
