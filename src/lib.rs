//! viewcar: a cache sidecar that ends "IO explosion" between microservices.
//!
//! Each pod runs one sidecar. It holds one push subscription (a gRPC `Feed.Sync` stream) per
//! upstream origin, keeps the topics it replicates — and precomputed views over them — in
//! memory, and answers reads with one localhost call.
//!
//! ```text
//! origin --Feed.Sync--> feed client --> writer (single task) --> store (sources)
//!                                           |                     |
//!                                           v                     v
//!                                      view engine            hub --> Watch, WebSocket /ws
//! readers: Cache gRPC on localhost --> store (lock-free reads)
//! ```
//!
//! - [`origin`]: viewcar's own origin, embeddable in a Rust service ([`Origin`]).
//! - [`Sidecar`]: the sidecar, started from a [`SidecarConfig`].
//! - [`pb`]: the generated protobuf types and gRPC clients/servers.

mod auth;
pub mod bench;
pub mod config;
pub mod demo;
mod feed;
pub mod hub;
mod metrics;
pub mod origin;
pub mod pb;
mod readiness;
mod serve;
mod sidecar;
pub mod store;
pub mod tls;
pub mod views;

pub use config::{ConfigError, OriginConfig, SidecarConfig};
pub use feed::FeedStats;
pub use origin::{OpenError, Origin, Put, StoreError};
pub use readiness::Readiness;
pub use serve::redis::RedisStats;
pub use serve::ws;
pub use sidecar::{Sidecar, StartError};

/// Resolves once a shutdown flag flips to true (or its sender is gone).
pub(crate) async fn signalled(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Internals exposed for benchmarks and tools; not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::feed::{decode_streams as decode_feed_streams, replay as replay_feed, Replayed};
    pub use crate::metrics::parse_text as parse_prometheus_text;
    pub use crate::serve::redis::fuzz_parse as fuzz_resp_request;
    pub use crate::store::writer::{BatchChange, Op, SnapEntry, Writer, WriterStats};
    pub use crate::store::Clock;
    pub use crate::views::expr::{fuzz_filter, fuzz_key};
    pub use crate::ws::fuzz_parse as fuzz_ws_request;
}
