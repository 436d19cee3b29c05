//! The WebSocket subscribers of the `push` scenario, in a process of their own
//! (`viewcar bench push-clients`, hidden): outside both the sidecar and the harness, so the
//! sidecar's CPU time is its own and theirs can be read apart.
//!
//! Connection `i` of `--push-subscribers` subscribes to the `--push-fanout` keys that follow
//! `key(i)` (there are as many keys as subscribers, taken in a ring), so every key has that
//! many subscribers. Each change's value carries its publish time (`{"t":<ns>,...}`, on
//! [`wall_ns`]); a connection counts every change it receives inside the measured window and
//! records receive time - publish time in its HDR histogram.
//!
//! With the harness, one line at a time:
//! - stdout `ready <connections>` once every subscription is acknowledged;
//! - stdin `window <from_ns> <until_ns>`: count and time the changes received in that window;
//! - stdin `report`: stdout one JSON line, a [`Tally`];
//! - stdin EOF (the harness finished or died): the process exits, wherever it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::load;
use super::{BenchArgs, BenchError, PushProtocol};
use crate::pb::cache::v1 as pb;

/// The source every subscriber watches.
pub const SOURCE: &str = "t";

/// The `i`th key of the source.
pub fn key(i: usize) -> String {
    format!("k{i:05}")
}

/// The keys connection `i` of `subscribers` watches.
pub fn keys_of(i: usize, subscribers: usize, fanout: usize) -> Vec<String> {
    (0..fanout).map(|j| key((i + j) % subscribers)).collect()
}

/// Nanoseconds since the UNIX epoch, on CLOCK_REALTIME.
///
/// The publish time is read in the harness and the receive time here, in another process, so
/// both need a clock whose readings mean the same in every process. `Instant` is
/// CLOCK_MONOTONIC on Linux, which is system-wide too, but it cannot be turned into a number
/// without `clock_gettime` (unsafe code, which this crate forbids). CLOCK_REALTIME is one kernel
/// clock for every process at any instant; NTP slewing moves both ends alike, and only a step of
/// the clock during a run would distort the few samples that span it.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// The publish time in a change frame: `{"type":"change",...,"value":{"t":123,...}}`.
fn stamp(frame: &str) -> Option<u64> {
    const AT: &str = "\"value\":{\"t\":";
    let rest = &frame[frame.find(AT)? + AT.len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok().filter(|t| *t > 0)
}

const CHANGE: &str = "{\"type\":\"change\"";
const RESET: &str = "{\"type\":\"reset\"";
const SUBSCRIBED: &str = "{\"type\":\"subscribed\"";
const ERROR: &str = "{\"type\":\"error\"";

/// What the subscribers saw, as reported to the harness.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tally {
    pub connections: usize,
    /// Change frames received inside the window.
    pub frames: u64,
    /// Change frames received since the subscriptions were made, window or not.
    pub changes_total: u64,
    /// Reset frames (a connection fell behind its queue bound and was resent its rows).
    pub resets: u64,
    /// Connections the sidecar closed (or that failed).
    pub closed: u64,
    /// receive - publish of the window's frames, ns: the histogram's recorded buckets as
    /// (highest value of the bucket, count).
    pub hist: Vec<(u64, u64)>,
}

impl Tally {
    /// The latency histogram, rebuilt from its buckets.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = load::histogram();
        for &(v, n) in &self.hist {
            h.saturating_record_n(v, n);
        }
        h
    }
}

/// The measured window, in [`wall_ns`]; empty until the harness sends one.
struct Window {
    from: AtomicU64,
    until: AtomicU64,
}

