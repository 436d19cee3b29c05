//! The WebSocket endpoint (`/ws` on the http listener): the JSON protocol of DESIGN.md ("Push to
//! subscribers") over the hub.
//!
//! One connection = one task pair. The reader half parses client frames into commands and
//! enforces the inbound bounds (message size, idle timeout); the writer half owns the
//! connection's [`Subscriber`] (its bounded, conflating queue) and is the only one that writes,
//! so `subscribed`, rows, `synced` and changes go out in the order the protocol promises. A
//! client that reads slowly blocks only its own writer half; the hub keeps the latest value per
//! key for it, resets it past the queue bound, and closes it with 4008 when it keeps falling
//! behind.
//!
//! Access is checked before the upgrade, in this order: bearer token (401), `Origin` allowlist
//! (403), connection limit (503; the permit is held for the connection's life).
//!
//! Close codes: 1000 normal, 1001 server shutting down, 1009 inbound message too big,
//! 4000 idle (no frame, not even a Pong, within `ws.idle_timeout`), 4008 too slow (reset more
//! than `ws.max_resets` times within `ws.reset_window`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::read::{Freshness, ReadError, Reader};
use crate::config::{Limits, WsConfig};
use crate::hub::{Change, Delivery, Hub, ResetLimit, Selection, SubId, Subscriber};
use crate::store::{Source, Store};

/// Close code: the server is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: an inbound message or frame was above `ws.max_message_bytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: a text message that is not valid UTF-8.
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code: a frame that breaks the WebSocket protocol (unmasked, reserved bits set, ...).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: nothing (not even a Pong) was heard from the client within `ws.idle_timeout`.
pub const CLOSE_IDLE: u16 = 4000;
/// Close code: the client kept falling behind (more than `ws.max_resets` resets within
/// `ws.reset_window`).
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// Most deliveries sent in one burst before the connection's other work is looked at.
const BURST_FRAMES: usize = 1024;

/// How long a close frame may take to go out before the connection is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Counters of the WebSocket endpoint.
#[derive(Debug, Default)]
pub struct WsStats {
    /// Connections upgraded.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Upgrades refused: no connection permit left (503).
    pub rejected_full: AtomicU64,
    /// Upgrades refused: missing or wrong token (401).
    pub rejected_token: AtomicU64,
    /// Upgrades refused: `Origin` not allowed (403).
    pub rejected_origin: AtomicU64,
    /// Connections closed for an inbound message above the bound (1009).
    pub closed_too_big: AtomicU64,
    /// Connections closed as idle (4000).
    pub closed_idle: AtomicU64,
    /// Connections closed as too slow (4008).
    pub closed_too_slow: AtomicU64,
    /// Connections closed because a write waited past `ws.send_timeout` (4008).
    pub closed_send_timeout: AtomicU64,
    /// Connections closed for breaking the protocol (1002, 1007).
    pub closed_protocol: AtomicU64,
    /// Client messages answered with an `error`.
    pub errors: AtomicU64,
    /// Frames sent to clients.
    pub frames: AtomicU64,
    warned_full: AtomicBool,
}

/// What every connection shares.
pub(crate) struct WsState {
    store: Arc<Store>,
    reader: Reader,
    hub: Arc<Hub>,
    cfg: WsConfig,
    connections: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    stats: Arc<WsStats>,
}

impl WsState {
    pub(crate) fn new(
        store: Arc<Store>,
        hub: Arc<Hub>,
        cfg: WsConfig,
        limits: &Limits,
        shutdown: watch::Receiver<bool>,
        stats: Arc<WsStats>,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(cfg.max_connections));
        WsState {
            reader: Reader::new(store.clone(), limits),
            store,
            hub,
            cfg,
            connections,
            shutdown,
            stats,
        }
    }
}

/// The routes of the http listener that belong to the WebSocket endpoint.
pub(crate) fn router(state: WsState) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .with_state(Arc::new(state))
}

fn refuse(status: StatusCode, message: &'static str) -> Response {
    (status, message).into_response()
}

