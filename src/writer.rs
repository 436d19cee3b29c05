//! The single writer: the only task that mutates sources.
//!
//! Everything that changes data — snapshot chunks, change batches, progress bookmarks from every
//! origin — arrives here in one bounded queue and is applied in order. After each step the
//! view engine brings the views up to date (so a view is never behind its inputs once a step is
//! applied) and the resulting changes are handed to the hub. Readers never block this task.
//!
//! The writer sits above the store, the views and the hub: it is the one place that calls all
//! three. What the store needs of it (on_demand views asking for a row) goes through the store's
//! [`RowDesk`] trait, implemented here.

mod standalone;

pub use standalone::{Changes, Standalone};

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::hub::Hub;
use crate::store::view_cache::{RowAnswer, RowDesk, RowRequest};
use crate::store::{Event, Source, Staging};
use crate::views::Engine;

/// One entry of a snapshot chunk.
#[derive(Debug, Clone)]
pub struct SnapEntry {
    pub key: String,
    pub value: Bytes,
    pub version: u64,
}

/// The entries of a snapshot chunk: decoded one by one, or as spans of the received message
/// (the feed's fast path: no `String` or `Bytes` per entry).
#[derive(Debug, Clone)]
pub enum SnapEntries {
    Decoded(Vec<SnapEntry>),
    Raw(RawEntries),
}

/// Entries as spans of one received message. Made only by the feed's chunk parser, which
/// checked every key is UTF-8 and every span lies inside `buf`.
#[derive(Debug, Clone, Default)]
pub struct RawEntries {
    pub(crate) buf: Bytes,
    pub(crate) spans: Vec<RawEntry>,
}

/// One entry of [`RawEntries`]: byte ranges of `buf`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawEntry {
    pub(crate) key: (usize, usize),
    pub(crate) value: (usize, usize),
    pub(crate) version: u64,
}

