//! The sidecar's feed client: one `Sync` stream per origin, multiplexing all of its topics.
//!
//! The client owns the per-topic protocol state (`cursor` = the last position handed to the
//! writer), so it alone decides what is a duplicate (version at or below the cursor: ignored),
//! a gap (`prev_version` not the cursor: resubscribe without resume, never apply across it), or
//! a new snapshot. The writer applies what the client forwards, in order, so on reconnect the
//! cursor is exactly where the replica will be: the resume point.
//!
//! Reconnects back off exponentially with full jitter up to a cap; HTTP/2 keepalive and an idle
//! timeout (origins send `Progress` every few seconds) notice a silently dead origin.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;

use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::config::{FeedConfig, OriginSpec};
use crate::pb::feed::v1 as pb;
use crate::store::on_demand::{KeyOp, Slot};
use crate::store::{Fetched, Fetcher, OnDemand, Source};
use crate::types::redact_address;
use crate::writer::{BatchChange, Step};

mod chunk;
pub mod probe;
#[cfg(any(test, feature = "fuzzing"))]
mod replay;
#[cfg(any(test, feature = "fuzzing"))]
pub use replay::{decode_streams, replay, Replayed};

/// The index of the address dialled first among `n`: spread by a hash of the sidecar's
/// instance name (FNV-1a, stable across builds and platforms), so that leaves listing the same
/// relays do not all land on the first one; the first address when the sidecar has no name.
pub(crate) fn first_address(instance: Option<&str>, n: usize) -> usize {
    let Some(name) = instance.filter(|s| !s.is_empty()) else {
        return 0;
    };
    if n <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// Keys per keyed `Subscribe` / `Unsubscribe` request: well below the origin's limit, and a
/// keyed snapshot answering one stays a small message.
const KEYS_PER_REQUEST: usize = 128;

/// A new stream resumes topic by topic, each with the tail of batches it missed: until every
/// resumed topic's tail has ended (its first Progress), what arrives is held and then handed
/// to the writer as one step, so a transaction that touched several topics (or was split in
/// several batches of one) is never half visible. Bounded: past this many held steps, or
/// [`RESUME_BARRIER_FOR`] after the stream opened, what is held is applied as it stands.
const RESUME_BARRIER_STEPS: usize = 4096;
const RESUME_BARRIER_FOR: Duration = Duration::from_secs(1);

/// Counters of one origin's feed, for tests, metrics and status.
#[derive(Debug, Default)]
pub struct FeedStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub resets: AtomicU64,
    pub snapshots: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// The delay drawn (full jitter) before the last redial, in milliseconds.
    pub last_redial_delay_ms: AtomicU64,
    /// Subscriptions the origin refused (`Refused`: e.g. no such topic), retries included.
    pub refusals: AtomicU64,
    /// Why the feed last failed, in words a user can act on, and when (unix ms).
    pub last_error: std::sync::Mutex<Option<(String, u64)>>,
}

impl FeedStats {
    /// The last failure and when it happened (unix ms), if any.
    pub fn last_error(&self) -> Option<(String, u64)> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_last_error(&self, cause: String) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((cause, at));
    }
}

/// Why a feed stream ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("invalid origin address: {0}")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("connect failed: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("origin refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("no message from the origin for {0:?}")]
    Idle(Duration),
    #[error("origin broke the feed protocol: {0}")]
    Protocol(String),
    #[error("origin closed the stream")]
    Closed,
    #[error("the writer stopped")]
    WriterGone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    epoch: String,
    version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Applying changes after `cursor`.
    Live,
    /// Receiving a snapshot at this position.
    Snapshot(Cursor),
    /// Dropping changes until the snapshot that a resubscribe or Reset announced.
    AwaitSnapshot,
}

struct TopicState {
    source: Arc<Source>,
    cursor: Option<Cursor>,
    phase: Phase,
    /// Snapshots the origin owes this stream: one per `Subscribe` without resume and one per
    /// `Reset`. A snapshot that starts when none is owed is not an answer to anything (a stray
    /// chunk after `last` would otherwise park the topic in `Snapshot` and drop every batch).
    owed: u32,
    loading: Option<Loading>,
    /// The origin refused the topic: when to subscribe it again, and how often it has.
    refused: Option<Refusal>,
}

/// A topic the origin refused. Only that topic waits: the stream and its other topics go on.
struct Refusal {
    /// Refusals in a row: the backoff's exponent.
    attempt: u32,
    /// When to subscribe again; `None` while a retried Subscribe awaits its answer.
    retry_at: Option<tokio::time::Instant>,
}

/// Progress of a snapshot being received, for the log: a large topic takes a while.
struct Loading {
    started: Instant,
    logged: Instant,
    keys: u64,
}

/// How often a snapshot still loading is logged.
const LOAD_LOG_EVERY: Duration = Duration::from_secs(2);

/// What a keyed snapshot (chunks ending with `last`) on an on_demand topic answers.
#[derive(Debug)]
enum Answer {
    /// The first keyed `Subscribe` of the stream: it sets the topic's position.
    First(Vec<Arc<str>>),
    /// Keys added to the stream's keyed interest; the position does not move.
    Added(Vec<Arc<str>>),
}

/// An on_demand topic on the stream: a keyed interest in its resident keys. Its data bypasses
/// the writer: the resident keys live in moka, and versions order the two ways a value comes
/// in (see `store::on_demand`).
struct KeyedState {
    source: Arc<Source>,
    od: Arc<OnDemand>,
    /// True once this stream has a keyed interest in the topic.
    subscribed: bool,
    cursor: Option<Cursor>,
    /// Keyed snapshots still to come, in request order.
    answers: VecDeque<Answer>,
    /// Keys of the snapshot being received (chunks before `last`).
    seen: HashSet<Arc<str>>,
    /// A `Reset` came: the next snapshot is the origin's catch-up of the whole interest.
    catching_up: bool,
    /// The position of the keyed snapshot being received (chunks before `last`).
    snapshot_at: Option<Cursor>,
}