fn presented_token<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return crate::auth::bearer(v.to_str().ok()?);
    }
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
}

async fn upgrade(
    State(st): State<Arc<WsState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if let Some(token) = &st.cfg.token {
        let ok = crate::auth::token_matches(presented_token(&headers, &uri), token);
        if !ok {
            st.stats.rejected_token.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "WebSocket upgrade refused: missing or wrong token");
            let mut resp = refuse(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    }
    if !st.cfg.allowed_origins.is_empty() {
        let origins: Vec<&header::HeaderValue> = headers.get_all(header::ORIGIN).iter().collect();
        if let Some(origin) = origins.first() {
            // One Origin, listed (scheme and host are case-insensitive); two are refused, as
            // a browser never sends two.
            let allowed = origins.len() == 1
                && origin.to_str().is_ok_and(|o| {
                    st.cfg
                        .allowed_origins
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(o))
                });
            if !allowed {
                st.stats.rejected_origin.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, origin = ?origin, "WebSocket upgrade refused: origin not allowed");
                return refuse(
                    StatusCode::FORBIDDEN,
                    "origin not allowed (ws.allowed_origins)\n",
                );
            }
        }
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let Ok(permit) = st.connections.clone().try_acquire_owned() else {
        st.stats.rejected_full.fetch_add(1, Ordering::Relaxed);
        if !st.stats.warned_full.swap(true, Ordering::Relaxed) {
            warn!(
                limit = st.cfg.max_connections,
                "WebSocket connection limit reached; refusing upgrades with 503 (logged once)"
            );
        }
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WebSocket connections (ws.max_connections)\n",
        );
    };
    let max = st.cfg.max_message_bytes.as_usize();
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(st.cfg.read_buffer_bytes.as_usize())
        .write_buffer_size(st.cfg.write_buffer_bytes.as_usize())
        .on_upgrade(move |socket| connection(socket, st, peer, permit))
}

/// A command from the reader half to the writer half.
enum Inbound {
    Request(Request),
    /// Answer with this error frame.
    Error(String),
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The client closed or the socket failed.
    Gone,
}

/// A client request, parsed.
enum Request {
    Subscribe {
        id: Id,
        source: String,
        selection: Selection,
        initial: bool,
    },
    Unsubscribe {
        id: Id,
    },
    Get {
        id: Id,
        source: String,
        key: String,
        freshness: Freshness,
    },
}

/// A client-chosen request id (a JSON string or number), kept as its JSON text.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Id(Arc<str>);

async fn connection(
    socket: WebSocket,
    st: Arc<WsState>,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    st.stats.accepted.fetch_add(1, Ordering::Relaxed);
    st.stats.open.fetch_add(1, Ordering::Relaxed);
    debug!(%peer, "WebSocket connected");
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(st.cfg.command_queue);
    let mut reader = tokio::spawn(read_half(stream, tx, st.clone()));
    let code = Outbox::new(sink, &st, peer).run(rx).await;
    // Give the client's answer to a close frame time to arrive before the socket goes.
    if code != 1000 && code != 1006 {
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
    }
    reader.abort();
    st.stats.open.fetch_sub(1, Ordering::Relaxed);
    debug!(%peer, code, "WebSocket closed");
}

fn error_frame(id: Option<&Id>, code: &str, message: &str) -> String {
    let mut out = String::with_capacity(64 + message.len());
    out.push_str("{\"type\":\"error\",\"id\":");
    out.push_str(id.map_or("null", |i| &i.0));
    let _ = write!(
        out,
        ",\"code\":{},\"message\":{}}}",
        json_str(code),
        json_str(message)
    );
    out
}

