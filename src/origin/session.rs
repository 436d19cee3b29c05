//! One `Sync` stream at the origin: the subscriptions of one sidecar and what it has been sent.
//!
//! Per topic the session keeps `cursor` (the version of the last message sent, which the next
//! batch names as `prev_version`) and `seen` (every version up to it has been sent or did not
//! concern this stream). Publishers only `try_send` into the session's bounded queue; a full
//! queue marks the topic lagged, and the session then sends `Reset` and a fresh snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use std::future::Future;
use std::task::Poll;
use tokio::sync::Notify;
use tonic::Status;
use tracing::{debug, warn};

use super::gate::Gates;
use super::pipe::Refused;
use super::{Batch, Inner, Interest, Origin, PublishError, SessionId, Stored, Topic, TopicState};
use crate::pb::feed::v1 as pb;

/// A message of a `Sync` stream: built for this stream, or encoded once and shared by every
/// stream that sends the same bytes (a whole-topic batch, a snapshot chunk).
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    Msg(pb::SyncResponse),
    /// One gRPC message as it goes on the wire, prefix included (`wire::framed`).
    Shared(Bytes),
}

pub(crate) type Out = super::pipe::Sender<Result<Frame, Status>>;

/// What a stream's response body reads the session's frames from.
pub(crate) type Frames = super::pipe::Receiver<Result<Frame, Status>>;

/// A session, run by polling it: not on a task of its own, but inside its stream's response
/// body (`wire::SyncBody`), so that a batch offered to the stream wakes the one task that also
/// hands the frame to HTTP/2. Dropping it ends the session.
pub(crate) type Running = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The whole-topic snapshot of one position, encoded into chunks as the first stream to reach
/// each chunk needs it; every other stream at that position sends the same chunks. Held by the
/// topic until its version moves, and by each stream while it sends them.
pub(crate) struct SharedSnapshot {
    pub version: u64,
    pub generation: u64,
    made: std::time::Instant,
    data: imbl::OrdMap<Arc<str>, Stored>,
    chunks: tokio::sync::Mutex<Encoded>,
}

/// The chunks of a shared snapshot encoded so far. A chunk is encoded when a stream first
/// needs it, so the first chunk goes out while the rest are still to be encoded (a
/// million-key snapshot is a hundred chunks), and a stream cancelled meanwhile leaves the
/// next one to go on from where it stopped.
#[derive(Default)]
struct Encoded {
    chunks: Vec<Bytes>,
    /// The last key encoded (`None`: none yet).
    after: Option<Arc<str>>,
    done: bool,
}

impl SharedSnapshot {
    pub(crate) fn new(version: u64, generation: u64, data: imbl::OrdMap<Arc<str>, Stored>) -> Self {
        SharedSnapshot {
            version,
            generation,
            made: std::time::Instant::now(),
            data,
            chunks: tokio::sync::Mutex::new(Encoded::default()),
        }
    }
}

/// How long a topic keeps an encoded snapshot that no stream is sending: long enough for a
/// burst of subscribers (a fleet reconnecting) to share it, short enough that an idle topic
/// does not hold a second copy of its data for long.
const SHARED_SNAPSHOT_KEPT: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the topic's shared snapshot when no stream holds it and it is older than
/// [`SHARED_SNAPSHOT_KEPT`].
fn release_shared_snapshot(ts: &mut super::TopicState) {
    if ts
        .shared_snapshot
        .as_ref()
        .is_some_and(|s| Arc::strong_count(s) == 1 && s.made.elapsed() > SHARED_SNAPSHOT_KEPT)
    {
        ts.shared_snapshot = None;
    }
}

/// The shared snapshot of `ts` at its current position, made when there is none yet.
fn shared_snapshot(ts: &mut super::TopicState) -> Arc<SharedSnapshot> {
    match &ts.shared_snapshot {
        Some(s) if s.version == ts.version && s.generation == ts.generation => s.clone(),
        _ => {
            let s = Arc::new(SharedSnapshot::new(
                ts.version,
                ts.generation,
                ts.data.clone(),
            ));
            ts.shared_snapshot = Some(s.clone());
            s
        }
    }
}

/// A batch queued for a session, with its transaction group.
type Queued = (Arc<Batch>, Option<pb::TxGroup>);

/// The bounded queue from publishers to one session (`stream_queue` batches): pushed by the
/// publisher under its topic's lock, taken by the session.
pub(crate) struct Queue {
    tx: super::pipe::Sender<Queued>,
    lagged: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
}

