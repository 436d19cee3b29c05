//! viewcar's own origin: topics held in memory, a retained window of recent changes per topic,
//! and the `Feed` service that pushes them to sidecars.
//!
//! A topic's rows live in a persistent ordered map, so a subscribing stream takes its snapshot
//! as an O(1) clone under the topic lock and copies nothing while publishers wait. Versions are
//! contiguous per topic: one `Publish` = one version.
//!
//! Publishers never wait for streams: each stream has a bounded queue, and a stream whose queue
//! is full is marked lagged for that topic and caught up later with `Reset` + snapshot.

mod durable;
mod gate;
mod mirror;
mod pipe;
pub mod postgres;
mod seed;
mod session;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::OriginConfig;
use crate::pb::feed::v1 as pb;

pub use durable::StoreError;
pub(crate) use mirror::MirroredBatch;
pub use seed::SeedError;
pub use wire::FeedRoutes;
/// A gRPC message as it goes on the wire (prefix and length), for the bench's own leaves.
#[cfg(feature = "bench")]
pub(crate) use wire::{framed, HEADER as GRPC_HEADER};

/// Why an origin could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seed(#[from] SeedError),
}

/// Why a publish was refused; nothing of it was applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("topic name is empty")]
    EmptyTopic,
    #[error("unknown topic '{0}': this origin declares its topics and that is not one of them")]
    UnknownTopic(String),
    #[error("publish carries no changes")]
    NoChanges,
    #[error("publish carries {got} changes; the limit is {limit}")]
    TooManyChanges { got: usize, limit: usize },
    #[error("change {index} has an empty key")]
    EmptyKey { index: usize },
    #[error("key {index} of the request is empty")]
    EmptyRequestedKey { index: usize },
    #[error("key '{0}' appears twice in one publish")]
    DuplicateKey(String),
    #[error(
        "publish would be a feed message of about {bytes} bytes; the limit is {limit} (max_message_bytes)"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error(
        "change of key '{key}' alone is about {bytes} bytes on the feed; the limit is {limit} (max_message_bytes)"
    )]
    ChangeTooLarge {
        key: String,
        bytes: usize,
        limit: usize,
    },
    #[error("publish not applied: the origin could not write it to its data directory: {0}")]
    Storage(String),
    #[error("topic '{0}' is the Postgres table of the same name: write to the database, not to the origin")]
    TableBacked(String),
    #[error("this is a relay: it serves what it holds from {upstream} and takes no publishes; publish to {upstream}")]
    Relay { upstream: String },
    #[error("topic '{0}' has not synced from upstream yet at this relay; retry shortly")]
    NotSynced(String),
}

/// Room kept below `max_message_bytes` for what a feed message adds around the published
/// changes: the topic, the epoch, versions, and the few bytes by which a snapshot entry can be
/// larger than the change it came from.
const FEED_OVERHEAD: usize = 64;

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Storage(_) | PublishError::NotSynced(_) => {
                Status::unavailable(e.to_string())
            }
            PublishError::TableBacked(_) | PublishError::Relay { .. } => {
                Status::failed_precondition(e.to_string())
            }
            e => Status::invalid_argument(e.to_string()),
        }
    }
}

/// One change of a publish; `value: None` deletes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub key: String,
    pub value: Option<Bytes>,
}

impl Put {
    pub fn upsert(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Put {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Put {
            key: key.into(),
            value: None,
        }
    }
}

/// Counters of an origin: what its streams were sent.
#[derive(Debug, Default)]
pub struct OriginStats {
    pub published: AtomicU64,
    pub streams_opened: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub resets_sent: AtomicU64,
    pub resumes: AtomicU64,
    pub batches_sent: AtomicU64,
    /// Streams that fell behind their queue and were caught up by Reset + snapshot.
    pub lagged: AtomicU64,
    pub progress_sent: AtomicU64,
    /// Publishes refused for a missing or wrong bearer token (nothing applied).
    pub unauthenticated: AtomicU64,
    /// `Fetch` calls served (point reads of on_demand replicas).
    pub fetches: AtomicU64,
    /// Whole-topic snapshots encoded into chunks: once per topic and position, however many
    /// streams are sent it.
    pub snapshot_encodings: AtomicU64,
    /// Chunks those encodings made.
    pub snapshot_chunks_encoded: AtomicU64,
    /// Change batches encoded once and shared by the whole-topic streams that are sent them.
    pub batch_encodings: AtomicU64,
}

/// Why [`Origin::serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub value: Bytes,
    pub version: u64,
}

