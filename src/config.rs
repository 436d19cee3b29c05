//! The TOML configuration of the sidecar and of the origin, validated with errors that name the
//! file, the field and what was expected.
//!
//! Unknown keys are errors everywhere (`deny_unknown_fields`): a typo must never silently fall
//! back to a default.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::views::ViewSpec;

mod redis;
pub use redis::{ListenAddr, RedisConfig};

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        file: &str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            file: file.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A byte count written as an integer or as a string with a unit: `"64MiB"`, `"512KiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: u64 = num
            .replace('_', "")
            .parse()
            .map_err(|_| format!("expected a size such as \"64MiB\", got {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (expected B, KiB, MiB, GiB, KB, MB or GB)"
                ))
            }
        };
        num.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }

    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 20 && b % (1 << 20) == 0 {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b % (1 << 10) == 0 {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte size: an integer or a string such as \"64MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as a string with a unit: `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("expected a duration such as \"10s\", got {s:?}"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} in {s:?} (expected ms, s, m or h)"
                ))
            }
        };
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(de::Error::custom)
    }
}

/// `viewcar.toml`: what the sidecar replicates, which views it maintains and where it serves them.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
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
    #[serde(default, rename = "origin")]
    pub origins: Vec<OriginSpec>,
    #[serde(default, rename = "view")]
    pub views: Vec<ViewSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// The Cache gRPC API.
    #[serde(default = "default_grpc")]
    pub grpc: SocketAddr,
    /// The HTTP listener: WebSocket `/ws` (and the admin endpoints). Unset means
    /// 127.0.0.1:7071, or port 0 (any free port) when `grpc` asks for port 0, so that
    /// ephemeral sidecars (tests, tools) never collide on a fixed port.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// The Redis protocol (RESP2 and RESP3, read-only): `host:port` or `unix:/path`; unset =
    /// not served.
    #[serde(default)]
    pub redis: Option<ListenAddr>,
    /// Serve on an address other than loopback; off by default so a sidecar is never exposed by
    /// accident.
    #[serde(default)]
    pub allow_non_loopback: bool,
}

fn default_grpc() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: default_grpc(),
            http: None,
            redis: None,
            allow_non_loopback: false,
        }
    }
}

impl ListenConfig {
    /// Where the HTTP listener binds (see [`ListenConfig::http`]).
    pub fn http_addr(&self) -> SocketAddr {
        match self.http {
            Some(a) => a,
            None if self.grpc.port() == 0 => SocketAddr::new(self.grpc.ip(), 0),
            None => SocketAddr::from(([127, 0, 0, 1], 7071)),
        }
    }
}

/// Bounds and access rules of the WebSocket endpoint (`/ws`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
    /// name one of these, such as "https://app.example.com"; otherwise 403. Requests without
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
#[serde(deny_unknown_fields, default)]
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
#[serde(deny_unknown_fields, default)]
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

/// How the sidecar holds its feed streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
        }
    }
}

/// One upstream origin and the topics replicated from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSpec {
    pub name: String,
    /// `http://host:port`, or `https://host:port` with `tls`.
    pub address: String,
    pub topics: Vec<TopicSpec>,
    /// TLS to this origin: the CA to verify it with, and a client certificate for mTLS.
    #[serde(default)]
    pub tls: Option<crate::tls::ClientTls>,
}

/// How a topic is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every key, kept up to date.
    Full,
    /// Only the keys read lately, within a byte budget.
    OnDemand,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::OnDemand => "on_demand",
        }
    }
}

/// Budget of an on_demand topic without `max_bytes`.
pub const DEFAULT_ON_DEMAND_BYTES: u64 = 64 << 20;
/// Smallest `max_bytes` of an on_demand topic: room for a few dozen small keys.
pub const MIN_ON_DEMAND_BYTES: u64 = 16 << 10;

impl TopicSpec {
    /// The byte budget of an on_demand topic (`max_bytes`, or 64 MiB).
    pub fn budget(&self) -> u64 {
        self.max_bytes.map_or(DEFAULT_ON_DEMAND_BYTES, |b| b.0)
    }
}

