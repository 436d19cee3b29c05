//! `viewcar.toml`: the sidecar's listeners, bounds, origins and topics.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{check_name, check_range, ConfigError, ListenAddr, RedisConfig, ViewSpec};
use crate::types::{check_on_demand_budget, ByteSize, Dur, Mode, DEFAULT_ON_DEMAND_BYTES};

/// `viewcar.toml`: what the sidecar replicates, which views it maintains and where it serves them.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "the sidecar config: a TOML document with [listen], [[origin]], ..."
)]
pub struct SidecarConfig {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub ws: WsConfig,
    /// The Redis protocol listener (`[listen] redis`).
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub feed: FeedConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Bounds of the Feed API served with `[listen] feed` (a relay).
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default, rename = "origin")]
    pub origins: Vec<OriginSpec>,
    #[serde(default, rename = "view")]
    pub views: Vec<ViewSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table [listen] with grpc, http, allow_non_loopback, ..."
)]
pub struct ListenConfig {
    /// The Cache gRPC API: `host:port` or `unix:/path` (a Unix socket, whose file mode is
    /// `grpc_socket_mode`).
    #[serde(default = "default_grpc")]
    pub grpc: ListenAddr,
    /// File mode of the socket file when `grpc` is `unix:/path` (TOML octal: `0o660`).
    #[serde(default = "default_socket_mode")]
    pub grpc_socket_mode: u32,
    /// The HTTP listener: WebSocket `/ws` (and the admin endpoints). Unset means
    /// 127.0.0.1:7071, or port 0 (any free port) when `grpc` asks for port 0, so that
    /// ephemeral sidecars (tests, tools) never collide on a fixed port.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// The Redis protocol (RESP2 and RESP3, read-only): `host:port` or `unix:/path`; unset =
    /// not served.
    #[serde(default)]
    pub redis: Option<ListenAddr>,
    /// The Feed API (Sync, Fetch) served from this sidecar's full topics and views: a relay
    /// for other sidecars (bounds and TLS in `[relay]`); unset = not served.
    #[serde(default)]
    pub feed: Option<SocketAddr>,
    /// Serve on an address other than loopback; off by default so a sidecar is never exposed by
    /// accident.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Open connections of the http listener at most (WebSockets included); past it new
    /// connections wait to be accepted.
    #[serde(default = "default_http_max_connections")]
    pub http_max_connections: usize,
    /// A request on the http listener must send its headers within this long, or the
    /// connection is closed.
    #[serde(default = "default_http_header_timeout")]
    pub http_header_timeout: Dur,
    /// Open connections of the Cache gRPC listener at most; past it new connections wait to
    /// be accepted.
    #[serde(default = "default_http_max_connections")]
    pub grpc_max_connections: usize,
    /// A Cache API connection must send its first bytes (the HTTP/2 preface) within this long,
    /// or it is closed.
    #[serde(default = "default_http_header_timeout")]
    pub grpc_header_timeout: Dur,
    /// HTTP/2 keepalive of the Cache API: a PING after this long without frames ...
    #[serde(default = "default_keepalive")]
    pub keepalive_interval: Dur,
    /// ... and the connection is closed when its answer takes longer than this.
    #[serde(default = "default_keepalive")]
    pub keepalive_timeout: Dur,
}

fn default_http_max_connections() -> usize {
    4096
}

fn default_http_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_keepalive() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_grpc() -> ListenAddr {
    ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 7070)))
}

fn default_socket_mode() -> u32 {
    0o660
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: default_grpc(),
            grpc_socket_mode: default_socket_mode(),
            http: None,
            redis: None,
            feed: None,
            allow_non_loopback: false,
            http_max_connections: default_http_max_connections(),
            http_header_timeout: default_http_header_timeout(),
            grpc_max_connections: default_http_max_connections(),
            grpc_header_timeout: default_http_header_timeout(),
            keepalive_interval: default_keepalive(),
            keepalive_timeout: default_keepalive(),
        }
    }
}

impl ListenConfig {
    /// Where the HTTP listener binds (see [`ListenConfig::http`]).
    pub fn http_addr(&self) -> SocketAddr {
        match self.http {
            Some(a) => a,
            None => match self.grpc {
                ListenAddr::Tcp(g) if g.port() == 0 => SocketAddr::new(g.ip(), 0),
                _ => SocketAddr::from(([127, 0, 0, 1], 7071)),
            },
        }
    }
}