impl Window {
    fn contains(&self, t: u64) -> bool {
        self.from.load(Ordering::Relaxed) <= t && t < self.until.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Counts {
    changes: AtomicU64,
    resets: AtomicU64,
    closed: AtomicU64,
}

/// One connection's share of the window: its own lock, taken only by it until the report.
struct Recorded {
    frames: u64,
    hist: Histogram<u64>,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Counts one change received at `now`; inside the window, also its receive - publish time
/// (`stamp`: the publish time it carries).
fn count_change(
    window: &Window,
    counts: &Counts,
    recorded: &Mutex<Recorded>,
    now: u64,
    stamp: impl FnOnce() -> Option<u64>,
) {
    counts.changes.fetch_add(1, Ordering::Relaxed);
    if window.contains(now) {
        let mut r = recorded.lock().unwrap_or_else(|p| p.into_inner());
        r.frames += 1;
        if let Some(t) = stamp() {
            r.hist.saturating_record(now.saturating_sub(t).max(1));
        }
    }
}

/// Opens one connection, subscribes it to `keys`, and waits for the acknowledgement (which
/// comes before any change of the subscription).
async fn subscribe(url: &str, id: usize, keys: Vec<String>) -> Result<Socket, BenchError> {
    // A small read buffer, as the sidecar's own: tungstenite zeroes this much on every read.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map_err(|e| BenchError::setup(format!("connecting to {url}: {e}")))?;
    let sub = json!({"op": "subscribe", "id": id, "source": SOURCE, "keys": keys});
    ws.send(Message::text(sub.to_string()))
        .await
        .map_err(|e| BenchError::setup(format!("subscribe: {e}")))?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| BenchError::setup("no answer to subscribe within 10 s"))?;
        match msg {
            Some(Ok(Message::Text(t))) if t.starts_with(SUBSCRIBED) => return Ok(ws),
            Some(Ok(Message::Text(t))) if t.starts_with(ERROR) => {
                return Err(BenchError::setup(format!("subscribe refused: {t}")))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(BenchError::setup(format!("subscribe: {e}"))),
            None => return Err(BenchError::setup("closed before acknowledging subscribe")),
        }
    }
}

async fn receive(
    mut ws: Socket,
    window: Arc<Window>,
    counts: Arc<Counts>,
    recorded: Arc<Mutex<Recorded>>,
) {
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let now = wall_ns();
        let text = text.as_str();
        if text.starts_with(CHANGE) {
            count_change(&window, &counts, &recorded, now, || stamp(text));
        } else if text.starts_with(RESET) {
            counts.resets.fetch_add(1, Ordering::Relaxed);
        }
    }
    counts.closed.fetch_add(1, Ordering::Relaxed);
}

/// The publish time at the start of a value: `{"t":123,...}` (a Watch event's value).
fn value_stamp(value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(b"{\"t\":")?;
    let end = rest.iter().position(|c| !c.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end])
        .ok()?
        .parse()
        .ok()
        .filter(|t| *t > 0)
}

type Watch = tonic::Streaming<pb::WatchEvent>;

/// Opens one HTTP/2 connection, watches `keys` on it, and waits for `synced` (which comes
/// before any change of the watch).
async fn watch(addr: &str, keys: Vec<String>) -> Result<Watch, BenchError> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| BenchError::setup(format!("{addr}: {e}")))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| BenchError::setup(format!("connecting to {addr}: {e}")))?;
    let mut client = pb::cache_client::CacheClient::new(channel);
    let mut stream = client
        .watch(pb::WatchRequest {
            source: SOURCE.to_string(),
            keys,
            prefix: String::new(),
            send_initial: false,
        })
        .await
        .map_err(|e| BenchError::setup(format!("watch: {e}")))?
        .into_inner();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .map_err(|_| BenchError::setup("no synced within 10 s of a watch"))?;
        match msg {
            Ok(Some(pb::WatchEvent {
                kind: Some(pb::watch_event::Kind::Synced(_)),
            })) => return Ok(stream),
            Ok(Some(_)) => {}
            Ok(None) => return Err(BenchError::setup("watch ended before synced")),
            Err(e) => return Err(BenchError::setup(format!("watch: {e}"))),
        }
    }
}

async fn receive_watch(
    mut stream: Watch,
    window: Arc<Window>,
    counts: Arc<Counts>,
    recorded: Arc<Mutex<Recorded>>,
) {
    use pb::watch_event::Kind;
    while let Ok(Some(ev)) = stream.message().await {
        let now = wall_ns();
        match ev.kind {
            Some(Kind::Upsert(item)) | Some(Kind::Delete(item)) => {
                count_change(&window, &counts, &recorded, now, || {
                    value_stamp(&item.value)
                });
            }
            Some(Kind::Reset(_)) => {
                counts.resets.fetch_add(1, Ordering::Relaxed);
            }
            Some(Kind::Synced(_)) | None => {}
        }
    }
    counts.closed.fetch_add(1, Ordering::Relaxed);
}

/// The harness's commands, read on a thread of its own; EOF on stdin exits the process, so it
/// never outlives the harness, even while connections are still being opened.
fn commands() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    rx
}