fn check_on_demand(file: &str, at: &str, t: &TopicSpec) -> Result<(), ConfigError> {
    if let Some(b) = t.max_bytes {
        if b.0 < MIN_ON_DEMAND_BYTES {
            return Err(ConfigError::invalid(
                file,
                format!("{at}.max_bytes"),
                format!("{} bytes is below the minimum of 16KiB", b.0),
            ));
        }
    }
    if let Some(idle) = t.idle {
        if idle.0 < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                file,
                format!("{at}.idle"),
                "must be at least 1s (omit it to keep keys until the budget evicts them)",
            ));
        }
    }
    Ok(())
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

/// A config file's name (for errors) and text.
fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(source) => Err(ConfigError::Read { file, source }),
    }
}

/// TOML into a config type; the error names the file (toml's message names the key and line).
fn from_toml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

impl SidecarConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (file, text) = read(path)?;
        Self::parse(&file, &text)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: SidecarConfig = from_toml(file, text)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Checks what the types alone cannot: names unique and well formed, addresses usable,
    /// bounds non-zero, views well formed.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        if !self.listen.allow_non_loopback && !self.listen.grpc.ip().is_loopback() {
            return Err(ConfigError::invalid(
                file,
                "listen.grpc",
                format!(
                    "{} is not a loopback address; set listen.allow_non_loopback = true to serve beyond this host",
                    self.listen.grpc
                ),
            ));
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
        if http.port() != 0 && http == self.listen.grpc {
            return Err(ConfigError::invalid(
                file,
                "listen.http",
                format!("{http} is also listen.grpc; give each listener its own port"),
            ));
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
            if redis.port() != 0 && (redis == self.listen.grpc || redis == http) {
                return Err(ConfigError::invalid(
                    file,
                    "listen.redis",
                    format!("{redis} is also another listener's address; give each listener its own port"),
                ));
            }
        }
        self.ws.validate(file)?;
        self.redis.validate(file)?;
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
            if v == 0 {
                return Err(ConfigError::invalid(file, field, "must be at least 1"));
            }
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
            if !(o.address.starts_with("http://") || o.address.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    file,
                    format!("{at}.address"),
                    format!("expected http://host:port, got {:?}", o.address),
                ));
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
                    crate::tls::check_files(file, &format!("{at}.tls"), tls.files())?;
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
        crate::views::validate_specs(file, &self.views, &names)?;
        let on_demand: HashSet<String> = self
            .origins
            .iter()
            .flat_map(|o| &o.topics)
            .filter(|t| t.mode == Mode::OnDemand)
            .map(|t| t.name.clone())
            .collect();
        crate::views::check_on_demand_views(file, &self.views, &on_demand)?;
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
            if v == 0 {
                return Err(ConfigError::invalid(file, field, "must be at least 1"));
            }
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
        if self.token.as_deref().is_some_and(|t| t.is_empty()) {
            return Err(ConfigError::invalid(
                file,
                "ws.token",
                "is empty; remove it to accept clients without a token",
            ));
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if o.is_empty() || o.ends_with('/') {
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

/// Prefix and suffix of the environment variables that set an origin's address:
/// `VIEWCAR_ORIGIN_<NAME>_ADDRESS`.
const ORIGIN_ENV_PREFIX: &str = "VIEWCAR_ORIGIN_";
const ORIGIN_ENV_SUFFIX: &str = "_ADDRESS";

/// The environment variable that sets the address of the `[[origin]]` named `name`:
/// `VIEWCAR_ORIGIN_<NAME>_ADDRESS`, with the name upper-cased and `-` and `.` written as `_`
/// (origin `catalog-eu` -> `VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS`).
pub fn origin_address_env(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("{ORIGIN_ENV_PREFIX}{name}{ORIGIN_ENV_SUFFIX}")
}

impl SidecarConfig {
    /// Points the `[[origin]]` named `name` at `address`. `from` says where the setting came
    /// from, for errors. Naming no origin is an error: an override must never be silently
    /// ignored. Call [`SidecarConfig::validate`] afterwards.
    pub fn set_origin_address(
        &mut self,
        name: &str,
        address: &str,
        from: &str,
    ) -> Result<(), ConfigError> {
        match self.origins.iter_mut().find(|o| o.name == name) {
            Some(o) => {
                o.address = address.to_string();
                Ok(())
            }
            None => Err(ConfigError::invalid(
                from,
                name,
                format!("no [[origin]] has this name ({})", self.origin_names()),
            )),
        }
    }

    /// Applies every `VIEWCAR_ORIGIN_<NAME>_ADDRESS` among `vars` (the process environment, in
    /// the binary). A variable that matches no origin, or two origins whose names differ only
    /// by case, `-` or `.`, is an error. Call [`SidecarConfig::validate`] afterwards.
    pub fn apply_origin_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, value) in vars {
            if !(var.starts_with(ORIGIN_ENV_PREFIX)
                && var.ends_with(ORIGIN_ENV_SUFFIX)
                && var.len() > ORIGIN_ENV_PREFIX.len() + ORIGIN_ENV_SUFFIX.len())
            {
                continue;
            }
            let matching: Vec<usize> = (0..self.origins.len())
                .filter(|&i| origin_address_env(&self.origins[i].name) == var)
                .collect();
            match matching.as_slice() {
                [i] => self.origins[*i].address = value,
                [] => {
                    return Err(ConfigError::invalid(
                        "environment",
                        var,
                        format!("names no [[origin]] ({})", self.origin_names()),
                    ))
                }
                _ => {
                    return Err(ConfigError::invalid(
                        "environment",
                        var,
                        "matches more than one [[origin]]; use --origin NAME=ADDRESS",
                    ))
                }
            }
        }
        Ok(())
    }

    fn origin_names(&self) -> String {
        if self.origins.is_empty() {
            return "the config declares none".to_string();
        }
        let names: Vec<String> = self
            .origins
            .iter()
            .map(|o| format!("'{}' ({})", o.name, origin_address_env(&o.name)))
            .collect();
        format!("origins: {}", names.join(", "))
    }
}

