//! `viewcar bench fleet`: many leaf sidecars on one origin, directly or through one relay.
//!
//! The origin (`viewcar origin`) and the relay (`viewcar sidecar` with `[listen] feed`) run as
//! child processes, so that each one's CPU time is its own (utime + stime from /proc, at the
//! kernel's 100 ticks per second). Leaves are lightweight feed clients in the harness: one Sync
//! stream each, a hundred streams per HTTP/2 connection (`--fleet-streams-per-connection`),
//! spoken with h2 directly by one task per connection, counting the change batches they get
//! and, for a sample of them, the time from publish (a timestamp in the value) to arrival. The
//! harness's own CPU is reported beside the relay's: they share the machine's cores.
//!
//! Figures: origin CPU per second, direct vs through the relay; relay CPU per second and
//! change deliveries per relay CPU-second; publish -> leaf p50/p99; a snapshot storm (every
//! leaf subscribing at once to a relay holding many keys: time until all synced, relay RSS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use super::procs::{cpu_secs, free_port, rss_of, spawn, temp_dir, Proc};
use super::report::{us, Table};
use super::{BenchError, Ctx};
use crate::origin::GRPC_HEADER;
use crate::pb::feed::v1 as pb;

/// Leaves whose latency is recorded (at most): the histogram is shared, so it is sampled.
const LATENCY_LEAVES: usize = 200;
/// Streams per HTTP/2 connection of the simulated leaves, unless `--fleet-streams-per-connection`
/// says otherwise.
pub(crate) const STREAMS_PER_CONNECTION: usize = 100;
/// The most streams per connection `--fleet-streams-per-connection` takes (a relay's default
/// `max_concurrent_streams` is well above).
const MAX_STREAMS_PER_CONNECTION: usize = 1000;

/// A child process serving Feed on `addr`.
struct Served {
    proc: Proc,
    addr: SocketAddr,
}

async fn wait_connectable(p: &mut Served, timeout: Duration) -> Result<Channel, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = p.proc.exited() {
            return Err(BenchError::setup(format!(
                "child exited ({status}): {}",
                p.proc.log_tail()
            )));
        }
        match Endpoint::from_shared(format!("http://{}", p.addr))
            .map_err(|e| BenchError::setup(e.to_string()))?
            .connect()
            .await
        {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(BenchError::setup(format!("unreachable: {e}"))),
        }
    }
}

async fn start_origin(exe: &Path, dir: &Path) -> Result<(Served, Channel), BenchError> {
    let port = free_port()?;
    let config = dir.join("origin.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntopics = [\"t\"]\nmax_streams = 20000\n\
             stream_queue = 65536\nretain_batches = 1000000\nretain_bytes = \"512MiB\"\n"
        ),
    )?;
    let args = vec![
        "origin".to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    let (proc, _) = spawn(exe, &args, &dir.join("origin.log"), false)?;
    let mut served = Served {
        proc,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let channel = wait_connectable(&mut served, Duration::from_secs(20)).await?;
    Ok((served, channel))
}

async fn start_relay(exe: &Path, dir: &Path, origin: SocketAddr) -> Result<Served, BenchError> {
    let (grpc, feed) = (free_port()?, free_port()?);
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ngrpc = \"127.0.0.1:{grpc}\"\nhttp = \"127.0.0.1:0\"\nfeed = \"127.0.0.1:{feed}\"\n\
             [limits]\nwriter_queue = 65536\n\
             [relay]\nmax_streams = 20000\nstream_queue = 65536\n\
             [[origin]]\nname = \"o\"\naddress = \"http://{origin}\"\ntopics = [\"t\"]\n"
        ),
    )?;
    let args = vec![
        "sidecar".to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    let (proc, _) = spawn(exe, &args, &dir.join("relay.log"), false)?;
    let mut served = Served {
        proc,
        addr: SocketAddr::from(([127, 0, 0, 1], feed)),
    };
    wait_connectable(&mut served, Duration::from_secs(20)).await?;
    Ok(served)
}

