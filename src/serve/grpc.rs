//! The Cache gRPC API: Get, BatchGet, Scan, Watch and ListSources over the store.
//!
//! The read path is synchronous when the source is synced and fresh enough: no `.await`, no
//! lock held across one. Waiting (`wait_ms`) happens only when the caller asked for a version or
//! a sync the source has not reached yet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::hub::{Hub, Selection, Update, Watcher};
use crate::pb::cache::v1 as pb;
use crate::store::on_demand::Slot;
use crate::store::{Keyspace, Source, Store};

/// Longest wait for a batch in flight to land before reading again.
const BATCH_LAND_WAIT: Duration = Duration::from_millis(20);

/// The `Cache` service of a sidecar.
pub struct CacheService {
    store: Arc<Store>,
    hub: Arc<Hub>,
    limits: Limits,
    watches: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

impl CacheService {
    pub(crate) fn new(
        store: Arc<Store>,
        hub: Arc<Hub>,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let watches = Arc::new(Semaphore::new(limits.max_watches));
        CacheService {
            store,
            hub,
            limits,
            watches,
            shutdown,
        }
    }

    fn source(&self, name: &str) -> Result<&Arc<Source>, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("source is empty"));
        }
        self.store
            .source(name)
            .ok_or_else(|| Status::not_found(format!("no source named '{name}'")))
    }

    /// Waits (within `wait_ms`) until the source is synced and at `min_version`, then checks
    /// `max_staleness_ms`.
    async fn ready(&self, source: &Source, opts: &pb::ReadOptions) -> Result<(), Status> {
        let ok = |s: &Source| s.is_synced() && s.version() >= opts.min_version;
        if !ok(source) {
            let wait = Duration::from_millis(u64::from(opts.wait_ms)).min(self.limits.max_wait.0);
            let mut changes = source.subscribe_changes();
            let waited = tokio::time::timeout(wait, async {
                while !ok(source) {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if waited.is_err() || !ok(source) {
                let name = source.name();
                let ms = wait.as_millis();
                return Err(if !source.is_synced() {
                    Status::unavailable(format!(
                        "source '{name}' has not synced yet (waited {ms} ms)"
                    ))
                } else {
                    Status::unavailable(format!(
                        "source '{name}' is at version {}, below min_version {} (waited {ms} ms)",
                        source.version(),
                        opts.min_version
                    ))
                });
            }
        }
        if opts.max_staleness_ms > 0 {
            let stale = source.staleness_ms();
            if stale > u64::from(opts.max_staleness_ms) {
                return Err(Status::unavailable(format!(
                    "source '{}' is {stale} ms stale, above max_staleness_ms {}",
                    source.name(),
                    opts.max_staleness_ms
                )));
            }
        }
        Ok(())
    }
}

fn item(source: &Source, key: String) -> pb::Item {
    item_in(source, &source.keyspace(), key)
}

/// Reads `key` from `rows`, a keyspace of `source` loaded once for the whole request: a
/// resnapshot swapping in meanwhile cannot make one answer mix two snapshots.
fn item_in(source: &Source, rows: &Keyspace, key: String) -> pb::Item {
    match rows.get(&key) {
        Some(row) => pb::Item {
            source: source.name().to_string(),
            key,
            found: true,
            value: row.value,
            version: row.version,
        },
        None => pb::Item {
            source: source.name().to_string(),
            key,
            found: false,
            value: Default::default(),
            version: 0,
        },
    }
}

/// An on_demand read as an Item: an absent key is `found: false` at the version it is absent at.
fn od_item(source: &str, key: String, slot: Slot) -> pb::Item {
    pb::Item {
        source: source.to_string(),
        key,
        found: slot.value.is_some(),
        value: slot.value.unwrap_or_default(),
        version: slot.version,
    }
}

/// Reads `key` of an on_demand source through its cache (see [`Source::read_through`]); `None`
/// for other sources.
async fn read_through(source: &Source, key: &str) -> Option<Result<pb::Item, Status>> {
    let got = source.read_through(key).await?;
    Some(
        got.map(|slot| od_item(source.name(), key.to_string(), slot))
            .map_err(|e| Status::unavailable(e.to_string())),
    )
}

/// Scan and Watch need every key of a source; an on_demand one holds only those read lately.
fn refuse_on_demand(source: &Source, what: &str) -> Result<(), Status> {
    if source.is_on_demand() {
        return Err(Status::failed_precondition(format!(
            "source '{}' is on_demand: it holds only the keys read lately, so {what} is not \
             served from it; use Get/BatchGet, or declare it mode = \"full\"",
            source.name()
        )));
    }
    Ok(())
}

fn update_event(source: &str, u: Update) -> pb::WatchEvent {
    use pb::watch_event::Kind;
    let kind = match u {
        Update::Row {
            key,
            version,
            value,
        } => Kind::Upsert(pb::Item {
            source: source.to_string(),
            key: key.to_string(),
            found: true,
            value,
            version,
        }),
        Update::Deleted { key, version } => Kind::Delete(pb::Item {
            source: source.to_string(),
            key: key.to_string(),
            found: false,
            value: Default::default(),
            version,
        }),
        Update::Synced(v) => Kind::Synced(v),
        Update::Reset(reason) => Kind::Reset(reason.to_string()),
    };
    pb::WatchEvent { kind: Some(kind) }
}

/// The on_demand counters of a SourceStatus (zero for other sources). For a view, `fetches`
/// counts rounds of fetching a row's missing inputs.
fn on_demand_status(s: &Source) -> pb::SourceStatus {
    let Some(held) = s.held() else {
        return pb::SourceStatus::default();
    };
    let st = held.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    pb::SourceStatus {
        hits: n(&st.hits),
        misses: n(&st.misses),
        fetches: n(&st.fetches),
        coalesced: n(&st.coalesced),
        evictions: n(&st.evictions),
        max_bytes: held.max_bytes,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::cache_server::Cache for CacheService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let source = self.source(&req.source)?;
        if req.key.is_empty() {
            return Err(Status::invalid_argument("key is empty"));
        }
        self.ready(source, &req.options.unwrap_or_default()).await?;
        // The writer publishes a version after applying it, so reading the version first makes
        // it a lower bound: the item is at least as new as `source_version`.
        let source_version = source.version();
        let item = match read_through(source, &req.key).await {
            Some(got) => got?,
            None => item(source, req.key),
        };
        Ok(Response::new(pb::GetResponse {
            item: Some(item),
            source_version,
            staleness_ms: source.staleness_ms(),
        }))
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let req = request.into_inner();
        if req.keys.len() > self.limits.max_batch_keys {
            return Err(Status::invalid_argument(format!(
                "BatchGet names {} keys; the limit is {} (limits.max_batch_keys)",
                req.keys.len(),
                self.limits.max_batch_keys
            )));
        }
        let opts = req.options.unwrap_or_default();
        // Every name is checked before any wait: an unknown source is NOT_FOUND at once, not
        // after another source's wait_ms.
        let mut sources: Vec<&Arc<Source>> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for k in &req.keys {
            if seen.insert(k.source.as_str()) {
                sources.push(self.source(&k.source)?);
            }
            if k.key.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "a key of source '{}' is empty",
                    k.source
                )));
            }
        }
        for source in &sources {
            self.ready(source, &opts).await?;
        }
        // on_demand keys are read through first, concurrently: each miss is one Fetch. They are
        // not part of the batch sequence below (their values carry their own versions).
        let mut through: Vec<Option<pb::Item>> = vec![None; req.keys.len()];
        {
            let reads = req.keys.iter().enumerate().filter_map(|(i, k)| {
                let source = self.store.source(&k.source)?;
                if !source.is_on_demand() {
                    return None;
                }
                Some(async move { (i, read_through(source, &k.key).await) })
            });
            for (i, got) in futures_util::future::join_all(reads).await {
                through[i] = got.transpose()?;
            }
        }
        // Each source's keyspace is loaded once for the whole request, after every wait.
        let rows: HashMap<&str, (&Arc<Source>, Arc<Keyspace>)> = sources
            .iter()
            .map(|s| (&**s.name(), (*s, s.keyspace())))
            .collect();
        // Read under each source's batch sequence and read again if a batch landed meanwhile,
        // so the answer holds whole versions: never half of one Publish. While a batch is being
        // applied, wait for it to land (the writer publishes the version right after) instead
        // of spinning. Only a writer that never pauses exhausts the bound
        // (`limits.batch_read_attempts`); then the last read is answered.
        let mut items = Vec::with_capacity(req.keys.len());
        let attempts = self.limits.batch_read_attempts;
        for attempt in 1..=attempts {
            let seqs: Option<Vec<u64>> = sources.iter().map(|s| s.read_begin()).collect();
            items.clear();
            for (k, through) in req.keys.iter().zip(&through) {
                if let Some(it) = through {
                    items.push(it.clone());
                    continue;
                }
                let (source, ks) = &rows[k.source.as_str()];
                items.push(item_in(source, ks, k.key.clone()));
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
        Ok(Response::new(pb::BatchGetResponse { items }))
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let req = request.into_inner();
        let source = self.source(&req.source)?;
        refuse_on_demand(source, "Scan")?;
        self.ready(source, &req.options.unwrap_or_default()).await?;
        let limit = match req.limit {
            0 => self.limits.scan_default_limit,
            n => n.min(self.limits.scan_max_limit),
        } as usize;
        let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let mut rows = source.keyspace().scan(&req.prefix, after, limit + 1);
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_page_token = if more {
            rows.last().map(|(k, _)| k.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let items = rows
            .into_iter()
            .map(|(k, row)| pb::Item {
                source: req.source.clone(),
                key: k.to_string(),
                found: true,
                value: row.value,
                version: row.version,
            })
            .collect();
        Ok(Response::new(pb::ScanResponse {
            items,
            next_page_token,
        }))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let source = self.source(&req.source)?.clone();
        refuse_on_demand(&source, "Watch")?;
        if !req.keys.is_empty() && !req.prefix.is_empty() {
            return Err(Status::invalid_argument(
                "watch either keys or a prefix, not both",
            ));
        }
        if req.keys.len() > self.limits.max_watch_keys {
            return Err(Status::invalid_argument(format!(
                "Watch names {} keys; the limit is {} (limits.max_watch_keys)",
                req.keys.len(),
                self.limits.max_watch_keys
            )));
        }
        if req.keys.iter().any(|k| k.is_empty()) {
            return Err(Status::invalid_argument("a watched key is empty"));
        }
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "at most {} watches at once (limits.max_watches)",
                self.limits.max_watches
            ))
        })?;
        let selection = if req.keys.is_empty() {
            Selection::Prefix(req.prefix)
        } else {
            Selection::Keys(req.keys)
        };
        let name = source.name().to_string();
        let mut watcher = Watcher::new(
            &self.hub,
            source,
            selection,
            req.send_initial,
            self.limits.watch_queue,
        );
        let (tx, rx) = mpsc::channel(self.limits.watch_send_buffer);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let update = tokio::select! {
                    u = watcher.next() => u,
                    _ = tx.closed() => None,
                    _ = crate::signalled(&mut shutdown) => None,
                };
                let Some(u) = update else { break };
                if tx.send(Ok(update_event(&name, u))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_sources(
        &self,
        _request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        // moka counts resident keys and bytes in its housekeeping: settle it so the status is
        // current (a status call, not a read path).
        self.store.settle().await;
        let sources = self
            .store
            .sources()
            .iter()
            .map(|s| pb::SourceStatus {
                name: s.name().to_string(),
                kind: if s.is_view() { "view" } else { "topic" }.to_string(),
                mode: s.mode().as_str().to_string(),
                origin: s.origin().unwrap_or_default().to_string(),
                synced: s.is_synced(),
                version: s.version(),
                keys: s.len() as u64,
                staleness_ms: s.staleness_ms(),
                connected: s.is_connected(),
                epoch: s.epoch().to_string(),
                bytes: s.bytes(),
                ..on_demand_status(s)
            })
            .collect();
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }
}