/// A human-readable summary of a valid config: listeners, origins and their topics, views.
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
        let _ = writeln!(out, "origin {} ({})", o.name, o.address);
        for t in &o.topics {
            let _ = writeln!(out, "  topic {} [{}]", t.name, t.mode.as_str());
        }
    }
    out.push_str(&crate::views::describe(&cfg.views));
    out
}

/// Refuses a count outside `min..=max`: zero, or so large that it is surely a mistake.
fn check_range(
    file: &str,
    field: &str,
    v: usize,
    min: usize,
    max: usize,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            field,
            format!("must be between {min} and {max}, got {v}"),
        ))
    }
}

/// Largest `stream_send_buffer`: each message may be up to `max_message_bytes`.
const MAX_STREAM_SEND_BUFFER: usize = 1024;

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

/// Source names are what readers type: keep them to a safe alphabet.
pub(crate) fn check_name(file: &str, field: &str, name: &str) -> Result<(), ConfigError> {
    crate::views::check_name(name).map_err(|message| ConfigError::invalid(file, field, message))
}

/// `origin.toml`: the settings of viewcar's own origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Where `Feed` is served.
    pub listen: SocketAddr,
    /// Declared topics. When non-empty, publishing to or subscribing to any other topic is an
    /// error; when empty, topics are created on first use.
    pub topics: Vec<String>,
    /// Data loaded at start: JSON `{"topic": {"key": value}}` or NDJSON lines
    /// `{"topic": "t", "key": "k", "value": v}`.
    pub seed: Option<PathBuf>,
    /// Changes kept per topic so that sidecars resume without a snapshot: at most this many
    /// batches and this many bytes, whichever bound is hit first.
    pub retain_batches: usize,
    pub retain_bytes: ByteSize,
    /// Batches queued per Sync stream; a stream that overflows is caught up by Reset + snapshot.
    pub stream_queue: usize,
    /// Messages (batches, snapshot chunks, Progress) of one Sync stream waiting for the transport
    /// to take them, each up to `max_message_bytes`. When it is full the stream sends nothing
    /// more until the sidecar reads, so its `stream_queue` fills instead.
    pub stream_send_buffer: usize,
    /// Snapshot chunk bounds.
    pub snapshot_chunk_entries: usize,
    pub snapshot_chunk_bytes: ByteSize,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: ByteSize,
    /// Most changes in one Publish.
    pub max_publish_changes: usize,
    /// Most concurrent Sync streams.
    pub max_streams: usize,
    /// Most keys one Sync stream may subscribe to in one topic (keyed interest, on_demand
    /// sidecars); a Subscribe past it ends the stream with RESOURCE_EXHAUSTED.
    pub max_subscribed_keys: usize,
    /// HTTP/2 keepalive of the Feed server: a ping after this long without frames ...
    pub keepalive_interval: Dur,
    /// ... and the connection is closed when its ack takes longer than this.
    pub keepalive_timeout: Dur,
    /// How often an idle subscription gets a Progress message.
    pub progress_interval: Dur,
    /// Serve on an address other than loopback.
    pub allow_non_loopback: bool,
    /// Serve Feed over TLS; with `client_ca`, only to clients with a certificate it signed.
    pub tls: Option<crate::tls::ServerTls>,
    /// When set, `Publish` must carry `authorization: Bearer <token>`; otherwise it is refused
    /// (UNAUTHENTICATED) before anything is applied. Sync and Fetch are not affected (use mTLS
    /// to restrict who may read).
    pub publish_token: Option<String>,
    /// Where the origin keeps its durable copy (a redb file, `origin.redb`): topics, the
    /// retained change window and the epoch survive a restart, so sidecars resume without a
    /// snapshot. `None` = in memory only: a restart is a new epoch and every sidecar resnapshots.
    pub data_dir: Option<PathBuf>,
    /// When a published batch reaches the disk (with `data_dir`).
    pub fsync: Fsync,
    /// With `fsync = "interval"`: how often the batches written since the last sync are synced.
    pub fsync_interval: Dur,
    /// The durable store's page cache (with `data_dir`). Served data is in memory anyway; the
    /// cache serves the store's own writes and the load at start.
    pub cache_bytes: ByteSize,
}