/// Runs the subscribers as described by `args` until stdin closes.
pub async fn run(args: &BenchArgs) -> Result<(), BenchError> {
    let target = match args.push_protocol {
        PushProtocol::Ws => args.ws_url.clone(),
        PushProtocol::Watch => args.grpc_addr.clone(),
    }
    .ok_or_else(|| BenchError::setup("--ws-url (ws) or --grpc-addr (watch) is required"))?;
    let subscribers = args.push_subscribers.max(1);
    let fanout = args.push_fanout.clamp(1, subscribers);
    let mut commands = commands();
    let window = Arc::new(Window {
        from: AtomicU64::new(u64::MAX),
        until: AtomicU64::new(0),
    });
    let counts = Arc::new(Counts::default());
    let mut recorded = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let keys = keys_of(i, subscribers, fanout);
        let r = Arc::new(Mutex::new(Recorded {
            frames: 0,
            hist: load::histogram(),
        }));
        let (window, counts, rec) = (window.clone(), counts.clone(), r.clone());
        match args.push_protocol {
            PushProtocol::Ws => {
                let ws = subscribe(&target, i, keys).await?;
                tokio::spawn(receive(ws, window, counts, rec));
            }
            PushProtocol::Watch => {
                let stream = watch(&target, keys).await?;
                tokio::spawn(receive_watch(stream, window, counts, rec));
            }
        }
        recorded.push(r);
    }
    println!("ready {subscribers}");
    while let Some(line) = commands.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["window", from, until] => {
                let parse = |s: &str| {
                    s.parse::<u64>()
                        .map_err(|e| BenchError::setup(format!("window {s:?}: {e}")))
                };
                let (from, until) = (parse(from)?, parse(until)?);
                window.until.store(until, Ordering::Relaxed);
                window.from.store(from, Ordering::Relaxed);
            }
            ["report"] => {
                let mut hist = load::histogram();
                let mut frames = 0;
                for r in &recorded {
                    let r = r.lock().unwrap_or_else(|p| p.into_inner());
                    frames += r.frames;
                    // Same bounds on both sides, so adding cannot fail.
                    let _ = hist.add(&r.hist);
                }
                let tally = Tally {
                    connections: subscribers,
                    frames,
                    changes_total: counts.changes.load(Ordering::Relaxed),
                    resets: counts.resets.load(Ordering::Relaxed),
                    closed: counts.closed.load(Ordering::Relaxed),
                    hist: hist
                        .iter_recorded()
                        .map(|v| (v.value_iterated_to(), v.count_at_value()))
                        .collect(),
                };
                let line = serde_json::to_string(&tally)
                    .map_err(|e| BenchError::setup(format!("report: {e}")))?;
                println!("{line}");
            }
            _ => return Err(BenchError::setup(format!("unknown command {line:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_reads_the_publish_time_of_a_change_frame() {
        let frame = r#"{"type":"change","id":3,"source":"t","key":"k00001","version":9,"value":{"t":1234,"pad":"x"}}"#;
        assert_eq!(stamp(frame), Some(1234));
        assert_eq!(stamp(r#"{"type":"change","value":{"t":0}}"#), None);
        assert_eq!(stamp(r#"{"type":"synced","id":3,"version":9}"#), None);
    }

    #[test]
    fn value_stamp_reads_the_publish_time_at_the_start_of_a_value() {
        assert_eq!(value_stamp(br#"{"t":1234,"pad":"x"}"#), Some(1234));
        assert_eq!(value_stamp(br#"{"t":0}"#), None);
        assert_eq!(value_stamp(br#"{"pad":"x","t":5}"#), None);
    }

    #[test]
    fn every_key_has_fanout_subscribers() {
        let (subs, fanout) = (7, 3);
        let mut watchers = std::collections::HashMap::new();
        for i in 0..subs {
            for k in keys_of(i, subs, fanout) {
                *watchers.entry(k).or_insert(0) += 1;
            }
        }
        assert_eq!(watchers.len(), subs);
        assert!(watchers.values().all(|&n| n == fanout));
    }

    #[test]
    fn a_tally_carries_its_histogram() {
        let mut h = load::histogram();
        for v in [1_000, 2_000, 2_000, 1_000_000] {
            h.record(v).expect("in bounds");
        }
        let t = Tally {
            connections: 1,
            frames: 4,
            changes_total: 4,
            resets: 0,
            closed: 0,
            hist: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        };
        let back: Tally =
            serde_json::from_str(&serde_json::to_string(&t).expect("serializes")).expect("parses");
        let h2 = back.histogram();
        assert_eq!(h2.len(), 4);
        assert_eq!(
            h2.value_at_quantile(0.5),
            h.highest_equivalent(h.value_at_quantile(0.5))
        );
        assert_eq!(h2.max(), h.highest_equivalent(h.max()));
    }
}