fn json_str(s: &str) -> String {
    // Serializing a str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// Parses one client text message into an op, or the `error` frame that answers it.
fn parse(text: &str, cfg: &WsConfig) -> Result<Request, String> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| error_frame(None, "bad_json", &format!("not JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(error_frame(None, "bad_request", "expected a JSON object"));
    };
    let id = match obj.get("id") {
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(Id(Arc::from(v.to_string()))),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(error_frame(
                None,
                "bad_request",
                "\"id\" must be a string or a number",
            ))
        }
    };
    let bad = |msg: &str| error_frame(id.as_ref(), "bad_request", msg);
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        _ => return Err(bad("missing \"op\" (subscribe, unsubscribe or get)")),
    };
    let Some(id) = id.clone() else {
        return Err(bad("missing \"id\""));
    };
    let str_field = |name: &str| -> Result<String, String> {
        match obj.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(bad(&format!("\"{name}\" must be a non-empty string"))),
        }
    };
    match op {
        "subscribe" => {
            let source = str_field("source")?;
            let initial = match obj.get("initial") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("\"initial\" must be true or false")),
            };
            let selection = match (obj.get("keys"), obj.get("prefix")) {
                (Some(_), Some(_)) => {
                    return Err(bad("subscribe to \"keys\" or a \"prefix\", not both"))
                }
                (Some(Value::Array(keys)), None) => {
                    if keys.is_empty() {
                        return Err(bad("\"keys\" is empty (omit it, or use \"prefix\":\"\", to watch every key)"));
                    }
                    if keys.len() > cfg.max_keys {
                        return Err(error_frame(
                            Some(&id),
                            "limit",
                            &format!(
                                "subscribe names {} keys; the limit is {} (ws.max_keys)",
                                keys.len(),
                                cfg.max_keys
                            ),
                        ));
                    }
                    let mut out = Vec::with_capacity(keys.len());
                    for k in keys {
                        match k {
                            Value::String(s) if !s.is_empty() => out.push(s.clone()),
                            _ => return Err(bad("every key must be a non-empty string")),
                        }
                    }
                    Selection::Keys(out)
                }
                (Some(_), None) => return Err(bad("\"keys\" must be an array of strings")),
                (None, Some(Value::String(p))) => Selection::Prefix(p.clone()),
                (None, Some(_)) => return Err(bad("\"prefix\" must be a string")),
                (None, None) => Selection::Prefix(String::new()),
            };
            Ok(Request::Subscribe {
                id,
                source,
                selection,
                initial,
            })
        }
        "unsubscribe" => Ok(Request::Unsubscribe { id }),
        "get" => {
            let source = str_field("source")?;
            let key = str_field("key")?;
            let count = |name: &str| -> Result<u64, String> {
                match obj.get(name) {
                    None | Some(Value::Null) => Ok(0),
                    Some(v) => v
                        .as_u64()
                        .ok_or_else(|| bad(&format!("\"{name}\" must be a non-negative integer"))),
                }
            };
            let after = match obj.get("after") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(list)) => list
                    .iter()
                    .map(|e| {
                        let source = e.get("source").and_then(Value::as_str);
                        let version = e.get("version").and_then(Value::as_u64);
                        match (source, version) {
                            (Some(s), Some(v)) => Ok((s.to_string(), v)),
                            _ => Err(bad(
                                "each entry of \"after\" must be {\"source\": string, \"version\": non-negative integer}",
                            )),
                        }
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(bad(
                        "\"after\" must be a list of {\"source\": string, \"version\": integer}",
                    ))
                }
            };
            let freshness = Freshness {
                min_version: count("min_version")?,
                wait: Duration::from_millis(count("wait_ms")?),
                max_staleness_ms: count("max_staleness_ms")?,
                after,
            };
            Ok(Request::Get {
                id,
                source,
                key,
                freshness,
            })
        }
        other => Err(error_frame(
            Some(&id),
            "unknown_op",
            &format!("unknown op {other:?} (expected subscribe, unsubscribe or get)"),
        )),
    }
}

/// Parses one client text message with the default limits, keeping only the `error` frame that
/// would answer a refusal: an entry point for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub fn fuzz_parse(text: &str) -> Result<(), String> {
    parse(text, &WsConfig::default()).map(|_| ())
}

