//! The Cache gRPC API: Get, BatchGet, Scan, Watch and ListSources over the store.
//!
//! Get and BatchGet go through the one read path ([`super::read`]) that every reader protocol
//! shares; this module maps its [`ReadError`]s to gRPC codes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::read::{Answer, Freshness, ReadError, Reader};
use crate::config::Limits;
use crate::hub::{Hub, Selection, Update, Watcher};
use crate::pb::cache::v1 as pb;
use crate::store::{Source, Store};

/// The `Cache` service of a sidecar.
pub struct CacheService {
    store: Arc<Store>,
    reader: Reader,
    hub: Arc<Hub>,
    limits: Limits,
    watches: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

/// A refused read as a gRPC status: a bad request is INVALID_ARGUMENT, an unknown source
/// NOT_FOUND, anything the data is not yet (or no longer) fit for UNAVAILABLE.
fn status(e: ReadError) -> Status {
    match e {
        ReadError::EmptySource
        | ReadError::EmptyKey
        | ReadError::EmptyKeyOf(_)
        | ReadError::TooManyAfter { .. } => Status::invalid_argument(e.to_string()),
        ReadError::UnknownSource(_) => Status::not_found(e.to_string()),
        ReadError::NotSynced { .. }
        | ReadError::BelowVersion { .. }
        | ReadError::BeforeAfter { .. }
        | ReadError::TooStale { .. }
        | ReadError::Fetch(_) => Status::unavailable(e.to_string()),
    }
}

fn freshness(opts: Option<pb::ReadOptions>) -> Freshness {
    let o = opts.unwrap_or_default();
    Freshness {
        min_version: o.min_version,
        wait: Duration::from_millis(u64::from(o.wait_ms)),
        max_staleness_ms: u64::from(o.max_staleness_ms),
        after: o.after.into_iter().map(|a| (a.source, a.version)).collect(),
    }
}

fn item(source: &str, key: String, a: Answer) -> pb::Item {
    pb::Item {
        source: source.to_string(),
        key,
        found: a.value.is_some(),
        value: a.value.unwrap_or_default(),
        version: a.version,
    }
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
            reader: Reader::new(store.clone(), &limits),
            store,
            hub,
            limits,
            watches,
            shutdown,
        }
    }

    fn source(&self, name: &str) -> Result<&Arc<Source>, Status> {
        self.reader.source(name).map_err(status)
    }
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
        let got = self
            .reader
            .get(&req.source, &req.key, &freshness(req.options))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetResponse {
            item: Some(item(got.source.name(), req.key, got.answer)),
            source_version: got.source_version,
            staleness_ms: got.source.staleness_ms(),
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
        let keys: Vec<(&str, &str)> = req
            .keys
            .iter()
            .map(|k| (k.source.as_str(), k.key.as_str()))
            .collect();
        let answers = self
            .reader
            .batch(&keys, &freshness(req.options))
            .await
            .map_err(status)?;
        drop(keys);
        let items = req
            .keys
            .into_iter()
            .zip(answers)
            .map(|(k, a)| item(&k.source, k.key, a))
            .collect();
        Ok(Response::new(pb::BatchGetResponse { items }))
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let req = request.into_inner();
        let source = self.source(&req.source)?;
        refuse_on_demand(source, "Scan")?;
        let f = freshness(req.options);
        self.reader.settle(&[source], &f).await.map_err(status)?;
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
        let send_timeout = self.limits.watch_send_timeout.0;
        let hub = self.hub.clone();
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let update = tokio::select! {
                    u = watcher.next() => u,
                    _ = tx.closed() => None,
                    _ = crate::signalled(&mut shutdown) => None,
                };
                let Some(u) = update else { break };
                match tokio::time::timeout(send_timeout, tx.send(Ok(update_event(&name, u)))).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        // The client stopped reading: end the Watch and free its slot.
                        hub.stats()
                            .send_timeouts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(source = %name, "ending a Watch whose client stopped reading (limits.watch_send_timeout)");
                        break;
                    }
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
                upstream_lag_ms: s.upstream_lag().0,
                upstream_lag_bytes: s.upstream_lag().1,
                upstream_copied_rows: s.upstream_copied_rows(),
                last_error: s
                    .failure()
                    .or_else(|| s.last_error())
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                ..on_demand_status(s)
            })
            .collect();
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }
}
