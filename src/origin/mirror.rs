//! A relay's topics: an origin whose topics are not published to but mirrored from a
//! sidecar's replicas (with the upstream's epochs and versions unchanged) and views (with the
//! relay's own epoch). Streams are served by the same sessions as the origin's: retained
//! window, Progress, Reset + snapshot, the catch-up of a stream that falls behind.
//!
//! A topic has no epoch until its first snapshot arrives; a stream subscribing before that
//! waits for it (a leaf resuming on a relay that just started resumes, without a snapshot,
//! as soon as the relay holds its position). A new upstream snapshot (a new epoch, or the
//! relay fell behind its own upstream) replaces the topic and catches up every stream with
//! Reset + snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::{retain, session, Inner, Origin, Stored, Topic, TopicState};
use crate::config::OriginConfig;
use crate::pb::feed::v1 as pb;
use crate::store::Source;

impl Origin {
    /// A relay serving `sources` (full topics and views of a sidecar) under `cfg`'s bounds;
    /// `upstream` names what it mirrors in the refusal of a Publish.
    pub(crate) fn relay(cfg: OriginConfig, upstream: String, sources: &[Arc<Source>]) -> Self {
        let epoch = format!("{:016x}", rand::random::<u64>());
        let mut topics: HashMap<Arc<str>, Arc<Topic>> = HashMap::new();
        let mut declared = HashSet::new();
        for s in sources {
            let mut t = Topic::new(s.name(), None);
            t.mirror_of = Some(s.clone());
            declared.insert(s.name().to_string());
            topics.insert(s.name().clone(), Arc::new(t));
        }
        Origin {
            inner: Arc::new(Inner::new(
                cfg,
                epoch,
                topics,
                Some(declared),
                Some(upstream),
                None,
            )),
        }
    }

    /// Whether this origin mirrors `topic` and holds it (its first snapshot arrived).
    pub(crate) fn holds(&self, topic: &str) -> bool {
        self.mirrored(topic)
            .is_some_and(|t| t.lock().epoch.is_some())
    }

    fn mirrored(&self, topic: &str) -> Option<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
    }

    /// `topic` is now `rows` at (epoch, version): its log starts over there, and every stream
    /// following it is caught up with Reset + snapshot (streams waiting for the topic's first
    /// snapshot are answered instead). The same position again changes nothing.
    pub(crate) fn mirror_snapshot(
        &self,
        topic: &str,
        epoch: &str,
        version: u64,
        rows: impl IntoIterator<Item = (Arc<str>, Bytes, u64)>,
    ) {
        let Some(t) = self.mirrored(topic) else {
            return;
        };
        {
            let st = t.lock();
            if st.epoch.as_deref() == Some(epoch) && st.version == version {
                return;
            }
        }
        let data: imbl::OrdMap<Arc<str>, Stored> = rows
            .into_iter()
            .map(|(k, value, version)| (k, Stored { value, version }))
            .collect();
        let mut st = t.lock();
        let was = st.epoch.replace(Arc::from(epoch));
        debug!(topic, epoch, version, was = ?was, "relay topic replaced by a snapshot");
        st.replace(&t.name, data, version);
    }

    /// One version of `topic`'s changes, after the last one: retained, and offered to every
    /// stream. A batch of another epoch or at or below the topic's version is dropped.
    pub(crate) fn mirror_batch(
        &self,
        topic: &str,
        epoch: &str,
        version: u64,
        changes: Vec<(Arc<str>, Option<Bytes>)>,
    ) {
        self.mirror_group(vec![MirroredBatch {
            topic: topic.to_string(),
            epoch: epoch.to_string(),
            version,
            changes,
        }]);
    }

    /// The batches of one upstream transaction, in the order applied: each appended to its
    /// topic's window (dropped if of another epoch than the topic holds, or not newer), and
    /// offered to each stream as one group (`TxGroup`, its `last` on the final batch that
    /// stream gets), as the origin that made them did, so that a leaf applies them in one step.
    /// One batch is not a group.
    pub(crate) fn mirror_group(&self, batches: Vec<MirroredBatch>) {
        // One lock order (by name) for every multi-topic publish, as `apply_txn`.
        let mut names: Vec<&str> = batches.iter().map(|b| b.topic.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let topics: Vec<Arc<Topic>> = names.iter().filter_map(|n| self.mirrored(n)).collect();
        let mut guards: Vec<_> = topics.iter().map(|t| t.lock()).collect();
        let mut made: Vec<(usize, Arc<super::Batch>)> = Vec::with_capacity(batches.len());
        for b in batches {
            let Some(i) = topics.iter().position(|t| *t.name == *b.topic) else {
                continue;
            };
            let st: &mut TopicState = &mut guards[i];
            if st.epoch.as_deref() != Some(b.epoch.as_str()) {
                if st.epoch.is_some() {
                    warn!(topic = %b.topic, epoch = %b.epoch, "relay got a batch of another epoch than it holds; dropped");
                }
                continue;
            }
            if b.version <= st.version {
                continue;
            }
            let (changes, bytes) = to_changes(b.changes);
            let batch = st.append(&topics[i].name, b.version, changes, bytes);
            st.version = b.version;
            st.shared_snapshot = None;
            retain(&self.inner.cfg, st);
            made.push((i, batch));
        }
        session::offer_txn(&self.inner, &topics, &mut guards, &made);
        self.inner
            .stats
            .published
            .fetch_add(made.len() as u64, Ordering::Relaxed);
    }

    /// Nothing newer than (epoch, version) upstream: the topic's position moves there (a
    /// database-fed origin's versions are commit positions, with gaps between a topic's).
    pub(crate) fn mirror_progress(&self, topic: &str, epoch: &str, version: u64) {
        let Some(t) = self.mirrored(topic) else {
            return;
        };
        let mut st = t.lock();
        if st.epoch.as_deref() == Some(epoch) && version > st.version {
            st.version = version;
            st.shared_snapshot = None;
        }
    }
}

/// One batch of an upstream transaction, as the relay's writer applied it.
pub(crate) struct MirroredBatch {
    pub topic: String,
    pub epoch: String,
    pub version: u64,
    pub changes: Vec<(Arc<str>, Option<Bytes>)>,
}

/// Applied changes as feed changes (`None` deletes the key), and their bytes for the window.
fn to_changes(changes: Vec<(Arc<str>, Option<Bytes>)>) -> (Vec<pb::Change>, usize) {
    let mut bytes = 0;
    let changes: Vec<pb::Change> = changes
        .into_iter()
        .map(|(k, v)| {
            bytes += k.len() + v.as_ref().map_or(0, |v| v.len()) + 8;
            match v {
                Some(value) => pb::Change {
                    key: k.to_string(),
                    value,
                    deleted: false,
                },
                None => pb::Change {
                    key: k.to_string(),
                    value: Bytes::new(),
                    deleted: true,
                },
            }
        })
        .collect();
    (changes, bytes)
}