/// Bounds and access rules of the WebSocket endpoint (`/ws`).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table [ws] with max_connections, queue, token, ..."
)]
pub struct WsConfig {
    /// Most concurrent WebSocket connections; the next upgrade request gets 503.
    pub max_connections: usize,
    /// Most subscriptions open at once on one connection.
    pub max_subscriptions: usize,
    /// Most keys named by one subscribe.
    pub max_keys: usize,
    /// Largest inbound message (and frame); a larger one closes the connection with 1009.
    pub max_message_bytes: ByteSize,
    /// Changes pending per connection (distinct subscription keys; a newer value of a pending
    /// key replaces it in place). Past it the connection's subscriptions are reset and resent
    /// their current rows.
    pub queue: usize,
    /// A connection reset more than `max_resets` times within `reset_window` cannot keep up:
    /// it is closed with code 4008.
    pub max_resets: u32,
    pub reset_window: Dur,
    /// A Ping is sent this often; no frame at all from the client (a Pong included) for
    /// `idle_timeout` closes the connection with code 4000.
    pub ping_interval: Dur,
    pub idle_timeout: Dur,
    /// Longest a write to a client may wait for its socket (a client that stopped reading);
    /// past it the connection is closed with code 4008.
    pub send_timeout: Dur,
    /// Bytes of outbound frames buffered per connection before a send waits for the socket.
    pub write_buffer_bytes: ByteSize,
    /// Frames written before one flush, so a burst of changes costs few syscalls.
    pub send_batch_frames: usize,
    /// Bytes read from the socket at once. Client messages are small, and each read zeroes this
    /// much of the connection's input buffer: tungstenite's own default of 128KiB was the
    /// largest single cost of a subscriber connection in a profile of the fan-out.
    pub read_buffer_bytes: ByteSize,
    /// Parsed client requests buffered between the reading and the writing half of one
    /// connection; when it is full the connection reads nothing more until the writer catches up.
    pub command_queue: usize,
    /// Most `get`s with a `wait_ms` waiting for their source at once on one connection; past
    /// it a waiting `get` is answered with an error of code `limit`.
    pub max_waiting_gets: usize,
    /// When set, a client must present `Authorization: Bearer <token>` (or, for browsers,
    /// which cannot set headers on a WebSocket, `?access_token=<token>`); otherwise 401.
    pub token: Option<String>,
    /// When non-empty, a request carrying an `Origin` header (every browser sends one) must
    /// name one of these, such as `"https://app.example.com"`; otherwise 403. Requests without
    /// `Origin` (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_connections: 1024,
            max_subscriptions: 256,
            max_keys: 10_000,
            max_message_bytes: ByteSize(64 << 10),
            queue: 4096,
            max_resets: 5,
            reset_window: Dur(Duration::from_secs(60)),
            ping_interval: Dur(Duration::from_secs(15)),
            idle_timeout: Dur(Duration::from_secs(45)),
            send_timeout: Dur(Duration::from_secs(10)),
            write_buffer_bytes: ByteSize(128 << 10),
            send_batch_frames: 128,
            read_buffer_bytes: ByteSize(4 << 10),
            command_queue: 32,
            max_waiting_gets: 256,
            token: None,
            allowed_origins: Vec::new(),
        }
    }
}