/// A published version, as retained and as queued to streams.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The topic's name: a session takes it from here, so that queueing a batch for a stream
    /// does not clone and drop a reference count shared by every stream of the topic.
    pub topic: Arc<str>,
    pub version: u64,
    pub changes: Vec<pb::Change>,
    pub bytes: usize,
    /// The topic's version just before this batch: the `prev_version` every whole-topic stream
    /// that had everything before it names.
    pub prev: u64,
    /// The incarnation of the topic's data it belongs to (see [`TopicState::generation`]).
    pub generation: u64,
    /// This batch as a whole-topic stream at `prev` is sent it, encoded once by the first
    /// such stream and shared by the others (a relay's thousands of streams encode nothing).
    pub encoded: OnceLock<Bytes>,
}

impl Batch {
    pub(crate) fn new(
        topic: Arc<str>,
        version: u64,
        prev: u64,
        changes: Vec<pb::Change>,
        bytes: usize,
    ) -> Self {
        Batch {
            topic,
            version,
            changes,
            bytes,
            prev,
            generation: 0,
            encoded: OnceLock::new(),
        }
    }
}

/// A `Sync` stream: its connection's key first, so that a topic's streams, kept in this
/// order, are offered a batch connection by connection. The streams of one connection then
/// run one after the other, and the connection's corked writes ([`crate::accept`]) gather all
/// their frames in a write or two, where streams woken in no order left a hundred-stream
/// connection to write a dozen times per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SessionId {
    /// The same for every stream of one connection (from the peer's address; 0 when there
    /// is none, as on a Unix socket).
    pub conn: u64,
    /// Unique among the origin's streams.
    pub seq: u64,
}

/// A stream's interest in a topic, kept under the topic lock so that publish sees it
/// consistently.
pub(crate) struct Interest {
    /// `None` = the whole topic.
    pub keys: Option<HashSet<Arc<str>>>,
    pub queue: Arc<session::Queue>,
    /// Batches of this topic queued and not yet taken by the stream.
    pub pending: Arc<AtomicU64>,
    pub lagged: bool,
    /// For keyed interest: the bytes of its keys and of their values when subscribed.
    pub bytes: u64,
}

pub(crate) struct TopicState {
    pub data: imbl::OrdMap<Arc<str>, Stored>,
    pub version: u64,
    pub log: VecDeque<Arc<Batch>>,
    pub log_bytes: usize,
    /// The version just before the oldest retained batch: a stream that has applied at least
    /// this resumes from the log. Versions need not be contiguous (a database-fed topic uses
    /// commit positions), so this is kept, not derived from the first batch.
    pub floor: u64,
    pub interests: BTreeMap<SessionId, Interest>,
    /// The epoch of the topic's positions: the origin's own, or, at a relay, its upstream's
    /// (`None` until the relay has the topic's first snapshot: streams wait for it).
    pub epoch: Option<Arc<str>>,
    /// Bumped when a relay's topic is replaced by a new upstream snapshot: batches queued
    /// before it are not sent after it.
    pub generation: u64,
    /// The whole-topic snapshot at the current position, encoded once for every stream that
    /// needs it (a burst of subscribers at one position shares its chunks). Dropped when the
    /// position moves, or once no stream has held it for a while (see `session`).
    pub shared_snapshot: Option<Arc<session::SharedSnapshot>>,
}

pub(crate) struct Topic {
    pub name: Arc<str>,
    pub state: Mutex<TopicState>,
    /// At a relay: the replica this topic mirrors. Progress is sent only while it is live, so
    /// a relay cut off from its upstream shows downstream as stale, not as current.
    pub mirror_of: Option<Arc<crate::store::Source>>,
}