impl SnapEntries {
    pub fn len(&self) -> usize {
        match self {
            SnapEntries::Decoded(v) => v.len(),
            SnapEntries::Raw(r) => r.spans.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with each entry's key, version and value, in order. A key is UTF-8: a decoded
    /// entry's `String`, or checked by the chunk parser that made the spans.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&[u8], u64, &[u8])) {
        match self {
            SnapEntries::Decoded(v) => {
                for e in v {
                    f(e.key.as_bytes(), e.version, &e.value);
                }
            }
            SnapEntries::Raw(r) => {
                for e in &r.spans {
                    // The parser made the spans inside `buf`; one that is not would be a bug
                    // there, and is skipped rather than panicking the writer.
                    if let (Some(key), Some(value)) =
                        (r.buf.get(e.key.0..e.key.1), r.buf.get(e.value.0..e.value.1))
                    {
                        f(key, e.version, value);
                    }
                }
            }
        }
    }
}

impl FromIterator<SnapEntry> for SnapEntries {
    fn from_iter<I: IntoIterator<Item = SnapEntry>>(iter: I) -> Self {
        SnapEntries::Decoded(iter.into_iter().collect())
    }
}

impl From<Vec<SnapEntry>> for SnapEntries {
    fn from(v: Vec<SnapEntry>) -> Self {
        SnapEntries::Decoded(v)
    }
}

/// One change of a batch; `value: None` = delete.
#[derive(Debug, Clone)]
pub struct BatchChange {
    pub key: String,
    pub value: Option<Bytes>,
}

/// A step for the writer, already checked by the feed client against the stream's protocol.
#[derive(Debug)]
pub enum Step {
    /// A chunk of a snapshot at (epoch, version); the staged rows are swapped in on `last`.
    SnapshotChunk {
        source: Arc<Source>,
        epoch: String,
        version: u64,
        entries: SnapEntries,
        last: bool,
        /// Entries of the whole snapshot as the origin told them (0: not told), to size the
        /// staged table once.
        total: u64,
        /// Held until the chunk is applied: the feed's bound on chunks in flight.
        in_flight: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// Forget a half-received snapshot (the stream broke or restarted it).
    AbortSnapshot { source: Arc<Source> },
    /// One version of changes, following the source's current version.
    Batch {
        source: Arc<Source>,
        epoch: String,
        version: u64,
        changes: Vec<BatchChange>,
    },
    /// Nothing newer than (epoch, version): a bookmark and a heartbeat.
    Progress {
        source: Arc<Source>,
        epoch: String,
        version: u64,
    },
    /// Pinned keys of an on_demand topic whose value changed (already applied beside the pins,
    /// see `store::on_demand`): the view rows reading them are computed again.
    Touch {
        source: Arc<Source>,
        keys: Vec<Arc<str>>,
    },
    /// What an on_demand view's cache asks: a row, or to release evicted rows' inputs.
    Rows(RowRequest),
    /// Nothing to apply: wakes the writer so that it settles what happened meanwhile
    /// (evictions) at its next flush.
    Nudge,
    /// The batches of one source transaction (several topics): applied in one step, so that
    /// views and subscribers see all of it or none of it.
    Group(Vec<Step>),
}

/// What a relay needs of the writer (implemented above it, in the serving layer): every
/// applied step of the topics, in the order applied, with the upstream's positions, and after
/// each flush the changes handed to the hub (the views' among them). Called on the writer's
/// task: an implementation never waits.
pub trait Mirror: Send + Sync {
    /// `source` was replaced by a snapshot and holds it whole at (epoch, version).
    fn snapshot(&self, source: &Source, epoch: &str, version: u64);
    /// One version of changes applied to `source`; `None` deletes the key.
    fn batch(
        &self,
        source: &Source,
        epoch: &str,
        version: u64,
        changes: Vec<(Arc<str>, Option<Bytes>)>,
    );
    /// Nothing newer than (epoch, version) for `source`.
    fn progress(&self, source: &Source, epoch: &str, version: u64);
    /// The changes of one flush, views' included, as handed to the hub.
    fn flushed(&self, events: &[Event]);
    /// The batches and positions until [`Mirror::end_group`] are one source transaction
    /// (`Step::Group`): served on, they keep its grouping, so that no one downstream applies
    /// half of it.
    fn begin_group(&self) {}
    /// The end of the group begun by [`Mirror::begin_group`].
    fn end_group(&self) {}
}

/// Counters of the writer, for tests, metrics and status.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub snapshots: std::sync::atomic::AtomicU64,
    pub changes: std::sync::atomic::AtomicU64,
}

/// The single writer: applies steps to the store, runs the view engine, hands changes to the hub.
pub struct Writer {
    hub: Arc<Hub>,
    engine: Option<Engine>,
    staged: HashMap<Arc<str>, Staged>,
    stats: Arc<WriterStats>,
    mirror: Option<Arc<dyn Mirror>>,
    /// Sources whose version moved since the last flush, made visible after it.
    moved: Vec<Arc<Source>>,
}

struct Staged {
    epoch: String,
    version: u64,
    rows: Staging,
}

/// The most rows a staged snapshot reserves room for up front, whatever the origin announces
/// (~4M rows: a table of ~230 MiB).
const STAGED_CAPACITY_MAX: u64 = 1 << 22;

/// Past this many, the event buffer is released after a flush instead of kept for reuse: a
/// snapshot's diff of a million keys would otherwise pin ~70 MiB for the life of the process.
const EVENTS_KEPT: usize = 4096;

impl Writer {
    pub(crate) fn new(hub: Arc<Hub>, engine: Option<Engine>, stats: Arc<WriterStats>) -> Self {
        Writer {
            hub,
            engine,
            staged: HashMap::new(),
            stats,
            mirror: None,
            moved: Vec::new(),
        }
    }

