//! A running sidecar: the store, the single writer, one feed client per origin, the Cache
//! gRPC listener (with health and reflection) and the http listener (WebSocket `/ws` and the
//! admin endpoints), all driven by one shutdown signal.
//!
//! Shutdown: readiness drops first (`/readyz` 503, gRPC health NOT_SERVING), then the
//! listeners stop accepting, Watch streams end and WebSockets are closed with 1001, and
//! in-flight work gets `shutdown.grace` to finish before what is left is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{ConfigError, ListenAddr, OriginSpec, SidecarConfig};
use crate::feed::{FeedClient, FeedStats};
use crate::hub::Hub;
use crate::introspect;
use crate::pb::cache::v1 as pb;
use crate::readiness::Readiness;
use crate::serve::admin::{self, Admin, OriginInfo};
use crate::serve::feed::Relay;
use crate::serve::grpc::CacheService;
use crate::serve::http;
use crate::serve::metrics::{Metrics, Parts, ReadTimingLayer};
use crate::serve::redis::{self, RedisStats};
use crate::serve::ws::{self, WsStats};
use crate::store::{Clock, OnDemand, Source, SourceKind, Store};
use crate::types::Mode;
use crate::views::{TopicInfo, View, ViewError, ViewSet, ViewStats};
use crate::writer::{Step, Writer, WriterStats};

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on unix:{}: {source}", path.display())]
    BindUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The config (its view graph included) is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Checks a sidecar config as `viewcar check` does: what config checks on its own, then the
/// view graph (checked by `views`), reported as an error of `file`.
pub fn check_config(file: &str, cfg: &SidecarConfig) -> Result<(), ConfigError> {
    cfg.validate(file)?;
    crate::views::check(&cfg.views, &topics(cfg)).map_err(|e| view_error(file, &e))
}

/// The topics of `cfg`, for the view graph.
fn topics(cfg: &SidecarConfig) -> Vec<TopicInfo<'_>> {
    cfg.origins
        .iter()
        .flat_map(|o| &o.topics)
        .map(|t| (t.name.as_str(), t.mode))
        .collect()
}

fn view_error(file: &str, e: &ViewError) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_string(),
        field: e.config_field(),
        message: e.config_message(),
    }
}

/// A started sidecar. [`Sidecar::shutdown`] stops it gracefully; dropping it stops it at once
/// (every task is aborted and the listeners are closed), so an embedder or a test leaks no
/// tasks or ports.
pub struct Sidecar {
    store: Arc<Store>,
    hub: Arc<Hub>,
    feeds: HashMap<String, Arc<FeedStats>>,
    writer_stats: Arc<WriterStats>,
    view_stats: HashMap<String, Arc<ViewStats>>,
    grpc_addr: ListenAddr,
    http_addr: SocketAddr,
    ws_stats: Arc<WsStats>,
    redis_addr: Option<SocketAddr>,
    redis_stats: Arc<RedisStats>,
    feed_addr: Option<SocketAddr>,
    relay: Option<Relay>,
    readiness: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
    grace: Duration,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The gRPC name of the Cache service, as health checks name it.
const CACHE_SERVICE: &str = "viewcar.cache.v1.Cache";

/// A source per topic of every origin, and each origin with its sources.
type PerOrigin = Vec<(OriginSpec, Vec<Arc<Source>>)>;

/// Binds `addr` for a listener, naming it in the error.
/// How often the on_demand caches run their housekeeping without being asked.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// Runs the on_demand caches' housekeeping every second: moka applies `idle` expiry and
/// evictions (and so the keys' Unsubscribe and the release of a view row's pins) only then, and
/// without it a sidecar that nobody reads or scrapes would keep idle keys subscribed for ever.
async fn housekeeping(store: Arc<Store>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => store.settle().await,
            _ = crate::signalled(&mut shutdown) => return,
        }
    }
}