/// What the simulated leaves share.
struct Fleet {
    /// Leaves that have their snapshot.
    synced: AtomicU64,
    /// Change batches received, all leaves together.
    deliveries: AtomicU64,
    /// Publish -> arrival, microseconds, from a sample of the leaves.
    latency: Mutex<Histogram<u64>>,
    /// Leaves whose stream failed or ended, and why the first one did.
    ended: AtomicU64,
    /// Connections dialled again because they ended before any of their streams synced.
    redials: AtomicU64,
    first_end: Mutex<Option<String>>,
}

impl Fleet {
    fn new() -> Result<Arc<Fleet>, BenchError> {
        Ok(Arc::new(Fleet {
            synced: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| BenchError::setup(e.to_string()))?,
            ),
            ended: AtomicU64::new(0),
            redials: AtomicU64::new(0),
            first_end: Mutex::new(None),
        }))
    }

    /// `n` leaves' streams failed or ended (before their row aborted them), for `why`.
    fn ended(&self, n: usize, why: impl FnOnce() -> String) {
        self.ended.fetch_add(n as u64, Ordering::Relaxed);
        if let Ok(mut first) = self.first_end.lock() {
            first.get_or_insert_with(why);
        }
    }
}

/// Microseconds on the harness clock the published timestamps are taken on: one for the
/// whole run, so that a change published in an earlier row and delivered late in this one (a
/// relay still behind after a saturated row) counts with its real latency. With a clock per
/// row its timestamp read as in the future, and counted as 1 µs.
fn now_us() -> u64 {
    static CLOCK: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    CLOCK.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// What a leaf needs of a Sync message: whether it ends a snapshot, whether it is a change
/// batch (and, for a timed leaf, the publish timestamp in its first value).
#[derive(Debug, PartialEq)]
enum Seen {
    Synced,
    Batch(Option<u64>),
    Other,
}

/// One protobuf field's value, as far as [`Seen`] needs it.
enum Val<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

/// Calls `f` with each field of the message `b` until it returns false; `None` if malformed.
fn each_field<'a>(mut b: &'a [u8], mut f: impl FnMut(u32, Val<'a>) -> bool) -> Option<()> {
    use prost::encoding::decode_varint;
    while !b.is_empty() {
        let key = decode_varint(&mut b).ok()?;
        let val = match key & 7 {
            0 => Val::Varint(decode_varint(&mut b).ok()?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                b = b.get(n..)?;
                Val::Fixed
            }
            2 => {
                let n = usize::try_from(decode_varint(&mut b).ok()?).ok()?;
                let (payload, rest) = (b.get(..n)?, b.get(n..)?);
                b = rest;
                Val::Len(payload)
            }
            _ => return None,
        };
        if !f((key >> 3) as u32, val) {
            break;
        }
    }
    Some(())
}

/// The first field numbered `num` of the message `b`.
fn find(b: &[u8], num: u32) -> Option<Val<'_>> {
    let mut found = None;
    each_field(b, |n, v| {
        if n == num {
            found = Some(v);
        }
        found.is_none()
    });
    found
}

/// Reads a `SyncResponse` only as far as a leaf needs (no allocation): at 5,000 streams,
/// decoding every batch whole was 43% of the harness's CPU, on the cores the relay under
/// test runs on. Field numbers: SyncResponse.snapshot = 1, .changes = 2; SnapshotChunk.last
/// = 4; ChangeBatch.changes = 5; Change.value = 2.
fn seen(msg: &[u8], timed: bool) -> Seen {
    match (find(msg, 1), find(msg, 2)) {
        (Some(Val::Len(chunk)), _) => match find(chunk, 4) {
            Some(Val::Varint(last)) if last != 0 => Seen::Synced,
            _ => Seen::Other,
        },
        (_, Some(Val::Len(batch))) if timed => {
            let value = match find(batch, 5) {
                Some(Val::Len(change)) => match find(change, 2) {
                    Some(Val::Len(v)) => v,
                    _ => &[],
                },
                _ => &[],
            };
            Seen::Batch(
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.parse::<u64>().ok()),
            )
        }
        (_, Some(Val::Len(_))) => Seen::Batch(None),
        _ => Seen::Other,
    }
}