/// Bounds of the reader side. Every one is explicit so that a misbehaving client meets a clear
/// limit instead of exhausting the pod.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table [limits] with max_message_bytes, max_watches, ..."
)]
pub struct Limits {
    /// Largest gRPC message accepted or sent, on the Cache API and on the feed.
    pub max_message_bytes: ByteSize,
    /// Most keys in one BatchGet.
    pub max_batch_keys: usize,
    /// Most times a BatchGet reads its keys to get an answer of whole versions (never half of
    /// one Publish) while batches keep landing; each retry may first wait up to 20ms for a
    /// batch in flight. If every attempt overlapped a batch, the last read is answered as is.
    pub batch_read_attempts: usize,
    /// Scan page size when the request says 0.
    pub scan_default_limit: u32,
    /// Largest Scan page; larger requests are capped.
    pub scan_max_limit: u32,
    /// Distinct keys pending per Watch stream (each holds only its latest change) before the
    /// stream is reset and resent the current rows.
    pub watch_queue: usize,
    /// Watch events per stream taken off its queue and waiting for the transport; when full,
    /// changes wait (conflated) in `watch_queue`.
    pub watch_send_buffer: usize,
    /// Longest a Watch event may wait for room in `watch_send_buffer` (a client that stopped
    /// reading); past it the Watch ends and its slot of `max_watches` is freed.
    pub watch_send_timeout: Dur,
    /// Most concurrent Watch streams.
    pub max_watches: usize,
    /// Most keys in one Watch request.
    pub max_watch_keys: usize,
    /// Longest `wait_ms` honoured; longer waits are capped.
    pub max_wait: Dur,
    /// Feed messages buffered between the feed clients and the single writer.
    pub writer_queue: usize,
    /// Most feed messages the writer applies in one step, from what is already queued, before
    /// it runs the views and hands the changes to readers: a burst costs one view pass and one
    /// dispatch, and a long one is still handed on in steps of this size.
    pub writer_batch: usize,
    /// Most concurrent HTTP/2 streams per client connection on the Cache API.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: ByteSize(16 << 20),
            max_batch_keys: 1000,
            batch_read_attempts: 64,
            scan_default_limit: 100,
            scan_max_limit: 1000,
            watch_queue: 1024,
            watch_send_buffer: 64,
            watch_send_timeout: Dur(Duration::from_secs(30)),
            max_watches: 10_000,
            max_watch_keys: 10_000,
            max_wait: Dur(Duration::from_secs(30)),
            writer_queue: 1024,
            writer_batch: 256,
            max_concurrent_streams: 1024,
        }
    }
}

/// How the sidecar stops on SIGTERM/SIGINT.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table [shutdown] with grace"
)]
pub struct ShutdownConfig {
    /// In-flight reads, Watch streams and WebSockets get this long to finish after the
    /// listeners stop accepting; whatever is still open then is dropped. Keep it below the
    /// orchestrator's own limit (Kubernetes: `terminationGracePeriodSeconds`, 30 s by default).
    pub grace: Dur,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Dur(Duration::from_secs(10)),
        }
    }
}

/// `[relay]`: bounds of the Feed API a sidecar serves with `[listen] feed`. Same meaning and
/// defaults as the keys of the same names in origin.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table [relay] with retain_batches, retain_bytes, max_streams, tls, ..."
)]
pub struct RelayConfig {
    /// Changes kept per topic so that leaves resume (here or after failing over from another
    /// relay) without a snapshot: at most this many batches and bytes, whichever comes first.
    pub retain_batches: usize,
    pub retain_bytes: ByteSize,
    /// Batches queued per Sync stream; a stream that overflows is caught up by Reset + snapshot.
    pub stream_queue: usize,
    /// Messages of one Sync stream waiting for the transport.
    pub stream_send_buffer: usize,
    pub snapshot_chunk_entries: usize,
    pub snapshot_chunk_bytes: ByteSize,
    /// Largest gRPC message accepted or sent on the feed listener.
    pub max_message_bytes: ByteSize,
    /// Most concurrent Sync streams (one per leaf sidecar).
    pub max_streams: usize,
    /// Most open connections of the feed listener; more wait to be accepted.
    pub max_connections: usize,
    /// Most keys one stream may subscribe to one by one in a topic ...
    pub max_subscribed_keys: usize,
    /// ... and the bytes those keys name (keys plus values when subscribed).
    pub max_subscribed_bytes: ByteSize,
    /// A connection must send its first bytes (HTTP/2 preface or TLS handshake) within this
    /// long, or it is closed.
    pub header_timeout: Dur,
    pub keepalive_interval: Dur,
    pub keepalive_timeout: Dur,
    /// How often an idle subscription gets a Progress (only while this relay's upstream is
    /// live: a relay cut off from it sends none, so its leaves see the data growing stale).
    pub progress_interval: Dur,
    /// Serve the feed over TLS; with `client_ca`, only to leaves with a certificate it signed.
    pub tls: Option<crate::tls::ServerTls>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let o = super::OriginConfig::default();
        RelayConfig {
            retain_batches: o.retain_batches,
            retain_bytes: o.retain_bytes,
            stream_queue: o.stream_queue,
            stream_send_buffer: o.stream_send_buffer,
            snapshot_chunk_entries: o.snapshot_chunk_entries,
            snapshot_chunk_bytes: o.snapshot_chunk_bytes,
            max_message_bytes: o.max_message_bytes,
            max_streams: 10_000,
            max_connections: 10_000,
            max_subscribed_keys: o.max_subscribed_keys,
            max_subscribed_bytes: o.max_subscribed_bytes,
            header_timeout: o.header_timeout,
            keepalive_interval: o.keepalive_interval,
            keepalive_timeout: o.keepalive_timeout,
            progress_interval: o.progress_interval,
            tls: None,
        }
    }
}

