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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::config::{FeedConfig, OriginSpec};
use crate::pb::feed::v1 as pb;
use crate::store::writer::{BatchChange, Op, SnapEntry};
use crate::store::Source;

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
}

/// Why a feed stream ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("invalid origin address: {0}")]
    Address(String),
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
}

/// The feed client of one origin.
pub(crate) struct FeedClient {
    spec: OriginSpec,
    cfg: FeedConfig,
    max_message: usize,
    topics: HashMap<String, TopicState>,
    writer: mpsc::Sender<Op>,
    stats: Arc<FeedStats>,
}

impl FeedClient {
    pub(crate) fn new(
        spec: OriginSpec,
        cfg: FeedConfig,
        max_message: usize,
        sources: Vec<Arc<Source>>,
        writer: mpsc::Sender<Op>,
        stats: Arc<FeedStats>,
    ) -> Self {
        let topics = sources
            .into_iter()
            .map(|s| {
                (
                    s.name().to_string(),
                    TopicState {
                        source: s,
                        cursor: None,
                        phase: Phase::AwaitSnapshot,
                    },
                )
            })
            .collect();
        FeedClient {
            spec,
            cfg,
            max_message,
            topics,
            writer,
            stats,
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
            match result {
                Err(FeedError::WriterGone) => return,
                Err(e) => {
                    warn!(origin = %self.spec.name, address = %self.spec.address, error = %e, "feed disconnected")
                }
                Ok(()) => {}
            }
            attempt = if heard { 0 } else { attempt.saturating_add(1) };
            let delay = backoff(&self.cfg, attempt);
            debug!(origin = %self.spec.name, ?delay, attempt, "redialling");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::signalled(&mut shutdown) => return,
            }
        }
    }

    async fn disconnected(&mut self) {
        if self.stats.connected.swap(false, Ordering::Relaxed) {
            self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
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
            let _ = self.writer.send(Op::AbortSnapshot { source }).await;
        }
    }

    async fn session(&mut self, heard: &mut bool) -> Result<(), FeedError> {
        let c = &self.cfg;
        let endpoint = Endpoint::from_shared(self.spec.address.clone())
            .map_err(|e| FeedError::Address(e.to_string()))?
            .connect_timeout(c.connect_timeout.0)
            .http2_keep_alive_interval(c.keepalive_interval.0)
            .keep_alive_timeout(c.keepalive_timeout.0)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = endpoint.connect().await?;
        let mut client = pb::feed_client::FeedClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        let (req_tx, req_rx) = mpsc::channel::<pb::SyncRequest>(self.topics.len() + 64);
        for (name, t) in self.topics.iter_mut() {
            let resume = t.cursor.as_ref().map(|c| pb::Position {
                epoch: c.epoch.clone(),
                version: c.version,
            });
            t.phase = if resume.is_some() {
                Phase::Live
            } else {
                Phase::AwaitSnapshot
            };
            // The channel holds one slot per topic plus room: this never waits.
            let _ = req_tx.try_send(subscribe(name, resume));
        }
        let mut stream = client.sync(ReceiverStream::new(req_rx)).await?.into_inner();
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        info!(origin = %self.spec.name, address = %self.spec.address, "feed connected");
        for t in self.topics.values() {
            t.source.set_connected(true);
        }
        let idle = self.cfg.idle_timeout.0;
        loop {
            let msg = match tokio::time::timeout(idle, stream.message()).await {
                Err(_) => return Err(FeedError::Idle(idle)),
                Ok(Err(status)) => return Err(FeedError::Status(status)),
                Ok(Ok(None)) => return Err(FeedError::Closed),
                Ok(Ok(Some(m))) => m,
            };
            *heard = true;
            self.stats.messages.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.handle(msg, &req_tx).await {
                if let FeedError::Protocol(_) = e {
                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        }
    }

    async fn handle(
        &mut self,
        msg: pb::SyncResponse,
        req_tx: &mpsc::Sender<pb::SyncRequest>,
    ) -> Result<(), FeedError> {
        use pb::sync_response::Kind;
        let Some(kind) = msg.kind else {
            return Err(FeedError::Protocol("empty SyncResponse".into()));
        };
        let topic = match &kind {
            Kind::Snapshot(s) => &s.topic,
            Kind::Changes(b) => &b.topic,
            Kind::Progress(p) => &p.topic,
            Kind::Reset(r) => &r.topic,
        }
        .clone();
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
                if t.phase != Phase::Snapshot(at.clone()) {
                    t.phase = Phase::Snapshot(at.clone());
                }
                let last = chunk.last;
                if last {
                    t.cursor = Some(at.clone());
                    t.phase = Phase::Live;
                    self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                Op::SnapshotChunk {
                    source: t.source.clone(),
                    epoch: at.epoch,
                    version: at.version,
                    entries: chunk
                        .entries
                        .into_iter()
                        .map(|e| SnapEntry {
                            key: e.key,
                            value: e.value,
                            version: e.version,
                        })
                        .collect(),
                    last,
                }
            }
            Kind::Changes(batch) => {
                if t.phase != Phase::Live {
                    return Ok(());
                }
                let Some(c) = &mut t.cursor else {
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
                Op::Batch {
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
                let Some(pos) = p.position else { return Ok(()) };
                if t.phase != Phase::Live {
                    return Ok(());
                }
                let Some(c) = &mut t.cursor else {
                    return Ok(());
                };
                if pos.epoch != c.epoch {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    return resubscribe(t, &topic, req_tx, &self.writer).await;
                }
                if pos.version > c.version {
                    c.version = pos.version;
                }
                Op::Progress {
                    source: t.source.clone(),
                    epoch: pos.epoch,
                    version: c.version,
                }
            }
            Kind::Reset(r) => {
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
                info!(origin = %self.spec.name, %topic, reason = %r.reason, "origin reset the topic; a snapshot follows");
                let was_snapshot = matches!(t.phase, Phase::Snapshot(_));
                t.phase = Phase::AwaitSnapshot;
                if !was_snapshot {
                    return Ok(());
                }
                Op::AbortSnapshot {
                    source: t.source.clone(),
                }
            }
        };
        self.writer
            .send(op)
            .await
            .map_err(|_| FeedError::WriterGone)
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
    writer: &mpsc::Sender<Op>,
) -> Result<(), FeedError> {
    t.phase = Phase::AwaitSnapshot;
    writer
        .send(Op::AbortSnapshot {
            source: t.source.clone(),
        })
        .await
        .map_err(|_| FeedError::WriterGone)?;
    req_tx
        .send(subscribe(topic, None))
        .await
        .map_err(|_| FeedError::Closed)
}

/// Full jitter: uniformly random below `min(cap, initial * 2^attempt)`, so a fleet that lost
/// its origin at once does not come back at once.
pub(crate) fn backoff(cfg: &FeedConfig, attempt: u32) -> Duration {
    let base = cfg.backoff_initial.0.as_millis() as u64;
    let cap = cfg.backoff_max.0.as_millis() as u64;
    let ceiling = base.saturating_mul(1u64 << attempt.min(30)).min(cap).max(1);
    Duration::from_millis(rand::random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let cfg = FeedConfig::default();
        for attempt in 0..64 {
            assert!(backoff(&cfg, attempt) <= cfg.backoff_max.0);
        }
        let first: Vec<_> = (0..200).map(|_| backoff(&cfg, 0)).collect();
        assert!(first.iter().all(|d| *d <= cfg.backoff_initial.0));
        assert!(first.iter().any(|d| *d != first[0]), "no jitter");
    }
}