impl TopicState {
    /// The topic's rows are now `data` at `version` (a new initial copy of a table, a relay's
    /// new upstream snapshot): the log starts over there, batches queued before are not sent
    /// after it, and every stream is caught up with Reset + snapshot.
    pub(crate) fn replace(
        &mut self,
        name: &Arc<str>,
        data: imbl::OrdMap<Arc<str>, Stored>,
        version: u64,
    ) {
        self.data = data;
        self.version = version;
        self.log.clear();
        self.log_bytes = 0;
        self.floor = version;
        self.generation += 1;
        self.shared_snapshot = None;
        for interest in self.interests.values_mut() {
            session::resnapshot(name, interest);
        }
    }

    /// Applies `changes`, written at `version`, to the rows and appends them to the retained
    /// log as one batch of `bytes` (see `durable::batch_bytes`): what a Publish and a database
    /// transaction both do. The topic's own version is the caller's to move.
    pub(crate) fn append(
        &mut self,
        topic: &Arc<str>,
        version: u64,
        changes: Vec<pb::Change>,
        bytes: usize,
    ) -> Arc<Batch> {
        for c in &changes {
            if c.deleted {
                self.data.remove(c.key.as_str());
            } else {
                self.data.insert(
                    Arc::from(c.key.as_str()),
                    Stored {
                        value: c.value.clone(),
                        version,
                    },
                );
            }
        }
        let mut batch = Batch::new(topic.clone(), version, self.version, changes, bytes);
        batch.generation = self.generation;
        let batch = Arc::new(batch);
        self.log_bytes += batch.bytes;
        self.log.push_back(batch.clone());
        self.shared_snapshot = None;
        batch
    }
}

