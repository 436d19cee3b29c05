//! `origin.toml`: the settings of viewcar's own origin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{check_name, check_range, ConfigError};
use crate::types::{ByteSize, Dur};

/// Largest `stream_send_buffer`: each message may be up to `max_message_bytes`.
const MAX_STREAM_SEND_BUFFER: usize = 1024;

/// `origin.toml`: the settings of viewcar's own origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the origin config: a TOML document with listen, topics, ..."
)]
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
    /// Most open connections of the Feed listener; more wait to be accepted.
    pub max_connections: usize,
    /// Most keys one Sync stream may subscribe to in one topic (keyed interest, on_demand
    /// sidecars); a Subscribe past it ends the stream with RESOURCE_EXHAUSTED.
    pub max_subscribed_keys: usize,
    /// Most bytes one Sync stream's keyed interest in one topic may name: the subscribed keys
    /// plus their values when subscribed. A Subscribe past it ends the stream with
    /// RESOURCE_EXHAUSTED (keys are small; what they pull in is not).
    pub max_subscribed_bytes: ByteSize,
    /// HTTP/2 keepalive of the Feed server: a ping after this long without frames ...
    pub keepalive_interval: Dur,
    /// ... and the connection is closed when its ack takes longer than this.
    pub keepalive_timeout: Dur,
    /// How often an idle subscription gets a Progress message.
    pub progress_interval: Dur,
    /// A connection must send its first bytes (the HTTP/2 preface, or its TLS handshake)
    /// within this long, or it is closed.
    pub header_timeout: Dur,
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
    /// Take the topics from a Postgres database by logical replication (one topic per table)
    /// instead of from `Publish`.
    pub postgres: Option<super::PostgresConfig>,
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
            max_connections: 10_000,
            max_subscribed_keys: 1_000_000,
            max_subscribed_bytes: ByteSize(256 << 20),
            keepalive_interval: Dur(Duration::from_secs(10)),
            header_timeout: Dur(Duration::from_secs(10)),
            keepalive_timeout: Dur(Duration::from_secs(10)),
            progress_interval: Dur(Duration::from_secs(2)),
            allow_non_loopback: false,
            tls: None,
            publish_token: None,
            data_dir: None,
            fsync: Fsync::EveryBatch,
            fsync_interval: Dur(Duration::from_secs(1)),
            cache_bytes: ByteSize(64 << 20),
            postgres: None,
        }
    }
}

impl OriginConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        super::load_checked(path)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        super::parse_checked(file, text)
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
            ("max_connections", self.max_connections),
            ("max_subscribed_keys", self.max_subscribed_keys),
        ] {
            check_range(file, field, v, 1, super::sidecar::MAX_COUNT)?;
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
            super::check_duration(
                file,
                field,
                d,
                super::sidecar::MIN_KEEPALIVE,
                super::sidecar::MAX_KEEPALIVE,
            )?;
        }
        super::check_duration(
            file,
            "header_timeout",
            self.header_timeout,
            super::sidecar::MIN_HEADER_TIMEOUT,
            super::sidecar::MAX_KEEPALIVE,
        )?;
        if self.max_subscribed_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                file,
                "max_subscribed_bytes",
                "must be at least 1KiB",
            ));
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
        super::check_positive(file, "progress_interval", self.progress_interval)?;
        if self.cache_bytes.0 < (1 << 20) {
            return Err(ConfigError::invalid(
                file,
                "cache_bytes",
                "must be at least 1MiB",
            ));
        }
        super::check_positive(file, "fsync_interval", self.fsync_interval)?;
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
        super::check_token(
            file,
            "publish_token",
            self.publish_token.as_deref(),
            "remove it to accept publishes without a token",
        )?;
        if let Some(tls) = &self.tls {
            super::check_tls_files(file, "tls", tls.files())?;
        }
        if let Some(pg) = &self.postgres {
            pg.validate(file)?;
            if self.seed.is_some() {
                return Err(ConfigError::invalid(
                    file,
                    "seed",
                    "cannot be combined with [postgres]: the tables are the data",
                ));
            }
            if self.data_dir.is_some() && self.fsync == Fsync::Interval {
                return Err(ConfigError::invalid(
                    file,
                    "fsync",
                    "\"interval\" cannot be used with [postgres]: the slot may only be told what is on disk",
                ));
            }
        }
        Ok(())
    }
}