/// Samples the status page's history until shutdown.
async fn sample_history(
    history: Arc<crate::serve::admin::History>,
    store: Arc<Store>,
    started: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(crate::serve::admin::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => history.sample(&store, started),
            _ = crate::signalled(&mut shutdown) => return,
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_err = |source| StartError::Bind { addr, source };
    let listener = crate::accept::bind_tcp(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    if !local.ip().is_loopback() {
        warn!(addr = %local, listener = what, "listening beyond loopback");
    }
    Ok((listener, local))
}

/// The Cache API's listener: TCP, or a Unix socket (whose file is removed when it stops).
enum GrpcListener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Binds the Cache API at `listen.grpc`; returns the listener and the address bound (the
/// port chosen when port 0 was asked for).
async fn bind_grpc(cfg: &SidecarConfig) -> Result<(GrpcListener, ListenAddr), StartError> {
    match &cfg.listen.grpc {
        ListenAddr::Tcp(addr) => {
            let (l, local) = bind(*addr, "Cache API").await?;
            Ok((GrpcListener::Tcp(l), ListenAddr::Tcp(local)))
        }
        ListenAddr::Unix(path) => {
            let l = crate::accept::bind_unix(path, cfg.listen.grpc_socket_mode)
                .await
                .map_err(|source| StartError::BindUnix {
                    path: path.clone(),
                    source,
                })?;
            Ok((
                GrpcListener::Unix(l, path.clone()),
                ListenAddr::Unix(path.clone()),
            ))
        }
    }
}

/// The Redis protocol listener of `cfg`, if any, and its TCP address.
async fn bind_redis(
    cfg: &SidecarConfig,
) -> Result<Option<(redis::Listener, Option<SocketAddr>)>, StartError> {
    Ok(match &cfg.listen.redis {
        None => None,
        Some(ListenAddr::Tcp(addr)) => {
            let (l, local) = bind(*addr, "Redis protocol").await?;
            Some((redis::Listener::Tcp(l), Some(local)))
        }
        Some(ListenAddr::Unix(path)) => {
            let l = crate::accept::bind_unix(path, cfg.redis.socket_mode)
                .await
                .map_err(|source| StartError::BindUnix {
                    path: path.clone(),
                    source,
                })?;
            Some((redis::Listener::Unix(l, path.clone()), None))
        }
    })
}

/// The topic replicas of `cfg`, added to `store`.
fn add_topics(cfg: &SidecarConfig, store: &mut Store, clock: Clock) -> PerOrigin {
    let live = cfg.feed.live_window.0;
    let mut per_origin = Vec::new();
    for o in &cfg.origins {
        let origin: Arc<str> = Arc::from(o.name.as_str());
        let sources: Vec<Arc<Source>> = o
            .topics
            .iter()
            .map(|t| {
                let kind = SourceKind::Topic {
                    origin: origin.clone(),
                };
                let source = Source::new(&t.name, kind, t.mode, clock, live);
                store.add(match t.mode {
                    Mode::Full => source,
                    Mode::OnDemand => source.with_on_demand(OnDemand::new(
                        &t.name,
                        t.budget(),
                        t.idle.map(|d| d.0),
                    )),
                })
            })
            .collect();
        per_origin.push((o.clone(), sources));
    }
    per_origin
}

/// The single writer, with the view engine, on its own task; returns its queue.
fn start_writer(
    cfg: &SidecarConfig,
    store: &Store,
    hub: &Arc<Hub>,
    views: Option<ViewSet>,
    stats: Arc<WriterStats>,
    relay: Option<&Relay>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> mpsc::Sender<Step> {
    let (wtx, wrx) = mpsc::channel(cfg.limits.writer_queue);
    for s in store.sources() {
        if let Some(rows) = s.view_cache() {
            rows.set_writer(crate::writer::desk(&wtx));
        }
    }
    let mut writer = Writer::new(hub.clone(), views.map(ViewSet::into_engine), stats);
    if let Some(relay) = relay {
        writer = writer.with_mirror(Arc::new(relay.clone()));
    }
    tasks.push(tokio::spawn(writer.run(wrx, cfg.limits.writer_batch)));
    wtx
}

/// One feed client per origin, each on its own task.
fn start_feeds(
    cfg: &SidecarConfig,
    per_origin: PerOrigin,
    wtx: mpsc::Sender<Step>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> (HashMap<String, Arc<FeedStats>>, Vec<OriginInfo>) {
    let mut feeds = HashMap::new();
    let mut origins = Vec::new();
    let max_message = cfg.limits.max_message_bytes.as_usize();
    let mut feed_cfg = cfg.feed.clone();
    if feed_cfg.instance.is_none() {
        // Kubernetes sets HOSTNAME to the pod name: leaves spread over relays without config.
        feed_cfg.instance = std::env::var("HOSTNAME").ok();
    }
    for (spec, sources) in per_origin {
        let stats = Arc::new(FeedStats::default());
        feeds.insert(spec.name.clone(), stats.clone());
        origins.push(OriginInfo {
            name: spec.name.clone(),
            address: crate::types::redact_address(&spec.address),
            stats: stats.clone(),
        });
        let client = FeedClient::new(
            spec,
            feed_cfg.clone(),
            max_message,
            sources,
            wtx.clone(),
            stats,
        );
        tasks.push(tokio::spawn(client.run(shutdown.clone())));
    }
    (feeds, origins)
}

/// Reports SERVING on gRPC health once every full source has synced.
fn announce_ready(
    readiness: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = readiness.synced() => {}
            _ = crate::signalled(&mut shutdown) => return,
        }
        if !readiness.is_draining() {
            introspect::set_serving(&health, CACHE_SERVICE, true).await;
            info!("ready: every full source has synced");
        }
    })
}

/// The Cache gRPC API (with health and reflection) on `listener`, until shutdown.
#[allow(clippy::too_many_arguments)]
async fn serve_cache(
    cfg: &SidecarConfig,
    listener: GrpcListener,
    store: &Arc<Store>,
    hub: &Arc<Hub>,
    metrics: &Metrics,
    readiness: &Arc<Readiness>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> tonic_health::server::HealthReporter {
    let max_message = cfg.limits.max_message_bytes.as_usize();
    let timing = ReadTimingLayer::new(metrics.reads().clone());
    let (health, health_service) = introspect::health(CACHE_SERVICE, shutdown.clone()).await;
    let (reflection, reflection_alpha) = introspect::reflection(&[CACHE_SERVICE]);
    tasks.push(announce_ready(
        readiness.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let service = CacheService::new(
        store.clone(),
        hub.clone(),
        cfg.limits.clone(),
        shutdown.clone(),
    );
    let server = pb::cache_server::CacheServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(cfg.limits.max_concurrent_streams))
        .http2_keepalive_interval(Some(cfg.listen.keepalive_interval.0))
        .http2_keepalive_timeout(Some(cfg.listen.keepalive_timeout.0))
        .layer(timing)
        .add_service(server)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha);
    let bounds = crate::accept::Bounds {
        max_connections: cfg.listen.grpc_max_connections,
        header_timeout: cfg.listen.grpc_header_timeout.0,
        // The Cache API's streams are mostly one per connection (Watch): nothing to gather.
        cork: false,
    };
    let mut sd = shutdown.clone();
    let stopped = async move {
        let _ = sd.wait_for(|s| *s).await;
    };
    tasks.push(tokio::spawn(async move {
        let (served, socket) = match listener {
            GrpcListener::Tcp(l) => {
                let incoming = crate::accept::incoming(l, bounds, "grpc");
                (
                    router.serve_with_incoming_shutdown(incoming, stopped).await,
                    None,
                )
            }
            GrpcListener::Unix(l, path) => {
                let incoming = crate::accept::incoming(l, bounds, "grpc");
                let served = router.serve_with_incoming_shutdown(incoming, stopped).await;
                (served, Some(path))
            }
        };
        if let Err(e) = served {
            warn!(error = %e, "Cache API server failed");
        }
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
    }));
    health
}

/// WebSocket `/ws` and the admin endpoints on `listener`, until shutdown.
fn serve_http(
    cfg: &SidecarConfig,
    listener: TcpListener,
    ws: ws::WsState,
    admin: Admin,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let router = ws::router(ws).merge(admin::router(Arc::new(admin)));
    let limits = http::HttpLimits {
        max_connections: cfg.listen.http_max_connections,
        header_timeout: cfg.listen.http_header_timeout.0,
    };
    tokio::spawn(http::serve(listener, router, limits, shutdown.clone()))
}

impl Sidecar {
    /// Builds the sources and views of `cfg`, binds the listeners, and starts syncing.
    pub async fn start(cfg: SidecarConfig) -> Result<Sidecar, StartError> {
        Self::start_with_views(cfg, Vec::new()).await
    }

    /// [`Sidecar::start`] with views computed by Rust code besides the config's `[[view]]`s.
    /// They are checked like declared views (names, sources, cycles) and served the same way.
    pub async fn start_with_views(
        cfg: SidecarConfig,
        views: Vec<View>,
    ) -> Result<Sidecar, StartError> {
        // A config built in code gets the same checks as one read from a file.
        const FILE: &str = "<config>";
        cfg.validate(FILE)?;
        let clock = Clock::new();
        let mut store = Store::new();
        let per_origin = add_topics(&cfg, &mut store, clock);
        let views = crate::views::build(&cfg.views, views, &mut store, clock)
            .map_err(|e| view_error(FILE, &e))?;
        let view_stats = views.as_ref().map(|v| v.stats()).unwrap_or_default();
        let store = Arc::new(store);
        let hub = Arc::new(Hub::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (grpc_listener, grpc_addr) = bind_grpc(&cfg).await?;
        let (http_listener, http_addr) = bind(cfg.listen.http_addr(), "http").await?;
        let redis_listener = bind_redis(&cfg).await?;
        let feed_listener = match cfg.listen.feed {
            Some(addr) => Some(bind(addr, "Feed (relay)").await?),
            None => None,
        };
        let relay = feed_listener
            .as_ref()
            .map(|(_, addr)| Relay::new(&cfg, *addr, store.sources()));

        let mut tasks = Vec::new();
        let writer_stats = Arc::new(WriterStats::default());
        let wtx = start_writer(
            &cfg,
            &store,
            &hub,
            views,
            writer_stats.clone(),
            relay.as_ref(),
            &mut tasks,
        );
        let feed_addr = feed_listener.as_ref().map(|(_, a)| *a);
        if let (Some(relay), Some((listener, _))) = (&relay, feed_listener) {
            let relay = relay.clone();
            let sd = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = relay.serve(listener, sd).await {
                    warn!(error = %e, "Feed (relay) server failed");
                }
            }));
        }
        let (feeds, origins) = start_feeds(&cfg, per_origin, wtx, &shutdown_rx, &mut tasks);

        let readiness = Arc::new(Readiness::new(store.clone()));
        let ws_stats = Arc::new(WsStats::default());
        let redis_stats = Arc::new(RedisStats::default());
        let view_list: Vec<(String, Arc<ViewStats>)> = view_stats
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let metrics = Metrics::new(Parts {
            store: store.clone(),
            hub: hub.clone(),
            feeds: feeds.iter().map(|(n, s)| (n.clone(), s.clone())).collect(),
            writer: writer_stats.clone(),
            views: view_list.clone(),
            ws: ws_stats.clone(),
            redis: redis_listener.as_ref().map(|_| redis_stats.clone()),
            relay: relay.clone(),
            readiness: readiness.clone(),
        });
        let health = serve_cache(
            &cfg,
            grpc_listener,
            &store,
            &hub,
            &metrics,
            &readiness,
            &shutdown_rx,
            &mut tasks,
        )
        .await;
        let ws = ws::WsState::new(
            store.clone(),
            hub.clone(),
            cfg.ws.clone(),
            &cfg.limits,
            shutdown_rx.clone(),
            ws_stats.clone(),
        );
        let history = Arc::new(crate::serve::admin::History::default());
        let admin = Admin {
            metrics,
            readiness: readiness.clone(),
            store: store.clone(),
            hub: hub.clone(),
            origins,
            views: view_list,
            ws: ws_stats.clone(),
            started: Instant::now(),
            history: history.clone(),
            relay: relay.clone(),
        };
        tasks.push(tokio::spawn(sample_history(
            history,
            store.clone(),
            admin.started,
            shutdown_rx.clone(),
        )));
        tasks.push(serve_http(&cfg, http_listener, ws, admin, &shutdown_rx));
        if store.sources().iter().any(|s| s.is_on_demand()) {
            tasks.push(tokio::spawn(housekeeping(
                store.clone(),
                shutdown_rx.clone(),
            )));
        }
        let redis_addr = redis_listener.as_ref().and_then(|(_, a)| *a);
        if let Some((listener, addr)) = redis_listener {
            let shared = Arc::new(redis::Shared::new(
                store.clone(),
                hub.clone(),
                cfg.redis.clone(),
                &cfg.limits,
                addr.map_or(0, |a| a.port()),
                shutdown_rx.clone(),
                redis_stats.clone(),
            ));
            tasks.push(tokio::spawn(redis::serve(listener, shared)));
        }
        info!(grpc = %grpc_addr, http = %http_addr, redis = ?redis_addr, feed = ?feed_addr, sources = store.sources().len(), "sidecar started");
        Ok(Sidecar {
            store,
            hub,
            feeds,
            writer_stats,
            view_stats,
            grpc_addr,
            http_addr,
            ws_stats,
            redis_addr,
            redis_stats,
            feed_addr,
            relay,
            readiness,
            health,
            grace: cfg.shutdown.grace.0,
            shutdown,
            tasks,
        })
    }

    /// Where the Cache gRPC API listens: the TCP address bound (the port chosen when port 0
    /// was asked for), or the Unix socket's path.
    pub fn grpc_addr(&self) -> &ListenAddr {
        &self.grpc_addr
    }

    /// Where the http listener (WebSocket `/ws`, admin endpoints) listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the Redis protocol listener listens, if `[listen] redis` is a TCP address.
    pub fn redis_addr(&self) -> Option<SocketAddr> {
        self.redis_addr
    }

    /// Where the Feed API (a relay) listens, with `[listen] feed`.
    pub fn feed_addr(&self) -> Option<SocketAddr> {
        self.feed_addr
    }

    /// The relay's topics (with `[listen] feed`): counters, positions, rows.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// Counters of the Redis protocol listener.
    pub fn redis_stats(&self) -> &Arc<RedisStats> {
        &self.redis_stats
    }

    /// Counters of the WebSocket endpoint.
    pub fn ws_stats(&self) -> &Arc<WsStats> {
        &self.ws_stats
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Feed counters of the named origin.
    pub fn feed_stats(&self, origin: &str) -> Option<&Arc<FeedStats>> {
        self.feeds.get(origin)
    }

    pub fn writer_stats(&self) -> &Arc<WriterStats> {
        &self.writer_stats
    }

    /// Counters of the named view.
    pub fn view_stats(&self, view: &str) -> Option<&Arc<ViewStats>> {
        self.view_stats.get(view)
    }

    /// Resolves once every full source has synced.
    pub async fn synced(&self) {
        self.readiness.synced().await
    }

    /// Whether the sidecar should get traffic: what `/readyz` and gRPC health report.
    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// Stops feeds and listeners and waits for them, at most the grace period
    /// (`shutdown.grace`); returns whether everything finished within it.
    pub async fn shutdown(mut self) -> bool {
        let start = Instant::now();
        self.readiness.drain();
        introspect::set_serving(&self.health, CACHE_SERVICE, false).await;
        self.shutdown.send_replace(true);
        let mut tasks = std::mem::take(&mut self.tasks);
        let drained = tokio::time::timeout(self.grace, async {
            for t in tasks.iter_mut() {
                let _ = t.await;
            }
        })
        .await
        .is_ok();
        if drained {
            info!(took_ms = start.elapsed().as_millis() as u64, "shut down");
        } else {
            let left = tasks.iter().filter(|t| !t.is_finished()).count();
            warn!(grace = ?self.grace, tasks = left, "grace period over; dropping what is still open");
            for t in &tasks {
                t.abort();
            }
        }
        drained
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> bool {
        signal.await;
        info!(grace = ?self.grace, "shutting down");
        self.shutdown().await
    }
}

impl Drop for Sidecar {
    /// Stops what is still running at once: the shutdown signal for the listeners and feeds,
    /// and an abort for every task (after [`Sidecar::shutdown`] there is none left).
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}
