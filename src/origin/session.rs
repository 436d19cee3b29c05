//! One `Sync` stream at the origin: the subscriptions of one sidecar and what it has been sent.
//!
//! Per topic the session keeps `cursor` (the version of the last message sent, which the next
//! batch names as `prev_version`) and `seen` (every version up to it has been sent or did not
//! concern this stream). Publishers only `try_send` into the session's bounded queue; a full
//! queue marks the topic lagged, and the session then sends `Reset` and a fresh snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{debug, warn};

use super::{Batch, Inner, Interest, Origin, PublishError, SessionId, Stored, Topic, TopicState};
use crate::pb::feed::v1 as pb;

type Out = mpsc::Sender<Result<pb::SyncResponse, Status>>;

/// The bounded queue from publishers to one session.
pub(crate) struct Queue {
    tx: mpsc::Sender<(Arc<str>, Arc<Batch>, Option<pb::TxGroup>)>,
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
            Arc::new(Batch {
                version: batch.version,
                bytes: batch.bytes,
                changes,
            })
        }
    };
    interest.pending.fetch_add(1, Ordering::AcqRel);
    match interest.queue.tx.try_send((topic.clone(), batch, group)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            interest.pending.fetch_sub(1, Ordering::AcqRel);
            inner.stats.lagged.fetch_add(1, Ordering::Relaxed);
            resnapshot(topic, interest);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            interest.pending.fetch_sub(1, Ordering::AcqRel);
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
}

/// Why the session ends: the peer went away, or a request was refused.
enum End {
    Gone,
    Refused(Status),
}

struct Session {
    origin: Origin,
    id: SessionId,
    queue: Arc<Queue>,
    out: Out,
    topics: HashMap<Arc<str>, SessTopic>,
}

pub(crate) async fn run(origin: Origin, mut requests: tonic::Streaming<pb::SyncRequest>, out: Out) {
    let inner = origin.inner.clone();
    let id = inner.next_session.fetch_add(1, Ordering::Relaxed);
    inner.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(inner.cfg.stream_queue);
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
    debug!(session = id, "sync stream opened");
    let end = loop {
        let step = tokio::select! {
            biased;
            _ = cut.changed() => Err(End::Refused(Status::unavailable("origin closed the stream; reconnect and resume"))),
            _ = queue.wake.notified() => s.catch_up_lagged().await,
            req = requests.message() => match req {
                Ok(Some(r)) => s.handle(r).await,
                Ok(None) => Err(End::Gone),
                Err(e) => {
                    debug!(session = id, error = %e, "sync request stream failed");
                    Err(End::Gone)
                }
            },
            Some((topic, batch, group)) = rx.recv() => s.send_batch(&topic, batch, group).await,
            _ = tick.tick() => s.progress().await,
        };
        if let Err(e) = step {
            break e;
        }
    };
    if let End::Refused(status) = end {
        let _ = s.out.send(Err(status)).await;
    }
    for (_, st) in s.topics.drain() {
        st.topic.lock().interests.remove(&id);
    }
    debug!(session = id, "sync stream closed");
}

impl Session {
    fn inner(&self) -> &Inner {
        &self.origin.inner
    }

    async fn send(&self, kind: pb::sync_response::Kind) -> Result<(), End> {
        self.out
            .send(Ok(pb::SyncResponse { kind: Some(kind) }))
            .await
            .map_err(|_| End::Gone)
    }