/// The close a read error calls for: 1009 for a message past the bound, 1007 for text that is
/// not UTF-8, 1002 for a broken frame (unmasked, reserved bits, bad opcode); `None` when the
/// connection is simply gone.
fn close_for(e: axum::Error) -> Option<(u16, &'static str)> {
    match e.into_inner().downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => {
            Some((CLOSE_TOO_BIG, "message too big (ws.max_message_bytes)"))
        }
        Some(tungstenite::Error::Utf8(_)) => Some((CLOSE_INVALID_DATA, "text is not valid UTF-8")),
        Some(tungstenite::Error::Protocol(_)) => {
            Some((CLOSE_PROTOCOL_ERROR, "WebSocket protocol violation"))
        }
        _ => None,
    }
}

/// Reads client frames until the client goes, sends something too big, or falls silent.
async fn read_half(
    mut stream: SplitStream<WebSocket>,
    tx: mpsc::Sender<Inbound>,
    st: Arc<WsState>,
) {
    let idle = st.cfg.idle_timeout.0;
    loop {
        let next = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => {
                st.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Inbound::Close(CLOSE_IDLE, "idle timeout")).await;
                return drain(stream).await;
            }
            Ok(n) => n,
        };
        let cmd = match next {
            None => Inbound::Gone,
            Some(Err(e)) => match close_for(e) {
                Some((code, reason)) => {
                    if code == CLOSE_TOO_BIG {
                        st.stats.closed_too_big.fetch_add(1, Ordering::Relaxed);
                    } else {
                        st.stats.closed_protocol.fetch_add(1, Ordering::Relaxed);
                    }
                    Inbound::Close(code, reason)
                }
                None => Inbound::Gone,
            },
            Some(Ok(Message::Text(text))) => match parse(text.as_str(), &st.cfg) {
                Ok(op) => Inbound::Request(op),
                Err(frame) => Inbound::Error(frame),
            },
            Some(Ok(Message::Binary(_))) => Inbound::Error(error_frame(
                None,
                "bad_request",
                "binary messages are not understood; send JSON text",
            )),
            // tungstenite answers pings itself; any frame at all proves the client alive.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) => Inbound::Gone,
        };
        let closing = matches!(cmd, Inbound::Close(..));
        let end = closing || matches!(cmd, Inbound::Gone);
        if tx.send(cmd).await.is_err() || end {
            if closing {
                drain(stream).await;
            }
            return;
        }
    }
}

/// After asking the writer half to close: reads until the client answers the close (or
/// [`CLOSE_GRACE`] passes), so the socket stays open while the close frame reaches it.
async fn drain(mut stream: SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                return;
            }
        }
    })
    .await;
}

/// What one subscription id stands for on this connection.
struct SubInfo {
    id: Id,
}

/// The sending half of one connection (its outbox): the connection's subscriptions and every
/// frame it sends.
struct Outbox {
    sink: SplitSink<WebSocket, Message>,
    st: Arc<WsState>,
    peer: SocketAddr,
    subscriber: Subscriber,
    by_id: HashMap<Id, SubId>,
    subs: HashMap<SubId, SubInfo>,
    unsent: usize,
    /// Gets waiting for their source (`wait_ms`), each answering with its frame; dropped (and
    /// so cancelled) with the connection.
    waiting: JoinSet<Answered>,
}

/// The frame that answers a get, and whether it is an `error`.
struct Answered {
    frame: String,
    error: bool,
}

/// The `code` of an `error` frame for a refused read.
fn read_error_code(e: &ReadError) -> &'static str {
    match e {
        _ if e.is_bad_request() => "bad_request",
        ReadError::UnknownSource(_) => "not_found",
        _ => "unavailable",
    }
}