impl Topic {
    fn new(name: &str, epoch: Option<Arc<str>>) -> Self {
        Topic {
            name: Arc::from(name),
            state: Mutex::new(TopicState {
                data: imbl::OrdMap::new(),
                version: 0,
                log: VecDeque::new(),
                log_bytes: 0,
                floor: 0,
                interests: BTreeMap::new(),
                epoch,
                generation: 0,
                shared_snapshot: None,
            }),
            mirror_of: None,
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, TopicState> {
        // Every critical section leaves the state whole before it can panic (allocation aside),
        // so a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct Inner {
    pub cfg: OriginConfig,
    pub epoch: String,
    /// Set on a relay: what it mirrors (named in the refusal of Publish). Its topics take
    /// their epochs and versions from there, not from this origin's own `epoch`.
    pub upstream: Option<String>,
    pub topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    pub declared: Option<HashSet<String>>,
    pub stats: OriginStats,
    pub streams: Arc<Semaphore>,
    pub next_session: AtomicU64,
    /// Bumped to end every stream open at that moment; new streams are still accepted.
    pub cut: watch::Sender<u64>,
    /// Set when the origin shuts down: new streams are refused. Once true, stays true.
    pub shutting_down: AtomicBool,
    /// How far the topics fed by a database trail it (ms, bytes), told in Progress.
    pub upstream_lag: (AtomicU64, AtomicU64),
    /// Rows read by a copy of the database in progress (0 when none runs).
    pub upstream_copied: AtomicU64,
    /// The durable copy: `None` = in memory only; `Some(None)` = closed (publishes refused).
    store: Option<Mutex<Option<durable::Store>>>,
}

impl Inner {
    /// The one place an origin's (or a relay's) shared state is put together: every field
    /// but the ones given starts empty.
    pub(crate) fn new(
        cfg: OriginConfig,
        epoch: String,
        topics: HashMap<Arc<str>, Arc<Topic>>,
        declared: Option<HashSet<String>>,
        upstream: Option<String>,
        store: Option<durable::Store>,
    ) -> Self {
        let streams = Arc::new(Semaphore::new(cfg.max_streams));
        Inner {
            cfg,
            epoch,
            upstream,
            topics: RwLock::new(topics),
            declared,
            stats: OriginStats::default(),
            streams,
            next_session: AtomicU64::new(1),
            cut: watch::channel(0).0,
            shutting_down: AtomicBool::new(false),
            upstream_lag: (AtomicU64::new(0), AtomicU64::new(0)),
            upstream_copied: AtomicU64::new(0),
            store: store.map(|s| Mutex::new(Some(s))),
        }
    }

    /// The durable copy, if this origin has one and it is still open.
    fn store_guard(&self) -> std::sync::MutexGuard<'_, Option<durable::Store>> {
        static NONE: Mutex<Option<durable::Store>> = Mutex::new(None);
        // A write either commits or not before it can panic, so a poisoned lock still guards a
        // usable database handle.
        self.store
            .as_ref()
            .unwrap_or(&NONE)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// An origin: embed it in a Rust service (call [`Origin::publish`] on writes, serve
/// [`Origin::service`]) or run it as `viewcar origin`.
#[derive(Clone)]
pub struct Origin {
    inner: Arc<Inner>,
}

impl Origin {
    /// Records how far the topics fed by a database trail it; sent with every Progress of
    /// those topics.
    pub(crate) fn set_upstream_lag(&self, ms: u64, bytes: u64) {
        self.inner.upstream_lag.0.store(ms, Ordering::Relaxed);
        self.inner.upstream_lag.1.store(bytes, Ordering::Relaxed);
    }

    /// Streams subscribed to `topic` now, those waiting for its first copy included.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.topic(topic, false)
            .map_or(0, |t| t.lock().interests.len())
    }

    /// Records the rows a copy of the database in progress has read (0: none runs).
    pub(crate) fn set_upstream_copied(&self, rows: u64) {
        self.inner.upstream_copied.store(rows, Ordering::Relaxed);
    }

    /// A Progress of `topic` at `position`, telling how far the topic trails the system it
    /// follows: a relay passes on what its own upstream told about it; a table's topic has the
    /// database's replication lag and the rows of a copy in progress; a published topic, zeros.
    pub(crate) fn progress(&self, topic: &str, position: Option<pb::Position>) -> pb::Progress {
        let mirrored = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .and_then(|t| t.mirror_of.clone());
        let ((lag_ms, lag_bytes), copied_rows) = match mirrored {
            Some(source) => (source.upstream_lag(), source.upstream_copied_rows()),
            None if postgres::is_table(&self.inner.cfg, topic) => (
                (
                    self.inner.upstream_lag.0.load(Ordering::Relaxed),
                    self.inner.upstream_lag.1.load(Ordering::Relaxed),
                ),
                self.inner.upstream_copied.load(Ordering::Relaxed),
            ),
            None => ((0, 0), 0),
        };
        pb::Progress {
            topic: topic.to_string(),
            position,
            upstream_lag_ms: lag_ms,
            upstream_lag_bytes: lag_bytes,
            upstream_copied_rows: copied_rows,
        }
    }

    /// How far `topic` trails the system it follows (ms, bytes): (0, 0) for a published topic.
    pub fn upstream_lag(&self, topic: &str) -> (u64, u64) {
        let p = self.progress(topic, None);
        (p.upstream_lag_ms, p.upstream_lag_bytes)
    }

    /// A new, empty, in-memory origin with a fresh epoch. `cfg.data_dir` is not read here:
    /// [`Origin::open`] is the constructor that honours it.
    pub fn new(cfg: OriginConfig) -> Self {
        if cfg.data_dir.is_some() {
            warn!("Origin::new ignores data_dir; use Origin::open for a durable origin");
        }
        let epoch = format!("{:016x}", rand::random::<u64>());
        Self::build(cfg, epoch, None, Default::default())
    }

    /// An origin as the config says: in memory without `data_dir` (a fresh epoch every time);
    /// with it, the durable copy under that directory is loaded (same epoch, versions, rows and
    /// retained changes as when it was last written) and every publish is written there first.
    /// The directory is held until [`Origin::close`] or the last clone is dropped.
    pub fn open(cfg: OriginConfig) -> Result<Self, StoreError> {
        let Some(dir) = cfg.data_dir.clone() else {
            return Ok(Origin::new(cfg));
        };
        let (store, loaded) = durable::Store::open(&dir, cfg.fsync, cfg.cache_bytes.0)?;
        let declared: Option<HashSet<&str>> = if cfg.topics.is_empty() {
            None
        } else {
            Some(cfg.topics.iter().map(String::as_str).collect())
        };
        let mut topics = HashMap::new();
        for (name, t) in loaded.topics {
            if declared
                .as_ref()
                .is_some_and(|d| !d.contains(name.as_str()))
            {
                warn!(topic = %name, dir = %dir.display(), "stored topic is not declared; not served (its data stays on disk)");
                continue;
            }
            let topic = Topic::new(&name, Some(Arc::from(loaded.epoch.as_str())));
            {
                let mut st = topic.lock();
                st.data = t.data;
                st.version = t.version;
                st.log_bytes = t.log.iter().map(|b| b.bytes).sum();
                st.log = t.log;
                st.floor = st
                    .log
                    .front()
                    .map_or(st.version, |b| b.version.saturating_sub(1));
                retain(&cfg, &mut st);
                let keep_from = st.log.front().map_or(st.version + 1, |b| b.version);
                store.trim(&name, keep_from)?;
            }
            topics.insert(name, topic);
        }
        let origin = Self::build(cfg, loaded.epoch, Some(store), topics);
        let weak = Arc::downgrade(&origin.inner);
        let every = origin.inner.cfg.fsync_interval.0;
        if let Some(store) = origin.inner.store_guard().as_mut() {
            store.start_sync(weak, every);
        }
        Ok(origin)
    }

    fn build(
        cfg: OriginConfig,
        epoch: String,
        store: Option<durable::Store>,
        mut loaded: HashMap<String, Topic>,
    ) -> Self {
        let declared = if cfg.topics.is_empty() {
            None
        } else {
            Some(cfg.topics.iter().cloned().collect())
        };
        let mut topics: HashMap<Arc<str>, Arc<Topic>> = HashMap::new();
        for t in &cfg.topics {
            let topic = loaded
                .remove(t)
                .unwrap_or_else(|| Topic::new(t, Some(Arc::from(epoch.as_str()))));
            topics.insert(Arc::from(t.as_str()), Arc::new(topic));
        }
        for (name, topic) in loaded {
            topics.insert(Arc::from(name.as_str()), Arc::new(topic));
        }
        Origin {
            inner: Arc::new(Inner::new(cfg, epoch, topics, declared, None, store)),
        }
    }

    /// [`Origin::open`], then the config's seed file, if any. A durable origin that already
    /// holds data does not load the seed again: its data directory is the truth.
    pub fn with_seed(cfg: OriginConfig) -> Result<Self, OpenError> {
        let seed = cfg.seed.clone();
        let origin = Origin::open(cfg)?;
        if let Some(path) = seed {
            let restored = origin
                .topics()
                .iter()
                .any(|t| origin.version(t).is_some_and(|v| v > 0));
            if restored {
                info!(file = %path.display(), "seed not loaded: the data directory holds data");
            } else {
                let n = seed::load(&origin, &path)?;
                info!(file = %path.display(), keys = n, "seed loaded");
            }
        }
        Ok(origin)
    }

    /// Syncs and releases the data directory (a clean close: the next open keeps this epoch).
    /// Publishes after this are refused. Without a data directory, does nothing.
    pub fn close(&self) {
        self.inner.store_guard().take();
    }

    /// This incarnation's id: versions are comparable only within one epoch.
    pub fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    /// Sync streams open now.
    pub fn open_streams(&self) -> usize {
        self.inner
            .cfg
            .max_streams
            .saturating_sub(self.inner.streams.available_permits())
    }

    pub fn stats(&self) -> &OriginStats {
        &self.inner.stats
    }

    pub fn config(&self) -> &OriginConfig {
        &self.inner.cfg
    }

    pub(crate) fn topic(&self, name: &str, create: bool) -> Result<Arc<Topic>, PublishError> {
        if name.is_empty() {
            return Err(PublishError::EmptyTopic);
        }
        if let Some(t) = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(t.clone());
        }
        if self.inner.declared.is_some() || !create {
            return Err(PublishError::UnknownTopic(name.to_string()));
        }
        let mut topics = self.inner.topics.write().unwrap_or_else(|p| p.into_inner());
        Ok(topics
            .entry(Arc::from(name))
            .or_insert_with(|| Arc::new(Topic::new(name, Some(Arc::from(self.epoch())))))
            .clone())
    }

    /// Topic names, sorted.
    pub fn topics(&self) -> Vec<String> {
        let topics = self.inner.topics.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = topics.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// The current version of a topic (0 = never published).
    pub fn version(&self, topic: &str) -> Option<u64> {
        let t = self.topic(topic, false).ok()?;
        let v = t.lock().version;
        Some(v)
    }

    /// Every row of a topic, in key order (for tests and tools).
    pub fn rows(&self, topic: &str) -> Vec<(String, Bytes)> {
        let Ok(t) = self.topic(topic, false) else {
            return Vec::new();
        };
        let data = t.lock().data.clone();
        data.iter()
            .map(|(k, v)| (k.to_string(), v.value.clone()))
            .collect()
    }

    /// Applies `changes` to `topic` as one new version and pushes it to subscribed streams.
    /// All or nothing: a refused publish changes nothing.
    pub fn publish(&self, topic: &str, changes: Vec<Put>) -> Result<pb::Position, PublishError> {
        self.publish_inner(topic, changes, true)
    }

    pub(crate) fn publish_inner(
        &self,
        topic: &str,
        changes: Vec<Put>,
        limit: bool,
    ) -> Result<pb::Position, PublishError> {
        if topic.is_empty() {
            return Err(PublishError::EmptyTopic);
        }
        if let Some(upstream) = &self.inner.upstream {
            return Err(PublishError::Relay {
                upstream: upstream.clone(),
            });
        }
        if postgres::is_table(&self.inner.cfg, topic) {
            return Err(PublishError::TableBacked(topic.to_string()));
        }
        if changes.is_empty() {
            return Err(PublishError::NoChanges);
        }
        let max = self.inner.cfg.max_publish_changes;
        if limit && changes.len() > max {
            return Err(PublishError::TooManyChanges {
                got: changes.len(),
                limit: max,
            });
        }
        let mut uniq = HashSet::with_capacity(changes.len());
        for (index, c) in changes.iter().enumerate() {
            if c.key.is_empty() {
                return Err(PublishError::EmptyKey { index });
            }
            if !uniq.insert(c.key.as_str()) {
                return Err(PublishError::DuplicateKey(c.key.clone()));
            }
        }
        drop(uniq);
        let t = self.topic(topic, true)?;
        let mut bytes = 0;
        let pb_changes: Vec<pb::Change> = changes
            .into_iter()
            .map(|c| {
                bytes += c.key.len() + c.value.as_ref().map_or(0, |v| v.len()) + 8;
                match c.value {
                    Some(value) => pb::Change {
                        key: c.key,
                        value,
                        deleted: false,
                    },
                    None => pb::Change {
                        key: c.key,
                        value: Bytes::new(),
                        deleted: true,
                    },
                }
            })
            .collect();
        self.check_size(&t.name, &pb_changes, limit)?;
        let mut st = t.lock();
        let version = st.version + 1;
        if self.inner.store.is_some() {
            let trim = self.trimmed(&st, bytes);
            let store = self.inner.store_guard();
            let written = match store.as_ref() {
                Some(store) => store.write_batch(&t.name, version, &pb_changes, trim),
                None => Err(StoreError::Closed),
            };
            written.map_err(|e| {
                warn!(topic = %t.name, version, error = %e, "publish refused: not written");
                PublishError::Storage(e.to_string())
            })?;
        }
        let batch = st.append(&t.name, version, pb_changes, bytes);
        st.version = version;
        retain(&self.inner.cfg, &mut st);
        let st = &mut *st;
        for interest in st.interests.values_mut() {
            session::offer(&self.inner, &t.name, interest, &batch, None);
        }
        self.inner.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(pb::Position {
            epoch: self.inner.epoch.clone(),
            version,
        })
    }

    /// The log versions that [`retain`] will drop once a batch of `bytes` is appended: the
    /// durable copy drops them in the same write.
    fn trimmed(&self, st: &TopicState, bytes: usize) -> std::ops::Range<u64> {
        let (max_n, max_b) = (
            self.inner.cfg.retain_batches,
            self.inner.cfg.retain_bytes.as_usize(),
        );
        let (mut len, mut total) = (st.log.len() + 1, st.log_bytes + bytes);
        let first = st.log.front().map_or(st.version + 1, |b| b.version);
        let mut dropped = 0;
        for b in &st.log {
            if !(len > max_n || (total > max_b && len > 1)) {
                break;
            }
            len -= 1;
            total -= b.bytes;
            dropped += 1;
        }
        first..first + dropped
    }

    /// Refuses changes that could not reach a sidecar: every version is sent as one
    /// `ChangeBatch` and every key in a snapshot chunk of at least one entry, and a message above
    /// the origin's own `max_message_bytes` fails to encode, which would break every stream that
    /// carries it, on every reconnect. Seed loads (`whole = false`) are only ever sent as snapshot
    /// chunks, so only each change must fit.
    fn check_size(
        &self,
        topic: &str,
        changes: &[pb::Change],
        whole: bool,
    ) -> Result<(), PublishError> {
        use prost::encoding::{encoded_len_varint, message};
        let limit = self.inner.cfg.max_message_bytes.as_usize();
        let room = limit.saturating_sub(FEED_OVERHEAD + topic.len() + self.inner.epoch.len());
        let mut total = 0;
        for c in changes {
            let len = message::encoded_len(5, c);
            if len > room {
                return Err(PublishError::ChangeTooLarge {
                    key: c.key.clone(),
                    bytes: len + limit - room,
                    limit,
                });
            }
            total += len;
        }
        if whole && total > room {
            return Err(PublishError::TooLarge {
                bytes: total + encoded_len_varint(total as u64) + limit - room,
                limit,
            });
        }
        Ok(())
    }

    /// Keys of `topic` that streams subscribed one by one (on_demand sidecars), summed over
    /// streams; whole-topic subscriptions are not counted.
    pub fn keyed_subscriptions(&self, topic: &str) -> usize {
        let Ok(t) = self.topic(topic, false) else {
            return 0;
        };
        let st = t.lock();
        st.interests
            .values()
            .filter_map(|i| i.keys.as_ref().map(|k| k.len()))
            .sum()
    }

    /// True if some stream subscribed `key` of `topic` one by one.
    pub fn is_key_subscribed(&self, topic: &str, key: &str) -> bool {
        let Ok(t) = self.topic(topic, false) else {
            return false;
        };
        let st = t.lock();
        st.interests
            .values()
            .any(|i| i.keys.as_ref().is_some_and(|k| k.contains(key)))
    }

    /// Point reads of a topic.
    pub fn fetch(&self, topic: &str, keys: &[String]) -> Result<pb::FetchResponse, PublishError> {
        self.inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
        if let Some(index) = keys.iter().position(String::is_empty) {
            return Err(PublishError::EmptyRequestedKey { index });
        }
        let t = self.topic(topic, false)?;
        let (data, version, epoch) = {
            let st = t.lock();
            (st.data.clone(), st.version, st.epoch.clone())
        };
        let Some(epoch) = epoch else {
            return Err(PublishError::NotSynced(topic.to_string()));
        };
        let mut resp = pb::FetchResponse {
            position: Some(pb::Position {
                epoch: epoch.to_string(),
                version,
            }),
            ..Default::default()
        };
        for k in keys {
            match data.get(k.as_str()) {
                Some(s) => resp.entries.push(wire::entry(k, s)),
                None => resp.missing.push(k.clone()),
            }
        }
        Ok(resp)
    }

    /// The gRPC service, with the configured message limits: `Sync` sends a change batch or a
    /// snapshot chunk that many streams need encoded once for all of them.
    pub fn service(&self) -> FeedRoutes {
        FeedRoutes::new(self.clone(), self.inner.cfg.max_message_bytes.as_usize())
    }

    /// Admits a `Sync` stream (within `max_streams`): the frames its session will send, and
    /// the session, for the stream's response body to run (it holds the stream's permit).
    pub(crate) fn open_sync(
        &self,
        requests: tonic::Streaming<pb::SyncRequest>,
        conn: u64,
    ) -> Result<(session::Frames, session::Running), Status> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(Status::unavailable("origin is shutting down"));
        }
        let permit = inner.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} serves at most {} streams (max_streams)",
                if inner.upstream.is_some() {
                    "this relay"
                } else {
                    "origin"
                },
                inner.cfg.max_streams
            ))
        })?;
        let (tx, rx) = pipe::channel(inner.cfg.stream_send_buffer);
        let origin = self.clone();
        let running = Box::pin(async move {
            session::run(origin, requests, tx, conn).await;
            drop(permit);
        });
        Ok((rx, running))
    }

    /// Ends every open stream now; sidecars see the feed drop, reconnect and resume. New
    /// streams are still served (stopping the origin is `serve`'s shutdown).
    pub fn close_streams(&self) {
        self.inner.cut.send_modify(|generation| *generation += 1);
    }

    /// Serves `Feed` (with gRPC health and reflection; over TLS when the config says so) on
    /// `listener` until `shutdown` resolves; open streams are ended then.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        const FEED: &str = "viewcar.feed.v1.Feed";
        // Only a config with allow_non_loopback gets here with such an address (validate), but
        // exposing the feed beyond the host is worth a line in the log every time.
        if let Ok(addr) = listener.local_addr() {
            if !addr.ip().is_loopback() {
                warn!(
                    %addr,
                    tls = self.inner.cfg.tls.is_some(),
                    publish_token = self.inner.cfg.publish_token.is_some(),
                    "origin serves Feed beyond loopback"
                );
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (health, health_service) = crate::introspect::health(FEED, stop_rx).await;
        crate::introspect::set_serving(&health, FEED, true).await;
        let (reflection, reflection_alpha) = crate::introspect::reflection(&[FEED]);
        let me = self.clone();
        let shutdown = async move {
            shutdown.await;
            me.inner.shutting_down.store(true, Ordering::Release);
            crate::introspect::set_serving(&health, FEED, false).await;
            stop_tx.send_replace(true);
            me.close_streams();
        };
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &self.inner.cfg.tls {
            server = server.tls_config(tls.load()?)?;
        }
        server
            .http2_keepalive_interval(Some(self.inner.cfg.keepalive_interval.0))
            .http2_keepalive_timeout(Some(self.inner.cfg.keepalive_timeout.0))
            .add_service(self.service())
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .serve_with_incoming_shutdown(
                crate::accept::incoming(
                    listener,
                    crate::accept::Bounds {
                        max_connections: self.inner.cfg.max_connections,
                        header_timeout: self.inner.cfg.header_timeout.0,
                        cork: true,
                    },
                    "feed",
                ),
                shutdown,
            )
            .await?;
        Ok(())
    }
}

