//! `[redis]`: bounds, freshness and access of the Redis protocol listener (`[listen] redis`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{ByteSize, ConfigError, Dur};

/// Where a listener listens: `"127.0.0.1:6380"` (TCP) or `"unix:/run/viewcar/redis.sock"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("expected unix:/path/to/socket, got an empty path".to_string());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse().map(ListenAddr::Tcp).map_err(|_| {
            format!("expected an address such as \"127.0.0.1:6380\" or \"unix:/path\", got {s:?}")
        })
    }
}

impl ListenAddr {
    /// The TCP address, or `None` for a Unix socket.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(a: SocketAddr) -> Self {
        ListenAddr::Tcp(a)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the Redis protocol listener reads, and what it lets a client do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Refuse (`-MASTERDOWN`) a read of a source staler than this many ms; 0 = any age.
    pub max_staleness_ms: u64,
    /// How long a read waits for a source that has not synced yet before `-LOADING`
    /// (capped by `limits.max_wait`).
    pub wait: Dur,
    /// Most connections open at once; the next one is told `-ERR max number of clients
    /// reached` and closed.
    pub maxclients: usize,
    /// Most bytes of unparsed requests buffered per connection (Redis's
    /// `client-query-buffer-limit`); past it the connection is closed.
    pub max_query_bytes: ByteSize,
    /// Longest single argument of a request (Redis's `proto-max-bulk-len`).
    pub max_bulk_bytes: ByteSize,
    /// Most arguments of one command (keys of an MGET included).
    pub max_args: usize,
    /// A connection that sends nothing for this long is closed; "0s" = never. Connections in
    /// subscribe mode are exempt, as in Redis.
    pub idle_timeout: Dur,
    /// Replies and pushes buffered for a client that does not read them (Redis's
    /// `client-output-buffer-limit`); past it the client is closed and counted.
    pub max_output_bytes: ByteSize,
    /// Channels and patterns one connection may subscribe to, tracking prefixes included.
    pub max_subscriptions: usize,
    /// Changes pending per subscribed connection (latest value per key) before it is reset.
    pub queue: usize,
    /// SCAN cursors remembered at once (shared by every connection: a client may continue a
    /// SCAN on another pooled connection); the oldest is forgotten first.
    pub scan_cursors: usize,
    /// When set, `AUTH <token>` (or `HELLO 3 AUTH default <token>`) is required first; compared
    /// in constant time.
    pub token: Option<String>,
    /// File mode of the socket file when `[listen] redis` is `unix:/path` (TOML octal: `0o660`).
    pub socket_mode: u32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            max_staleness_ms: 0,
            wait: Dur(Duration::ZERO),
            maxclients: 10_000,
            max_query_bytes: ByteSize(1 << 20),
            max_bulk_bytes: ByteSize(512 << 10),
            max_args: 10_000,
            idle_timeout: Dur(Duration::from_secs(900)),
            max_output_bytes: ByteSize(8 << 20),
            max_subscriptions: 10_000,
            queue: 4096,
            scan_cursors: 10_000,
            token: None,
            socket_mode: 0o660,
        }
    }
}

impl RedisConfig {
    pub(crate) fn validate(&self, file: &str) -> Result<(), ConfigError> {
        for (field, v) in [
            ("redis.maxclients", self.maxclients),
            ("redis.max_args", self.max_args),
            ("redis.max_subscriptions", self.max_subscriptions),
            ("redis.queue", self.queue),
            ("redis.scan_cursors", self.scan_cursors),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(file, field, "must be at least 1"));
            }
        }
        if self.max_bulk_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                file,
                "redis.max_bulk_bytes",
                "must be at least 1KiB",
            ));
        }
        if self.max_query_bytes < self.max_bulk_bytes {
            return Err(ConfigError::invalid(
                file,
                "redis.max_query_bytes",
                "must be at least redis.max_bulk_bytes (a request holds its arguments)",
            ));
        }
        if self.max_output_bytes.0 < 16 << 10 {
            return Err(ConfigError::invalid(
                file,
                "redis.max_output_bytes",
                "must be at least 16KiB",
            ));
        }
        if self.socket_mode > 0o777 {
            return Err(ConfigError::invalid(
                file,
                "redis.socket_mode",
                format!("{:#o} is not a file mode (at most 0o777)", self.socket_mode),
            ));
        }
        if self.token.as_deref().is_some_and(|t| t.is_empty()) {
            return Err(ConfigError::invalid(
                file,
                "redis.token",
                "is empty; remove it to accept clients without a token",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::SidecarConfig;

    #[test]
    fn listen_redis_and_its_section_parse_and_check() {
        let cfg = SidecarConfig::parse(
            "t.toml",
            "[listen]\nredis = \"127.0.0.1:6380\"\n[redis]\nmax_staleness_ms = 500\nmaxclients = 3\ntoken = \"s\"\nidle_timeout = \"0s\"\n",
        )
        .expect("valid");
        assert_eq!(cfg.listen.redis, Some("127.0.0.1:6380".parse().unwrap()));
        assert_eq!(cfg.redis.max_staleness_ms, 500);
        assert_eq!(cfg.redis.maxclients, 3);
        let cfg = SidecarConfig::parse(
            "t.toml",
            "[listen]\nredis = \"unix:/tmp/r.sock\"\n[redis]\nsocket_mode = 0o600\n",
        )
        .expect("valid");
        assert_eq!(
            cfg.listen.redis,
            Some(super::ListenAddr::Unix("/tmp/r.sock".into()))
        );
        assert_eq!(cfg.redis.socket_mode, 0o600);
        for (text, field) in [
            ("[redis]\nmaxclients = 0\n", "redis.maxclients"),
            ("[redis]\ntoken = \"\"\n", "redis.token"),
            (
                "[redis]\nmax_query_bytes = \"1KiB\"\n",
                "redis.max_query_bytes",
            ),
            ("[redis]\nnope = 1\n", "nope"),
            ("[listen]\nredis = \"10.1.2.3:6380\"\n", "listen.redis"),
            ("[listen]\nredis = \"nowhere\"\n", "unix:/path"),
            ("[redis]\nsocket_mode = 0o1777\n", "redis.socket_mode"),
        ] {
            let e = SidecarConfig::parse("t.toml", text)
                .expect_err(text)
                .to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn the_cache_api_may_listen_on_a_unix_socket() {
        let cfg = SidecarConfig::parse(
            "t.toml",
            "[listen]\ngrpc = \"unix:/run/viewcar/grpc.sock\"\ngrpc_socket_mode = 0o600\n",
        )
        .expect("valid");
        assert_eq!(
            cfg.listen.grpc,
            super::ListenAddr::Unix("/run/viewcar/grpc.sock".into())
        );
        assert_eq!(cfg.listen.grpc_socket_mode, 0o600);
        // The http listener keeps its own default when the Cache API has no port.
        assert_eq!(cfg.listen.http_addr().port(), 7071);
        for (text, field) in [
            ("[listen]\ngrpc = \"unix:\"\n", "got an empty path"),
            (
                "[listen]\ngrpc = \"nowhere\"\n",
                "or \"unix:/path\", got \"nowhere\"",
            ),
            (
                "[listen]\ngrpc_socket_mode = 0o1000\n",
                "listen.grpc_socket_mode",
            ),
            (
                "[listen]\ngrpc = \"unix:/s\"\nredis = \"unix:/s\"\n",
                "listen.redis",
            ),
        ] {
            let e = SidecarConfig::parse("t.toml", text)
                .expect_err(text)
                .to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