impl RelayConfig {
    /// The origin settings a relay serves under, listening on `listen`.
    pub fn origin_config(&self, listen: SocketAddr) -> super::OriginConfig {
        super::OriginConfig {
            listen,
            retain_batches: self.retain_batches,
            retain_bytes: self.retain_bytes,
            stream_queue: self.stream_queue,
            stream_send_buffer: self.stream_send_buffer,
            snapshot_chunk_entries: self.snapshot_chunk_entries,
            snapshot_chunk_bytes: self.snapshot_chunk_bytes,
            max_message_bytes: self.max_message_bytes,
            max_streams: self.max_streams,
            max_connections: self.max_connections,
            max_subscribed_keys: self.max_subscribed_keys,
            max_subscribed_bytes: self.max_subscribed_bytes,
            header_timeout: self.header_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            progress_interval: self.progress_interval,
            allow_non_loopback: true,
            tls: self.tls.clone(),
            ..Default::default()
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        // The same checks as origin.toml's keys of the same names, reported under [relay].
        self.origin_config(SocketAddr::from(([127, 0, 0, 1], 0)))
            .validate(file)
            .map_err(|e| match e {
                ConfigError::Invalid {
                    file,
                    field,
                    message,
                } => ConfigError::Invalid {
                    file,
                    field: format!("relay.{field}"),
                    message,
                },
                other => other,
            })
    }
}

/// How the sidecar holds its feed streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table [feed] with backoff_initial, backoff_max, keepalive_interval, ..."
)]
pub struct FeedConfig {
    /// First reconnect delay ceiling; each failure doubles it up to `backoff_max`. The actual
    /// delay is uniformly random below the ceiling ("full jitter").
    pub backoff_initial: Dur,
    pub backoff_max: Dur,
    pub connect_timeout: Dur,
    /// HTTP/2 PING interval and how long to wait for its answer: together they bound how long a
    /// silently dead origin goes unnoticed.
    pub keepalive_interval: Dur,
    pub keepalive_timeout: Dur,
    /// No message at all (origins send Progress every few seconds) for this long: redial.
    pub idle_timeout: Dur,
    /// The feed counts as live (staleness 0) while the origin was heard from within this long.
    pub live_window: Dur,
    /// This sidecar's name, hashed to choose which of an origin's addresses is dialled first
    /// (leaves listing the same relays spread over them). Unset: `$HOSTNAME` (the pod name in
    /// Kubernetes) when set, else the first address.
    pub instance: Option<String>,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            backoff_initial: Dur(Duration::from_millis(100)),
            backoff_max: Dur(Duration::from_secs(10)),
            connect_timeout: Dur(Duration::from_secs(5)),
            keepalive_interval: Dur(Duration::from_secs(10)),
            keepalive_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(30)),
            live_window: Dur(Duration::from_secs(10)),
            instance: None,
        }
    }
}

/// One upstream origin and the topics replicated from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawOriginSpec")]
pub struct OriginSpec {
    pub name: String,
    /// `http://host:port`, or `https://host:port` with `tls`.
    pub address: String,
    /// More addresses of the same origin (replicas or relays serving its positions), written
    /// `address = ["http://a:7000", "http://b:7000"]`: a lost feed is redialled at the next
    /// one, resuming from the position held.
    pub fallback: Vec<String>,
    pub topics: Vec<TopicSpec>,
    /// TLS to this origin: the CA to verify it with, and a client certificate for mTLS.
    pub tls: Option<crate::tls::ClientTls>,
}

/// `[[origin]]` as written: `address` is a string or a list.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an [[origin]] table with name, address, topics and optional tls"
)]
struct RawOriginSpec {
    name: String,
    address: OneOrMany,
    topics: Vec<TopicSpec>,
    #[serde(default)]
    tls: Option<crate::tls::ClientTls>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "an address \"http://host:port\" or a list of them"
)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<RawOriginSpec> for OriginSpec {
    fn from(r: RawOriginSpec) -> Self {
        let (address, fallback) = match r.address {
            OneOrMany::One(a) => (a, Vec::new()),
            OneOrMany::Many(mut v) => {
                // An empty list is refused by validate (an empty address).
                let first = if v.is_empty() {
                    String::new()
                } else {
                    v.remove(0)
                };
                (first, v)
            }
        };
        OriginSpec {
            name: r.name,
            address,
            fallback,
            topics: r.topics,
            tls: r.tls,
        }
    }
}