/// Reads `key` of `source` once it is ready at `f` (waiting up to `f.wait`), and answers with
/// the `value` frame, or the `error` frame of the refusal.
async fn answer_get(
    reader: &Reader,
    id: &Id,
    source: &Source,
    key: &str,
    f: &Freshness,
) -> Answered {
    let read = match reader.settle(&[source], f).await {
        Ok(()) => reader.point(source, key).await,
        Err(e) => Err(e),
    };
    let frame = match read {
        Err(e) => {
            return Answered {
                frame: error_frame(Some(id), read_error_code(&e), &e.to_string()),
                error: true,
            }
        }
        Ok(a) => match a.value {
            Some(value) => {
                let c = Change::new(
                    source.name().clone(),
                    Arc::from(key),
                    a.version,
                    Some(value),
                );
                format!(
                    "{{\"type\":\"value\",\"id\":{},\"found\":true{}",
                    id.0,
                    encode_tail(&c)
                )
            }
            None => format!(
                "{{\"type\":\"value\",\"id\":{},\"found\":false,\"source\":{},\"key\":{}}}",
                id.0,
                json_str(source.name()),
                json_str(key)
            ),
        },
    };
    Answered {
        frame,
        error: false,
    }
}

/// The JSON after `"id":<id>` of a change, row or value frame: shared by every subscriber of
/// the change (see [`Change::encoded`]).
fn encode_tail(c: &Change) -> String {
    let value_len = c.value.as_ref().map_or(0, |v| v.len() * 4 / 3 + 4);
    let mut out = String::with_capacity(48 + c.source.len() + c.key.len() + value_len);
    let _ = write!(
        out,
        ",\"source\":{},\"key\":{},\"version\":{}",
        json_str(&c.source),
        json_str(&c.key),
        c.version
    );
    if let Some(v) = &c.value {
        let json = serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok();
        match std::str::from_utf8(v) {
            Ok(text) if json => {
                out.push_str(",\"value\":");
                out.push_str(text);
            }
            _ => {
                out.push_str(",\"value_b64\":\"");
                base64::engine::general_purpose::STANDARD.encode_string(v, &mut out);
                out.push('"');
            }
        }
    }
    out.push('}');
    out
}

fn change_frame(kind: &str, id: &Id, change: &Change) -> String {
    let tail = change.encoded(encode_tail);
    let mut out = String::with_capacity(20 + kind.len() + id.0.len() + tail.len());
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push_str("\",\"id\":");
    out.push_str(&id.0);
    out.push_str(tail);
    out
}

enum Step {
    Inbound(Inbound),
    Deliver(Delivery),
    Answered(Answered),
    Ping,
    Shutdown,
}

impl Outbox {
    fn new(sink: SplitSink<WebSocket, Message>, st: &Arc<WsState>, peer: SocketAddr) -> Self {
        let limit = ResetLimit {
            max: st.cfg.max_resets,
            window: st.cfg.reset_window.0,
        };
        Outbox {
            sink,
            subscriber: Subscriber::new(&st.hub, format!("ws {peer}"), st.cfg.queue, Some(limit)),
            st: st.clone(),
            peer,
            by_id: HashMap::new(),
            subs: HashMap::new(),
            unsent: 0,
            waiting: JoinSet::new(),
        }
    }