/// Called by `publish` under the topic lock: queue the batch for this stream, or mark the
/// stream lagged for the topic. Never waits. `group` marks a batch of a transaction group.
pub(crate) fn offer(
    inner: &Inner,
    topic: &Arc<str>,
    interest: &mut Interest,
    batch: &Arc<Batch>,
    group: Option<pb::TxGroup>,
) {
    if !wants(interest, batch) {
        return;
    }
    let batch = match &interest.keys {
        None => batch.clone(),
        Some(keys) => {
            let changes: Vec<pb::Change> = batch
                .changes
                .iter()
                .filter(|c| keys.contains(c.key.as_str()))
                .cloned()
                .collect();
            if changes.is_empty() {
                return;
            }
            // Never the shared encoding: `prev` matches no stream's cursor.
            let mut filtered = Batch::new(
                batch.topic.clone(),
                batch.version,
                u64::MAX,
                changes,
                batch.bytes,
            );
            filtered.generation = batch.generation;
            Arc::new(filtered)
        }
    };
    interest.pending.fetch_add(1, Ordering::AcqRel);
    match interest.queue.tx.try_send((batch, group)) {
        Ok(()) => {}
        Err(Refused::Full) => {
            interest.pending.fetch_sub(1, Ordering::AcqRel);
            inner.stats.lagged.fetch_add(1, Ordering::Relaxed);
            resnapshot(topic, interest);
        }
        // The session is ending: its interests leave the topic with it.
        Err(Refused::Closed) => {
            interest.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Offers the batches of one source transaction, in order, to every stream of their topics
/// (`made`: index into `topics` and `states`, and the batch), under the topics' locks. More than
/// one batch is a group: each stream's batches carry `TxGroup` (id: the transaction's position,
/// the highest version among them), `last` on the final one that stream gets, so that a
/// receiver applies them in one step. The origin's `apply_txn` and a relay's `mirror_group`
/// both publish through this.
pub(crate) fn offer_txn(
    inner: &Inner,
    topics: &[Arc<Topic>],
    states: &mut [std::sync::MutexGuard<'_, TopicState>],
    made: &[(usize, Arc<Batch>)],
) {
    let grouped = made.len() > 1;
    let id = made.iter().map(|(_, b)| b.version).max().unwrap_or(0);
    // The last batch of the group that each stream will get.
    let mut last: HashMap<SessionId, usize> = HashMap::new();
    if grouped {
        for (k, (i, b)) in made.iter().enumerate() {
            for (sid, interest) in &states[*i].interests {
                if wants(interest, b) {
                    last.insert(*sid, k);
                }
            }
        }
    }
    for (k, (i, b)) in made.iter().enumerate() {
        for (sid, interest) in states[*i].interests.iter_mut() {
            let group = grouped.then(|| pb::TxGroup {
                id,
                last: last.get(sid) == Some(&k),
            });
            offer(inner, &topics[*i].name, interest, b, group);
        }
    }
}

/// Whether `batch` goes to the stream of `interest`: not while it is lagged (a snapshot
/// follows), and for keyed interest only when the batch changes one of its keys.
pub(crate) fn wants(interest: &Interest, batch: &Batch) -> bool {
    !interest.lagged
        && interest
            .keys
            .as_ref()
            .is_none_or(|keys| batch.changes.iter().any(|c| keys.contains(c.key.as_str())))
}

/// Makes the stream of `interest` catch up on `topic` with Reset + snapshot: its queue
/// overflowed, or the topic's data was replaced (a new initial copy of a table).
pub(crate) fn resnapshot(topic: &Arc<str>, interest: &mut Interest) {
    interest.lagged = true;
    interest
        .queue
        .lagged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(topic.clone());
    interest.queue.wake.notify_one();
}

struct SessTopic {
    topic: Arc<Topic>,
    cursor: u64,
    seen: u64,
    pending: Arc<AtomicU64>,
    /// The epoch of what this stream was sent for the topic.
    epoch: Arc<str>,
    /// The incarnation of the topic's data it follows (see `TopicState::generation`).
    generation: u64,
    /// A relay's topic not yet synced from upstream: the Subscribe to answer once it is.
    parked: Option<pb::Subscribe>,
    /// Whether the stream has been sent anything of the topic (a snapshot chunk, a batch).
    started: bool,
}

/// Why the session ends: the peer went away, or a request was refused.
enum End {
    Gone,
    Refused(Status),
}

/// What woke a session.
enum Woke {
    Cut,
    Lagged,
    Request(Option<Result<pb::SyncRequest, Status>>),
    Batch(Option<Queued>),
    Tick,
}

struct Session {
    origin: Origin,
    id: SessionId,
    queue: Arc<Queue>,
    out: Out,
    topics: HashMap<Arc<str>, SessTopic>,
}

pub(crate) async fn run(
    origin: Origin,
    mut requests: tonic::Streaming<pb::SyncRequest>,
    out: Out,
    conn: u64,
) {
    let inner = origin.inner.clone();
    let id = SessionId {
        conn,
        seq: inner.next_session.fetch_add(1, Ordering::Relaxed),
    };
    inner.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = super::pipe::channel(inner.cfg.stream_queue);
    let queue = Arc::new(Queue {
        tx,
        lagged: Mutex::new(HashSet::new()),
        wake: Notify::new(),
    });
    // Only a cut after this stream opened ends it.
    let mut cut = inner.cut.subscribe();
    cut.mark_unchanged();
    if inner.shutting_down.load(Ordering::Acquire) {
        // Shutdown began after `sync` admitted this stream but before it could see the cut.
        let _ = out
            .send(Err(Status::unavailable("origin is shutting down")))
            .await;
        return;
    }
    let mut tick = tokio::time::interval(inner.cfg.progress_interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let mut s = Session {
        origin,
        id,
        queue: queue.clone(),
        out,
        topics: HashMap::new(),
    };
    debug!(session = id.seq, "sync stream opened");
    // What the session waits on besides its queue is polled through gates: only when it woke
    // the session, not at every batch the session is woken for. The leaf's requests are read
    // under its connection's lock; a fresh wait on the cut or on the lagged signal at each
    // batch would add and remove a waiter under a lock (the cut's shared by every stream).
    // Both waits are kept across batches for that reason. The gates share one registration
    // of the task's waker per poll.
    const CUT: usize = 0;
    const LAGGED: usize = 1;
    const REQUEST: usize = 2;
    const TICK: usize = 3;
    let gates = Gates::new(4);
    let mut cut_changed = std::pin::pin!(cut.changed());
    let mut lagged = std::pin::pin!(queue.wake.notified());
    // Between the batches of a transaction group (the last one handled was a group's, not its
    // last): only the rest of the group is sent, so the stream's tick and its requests wait.
    // A Progress or a snapshot there would end the group early for the leaf, which then
    // applies what it holds of it as a step of its own. The rest is queued by the same
    // `offer_txn` call, which holds the lock of every topic of the transaction until it has
    // offered all of it: `in_group` is the topic of the batch handled last. With the queue
    // empty, the session waits for that lock (the offer's end), and what has not come by then
    // is not coming (refused for a full queue: the topic resnapshots), so the group is over.
    let mut in_group: Option<Arc<Topic>> = None;
    let end = loop {
        // In this order: the cut ends the stream before anything else is sent.
        let woke = std::future::poll_fn(|cx| {
            gates.register(cx);
            if gates
                .poll(CUT, |cx| cut_changed.as_mut().poll(cx))
                .is_ready()
            {
                return Poll::Ready(Woke::Cut);
            }
            if gates.poll(LAGGED, |cx| lagged.as_mut().poll(cx)).is_ready() {
                return Poll::Ready(Woke::Lagged);
            }
            if let Some(topic) = &in_group {
                // A gate not polled stays open: what woke it is seen after the group.
                if let Poll::Ready(queued) = rx.poll_recv(cx) {
                    return Poll::Ready(Woke::Batch(queued));
                }
                drop(topic.lock());
                if let Poll::Ready(queued) = rx.poll_recv(cx) {
                    return Poll::Ready(Woke::Batch(queued));
                }
                in_group = None;
            }
            if let Poll::Ready(req) = gates.poll(REQUEST, |cx| {
                std::pin::Pin::new(&mut requests).poll_next(cx)
            }) {
                return Poll::Ready(Woke::Request(req));
            }
            if let Poll::Ready(queued) = rx.poll_recv(cx) {
                return Poll::Ready(Woke::Batch(queued));
            }
            if gates.poll(TICK, |cx| tick.poll_tick(cx)).is_ready() {
                return Poll::Ready(Woke::Tick);
            }
            Poll::Pending
        })
        .await;
        let step = match woke {
            Woke::Cut => Err(End::Refused(Status::unavailable(
                "origin closed the stream; reconnect and resume",
            ))),
            Woke::Lagged => {
                // A completed wait stays completed: the next signal needs a new one.
                lagged.set(queue.wake.notified());
                s.catch_up_lagged().await
            }
            Woke::Request(Some(Ok(r))) => s.handle(r).await,
            Woke::Request(None) => Err(End::Gone),
            Woke::Request(Some(Err(e))) => {
                debug!(session = id.seq, error = %e, "sync request stream failed");
                Err(End::Gone)
            }
            Woke::Batch(Some((batch, group))) => {
                in_group = group
                    .filter(|g| !g.last)
                    .and_then(|_| s.topics.get(&batch.topic))
                    .map(|st| st.topic.clone());
                s.send_batch(batch, group).await
            }
            // The session holds its queue's sender: not while it runs.
            Woke::Batch(None) => Err(End::Gone),
            Woke::Tick => s.progress().await,
        };
        if let Err(e) = step {
            break e;
        }
    };
    if let End::Refused(status) = end {
        let _ = s.out.send(Err(status)).await;
    }
}

/// The stream's interests leave its topics when the session ends, and also when its future is
/// dropped unfinished: the session runs inside its stream's response body, which HTTP/2 drops
/// when the stream is reset or its connection goes away.
impl Drop for Session {
    fn drop(&mut self) {
        for (_, st) in self.topics.drain() {
            let mut ts = st.topic.lock();
            ts.interests.remove(&self.id);
            release_shared_snapshot(&mut ts);
        }
        debug!(session = self.id.seq, "sync stream closed");
    }
}

impl Session {
    fn inner(&self) -> &Inner {
        &self.origin.inner
    }

    async fn send(&self, kind: pb::sync_response::Kind) -> Result<(), End> {
        self.send_frame(Frame::Msg(pb::SyncResponse { kind: Some(kind) }))
            .await
    }

    async fn send_frame(&self, frame: Frame) -> Result<(), End> {
        self.out.send(Ok(frame)).await.map_err(|_| End::Gone)
    }

    fn position(epoch: &str, version: u64) -> Option<pb::Position> {
        Some(pb::Position {
            epoch: epoch.to_string(),
            version,
        })
    }

    async fn handle(&mut self, req: pb::SyncRequest) -> Result<(), End> {
        match req.kind {
            Some(pb::sync_request::Kind::Subscribe(sub)) => self.subscribe(sub).await,
            Some(pb::sync_request::Kind::Unsubscribe(u)) => {
                self.unsubscribe(u);
                Ok(())
            }
            None => Err(End::Refused(Status::invalid_argument(
                "SyncRequest carries neither subscribe nor unsubscribe",
            ))),
        }
    }

    fn unsubscribe(&mut self, u: pb::Unsubscribe) {
        let Some(st) = self.topics.get(u.topic.as_str()) else {
            return;
        };
        let mut ts = st.topic.lock();
        if u.keys.is_empty() {
            ts.interests.remove(&self.id);
            drop(ts);
            self.topics.remove(u.topic.as_str());
            return;
        }
        if let Some(Interest {
            keys: Some(keys), ..
        }) = ts.interests.get_mut(&self.id)
        {
            for k in &u.keys {
                keys.remove(k.as_str());
            }
        }
    }

    async fn subscribe(&mut self, sub: pb::Subscribe) -> Result<(), End> {
        // An unknown topic fails that subscription only: the stream goes on for the others.
        let topic = match self.origin.topic(&sub.topic, true) {
            Ok(topic) => topic,
            Err(PublishError::UnknownTopic(t)) => {
                let reason = match &self.inner().upstream {
                    Some(up) => format!(
                        "no topic named '{}' at this relay (it serves the full topics and views \
                         it holds from {up}; on_demand topics are not relayed: subscribe at the origin)",
                        crate::types::clipped(&t, 128)
                    ),
                    None => format!("no topic named '{}'", crate::types::clipped(&t, 128)),
                };
                return self
                    .send(pb::sync_response::Kind::Refused(pb::Refused {
                        topic: sub.topic,
                        reason,
                    }))
                    .await;
            }
            Err(other) => return Err(End::Refused(Status::invalid_argument(other.to_string()))),
        };
        if let Some(i) = sub.keys.iter().position(String::is_empty) {
            return Err(End::Refused(Status::invalid_argument(format!(
                "subscribe to '{}': key {i} is empty",
                topic.name
            ))));
        }
        let limit = self.inner().cfg.max_publish_changes;
        if sub.keys.len() > limit {
            return Err(End::Refused(Status::invalid_argument(format!(
                "subscribe names {} keys; the limit is {limit}",
                sub.keys.len()
            ))));
        }
        let name = topic.name.clone();
        let keyed_add = !sub.keys.is_empty()
            && self.topics.get(&name).is_some_and(|t| t.parked.is_none())
            && matches!(
                topic.lock().interests.get(&self.id),
                Some(Interest { keys: Some(_), .. })
            );
        if keyed_add {
            return self.add_keys(&topic, sub.keys).await;
        }
        let pending = self
            .topics
            .get(&name)
            .map(|t| t.pending.clone())
            .unwrap_or_default();
        let keys: Option<HashSet<Arc<str>>> = if sub.keys.is_empty() {
            None
        } else {
            Some(sub.keys.iter().map(|k| Arc::from(k.as_str())).collect())
        };
        let mut keyed_bytes = 0;
        if let Some(keys) = &keys {
            self.check_subscribed(&name, keys.len())?;
            keyed_bytes = named_bytes(&topic.lock().data, keys.iter().map(|k| &**k));
            self.check_subscribed_bytes(&name, keyed_bytes)?;
        }
        let relay = self.inner().upstream.is_some();
        enum Start {
            Resume {
                from: u64,
                tail: Vec<Arc<Batch>>,
            },
            Snapshot {
                shared: Option<Arc<SharedSnapshot>>,
                data: imbl::OrdMap<Arc<str>, Stored>,
                failed: Option<String>,
            },
            /// A relay's topic not synced from upstream yet: answered once it is.
            Park,
        }
        let (start, version, epoch, generation) = {
            let mut ts = topic.lock();
            let version = ts.version;
            let floor = ts.floor;
            let generation = ts.generation;
            let epoch = ts.epoch.clone();
            let start = match &epoch {
                None => Start::Park,
                Some(epoch) => match &sub.resume {
                    Some(p)
                        if *p.epoch == **epoch && p.version <= version && p.version >= floor =>
                    {
                        let tail = ts
                            .log
                            .iter()
                            .filter(|b| b.version > p.version)
                            .cloned()
                            .collect();
                        Start::Resume {
                            from: p.version,
                            tail,
                        }
                    }
                    // A relay behind its peer (a leaf failing over from a relay that was ahead):
                    // same epoch, so the stream waits for what comes after its position.
                    Some(p) if relay && *p.epoch == **epoch && p.version > version => {
                        Start::Resume {
                            from: p.version,
                            tail: Vec::new(),
                        }
                    }
                    Some(p) => Start::Snapshot {
                        shared: keys.is_none().then(|| shared_snapshot(&mut ts)),
                        data: ts.data.clone(),
                        failed: Some(if *p.epoch != **epoch {
                            format!(
                                "epoch {} is not this origin's epoch {epoch}",
                                crate::types::clipped(&p.epoch, 64)
                            )
                        } else if p.version > version {
                            format!("version {} is ahead of the origin's {version}", p.version)
                        } else {
                            format!(
                                "version {} is older than the retained window (oldest retained {})",
                                p.version, floor
                            )
                        }),
                    },
                    None => Start::Snapshot {
                        shared: keys.is_none().then(|| shared_snapshot(&mut ts)),
                        data: ts.data.clone(),
                        failed: None,
                    },
                },
            };
            ts.interests.insert(
                self.id,
                Interest {
                    keys: keys.clone(),
                    queue: self.queue.clone(),
                    pending: pending.clone(),
                    // A parked stream takes no batches: the first snapshot wakes it.
                    lagged: matches!(start, Start::Park),
                    bytes: keyed_bytes,
                },
            );
            (
                start,
                version,
                epoch.unwrap_or_else(|| Arc::from("")),
                generation,
            )
        };
        let cursor = match &start {
            Start::Resume { from, .. } if *from > version => *from,
            _ => version,
        };
        let started = self.topics.get(&name).is_some_and(|t| t.started);
        self.topics.insert(
            name.clone(),
            SessTopic {
                topic: topic.clone(),
                cursor,
                seen: cursor,
                pending,
                epoch: epoch.clone(),
                generation,
                parked: None,
                started,
            },
        );
        match start {
            Start::Park => {
                debug!(session = self.id.seq, topic = %name, "relay topic not synced yet; subscription waits");
                if let Some(st) = self.topics.get_mut(&name) {
                    st.parked = Some(sub);
                }
            }
            Start::Resume { from, tail } => {
                self.inner().stats.resumes.fetch_add(1, Ordering::Relaxed);
                let mut cursor = from;
                for b in tail {
                    let changes: Vec<pb::Change> = match &keys {
                        None => b.changes.clone(),
                        Some(k) => b
                            .changes
                            .iter()
                            .filter(|c| k.contains(c.key.as_str()))
                            .cloned()
                            .collect(),
                    };
                    if changes.is_empty() {
                        continue;
                    }
                    self.send(pb::sync_response::Kind::Changes(pb::ChangeBatch {
                        topic: name.to_string(),
                        epoch: epoch.to_string(),
                        prev_version: cursor,
                        version: b.version,
                        changes,
                        // Resumed tails go topic by topic, not in transaction order.
                        group: None,
                    }))
                    .await?;
                    self.inner()
                        .stats
                        .batches_sent
                        .fetch_add(1, Ordering::Relaxed);
                    cursor = b.version;
                }
                let at = version.max(from);
                self.send(pb::sync_response::Kind::Progress(
                    self.origin.progress(&name, Self::position(&epoch, at)),
                ))
                .await?;
                self.mark_started(&name);
            }
            Start::Snapshot {
                shared,
                data,
                failed,
            } => {
                if let Some(reason) = failed {
                    debug!(session = self.id.seq, topic = %name, %reason, "cannot resume");
                    self.send_reset(&name, reason).await?;
                }
                match shared {
                    Some(shared) => self.send_shared_snapshot(&name, &epoch, &shared).await?,
                    None => {
                        self.send_snapshot(&name, &epoch, &data, keys.as_ref(), version)
                            .await?
                    }
                }
                self.mark_started(&name);
            }
        }
        Ok(())
    }

    fn mark_started(&mut self, topic: &Arc<str>) {
        if let Some(st) = self.topics.get_mut(topic) {
            st.started = true;
        }
    }

    async fn add_keys(&mut self, topic: &Arc<Topic>, keys: Vec<String>) -> Result<(), End> {
        let (entries, version, epoch) = {
            let mut ts = topic.lock();
            let version = ts.version;
            let epoch = ts.epoch.clone().unwrap_or_else(|| Arc::from(""));
            let entries: Vec<pb::Entry> = keys
                .iter()
                .filter_map(|k| ts.data.get(k.as_str()).map(|s| super::wire::entry(k, s)))
                .collect();
            let TopicState {
                data, interests, ..
            } = &mut *ts;
            if let Some(Interest {
                keys: Some(set),
                bytes,
                ..
            }) = interests.get_mut(&self.id)
            {
                let added: Vec<&str> = keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !set.contains(*k))
                    .collect();
                self.check_subscribed(&topic.name, set.len() + added.len())?;
                let more = named_bytes(data, added.iter().copied());
                self.check_subscribed_bytes(&topic.name, *bytes + more)?;
                *bytes += more;
                set.extend(added.into_iter().map(Arc::from));
            }
            (entries, version, epoch)
        };
        self.send(pb::sync_response::Kind::Snapshot(pb::SnapshotChunk {
            topic: topic.name.to_string(),
            position: Self::position(&epoch, version),
            total_entries: entries.len() as u64,
            entries,
            last: true,
        }))
        .await
    }

    /// Refuses a keyed interest naming more than `max_subscribed_bytes`.
    fn check_subscribed_bytes(&self, topic: &str, bytes: u64) -> Result<(), End> {
        let limit = self.inner().cfg.max_subscribed_bytes;
        if bytes > limit.0 {
            return Err(End::Refused(Status::resource_exhausted(format!(
                "this stream would subscribe {} of '{topic}' (keys and their values); the \
                 origin allows {limit} per stream and topic (max_subscribed_bytes)",
                crate::types::ByteSize(bytes)
            ))));
        }
        Ok(())
    }

    /// Refuses a keyed interest of more than `max_subscribed_keys` keys.
    fn check_subscribed(&self, topic: &str, keys: usize) -> Result<(), End> {
        let limit = self.inner().cfg.max_subscribed_keys;
        if keys > limit {
            return Err(End::Refused(Status::resource_exhausted(format!(
                "this stream would subscribe {keys} keys of '{topic}'; the origin allows \
                 {limit} per stream and topic (max_subscribed_keys)"
            ))));
        }
        Ok(())
    }

    async fn send_reset(&self, topic: &str, reason: String) -> Result<(), End> {
        self.inner()
            .stats
            .resets_sent
            .fetch_add(1, Ordering::Relaxed);
        self.send(pb::sync_response::Kind::Reset(pb::Reset {
            topic: topic.to_string(),
            reason,
        }))
        .await
    }

    /// Splits `entries` into snapshot chunks within the configured bounds.
    fn chunks<'a>(
        &self,
        entries: impl Iterator<Item = (&'a Arc<str>, &'a Stored)>,
        mut emit: impl FnMut(&[(&'a Arc<str>, &'a Stored)], bool),
    ) {
        let mut rest = entries.peekable();
        loop {
            let (chunk, last) = self.next_chunk(&mut rest);
            emit(&chunk, last);
            if last {
                return;
            }
        }
    }

    /// The next snapshot chunk's entries from `rest`, within the configured bounds (at least
    /// one entry while any is left), and whether it is the last.
    fn next_chunk<'a, I: Iterator<Item = (&'a Arc<str>, &'a Stored)>>(
        &self,
        rest: &mut std::iter::Peekable<I>,
    ) -> (Vec<(&'a Arc<str>, &'a Stored)>, bool) {
        let cfg = &self.inner().cfg;
        let (max_n, max_b) = (
            cfg.snapshot_chunk_entries,
            cfg.snapshot_chunk_bytes.as_usize(),
        );
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some(&(k, s)) = rest.peek() {
            let size = k.len() + s.value.len() + 16;
            if !chunk.is_empty() && (chunk.len() >= max_n || bytes + size > max_b) {
                return (chunk, false);
            }
            bytes += size;
            chunk.push((k, s));
            rest.next();
        }
        (chunk, true)
    }

    /// Sends the whole-topic snapshot `shared`, encoding each chunk no stream encoded yet.
    async fn send_shared_snapshot(
        &self,
        topic: &str,
        epoch: &str,
        shared: &SharedSnapshot,
    ) -> Result<(), End> {
        let stats = &self.inner().stats;
        let mut next = 0;
        loop {
            let chunk: (Bytes, bool) = {
                let mut e = shared.chunks.lock().await;
                // A stream stops after the last chunk, so it only reaches the end of what is
                // encoded while more is to come.
                if next == e.chunks.len() {
                    // No await from here to the push: the chunk is encoded whole or not at all.
                    let from = match &e.after {
                        None => std::ops::Bound::Unbounded,
                        Some(k) => std::ops::Bound::Excluded(&**k),
                    };
                    let mut rest = shared
                        .data
                        .range::<_, str>((from, std::ops::Bound::Unbounded))
                        .peekable();
                    let (entries, last) = self.next_chunk(&mut rest);
                    let encoded = Bytes::from(super::wire::encode_snapshot_chunk(
                        topic,
                        epoch,
                        shared.version,
                        &entries,
                        last,
                        shared.data.len() as u64,
                    ));
                    if e.chunks.is_empty() {
                        stats.snapshot_encodings.fetch_add(1, Ordering::Relaxed);
                    }
                    stats
                        .snapshot_chunks_encoded
                        .fetch_add(1, Ordering::Relaxed);
                    e.after = entries.last().map(|(k, _)| Arc::clone(k));
                    e.done = last;
                    e.chunks.push(encoded);
                }
                // Known here, so that a stream is done once its last chunk is sent, without
                // waiting for the lock again (a snapshot counts as sent when its stream got it).
                (e.chunks[next].clone(), e.done && next + 1 == e.chunks.len())
            };
            self.send_frame(Frame::Shared(chunk.0)).await?;
            if chunk.1 {
                break;
            }
            next += 1;
        }
        stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn send_snapshot(
        &self,
        topic: &str,
        epoch: &str,
        data: &imbl::OrdMap<Arc<str>, Stored>,
        keys: Option<&HashSet<Arc<str>>>,
        version: u64,
    ) -> Result<(), End> {
        let wanted: Box<dyn Iterator<Item = (&Arc<str>, &Stored)> + Send + Sync> = match keys {
            None => Box::new(data.iter()),
            Some(keys) => Box::new(data.iter().filter(move |(k, _)| keys.contains(&**k))),
        };
        // A keyed snapshot is small (the keys of one on_demand sidecar): built whole, then sent.
        let mut msgs = Vec::new();
        self.chunks(wanted, |entries, last| {
            msgs.push(pb::SnapshotChunk {
                topic: topic.to_string(),
                position: Self::position(epoch, version),
                entries: entries
                    .iter()
                    .map(|(k, s)| super::wire::entry(k, s))
                    .collect(),
                last,
                // Keyed: counted once the chunks are cut (below).
                total_entries: 0,
            })
        });
        let total: u64 = msgs.iter().map(|m| m.entries.len() as u64).sum();
        for mut m in msgs {
            m.total_entries = total;
            self.send(pb::sync_response::Kind::Snapshot(m)).await?;
        }
        self.inner()
            .stats
            .snapshots_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn send_batch(
        &mut self,
        batch: Arc<Batch>,
        group: Option<pb::TxGroup>,
    ) -> Result<(), End> {
        let topic = &batch.topic;
        let Some(st) = self.topics.get_mut(topic) else {
            return Ok(());
        };
        st.pending.fetch_sub(1, Ordering::AcqRel);
        if batch.version <= st.seen || batch.generation != st.generation || st.parked.is_some() {
            return Ok(());
        }
        let prev_version = st.cursor;
        st.cursor = batch.version;
        st.seen = batch.version;
        st.started = true;
        // Borrowed, not cloned: the epoch's reference count is shared by every stream of the
        // topic, and a clone and a drop of it for each batch sent moved its cache line between
        // the cores once per delivery.
        let epoch: &str = &st.epoch;
        let make = || pb::SyncResponse {
            kind: Some(pb::sync_response::Kind::Changes(pb::ChangeBatch {
                topic: topic.to_string(),
                epoch: epoch.to_string(),
                prev_version,
                version: batch.version,
                changes: batch.changes.clone(),
                group,
            })),
        };
        let frame = if group.is_none() && prev_version == batch.prev {
            let stats = &self.origin.inner.stats;
            Frame::Shared(
                batch
                    .encoded
                    .get_or_init(|| {
                        stats.batch_encodings.fetch_add(1, Ordering::Relaxed);
                        super::wire::framed(&make())
                    })
                    .clone(),
            )
        } else {
            Frame::Msg(make())
        };
        self.send_frame(frame).await?;
        self.inner()
            .stats
            .batches_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Resnapshots every topic whose queue overflowed or whose data was replaced, and answers
    /// the parked subscriptions of a relay's topics that have synced since.
    async fn catch_up_lagged(&mut self) -> Result<(), End> {
        let lagged: Vec<Arc<str>> = self
            .queue
            .lagged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for name in lagged {
            let Some(st) = self.topics.get_mut(&name) else {
                continue;
            };
            if let Some(sub) = st.parked.take() {
                // Answered as a new subscription: the parked one leaves no trace.
                let topic = st.topic.clone();
                self.topics.remove(&name);
                topic.lock().interests.remove(&self.id);
                self.subscribe(sub).await?;
                continue;
            }
            let started = st.started;
            let topic = st.topic.clone();
            let (shared, data, keys, version, epoch, generation) = {
                let mut ts = topic.lock();
                let version = ts.version;
                let generation = ts.generation;
                let data = ts.data.clone();
                let epoch = ts.epoch.clone().unwrap_or_else(|| Arc::from(""));
                let keys = match ts.interests.get_mut(&self.id) {
                    Some(interest) => {
                        interest.lagged = false;
                        interest.keys.clone()
                    }
                    None => continue,
                };
                let shared = keys.is_none().then(|| shared_snapshot(&mut ts));
                (shared, data, keys, version, epoch, generation)
            };
            if let Some(st) = self.topics.get_mut(&name) {
                st.cursor = version;
                st.seen = version;
                st.epoch = epoch.clone();
                st.generation = generation;
                st.started = true;
            }
            if started {
                warn!(session = self.id.seq, topic = %name, version, "stream resnapshotted (fell behind, or the topic was replaced)");
                self.send_reset(
                    &name,
                    "stream fell behind its queue bound, or the topic's data was replaced"
                        .to_string(),
                )
                .await?;
            }
            match shared {
                Some(shared) => self.send_shared_snapshot(&name, &epoch, &shared).await?,
                None => {
                    self.send_snapshot(&name, &epoch, &data, keys.as_ref(), version)
                        .await?
                }
            }
        }
        Ok(())
    }

    /// Tells each subscription how far it is current: a resume bookmark and a heartbeat. A
    /// relay's topic whose upstream is not live gets none, so that downstream sees it stale.
    async fn progress(&mut self) -> Result<(), End> {
        let mut msgs = Vec::with_capacity(self.topics.len());
        let mut copying = Vec::new();
        for (name, st) in self.topics.iter_mut() {
            if st.parked.is_some() {
                // Waiting for a first copy: no position to tell, only how far the copy is.
                let p = self.origin.progress(name, None);
                if p.upstream_copied_rows > 0 {
                    copying.push(p);
                }
                continue;
            }
            if let Some(source) = &st.topic.mirror_of {
                if source.staleness_ms() > 0 {
                    continue;
                }
            }
            {
                let mut ts = st.topic.lock();
                release_shared_snapshot(&mut ts);
                let live = ts.interests.get(&self.id).is_some_and(|i| !i.lagged);
                if live
                    && st.pending.load(Ordering::Acquire) == 0
                    && ts.version > st.seen
                    && ts.generation == st.generation
                {
                    st.seen = ts.version;
                }
            }
            st.cursor = st.seen;
            msgs.push((name.clone(), st.seen, st.epoch.clone()));
        }
        for p in copying {
            self.send(pb::sync_response::Kind::Progress(p)).await?;
        }
        for (name, version, epoch) in msgs {
            self.send(pb::sync_response::Kind::Progress(
                self.origin.progress(&name, Self::position(&epoch, version)),
            ))
            .await?;
            self.inner()
                .stats
                .progress_sent
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The bytes a keyed interest in `keys` names: each key, and its value where `data` has one.
fn named_bytes<'a>(
    data: &imbl::OrdMap<Arc<str>, Stored>,
    keys: impl Iterator<Item = &'a str>,
) -> u64 {
    keys.map(|k| (k.len() + data.get(k).map_or(0, |s| s.value.len())) as u64)
        .sum()
}
