//! The Feed API served by a sidecar (`[listen] feed`): a relay. Its full topics keep their
//! upstream's epochs and versions, so a leaf can resume on any relay of the same origin, or on
//! the origin itself; its views are topics of their own, at the relay's epoch.
//!
//! The writer hands every applied step here ([`Mirror`]) on its own task, in order, and the
//! relay's topics (an [`Origin`] in relay mode) retain, encode once and fan out. Publish is
//! refused (FAILED_PRECONDITION naming the upstream). on_demand topics are not relayed: a
//! Subscribe or Fetch of one is refused with a message saying to ask the origin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::SidecarConfig;
use crate::origin::{MirroredBatch, Origin, ServeError};
use crate::store::{Event, Source};
use crate::types::Mode;
use crate::writer::Mirror;

/// A sidecar's relay: the topics it serves and how they are fed.
#[derive(Clone)]
pub struct Relay {
    origin: Origin,
    /// Served views, by name: they are mirrored from the changes of each flush.
    views: Arc<HashMap<Arc<str>, Arc<Source>>>,
    /// While the writer applies one upstream transaction (`Mirror::begin_group`): its batches
    /// and positions, published together at its end.
    group: Arc<Mutex<Option<Grouping>>>,
}

/// What one upstream transaction brought, in order.
#[derive(Default)]
struct Grouping {
    batches: Vec<MirroredBatch>,
    /// Positions (topic, epoch, version), moved after the batches: moved first, they would
    /// make the relay skip the batches at or below them.
    progress: Vec<(Arc<str>, String, u64)>,
}

impl Relay {
    /// A relay of every full topic and every full view among `sources`.
    pub(crate) fn new(
        cfg: &SidecarConfig,
        listen: std::net::SocketAddr,
        sources: &[Arc<Source>],
    ) -> Self {
        let served: Vec<Arc<Source>> = sources
            .iter()
            .filter(|s| s.mode() == Mode::Full)
            .cloned()
            .collect();
        let views = served
            .iter()
            .filter(|s| s.is_view())
            .map(|s| (s.name().clone(), s.clone()))
            .collect();
        let upstream = cfg
            .origins
            .iter()
            .map(|o| {
                format!(
                    "origin '{}' ({})",
                    o.name,
                    crate::types::redact_address(&o.address)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let upstream = if upstream.is_empty() {
            "this sidecar's views".to_string()
        } else {
            upstream
        };
        Relay {
            origin: Origin::relay(cfg.relay.origin_config(listen), upstream, &served),
            views: Arc::new(views),
            group: Arc::new(Mutex::new(None)),
        }
    }

    /// The relay's topics, as an origin: counters, versions, rows (for tests and metrics).
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Serves Feed on `listener` until `shutdown` flips to true.
    pub(crate) async fn serve(
        &self,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ServeError> {
        self.origin
            .serve(listener, async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await
    }

    fn mirror_view(&self, source: &Source, events: &[&Event]) {
        let name = source.name();
        if !self.origin.holds(name) {
            if source.is_synced() {
                // The view as it is now, this flush's changes included.
                self.origin.mirror_snapshot(
                    name,
                    self.origin.epoch(),
                    source.version(),
                    rows_of(source),
                );
            }
            return;
        }
        // One batch per view version, in order; a key changed twice in a step keeps its last value.
        let mut i = 0;
        while i < events.len() {
            let version = events[i].version;
            let mut changes: Vec<(Arc<str>, Option<Bytes>)> = Vec::new();
            let mut at: HashMap<Arc<str>, usize> = HashMap::new();
            while i < events.len() && events[i].version == version {
                let e = events[i];
                match at.get(&e.key) {
                    Some(&j) => changes[j].1 = e.value.clone(),
                    None => {
                        at.insert(e.key.clone(), changes.len());
                        changes.push((e.key.clone(), e.value.clone()));
                    }
                }
                i += 1;
            }
            self.origin
                .mirror_batch(name, self.origin.epoch(), version, changes);
        }
    }
}

/// Every row of `source`, with its version.
fn rows_of(source: &Source) -> Vec<(Arc<str>, Bytes, u64)> {
    let rows = source.keyspace();
    let mut all = Vec::with_capacity(rows.len());
    rows.for_each(|r| all.push((Arc::from(r.key), Bytes::copy_from_slice(r.value), r.version)));
    all
}

impl Relay {
    fn grouping(&self) -> std::sync::MutexGuard<'_, Option<Grouping>> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes what the open group holds, if any; the group stays open when `reopen`.
    fn publish_group(&self, reopen: bool) {
        let held = {
            let mut g = self.grouping();
            let held = g.take();
            if reopen && held.is_some() {
                *g = Some(Grouping::default());
            }
            held
        };
        if let Some(held) = held {
            self.origin.mirror_group(held.batches);
            for (topic, epoch, version) in held.progress {
                self.origin.mirror_progress(&topic, &epoch, version);
            }
        }
    }
}

impl Mirror for Relay {
    fn snapshot(&self, source: &Source, epoch: &str, version: u64) {
        if source.is_view() || source.mode() != Mode::Full {
            return;
        }
        // Not part of a transaction: what a group held so far goes out first, in order.
        self.publish_group(true);
        self.origin
            .mirror_snapshot(source.name(), epoch, version, rows_of(source));
    }

    fn batch(
        &self,
        source: &Source,
        epoch: &str,
        version: u64,
        changes: Vec<(Arc<str>, Option<Bytes>)>,
    ) {
        if let Some(g) = self.grouping().as_mut() {
            g.batches.push(MirroredBatch {
                topic: source.name().to_string(),
                epoch: epoch.to_string(),
                version,
                changes,
            });
            return;
        }
        self.origin
            .mirror_batch(source.name(), epoch, version, changes);
    }

    fn progress(&self, source: &Source, epoch: &str, version: u64) {
        if let Some(g) = self.grouping().as_mut() {
            g.progress
                .push((source.name().clone(), epoch.to_string(), version));
            return;
        }
        self.origin.mirror_progress(source.name(), epoch, version);
    }

    fn begin_group(&self) {
        *self.grouping() = Some(Grouping::default());
    }

    fn end_group(&self) {
        self.publish_group(false);
    }

    fn flushed(&self, events: &[Event]) {
        if self.views.is_empty() {
            return;
        }
        let mut per_view: HashMap<&Arc<str>, Vec<&Event>> = HashMap::new();
        for e in events {
            if self.views.contains_key(&e.source) {
                per_view.entry(&e.source).or_default().push(e);
            }
        }
        for (name, source) in self.views.iter() {
            let evs = per_view.remove(name).unwrap_or_default();
            if evs.is_empty() && self.origin.holds(name) {
                continue;
            }
            self.mirror_view(source, &evs);
        }
    }
}
