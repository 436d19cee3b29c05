//! The http listener's accept loop (WebSocket `/ws` and the admin endpoints): hyper with a
//! bound on open connections and a deadline for a request's headers, which `axum::serve` does
//! not offer. Without them, clients that send half a request and wait hold their connections
//! (and file descriptors) for ever, and enough of them starve `/healthz` and the rest of the
//! process.
//!
//! A connection takes a permit before it is accepted (mini-redis's pattern): past the bound,
//! new connections wait in the kernel's backlog instead of being served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;
use tracing::{debug, warn};

/// The bounds of the http listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpLimits {
    /// Open connections at most (WebSockets included).
    pub max_connections: usize,
    /// A request's headers must arrive within this long; a connection that does not send them
    /// is closed.
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` flips, then stops accepting and lets every
/// connection finish gracefully.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut full_logged = false;
    loop {
        if permits.available_permits() == 0 && !full_logged {
            warn!(
                max_connections = limits.max_connections,
                "http listener at its connection bound; new connections wait"
            );
            full_logged = true;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = crate::signalled(&mut shutdown) => break,
        };
        if permits.available_permits() > 0 {
            full_logged = false;
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    warn!(error = %e, "http listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::signalled(&mut shutdown) => break,
        };
        // Pushed frames are small and latency-bound.
        let _ = stream.set_nodelay(true);
        let service = router
            .clone()
            .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)))
            .map_request(|req: axum::http::Request<hyper::body::Incoming>| {
                req.map(axum::body::Body::new)
            });
        let builder = builder.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service),
            );
            tokio::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        debug!(%peer, error = %e, "http connection ended");
                    }
                    return;
                }
                _ = crate::signalled(&mut stop) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    // Every connection holds a permit until it is done: the listener has shut down once all
    // are back (the sidecar's grace period bounds the wait).
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}