/// Drops the oldest batches of the retained window beyond `retain_batches` / `retain_bytes`
/// (the newest is always kept).
fn retain(cfg: &OriginConfig, st: &mut TopicState) {
    let (max_n, max_b) = (cfg.retain_batches, cfg.retain_bytes.as_usize());
    while st.log.len() > max_n || (st.log_bytes > max_b && st.log.len() > 1) {
        if let Some(b) = st.log.pop_front() {
            st.log_bytes -= b.bytes;
            st.floor = b.version;
        }
    }
}

/// The `Feed` gRPC service of an [`Origin`].
pub(crate) struct FeedService {
    origin: Origin,
}

#[tonic::async_trait]
impl pb::feed_server::Feed for FeedService {
    type SyncStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SyncResponse, Status>> + Send>,
    >;

    /// Never reached: this service is built only inside [`FeedRoutes`], which answers `Sync`
    /// itself (with shared encodings) and hands it every other method.
    async fn sync(
        &self,
        _request: Request<tonic::Streaming<pb::SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        Err(Status::internal(
            "Sync is answered by FeedRoutes, not FeedService",
        ))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let req = request.into_inner();
        if let Some(up) = &self.origin.inner.upstream {
            if !self.origin.topics().contains(&req.topic) {
                return Err(Status::failed_precondition(format!(
                    "this relay holds no full topic or view named '{}' (on_demand topics are not \
                     relayed: fetch them from {up})",
                    req.topic
                )));
            }
        }
        let resp = self
            .origin
            .fetch(&req.topic, &req.keys)
            .map_err(|e| match e {
                PublishError::UnknownTopic(t) => Status::not_found(format!(
                    "no topic named '{}'",
                    crate::types::clipped(&t, 128)
                )),
                other => Status::from(other),
            })?;
        Ok(Response::new(resp))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        if let Some(token) = &self.origin.inner.cfg.publish_token {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::auth::bearer);
            if !crate::auth::token_matches(presented, token) {
                self.origin
                    .inner
                    .stats
                    .unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Status::unauthenticated(
                    "Publish needs the header `authorization: Bearer <token>` with this origin's publish_token",
                ));
            }
        }
        let req = request.into_inner();
        let changes = req
            .changes
            .into_iter()
            .map(|c| Put {
                key: c.key,
                value: if c.deleted { None } else { Some(c.value) },
            })
            .collect();
        let position = self.origin.publish(&req.topic, changes)?;
        Ok(Response::new(pb::PublishResponse {
            position: Some(position),
        }))
    }
}