impl OriginSpec {
    /// Every address, in the order they are tried.
    pub fn addresses(&self) -> Vec<String> {
        std::iter::once(self.address.clone())
            .chain(self.fallback.iter().cloned())
            .collect()
    }
}

/// Checks an origin address as the feed client will dial it: `http://` or `https://`, a host,
/// and a port in 1..=65535 when one is written (else 80 or 443). A mistake here would otherwise
/// only show as a sidecar that redials forever.
pub(crate) fn check_address(address: &str) -> Result<(), String> {
    let expected = |detail: &str| format!("expected http://host:port, got {address:?}: {detail}");
    let rest = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .ok_or_else(|| expected("the scheme must be http:// or https://"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err(expected("an origin address has no path"));
    }
    // Credentials (`user:password@`) may precede the host.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| expected("an IPv6 host is written [::1]"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| expected("a port follows the host after ':'"))?,
            ),
        };
        (host, port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(expected("no host"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@'))
    {
        return Err(expected("the host holds a character a host name cannot"));
    }
    if let Some(p) = port {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) && !p.starts_with('+') => {}
            _ => return Err(expected("the port must be a number from 1 to 65535")),
        }
    }
    Ok(())
}

impl TopicSpec {
    /// The byte budget of an on_demand topic (`max_bytes`, or 64 MiB).
    pub fn budget(&self) -> u64 {
        self.max_bytes.map_or(DEFAULT_ON_DEMAND_BYTES, |b| b.0)
    }
}

fn check_on_demand(file: &str, at: &str, t: &TopicSpec) -> Result<(), ConfigError> {
    check_on_demand_budget(t.max_bytes, t.idle, "keys")
        .map_err(|(field, message)| ConfigError::invalid(file, format!("{at}.{field}"), message))
}

/// A topic, written as its name (`"prices"`) or as a table (`{ name = "users", mode = "on_demand" }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub mode: Mode,
    pub max_bytes: Option<ByteSize>,
    pub idle: Option<Dur>,
}

