//! The admin endpoints on the http listener, next to `/ws`: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive), `/readyz` (200 only when every full source has synced and
//! views are built, 503 naming what is missing otherwise, and 503 while shutting down),
//! `/status` (the same as JSON) and the status page at `/`.
//!
//! The status page is one HTML file compiled into the binary: no build step, no CDN, nothing
//! fetched but `/status` and the WebSocket `/ws` of the same listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::feed::FeedStats;
use crate::hub::Hub;
use crate::readiness::Readiness;
use crate::serve::metrics::{self, Metrics};
use crate::serve::ws::WsStats;
use crate::store::Store;
use crate::views::ViewStats;

const STATUS_PAGE: &str = include_str!("status.html");

/// One origin as the status shows it.
pub(crate) struct OriginInfo {
    pub name: String,
    pub address: String,
    pub stats: Arc<FeedStats>,
}

/// How often the status page's history is sampled, and how many samples are kept (3 min).
pub(crate) const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
const SAMPLES: usize = 90;

/// Every source's version and staleness, sampled every [`SAMPLE_EVERY`]: the status page draws
/// what moves (versions applied per second) and what is stuck (staleness) from it.
#[derive(Default)]
pub(crate) struct History {
    samples: std::sync::Mutex<std::collections::VecDeque<Sample>>,
}

/// (ms since start, per source in store order: (version, staleness ms)).
type Sample = (u64, Vec<(u64, u64)>);

impl History {
    pub(crate) fn sample(&self, store: &Store, started: Instant) {
        let at = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let row = store
            .sources()
            .iter()
            .map(|s| (s.version(), s.staleness_ms()))
            .collect();
        let mut q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back((at, row));
        while q.len() > SAMPLES {
            q.pop_front();
        }
    }

    /// Per source: versions applied per second between samples (0 across a new epoch, whose
    /// versions start over) and the staleness at each sample.
    fn json(&self, store: &Store) -> Value {
        let q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let sources: Vec<Value> = store
            .sources()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let rate: Vec<f64> = q
                    .iter()
                    .zip(q.iter().skip(1))
                    .map(|((t0, a), (t1, b))| {
                        let (v0, v1) = (a.get(i).map_or(0, |x| x.0), b.get(i).map_or(0, |x| x.0));
                        let secs = (t1.saturating_sub(*t0) as f64 / 1000.0).max(1e-3);
                        (v1.saturating_sub(v0) as f64 / secs * 10.0).round() / 10.0
                    })
                    .collect();
                let staleness: Vec<u64> = q.iter().map(|(_, r)| r.get(i).map_or(0, |x| x.1)).collect();
                json!({ "name": s.name().as_ref(), "versions_per_s": rate, "staleness_ms": staleness })
            })
            .collect();
        json!({ "interval_ms": SAMPLE_EVERY.as_millis() as u64, "sources": sources })
    }
}

/// What the admin endpoints read.
pub(crate) struct Admin {
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    pub store: Arc<Store>,
    pub hub: Arc<Hub>,
    pub origins: Vec<OriginInfo>,
    pub views: Vec<(String, Arc<ViewStats>)>,
    pub ws: Arc<WsStats>,
    pub started: Instant,
    pub history: Arc<History>,
    /// The relay's Feed side, with `[listen] feed`.
    pub relay: Option<crate::serve::feed::Relay>,
}

pub(crate) fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(admin)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STATUS_PAGE,
    )
        .into_response()
}

async fn metrics(State(a): State<Arc<Admin>>) -> Response {
    a.metrics.settle().await;
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        a.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(a): State<Arc<Admin>>) -> Response {
    let r = &a.readiness;
    if r.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response();
    }
    if r.is_ready() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let failed = r.failed();
    let waiting: Vec<String> = r
        .waiting_for()
        .iter()
        .map(|s| match failed.iter().find(|(name, _)| name == s) {
            Some((_, why)) => format!("{s} ({why})"),
            None => s.to_string(),
        })
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: not synced yet: {}\n", waiting.join(", ")),
    )
        .into_response()
}

async fn status(State(a): State<Arc<Admin>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        a.status().to_string(),
    )
        .into_response()
}