/// Counts what one leaf saw.
fn count(fleet: &Fleet, seen: Seen) {
    match seen {
        Seen::Synced => {
            fleet.synced.fetch_add(1, Ordering::Relaxed);
        }
        Seen::Batch(sent) => {
            fleet.deliveries.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = sent {
                let at = now_us();
                if let Ok(mut h) = fleet.latency.lock() {
                    let _ = h.record(at.saturating_sub(sent).max(1));
                }
            }
        }
        Seen::Other => {}
    }
}

/// Splits a stream of DATA chunks into gRPC messages, whatever the chunks' boundaries: each
/// complete message goes to `each`, the rest waits for the next chunk.
#[derive(Default)]
struct Messages {
    partial: bytes::BytesMut,
}

impl Messages {
    fn push(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8])) {
        // Whole messages straight from the chunk while nothing is pending (the common case:
        // no copy).
        let mut rest = chunk;
        if self.partial.is_empty() {
            while let Some(len) = Self::whole(rest) {
                each(&rest[GRPC_HEADER..len]);
                rest = &rest[len..];
            }
            self.partial.extend_from_slice(rest);
            return;
        }
        self.partial.extend_from_slice(rest);
        while let Some(len) = Self::whole(&self.partial) {
            let msg = self.partial.split_to(len);
            each(&msg[GRPC_HEADER..]);
        }
    }

    /// The length, prefix included, of the message at the start of `b` if it is all there.
    fn whole(b: &[u8]) -> Option<usize> {
        let len = u32::from_be_bytes(b.get(1..GRPC_HEADER)?.try_into().ok()?) as usize;
        let total = GRPC_HEADER.checked_add(len)?;
        (b.len() >= total).then_some(total)
    }
}

/// The leaves' Subscribe, as a gRPC message on the wire.
fn subscribe_frame() -> Bytes {
    crate::origin::framed(&pb::SyncRequest {
        kind: Some(pb::sync_request::Kind::Subscribe(pb::Subscribe {
            topic: "t".to_string(),
            keys: Vec::new(),
            resume: None,
        })),
    })
}

/// One leaf: a Sync stream on the connection of `client`, subscribed to the whole topic from
/// scratch, its request half left open (closing it would end the stream).
async fn leaf(
    client: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    fleet: Arc<Fleet>,
    timed: bool,
    synced_here: Arc<AtomicU64>,
) {
    let req = match tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/viewcar.feed.v1.Feed/Sync"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
    {
        Ok(req) => req,
        Err(e) => return fleet.ended(1, || format!("a Sync request: {e}")),
    };
    let opened = async {
        let mut ready = client.ready().await?;
        let (resp, mut requests) = ready.send_request(req, false)?;
        requests.send_data(subscribe_frame(), false)?;
        Ok::<_, h2::Error>((resp.await?, requests))
    };
    let (resp, requests) = match opened.await {
        Ok(opened) => opened,
        Err(e) => return fleet.ended(1, || format!("opening a Sync stream: {e}")),
    };
    let mut body = resp.into_body();
    let mut messages = Messages::default();
    let ended = loop {
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                messages.push(&chunk, |msg| {
                    let seen = seen(msg, timed);
                    if seen == Seen::Synced {
                        synced_here.fetch_add(1, Ordering::Relaxed);
                    }
                    count(&fleet, seen)
                });
            }
            Some(Err(e)) => break format!("the Sync stream failed: {e}"),
            None => {
                let status = match body.trailers().await {
                    Ok(Some(t)) => format!(
                        "grpc-status {} {}",
                        t.get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-"),
                        t.get("grpc-message")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                    ),
                    Ok(None) => "no trailers".to_string(),
                    Err(e) => e.to_string(),
                };
                break format!("the Sync stream ended: {status}");
            }
        }
    };
    drop(requests);
    fleet.ended(1, || ended);
}

