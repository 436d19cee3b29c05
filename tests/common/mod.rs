//! Shared helpers of the integration tests: real origins and sidecars on loopback port 0, gRPC
//! clients, a scriptable fake origin, a TCP proxy that can break connections, and waits on events
//! (never sleeps) bounded by deadlines so that a failing test fails instead of hanging.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use viewcar::config::{Dur, Mode, OriginSpec, TopicSpec};
use viewcar::pb::cache::v1 as cache;
use viewcar::pb::feed::v1 as feed;
use viewcar::store::Source;
use viewcar::{Origin, OriginConfig, Sidecar, SidecarConfig};

/// The deadline of every wait: far above what any step takes on a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Runs a test body under [`DEADLINE`], so a missed event fails the test instead of hanging it.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("test did not finish within its deadline")
}

pub fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// An origin config for tests: loopback, port 0, frequent Progress.
pub fn origin_config() -> OriginConfig {
    OriginConfig {
        listen: loopback0(),
        progress_interval: Dur(Duration::from_millis(100)),
        ..OriginConfig::default()
    }
}

/// A running origin and the handle that stops it.
pub struct TestOrigin {
    pub origin: Origin,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestOrigin {
    /// Starts a new origin (a fresh epoch) on 127.0.0.1 with any free port.
    pub async fn start(cfg: OriginConfig) -> TestOrigin {
        Self::start_on(Origin::new(cfg), loopback0()).await
    }

    /// Serves `origin` on `addr` (port 0 = any free port).
    pub async fn start_on(origin: Origin, addr: SocketAddr) -> TestOrigin {
        let listener = TcpListener::bind(addr).await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = origin.clone();
        let task = tokio::spawn(async move {
            let _ = serving
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        TestOrigin {
            origin,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: open streams end, the listener closes.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops this origin and starts a new one (a new epoch, with `cfg`) on the same address,
    /// as a restarted origin process would.
    pub async fn restart(&mut self, cfg: OriginConfig) -> Origin {
        self.stop().await;
        let next = TestOrigin::start_on(Origin::new(cfg), self.addr).await;
        *self = next;
        self.origin.clone()
    }

    pub async fn feed_client(&self) -> feed::feed_client::FeedClient<Channel> {
        feed_client(self.addr).await
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A sidecar config for tests: Cache API on port 0, one origin named `o` at `address` with
/// `topics` as full replicas, and reconnect timings small enough for tests.
pub fn sidecar_config(address: &str, topics: &[&str]) -> SidecarConfig {
    let mut cfg = SidecarConfig::default();
    cfg.listen.grpc = loopback0();
    cfg.feed.backoff_initial = Dur(Duration::from_millis(10));
    cfg.feed.backoff_max = Dur(Duration::from_millis(100));
    cfg.feed.connect_timeout = Dur(Duration::from_secs(2));
    cfg.origins = vec![OriginSpec {
        name: "o".to_string(),
        address: address.to_string(),
        topics: topics
            .iter()
            .map(|t| TopicSpec {
                name: t.to_string(),
                mode: Mode::Full,
                max_bytes: None,
                idle: None,
            })
            .collect(),
        tls: None,
    }];
    cfg
}

pub async fn start_sidecar(cfg: SidecarConfig) -> Sidecar {
    Sidecar::start(cfg).await.expect("sidecar starts")
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

pub async fn cache_client(sidecar: &Sidecar) -> cache::cache_client::CacheClient<Channel> {
    cache::cache_client::CacheClient::new(channel(sidecar.grpc_addr()).await)
}

pub async fn feed_client(addr: SocketAddr) -> feed::feed_client::FeedClient<Channel> {
    feed::feed_client::FeedClient::new(channel(addr).await)
}

pub fn source(sidecar: &Sidecar, name: &str) -> Arc<Source> {
    sidecar
        .store()
        .source(name)
        .unwrap_or_else(|| panic!("no source {name}"))
        .clone()
}

/// Waits until `cond` holds for the source, re-checking on every applied version or sync.
pub async fn wait_source(source: &Source, what: &str, cond: impl Fn(&Source) -> bool) {
    let mut changes = source.subscribe_changes();
    let waited = tokio::time::timeout(DEADLINE, async {
        while !cond(source) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        waited.is_ok() && cond(source),
        "source '{}' never reached: {what} (version {}, epoch {}, synced {})",
        source.name(),
        source.version(),
        source.epoch(),
        source.is_synced()
    );
}

/// Waits until the source has applied `version` of `epoch`.
pub async fn wait_position(source: &Source, epoch: &str, version: u64) {
    wait_source(source, &format!("{epoch}@{version}"), |s| {
        s.is_synced() && s.epoch().as_str() == epoch && s.version() >= version
    })
    .await
}

/// Polls `cond` until it holds. Only for state that has no event to wait on (counters).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn counter(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub fn put(key: &str, value: &str) -> viewcar::Put {
    viewcar::Put::upsert(key.to_string(), value.as_bytes().to_vec())
}

pub fn del(key: &str) -> viewcar::Put {
    viewcar::Put::delete(key.to_string())
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn get_request(source: &str, key: &str) -> cache::GetRequest {
    cache::GetRequest {
        source: source.to_string(),
        key: key.to_string(),
        options: Some(cache::ReadOptions {
            wait_ms: 5_000,
            ..Default::default()
        }),
    }
}

// ----- fake origin -----

/// One Sync stream opened against a [`FakeOrigin`]: the test reads what the sidecar asks and
/// scripts what it is sent.
pub struct FakeStream {
    pub requests: tonic::Streaming<feed::SyncRequest>,
    pub out: mpsc::Sender<Result<feed::SyncResponse, Status>>,
}

impl FakeStream {
    /// The next Subscribe the sidecar sends on this stream.
    pub async fn next_subscribe(&mut self) -> feed::Subscribe {
        loop {
            let req = self
                .requests
                .message()
                .await
                .expect("request stream")
                .expect("sidecar closed the stream");
            if let Some(feed::sync_request::Kind::Subscribe(s)) = req.kind {
                return s;
            }
        }
    }

    pub async fn send(&self, kind: feed::sync_response::Kind) {
        self.out
            .send(Ok(feed::SyncResponse { kind: Some(kind) }))
            .await
            .expect("sidecar went away");
    }

    /// A whole snapshot of `entries` at `epoch@version`, `per_chunk` entries a message.
    pub async fn snapshot(
        &self,
        topic: &str,
        epoch: &str,
        version: u64,
        entries: &[(String, String)],
        per_chunk: usize,
    ) {
        let chunks: Vec<_> = entries.chunks(per_chunk.max(1)).collect();
        let n = chunks.len().max(1);
        for i in 0..n {
            let part = chunks.get(i).copied().unwrap_or(&[]);
            self.send(feed::sync_response::Kind::Snapshot(feed::SnapshotChunk {
                topic: topic.to_string(),
                position: Some(feed::Position {
                    epoch: epoch.to_string(),
                    version,
                }),
                entries: part
                    .iter()
                    .map(|(k, v)| feed::Entry {
                        key: k.clone(),
                        value: v.clone().into_bytes().into(),
                        version,
                    })
                    .collect(),
                last: i + 1 == n,
            }))
            .await;
        }
    }

    pub async fn batch(
        &self,
        topic: &str,
        epoch: &str,
        prev_version: u64,
        version: u64,
        changes: &[(&str, Option<&str>)],
    ) {
        self.send(feed::sync_response::Kind::Changes(feed::ChangeBatch {
            topic: topic.to_string(),
            epoch: epoch.to_string(),
            prev_version,
            version,
            changes: changes
                .iter()
                .map(|(k, v)| feed::Change {
                    key: k.to_string(),
                    value: v.map(|v| v.as_bytes().to_vec().into()).unwrap_or_default(),
                    deleted: v.is_none(),
                })
                .collect(),
        }))
        .await;
    }

    pub async fn reset(&self, topic: &str, reason: &str) {
        self.send(feed::sync_response::Kind::Reset(feed::Reset {
            topic: topic.to_string(),
            reason: reason.to_string(),
        }))
        .await;
    }
}

/// A hand-written Feed server whose streams the test drives message by message, to produce what
/// a correct origin never sends (gaps, odd orders).
pub struct FakeOrigin {
    pub addr: SocketAddr,
    streams: mpsc::Receiver<FakeStream>,
    stop: Option<oneshot::Sender<()>>,
}

struct FakeFeed {
    streams: mpsc::Sender<FakeStream>,
}

#[tonic::async_trait]
impl feed::feed_server::Feed for FakeFeed {
    type SyncStream = ReceiverStream<Result<feed::SyncResponse, Status>>;

    async fn sync(
        &self,
        request: Request<tonic::Streaming<feed::SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (out, rx) = mpsc::channel(64);
        self.streams
            .send(FakeStream {
                requests: request.into_inner(),
                out,
            })
            .await
            .map_err(|_| Status::unavailable("test is gone"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch(
        &self,
        _: Request<feed::FetchRequest>,
    ) -> Result<Response<feed::FetchResponse>, Status> {
        Err(Status::unimplemented("fake origin"))
    }

    async fn publish(
        &self,
        _: Request<feed::PublishRequest>,
    ) -> Result<Response<feed::PublishResponse>, Status> {
        Err(Status::unimplemented("fake origin"))
    }
}

impl FakeOrigin {
    pub async fn start() -> FakeOrigin {
        let listener = TcpListener::bind(loopback0()).await.expect("bind fake");
        let addr = listener.local_addr().expect("fake address");
        let (tx, streams) = mpsc::channel(8);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(feed::feed_server::FeedServer::new(FakeFeed { streams: tx }))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stopped.await;
                }),
        );
        FakeOrigin {
            addr,
            streams,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next Sync stream a sidecar opens.
    pub async fn accept(&mut self) -> FakeStream {
        self.streams.recv().await.expect("fake origin stopped")
    }
}

impl Drop for FakeOrigin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// ----- proxy -----

/// Where a [`Proxy`] sends new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Forward to this address.
    Forward(SocketAddr),
    /// Accept and close at once (the origin is unreachable).
    Refuse,
}

struct ProxyState {
    upstream: Mutex<Upstream>,
    /// Bumped to end every connection open at that moment.
    cut: watch::Sender<u64>,
    accepted: AtomicU64,
}

/// A TCP proxy between a sidecar and an origin that can break the path on demand: cut every
/// open connection, refuse new ones, or point at another upstream. New failure modes (blackhole,
/// latency, cut mid-message) are further `Upstream` variants or per-connection behaviours in
/// `pipe`.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(loopback0()).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState {
            upstream: Mutex::new(Upstream::Forward(upstream)),
            cut: watch::channel(0).0,
            accepted: AtomicU64::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let upstream = *st.upstream.lock().unwrap();
                let cut = st.cut.subscribe();
                tokio::spawn(pipe(client, upstream, cut));
            }
        });
        Proxy { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends every connection open now with a TCP reset; new ones are still accepted.
    pub fn cut(&self) {
        self.state.cut.send_modify(|g| *g += 1);
    }

    /// Where new connections go from now on (open ones are left alone; `cut` them if needed).
    pub fn set_upstream(&self, upstream: Upstream) {
        *self.state.upstream.lock().unwrap() = upstream;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Zero linger: dropping the socket sends RST, as a crashed peer or a middlebox would.
#[allow(deprecated)] // SO_LINGER blocks on drop only for a non-zero timeout.
fn abort_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn pipe(mut client: TcpStream, upstream: Upstream, mut cut: watch::Receiver<u64>) {
    let Upstream::Forward(to) = upstream else {
        abort_on_drop(&client);
        return;
    };
    let Ok(mut server) = TcpStream::connect(to).await else {
        abort_on_drop(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    cut.mark_unchanged();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
        _ = cut.changed() => {
            abort_on_drop(&client);
            abort_on_drop(&server);
        }
    }
}