impl Admin {
    /// The `/status` document.
    pub(crate) fn status(&self) -> Value {
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        let sources: Vec<Value> = self
            .store
            .sources()
            .iter()
            .map(|s| {
                json!({
                    "name": s.name().as_ref(),
                    "kind": if s.is_view() { "view" } else { "topic" },
                    "mode": s.mode().as_str(),
                    "origin": s.origin(),
                    "synced": s.is_synced(),
                    "connected": s.is_connected(),
                    "version": s.version(),
                    "keys": s.len(),
                    "bytes": s.bytes(),
                    "staleness_ms": s.staleness_ms(),
                    "upstream_lag_ms": s.upstream_lag().0,
                    "upstream_lag_bytes": s.upstream_lag().1,
                    "upstream_copied_rows": s.upstream_copied_rows(),
                    "error": s.failure().map(|e| e.to_string()),
                    "last_error": s.last_error().map(|e| e.to_string()),
                })
            })
            .collect();
        let origins: Vec<Value> = self
            .origins
            .iter()
            .map(|o| {
                let s = &o.stats;
                json!({
                    "name": o.name,
                    "address": o.address,
                    "connected": s.connected.load(Ordering::Relaxed),
                    "connects": load(&s.connects),
                    "disconnects": load(&s.disconnects),
                    "resets": load(&s.resets),
                    "snapshots": load(&s.snapshots),
                    "duplicates": load(&s.duplicates),
                    "gaps": load(&s.gaps),
                    "messages": load(&s.messages),
                    "bytes": load(&s.bytes),
                    "protocol_errors": load(&s.protocol_errors),
                    "refusals": load(&s.refusals),
                    "last_error": s.last_error().map(|(e, _)| e),
                    "last_error_at_ms": s.last_error().map(|(_, at)| at),
                })
            })
            .collect();
        let views: Vec<Value> = self
            .views
            .iter()
            .map(|(name, s)| {
                json!({
                    "name": name,
                    "recomputes": load(&s.recomputes),
                    "row_errors": load(&s.errors),
                    "changes": load(&s.changes),
                    "inputs": self.store.source(name).map(|v| v.input_names()).unwrap_or_default().iter().map(|n| n.as_ref()).collect::<Vec<_>>(),
                    "kept_last_good": load(&s.kept),
                    "stale_rows": load(&s.stale),
                    "includes": s.includes.iter().map(|(i, st)| json!({
                        "name": i,
                        "lookups": load(&st.evaluated),
                        "key_missing": load(&st.key_missing),
                        "lookup_missing": load(&st.lookup_missing),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let queues = self.hub.queues();
        let h = self.hub.stats();
        let r = &self.readiness;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "ready": r.is_ready(),
            "draining": r.is_draining(),
            "waiting_for": r.waiting_for().iter().map(|s| s.as_ref()).collect::<Vec<_>>(),
            "failed": r.failed().iter().map(|(s, e)| json!({"source": s.as_ref(), "error": e.as_str()})).collect::<Vec<_>>(),
            "sources": sources,
            "origins": origins,
            "relay": self.relay.as_ref().map(|r| {
                let o = r.origin();
                let mut counters = serde_json::Map::new();
                counters.insert("streams".into(), json!(o.open_streams()));
                for (name, _, c) in crate::serve::metrics::relay_counters(o.stats()) {
                    let name = name.strip_prefix("relay_").unwrap_or(name);
                    counters.insert(name.into(), json!(load(c)));
                }
                Value::Object(counters)
            }),
            "views": views,
            "history": self.history.json(&self.store),
            "subscribers": {
                "watch": queues.iter().filter(|q| !q.label.starts_with("ws")).count(),
                "ws": queues.iter().filter(|q| q.label.starts_with("ws")).count(),
                "subscriptions": self.hub.subscriptions(),
                "queue_depth": queues.iter().map(|q| q.queued).sum::<usize>(),
                "delivered": load(&h.delivered),
                "conflated": load(&h.conflated),
                "resets": load(&h.lagged),
                "closed_slow": load(&h.too_slow),
            },
            "ws": {
                "open": load(&self.ws.open),
                "accepted": load(&self.ws.accepted),
                "frames": load(&self.ws.frames),
            },
        })
    }
}