    fn position(&self, version: u64) -> Option<pb::Position> {
        Some(pb::Position {
            epoch: self.inner().epoch.clone(),
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
                return self
                    .send(pb::sync_response::Kind::Refused(pb::Refused {
                        topic: sub.topic,
                        reason: format!("no topic named '{}'", crate::types::clipped(&t, 128)),
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
            && self.topics.contains_key(&name)
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
        let epoch = self.inner().epoch.clone();
        enum Start {
            Resume {
                from: u64,
                tail: Vec<Arc<Batch>>,
            },
            Snapshot {
                data: imbl::OrdMap<Arc<str>, Stored>,
                failed: Option<String>,
            },
        }
        let (start, version) = {
            let mut ts = topic.lock();
            let version = ts.version;
            let floor = ts.floor;
            let start = match &sub.resume {
                Some(p) if p.epoch == epoch && p.version <= version && p.version >= floor => {
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
                Some(p) => Start::Snapshot {
                    data: ts.data.clone(),
                    failed: Some(if p.epoch != epoch {
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
                    data: ts.data.clone(),
                    failed: None,
                },
            };
            ts.interests.insert(
                self.id,
                Interest {
                    keys: keys.clone(),
                    queue: self.queue.clone(),
                    pending: pending.clone(),
                    lagged: false,
                    bytes: keyed_bytes,
                },
            );
            (start, version)
        };
        self.topics.insert(
            name.clone(),
            SessTopic {
                topic: topic.clone(),
                cursor: version,
                seen: version,
                pending,
            },
        );
        match start {
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
                        epoch: epoch.clone(),
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
                let (upstream_lag_ms, upstream_lag_bytes) = self.origin.upstream_lag(&name);
                self.send(pb::sync_response::Kind::Progress(pb::Progress {
                    topic: name.to_string(),
                    position: self.position(version),
                    upstream_lag_ms,
                    upstream_lag_bytes,
                }))
                .await?;
            }
            Start::Snapshot { data, failed } => {
                if let Some(reason) = failed {
                    debug!(session = self.id, topic = %name, %reason, "cannot resume");
                    self.send_reset(&name, reason).await?;
                }
                self.send_snapshot(&name, &data, keys.as_ref(), version)
                    .await?;
            }
        }
        Ok(())
    }

    async fn add_keys(&mut self, topic: &Arc<Topic>, keys: Vec<String>) -> Result<(), End> {
        let (entries, version) = {
            let mut ts = topic.lock();
            let version = ts.version;
            let entries: Vec<pb::Entry> = keys
                .iter()
                .filter_map(|k| {
                    ts.data.get(k.as_str()).map(|s| pb::Entry {
                        key: k.clone(),
                        value: s.value.clone(),
                        version: s.version,
                    })
                })
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
            (entries, version)
        };
        self.send(pb::sync_response::Kind::Snapshot(pb::SnapshotChunk {
            topic: topic.name.to_string(),
            position: self.position(version),
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

    async fn send_snapshot(
        &self,
        topic: &str,
        data: &imbl::OrdMap<Arc<str>, Stored>,
        keys: Option<&HashSet<Arc<str>>>,
        version: u64,
    ) -> Result<(), End> {
        let cfg = &self.inner().cfg;
        let (max_n, max_b) = (
            cfg.snapshot_chunk_entries,
            cfg.snapshot_chunk_bytes.as_usize(),
        );
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let wanted: Box<dyn Iterator<Item = (&Arc<str>, &Stored)> + Send + Sync> = match keys {
            None => Box::new(data.iter()),
            Some(keys) => Box::new(data.iter().filter(move |(k, _)| keys.contains(&**k))),
        };
        for (k, s) in wanted {
            let size = k.len() + s.value.len() + 16;
            if !chunk.is_empty() && (chunk.len() >= max_n || bytes + size > max_b) {
                self.send(pb::sync_response::Kind::Snapshot(pb::SnapshotChunk {
                    topic: topic.to_string(),
                    position: self.position(version),
                    entries: std::mem::take(&mut chunk),
                    last: false,
                }))
                .await?;
                bytes = 0;
            }
            bytes += size;
            chunk.push(pb::Entry {
                key: k.to_string(),
                value: s.value.clone(),
                version: s.version,
            });
        }
        self.send(pb::sync_response::Kind::Snapshot(pb::SnapshotChunk {
            topic: topic.to_string(),
            position: self.position(version),
            entries: chunk,
            last: true,
        }))
        .await?;
        self.inner()
            .stats
            .snapshots_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn send_batch(
        &mut self,
        topic: &Arc<str>,
        batch: Arc<Batch>,
        group: Option<pb::TxGroup>,
    ) -> Result<(), End> {
        let Some(st) = self.topics.get_mut(topic) else {
            return Ok(());
        };
        st.pending.fetch_sub(1, Ordering::AcqRel);
        if batch.version <= st.seen {
            return Ok(());
        }
        let prev_version = st.cursor;
        st.cursor = batch.version;
        st.seen = batch.version;
        let msg = pb::ChangeBatch {
            topic: topic.to_string(),
            epoch: self.inner().epoch.clone(),
            prev_version,
            version: batch.version,
            changes: batch.changes.clone(),
            group,
        };
        self.send(pb::sync_response::Kind::Changes(msg)).await?;
        self.inner()
            .stats
            .batches_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Resnapshots every topic whose queue overflowed.
    async fn catch_up_lagged(&mut self) -> Result<(), End> {
        let lagged: Vec<Arc<str>> = self
            .queue
            .lagged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for name in lagged {
            let Some(st) = self.topics.get(&name) else {
                continue;
            };
            let topic = st.topic.clone();
            let (data, keys, version) = {
                let mut ts = topic.lock();
                let version = ts.version;
                let data = ts.data.clone();
                let Some(interest) = ts.interests.get_mut(&self.id) else {
                    continue;
                };
                interest.lagged = false;
                (data, interest.keys.clone(), version)
            };
            warn!(session = self.id, topic = %name, version, "stream fell behind; resnapshotting");
            if let Some(st) = self.topics.get_mut(&name) {
                st.cursor = version;
                st.seen = version;
            }
            self.send_reset(&name, "stream fell behind its queue bound".to_string())
                .await?;
            self.send_snapshot(&name, &data, keys.as_ref(), version)
                .await?;
        }
        Ok(())
    }

    /// Tells each subscription how far it is current: a resume bookmark and a heartbeat.
    async fn progress(&mut self) -> Result<(), End> {
        let mut msgs = Vec::with_capacity(self.topics.len());
        for (name, st) in self.topics.iter_mut() {
            {
                let ts = st.topic.lock();
                let live = ts.interests.get(&self.id).is_some_and(|i| !i.lagged);
                if live && st.pending.load(Ordering::Acquire) == 0 && ts.version > st.seen {
                    st.seen = ts.version;
                }
            }
            st.cursor = st.seen;
            msgs.push((name.clone(), st.seen));
        }
        for (name, version) in msgs {
            let (upstream_lag_ms, upstream_lag_bytes) = self.origin.upstream_lag(&name);
            self.send(pb::sync_response::Kind::Progress(pb::Progress {
                topic: name.to_string(),
                position: self.position(version),
                upstream_lag_ms,
                upstream_lag_bytes,
            }))
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