/// When the durable origin syncs a batch to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Every batch is synced before its Publish is acknowledged: an acknowledged batch survives
    /// a crash or power loss. Costs one fsync per Publish.
    #[default]
    EveryBatch,
    /// Batches are written at once but synced every `fsync_interval`: publishes are not paced
    /// by the disk, and a crash can lose the batches of the last interval. A start after such a
    /// crash begins a new epoch, so sidecars resnapshot instead of trusting reissued versions.
    Interval,
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            topics: Vec::new(),
            seed: None,
            retain_batches: 100_000,
            retain_bytes: ByteSize(64 << 20),
            stream_queue: 4096,
            stream_send_buffer: 16,
            snapshot_chunk_entries: 1000,
            snapshot_chunk_bytes: ByteSize(1 << 20),
            max_message_bytes: ByteSize(16 << 20),
            max_publish_changes: 10_000,
            max_streams: 1024,
            max_subscribed_keys: 1_000_000,
            keepalive_interval: Dur(Duration::from_secs(10)),
            keepalive_timeout: Dur(Duration::from_secs(10)),
            progress_interval: Dur(Duration::from_secs(2)),
            allow_non_loopback: false,
            tls: None,
            publish_token: None,
            data_dir: None,
            fsync: Fsync::EveryBatch,
            fsync_interval: Dur(Duration::from_secs(1)),
            cache_bytes: ByteSize(64 << 20),
        }
    }
}

