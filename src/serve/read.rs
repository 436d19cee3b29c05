//! The one read path of every reader protocol (gRPC `Get`/`BatchGet`, the WebSocket `get`, the
//! Redis protocol's `GET`/`MGET`): source lookup, the wait for a source that has not synced or
//! not reached `min_version` (`wait`, capped by `limits.max_wait`), the `max_staleness_ms`
//! refusal, on_demand read-through, and the errors, as one [`ReadError`] that each protocol
//! maps to its own codes.
//!
//! The path is synchronous when the source is synced and fresh enough: no `.await` that can
//! pend, no lock held across one. Waiting happens only when the caller asked for a version or
//! a sync the source has not reached yet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Limits;
use crate::store::on_demand::{OnDemandError, Slot};
use crate::store::{Keyspace, Row, Source, Store};

/// Longest wait for a batch in flight to land before reading again.
const BATCH_LAND_WAIT: Duration = Duration::from_millis(20);

/// How fresh a read must be. The default reads whatever is there, without waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// Wait (up to `wait`) until the source has applied at least this version.
    pub min_version: u64,
    /// How long to wait for the source to sync or reach `min_version`; capped by
    /// `limits.max_wait`.
    pub wait: Duration,
    /// Refuse data older than this many ms; 0 = any age.
    pub max_staleness_ms: u64,
    /// Wait (within `wait`) until each named source has made at least this version visible,
    /// views derived from it included (`ReadOptions.after`).
    pub after: Vec<(String, u64)>,
}

/// Why a read was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("source is empty")]
    EmptySource,
    #[error("key is empty")]
    EmptyKey,
    #[error("a key of source '{0}' is empty")]
    EmptyKeyOf(String),
    #[error("no source named '{0}'")]
    UnknownSource(String),
    #[error("source '{name}' has not synced yet (waited {waited_ms} ms)")]
    NotSynced { name: Arc<str>, waited_ms: u128 },
    #[error(
        "source '{name}' is at version {version}, below min_version {min_version} (waited {waited_ms} ms)"
    )]
    BelowVersion {
        name: Arc<str>,
        version: u64,
        min_version: u64,
        waited_ms: u128,
    },
    #[error(
        "source '{name}' has made version {visible} visible, below the version {after} named in after (waited {waited_ms} ms)"
    )]
    BeforeAfter {
        name: Arc<str>,
        visible: u64,
        after: u64,
        waited_ms: u128,
    },
    #[error("after names {count} sources; the limit is {limit} (limits.max_batch_keys)")]
    TooManyAfter { count: usize, limit: usize },
    #[error(
        "source '{name}' is {staleness_ms} ms stale, above max_staleness_ms {max_staleness_ms}"
    )]
    TooStale {
        name: Arc<str>,
        staleness_ms: u64,
        max_staleness_ms: u64,
    },
    /// An on_demand read-through could not reach the origin.
    #[error(transparent)]
    Fetch(#[from] OnDemandError),
}

impl ReadError {
    /// The request itself is wrong (as opposed to the data not being there yet).
    pub(crate) fn is_bad_request(&self) -> bool {
        matches!(
            self,
            ReadError::EmptySource
                | ReadError::EmptyKey
                | ReadError::EmptyKeyOf(_)
                | ReadError::TooManyAfter { .. }
        )
    }
}

/// The value of one key as read: `value: None` = absent. `version` is the version that last
/// wrote the key; for an absent key of an on_demand source the version it is absent at, and 0
/// for an absent key of a full source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub value: Option<Bytes>,
    pub version: u64,
}

impl From<Slot> for Answer {
    fn from(slot: Slot) -> Self {
        Answer {
            value: slot.value,
            version: slot.version,
        }
    }
}

/// A point read with what the source was at when it was made.
#[derive(Debug, Clone)]
pub(crate) struct Got<'a> {
    pub source: &'a Arc<Source>,
    pub answer: Answer,
    /// A lower bound of the version the answer reflects (read before the value).
    pub source_version: u64,
}

/// The reader side of the store, shared by every protocol.
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    store: Arc<Store>,
    max_wait: Duration,
    batch_read_attempts: usize,
    /// Most entries of `after` in one request (`limits.max_batch_keys`).
    max_after: usize,
}

impl Reader {
    pub(crate) fn new(store: Arc<Store>, limits: &Limits) -> Self {
        Reader {
            store,
            max_wait: limits.max_wait.0,
            batch_read_attempts: limits.batch_read_attempts.max(1),
            max_after: limits.max_batch_keys.max(1),
        }
    }