/// One HTTP/2 connection of leaves: its streams are polled by this one task, as a leaf
/// process would (the harness shares the relay's cores, so the leaves cost as little as they
/// can: a task per stream and tonic's layers were ~1.8 µs per delivery at 5,000 streams).
async fn leaf_connection(
    addr: SocketAddr,
    first: usize,
    n: usize,
    every: usize,
    fleet: Arc<Fleet>,
) {
    // As a sidecar does, a connection that ends before any of its streams synced is dialled
    // again (a listener whose accept queue overflowed in a burst of connections resets some).
    let mut backoff = Duration::from_millis(50);
    loop {
        let synced_here = Arc::new(AtomicU64::new(0));
        let why = leaf_connection_once(addr, first, n, every, &fleet, &synced_here).await;
        let Some(why) = why else { return };
        if synced_here.load(Ordering::Relaxed) > 0 {
            return fleet.ended(0, || why);
        }
        fleet.redials.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One connection of `n` leaves, until it ends: `Some(why)` if it failed or was closed, `None`
/// if every stream on it ended first.
async fn leaf_connection_once(
    addr: SocketAddr,
    first: usize,
    n: usize,
    every: usize,
    fleet: &Arc<Fleet>,
    synced_here: &Arc<AtomicU64>,
) -> Option<String> {
    use futures_util::StreamExt;
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(tcp) => tcp,
        Err(e) => return Some(format!("connecting to {addr}: {e}")),
    };
    let _ = tcp.set_nodelay(true);
    let (client, conn) = match h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
    {
        Ok(handshaken) => handshaken,
        Err(e) => return Some(format!("HTTP/2 handshake with {addr}: {e}")),
    };
    let leaves: futures_util::stream::FuturesUnordered<_> = (first..first + n)
        .map(|i| {
            let timed = i % every == 0;
            leaf(
                client.clone(),
                addr,
                fleet.clone(),
                timed,
                synced_here.clone(),
            )
        })
        .collect();
    drop(client);
    let all = leaves.for_each(|()| async {});
    tokio::select! {
        ended = conn => {
            let why = ended.err().map_or("closed".to_string(), |e| e.to_string());
            Some(format!("the connection to {addr} ended: {why}"))
        }
        () = all => None,
    }
}

fn start_leaves(
    addr: SocketAddr,
    n: usize,
    per_connection: usize,
    fleet: &Arc<Fleet>,
) -> Result<Vec<JoinHandle<()>>, BenchError> {
    let every = (n / LATENCY_LEAVES).max(1);
    let per_connection = per_connection.max(1);
    Ok((0..n)
        .step_by(per_connection)
        .map(|first| {
            let streams = per_connection.min(n - first);
            tokio::spawn(leaf_connection(addr, first, streams, every, fleet.clone()))
        })
        .collect())
}

async fn wait_synced(fleet: &Fleet, n: usize, timeout: Duration) -> Result<Duration, BenchError> {
    let start = Instant::now();
    while (fleet.synced.load(Ordering::Relaxed) as usize) < n {
        if start.elapsed() > timeout {
            let ended = fleet.ended.load(Ordering::Relaxed);
            let why = fleet
                .first_end
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .map_or(String::new(), |w| format!(" (the first: {w})"));
            return Err(BenchError::setup(format!(
                "only {} of {n} leaves synced within {timeout:?}; {ended} streams failed or \
                 ended, {} connections dialled again{why}",
                fleet.synced.load(Ordering::Relaxed),
                fleet.redials.load(Ordering::Relaxed)
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

/// Publishes in flight at most: a slow origin then shows as fewer changes/s, not as a
/// publisher that waits for each reply before the next.
const PUBLISHES_IN_FLIGHT: usize = 64;

/// Publishes one change per Publish at `rate` per second for `dur`, the value carrying the
/// publish time; returns how many were published.
async fn publish_for(origin: &Channel, rate: u32, dur: Duration) -> Result<u64, BenchError> {
    let client = pb::feed_client::FeedClient::new(origin.clone());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISHES_IN_FLIGHT));
    let failed = Arc::new(Mutex::new(None::<String>));
    // Ticks of 10 ms (tokio's timer granularity is 1 ms): rate/100 publishes per tick.
    let per_tick = (rate as f64 / 100.0).max(0.0);
    let mut owed = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| BenchError::setup(e.to_string()))?;
            let value = format!("{},{:0>64}", now_us(), n);
            let req = pb::PublishRequest {
                topic: "t".to_string(),
                changes: vec![pb::Change {
                    key: format!("k{}", n % 1000),
                    value: Bytes::from(value),
                    deleted: false,
                }],
            };
            let (mut client, failed) = (client.clone(), failed.clone());
            tokio::spawn(async move {
                if let Err(e) = client.publish(req).await {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert_with(|| e.to_string());
                    }
                }
                drop(permit);
            });
            n += 1;
        }
    }
    // Every publish answered before the window closes.
    let _ = in_flight.acquire_many(PUBLISHES_IN_FLIGHT as u32).await;
    if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
        return Err(BenchError::setup(format!("publish: {e}")));
    }
    Ok(n)
}