    /// Serves the connection; returns the close code.
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) -> u16 {
        let mut shutdown = self.st.shutdown.clone();
        let period = self.st.cfg.ping_interval.0;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                _ = crate::signalled(&mut shutdown) => Step::Shutdown,
                cmd = rx.recv() => Step::Inbound(cmd.unwrap_or(Inbound::Gone)),
                _ = ping.tick() => Step::Ping,
                d = self.subscriber.next() => Step::Deliver(d),
                Some(Ok(a)) = self.waiting.join_next(), if !self.waiting.is_empty() => Step::Answered(a),
            };
            let sent = match step {
                Step::Shutdown => {
                    return self.close(CLOSE_GOING_AWAY, "server shutting down").await
                }
                Step::Ping => self.send(Message::Ping(Default::default())).await,
                Step::Inbound(Inbound::Gone) => {
                    // Sends tungstenite's answer to the client's close frame, if it sent one.
                    let _ = tokio::time::timeout(CLOSE_GRACE, self.sink.close()).await;
                    return 1000;
                }
                Step::Inbound(Inbound::Close(code, reason)) => {
                    return self.close(code, reason).await
                }
                Step::Inbound(Inbound::Error(frame)) => {
                    self.st.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.text(frame).await
                }
                Step::Inbound(Inbound::Request(op)) => self.op(op).await,
                Step::Answered(a) => {
                    if a.error {
                        self.st.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    self.text(a.frame).await
                }
                Step::Deliver(d) => self.deliver_burst(d).await,
            };
            match sent {
                Ok(()) => {}
                Err(Stop::Close(code, reason)) => return self.close(code, reason).await,
                Err(Stop::Gone) => return 1006,
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> u16 {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let _ = tokio::time::timeout(CLOSE_GRACE, self.sink.send(frame)).await;
        code
    }

    /// A write that waited past `ws.send_timeout` for the socket: the client stopped reading.
    fn send_timed_out(&self) -> Stop {
        self.st
            .stats
            .closed_send_timeout
            .fetch_add(1, Ordering::Relaxed);
        self.st
            .hub
            .stats()
            .send_timeouts
            .fetch_add(1, Ordering::Relaxed);
        info!(peer = %self.peer, "closing a WebSocket client that stopped reading (ws.send_timeout)");
        Stop::Close(
            CLOSE_TOO_SLOW,
            "too slow: a send waited past ws.send_timeout",
        )
    }

    /// Queues a frame; flushes every `ws.send_batch_frames` frames.
    async fn feed(&mut self, msg: Message) -> Result<(), Stop> {
        match tokio::time::timeout(self.st.cfg.send_timeout.0, self.sink.feed(msg)).await {
            Ok(r) => r.map_err(|_| Stop::Gone)?,
            Err(_) => return Err(self.send_timed_out()),
        }
        self.st.stats.frames.fetch_add(1, Ordering::Relaxed);
        self.unsent += 1;
        if self.unsent >= self.st.cfg.send_batch_frames {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        self.unsent = 0;
        match tokio::time::timeout(self.st.cfg.send_timeout.0, self.sink.flush()).await {
            Ok(r) => r.map_err(|_| Stop::Gone),
            Err(_) => Err(self.send_timed_out()),
        }
    }

    async fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.feed(msg).await?;
        self.flush().await
    }

    async fn text(&mut self, frame: String) -> Result<(), Stop> {
        self.send(Message::Text(frame.into())).await
    }

    /// Sends `first` and whatever else is ready now (up to [`BURST_FRAMES`], so that requests,
    /// pings and closes are served between bursts), then flushes once.
    async fn deliver_burst(&mut self, first: Delivery) -> Result<(), Stop> {
        self.deliver(first).await?;
        for _ in 1..BURST_FRAMES {
            let Some(d) = self.subscriber.try_next() else {
                break;
            };
            self.deliver(d).await?;
        }
        self.flush().await
    }

    async fn deliver(&mut self, d: Delivery) -> Result<(), Stop> {
        let frame = match d {
            Delivery::TooSlow => {
                self.st
                    .stats
                    .closed_too_slow
                    .fetch_add(1, Ordering::Relaxed);
                info!(peer = %self.peer, "closing a WebSocket subscriber that keeps falling behind");
                return Err(Stop::Close(CLOSE_TOO_SLOW, "too slow: kept falling behind"));
            }
            Delivery::Row { sub, change } => {
                let Some(info) = self.subs.get(&sub) else {
                    return Ok(());
                };
                change_frame("row", &info.id, &change)
            }
            Delivery::Change { sub, change } => {
                let Some(info) = self.subs.get(&sub) else {
                    return Ok(());
                };
                let kind = if change.value.is_some() {
                    "change"
                } else {
                    "delete"
                };
                change_frame(kind, &info.id, &change)
            }
            Delivery::Synced { sub, version } => {
                let Some(info) = self.subs.get(&sub) else {
                    return Ok(());
                };
                format!(
                    "{{\"type\":\"synced\",\"id\":{},\"version\":{version}}}",
                    info.id.0
                )
            }
            Delivery::Reset { sub, reason } => {
                let Some(info) = self.subs.get(&sub) else {
                    return Ok(());
                };
                format!(
                    "{{\"type\":\"reset\",\"id\":{},\"reason\":{}}}",
                    info.id.0,
                    json_str(&reason)
                )
            }
        };
        self.feed(Message::Text(frame.into())).await
    }

    async fn error(&mut self, id: &Id, code: &str, message: &str) -> Result<(), Stop> {
        self.st.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.text(error_frame(Some(id), code, message)).await
    }

    async fn op(&mut self, op: Request) -> Result<(), Stop> {
        match op {
            Request::Subscribe {
                id,
                source,
                selection,
                initial,
            } => {
                let Some(src) = self.st.store.source(&source).cloned() else {
                    return self
                        .error(&id, "not_found", &format!("no source named '{source}'"))
                        .await;
                };
                if self.by_id.contains_key(&id) {
                    return self
                        .error(&id, "duplicate_id", "a subscription with this id is open")
                        .await;
                }
                if self.subscriber.len() >= self.st.cfg.max_subscriptions {
                    return self
                        .error(
                            &id,
                            "limit",
                            &format!(
                                "at most {} subscriptions per connection (ws.max_subscriptions)",
                                self.st.cfg.max_subscriptions
                            ),
                        )
                        .await;
                }
                if src.is_on_demand() {
                    return self
                        .error(
                            &id,
                            "failed_precondition",
                            &format!(
                                "source '{source}' is on_demand: it holds only the keys read \
                                 lately, so it cannot be subscribed to; use get, or declare it \
                                 mode = \"full\""
                            ),
                        )
                        .await;
                }
                let sub = self.subscriber.subscribe(src, selection, initial);
                self.by_id.insert(id.clone(), sub);
                self.subs.insert(sub, SubInfo { id: id.clone() });
                self.text(format!(
                    "{{\"type\":\"subscribed\",\"id\":{},\"source\":{}}}",
                    id.0,
                    json_str(&source)
                ))
                .await
            }
            Request::Unsubscribe { id } => {
                let Some(sub) = self.by_id.remove(&id) else {
                    return self
                        .error(&id, "unknown_id", "no open subscription has this id")
                        .await;
                };
                self.subs.remove(&sub);
                self.subscriber.unsubscribe(sub);
                self.text(format!("{{\"type\":\"unsubscribed\",\"id\":{}}}", id.0))
                    .await
            }
            Request::Get {
                id,
                source,
                key,
                freshness,
            } => {
                let src = match self.st.reader.source(&source) {
                    Ok(src) => src.clone(),
                    Err(e) => return self.error(&id, read_error_code(&e), &e.to_string()).await,
                };
                // A read that needs no wait is answered in order with everything else on the
                // connection; one that waits for its source runs beside it, bounded.
                if (Reader::ready_now(&src, &freshness) && self.st.reader.after_now(&freshness))
                    || freshness.wait.is_zero()
                {
                    let a = answer_get(&self.st.reader, &id, &src, &key, &freshness).await;
                    if a.error {
                        self.st.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    return self.text(a.frame).await;
                }
                if self.waiting.len() >= self.st.cfg.max_waiting_gets {
                    return self
                        .error(
                            &id,
                            "limit",
                            &format!(
                                "at most {} gets waiting at once per connection (ws.max_waiting_gets)",
                                self.st.cfg.max_waiting_gets
                            ),
                        )
                        .await;
                }
                let reader = self.st.reader.clone();
                self.waiting
                    .spawn(async move { answer_get(&reader, &id, &src, &key, &freshness).await });
                Ok(())
            }
        }
    }
}

enum Stop {
    Close(u16, &'static str),
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn change(value: Option<&[u8]>) -> Change {
        Change::new(
            Arc::from("products"),
            Arc::from("p\"1"),
            7,
            value.map(Bytes::copy_from_slice),
        )
    }

    #[test]
    fn frames_embed_json_values_and_base64_the_rest() {
        let id = Id(Arc::from("\"s1\""));
        let c = change(Some(br#"{"name":"x"}"#));
        let f = change_frame("change", &id, &c);
        assert_eq!(
            f,
            r#"{"type":"change","id":"s1","source":"products","key":"p\"1","version":7,"value":{"name":"x"}}"#
        );
        let v: Value = serde_json::from_str(&change_frame("row", &Id(Arc::from("3")), &c)).unwrap();
        assert_eq!(v["id"], 3);
        assert_eq!(v["type"], "row");
        let c = change(Some(&[0xff, 0x00, 0x01]));
        let v: Value = serde_json::from_str(&change_frame("change", &id, &c)).unwrap();
        assert_eq!(v["value_b64"], "/wAB");
        assert!(v.get("value").is_none());
        let c = change(Some(b"not json"));
        let v: Value = serde_json::from_str(&change_frame("change", &id, &c)).unwrap();
        assert_eq!(v["value_b64"], "bm90IGpzb24=");
        let c = change(None);
        let v: Value = serde_json::from_str(&change_frame("delete", &id, &c)).unwrap();
        assert_eq!(v["type"], "delete");
        assert!(v.get("value").is_none() && v.get("value_b64").is_none());
    }

    #[test]
    fn the_shared_tail_is_encoded_once() {
        let c = change(Some(b"1"));
        let a = c.encoded(encode_tail).as_ptr();
        let b = c.encoded(encode_tail).as_ptr();
        assert_eq!(a, b);
    }

    #[test]
    fn requests_parse_or_explain() {
        let cfg = WsConfig::default();
        assert!(matches!(
            parse(r#"{"op":"subscribe","id":"s1","source":"p","keys":["a","b"],"initial":true}"#, &cfg),
            Ok(Request::Subscribe { initial: true, selection: Selection::Keys(k), .. }) if k == ["a", "b"]
        ));
        assert!(matches!(
            parse(r#"{"op":"subscribe","id":1,"source":"p","prefix":"a"}"#, &cfg),
            Ok(Request::Subscribe { initial: false, selection: Selection::Prefix(p), .. }) if p == "a"
        ));
        for (text, code) in [
            ("{nope", "bad_json"),
            ("[1]", "bad_request"),
            (r#"{"op":"fly","id":"x"}"#, "unknown_op"),
            (r#"{"op":"subscribe","source":"p"}"#, "bad_request"),
            (
                r#"{"op":"subscribe","id":"s","source":"p","keys":["a"],"prefix":"a"}"#,
                "bad_request",
            ),
            (
                r#"{"op":"subscribe","id":"s","source":"p","keys":[]}"#,
                "bad_request",
            ),
            (r#"{"op":"get","id":"g","source":"p"}"#, "bad_request"),
        ] {
            let frame = parse(text, &cfg).err().unwrap_or_default();
            let v: Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(v["type"], "error", "{text}");
            assert_eq!(v["code"], code, "{text}");
        }
        let too_many = format!(
            r#"{{"op":"subscribe","id":"s","source":"p","keys":{}}}"#,
            serde_json::to_string(&vec!["k"; cfg.max_keys + 1]).unwrap()
        );
        let v: Value = serde_json::from_str(&parse(&too_many, &cfg).err().unwrap()).unwrap();
        assert_eq!(v["code"], "limit");
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let mut h = HeaderMap::new();
        let uri: Uri = "/ws?x=1&access_token=abc".parse().unwrap();
        assert_eq!(presented_token(&h, &uri), Some("abc"));
        h.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(presented_token(&h, &uri), Some("xyz"));
        h.insert(header::AUTHORIZATION, "bearer lower".parse().unwrap());
        assert_eq!(presented_token(&h, &uri), Some("lower"));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(presented_token(&h, &uri), None);
    }
}