    /// The source named `name`.
    pub(crate) fn source(&self, name: &str) -> Result<&Arc<Source>, ReadError> {
        if name.is_empty() {
            return Err(ReadError::EmptySource);
        }
        self.store
            .source(name)
            .ok_or_else(|| ReadError::UnknownSource(name.to_string()))
    }

    /// True if `wait_after` would not wait: every source `f.after` names has made its version
    /// visible (or is refused at once: unknown, or too many named).
    pub(crate) fn after_now(&self, f: &Freshness) -> bool {
        f.after.len() > self.max_after
            || f.after.iter().all(|(name, v)| {
                self.store
                    .source(name)
                    .is_none_or(|s| s.visible_version() >= *v)
            })
    }

    /// How long a read at `f` may wait in all: `f.wait`, capped by `limits.max_wait`.
    fn budget(&self, f: &Freshness) -> Duration {
        f.wait.min(self.max_wait)
    }

    /// Everything a read at `f` waits for, within one budget for the whole read however many
    /// sources it waits for: the sources `f.after` names (see `wait_after`), then each of
    /// `sources` being ready (see `ready`).
    pub(crate) async fn settle(&self, sources: &[&Source], f: &Freshness) -> Result<(), ReadError> {
        let deadline = tokio::time::Instant::now() + self.budget(f);
        self.wait_after(f, deadline).await?;
        for source in sources {
            self.ready(source, f, deadline).await?;
        }
        Ok(())
    }