struct Run {
    mode: &'static str,
    streams: usize,
    rate: u32,
    secs: f64,
    published: u64,
    deliveries: u64,
    origin_cpu: f64,
    relay_cpu: f64,
    /// The harness's own (the leaves and the publisher): the cores are shared.
    harness_cpu: f64,
    /// Leaf connections dialled again before their streams synced.
    redials: u64,
    p50_us: f64,
    p99_us: f64,
}

async fn one_run(
    ctx: &Ctx,
    origin: &mut (Served, Channel),
    relay: Option<&Served>,
    streams: usize,
    rate: u32,
) -> Result<Run, BenchError> {
    let fleet = Fleet::new()?;
    let addr = relay.map_or(origin.0.addr, |r| r.addr);
    let tasks = start_leaves(addr, streams, ctx.args.fleet_streams_per_connection, &fleet)?;
    wait_synced(&fleet, streams, Duration::from_secs(120)).await?;
    // Warm-up at the run's rate, then the measured window.
    publish_for(&origin.1, rate, ctx.warmup()).await?;
    if let Ok(mut h) = fleet.latency.lock() {
        h.reset();
    }
    let d0 = fleet.deliveries.load(Ordering::Relaxed);
    let (o0, r0, h0) = (
        cpu_secs(origin.0.proc.pid()),
        relay.map_or(0.0, |r| cpu_secs(r.proc.pid())),
        cpu_secs(std::process::id()),
    );
    let start = Instant::now();
    let published = publish_for(&origin.1, rate, ctx.run_for(Duration::from_secs(5))).await?;
    let secs = start.elapsed().as_secs_f64();
    let (o1, r1, h1) = (
        cpu_secs(origin.0.proc.pid()),
        relay.map_or(0.0, |r| cpu_secs(r.proc.pid())),
        cpu_secs(std::process::id()),
    );
    let deliveries = fleet.deliveries.load(Ordering::Relaxed) - d0;
    for t in &tasks {
        t.abort();
    }
    let (p50_us, p99_us) = match fleet.latency.lock() {
        Ok(h) if !h.is_empty() => (
            h.value_at_quantile(0.5) as f64,
            h.value_at_quantile(0.99) as f64,
        ),
        _ => (0.0, 0.0),
    };
    Ok(Run {
        mode: if relay.is_some() { "relay" } else { "direct" },
        streams,
        rate,
        secs,
        published,
        deliveries,
        origin_cpu: (o1 - o0) / secs,
        relay_cpu: (r1 - r0) / secs,
        harness_cpu: (h1 - h0) / secs,
        redials: fleet.redials.load(Ordering::Relaxed),
        p50_us,
        p99_us,
    })
}

