//! Helpers of the WebSocket tests: an origin and a sidecar on loopback port 0, WebSocket clients
//! over real sockets, and frame reads bounded by a deadline (never sleeps to wait for a server).

#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use viewcar::config::{Dur, WsConfig};
use viewcar::{Origin, OriginConfig, Put, Sidecar, SidecarConfig};

/// The deadline of every wait: far above what any step takes on a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An origin serving `topics` and a sidecar replicating them, both on loopback port 0.
pub struct Setup {
    pub origin: Origin,
    pub sidecar: Sidecar,
    stop: Option<oneshot::Sender<()>>,
}

impl Setup {
    pub async fn start(topics: &[&str], ws: WsConfig) -> Setup {
        Self::start_with(topics, |cfg| cfg.ws = ws).await
    }

    pub async fn start_with(topics: &[&str], tweak: impl FnOnce(&mut SidecarConfig)) -> Setup {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let origin = Origin::new(OriginConfig {
            listen: addr,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            progress_interval: Dur(Duration::from_millis(200)),
            ..OriginConfig::default()
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = origin.clone();
        tokio::spawn(async move {
            let _ = serving
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let mut cfg = SidecarConfig::default();
        cfg.listen.grpc = common::loopback0().into();
        cfg.origins = vec![common::full_origin(&format!("http://{addr}"), topics)];
        tweak(&mut cfg);
        cfg.validate("test").expect("valid test config");
        let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");
        within("sidecar sync", sidecar.synced()).await;
        Setup {
            origin,
            sidecar,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.sidecar.http_addr())
    }

    /// Publishes JSON values; returns the version.
    pub fn put(&self, topic: &str, kvs: &[(&str, Value)]) -> u64 {
        let puts = kvs
            .iter()
            .map(|(k, v)| Put::upsert(*k, v.to_string()))
            .collect();
        self.origin.publish(topic, puts).expect("publish").version
    }

    pub async fn connect(&self) -> Ws {
        connect(&self.url()).await
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn connect(url: &str) -> Ws {
    within("connect", tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket handshake")
        .0
}

/// A WebSocket over a socket with a tiny receive buffer, so that a client that stops reading
/// pushes back on the server at once. Returns the client's local address too (the hub labels
/// the connection's queue "ws <that address>").
pub async fn connect_small_buffer(addr: SocketAddr) -> (Ws, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = within("tcp connect", socket.connect(addr))
        .await
        .expect("tcp connect");
    handshake(addr, tcp).await
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// The next text frame as JSON (pings are answered by tungstenite and skipped).
pub async fn recv(ws: &mut Ws) -> Value {
    within("a frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str()).expect("frames are JSON")
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

/// Reads until the server closes; returns the close code.
pub async fn close_code(ws: &mut Ws) -> u16 {
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return u16::from(CloseCode::Status),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
}

pub async fn subscribe_keys(ws: &mut Ws, id: &str, source: &str, keys: &[&str], initial: bool) {
    send(
        ws,
        json!({"op":"subscribe","id":id,"source":source,"keys":keys,"initial":initial}),
    )
    .await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "subscribed", "{v}");
}

/// What a client holds: per (id, key) the latest value and version, plus the versions seen.
#[derive(Default)]
pub struct Replica {
    pub rows: HashMap<String, (u64, Option<Value>)>,
    pub versions: HashMap<String, Vec<u64>>,
    pub resets: usize,
    pub frames: usize,
    /// Frames applied, by their `type`: what a miscount was made of.
    pub kinds: std::collections::BTreeMap<String, usize>,
}

impl Replica {
    /// Applies one frame; panics on an out-of-order or repeated version of a key.
    pub fn apply(&mut self, v: &Value) {
        self.frames += 1;
        *self
            .kinds
            .entry(v["type"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        let key = v["key"].as_str().map(str::to_string);
        match v["type"].as_str() {
            Some("row" | "change" | "delete") => {
                let key = key.expect("frames of rows name a key");
                let version = v["version"].as_u64().expect("version");
                let value = if v["type"] == "delete" {
                    None
                } else {
                    Some(v["value"].clone())
                };
                let seen = self.versions.entry(key.clone()).or_default();
                if let Some(last) = seen.last() {
                    assert!(
                        version > *last,
                        "key {key}: version {version} after {last} ({v})"
                    );
                }
                seen.push(version);
                self.rows.insert(key, (version, value));
            }
            Some("reset") => {
                self.resets += 1;
                // Rows follow; a key's history restarts from its current row.
                self.versions.clear();
            }
            _ => {}
        }
    }

    /// Latest values of the keys present (deleted keys left out).
    pub fn values(&self) -> HashMap<String, Value> {
        self.rows
            .iter()
            .filter_map(|(k, (_, v))| v.clone().map(|v| (k.clone(), v)))
            .collect()
    }
}

impl Setup {
    /// The sidecar's feed counters, for a failure message: a miscount while the feed
    /// reconnected or resnapshotted is a different bug from one on a steady stream.
    pub fn upstream(&self) -> String {
        let f = self.sidecar.feed_stats("o").expect("feed stats");
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "feed: connects {} disconnects {} snapshots {} resets {} duplicates {} gaps {}",
            n(&f.connects),
            n(&f.disconnects),
            n(&f.snapshots),
            n(&f.resets),
            n(&f.duplicates),
            n(&f.gaps)
        )
    }

    /// Waits until the sidecar has applied `version` of `topic`.
    pub async fn applied(&self, topic: &str, version: u64) {
        let source = self.sidecar.store().source(topic).expect("source").clone();
        let mut changes = source.subscribe_changes();
        within("the sidecar to apply a version", async {
            while source.version() < version {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Waits until `source` has synced: an on_demand topic once its feed is connected (the
    /// sidecar's readiness waits for full sources only).
    pub async fn synced(&self, source: &str) {
        let source = self.sidecar.store().source(source).expect("source").clone();
        common::wait_source(&source, "synced", |s| s.is_synced()).await;
    }
}

/// A WebSocket to `addr`; returns the client's local address too (the hub labels the
/// connection's queue "ws <that address>").
pub async fn connect_at(addr: SocketAddr) -> (Ws, SocketAddr) {
    let tcp = within("tcp connect", TcpStream::connect(addr))
        .await
        .expect("tcp connect");
    handshake(addr, tcp).await
}

/// The WebSocket handshake of `/ws` at `addr` over the connected `tcp`; returns the socket and
/// the client's local address.
async fn handshake(addr: SocketAddr, tcp: TcpStream) -> (Ws, SocketAddr) {
    let local = tcp.local_addr().expect("local address");
    let request = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    let (ws, _) = within(
        "handshake",
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("WebSocket handshake");
    (ws, local)
}

/// The hub's view of the queue of the connection from `client`.
pub fn queue_of(sidecar: &Sidecar, client: SocketAddr) -> viewcar::hub::QueueInfo {
    let label = format!("ws {client}");
    sidecar
        .hub()
        .queues()
        .into_iter()
        .find(|q| q.label == label)
        .unwrap_or_else(|| panic!("no queue labelled {label}"))
}