/// The feed client of one origin.
pub(crate) struct FeedClient {
    spec: OriginSpec,
    cfg: FeedConfig,
    max_message: usize,
    topics: HashMap<String, TopicState>,
    keyed: HashMap<String, KeyedState>,
    /// Rung when an on_demand source queues a subscribe or unsubscribe.
    key_ops: Arc<Notify>,
    writer: mpsc::Sender<Step>,
    stats: Arc<FeedStats>,
    /// Batches of a transaction group received before its last one (`ChangeBatch.group`):
    /// handed to the writer together, as one step, so no reader sees half of it.
    held: Vec<Held>,
    held_group: u64,
    /// Topics resumed on this stream whose tail has not ended yet, and until when the stream
    /// holds what it receives for them (see [`RESUME_BARRIER_STEPS`]).
    resuming: HashSet<String>,
    resuming_until: Option<tokio::time::Instant>,
    /// The origin's addresses and the one dialled now: a lost feed redials the next one.
    addresses: Vec<String>,
    current: usize,
    /// Snapshot chunks handed to the writer and not yet applied (see
    /// [`SNAPSHOT_CHUNKS_IN_FLIGHT`]).
    chunks_in_flight: Arc<tokio::sync::Semaphore>,
}

/// Snapshot chunks one feed hands the writer ahead of what it has applied. The writer queue
/// bounds steps, not bytes: without this, a snapshot decoded faster than it is applied queued
/// up to `writer_queue` chunks of up to `max_message_bytes` each, and the allocator kept that
/// peak after the load. Four keep the writer busy while the next chunk is decoded.
const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 4;

/// A batch of a group not yet handed to the writer, and the cursor to return to when the
/// stream breaks before the group is whole.
struct Held {
    topic: String,
    prev_version: u64,
    op: Step,
}