    /// Checks every source `f.after` names (before any wait: an unknown one fails at once),
    /// then waits until `deadline` for each to make its version visible, views derived from it
    /// included.
    async fn wait_after(
        &self,
        f: &Freshness,
        deadline: tokio::time::Instant,
    ) -> Result<(), ReadError> {
        if f.after.is_empty() {
            return Ok(());
        }
        if f.after.len() > self.max_after {
            return Err(ReadError::TooManyAfter {
                count: f.after.len(),
                limit: self.max_after,
            });
        }
        let named: Vec<(&Arc<Source>, u64)> = f
            .after
            .iter()
            .map(|(name, v)| self.source(name).map(|s| (s, *v)))
            .collect::<Result<_, _>>()?;
        let wait = self.budget(f);
        for (source, version) in named {
            if source.visible_version() >= version {
                continue;
            }
            let mut changes = source.subscribe_changes();
            let reached = tokio::time::timeout_at(deadline, async {
                while source.visible_version() < version {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if reached.is_err() || source.visible_version() < version {
                return Err(ReadError::BeforeAfter {
                    name: source.name().clone(),
                    visible: source.visible_version(),
                    after: version,
                    waited_ms: wait.as_millis(),
                });
            }
        }
        Ok(())
    }

    /// True if `source` can be read at `f` without waiting (staleness aside).
    pub(crate) fn ready_now(source: &Source, f: &Freshness) -> bool {
        source.is_synced() && source.version() >= f.min_version
    }

    /// Waits until `deadline` for the source to be synced and at `f.min_version`, then checks
    /// `f.max_staleness_ms`.
    async fn ready(
        &self,
        source: &Source,
        f: &Freshness,
        deadline: tokio::time::Instant,
    ) -> Result<(), ReadError> {
        if !Self::ready_now(source, f) {
            let wait = self.budget(f);
            let mut changes = source.subscribe_changes();
            let waited = tokio::time::timeout_at(deadline, async {
                while !Self::ready_now(source, f) {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if waited.is_err() || !Self::ready_now(source, f) {
                let name = source.name().clone();
                let waited_ms = wait.as_millis();
                return Err(if !source.is_synced() {
                    ReadError::NotSynced { name, waited_ms }
                } else {
                    ReadError::BelowVersion {
                        name,
                        version: source.version(),
                        min_version: f.min_version,
                        waited_ms,
                    }
                });
            }
        }
        check_staleness(source, f)
    }

    /// Reads `key` of `source` as it is now (no readiness check): an on_demand source through
    /// its cache (a miss fetches once however many readers wait), any other from its keyspace.
    pub(crate) async fn point(&self, source: &Source, key: &str) -> Result<Answer, ReadError> {
        match source.read_through(key).await {
            Some(got) => Ok(got?.into()),
            // `get`, not `keyspace()`: a point read borrows the keyspace without touching its
            // reference count, which every reading thread would otherwise write to.
            None => Ok(answer_of(source.get(key))),
        }
    }

    /// One key of one source, after the source is ready at `f`.
    pub(crate) async fn get(
        &self,
        name: &str,
        key: &str,
        f: &Freshness,
    ) -> Result<Got<'_>, ReadError> {
        let source = self.source(name)?;
        if key.is_empty() {
            return Err(ReadError::EmptyKey);
        }
        self.settle(&[source], f).await?;
        // The writer publishes a version after applying it, so reading the version first makes
        // it a lower bound: the answer is at least as new as `source_version`.
        let source_version = source.version();
        let answer = self.point(source, key).await?;
        Ok(Got {
            source,
            answer,
            source_version,
        })
    }

    /// Many keys of (possibly) many sources, as `(source, key)` pairs, answered in order. Every
    /// name is checked before any wait (an unknown source fails at once, not after another
    /// source's wait), then every source is made ready at `f`. The answer holds whole versions
    /// of each full source: never half of one batch of changes.
    pub(crate) async fn batch(
        &self,
        keys: &[(&str, &str)],
        f: &Freshness,
    ) -> Result<Vec<Answer>, ReadError> {
        let mut sources: Vec<&Arc<Source>> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for (source, key) in keys {
            if seen.insert(source) {
                sources.push(self.source(source)?);
            }
            if key.is_empty() {
                return Err(ReadError::EmptyKeyOf(source.to_string()));
            }
        }
        let ready: Vec<&Source> = sources.iter().map(|s| &***s).collect();
        self.settle(&ready, f).await?;
        // on_demand keys are read through first, concurrently: each miss is one Fetch. They are
        // not part of the batch sequence below (their values carry their own versions).
        let mut through: Vec<Option<Answer>> = vec![None; keys.len()];
        {
            let reads = keys.iter().enumerate().filter_map(|(i, (name, key))| {
                let source = self.store.source(name)?;
                if !source.is_on_demand() {
                    return None;
                }
                Some(async move { (i, source.read_through(key).await) })
            });
            for (i, got) in futures_util::future::join_all(reads).await {
                through[i] = got.transpose()?.map(Answer::from);
            }
        }
        // Each source's keyspace is loaded once for the whole request, after every wait: a
        // resnapshot swapping in meanwhile cannot make one answer mix two snapshots.
        let rows: HashMap<&str, Arc<Keyspace>> = sources
            .iter()
            .map(|s| (&**s.name(), s.keyspace()))
            .collect();
        // Read under each source's batch sequence and read again if a batch landed meanwhile,
        // so the answer holds whole versions. While a batch is being applied, wait for it to
        // land (the writer publishes the version right after) instead of spinning. Only a
        // writer that never pauses exhausts the bound (`limits.batch_read_attempts`); then the
        // last read is answered.
        let mut answers = Vec::with_capacity(keys.len());
        let attempts = self.batch_read_attempts;
        for attempt in 1..=attempts {
            let seqs: Option<Vec<u64>> = sources.iter().map(|s| s.read_begin()).collect();
            answers.clear();
            for ((name, key), through) in keys.iter().zip(&through) {
                if let Some(a) = through {
                    answers.push(a.clone());
                    continue;
                }
                answers.push(answer_in(&rows[name], key));
            }
            let settled = seqs.is_some_and(|seqs| {
                sources
                    .iter()
                    .zip(&seqs)
                    .all(|(s, seq)| s.read_settled(*seq))
            });
            if settled || attempt == attempts {
                break;
            }
            for s in &sources {
                if s.read_begin().is_none() {
                    let mut landed = s.subscribe_changes();
                    if s.read_begin().is_none() {
                        let _ = tokio::time::timeout(BATCH_LAND_WAIT, landed.changed()).await;
                    }
                }
            }
        }
        Ok(answers)
    }
}

/// Refuses a source staler than `f.max_staleness_ms` (0 = any age).
pub(crate) fn check_staleness(source: &Source, f: &Freshness) -> Result<(), ReadError> {
    if f.max_staleness_ms > 0 {
        let staleness_ms = source.staleness_ms();
        if staleness_ms > f.max_staleness_ms {
            return Err(ReadError::TooStale {
                name: source.name().clone(),
                staleness_ms,
                max_staleness_ms: f.max_staleness_ms,
            });
        }
    }
    Ok(())
}

/// Reads `key` from `rows`, a keyspace loaded once for the whole request.
fn answer_in(rows: &Keyspace, key: &str) -> Answer {
    answer_of(rows.get(key))
}

fn answer_of(row: Option<Row>) -> Answer {
    match row {
        Some(row) => Answer {
            value: Some(row.value),
            version: row.version,
        },
        None => Answer {
            value: None,
            version: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::store::{Clock, SourceKind};

    fn store_with(name: &str) -> (Arc<Store>, Arc<Source>) {
        let mut store = Store::new();
        let source = store.add(source_of(name));
        (Arc::new(store), source)
    }

    fn reader(store: Arc<Store>) -> Reader {
        Reader::new(store, &Limits::default())
    }

    #[tokio::test]
    async fn unknown_and_empty_names_are_refused_before_any_wait() {
        let (store, _) = store_with("products");
        let r = reader(store);
        let f = Freshness {
            wait: Duration::from_secs(3600),
            ..Freshness::default()
        };
        assert!(matches!(
            r.get("nope", "k", &f).await,
            Err(ReadError::UnknownSource(n)) if n == "nope"
        ));
        assert!(matches!(
            r.get("", "k", &f).await,
            Err(ReadError::EmptySource)
        ));
        assert!(r.get("", "k", &f).await.unwrap_err().is_bad_request());
        assert!(matches!(
            r.batch(&[("products", "k"), ("nope", "k")], &f).await,
            Err(ReadError::UnknownSource(_))
        ));
        assert!(matches!(
            r.batch(&[("products", "")], &f).await,
            Err(ReadError::EmptyKeyOf(s)) if s == "products"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waits_for_the_sync_and_the_version_it_asked_for() {
        let (store, source) = store_with("products");
        let r = reader(store);
        let now = Freshness::default();
        assert!(matches!(
            r.get("products", "k", &now).await,
            Err(ReadError::NotSynced { .. })
        ));
        let f = Freshness {
            min_version: 2,
            wait: Duration::from_secs(5),
            ..Freshness::default()
        };
        let writer = source.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            writer.put("k", 2, &Bytes::from_static(b"v"));
            writer.set_position("e", 2);
            writer.mark_synced();
        });
        let got = r.get("products", "k", &f).await.expect("ready within wait");
        assert_eq!(got.answer.value.as_deref(), Some(&b"v"[..]));
        assert_eq!((got.answer.version, got.source_version), (2, 2));
        let later = Freshness {
            min_version: 3,
            wait: Duration::from_millis(100),
            ..f
        };
        assert!(matches!(
            r.get("products", "k", &later).await,
            Err(ReadError::BelowVersion {
                version: 2,
                min_version: 3,
                ..
            })
        ));
        let absent = r.get("products", "x", &now).await.expect("synced");
        assert_eq!(
            absent.answer,
            Answer {
                value: None,
                version: 0
            }
        );
    }

    #[tokio::test]
    async fn a_stale_source_is_refused_only_when_asked() {
        let (store, source) = store_with("products");
        source.mark_synced();
        let r = reader(store);
        // Never connected: staleness counts since start, so any bound below it refuses.
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.get("products", "k", &Freshness::default()).await.is_ok());
        let strict = Freshness {
            max_staleness_ms: 1,
            ..Freshness::default()
        };
        assert!(matches!(
            r.get("products", "k", &strict).await,
            Err(ReadError::TooStale { .. })
        ));
    }

    fn source_of(name: &str) -> Source {
        Source::new(
            name,
            SourceKind::Topic {
                origin: Arc::from("o"),
            },
            Mode::Full,
            Clock::new(),
            Duration::from_secs(10),
        )
    }

    /// One read has one wait budget: however many sources it waits for, it gives up `wait`
    /// after it started (here a source ready at 3 s and another at 6 s, with 5 s to wait: each
    /// wait with a budget of its own would have answered at 6 s).
    #[tokio::test(start_paused = true)]
    async fn the_waits_of_one_read_share_one_budget() {
        let mut store = Store::new();
        let a = store.add(source_of("a"));
        let b = store.add(source_of("b"));
        let r = reader(Arc::new(store));
        let at = |s: &Arc<Source>, secs: u64| {
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                s.set_position("e", 1);
                s.mark_synced();
                s.make_visible();
            })
        };
        let f = Freshness {
            wait: Duration::from_secs(5),
            ..Freshness::default()
        };
        let (ta, tb) = (at(&a, 3), at(&b, 6));
        let started = tokio::time::Instant::now();
        let got = r.batch(&[("a", "k"), ("b", "k")], &f).await;
        assert!(
            matches!(&got, Err(ReadError::NotSynced { name, .. }) if name.as_ref() == "b"),
            "{got:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let _ = (ta.await, tb.await);

        // `after` and the source read: the same single budget.
        let mut store = Store::new();
        let a = store.add(source_of("a"));
        let b = store.add(source_of("b"));
        let r = reader(Arc::new(store));
        let f = Freshness {
            wait: Duration::from_secs(5),
            after: vec![("b".into(), 1)],
            ..Freshness::default()
        };
        let (ta, tb) = (at(&b, 3), at(&a, 6));
        let started = tokio::time::Instant::now();
        let got = r.get("a", "k", &f).await;
        assert!(
            matches!(&got, Err(ReadError::NotSynced { name, .. }) if name.as_ref() == "a"),
            "{got:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let _ = (ta.await, tb.await);
    }
}