impl<'de> Deserialize<'de> for TopicSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            name: String,
            #[serde(default = "full")]
            mode: Mode,
            max_bytes: Option<ByteSize>,
            idle: Option<Dur>,
        }
        fn full() -> Mode {
            Mode::Full
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopicSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a topic name or a table { name, mode, max_bytes, idle }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TopicSpec, E> {
                Ok(TopicSpec {
                    name: v.to_string(),
                    mode: Mode::Full,
                    max_bytes: None,
                    idle: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TopicSpec, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(TopicSpec {
                    name: t.name,
                    mode: t.mode,
                    max_bytes: t.max_bytes,
                    idle: t.idle,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl SidecarConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        super::load_checked(path)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        super::parse_checked(file, text)
    }

    /// Checks what the types alone cannot: names unique and well formed, addresses usable,
    /// bounds non-zero, views well formed.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let grpc = self.listen.grpc.tcp();
        if let Some(g) = grpc {
            if !self.listen.allow_non_loopback && !g.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    file,
                    "listen.grpc",
                    format!(
                        "{g} is not a loopback address; set listen.allow_non_loopback = true to serve beyond this host"
                    ),
                ));
            }
        }
        if self.listen.grpc_socket_mode > 0o777 {
            return Err(ConfigError::invalid(
                file,
                "listen.grpc_socket_mode",
                format!(
                    "{:#o} is not a file mode (at most 0o777)",
                    self.listen.grpc_socket_mode
                ),
            ));
        }
        if let (ListenAddr::Unix(g), Some(ListenAddr::Unix(r))) =
            (&self.listen.grpc, &self.listen.redis)
        {
            if g == r {
                return Err(ConfigError::invalid(
                    file,
                    "listen.redis",
                    format!(
                        "{} is also listen.grpc; give each listener its own socket",
                        g.display()
                    ),
                ));
            }
        }
        let http = self.listen.http_addr();
        if !self.listen.allow_non_loopback && !http.ip().is_loopback() {
            return Err(ConfigError::invalid(
                file,
                "listen.http",
                format!(
                    "{http} is not a loopback address; set listen.allow_non_loopback = true to serve beyond this host"
                ),
            ));
        }
        if http.port() != 0 && Some(http) == grpc {
            return Err(ConfigError::invalid(
                file,
                "listen.http",
                format!("{http} is also listen.grpc; give each listener its own port"),
            ));
        }
        for (field, d) in [
            ("listen.keepalive_interval", self.listen.keepalive_interval),
            ("listen.keepalive_timeout", self.listen.keepalive_timeout),
        ] {
            super::check_duration(file, field, d, MIN_KEEPALIVE, MAX_KEEPALIVE)?;
        }
        for (field, n) in [
            (
                "listen.http_max_connections",
                self.listen.http_max_connections,
            ),
            (
                "listen.grpc_max_connections",
                self.listen.grpc_max_connections,
            ),
        ] {
            check_range(file, field, n, 1, MAX_COUNT)?;
        }
        for (field, d) in [
            (
                "listen.http_header_timeout",
                self.listen.http_header_timeout,
            ),
            (
                "listen.grpc_header_timeout",
                self.listen.grpc_header_timeout,
            ),
        ] {
            super::check_duration(file, field, d, MIN_HEADER_TIMEOUT, MAX_KEEPALIVE)?;
        }
        if let Some(ListenAddr::Tcp(redis)) = self.listen.redis {
            if !self.listen.allow_non_loopback && !redis.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    file,
                    "listen.redis",
                    format!(
                        "{redis} is not a loopback address; set listen.allow_non_loopback = true to serve beyond this host"
                    ),
                ));
            }
            if redis.port() != 0 && (Some(redis) == grpc || redis == http) {
                return Err(ConfigError::invalid(
                    file,
                    "listen.redis",
                    format!("{redis} is also another listener's address; give each listener its own port"),
                ));
            }
        }
        self.ws.validate(file)?;
        self.redis.validate(file)?;
        if let Some(feed) = self.listen.feed {
            if !self.listen.allow_non_loopback && !feed.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    file,
                    "listen.feed",
                    format!(
                        "{feed} is not a loopback address; set listen.allow_non_loopback = true to serve beyond this host"
                    ),
                ));
            }
            if feed.port() != 0 && (Some(feed) == grpc || feed == http) {
                return Err(ConfigError::invalid(
                    file,
                    "listen.feed",
                    format!("{feed} is also another listener's address; give each listener its own port"),
                ));
            }
            if !self
                .origins
                .iter()
                .any(|o| o.topics.iter().any(|t| t.mode == Mode::Full))
                && self.views.is_empty()
            {
                return Err(ConfigError::invalid(
                    file,
                    "listen.feed",
                    "this sidecar has no full topic and no view to relay (on_demand topics are not relayed)",
                ));
            }
        }
        self.relay.validate(file)?;
        let l = &self.limits;
        for (field, v) in [
            ("limits.max_batch_keys", l.max_batch_keys),
            ("limits.watch_queue", l.watch_queue),
            ("limits.max_watches", l.max_watches),
            ("limits.max_watch_keys", l.max_watch_keys),
            ("limits.writer_queue", l.writer_queue),
            ("limits.scan_default_limit", l.scan_default_limit as usize),
            ("limits.scan_max_limit", l.scan_max_limit as usize),
            (
                "limits.max_concurrent_streams",
                l.max_concurrent_streams as usize,
            ),
        ] {
            check_range(file, field, v, 1, MAX_COUNT)?;
        }
        check_range(
            file,
            "limits.batch_read_attempts",
            l.batch_read_attempts,
            1,
            MAX_BATCH_READ_ATTEMPTS,
        )?;
        check_range(
            file,
            "limits.watch_send_buffer",
            l.watch_send_buffer,
            1,
            4096,
        )?;
        super::check_positive(file, "limits.watch_send_timeout", l.watch_send_timeout)?;
        check_range(
            file,
            "limits.writer_batch",
            l.writer_batch,
            1,
            MAX_WRITER_BATCH,
        )?;
        if l.max_message_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                file,
                "limits.max_message_bytes",
                "must be at least 1KiB",
            ));
        }
        let f = &self.feed;
        for (field, d, min, max) in [
            (
                "feed.connect_timeout",
                f.connect_timeout,
                MIN_KEEPALIVE,
                MAX_KEEPALIVE,
            ),
            (
                "feed.keepalive_interval",
                f.keepalive_interval,
                MIN_KEEPALIVE,
                MAX_KEEPALIVE,
            ),
            (
                "feed.keepalive_timeout",
                f.keepalive_timeout,
                MIN_KEEPALIVE,
                MAX_KEEPALIVE,
            ),
            // 0 would redial at once, for ever; origins send Progress every few seconds, so a
            // value below that only suits a test of the timeout itself.
            (
                "feed.idle_timeout",
                f.idle_timeout,
                MIN_KEEPALIVE,
                MAX_KEEPALIVE,
            ),
            (
                "feed.live_window",
                f.live_window,
                Duration::from_millis(1),
                MAX_KEEPALIVE,
            ),
            (
                "feed.backoff_max",
                f.backoff_max,
                Duration::from_millis(1),
                MAX_KEEPALIVE,
            ),
        ] {
            super::check_duration(file, field, d, min, max)?;
        }
        if self.feed.backoff_initial.0.is_zero()
            || self.feed.backoff_max < self.feed.backoff_initial
        {
            return Err(ConfigError::invalid(
                file,
                "feed.backoff_initial",
                "must be above 0 and at most feed.backoff_max",
            ));
        }
        let mut names = HashSet::new();
        let mut origin_names = HashSet::new();
        for (i, o) in self.origins.iter().enumerate() {
            let at = format!("origin[{i}]");
            check_name(file, &format!("{at}.name"), &o.name)?;
            if !origin_names.insert(o.name.as_str()) {
                return Err(ConfigError::invalid(
                    file,
                    format!("{at}.name"),
                    format!("duplicate origin name '{}'", o.name),
                ));
            }
            if let Err(why) = check_address(&o.address) {
                return Err(ConfigError::invalid(file, format!("{at}.address"), why));
            }
            for (j, a) in o.fallback.iter().enumerate() {
                let field = format!("{at}.address[{}]", j + 1);
                if let Err(why) = check_address(a) {
                    return Err(ConfigError::invalid(file, field, why));
                }
                if a.starts_with("https://") != o.address.starts_with("https://") {
                    return Err(ConfigError::invalid(
                        file,
                        field,
                        "every address of an origin uses the same scheme (tls applies to each)",
                    ));
                }
            }
            match (&o.tls, o.address.starts_with("https://")) {
                (None, true) => return Err(ConfigError::invalid(
                    file,
                    format!("{at}.tls"),
                    "an https:// origin needs tls = { ca = \"ca.pem\" } (and cert, key for mTLS)",
                )),
                (Some(_), false) => {
                    return Err(ConfigError::invalid(
                        file,
                        format!("{at}.address"),
                        "tls is set, so the address must be https://",
                    ))
                }
                (Some(tls), true) => {
                    if tls.cert.is_some() != tls.key.is_some() {
                        return Err(ConfigError::invalid(
                            file,
                            format!("{at}.tls"),
                            "cert and key go together (both for mTLS, or neither)",
                        ));
                    }
                    super::check_tls_files(file, &format!("{at}.tls"), tls.files())?;
                }
                (None, false) => {}
            }
            if o.topics.is_empty() {
                return Err(ConfigError::invalid(
                    file,
                    format!("{at}.topics"),
                    "lists no topics",
                ));
            }
            for (j, t) in o.topics.iter().enumerate() {
                let tat = format!("{at}.topics[{j}]");
                check_name(file, &tat, &t.name)?;
                if t.mode == Mode::OnDemand {
                    check_on_demand(file, &tat, t)?;
                } else if t.max_bytes.is_some() || t.idle.is_some() {
                    return Err(ConfigError::invalid(
                        file,
                        tat,
                        "max_bytes and idle apply only to mode = \"on_demand\"",
                    ));
                }
                if !names.insert(t.name.clone()) {
                    return Err(ConfigError::invalid(
                        file,
                        format!("{tat}.name"),
                        format!("duplicate source name '{}'", t.name),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl WsConfig {
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        for (field, v) in [
            ("ws.max_connections", self.max_connections),
            ("ws.max_subscriptions", self.max_subscriptions),
            ("ws.max_keys", self.max_keys),
            ("ws.queue", self.queue),
            ("ws.max_resets", self.max_resets as usize),
            ("ws.max_waiting_gets", self.max_waiting_gets),
        ] {
            check_range(file, field, v, 1, MAX_COUNT)?;
        }
        if self.max_message_bytes.0 < 256 {
            return Err(ConfigError::invalid(
                file,
                "ws.max_message_bytes",
                "must be at least 256B",
            ));
        }
        if self.write_buffer_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                file,
                "ws.write_buffer_bytes",
                "must be at least 1KiB",
            ));
        }
        check_range(
            file,
            "ws.send_batch_frames",
            self.send_batch_frames,
            1,
            MAX_WS_SEND_BATCH_FRAMES,
        )?;
        if !(MIN_WS_READ_BUFFER..=MAX_WS_READ_BUFFER).contains(&self.read_buffer_bytes) {
            return Err(ConfigError::invalid(
                file,
                "ws.read_buffer_bytes",
                format!(
                    "must be between {MIN_WS_READ_BUFFER} and {MAX_WS_READ_BUFFER}, got {}",
                    self.read_buffer_bytes
                ),
            ));
        }
        check_range(
            file,
            "ws.command_queue",
            self.command_queue,
            1,
            MAX_WS_COMMAND_QUEUE,
        )?;
        for (field, d) in [
            ("ws.reset_window", self.reset_window),
            ("ws.ping_interval", self.ping_interval),
            ("ws.send_timeout", self.send_timeout),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::invalid(file, field, "must be above 0"));
            }
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(ConfigError::invalid(
                file,
                "ws.idle_timeout",
                "must be longer than ws.ping_interval (a client only answers pings)",
            ));
        }
        super::check_token(
            file,
            "ws.token",
            self.token.as_deref(),
            "remove it to accept clients without a token",
        )?;
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if o.contains('*') {
                return Err(ConfigError::invalid(
                    file,
                    format!("ws.allowed_origins[{i}]"),
                    format!("{o:?}: wildcards are not supported; list each origin, or leave allowed_origins empty to accept any"),
                ));
            }
            let scheme_ok = o.starts_with("http://") || o.starts_with("https://");
            let rest = o.split_once("://").map_or("", |(_, r)| r);
            if o.is_empty() || !scheme_ok || rest.is_empty() || rest.contains('/') {
                return Err(ConfigError::invalid(
                    file,
                    format!("ws.allowed_origins[{i}]"),
                    format!("expected an origin such as \"https://app.example.com\" (scheme, host, optional port; no path), got {o:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// A human-readable summary of a valid config: listeners, origins and their topics (the view
/// graph is described by `views`).
pub fn describe(cfg: &SidecarConfig) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "listen.grpc = {}", cfg.listen.grpc);
    let _ = writeln!(
        out,
        "listen.http = {} (WebSocket /ws)",
        cfg.listen.http_addr()
    );
    for o in &cfg.origins {
        let _ = writeln!(
            out,
            "origin {} ({})",
            o.name,
            o.addresses()
                .iter()
                .map(|a| crate::types::redact_address(a))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for t in &o.topics {
            let _ = writeln!(out, "  topic {} [{}]", t.name, t.mode.as_str());
        }
    }
    out
}

/// Shortest header (first bytes) timeout of a listener.
pub(crate) const MIN_HEADER_TIMEOUT: Duration = Duration::from_millis(100);
/// Bounds of an HTTP/2 keepalive setting: shorter floods the peer with pings, longer leaves a
/// dead peer unnoticed for hours.
pub(crate) const MIN_KEEPALIVE: Duration = Duration::from_millis(100);
pub(crate) const MAX_KEEPALIVE: Duration = Duration::from_secs(3600);

/// Largest count of any bound (connections, streams, keys, queue entries): far above what one
/// process serves, far below what makes a semaphore or a channel panic.
pub(crate) const MAX_COUNT: usize = 10_000_000;

/// Largest `limits.batch_read_attempts`: with the wait before each retry, about 20s.
const MAX_BATCH_READ_ATTEMPTS: usize = 1000;
/// Largest `limits.writer_batch`: readers see nothing of a step until all of it is applied.
const MAX_WRITER_BATCH: usize = 65_536;

/// Largest `ws.send_batch_frames`.
const MAX_WS_SEND_BATCH_FRAMES: usize = 4096;
/// Bounds of `ws.read_buffer_bytes`: each read zeroes this much, so more only costs.
const MIN_WS_READ_BUFFER: ByteSize = ByteSize(256);
const MAX_WS_READ_BUFFER: ByteSize = ByteSize(1 << 20);
/// Largest `ws.command_queue`: each request may be up to `ws.max_message_bytes`.
const MAX_WS_COMMAND_QUEUE: usize = 1024;
