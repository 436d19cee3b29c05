//! How a database's rows enter the origin's topics: an initial copy replaces a topic's data
//! at the copy's position, and a transaction becomes one version (its commit position) of each
//! topic it touched, pushed to every stream as one group.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::super::durable::{batch_bytes, TxnPart};
use super::super::{retain, session, Batch, Origin, StoreError, Stored, Topic, FEED_OVERHEAD};
use crate::pb::feed::v1 as pb;

impl Origin {
    /// Replaces the data of each table's topic with its rows, all at `version` (the copy's
    /// position), served under `epoch` from now on. The durable copy takes them in one commit.
    /// Each retained window is emptied (nothing before `version` can be resumed from), and
    /// every stream subscribed to a topic is caught up with Reset + snapshot.
    pub(crate) fn replace_topics(
        &self,
        tables: Vec<(String, Vec<(String, Bytes)>)>,
        version: u64,
        epoch: &str,
    ) -> Result<(), StoreError> {
        if self.inner.store.is_some() {
            let parts: Vec<(&str, &[(String, Bytes)])> = tables
                .iter()
                .map(|(t, rows)| (t.as_str(), rows.as_slice()))
                .collect();
            match self.inner.store_guard().as_ref() {
                Some(store) => store.replace_topics(&parts, version, version, epoch)?,
                None => return Err(StoreError::Closed),
            }
        }
        let epoch: Arc<str> = Arc::from(epoch);
        for (topic, rows) in tables {
            let Ok(t) = self.topic(&topic, false) else {
                continue;
            };
            let data: imbl::OrdMap<Arc<str>, Stored> = rows
                .into_iter()
                .map(|(k, value)| (Arc::from(k.as_str()), Stored { value, version }))
                .collect();
            let mut st = t.lock();
            st.epoch = Some(epoch.clone());
            st.replace(&t.name, data, version);
        }
        Ok(())
    }

    /// Until a first copy is loaded, the tables' topics have nothing to serve: a stream that
    /// subscribes waits (as at a relay not synced yet, told how far the copy is) instead of
    /// syncing to empty topics and reporting ready.
    pub(crate) fn await_first_copy(&self, tables: &[String]) {
        for name in tables {
            if let Ok(t) = self.topic(name, true) {
                t.lock().epoch = None;
            }
        }
    }

    /// The current value of `key` in `topic`.
    pub(crate) fn value(&self, topic: &str, key: &str) -> Option<Bytes> {
        let t = self.topic(topic, false).ok()?;
        let st = t.lock();
        st.data.get(key).map(|s| s.value.clone())
    }

    /// Every key of `topic`.
    pub(crate) fn keys(&self, topic: &str) -> Vec<String> {
        let Ok(t) = self.topic(topic, false) else {
            return Vec::new();
        };
        let data = t.lock().data.clone();
        data.keys().map(|k| k.to_string()).collect()
    }

    /// Applies one transaction: for each `(topic, changes)`, one version `version` of that
    /// topic. Topics already at or past `version` are left alone (the transaction was applied
    /// before a reconnect). Changes that would not fit one feed message (`max_message_bytes`)
    /// are split into several batches at the versions just below `version` (`version - k + 1
    /// ..= version`: past the topic's previous version, since the transaction's own WAL lies
    /// between them, and the same on every origin with the same limit). When that makes more
    /// than one batch, each stream gets them one after the other marked as one group, the last
    /// one it gets flagged `last`, so that a sidecar applies them in one step. Returns the
    /// number of batches made.
    pub(crate) fn apply_txn(
        &self,
        version: u64,
        parts: Vec<(String, Vec<pb::Change>)>,
    ) -> Result<usize, StoreError> {
        let mut parts: Vec<(Arc<Topic>, Vec<pb::Change>)> = parts
            .into_iter()
            .filter(|(_, c)| !c.is_empty())
            .filter_map(|(name, c)| self.topic(&name, false).ok().map(|t| (t, c)))
            .collect();
        // One lock order (by name) for every multi-topic apply.
        parts.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let (topics, changes): (Vec<Arc<Topic>>, Vec<Vec<pb::Change>>) = parts.into_iter().unzip();
        let mut guards: Vec<_> = topics.iter().map(|t| t.lock()).collect();
        // Per topic, the batches (version, changes) this transaction makes.
        let mut planned: Vec<Vec<(u64, Vec<pb::Change>)>> = Vec::with_capacity(topics.len());
        for ((t, changes), st) in topics.iter().zip(changes).zip(guards.iter()) {
            if version <= st.version {
                planned.push(Vec::new());
                continue;
            }
            let mut chunks = self.split(&t.name, changes);
            if chunks.len() as u64 > version - st.version {
                // Not enough versions between the previous one and this: one oversized batch.
                chunks = vec![chunks.into_iter().flatten().collect()];
            }
            let first = version + 1 - chunks.len() as u64;
            planned.push(
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(j, c)| (first + j as u64, c))
                    .collect(),
            );
        }
        let made: usize = planned.iter().map(Vec::len).sum();
        if made == 0 {
            return Ok(0);
        }
        // On disk first (with a data directory): the slot is told only what is there.
        if self.inner.store.is_some() {
            let parts: Vec<TxnPart<'_>> = topics
                .iter()
                .zip(&planned)
                .zip(guards.iter())
                .filter(|((_, p), _)| !p.is_empty())
                .map(|((t, p), st)| {
                    // The batch at the floor stays on disk (or the copy's empty one): reloaded,
                    // the log then starts where streams can resume from.
                    let keep_from = st.floor;
                    (
                        &*t.name,
                        p.iter().map(|(v, c)| (*v, c.as_slice())).collect(),
                        keep_from,
                    )
                })
                .collect();
            match self.inner.store_guard().as_ref() {
                Some(store) => store.write_txn(&parts, version)?,
                None => return Err(StoreError::Closed),
            }
        }
        // In topic order, each topic's batches in version order: (topic index, batch).
        let mut batches: Vec<(usize, Arc<Batch>)> = Vec::with_capacity(made);
        for (i, ((p, st), t)) in planned
            .into_iter()
            .zip(guards.iter_mut())
            .zip(&topics)
            .enumerate()
        {
            if p.is_empty() {
                continue;
            }
            for (v, chunk) in p {
                let bytes = batch_bytes(&chunk);
                batches.push((i, st.append(&t.name, v, chunk, bytes)));
            }
            st.version = version;
            retain(&self.inner.cfg, st);
        }
        session::offer_txn(&self.inner, &topics, &mut guards, &batches);
        self.inner
            .stats
            .published
            .fetch_add(made as u64, Ordering::Relaxed);
        Ok(made)
    }

    /// `changes` cut into runs that each fit one feed message of this origin.
    fn split(&self, topic: &str, changes: Vec<pb::Change>) -> Vec<Vec<pb::Change>> {
        use prost::encoding::message;
        let limit = self.inner.cfg.max_message_bytes.as_usize();
        // A topic's epoch may be the origin's plus a lost slot's suffix (see `postgres::epoch_after_lost_slot`).
        let epoch = self.inner.epoch.len() + super::EPOCH_SUFFIX_MAX;
        let room = limit.saturating_sub(FEED_OVERHEAD + topic.len() + epoch);
        let mut out: Vec<Vec<pb::Change>> = vec![Vec::new()];
        let mut size = 0;
        for c in changes {
            let len = message::encoded_len(5, &c);
            if size + len > room && !out.last().is_some_and(Vec::is_empty) {
                out.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(run) = out.last_mut() {
                run.push(c);
            }
        }
        out
    }
}