    /// Hands every applied step to `mirror` as well (a relay's served topics and views).
    pub(crate) fn with_mirror(mut self, mirror: Arc<dyn Mirror>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// A writer of topics only (no views), for tools and the fuzz targets.
    pub fn without_views(hub: Arc<Hub>, stats: Arc<WriterStats>) -> Self {
        Self::new(hub, None, stats)
    }

    /// Applies steps until every sender is gone, up to `batch` (`limits.writer_batch`, at least
    /// 1) of them per flush.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Step>, batch: usize) {
        let mut events = Vec::new();
        while let Some(op) = rx.recv().await {
            let hub = self.hub.clone();
            let gate = hub.write_gate();
            self.apply(op, &mut events);
            // Drain what is already queued before handing changes on, so that a burst costs one
            // view pass and one hub dispatch.
            let mut n = 1;
            while n < batch {
                match rx.try_recv() {
                    Ok(op) => self.apply(op, &mut events),
                    Err(_) => break,
                }
                n += 1;
            }
            self.flush(&mut events);
            drop(gate);
            hub.gate_opened();
            if events.capacity() > EVENTS_KEPT {
                events = Vec::new();
            }
        }
        debug!("writer stopped");
    }

    /// Brings the views up to date with `events` (already applied) and hands every change to
    /// the hub.
    pub fn flush(&mut self, events: &mut Vec<Event>) {
        self.derive(events);
        if let Some(m) = &self.mirror {
            m.flushed(events);
        }
        if !events.is_empty() {
            self.hub.publish(events);
            events.clear();
        }
        // The views now reflect every version applied so far: readers waiting with
        // `ReadOptions.after` may read them.
        for s in self.moved.drain(..) {
            s.make_visible();
        }
        if let Some(e) = &self.engine {
            for s in e.sources() {
                s.make_visible();
            }
        }
    }

    /// Notes that `source`'s version moved in this step (made visible at the next flush).
    fn moved(&mut self, source: &Arc<Source>) {
        if !self.moved.iter().any(|s| Arc::ptr_eq(s, source)) {
            self.moved.push(source.clone());
        }
    }

    /// Runs the view engine over `events` and appends the views' changes to them.
    pub fn derive(&mut self, events: &mut Vec<Event>) {
        if let Some(e) = self.engine.as_mut() {
            // Also without events: a view whose inputs synced with no rows is marked synced here.
            let derived = e.apply(events);
            events.extend(derived);
        }
    }

