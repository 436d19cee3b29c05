//! How a database's rows enter the origin's topics: an initial copy replaces a topic's data
//! at the copy's position, and a transaction becomes one version (its commit position) of each
//! topic it touched, pushed to every stream as one group.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::super::{retain, session, Batch, Origin, SessionId, Stored, Topic};
use crate::pb::feed::v1 as pb;

impl Origin {
    /// Replaces the data of `topic` with `rows`, all at `version` (the copy's position). The
    /// retained window is emptied (nothing before `version` can be resumed from), and every
    /// stream subscribed to the topic is caught up with Reset + snapshot.
    pub(crate) fn replace_topic(&self, topic: &str, rows: Vec<(String, Bytes)>, version: u64) {
        let Ok(t) = self.topic(topic, false) else {
            return;
        };
        let data: imbl::OrdMap<Arc<str>, Stored> = rows
            .into_iter()
            .map(|(k, value)| (Arc::from(k.as_str()), Stored { value, version }))
            .collect();
        let mut st = t.lock();
        st.data = data;
        st.version = version;
        st.log.clear();
        st.log_bytes = 0;
        st.floor = version;
        for interest in st.interests.values_mut() {
            session::resnapshot(&t.name, interest);
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
    /// before a reconnect). When it touches several topics, each stream gets its batches one
    /// after the other marked as one group, the last one it gets flagged `last`, so that a
    /// sidecar applies them in one step. Returns the number of topics changed.
    pub(crate) fn apply_txn(&self, version: u64, parts: Vec<(String, Vec<pb::Change>)>) -> usize {
        let mut parts: Vec<(Arc<Topic>, Vec<pb::Change>)> = parts
            .into_iter()
            .filter(|(_, c)| !c.is_empty())
            .filter_map(|(name, c)| self.topic(&name, false).ok().map(|t| (t, c)))
            .collect();
        // One lock order (by name) for every multi-topic apply.
        parts.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let (topics, mut changes): (Vec<Arc<Topic>>, Vec<Vec<pb::Change>>) =
            parts.into_iter().unzip();
        let mut guards: Vec<_> = topics.iter().map(|t| t.lock()).collect();
        let mut batches: Vec<Option<Arc<Batch>>> = Vec::with_capacity(topics.len());
        for (changes, st) in changes.iter_mut().zip(guards.iter_mut()) {
            if version <= st.version {
                batches.push(None);
                continue;
            }
            let mut bytes = 0;
            for c in changes.iter() {
                bytes += c.key.len() + c.value.len() + 8;
                if c.deleted {
                    st.data.remove(c.key.as_str());
                } else {
                    st.data.insert(
                        Arc::from(c.key.as_str()),
                        Stored {
                            value: c.value.clone(),
                            version,
                        },
                    );
                }
            }
            st.version = version;
            let batch = Arc::new(Batch {
                version,
                changes: std::mem::take(changes),
                bytes,
            });
            st.log_bytes += batch.bytes;
            st.log.push_back(batch.clone());
            retain(&self.inner.cfg, st);
            batches.push(Some(batch));
        }
        let applied = batches.iter().filter(|b| b.is_some()).count();
        if applied == 0 {
            return 0;
        }
        // The last batch of the group that each stream will get.
        let mut last: HashMap<SessionId, usize> = HashMap::new();
        if applied > 1 {
            for (i, (st, b)) in guards.iter().zip(&batches).enumerate() {
                let Some(b) = b else { continue };
                for (sid, interest) in &st.interests {
                    if session::wants(interest, b) {
                        last.insert(*sid, i);
                    }
                }
            }
        }
        for (i, (t, st)) in topics.iter().zip(guards.iter_mut()).enumerate() {
            let Some(b) = &batches[i] else { continue };
            let st = &mut **st;
            for (sid, interest) in st.interests.iter_mut() {
                let group = (applied > 1).then(|| pb::TxGroup {
                    id: version,
                    last: last.get(sid) == Some(&i),
                });
                session::offer(&self.inner, &t.name, interest, b, group);
            }
        }
        self.inner
            .stats
            .published
            .fetch_add(applied as u64, Ordering::Relaxed);
        applied
    }
}
