//! Shared helpers of the integration tests: real origins and sidecars on loopback port 0, gRPC
//! clients, a scriptable fake origin, a TCP proxy that can break connections, and waits on events
//! (never sleeps) bounded by deadlines so that a failing test fails instead of hanging.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// The kernel's cap on any listen backlog (`net.core.somaxconn`), when it is above `at_least`;
/// `None` (and the test says it is skipped) otherwise, or where it cannot be read.
pub fn somaxconn_above(at_least: usize) -> Option<usize> {
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match cap {
        Some(cap) if cap > at_least => Some(cap),
        _ => {
            println!(
                "skipped: net.core.somaxconn (the kernel's cap on any listen backlog) is {cap:?}, \
                 not above {at_least}"
            );
            None
        }
    }
}

/// A Subscribe to `topic`: the whole topic for no `keys`, else those keys.
pub fn subscribe(topic: &str, keys: &[&str], resume: Option<feed::Position>) -> feed::SyncRequest {
    feed::SyncRequest {
        kind: Some(feed::sync_request::Kind::Subscribe(feed::Subscribe {
            topic: topic.to_string(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            resume,
        })),
    }
}

/// A Sync stream on `raw` whose first request is `first`: the request sender (the stream's
/// request half stays open while it lives) and the response stream.
pub async fn open_sync(
    raw: &mut feed::feed_client::FeedClient<tonic::transport::Channel>,
    first: feed::SyncRequest,
) -> (
    mpsc::Sender<feed::SyncRequest>,
    tonic::Streaming<feed::SyncResponse>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let stream = raw
        .sync(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
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

    /// Stops this origin and starts a new one with `cfg` on the same address, as a restarted
    /// origin process would: a new epoch in memory, or what its `data_dir` holds (the old
    /// origin is closed first, releasing the directory).
    pub async fn restart(&mut self, cfg: OriginConfig) -> Origin {
        self.stop().await;
        self.origin.close();
        let origin = Origin::open(cfg).expect("open the restarted origin");
        let next = TestOrigin::start_on(origin, self.addr).await;
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
    cfg.listen.grpc = loopback0().into();
    cfg.feed.backoff_initial = Dur(Duration::from_millis(10));
    cfg.feed.backoff_max = Dur(Duration::from_millis(100));
    cfg.feed.connect_timeout = Dur(Duration::from_secs(2));
    // The first address is dialled first whatever $HOSTNAME says where the tests run (an
    // empty name spreads nothing): failover tests depend on which relay a leaf starts on.
    cfg.feed.instance = Some(String::new());
    cfg.origins = vec![full_origin(address, topics)];
    cfg
}

/// An origin named `o` at `address` (no TLS), with `topics` as full replicas.
pub fn full_origin(address: &str, topics: &[&str]) -> OriginSpec {
    OriginSpec {
        name: "o".to_string(),
        address: address.to_string(),
        fallback: Vec::new(),
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
    }
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
    cache::cache_client::CacheClient::new(grpc_channel(sidecar).await)
}

/// A channel to the sidecar's Cache API, over TCP or its Unix socket.
pub async fn grpc_channel(sidecar: &Sidecar) -> Channel {
    viewcar::cli::channel(&sidecar.grpc_addr().to_string())
        .await
        .expect("connect to the Cache API")
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
    if waited.is_ok() && cond(source) {
        return;
    }
    let (epoch, version) = source.position();
    panic!(
        "source '{}' never reached: {what} (at {epoch}@{version}, synced {})",
        source.name(),
        source.is_synced()
    );
}

/// Waits until the source has applied `version` of `epoch`. The epoch and version are read
/// together ([`Source::position`]), so a check never pairs one epoch with another's version.
pub async fn wait_position(source: &Source, epoch: &str, version: u64) {
    wait_source(source, &format!("{epoch}@{version}"), |s| {
        let (at_epoch, at_version) = s.position();
        s.is_synced() && at_epoch.as_str() == epoch && at_version >= version
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
    get_waiting(source, key, 5_000)
}

/// A Get of `source[key]` that waits up to `wait_ms` for the source to be synced.
pub fn get_waiting(source: &str, key: &str, wait_ms: u32) -> cache::GetRequest {
    cache::GetRequest {
        source: source.to_string(),
        key: key.to_string(),
        options: Some(cache::ReadOptions {
            wait_ms,
            ..Default::default()
        }),
    }
}

/// Opens a Watch of `keys` of `source` (a key list, no prefix).
pub async fn open_watch(
    client: &mut cache::cache_client::CacheClient<Channel>,
    source: &str,
    keys: &[&str],
    send_initial: bool,
) -> tonic::Streaming<cache::WatchEvent> {
    client
        .watch(cache::WatchRequest {
            source: source.to_string(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            prefix: String::new(),
            send_initial,
        })
        .await
        .expect("Watch opens")
        .into_inner()
}

/// Reads `watch` up to its Synced event: the initial rows are in and the stream is established
/// end to end.
pub async fn until_synced(watch: &mut tonic::Streaming<cache::WatchEvent>) {
    loop {
        let ev = watch
            .message()
            .await
            .expect("watch stream")
            .expect("watch open");
        if matches!(ev.kind, Some(cache::watch_event::Kind::Synced(_))) {
            return;
        }
    }
}

// ----- fake origin -----

/// One Sync stream opened against a [`FakeOrigin`]: the test reads what the sidecar asks and
/// scripts what it is sent.
pub struct FakeStream {
    pub requests: tonic::Streaming<feed::SyncRequest>,
    pub out: mpsc::Sender<Result<feed::SyncResponse, Status>>,
    /// The request an origin that holds its headers back read before answering.
    pub first: Option<feed::SyncRequest>,
}

impl FakeStream {
    /// The next Subscribe the sidecar sends on this stream.
    pub async fn next_subscribe(&mut self) -> feed::Subscribe {
        loop {
            let req = match self.first.take() {
                Some(first) => first,
                None => self
                    .requests
                    .message()
                    .await
                    .expect("request stream")
                    .expect("sidecar closed the stream"),
            };
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
                total_entries: entries.len() as u64,
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
            group: None,
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
/// a correct origin never sends (gaps, odd orders). Fetch answers from rows the test sets
/// ([`FakeOrigin::set_row`]) for topics given a position ([`FakeOrigin::set_position`]); for
/// any other topic it is UNIMPLEMENTED.
pub struct FakeOrigin {
    pub addr: SocketAddr,
    streams: mpsc::Receiver<FakeStream>,
    stop: Option<oneshot::Sender<()>>,
    fetch: Arc<Mutex<FakeRows>>,
}

/// What a [`FakeOrigin`]'s Fetch answers: per topic, a position and rows (value, version).
#[derive(Default)]
struct FakeRows {
    positions: std::collections::HashMap<String, feed::Position>,
    rows: std::collections::HashMap<(String, String), (Vec<u8>, u64)>,
    fetches: u64,
}

struct FakeFeed {
    streams: mpsc::Sender<FakeStream>,
    fetch: Arc<Mutex<FakeRows>>,
    /// Send no response headers until the first request has arrived (as a grpc-go or grpcio
    /// origin does when its first message waits for a request).
    hold_headers: bool,
}

#[tonic::async_trait]
impl feed::feed_server::Feed for FakeFeed {
    type SyncStream = ReceiverStream<Result<feed::SyncResponse, Status>>;

    async fn sync(
        &self,
        request: Request<tonic::Streaming<feed::SyncRequest>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (out, rx) = mpsc::channel(64);
        let mut requests = request.into_inner();
        let first = if self.hold_headers {
            match requests.message().await {
                Ok(Some(first)) => Some(first),
                _ => return Err(Status::cancelled("the sidecar left before asking")),
            }
        } else {
            None
        };
        self.streams
            .send(FakeStream {
                requests,
                out,
                first,
            })
            .await
            .map_err(|_| Status::unavailable("test is gone"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch(
        &self,
        request: Request<feed::FetchRequest>,
    ) -> Result<Response<feed::FetchResponse>, Status> {
        let request = request.into_inner();
        let mut fake = self.fetch.lock().unwrap();
        let Some(position) = fake.positions.get(&request.topic).cloned() else {
            return Err(Status::unimplemented("fake origin"));
        };
        fake.fetches += 1;
        let mut response = feed::FetchResponse {
            position: Some(position),
            ..Default::default()
        };
        for key in request.keys {
            match fake.rows.get(&(request.topic.clone(), key.clone())) {
                Some((value, version)) => response.entries.push(feed::Entry {
                    key,
                    value: value.clone().into(),
                    version: *version,
                }),
                None => response.missing.push(key),
            }
        }
        Ok(Response::new(response))
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
        Self::serve(false).await
    }

    /// A fake origin whose Sync handler awaits the stream's first request before it returns
    /// its response, so no response headers reach the sidecar until it has asked something.
    pub async fn holding_headers() -> FakeOrigin {
        Self::serve(true).await
    }

    async fn serve(hold_headers: bool) -> FakeOrigin {
        let listener = TcpListener::bind(loopback0()).await.expect("bind fake");
        let addr = listener.local_addr().expect("fake address");
        let (tx, streams) = mpsc::channel(8);
        let (stop, stopped) = oneshot::channel::<()>();
        let fetch = Arc::new(Mutex::new(FakeRows::default()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(feed::feed_server::FeedServer::new(FakeFeed {
                    streams: tx,
                    fetch: fetch.clone(),
                    hold_headers,
                }))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stopped.await;
                }),
        );
        FakeOrigin {
            addr,
            streams,
            stop: Some(stop),
            fetch,
        }
    }

    /// From now on Fetch of `topic` answers at `epoch@version`, with the rows set for it.
    pub fn set_position(&self, topic: &str, epoch: &str, version: u64) {
        self.fetch.lock().unwrap().positions.insert(
            topic.to_string(),
            feed::Position {
                epoch: epoch.to_string(),
                version,
            },
        );
    }

    /// Fetch of `topic` answers `key` with `value` written at `version`.
    pub fn set_row(&self, topic: &str, key: &str, value: &str, version: u64) {
        self.fetch.lock().unwrap().rows.insert(
            (topic.to_string(), key.to_string()),
            (value.as_bytes().to_vec(), version),
        );
    }

    /// Fetch calls answered so far.
    pub fn fetches(&self) -> u64 {
        self.fetch.lock().unwrap().fetches
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
    /// Accept and then never answer nor close (a peer that vanished without a FIN, or a
    /// firewall dropping packets): only the client's own timeouts end such a connection.
    Blackhole,
}

/// What one proxied connection does with the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnMode {
    Forward,
    /// Hold everything, in both directions, without closing.
    Blackhole,
    /// Forward `Conn::budget` more bytes (both directions together), then reset.
    CutAfter,
    /// Reset both sides now.
    Cut,
}

/// The control of one open connection.
struct Conn {
    mode: watch::Sender<ConnMode>,
    budget: AtomicU64,
}

impl Conn {
    /// Takes up to `want` bytes from the budget of a `CutAfter` connection; when the budget is
    /// spent the connection is cut.
    fn take(&self, want: usize) -> usize {
        let mut got = 0;
        let _ = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                got = left.min(want as u64);
                Some(left - got)
            });
        if got < want as u64 {
            self.mode.send_replace(ConnMode::Cut);
        }
        got as usize
    }
}

struct ProxyState {
    upstream: Mutex<Upstream>,
    /// Every connection accepted; dead ones are pruned on the next accept.
    conns: Mutex<Vec<std::sync::Weak<Conn>>>,
    /// Added to every chunk, in both directions, measured from when it was read.
    latency_us: AtomicU64,
    accepted: AtomicU64,
    accept_times: Mutex<Vec<std::time::Instant>>,
    /// The budget of the next connection accepted, armed by `cut_next_after`.
    next_budget: Mutex<Option<u64>>,
}

impl ProxyState {
    fn each(&self, mut f: impl FnMut(&Conn)) {
        let conns = self.conns.lock().unwrap();
        for c in conns.iter().filter_map(|w| w.upgrade()) {
            f(&c);
        }
    }
}

/// A TCP proxy between a sidecar and an origin that can break the path on demand: reset every
/// open connection, blackhole them (no FIN, no RST, nothing forwarded), cut them after a few
/// more bytes (mid-message), add latency, refuse or blackhole new connections, or point at
/// another upstream.
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
            conns: Mutex::new(Vec::new()),
            latency_us: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            accept_times: Mutex::new(Vec::new()),
            next_budget: Mutex::new(None),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                st.accepted.fetch_add(1, Ordering::Relaxed);
                st.accept_times
                    .lock()
                    .unwrap()
                    .push(std::time::Instant::now());
                let upstream = *st.upstream.lock().unwrap();
                let budget = match upstream {
                    Upstream::Forward(_) => st.next_budget.lock().unwrap().take(),
                    Upstream::Refuse | Upstream::Blackhole => None,
                };
                let conn = Arc::new(Conn {
                    mode: watch::channel(match budget {
                        Some(_) => ConnMode::CutAfter,
                        None => ConnMode::Forward,
                    })
                    .0,
                    budget: AtomicU64::new(budget.unwrap_or(0)),
                });
                {
                    let mut conns = st.conns.lock().unwrap();
                    conns.retain(|w| w.strong_count() > 0);
                    conns.push(Arc::downgrade(&conn));
                }
                tokio::spawn(pipe(client, upstream, conn, st.clone()));
            }
        });
        Proxy { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends every connection open now with a TCP reset; new ones are still accepted.
    pub fn cut(&self) {
        self.state.each(|c| {
            c.mode.send_replace(ConnMode::Cut);
        });
    }

    /// Every connection open now stops forwarding in both directions and is never closed by
    /// the proxy (until `cut` or drop): the peer vanished silently. New connections are
    /// forwarded as `set_upstream` says.
    pub fn blackhole(&self) {
        self.state.each(|c| {
            c.mode.send_if_modified(|m| {
                let hold = *m != ConnMode::Cut;
                if hold {
                    *m = ConnMode::Blackhole;
                }
                hold
            });
        });
    }

    /// Every connection open now forwards `bytes` more bytes (both directions together, so
    /// usually in the middle of a message) and is then reset.
    pub fn cut_after(&self, bytes: u64) {
        self.state.each(|c| {
            c.budget.store(bytes, Ordering::Release);
            c.mode.send_if_modified(|m| {
                let arm = *m == ConnMode::Forward;
                if arm {
                    *m = ConnMode::CutAfter;
                }
                arm
            });
        });
    }

    /// The next connection forwarded upstream forwards `bytes` (both directions together, handshakes
    /// included) and is then reset: a cut at a chosen depth into what the new stream carries.
    pub fn cut_next_after(&self, bytes: u64) {
        *self.state.next_budget.lock().unwrap() = Some(bytes);
    }

    /// Delays every chunk read from now on, in both directions, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Where new connections go from now on (open ones are left alone; `cut` them if needed).
    pub fn set_upstream(&self, upstream: Upstream) {
        *self.state.upstream.lock().unwrap() = upstream;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// When each connection so far was accepted, in order.
    pub fn accept_times(&self) -> Vec<std::time::Instant> {
        self.state.accept_times.lock().unwrap().clone()
    }

    /// Connections open now (blackholed ones included).
    pub fn open(&self) -> usize {
        let mut n = 0;
        self.state.each(|_| n += 1);
        n
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

/// Waits until the connection is cut (or the proxy dropped).
async fn until_cut(mode: &mut watch::Receiver<ConnMode>) {
    while *mode.borrow_and_update() != ConnMode::Cut {
        if mode.changed().await.is_err() {
            return;
        }
    }
}

async fn pipe(client: TcpStream, upstream: Upstream, conn: Arc<Conn>, st: Arc<ProxyState>) {
    let mut mode = conn.mode.subscribe();
    let to = match upstream {
        Upstream::Forward(to) => to,
        Upstream::Refuse => {
            abort_on_drop(&client);
            return;
        }
        Upstream::Blackhole => {
            until_cut(&mut mode).await;
            abort_on_drop(&client);
            return;
        }
    };
    let server = tokio::select! {
        s = TcpStream::connect(to) => s,
        _ = until_cut(&mut mode) => {
            abort_on_drop(&client);
            return;
        }
    };
    let Ok(server) = server else {
        abort_on_drop(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let (up, down) = tokio::join!(
        pump(&mut cr, &mut sw, &conn, &st),
        pump(&mut sr, &mut cw, &conn, &st)
    );
    let client = cr.unsplit(cw);
    let server = sr.unsplit(sw);
    if !(up && down) {
        abort_on_drop(&client);
        abort_on_drop(&server);
    }
}

/// Copies one direction through a delay line, obeying the connection's mode. Returns true on
/// a clean end of stream (passed on as a FIN), false when the connection must be reset.
async fn pump<R, W>(r: &mut R, w: &mut W, conn: &Conn, st: &ProxyState) -> bool
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut mode = conn.mode.subscribe();
    let mut queue: std::collections::VecDeque<(tokio::time::Instant, Vec<u8>)> =
        std::collections::VecDeque::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut eof = false;
    loop {
        let now = *mode.borrow_and_update();
        match now {
            ConnMode::Cut => return false,
            ConnMode::Blackhole => {
                if mode.changed().await.is_err() {
                    return false;
                }
                continue;
            }
            ConnMode::Forward | ConnMode::CutAfter => {}
        }
        if eof && queue.is_empty() {
            let _ = w.shutdown().await;
            return true;
        }
        let due = queue.front().map(|(t, _)| *t);
        tokio::select! {
            biased;
            changed = mode.changed() => {
                if changed.is_err() {
                    return false;
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                let Some((_, chunk)) = queue.pop_front() else { continue };
                let n = if now == ConnMode::CutAfter { conn.take(chunk.len()) } else { chunk.len() };
                if w.write_all(&chunk[..n]).await.is_err() || w.flush().await.is_err() {
                    conn.mode.send_replace(ConnMode::Cut);
                    return false;
                }
                if n < chunk.len() {
                    return false;
                }
            }
            read = r.read(&mut buf), if !eof && queue.len() < 64 => match read {
                Ok(0) => eof = true,
                Ok(n) => {
                    let latency = Duration::from_micros(st.latency_us.load(Ordering::Relaxed));
                    queue.push_back((tokio::time::Instant::now() + latency, buf[..n].to_vec()));
                }
                Err(_) => {
                    conn.mode.send_replace(ConnMode::Cut);
                    return false;
                }
            },
        }
    }
}

/// Writes `text` to `<target tmp>/<dir>/<name>` and returns the path (config files for tests
/// that run the binary).
pub fn write_file(dir: &str, name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the `viewcar` binary with `args` (logs at warn) and returns what it printed and its
/// exit status.
pub fn run_viewcar(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_viewcar"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run viewcar")
}

// ----- the binary as a child process -----

/// A `viewcar` command with no `VIEWCAR_*` setting inherited from the test's environment.
pub fn viewcar() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_viewcar"));
    for (k, _) in std::env::vars() {
        if k.starts_with("VIEWCAR_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// A child process killed (SIGKILL) and reaped when dropped, for children whose output the
/// test reads itself.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process killed (SIGKILL) if the test ends before it exited.
pub struct Running {
    child: Option<Child>,
    pub pid: u32,
}

impl Running {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig} {}", self.pid);
    }

    /// Kills the process with SIGKILL (`Child::kill`): it gets no chance to flush, sync or close
    /// anything, as in a crash or an OOM kill. Returns once it is reaped.
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("killed once");
        child.kill().expect("SIGKILL viewcar");
        child.wait().expect("reap viewcar")
    }

    /// Waits for the exit, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("waited once");
        let waiting = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        });
        match tokio::time::timeout(limit, waiting).await {
            Ok(Ok((_, status))) => status.expect("wait for viewcar"),
            _ => panic!("viewcar did not exit within {limit:?}"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `cmd` with its stderr (the JSON log) sent line by line to the returned receiver.
pub fn spawn(mut cmd: Command) -> (Running, mpsc::UnboundedReceiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn viewcar");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let pid = child.id();
    (
        Running {
            child: Some(child),
            pid,
        },
        rx,
    )
}

/// The next JSON log line whose message is `message`; panics at the end of the log.
pub async fn log_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    message: &str,
) -> serde_json::Value {
    loop {
        let line = lines
            .recv()
            .await
            .unwrap_or_else(|| panic!("log ended before {message:?}"));
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == message {
            return v;
        }
    }
}

pub fn addr(v: &serde_json::Value, field: &str) -> SocketAddr {
    v["fields"][field]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address {field} in {v}"))
}

/// A test needs an outside program that is not installed: a skip on a developer's machine
/// (`skipped: X not found`, on stderr so that it shows), a failure under CI (`CI` set), where
/// `.ci/run` installs it and a skip would hide a test that never ran.
pub fn missing(program: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !ci,
        "{program} not found, and CI is set: .ci/run installs it, so the test must run"
    );
    eprintln!("skipped: {program} not found");
}

/// The Python that has grpcio and grpcio-tools (`VIEWCAR_TEST_PYTHON`, as .ci/run sets, else
/// `python3`), or `None` after saying it is missing (which fails under CI).
pub fn python_with_grpcio() -> Option<String> {
    let python = std::env::var("VIEWCAR_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let has_grpc = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_grpc {
        missing("Python with grpcio and grpcio-tools (pip install grpcio grpcio-tools)");
        return None;
    }
    Some(python)
}

/// Whether `program` runs (`program --version`).
pub fn installed(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Reads `stream` past its messages to the status it ends with (a stream that ends cleanly
/// fails the test).
pub async fn ending_status<T>(stream: &mut tonic::Streaming<T>) -> Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => return status,
        }
    }
}