impl FeedClient {
    /// A client of an origin `o` that is never dialled, for driving [`FeedClient::handle`]
    /// with messages directly (replay, fuzzing, tests): default feed settings, 16 MiB messages.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn unconnected(sources: Vec<Arc<Source>>, writer: mpsc::Sender<Step>) -> Self {
        let spec = OriginSpec {
            name: "o".into(),
            address: "http://127.0.0.1:1".into(),
            fallback: Vec::new(),
            topics: Vec::new(),
            tls: None,
        };
        FeedClient::new(
            spec,
            FeedConfig::default(),
            16 << 20,
            sources,
            writer,
            Arc::new(FeedStats::default()),
        )
    }

    pub(crate) fn new(
        spec: OriginSpec,
        cfg: FeedConfig,
        max_message: usize,
        sources: Vec<Arc<Source>>,
        writer: mpsc::Sender<Step>,
        stats: Arc<FeedStats>,
    ) -> Self {
        let key_ops = Arc::new(Notify::new());
        let (on_demand, sources): (Vec<_>, Vec<_>) =
            sources.into_iter().partition(|s| s.on_demand().is_some());
        let keyed = on_demand
            .into_iter()
            .filter_map(|s| {
                let od = s.on_demand()?.clone();
                od.set_waker(key_ops.clone());
                Some((
                    s.name().to_string(),
                    KeyedState {
                        source: s,
                        od,
                        subscribed: false,
                        cursor: None,
                        answers: VecDeque::new(),
                        seen: HashSet::new(),
                        catching_up: false,
                        snapshot_at: None,
                    },
                ))
            })
            .collect();
        let topics = sources
            .into_iter()
            .map(|s| {
                (
                    s.name().to_string(),
                    TopicState {
                        source: s,
                        cursor: None,
                        phase: Phase::AwaitSnapshot,
                        owed: 0,
                        loading: None,
                        refused: None,
                    },
                )
            })
            .collect();
        let addresses = spec.addresses();
        let current = first_address(cfg.instance.as_deref(), addresses.len());
        FeedClient {
            addresses,
            spec,
            cfg,
            max_message,
            topics,
            keyed,
            key_ops,
            writer,
            stats,
            held: Vec::new(),
            held_group: 0,
            resuming: HashSet::new(),
            resuming_until: None,
            current,
            chunks_in_flight: Arc::new(tokio::sync::Semaphore::new(SNAPSHOT_CHUNKS_IN_FLIGHT)),
        }
    }

    /// Holds the feed until `shutdown` flips to true.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut heard = false;
            let result = tokio::select! {
                r = self.session(&mut heard) => r,
                _ = crate::signalled(&mut shutdown) => return,
            };
            self.disconnected().await;
            // A stream that broke the protocol does not count as heard: a persistently broken
            // origin is redialled with a growing delay, not every `backoff_initial`.
            // Nor does one the origin refused outright: a refusal must not become a hot loop.
            let broke = match &result {
                Err(FeedError::Protocol(_)) => true,
                Err(FeedError::Status(s)) => s.code() != tonic::Code::Unavailable,
                _ => false,
            };
            match result {
                Err(FeedError::WriterGone) => return,
                Err(e) => {
                    let cause = cause(&e);
                    self.stats.set_last_error(cause.clone());
                    for t in self.topics.values() {
                        t.source.set_last_error(&cause);
                    }
                    for k in self.keyed.values() {
                        k.source.set_last_error(&cause);
                    }
                    warn!(origin = %self.spec.name, address = %redact_address(self.address()), %cause, error = %e, "feed disconnected")
                }
                Ok(()) => {}
            }
            if self.addresses.len() > 1 {
                // Another address of the same origin serves the same positions: resume there.
                self.current = (self.current + 1) % self.addresses.len();
                if heard {
                    attempt = 0;
                    info!(origin = %self.spec.name, next = %redact_address(self.address()), "trying the next address");
                    continue;
                }
            }
            attempt = if heard && !broke {
                0
            } else {
                attempt.saturating_add(1)
            };
            let delay = backoff(&self.cfg, attempt);
            self.stats
                .last_redial_delay_ms
                .store(delay.as_millis() as u64, Ordering::Relaxed);
            debug!(origin = %self.spec.name, ?delay, attempt, "redialling");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::signalled(&mut shutdown) => return,
            }
        }
    }

    /// The address dialled now.
    fn address(&self) -> &str {
        self.addresses
            .get(self.current)
            .map_or(self.spec.address.as_str(), String::as_str)
    }

    async fn disconnected(&mut self) {
        if self.stats.connected.swap(false, Ordering::Relaxed) {
            self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        // Half a group is never applied: its topics resume from before it.
        for h in self.held.drain(..) {
            if let Some(c) = self
                .topics
                .get_mut(&h.topic)
                .and_then(|t| t.cursor.as_mut())
            {
                c.version = c.version.min(h.prev_version);
            }
        }
        let mut aborts = Vec::new();
        for t in self.topics.values_mut() {
            t.source.set_connected(false);
            if let Phase::Snapshot(_) = t.phase {
                aborts.push(t.source.clone());
            }
            t.phase = Phase::AwaitSnapshot;
        }
        for source in aborts {
            let _ = self.writer.send(Step::AbortSnapshot { source }).await;
        }
        for k in self.keyed.values_mut() {
            k.source.set_connected(false);
            k.od.set_fetcher(None);
            k.subscribed = false;
            k.cursor = None;
            k.answers.clear();
            k.seen.clear();
            k.catching_up = false;
            k.snapshot_at = None;
        }
    }

    async fn session(&mut self, heard: &mut bool) -> Result<(), FeedError> {
        let c = &self.cfg;
        let endpoint = Endpoint::from_shared(self.address().to_string())
            .map_err(|e| FeedError::Address(e.to_string()))?
            .connect_timeout(c.connect_timeout.0)
            .http2_keep_alive_interval(c.keepalive_interval.0)
            .keep_alive_timeout(c.keepalive_timeout.0)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        // Read at every dial, so renewed certificates are used by the next connection.
        let endpoint = match &self.spec.tls {
            Some(tls) => endpoint.tls_config(tls.load()?)?,
            None => endpoint,
        };
        let channel = endpoint.connect().await?;
        let client = pb::feed_client::FeedClient::new(channel.clone())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        for k in self.keyed.values() {
            k.od.set_fetcher(Some(Box::new(FetchClient(client.clone()))));
        }
        let (req_tx, req_rx) = self.request_channel();
        let mut backlog = self.open_stream(&req_tx);
        // The connection is up: an on_demand source can read through from here on. Its
        // readiness must not wait for the response headers of Sync: an origin may hold them
        // back until its first message (grpc-go and grpcio do), and a stream with only keyed
        // interest may have nothing to answer until a key is subscribed on it.
        for k in self.keyed.values() {
            k.source.set_connected(true);
            k.source.heard();
            k.source.mark_synced();
        }
        if !self.keyed.is_empty() {
            // Views over on_demand topics are synced by the writer once their inputs are.
            self.writer
                .send(Step::Nudge)
                .await
                .map_err(|_| FeedError::WriterGone)?;
        }
        let key_ops = self.key_ops.clone();
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        let sync = sync_stream(&mut grpc, ReceiverStream::new(req_rx));
        tokio::pin!(sync);
        // While the headers are held back, keys read meanwhile are still subscribed on the
        // stream: the origin may be waiting for exactly that before it answers.
        let mut stream = loop {
            tokio::select! {
                answer = &mut sync => break answer?.into_inner(),
                _ = key_ops.notified() => backlog = self.send_key_ops(&req_tx),
                _ = tokio::time::sleep(Duration::from_millis(1)), if backlog => {
                    backlog = self.send_key_ops(&req_tx);
                }
            }
        };
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        info!(origin = %self.spec.name, address = %redact_address(self.address()), "feed connected");
        for t in self.topics.values() {
            t.source.set_connected(true);
        }
        let idle = self.cfg.idle_timeout.0;
        // The origin answers the resumed subscriptions from here on.
        self.resuming_until = Some(tokio::time::Instant::now() + RESUME_BARRIER_FOR);
        loop {
            let retry = self.next_retry();
            let barrier = self
                .resuming_until
                .filter(|_| !self.resuming.is_empty() && !self.held.is_empty());
            let next = tokio::select! {
                _ = tokio::time::sleep_until(barrier.unwrap_or_else(tokio::time::Instant::now)), if barrier.is_some() => {
                    debug!(origin = %self.spec.name, waiting = self.resuming.len(), held = self.held.len(), "resumed tails not all ended in time; applying what arrived");
                    self.resuming.clear();
                    self.release_held().await?;
                    continue;
                }
                m = tokio::time::timeout(idle, stream.message()) => Some(m),
                _ = key_ops.notified() => None,
                _ = tokio::time::sleep(Duration::from_millis(1)), if backlog => None,
                _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)), if retry.is_some() => {
                    self.retry_refused(&req_tx).await?;
                    continue;
                }
            };
            let Some(next) = next else {
                backlog = self.send_key_ops(&req_tx);
                continue;
            };
            let msg = match next {
                Err(_) => return Err(FeedError::Idle(idle)),
                Ok(Err(status)) => {
                    let e = from_stream_status(status);
                    if let FeedError::Protocol(_) = e {
                        self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
                Ok(Ok(None)) => return Err(FeedError::Closed),
                Ok(Ok(Some(m))) => m,
            };
            *heard = true;
            self.stats.messages.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
            if let Err(e) = self.handle(msg, &req_tx).await {
                if let FeedError::Protocol(_) = e {
                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        }
    }

    /// The earliest time a refused topic is due to be subscribed again.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.topics
            .values()
            .filter_map(|t| t.refused.as_ref()?.retry_at)
            .min()
    }

    /// Subscribes again the refused topics whose backoff has passed.
    async fn retry_refused(
        &mut self,
        req_tx: &mpsc::Sender<pb::SyncRequest>,
    ) -> Result<(), FeedError> {
        let now = tokio::time::Instant::now();
        for (name, t) in self.topics.iter_mut() {
            let Some(r) = t.refused.as_mut() else {
                continue;
            };
            if r.retry_at.is_some_and(|at| at <= now) {
                r.retry_at = None;
                t.phase = Phase::AwaitSnapshot;
                t.owed = t.owed.saturating_add(1);
                debug!(origin = %self.spec.name, topic = %name, "subscribing a refused topic again");
                req_tx
                    .send(subscribe(name, None))
                    .await
                    .map_err(|_| FeedError::Closed)?;
            }
        }
        Ok(())
    }

    fn request_channel(
        &self,
    ) -> (
        mpsc::Sender<pb::SyncRequest>,
        mpsc::Receiver<pb::SyncRequest>,
    ) {
        mpsc::channel::<pb::SyncRequest>(self.topics.len() + self.keyed.len() + 64)
    }

    /// Queues the first requests of a new stream: a Subscribe per full topic (resuming from its
    /// cursor when it has one) and the keys of on_demand topics that must be subscribed again.
    /// Returns true if some keyed requests wait for room in the channel.
    fn open_stream(&mut self, req_tx: &mpsc::Sender<pb::SyncRequest>) -> bool {
        let now = tokio::time::Instant::now();
        self.resuming.clear();
        self.resuming_until = None;
        for (name, t) in self.topics.iter_mut() {
            if let Some(Refusal {
                retry_at: Some(at), ..
            }) = &t.refused
            {
                if *at > now {
                    // Subscribed by the retry timer when its backoff has passed.
                    (t.phase, t.owed) = (Phase::AwaitSnapshot, 0);
                    continue;
                }
            }
            if let Some(r) = t.refused.as_mut() {
                r.retry_at = None;
            }
            let resume = t.cursor.as_ref().map(|c| pb::Position {
                epoch: c.epoch.clone(),
                version: c.version,
            });
            (t.phase, t.owed) = if resume.is_some() {
                self.resuming.insert(name.clone());
                (Phase::Live, 0)
            } else {
                (Phase::AwaitSnapshot, 1)
            };
            // The channel holds one slot per topic plus room: this never waits.
            let _ = req_tx.try_send(subscribe(name, resume));
        }
        // On a new stream only the keys resident (or loading) now are subscribed again. What was
        // queued before is void: the new stream starts with no keyed interest.
        for k in self.keyed.values_mut() {
            k.od.take_ops();
            k.od.refresh_all();
        }
        self.send_key_ops(req_tx)
    }

    async fn handle(
        &mut self,
        msg: chunk::SyncMessage,
        req_tx: &mpsc::Sender<pb::SyncRequest>,
    ) -> Result<(), FeedError> {
        use chunk::Received as Kind;
        let kind = chunk::Received::read(msg)
            .map_err(|e| FeedError::Protocol(format!("snapshot chunk: {e}")))?;
        let Some(kind) = kind else {
            return Err(FeedError::Protocol("empty SyncResponse".into()));
        };
        let topic = match &kind {
            Kind::Snapshot(s) => &s.topic,
            Kind::Changes(b) => &b.topic,
            Kind::Progress(p) => &p.topic,
            Kind::Reset(r) => &r.topic,
            Kind::Refused(r) => &r.topic,
        }
        .clone();
        let group = match &kind {
            Kind::Changes(b) => b.group,
            _ => None,
        };
        let barrier = !self.resuming.is_empty();
        if !barrier
            && !self.held.is_empty()
            && group.as_ref().map(|g| g.id) != Some(self.held_group)
        {
            // Something other than the rest of the group: what was held is all this stream
            // has of it (the origin lagged on a topic, or resumes topic by topic).
            self.release_held().await?;
        }
        if self.keyed.contains_key(&topic) {
            return self.handle_keyed(&topic, kind.into_pb()).await;
        }
        let mut prev_version = 0;
        let Some(t) = self.topics.get_mut(&topic) else {
            return Err(FeedError::Protocol(format!(
                "message for topic '{topic}', which this sidecar did not subscribe"
            )));
        };
        let op = match kind {
            Kind::Snapshot(chunk) => {
                let pos = chunk.position.ok_or_else(|| {
                    FeedError::Protocol(format!("snapshot of '{topic}' without a position"))
                })?;
                let at = Cursor {
                    epoch: pos.epoch,
                    version: pos.version,
                };
                if let Some(c) = &t.cursor {
                    if c.epoch == at.epoch && at.version < c.version {
                        return Err(FeedError::Protocol(format!(
                            "snapshot of '{topic}' at version {} is behind the applied {}",
                            at.version, c.version
                        )));
                    }
                }
                if let Phase::Snapshot(from) = &t.phase {
                    if *from != at {
                        return Err(FeedError::Protocol(format!(
                            "snapshot of '{topic}' moved from {}@{} to {}@{} before its last chunk",
                            from.epoch, from.version, at.epoch, at.version
                        )));
                    }
                } else {
                    if t.owed == 0 {
                        return Err(FeedError::Protocol(format!(
                            "snapshot of '{topic}' that no Subscribe or Reset asked for"
                        )));
                    }
                    t.owed -= 1;
                    t.phase = Phase::Snapshot(at.clone());
                    let now = Instant::now();
                    t.loading = Some(Loading {
                        started: now,
                        logged: now,
                        keys: 0,
                    });
                }
                let last = chunk.last;
                log_loading(&self.spec.name, &topic, t, chunk.entries.len(), last);
                if last {
                    t.cursor = Some(at.clone());
                    t.phase = Phase::Live;
                    self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    if t.refused.take().is_some() {
                        t.source.set_failure(None);
                        info!(origin = %self.spec.name, %topic, "the origin serves the topic again");
                    }
                }
                // Never closed, so a permit always comes.
                let in_flight = self.chunks_in_flight.clone().acquire_owned().await.ok();
                Step::SnapshotChunk {
                    in_flight,
                    total: chunk.total_entries,
                    source: t.source.clone(),
                    epoch: at.epoch,
                    version: at.version,
                    entries: chunk.entries,
                    last,
                }
            }
            Kind::Changes(batch) => {
                let Some(c) = live_cursor(t) else {
                    return Ok(());
                };
                if batch.epoch != c.epoch {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    warn!(origin = %self.spec.name, %topic, "batch of another epoch; resubscribing");
                    return resubscribe(t, &topic, req_tx, &self.writer).await;
                }
                if batch.version <= c.version {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if batch.prev_version != c.version {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    warn!(origin = %self.spec.name, %topic, expected = c.version, got = batch.prev_version, "gap in the feed; resubscribing");
                    return resubscribe(t, &topic, req_tx, &self.writer).await;
                }
                c.version = batch.version;
                prev_version = batch.prev_version;
                Step::Batch {
                    source: t.source.clone(),
                    epoch: batch.epoch,
                    version: batch.version,
                    changes: batch
                        .changes
                        .into_iter()
                        .map(|ch| BatchChange {
                            key: ch.key,
                            value: if ch.deleted { None } else { Some(ch.value) },
                        })
                        .collect(),
                }
            }
            Kind::Progress(p) => {
                t.source
                    .set_upstream_lag(p.upstream_lag_ms, p.upstream_lag_bytes);
                t.source.set_upstream_copied(p.upstream_copied_rows);
                let Some(pos) = p.position else { return Ok(()) };
                let Some(c) = live_cursor(t) else {
                    return Ok(());
                };
                if pos.epoch != c.epoch {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    return resubscribe(t, &topic, req_tx, &self.writer).await;
                }
                prev_version = c.version;
                if pos.version > c.version {
                    c.version = pos.version;
                }
                let version = c.version;
                // The origin tells a resumed topic's position once its tail is sent.
                self.resuming.remove(&topic);
                Step::Progress {
                    source: t.source.clone(),
                    epoch: pos.epoch,
                    version,
                }
            }
            Kind::Reset(r) => {
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
                info!(origin = %self.spec.name, %topic, reason = %r.reason, "origin reset the topic; a snapshot follows");
                let was_snapshot = matches!(t.phase, Phase::Snapshot(_));
                t.phase = Phase::AwaitSnapshot;
                t.owed = t.owed.saturating_add(1);
                if !was_snapshot {
                    return Ok(());
                }
                Step::AbortSnapshot {
                    source: t.source.clone(),
                }
            }
            Kind::Refused(r) => {
                self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                let attempt = t
                    .refused
                    .as_ref()
                    .map_or(0, |f| f.attempt.saturating_add(1));
                let delay = backoff(&self.cfg, attempt);
                let was_snapshot = matches!(t.phase, Phase::Snapshot(_));
                t.phase = Phase::AwaitSnapshot;
                t.owed = t.owed.saturating_sub(1);
                t.refused = Some(Refusal {
                    attempt,
                    retry_at: Some(tokio::time::Instant::now() + delay),
                });
                t.source
                    .set_failure(Some(format!("origin refused the topic: {}", r.reason)));
                warn!(origin = %self.spec.name, %topic, reason = %r.reason, retry_in = ?delay, attempt, "origin refused the topic; retrying it with backoff while its other topics go on");
                if !was_snapshot {
                    return Ok(());
                }
                Step::AbortSnapshot {
                    source: t.source.clone(),
                }
            }
        };
        if barrier {
            return self
                .hold_while_resuming(topic, prev_version, op, group)
                .await;
        }
        if let Some(g) = group {
            self.held.push(Held {
                topic,
                prev_version,
                op,
            });
            self.held_group = g.id;
            return if g.last {
                self.release_held().await
            } else {
                Ok(())
            };
        }
        self.writer
            .send(op)
            .await
            .map_err(|_| FeedError::WriterGone)
    }

    /// While topics resume: holds batches and positions (snapshot steps go on: a topic being
    /// snapshotted is not resuming), and hands all of it to the writer as one step once every
    /// resumed topic's tail has ended (or was given up for a snapshot), or the bound is hit.
    async fn hold_while_resuming(
        &mut self,
        topic: String,
        prev_version: u64,
        op: Step,
        group: Option<pb::TxGroup>,
    ) -> Result<(), FeedError> {
        if matches!(op, Step::Batch { .. } | Step::Progress { .. }) {
            self.held.push(Held {
                topic,
                prev_version,
                op,
            });
        } else {
            self.writer
                .send(op)
                .await
                .map_err(|_| FeedError::WriterGone)?;
        }
        // A topic that fell back to a snapshot (a gap, another epoch, a Reset) has no tail to
        // wait for.
        let topics = &self.topics;
        self.resuming.retain(|n| {
            topics
                .get(n)
                .is_some_and(|t| matches!(t.phase, Phase::Live))
        });
        let expired = self
            .resuming_until
            .is_some_and(|u| tokio::time::Instant::now() >= u);
        if self.resuming.is_empty() || expired || self.held.len() >= RESUME_BARRIER_STEPS {
            if !self.resuming.is_empty() {
                debug!(origin = %self.spec.name, waiting = self.resuming.len(), held = self.held.len(), "resumed tails not all ended; applying what arrived");
                self.resuming.clear();
            }
            if let Some(g) = group.filter(|g| !g.last) {
                // The last message held is part of a live group: the rest of it is still to
                // come, and it all goes to the writer with that group's last batch.
                self.held_group = g.id;
                return Ok(());
            }
            self.release_held().await?;
        }
        Ok(())
    }

    /// Hands the held batches of a group to the writer as one step.
    async fn release_held(&mut self) -> Result<(), FeedError> {
        let ops: Vec<Step> = self.held.drain(..).map(|h| h.op).collect();
        if ops.is_empty() {
            return Ok(());
        }
        self.writer
            .send(Step::Group(ops))
            .await
            .map_err(|_| FeedError::WriterGone)
    }
}

impl FeedClient {
    /// Sends the queued subscribes and unsubscribes of on_demand sources, in order, as long as
    /// the request channel has room (it never waits: the stream must keep being read). Returns
    /// true if some are left for later.
    fn send_key_ops(&mut self, req_tx: &mpsc::Sender<pb::SyncRequest>) -> bool {
        let mut backlog = false;
        for (name, k) in self.keyed.iter_mut() {
            let mut ops = k.od.take_ops();
            while let Some(first) = ops.front().cloned() {
                let Ok(permit) = req_tx.try_reserve() else {
                    backlog = true;
                    break;
                };
                let subscribe = matches!(first, KeyOp::Subscribe(_));
                let mut keys: Vec<Arc<str>> = Vec::new();
                while keys.len() < KEYS_PER_REQUEST {
                    match ops.front() {
                        Some(KeyOp::Subscribe(key)) if subscribe => keys.push(key.clone()),
                        Some(KeyOp::Unsubscribe(key)) if !subscribe => keys.push(key.clone()),
                        _ => break,
                    }
                    ops.pop_front();
                }
                keys.sort();
                keys.dedup();
                let stats = k.od.stats();
                let kind = if subscribe {
                    stats
                        .subscribed
                        .fetch_add(keys.len() as u64, Ordering::Relaxed);
                    k.answers.push_back(if k.subscribed {
                        Answer::Added(keys.clone())
                    } else {
                        Answer::First(keys.clone())
                    });
                    k.subscribed = true;
                    pb::sync_request::Kind::Subscribe(pb::Subscribe {
                        topic: name.clone(),
                        keys: keys.iter().map(|k| k.to_string()).collect(),
                        resume: None,
                    })
                } else {
                    // A key read again since it was dropped stays subscribed; with no keyed
                    // interest on this stream there is nothing to remove. (An empty list would
                    // drop the whole interest.)
                    keys.retain(|key| !k.od.wanted(key));
                    if keys.is_empty() || !k.subscribed {
                        continue;
                    }
                    stats
                        .unsubscribed
                        .fetch_add(keys.len() as u64, Ordering::Relaxed);
                    pb::sync_request::Kind::Unsubscribe(pb::Unsubscribe {
                        topic: name.clone(),
                        keys: keys.iter().map(|k| k.to_string()).collect(),
                    })
                };
                permit.send(pb::SyncRequest { kind: Some(kind) });
            }
            if !ops.is_empty() {
                k.od.requeue(ops);
            }
        }
        backlog
    }

    /// A message for an on_demand topic: keyed snapshots and changes of resident keys.
    async fn handle_keyed(
        &mut self,
        topic: &str,
        kind: pb::sync_response::Kind,
    ) -> Result<(), FeedError> {
        use pb::sync_response::Kind;
        let Some(k) = self.keyed.get_mut(topic) else {
            return Ok(());
        };
        match kind {
            Kind::Snapshot(chunk) => {
                let pos = chunk.position.ok_or_else(|| {
                    FeedError::Protocol(format!("snapshot of '{topic}' without a position"))
                })?;
                // Checked before anything is applied: a chunk must answer something (a
                // subscribe, or the catch-up after a Reset), never go behind what the stream
                // delivered, and keep one position from its first chunk to `last`.
                if !k.catching_up && k.answers.is_empty() {
                    return Err(FeedError::Protocol(format!(
                        "keyed snapshot of '{topic}' that no subscribe asked for"
                    )));
                }
                let first = matches!(k.answers.front(), Some(Answer::First(_))) && !k.catching_up;
                if let (false, Some(c)) = (first, &k.cursor) {
                    if pos.epoch != c.epoch || pos.version < c.version {
                        return Err(FeedError::Protocol(format!(
                            "keyed snapshot of '{topic}' at {}@{} is behind the stream's \
                             position {}@{}",
                            pos.epoch, pos.version, c.epoch, c.version
                        )));
                    }
                }
                match &k.snapshot_at {
                    Some(at) if at.epoch != pos.epoch || at.version != pos.version => {
                        return Err(FeedError::Protocol(format!(
                            "keyed snapshot of '{topic}' moved from {}@{} to {}@{} mid-way",
                            at.epoch, at.version, pos.epoch, pos.version
                        )));
                    }
                    Some(_) => {}
                    None => {
                        k.snapshot_at = Some(Cursor {
                            epoch: pos.epoch.clone(),
                            version: pos.version,
                        });
                    }
                }
                // Keys pinned by view rows whose value changed: their rows are computed again.
                let mut touched: Vec<Arc<str>> = Vec::new();
                if k.od.observe_epoch(&pos.epoch) {
                    touched.extend(k.od.pinned_keys());
                }
                for e in chunk.entries {
                    let key: Arc<str> = Arc::from(e.key);
                    k.seen.insert(key.clone());
                    let slot = Slot {
                        value: Some(e.value),
                        version: e.version,
                    };
                    k.od.apply(&key, slot).await;
                    if k.od.has_pins() {
                        touched.push(key);
                    }
                }
                if !chunk.last {
                    return touch(&self.writer, &k.source, touched).await;
                }
                let seen = std::mem::take(&mut k.seen);
                k.snapshot_at = None;
                let at = Cursor {
                    epoch: pos.epoch,
                    version: pos.version,
                };
                if k.catching_up {
                    // The origin resent the whole interest after this stream fell behind; a
                    // key deleted meanwhile is simply missing from it, so every resident key
                    // is asked for again, each answer naming exactly its keys.
                    k.catching_up = false;
                    k.cursor = Some(at.clone());
                    k.od.refresh_all();
                } else {
                    let keys = match k.answers.pop_front() {
                        Some(Answer::First(keys)) => {
                            k.cursor = Some(at.clone());
                            keys
                        }
                        Some(Answer::Added(keys)) => keys,
                        None => {
                            return Err(FeedError::Protocol(format!(
                                "keyed snapshot of '{topic}' that no subscribe asked for"
                            )))
                        }
                    };
                    // Keys asked for and not in the snapshot are absent at its version.
                    for key in keys.iter().filter(|key| !seen.contains(*key)) {
                        let slot = Slot {
                            value: None,
                            version: at.version,
                        };
                        k.od.apply(key, slot).await;
                        if k.od.has_pins() {
                            touched.push(key.clone());
                        }
                    }
                }
                k.source.heard();
                if let Some(c) = &k.cursor {
                    if *k.source.epoch() != c.epoch || c.version > k.source.version() {
                        k.source.set_position(&c.epoch, c.version);
                    }
                }
                visible_after(&self.writer, &k.source, touched).await?;
            }
            Kind::Changes(batch) => {
                let Some(c) = &mut k.cursor else {
                    return Ok(());
                };
                let mut touched: Vec<Arc<str>> = Vec::new();
                if batch.epoch == c.epoch && batch.version <= c.version {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if batch.epoch != c.epoch || batch.prev_version != c.version {
                    // Something was missed: apply this batch (per-key versions keep it safe)
                    // and refresh every resident key from keyed snapshots.
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    warn!(origin = %self.spec.name, %topic, expected = c.version, got = batch.prev_version, "gap in an on_demand topic; refreshing resident keys");
                    if k.od.observe_epoch(&batch.epoch) {
                        touched.extend(k.od.pinned_keys());
                    }
                    k.od.refresh_all();
                }
                *c = Cursor {
                    epoch: batch.epoch.clone(),
                    version: batch.version,
                };
                for ch in batch.changes {
                    let slot = Slot {
                        value: (!ch.deleted).then_some(ch.value),
                        version: batch.version,
                    };
                    k.od.apply(&ch.key, slot).await;
                    if k.od.has_pins() {
                        touched.push(Arc::from(ch.key));
                    }
                }
                k.source.heard();
                k.source.set_position(&batch.epoch, batch.version);
                visible_after(&self.writer, &k.source, touched).await?;
            }
            Kind::Progress(p) => {
                k.source
                    .set_upstream_lag(p.upstream_lag_ms, p.upstream_lag_bytes);
                k.source.set_upstream_copied(p.upstream_copied_rows);
                let Some(pos) = p.position else { return Ok(()) };
                k.source.heard();
                if let Some(c) = &mut k.cursor {
                    if pos.epoch == c.epoch && pos.version > c.version {
                        c.version = pos.version;
                        k.source.set_version(pos.version);
                        k.source.make_visible();
                    }
                }
            }
            Kind::Refused(r) => {
                // The keys asked for stay unanswered; a later read subscribes them again.
                self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                k.answers.pop_front();
                k.source
                    .set_failure(Some(format!("origin refused the topic: {}", r.reason)));
                warn!(origin = %self.spec.name, %topic, reason = %r.reason, "origin refused an on_demand topic");
            }
            Kind::Reset(r) => {
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
                info!(origin = %self.spec.name, %topic, reason = %r.reason, "origin reset an on_demand topic; resident keys are refreshed");
                k.seen.clear();
                k.snapshot_at = None;
                k.catching_up = true;
            }
        }
        Ok(())
    }
}

/// Hands the writer the keys of an on_demand topic that view rows read and whose value just
/// changed (the engine ignores keys no row reads any more).
/// Makes an on_demand topic's new version visible: at once when no key a view holds changed,
/// else through the writer, which refreshes the views' rows (`touch`) and makes the version
/// visible after that flush.
async fn visible_after(
    writer: &mpsc::Sender<Step>,
    source: &Arc<Source>,
    touched: Vec<Arc<str>>,
) -> Result<(), FeedError> {
    if touched.is_empty() {
        source.make_visible();
        return Ok(());
    }
    touch(writer, source, touched).await
}

async fn touch(
    writer: &mpsc::Sender<Step>,
    source: &Arc<Source>,
    keys: Vec<Arc<str>>,
) -> Result<(), FeedError> {
    if keys.is_empty() {
        return Ok(());
    }
    writer
        .send(Step::Touch {
            source: source.clone(),
            keys,
        })
        .await
        .map_err(|_| FeedError::WriterGone)
}

/// Logs a snapshot's progress every [`LOAD_LOG_EVERY`] while it loads, and its total when it
/// took longer than that: an operator watching a large topic sync sees keys and a rate.
/// The cursor of a topic that is streaming changes; `None` while its snapshot is awaited (a
/// change or a Progress is then ignored: the snapshot supersedes it).
fn live_cursor(t: &mut TopicState) -> Option<&mut Cursor> {
    if t.phase != Phase::Live {
        return None;
    }
    t.cursor.as_mut()
}

/// `Feed.Fetch` over the stream's connection: how on_demand replicas read a miss.
struct FetchClient(pb::feed_client::FeedClient<Channel>);

impl Fetcher for FetchClient {
    fn fetch<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + 'a>> {
        let request = pb::FetchRequest {
            topic: topic.to_string(),
            keys: vec![key.to_string()],
        };
        let mut client = self.0.clone();
        Box::pin(async move {
            let resp = client
                .fetch(request)
                .await
                .map_err(|status| status.message().to_string())?
                .into_inner();
            let at = resp.position.map_or(0, |p| p.version);
            let entry = resp
                .entries
                .into_iter()
                .find(|e| e.key == key)
                .map(|e| (e.value, e.version));
            Ok(Fetched { at, entry })
        })
    }
}

fn log_loading(origin: &str, topic: &str, t: &mut TopicState, entries: usize, last: bool) {
    let Some(l) = t.loading.as_mut() else { return };
    l.keys += entries as u64;
    let now = Instant::now();
    let secs = now.duration_since(l.started).as_secs_f64();
    let rate = if secs > 0.0 {
        (l.keys as f64 / secs) as u64
    } else {
        0
    };
    let done = last && secs >= LOAD_LOG_EVERY.as_secs_f64();
    let progress = !last && now.duration_since(l.logged) >= LOAD_LOG_EVERY;
    if progress {
        l.logged = now;
    }
    if done || progress {
        let what = if last {
            "snapshot received"
        } else {
            "snapshot loading"
        };
        let secs = format!("{secs:.1}");
        info!(
            origin,
            topic,
            keys = l.keys,
            secs,
            keys_per_s = rate,
            "{what}"
        );
    }
    if last {
        t.loading = None;
    }
}

fn subscribe(topic: &str, resume: Option<pb::Position>) -> pb::SyncRequest {
    pb::SyncRequest {
        kind: Some(pb::sync_request::Kind::Subscribe(pb::Subscribe {
            topic: topic.to_string(),
            keys: Vec::new(),
            resume,
        })),
    }
}

async fn resubscribe(
    t: &mut TopicState,
    topic: &str,
    req_tx: &mpsc::Sender<pb::SyncRequest>,
    writer: &mpsc::Sender<Step>,
) -> Result<(), FeedError> {
    t.phase = Phase::AwaitSnapshot;
    t.owed = t.owed.saturating_add(1);
    writer
        .send(Step::AbortSnapshot {
            source: t.source.clone(),
        })
        .await
        .map_err(|_| FeedError::WriterGone)?;
    req_tx
        .send(subscribe(topic, None))
        .await
        .map_err(|_| FeedError::Closed)
}

/// A failed read of the Sync stream. tonic reports a message over `max_message` and bytes that
/// are not a `SyncResponse` as a `Status` of its own making (`OUT_OF_RANGE` "decoded message
/// length too large", `INTERNAL` "failed to decode Protobuf message"): those are the origin
/// breaking the protocol, counted as such, not an origin refusing the stream.
/// Calls Sync as the generated client does, but reads the responses as
/// [`chunk::SyncMessage`]s: snapshot chunks in place, not an allocation per entry.
async fn sync_stream(
    grpc: &mut tonic::client::Grpc<Channel>,
    requests: ReceiverStream<pb::SyncRequest>,
) -> Result<tonic::Response<tonic::codec::Streaming<chunk::SyncMessage>>, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<pb::SyncRequest, chunk::SyncMessage>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/viewcar.feed.v1.Feed/Sync");
    let mut req = tonic::IntoStreamingRequest::into_streaming_request(requests);
    req.extensions_mut()
        .insert(tonic::GrpcMethod::new("viewcar.feed.v1.Feed", "Sync"));
    grpc.streaming(req, path, codec).await
}

fn from_stream_status(status: tonic::Status) -> FeedError {
    let m = status.message();
    let local = match status.code() {
        tonic::Code::OutOfRange => m.contains("decoded message length too large"),
        tonic::Code::Internal => m.starts_with("failed to decode Protobuf message"),
        _ => false,
    };
    if local {
        FeedError::Protocol(m.to_string())
    } else {
        FeedError::Status(status)
    }
}

/// Why a feed failed, in words a user can act on: connection refused, timed out, TLS, or an
/// address that does not serve Feed (tonic's own wording, "transport error" or "Operation is not
/// implemented", says none of that).
pub(crate) fn cause(e: &FeedError) -> String {
    let chain = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            text.push_str(": ");
            text.push_str(&s.to_string());
            src = s.source();
        }
        text
    };
    match e {
        FeedError::Connect(t) => {
            let text = chain(t);
            let lower = text.to_ascii_lowercase();
            let io = {
                let mut src = std::error::Error::source(t);
                let mut kind = None;
                while let Some(s) = src {
                    if let Some(io) = s.downcast_ref::<std::io::Error>() {
                        kind = Some(io.kind());
                    }
                    src = s.source();
                }
                kind
            };
            if io == Some(std::io::ErrorKind::ConnectionRefused) || lower.contains("refused") {
                format!("connection refused (nothing listens at this address?): {text}")
            } else if io == Some(std::io::ErrorKind::TimedOut) || lower.contains("timed out") {
                format!("connect timed out: {text}")
            } else if lower.contains("tls")
                || lower.contains("certificate")
                || lower.contains("handshake")
            {
                format!("TLS: {text}")
            } else if lower.contains("dns") || lower.contains("lookup") || lower.contains("resolve")
            {
                format!("cannot resolve the host: {text}")
            } else {
                format!("connect failed: {text}")
            }
        }
        FeedError::Tls(t) => format!("TLS: {t}"),
        FeedError::Status(s) if s.code() == tonic::Code::Unimplemented => format!(
            "wrong protocol: this address does not serve the Feed API (does it serve the Cache \
             API, not Feed? point the sidecar at an origin or a relay): {}",
            s.message()
        ),
        FeedError::Status(s) => {
            let m = s.message().to_ascii_lowercase();
            if m.contains("h2 protocol error")
                || m.contains("grpc-status header missing")
                || m.contains("invalid content-type")
            {
                format!(
                    "wrong protocol: this address does not speak gRPC (an HTTP port?): {}",
                    s.message()
                )
            } else {
                format!("origin refused the stream: {:?}: {}", s.code(), s.message())
            }
        }
        FeedError::Idle(d) => format!("timed out: no message from the origin for {d:?}"),
        other => other.to_string(),
    }
}

