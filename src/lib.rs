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
//!   With `[listen] feed` it is also a relay ([`Relay`]): it serves the Feed API to other
//!   sidecars from its full topics (the origin's positions unchanged) and its views.
//! - [`views`]: declaring views ([`views::ViewSpec`], [`views::View`]); [`Standalone`] runs
//!   them without a sidecar.
//! - [`pb`]: the generated protobuf types and gRPC clients/servers.
//!
//! Dependencies point down, never up (checked by `tests/layering.rs`): `types`, `config` at the
//! bottom; then `store`, `hub`, `views`; then the single `writer`, the `feed` client and the
//! `origin`; then `serve` (gRPC, WebSocket, admin); then the wiring (`sidecar`, `demo`, `cli`,
//! `bench`).

#![forbid(unsafe_code)]
// Errors are values here: a panic in a sidecar takes the pod's reads down with it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

// Bottom: plain data shared by every layer.

mod accept;
mod auth;
pub mod config;
mod introspect;
pub mod pb;
pub mod tls;
pub mod types;
// Data: sources, subscriptions, views.
#[doc(hidden)]
pub mod hub;
mod readiness;
pub mod store;
pub mod views;
// Moving data: the single writer, the feed client, the origin.
mod feed;
pub mod origin;
#[doc(hidden)]
pub mod writer;
// Serving.
mod serve;
// Top: wiring.
#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod demo;
mod sidecar;

pub use config::{ConfigError, OriginConfig, SidecarConfig};
pub use feed::probe::{probe as probe_origins, Finding as ProbeFinding};
pub use feed::FeedStats;
pub use origin::{OpenError, Origin, Put, StoreError};
pub use readiness::Readiness;
pub use serve::feed::Relay;
pub use serve::redis::RedisStats;
pub use serve::ws;
pub use sidecar::{check_config, Sidecar, StartError};
pub use writer::{Changes, Standalone};

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C): what stops `viewcar sidecar`, `origin` and
/// `demo`.
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// process calls it before it announces itself ("sidecar started", a listening address), so
/// that a SIGTERM sent as soon as it is up is a shutdown, not the default kill.
#[cfg(unix)]
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            // No handler could be installed: the default dispositions stop the process.
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

/// See the Unix version: Ctrl-C only.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves once a shutdown flag flips to true (or its sender is gone).
pub(crate) async fn signalled(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Internals exposed for benchmarks and tools; not a stable API.
#[doc(hidden)]
pub mod internals {
    #[cfg(feature = "fuzzing")]
    pub use crate::feed::{decode_streams as decode_feed_streams, replay as replay_feed, Replayed};
    pub use crate::serve::metrics::parse_text as parse_prometheus_text;
    pub use crate::serve::redis::fuzz_parse as fuzz_resp_request;
    pub use crate::store::Clock;
    pub use crate::views::expr::{fuzz_filter, fuzz_key};
    pub use crate::writer::{BatchChange, SnapEntry, Step, Writer, WriterStats};
    pub use crate::ws::fuzz_parse as fuzz_ws_request;
}
