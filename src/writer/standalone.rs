//! Views over in-memory topics, maintained by the sidecar's own writer code but without feeds,
//! listeners or a runtime: for tests, benchmarks, and programs that want the engine alone.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{BatchChange, SnapEntry, Step, Writer, WriterStats};
use crate::hub::Hub;
use crate::store::{Clock, Event, Source, SourceKind, Store};
use crate::types::Mode;
use crate::views::{build, View, ViewError, ViewSet, ViewSpec, ViewStats};

const EPOCH: &str = "standalone";

/// Changes of one batch: key and new value, `None` = delete.
pub type Changes = Vec<(String, Option<Bytes>)>;

/// Topics you write to directly and the views over them.
///
/// Every [`Standalone::apply`] is one writer step: the topic batch is applied by the writer's
/// code, then the engine updates the views, exactly as in a running sidecar.
///
/// ```
/// use bytes::Bytes;
/// use viewcar::views::ViewSpec;
/// use viewcar::Standalone;
///
/// let spec = ViewSpec::new("priced", "products").include("price", "prices", "id");
/// let mut s = Standalone::new(&["products", "prices"], &[spec], Vec::new()).unwrap();
/// s.apply("products", vec![("p1".into(), Some(Bytes::from(r#"{"id":"p1"}"#)))]).unwrap();
/// s.apply("prices", vec![("p1".into(), Some(Bytes::from(r#"{"amount":5}"#)))]).unwrap();
/// let row = s.store().source("priced").unwrap().get("p1").unwrap();
/// assert_eq!(row.value, Bytes::from(r#"{"id":"p1","price":{"amount":5}}"#));
/// ```
pub struct Standalone {
    store: Arc<Store>,
    writer: Writer,
    stats: HashMap<String, Arc<ViewStats>>,
}

impl Standalone {
    /// Empty, synced `topics` and the views of `specs` and `views` over them.
    pub fn new(topics: &[&str], specs: &[ViewSpec], views: Vec<View>) -> Result<Self, ViewError> {
        let clock = Clock::new();
        let mut store = Store::new();
        let origin: Arc<str> = Arc::from("local");
        for t in topics {
            store.add(Source::new(
                t,
                SourceKind::Topic {
                    origin: origin.clone(),
                },
                Mode::Full,
                clock,
                std::time::Duration::from_secs(3600),
            ));
        }
        let set: Option<ViewSet> = build(specs, views, &mut store, clock)?;
        // Rows of an on_demand view are computed by reads through a running sidecar's writer.
        if let Some(v) = store.sources().iter().find(|s| s.view_cache().is_some()) {
            return Err(ViewError::Invalid {
                index: None,
                view: v.name().to_string(),
                field: "mode".into(),
                message: "on_demand views are computed on read by a sidecar; Standalone \
                          maintains full views only"
                    .into(),
            });
        }
        let stats = set.as_ref().map(|s| s.stats()).unwrap_or_default();
        let store = Arc::new(store);
        let engine = set.map(ViewSet::into_engine);
        let writer = Writer::new(
            Arc::new(Hub::new()),
            engine,
            Arc::new(WriterStats::default()),
        );
        let mut s = Standalone {
            store,
            writer,
            stats,
        };
        for t in topics {
            let source = s.topic(t)?;
            source.set_connected(true);
            s.step(vec![Step::SnapshotChunk {
                in_flight: None,
                source,
                epoch: EPOCH.into(),
                version: 0,
                entries: Vec::new().into(),
                last: true,
                total: 0,
            }]);
        }
        s.derive(Vec::new());
        Ok(s)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Counters of the named view.
    pub fn view_stats(&self, view: &str) -> Option<&Arc<ViewStats>> {
        self.stats.get(view)
    }

    fn topic(&self, name: &str) -> Result<Arc<Source>, ViewError> {
        self.store
            .source(name)
            .filter(|s| !s.is_view())
            .cloned()
            .ok_or_else(|| ViewError::UnknownTopic(name.to_string()))
    }

    /// Applies one batch of changes (`None` = delete) to `topic` as its next version, then
    /// updates the views. Returns every change: the topic's, then the views'.
    pub fn apply(&mut self, topic: &str, changes: Changes) -> Result<Vec<Event>, ViewError> {
        self.apply_many(vec![(topic, changes)])
    }

    /// Several batches applied in one writer step (as when the writer drains a burst), so the
    /// views are updated once, after all of them.
    pub fn apply_many(&mut self, batches: Vec<(&str, Changes)>) -> Result<Vec<Event>, ViewError> {
        let mut next: HashMap<&str, u64> = HashMap::new();
        let mut events = Vec::new();
        for (topic, changes) in batches {
            let source = self.topic(topic)?;
            let version = next.entry(topic).or_insert_with(|| source.version());
            *version += 1;
            let op = Step::Batch {
                source,
                epoch: EPOCH.into(),
                version: *version,
                changes: changes
                    .into_iter()
                    .map(|(key, value)| BatchChange { key, value })
                    .collect(),
            };
            self.writer.apply(op, &mut events);
        }
        Ok(self.derive(events))
    }

    /// Replaces the whole content of `topic` (a snapshot), then updates the views.
    pub fn load(
        &mut self,
        topic: &str,
        entries: Vec<(String, Bytes)>,
    ) -> Result<Vec<Event>, ViewError> {
        let source = self.topic(topic)?;
        let version = source.version() + 1;
        let total = entries.len() as u64;
        let events = self.step(vec![Step::SnapshotChunk {
            in_flight: None,
            total,
            source,
            epoch: EPOCH.into(),
            version,
            entries: entries
                .into_iter()
                .map(|(key, value)| SnapEntry {
                    key,
                    value,
                    version,
                })
                .collect(),
            last: true,
        }]);
        Ok(self.derive(events))
    }

    /// Runs the engine over the changes of a step, as the writer's flush does.
    fn derive(&mut self, mut events: Vec<Event>) -> Vec<Event> {
        self.writer.derive(&mut events);
        events
    }

    fn step(&mut self, ops: Vec<Step>) -> Vec<Event> {
        let mut events = Vec::new();
        for op in ops {
            self.writer.apply(op, &mut events);
        }
        events
    }
}