impl OriginConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (file, text) = read(path)?;
        Self::parse(&file, &text)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: OriginConfig = from_toml(file, text)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        if !self.allow_non_loopback && !self.listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                file,
                "listen",
                format!(
                    "{} is not a loopback address; set allow_non_loopback = true to serve beyond this host",
                    self.listen
                ),
            ));
        }
        for (i, t) in self.topics.iter().enumerate() {
            check_name(file, &format!("topics[{i}]"), t)?;
        }
        for (field, v) in [
            ("retain_batches", self.retain_batches),
            ("stream_queue", self.stream_queue),
            ("snapshot_chunk_entries", self.snapshot_chunk_entries),
            ("max_publish_changes", self.max_publish_changes),
            ("max_streams", self.max_streams),
            ("max_subscribed_keys", self.max_subscribed_keys),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(file, field, "must be at least 1"));
            }
        }
        check_range(
            file,
            "stream_send_buffer",
            self.stream_send_buffer,
            1,
            MAX_STREAM_SEND_BUFFER,
        )?;
        for (field, d) in [
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if d.0 < Duration::from_millis(100) {
                return Err(ConfigError::invalid(file, field, "must be at least 100ms"));
            }
        }
        if self.max_message_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                file,
                "max_message_bytes",
                "must be at least 1KiB",
            ));
        }
        if self.snapshot_chunk_bytes >= self.max_message_bytes {
            return Err(ConfigError::invalid(
                file,
                "snapshot_chunk_bytes",
                "must be below max_message_bytes",
            ));
        }
        if self.progress_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                file,
                "progress_interval",
                "must be above 0",
            ));
        }
        if self.cache_bytes.0 < (1 << 20) {
            return Err(ConfigError::invalid(
                file,
                "cache_bytes",
                "must be at least 1MiB",
            ));
        }
        if self.fsync_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                file,
                "fsync_interval",
                "must be above 0",
            ));
        }
        if self
            .data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(ConfigError::invalid(
                file,
                "data_dir",
                "is empty; remove it to keep the origin in memory",
            ));
        }
        if self.publish_token.as_deref().is_some_and(|t| t.is_empty()) {
            return Err(ConfigError::invalid(
                file,
                "publish_token",
                "is empty; remove it to accept publishes without a token",
            ));
        }
        if let Some(tls) = &self.tls {
            crate::tls::check_files(file, "tls", tls.files())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(ByteSize::parse("64MiB").unwrap(), ByteSize(64 << 20));
        assert_eq!(ByteSize::parse("1_000").unwrap(), ByteSize(1000));
        assert_eq!(ByteSize::parse("2KB").unwrap(), ByteSize(2000));
        assert!(ByteSize::parse("5XB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert_eq!(
            Dur::parse("250ms").unwrap(),
            Dur(Duration::from_millis(250))
        );
        assert_eq!(Dur::parse("10m").unwrap(), Dur(Duration::from_secs(600)));
        assert!(Dur::parse("10").unwrap_err().contains("unit"));
    }

    #[test]
    fn minimal_config_parses_with_topic_tables() {
        let cfg = SidecarConfig::parse(
            "t.toml",
            r#"
            [listen]
            grpc = "127.0.0.1:0"
            [[origin]]
            name = "catalog"
            address = "http://127.0.0.1:7000"
            topics = ["products", { name = "prices" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.origins[0].topics[1].name, "prices");
        assert_eq!(cfg.origins[0].topics[1].mode, Mode::Full);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = SidecarConfig::parse("t.toml", "[listen]\ngrcp = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml:"), "{err}");
        assert!(err.contains("grcp"), "{err}");
        let err = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"o\"\naddress = \"http://x:1\"\ntopics = [{ name = \"a\", mdoe = \"full\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mdoe"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"o\"\naddress = \"127.0.0.1:7000\"\ntopics = [\"a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("origin[0].address"), "{err}");
        let err = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"o\"\naddress = \"http://a:1\"\ntopics = [\"a\"]\n[[origin]]\nname = \"p\"\naddress = \"http://a:1\"\ntopics = [\"a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("duplicate source name 'a'"), "{err}");
        let err = SidecarConfig::parse("t.toml", "[listen]\ngrpc = \"0.0.0.0:7070\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_non_loopback"), "{err}");
    }

    #[test]
    fn origin_addresses_come_from_the_environment() {
        let mut cfg = SidecarConfig::parse(
            "t.toml",
            "[[origin]]\nname = \"catalog-eu\"\naddress = \"http://127.0.0.1:1\"\ntopics = [\"a\"]\n[[origin]]\nname = \"users\"\naddress = \"http://127.0.0.1:2\"\ntopics = [\"b\"]\n",
        )
        .unwrap();
        assert_eq!(
            origin_address_env("catalog-eu"),
            "VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS"
        );
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        cfg.apply_origin_env(env(&[
            ("PATH", "/bin"),
            ("VIEWCAR_ORIGIN_LISTEN", "0.0.0.0:7000"),
            ("VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS", "http://catalog:7000"),
        ]))
        .unwrap();
        assert_eq!(cfg.origins[0].address, "http://catalog:7000");
        assert_eq!(cfg.origins[1].address, "http://127.0.0.1:2");
        let err = cfg
            .apply_origin_env(env(&[("VIEWCAR_ORIGIN_USER_ADDRESS", "http://x:1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VIEWCAR_ORIGIN_USER_ADDRESS"), "{err}");
        assert!(err.contains("VIEWCAR_ORIGIN_USERS_ADDRESS"), "{err}");
        cfg.set_origin_address("users", "http://users:7000", "--origin")
            .unwrap();
        assert_eq!(cfg.origins[1].address, "http://users:7000");
        let err = cfg
            .set_origin_address("nope", "http://x:1", "--origin")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--origin: nope:"), "{err}");
        cfg.set_origin_address("users", "users:7000", "--origin")
            .unwrap();
        let err = cfg.validate("t.toml").unwrap_err().to_string();
        assert!(err.contains("origin[1].address"), "{err}");
    }

    #[test]
    fn http_listener_defaults_and_ws_limits_validate() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.listen.http_addr(), "127.0.0.1:7071".parse().unwrap());
        let cfg = SidecarConfig::parse("t.toml", "[listen]\ngrpc = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(cfg.listen.http_addr().port(), 0);
        let cfg = SidecarConfig::parse(
            "t.toml",
            "[listen]\nhttp = \"127.0.0.1:9000\"\n[ws]\nqueue = 10\nmax_message_bytes = \"1KiB\"\ntoken = \"s3cret\"\nallowed_origins = [\"https://app.example.com\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.listen.http_addr().port(), 9000);
        assert_eq!(cfg.ws.queue, 10);
        assert_eq!(cfg.ws.max_message_bytes, ByteSize(1024));
        for (text, field) in [
            ("[ws]\nqeue = 1\n", "qeue"),
            ("[ws]\nqueue = 0\n", "ws.queue"),
            (
                "[ws]\nidle_timeout = \"1s\"\nping_interval = \"2s\"\n",
                "ws.idle_timeout",
            ),
            ("[ws]\ntoken = \"\"\n", "ws.token"),
            (
                "[ws]\nallowed_origins = [\"https://a.example/\"]\n",
                "ws.allowed_origins[0]",
            ),
            ("[listen]\nhttp = \"0.0.0.0:7071\"\n", "listen.http"),
            ("[listen]\nhttp = \"127.0.0.1:7070\"\n", "listen.http"),
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn origin_stream_send_buffer_defaults_and_validates() {
        let cfg = OriginConfig::parse("o.toml", "").unwrap();
        assert_eq!(cfg.stream_send_buffer, 16);
        let cfg = OriginConfig::parse("o.toml", "stream_send_buffer = 64\n").unwrap();
        assert_eq!(cfg.stream_send_buffer, 64);
        for text in [
            "stream_send_buffer = 0\n",
            "stream_send_buffer = 1025\n",
            "stream_send_buffer = -1\n",
        ] {
            let err = OriginConfig::parse("o.toml", text).unwrap_err().to_string();
            assert!(err.starts_with("o.toml:"), "{text}: {err}");
            assert!(err.contains("stream_send_buffer"), "{text}: {err}");
        }
    }

    #[test]
    fn origin_subscription_and_keepalive_bounds_default_and_validate() {
        let cfg = OriginConfig::parse("o.toml", "").unwrap();
        assert_eq!(cfg.max_subscribed_keys, 1_000_000);
        assert_eq!(cfg.keepalive_interval.0, Duration::from_secs(10));
        let cfg = OriginConfig::parse(
            "o.toml",
            "max_subscribed_keys = 5\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(cfg.max_subscribed_keys, 5);
        assert_eq!(cfg.keepalive_timeout.0, Duration::from_secs(2));
        for (text, key) in [
            ("max_subscribed_keys = 0\n", "max_subscribed_keys"),
            ("keepalive_interval = \"10ms\"\n", "keepalive_interval"),
            ("keepalive_timeout = \"0s\"\n", "keepalive_timeout"),
        ] {
            let err = OriginConfig::parse("o.toml", text).unwrap_err().to_string();
            assert!(
                err.starts_with("o.toml:") && err.contains(key),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn ws_connection_buffers_default_and_validate() {
        let ws = SidecarConfig::parse("t.toml", "").unwrap().ws;
        assert_eq!(ws.send_batch_frames, 128);
        assert_eq!(ws.read_buffer_bytes, ByteSize(4096));
        assert_eq!(ws.command_queue, 32);
        let ws = SidecarConfig::parse(
            "t.toml",
            "[ws]\nsend_batch_frames = 1\nread_buffer_bytes = \"64KiB\"\ncommand_queue = 8\n",
        )
        .unwrap()
        .ws;
        assert_eq!(ws.send_batch_frames, 1);
        assert_eq!(ws.read_buffer_bytes, ByteSize(64 << 10));
        assert_eq!(ws.command_queue, 8);
        for (text, field) in [
            ("[ws]\nsend_batch_frames = 0\n", "ws.send_batch_frames"),
            ("[ws]\nsend_batch_frames = 4097\n", "ws.send_batch_frames"),
            ("[ws]\nread_buffer_bytes = 0\n", "ws.read_buffer_bytes"),
            (
                "[ws]\nread_buffer_bytes = \"255B\"\n",
                "ws.read_buffer_bytes",
            ),
            (
                "[ws]\nread_buffer_bytes = \"2MiB\"\n",
                "ws.read_buffer_bytes",
            ),
            ("[ws]\ncommand_queue = 0\n", "ws.command_queue"),
            ("[ws]\ncommand_queue = 1025\n", "ws.command_queue"),
            ("[ws]\ncommand_queue = \"many\"\n", "command_queue"),
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:"), "{text}: {err}");
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn writer_batch_defaults_and_validates() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.limits.writer_batch, 256);
        let cfg = SidecarConfig::parse("t.toml", "[limits]\nwriter_batch = 1\n").unwrap();
        assert_eq!(cfg.limits.writer_batch, 1);
        for text in [
            "[limits]\nwriter_batch = 0\n",
            "[limits]\nwriter_batch = 65537\n",
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:"), "{text}: {err}");
            assert!(err.contains("limits.writer_batch"), "{text}: {err}");
        }
    }

    #[test]
    fn watch_send_buffer_defaults_and_validates() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.limits.watch_send_buffer, 64);
        for text in [
            "[limits]\nwatch_send_buffer = 0\n",
            "[limits]\nwatch_send_buffer = 4097\n",
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("t.toml") && err.contains("limits.watch_send_buffer"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn batch_read_attempts_defaults_and_validates() {
        let cfg = SidecarConfig::parse("t.toml", "").unwrap();
        assert_eq!(cfg.limits.batch_read_attempts, 64);
        let cfg = SidecarConfig::parse("t.toml", "[limits]\nbatch_read_attempts = 1\n").unwrap();
        assert_eq!(cfg.limits.batch_read_attempts, 1);
        for text in [
            "[limits]\nbatch_read_attempts = 0\n",
            "[limits]\nbatch_read_attempts = 1001\n",
        ] {
            let err = SidecarConfig::parse("t.toml", text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("t.toml:"), "{text}: {err}");
            assert!(err.contains("limits.batch_read_attempts"), "{text}: {err}");
        }
    }
}