/// Every leaf subscribing at once to a relay that holds `keys` keys: time until all synced,
/// and the relay's RSS before and at its peak (sampled every 20 ms).
async fn storm(
    relay: &Served,
    leaves: usize,
    per_connection: usize,
) -> Result<(Duration, u64, u64), BenchError> {
    let fleet = Fleet::new()?;
    let pid = relay.proc.pid();
    let before = rss_of(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let tasks = start_leaves(relay.addr, leaves, per_connection, &fleet)?;
    let took = wait_synced(&fleet, leaves, Duration::from_secs(300)).await;
    sampler.abort();
    for t in &tasks {
        t.abort();
    }
    Ok((took?, before, peak.load(Ordering::Relaxed)))
}

/// Waits until a leaf subscribing at `relay` gets a snapshot of at least `keys` keys.
async fn wait_relay_holds(relay: &Served, keys: usize) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = Endpoint::from_shared(format!("http://{}", relay.addr))
        .map_err(|e| BenchError::setup(e.to_string()))?
        .connect_lazy();
    let mut client = pb::feed_client::FeedClient::new(channel).max_decoding_message_size(64 << 20);
    loop {
        let got = client
            .fetch(pb::FetchRequest {
                topic: "t".to_string(),
                keys: vec![format!("s{:08}", keys.saturating_sub(1))],
            })
            .await;
        if got.is_ok_and(|r| !r.into_inner().entries.is_empty()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::setup("the storm's relay never held the topic"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let (streams, rates, storm_keys, storm_leaves): (Vec<usize>, Vec<u32>, usize, Vec<usize>) =
        if ctx.args.smoke {
            (vec![20], vec![50], 500, vec![20])
        } else if ctx.args.quick {
            (vec![100, 1000], vec![100], 2000, vec![100, 500])
        } else {
            (
                vec![100, 1000, 5000],
                vec![100, 1000],
                10_000,
                vec![100, 1000],
            )
        };
    // Chosen rows, for a comparison or a profile of one of them.
    let streams = if ctx.args.fleet_streams.is_empty() {
        streams
    } else {
        ctx.args.fleet_streams.clone()
    };
    let rates = if ctx.args.fleet_rates.is_empty() {
        rates
    } else {
        ctx.args.fleet_rates.clone()
    };
    if let Some(bad) = streams.iter().find(|&&n| n == 0 || n > 100_000) {
        return Err(BenchError::setup(format!(
            "--fleet-streams {bad}: each must be 1 to 100000"
        )));
    }
    if let Some(bad) = rates.iter().find(|&&r| r == 0 || r > 1_000_000) {
        return Err(BenchError::setup(format!(
            "--fleet-rates {bad}: each must be 1 to 1000000"
        )));
    }
    let per_connection = ctx.args.fleet_streams_per_connection;
    if per_connection == 0 || per_connection > MAX_STREAMS_PER_CONNECTION {
        return Err(BenchError::setup(format!(
            "--fleet-streams-per-connection {per_connection}: must be 1 to {MAX_STREAMS_PER_CONNECTION}"
        )));
    }
    let dir = temp_dir("fleet")?;
    let mut origin = start_origin(&ctx.exe, &dir).await?;
    let mut relay = start_relay(&ctx.exe, &dir, origin.0.addr).await?;
    let mut table = Table::new(
        "fleet: leaves on one origin, direct vs through one relay (origin, relay: child processes; leaves: Sync streams in the harness)",
        &[
            "mode", "streams", "changes/s", "origin cpu/s", "relay cpu/s", "deliveries/s",
            "deliv/relay cpu-s", "harness cpu/s", "p50", "p99",
        ],
    );
    for &rate in &rates {
        for &n in &streams {
            for via_relay in [false, true] {
                ctx.progress(format!(
                    "fleet: {n} streams at {rate}/s {}",
                    if via_relay {
                        "through the relay"
                    } else {
                        "direct"
                    }
                ));
                let r = one_run(ctx, &mut origin, via_relay.then_some(&relay), n, rate).await?;
                if r.redials > 0 {
                    ctx.progress(format!(
                        "fleet: {} leaf connections were dialled again before they synced",
                        r.redials
                    ));
                }
                let per_relay_cpu = if r.relay_cpu > 0.0 {
                    r.deliveries as f64 / r.secs / r.relay_cpu
                } else {
                    0.0
                };
                table.row(vec![
                    r.mode.to_string(),
                    r.streams.to_string(),
                    format!("{:.0}", r.published as f64 / r.secs),
                    format!("{:.3}", r.origin_cpu),
                    if via_relay {
                        format!("{:.3}", r.relay_cpu)
                    } else {
                        "-".into()
                    },
                    format!("{:.0}", r.deliveries as f64 / r.secs),
                    if via_relay {
                        format!("{per_relay_cpu:.0}")
                    } else {
                        "-".into()
                    },
                    format!("{:.3}", r.harness_cpu),
                    us(r.p50_us),
                    us(r.p99_us),
                ]);
                ctx.report.push(
                    "fleet",
                    "runs",
                    json!({
                        "mode": r.mode,
                        "streams": r.streams,
                        "rate": r.rate,
                        "published_per_s": r.published as f64 / r.secs,
                        "origin_cpu_per_s": r.origin_cpu,
                        "relay_cpu_per_s": r.relay_cpu,
                        "deliveries_per_s": r.deliveries as f64 / r.secs,
                        "deliveries_per_relay_cpu_s": per_relay_cpu,
                        "harness_cpu_per_s": r.harness_cpu,
                        "leaf_redials": r.redials,
                        "p50_us": r.p50_us,
                        "p99_us": r.p99_us,
                    }),
                );
            }
        }
    }
    ctx.report.add_table(table);

    // The storm: the origin's topic filled to `storm_keys` keys (100-byte values), the relay
    // synced, then every leaf subscribing at once.
    let mut client = pb::feed_client::FeedClient::new(origin.1.clone());
    for chunk in (0..storm_keys).collect::<Vec<_>>().chunks(5000) {
        client
            .publish(pb::PublishRequest {
                topic: "t".to_string(),
                changes: chunk
                    .iter()
                    .map(|i| pb::Change {
                        key: format!("s{i:08}"),
                        value: Bytes::from(vec![b'x'; 100]),
                        deleted: false,
                    })
                    .collect(),
            })
            .await
            .map_err(|e| BenchError::setup(format!("loading the storm topic: {e}")))?;
    }
    // A fresh relay for the storm: the runs above leave the first one's allocator holding
    // what its queues and transport buffers took at 5,000 streams.
    drop(relay);
    relay = start_relay(&ctx.exe, &dir, origin.0.addr).await?;
    wait_relay_holds(&relay, storm_keys).await?;
    let mut storm_table = Table::new(
        format!("fleet: snapshot storm, every leaf subscribing at once to a relay holding {storm_keys}+ keys"),
        &["leaves", "all synced", "relay rss before", "relay rss peak"],
    );
    for &n in &storm_leaves {
        ctx.progress(format!("fleet: storm of {n} leaves"));
        let (took, before, peak) = storm(&relay, n, ctx.args.fleet_streams_per_connection).await?;
        storm_table.row(vec![
            n.to_string(),
            format!("{:.2}s", took.as_secs_f64()),
            format!("{:.1}MiB", before as f64 / (1 << 20) as f64),
            format!("{:.1}MiB", peak as f64 / (1 << 20) as f64),
        ]);
        ctx.report.push(
            "fleet",
            "storm",
            json!({
                "leaves": n,
                "keys": storm_keys,
                "all_synced_s": took.as_secs_f64(),
                "relay_rss_before": before,
                "relay_rss_peak": peak,
            }),
        );
    }
    ctx.report.add_table(storm_table);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (any::<u64>(), "[0-9a-z]{0,8}")
                .prop_map(|(t, rest)| format!("{t},{rest}").into_bytes()),
            prop::collection::vec(any::<u8>(), 0..20),
        ]
    }

    fn response() -> impl Strategy<Value = pb::SyncResponse> {
        use pb::sync_response::Kind;
        let entry =
            ("[a-z]{0,6}", value(), any::<u64>()).prop_map(|(key, value, version)| pb::Entry {
                key,
                value: value.into(),
                version,
            });
        let change =
            ("[a-z]{0,6}", value(), any::<bool>()).prop_map(|(key, value, deleted)| pb::Change {
                key,
                value: value.into(),
                deleted,
            });
        prop_oneof![
            (
                prop::collection::vec(entry, 0..4),
                any::<bool>(),
                any::<u64>()
            )
                .prop_map(|(entries, last, total_entries)| Kind::Snapshot(
                    pb::SnapshotChunk {
                        topic: "t".into(),
                        position: Some(pb::Position {
                            epoch: "e".into(),
                            version: 7,
                        }),
                        entries,
                        last,
                        total_entries,
                    }
                )),
            (prop::collection::vec(change, 0..4), any::<u64>()).prop_map(|(changes, version)| {
                Kind::Changes(pb::ChangeBatch {
                    topic: "t".into(),
                    epoch: "e".into(),
                    prev_version: version / 2,
                    version,
                    changes,
                    group: None,
                })
            }),
            any::<u64>().prop_map(|version| Kind::Progress(pb::Progress {
                topic: "t".into(),
                position: Some(pb::Position {
                    epoch: "e".into(),
                    version,
                }),
                ..Default::default()
            })),
        ]
        .prop_map(|kind| pb::SyncResponse { kind: Some(kind) })
    }

    proptest! {
        /// Oracle: prost's whole decode, read the way the leaf used to read it.
        #[test]
        fn a_leaf_reads_what_prost_decodes(msg in response(), timed in any::<bool>()) {
            use pb::sync_response::Kind;
            let want = match &msg.kind {
                Some(Kind::Snapshot(c)) if c.last => Seen::Synced,
                Some(Kind::Changes(b)) => Seen::Batch(if timed {
                    b.changes
                        .first()
                        .and_then(|c| std::str::from_utf8(&c.value).ok())
                        .and_then(|v| v.split(',').next())
                        .and_then(|v| v.parse::<u64>().ok())
                } else {
                    None
                }),
                _ => Seen::Other,
            };
            prop_assert_eq!(seen(&msg.encode_to_vec(), timed), want);
        }

        /// Oracle: the messages framed. However the framed bytes are cut into chunks, the
        /// splitter hands back exactly those messages, in order, and holds nothing after the
        /// last.
        #[test]
        fn messages_come_whole_whatever_the_chunks(
            msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let mut wire = Vec::new();
            for m in &msgs {
                wire.push(0u8);
                wire.extend_from_slice(&(m.len() as u32).to_be_bytes());
                wire.extend_from_slice(m);
            }
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            at.push(0);
            at.push(wire.len());
            at.sort_unstable();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut split = Messages::default();
            for w in at.windows(2) {
                split.push(&wire[w[0]..w[1]], |m| got.push(m.to_vec()));
            }
            prop_assert_eq!(got, msgs);
            prop_assert!(split.partial.is_empty());
        }
    }

    /// The Subscribe the leaves send is one whole gRPC message that prost reads back.
    #[test]
    fn the_subscribe_frame_is_one_message() {
        let frame = subscribe_frame();
        let mut got = Vec::new();
        Messages::default().push(&frame, |m| got.push(pb::SyncRequest::decode(m).unwrap()));
        assert_eq!(got.len(), 1);
        match &got[0].kind {
            Some(pb::sync_request::Kind::Subscribe(s)) => assert_eq!(s.topic, "t"),
            other => panic!("not a Subscribe: {other:?}"),
        }
    }
}