    /// Applies one step; the changes it made are appended to `events` (see [`Writer::flush`]).
    pub fn apply(&mut self, step: Step, events: &mut Vec<Event>) {
        match step {
            Step::SnapshotChunk {
                source,
                epoch,
                version,
                entries,
                last,
                total,
                in_flight: _,
            } => self.snapshot_chunk(source, epoch, version, entries, last, total, events),
            Step::AbortSnapshot { source } => {
                self.staged.remove(source.name());
            }
            Step::Batch {
                source,
                epoch,
                version,
                changes,
            } => {
                if version <= source.version() && *source.epoch() == epoch {
                    return;
                }
                self.stats
                    .batches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .changes
                    .fetch_add(changes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                source.begin_batch();
                let mut mirrored = self
                    .mirror
                    .as_ref()
                    .map(|_| Vec::with_capacity(changes.len()));
                for c in changes {
                    let key: Arc<str> = Arc::from(c.key);
                    if let Some(m) = mirrored.as_mut() {
                        m.push((key.clone(), c.value.clone()));
                    }
                    match c.value {
                        Some(value) => {
                            source.put(&key, version, &value);
                            events.push(Event {
                                source: source.name().clone(),
                                key,
                                version,
                                value: Some(value),
                            });
                        }
                        None => {
                            if source.remove(&key).is_some() {
                                events.push(Event {
                                    source: source.name().clone(),
                                    key,
                                    version,
                                    value: None,
                                });
                            }
                        }
                    }
                }
                source.end_batch();
                source.heard();
                source.set_position(&epoch, version);
                self.moved(&source);
                if let (Some(m), Some(changes)) = (&self.mirror, mirrored) {
                    m.batch(&source, &epoch, version, changes);
                }
            }
            Step::Progress {
                source,
                epoch,
                version,
            } => {
                source.heard();
                if *source.epoch() == epoch && version > source.version() {
                    source.set_version(version);
                    self.moved(&source);
                }
                if let Some(m) = &self.mirror {
                    m.progress(&source, &epoch, version);
                }
            }
            Step::Touch { source, keys } => {
                if let Some(e) = self.engine.as_mut() {
                    e.touch(&source, &keys);
                }
                self.moved(&source);
            }
            Step::Rows(RowRequest::Row { view, key, reply }) => {
                // Everything applied before the request is reflected in the views first, so
                // the row is computed over the same state every other row is.
                self.flush(events);
                let answer = match self.engine.as_mut() {
                    Some(e) => e.row(&view, key),
                    None => RowAnswer::Refused(format!("no on_demand view named '{view}'")),
                };
                let _ = reply.send(answer);
            }
            Step::Rows(RowRequest::Evicted) | Step::Nudge => {}
            Step::Group(steps) => {
                if let Some(m) = &self.mirror {
                    m.begin_group();
                }
                for step in steps {
                    self.apply(step, events);
                }
                if let Some(m) = &self.mirror {
                    m.end_group();
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn snapshot_chunk(
        &mut self,
        source: Arc<Source>,
        epoch: String,
        version: u64,
        entries: SnapEntries,
        last: bool,
        total: u64,
        events: &mut Vec<Event>,
    ) {
        let name = source.name().clone();
        let fresh = match self.staged.get(&name) {
            Some(s) => s.epoch != epoch || s.version != version,
            None => true,
        };
        if fresh {
            self.staged.insert(
                name.clone(),
                Staged {
                    epoch: epoch.clone(),
                    version,
                    // The origin's count sizes the table once; capped, since it is only a
                    // hint (a wrong one costs growth or slack, never rows).
                    rows: Staging::with_capacity(total.min(STAGED_CAPACITY_MAX) as usize),
                },
            );
        }
        let Some(staged) = self.staged.get_mut(&name) else {
            return;
        };
        entries.for_each(|key, version, value| staged.rows.put(key, version, value));
        if !last {
            return;
        }
        let Some(staged) = self.staged.remove(&name) else {
            return;
        };
        let new_epoch = source.epoch().as_str() != staged.epoch;
        let had_epoch = !source.epoch().is_empty();
        let rows = staged.rows.finish();
        let keys = rows.len();
        let old = source.swap(rows);
        let new = source.keyspace();
        // The diff is what readers of changes need: the snapshot replaced every row at once.
        let first = old.is_empty();
        // Into an empty source whose changes nobody reads, the diff would be a million events
        // for nobody: no view reads it, no relay mirrors it, and it has never synced (marked
        // below), so no subscription has started: the hub drops the changes of one whose
        // source has not synced and starts it from the rows this snapshot leaves.
        let wanted = || {
            self.mirror.is_some()
                || self.engine.as_ref().is_some_and(|e| e.reads(&name))
                || source.is_synced()
        };
        if first && wanted() {
            events.reserve(keys);
            // Every row is news: no lookups, no need for key order.
            new.for_each_unordered(|row| {
                events.push(Event {
                    source: name.clone(),
                    key: Arc::from(row.key),
                    version: row.version,
                    value: Some(Bytes::copy_from_slice(row.value)),
                });
            });
        } else if !first {
            new.for_each(|row| {
                if old.with(row.key, |o| o.value == row.value) != Some(true) {
                    events.push(Event {
                        source: name.clone(),
                        key: Arc::from(row.key),
                        version: row.version,
                        value: Some(Bytes::copy_from_slice(row.value)),
                    });
                }
            });
        }
        old.for_each(|row| {
            if new.with(row.key, |_| ()).is_none() {
                events.push(Event {
                    source: name.clone(),
                    key: Arc::from(row.key),
                    version: staged.version,
                    value: None,
                });
            }
        });
        source.heard();
        source.set_position(&staged.epoch, staged.version);
        source.mark_synced();
        self.moved(&source);
        if let Some(m) = &self.mirror {
            m.snapshot(&source, &staged.epoch, staged.version);
        }
        self.stats
            .snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(source = %name, keys, version = staged.version, epoch = %staged.epoch, "snapshot applied");
        if new_epoch && had_epoch {
            // Versions of the new epoch are not comparable with what watchers have seen: they
            // start over from the current rows.
            warn!(source = %name, "origin epoch changed; watchers are reset");
            self.hub.reset_source(&name, "origin restarted (new epoch)");
        }
    }
}

/// The writer's side of the store's [`RowDesk`]: row requests join the writer's one queue, so a
/// row is computed after every step queued before it.
struct Desk(mpsc::WeakSender<Step>);

impl RowDesk for Desk {
    fn ask(&self, request: RowRequest) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(tx) => tx.send(Step::Rows(request)).await.is_ok(),
                None => false,
            }
        })
    }

    fn tell(&self, request: RowRequest) {
        // When the queue is full the writer is busy and settles evictions at its next step.
        if let Some(tx) = self.0.upgrade() {
            let _ = tx.try_send(Step::Rows(request));
        }
    }
}

/// A [`RowDesk`] that queues requests on the writer's queue `tx` without keeping the writer
/// alive.
pub(crate) fn desk(tx: &mpsc::Sender<Step>) -> Arc<dyn RowDesk> {
    Arc::new(Desk(tx.downgrade()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Delivery, Selection, Subscriber};

    fn snapshot(source: &Arc<Source>, version: u64, keys: &[&str]) -> Step {
        Step::SnapshotChunk {
            in_flight: None,
            source: source.clone(),
            epoch: "e".into(),
            version,
            entries: keys
                .iter()
                .map(|k| SnapEntry {
                    key: k.to_string(),
                    value: Bytes::from_static(b"v"),
                    version,
                })
                .collect(),
            last: true,
            total: keys.len() as u64,
        }
    }

    #[test]
    fn a_first_snapshot_whose_changes_nobody_reads_makes_no_events() {
        let hub = Arc::new(Hub::new());
        let source = Arc::new(crate::store::tests::test_source());
        // A subscription waiting for the first sync does not read changes: it starts from the
        // rows the snapshot leaves.
        let mut sub = Subscriber::new(&hub, "t", 8, None);
        sub.subscribe(source.clone(), Selection::Prefix(String::new()), false);
        let mut w = Writer::without_views(hub.clone(), Arc::new(WriterStats::default()));
        let mut events = Vec::new();
        w.apply(snapshot(&source, 1, &["a", "b"]), &mut events);
        assert!(events.is_empty(), "{events:?}");
        w.flush(&mut events);
        assert_eq!(source.len(), 2);
        assert!(matches!(
            sub.try_next(),
            Some(Delivery::Synced { version: 1, .. })
        ));
        assert!(sub.try_next().is_none());
    }

    #[test]
    fn a_snapshot_into_a_synced_empty_source_is_news_to_its_subscribers() {
        let hub = Arc::new(Hub::new());
        let source = Arc::new(crate::store::tests::test_source());
        let mut w = Writer::without_views(hub.clone(), Arc::new(WriterStats::default()));
        let mut events = Vec::new();
        w.apply(snapshot(&source, 1, &[]), &mut events);
        w.flush(&mut events);
        let mut sub = Subscriber::new(&hub, "t", 8, None);
        sub.subscribe(source.clone(), Selection::Prefix(String::new()), false);
        assert!(matches!(
            sub.try_next(),
            Some(Delivery::Synced { version: 1, .. })
        ));
        w.apply(snapshot(&source, 2, &["a"]), &mut events);
        assert_eq!(events.len(), 1);
        w.flush(&mut events);
        assert!(matches!(
            sub.try_next(),
            Some(Delivery::Change { change, .. }) if &*change.key == "a" && change.version == 2
        ));
    }
}