/// Full jitter: uniformly random below `min(cap, initial * 2^attempt)`, so a fleet that lost
/// its origin at once does not come back at once.
pub(crate) fn backoff(cfg: &FeedConfig, attempt: u32) -> Duration {
    let base = cfg.backoff_initial.0.as_millis() as u64;
    let cap = cfg.backoff_max.0.as_millis() as u64;
    let ceiling = base.saturating_mul(1u64 << attempt.min(30)).min(cap).max(1);
    // Below the ceiling, as documented: `0..=ceiling` drew the ceiling itself once in
    // `ceiling + 1` tries (one of 200 clients in a storm did, about one run in ten).
    Duration::from_millis(rand::random_range(0..ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that stops applying: the feed hands it at most [`SNAPSHOT_CHUNKS_IN_FLIGHT`]
    /// chunks of a snapshot, though its queue has room for 1,024 steps, and hands the next one
    /// as soon as one is applied.
    #[tokio::test(start_paused = true)]
    async fn a_writer_that_stops_applying_holds_a_bounded_number_of_snapshot_chunks() {
        use crate::store::{Clock, SourceKind};
        let source = Arc::new(Source::new(
            "t",
            SourceKind::Topic { origin: "o".into() },
            crate::types::Mode::Full,
            Clock::new(),
            Duration::from_secs(1),
        ));
        let (wtx, mut wrx) = mpsc::channel(1024);
        let mut client = FeedClient::unconnected(vec![source], wtx);
        let (req_tx, _req_rx) = client.request_channel();
        client.open_stream(&req_tx);
        let chunk = |i: usize, last: bool| -> chunk::SyncMessage {
            pb::SyncResponse {
                kind: Some(pb::sync_response::Kind::Snapshot(pb::SnapshotChunk {
                    topic: "t".into(),
                    position: Some(pb::Position {
                        epoch: "e".into(),
                        version: 1,
                    }),
                    entries: vec![pb::Entry {
                        key: format!("k{i}"),
                        value: bytes::Bytes::from_static(b"v"),
                        version: 1,
                    }],
                    last,
                    total_entries: 10,
                })),
            }
            .into()
        };
        for i in 0..SNAPSHOT_CHUNKS_IN_FLIGHT {
            client
                .handle(chunk(i, false), &req_tx)
                .await
                .expect("chunk");
        }
        let fifth = tokio::time::timeout(
            Duration::from_secs(60),
            client.handle(chunk(4, false), &req_tx),
        )
        .await;
        assert!(fifth.is_err(), "a chunk beyond the bound was handed over");
        assert_eq!(wrx.len(), SNAPSHOT_CHUNKS_IN_FLIGHT);
        drop(wrx.recv().await.expect("a step"));
        client.handle(chunk(5, true), &req_tx).await.expect("chunk");
        assert_eq!(wrx.len(), SNAPSHOT_CHUNKS_IN_FLIGHT);
    }

    #[test]
    fn first_address_is_spread_by_instance_name() {
        assert_eq!(first_address(None, 3), 0);
        assert_eq!(first_address(Some(""), 3), 0);
        assert_eq!(first_address(Some("leaf-1"), 1), 0);
        let mut hits = [0usize; 3];
        for i in 0..3000 {
            let name = format!("leaf-{i}");
            let a = first_address(Some(&name), 3);
            assert_eq!(a, first_address(Some(&name), 3), "stable for one name");
            hits[a] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "spread evenly: {hits:?}");
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let cfg = FeedConfig::default();
        for attempt in 0..64 {
            assert!(backoff(&cfg, attempt) <= cfg.backoff_max.0);
        }
        let first: Vec<_> = (0..200).map(|_| backoff(&cfg, 0)).collect();
        assert!(first.iter().all(|d| *d <= cfg.backoff_initial.0));
        assert!(first.iter().any(|d| *d != first[0]), "no jitter");
        // Strictly below the ceiling: with a 2 ms ceiling, 2 ms would come in a third of draws.
        let tiny = FeedConfig {
            backoff_initial: crate::types::Dur(Duration::from_millis(2)),
            backoff_max: crate::types::Dur(Duration::from_millis(2)),
            ..FeedConfig::default()
        };
        for attempt in 0..200 {
            assert!(backoff(&tiny, attempt % 3) < Duration::from_millis(2));
        }
    }

    /// tonic's own wording for a message over the limit and for bytes that do not decode: if an
    /// upgrade rewords them, this fails rather than the counter silently missing them.
    #[test]
    fn local_decode_failures_are_protocol_errors() {
        // tonic-prost turns a prost decode error into `Status::internal(error.to_string())`.
        let decode = pb::SyncResponse::decode(&[0xff, 0xff, 0xff][..]).unwrap_err();
        let undecodable = tonic::Status::internal(decode.to_string());
        assert!(matches!(
            from_stream_status(undecodable),
            FeedError::Protocol(_)
        ));
        let too_large = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 10024 bytes, the limit is: 4096 bytes",
        );
        assert!(matches!(
            from_stream_status(too_large),
            FeedError::Protocol(_)
        ));
        let refused = tonic::Status::out_of_range("version out of range");
        assert!(matches!(from_stream_status(refused), FeedError::Status(_)));
        let internal = tonic::Status::internal("origin failed");
        assert!(matches!(from_stream_status(internal), FeedError::Status(_)));
    }
}
