//! Prometheus metrics of a sidecar, rendered in the Prometheus text format (0.0.4).
//!
//! Almost everything is read at scrape time from the counters the parts already keep
//! ([`FeedStats`], [`WriterStats`], [`ViewStats`], [`HubStats`](crate::hub::HubStats),
//! [`WsStats`]) and from the store: the hot paths pay nothing for metrics beyond the relaxed
//! atomic adds they already do. The one thing measured here is the latency of Cache API calls,
//! by a tower layer around the gRPC server ([`ReadTimingLayer`]). on_demand sources report
//! their [`OnDemandStats`](crate::store::OnDemandStats) and moka's resident keys and bytes,
//! settled by [`Metrics::settle`] before each scrape.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::codegen::http;

use crate::feed::FeedStats;
use crate::hub::Hub;
use crate::readiness::Readiness;
use crate::serve::ws::WsStats;
use crate::store::{Held, OnDemandStats, Source, Store};
use crate::views::ViewStats;
use crate::writer::WriterStats;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The Cache API methods whose calls are timed; anything else on the listener (health,
/// reflection) is not a read and is not counted.
const METHODS: [&str; 5] = ["Get", "BatchGet", "Scan", "Watch", "ListSources"];
const CACHE_PATH: &str = "/viewcar.cache.v1.Cache/";

/// Latency buckets of reads, in seconds: localhost reads take microseconds, a read that waits
/// for a version or a sync takes up to `limits.max_wait`.
const READ_BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5,
    2.5, 10.0,
];

type ReadLatency = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;
type ReadErrors = Family<Vec<(String, String)>, Counter>;

fn method_label(i: usize) -> Vec<(String, String)> {
    vec![("method".to_string(), METHODS[i].to_string())]
}

/// Per-method read instruments, resolved once so that a call does no label lookup.
#[derive(Debug)]
pub(crate) struct ReadMetrics {
    latency: [Histogram; METHODS.len()],
    errors: [Counter; METHODS.len()],
}

impl ReadMetrics {
    /// Resolves every method's child of the two families once. A child shares its state with
    /// its family, so recording into it shows in the family's exposition.
    fn new(latency: &ReadLatency, errors: &ReadErrors) -> Self {
        ReadMetrics {
            latency: std::array::from_fn(|i| latency.get_or_create(&method_label(i)).clone()),
            errors: std::array::from_fn(|i| errors.get_or_create(&method_label(i)).clone()),
        }
    }

    fn method(path: &str) -> Option<usize> {
        let name = path.strip_prefix(CACHE_PATH)?;
        METHODS.iter().position(|m| *m == name)
    }
}

/// Everything `/metrics` shows.
pub(crate) struct Metrics {
    registry: Registry,
    reads: Arc<ReadMetrics>,
    store: Arc<Store>,
}

/// What the scrape-time collector reads.
pub(crate) struct Parts {
    pub store: Arc<Store>,
    pub hub: Arc<Hub>,
    pub feeds: Vec<(String, Arc<FeedStats>)>,
    pub writer: Arc<WriterStats>,
    pub views: Vec<(String, Arc<ViewStats>)>,
    pub ws: Arc<WsStats>,
    /// The Redis protocol listener's counters, when it is served.
    pub redis: Option<Arc<crate::serve::redis::RedisStats>>,
    /// The relay's Feed side, with `[listen] feed`.
    pub relay: Option<crate::serve::feed::Relay>,
    pub readiness: Arc<Readiness>,
}

impl Metrics {
    pub(crate) fn new(mut parts: Parts) -> Self {
        parts.feeds.sort_by(|a, b| a.0.cmp(&b.0));
        parts.views.sort_by(|a, b| a.0.cmp(&b.0));
        let mut registry = Registry::with_prefix("viewcar");
        // One family per metric with the method as a label: Prometheus refuses a family that
        // is declared twice, which registering each method separately would do.
        let latency: ReadLatency = Family::new_with_constructor(|| Histogram::new(READ_BUCKETS));
        let errors = ReadErrors::default();
        let reads = Arc::new(ReadMetrics::new(&latency, &errors));
        {
            let sub = registry.sub_registry_with_prefix("read");
            sub.register_with_unit(
                "duration",
                "Cache API calls by method: time to the response (for Watch: to the stream's start)",
                prometheus_client::registry::Unit::Seconds,
                latency,
            );
            sub.register(
                "errors",
                "Cache API calls answered with an error status",
                errors,
            );
        }
        let store = parts.store.clone();
        registry.register_collector(Box::new(parts));
        Metrics {
            registry,
            reads,
            store,
        }
    }

    /// Runs moka's pending housekeeping of every on_demand source, so that the resident keys
    /// and bytes a scrape reports are current (evictions happen in that housekeeping).
    pub(crate) async fn settle(&self) {
        self.store.settle().await;
    }

    pub(crate) fn reads(&self) -> &Arc<ReadMetrics> {
        &self.reads
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing to a String cannot fail; an encoder error would only come from a metric name
        // the format cannot hold, and every name here is a literal.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor and its samples.
fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let metric_type = first.metric_type();
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            // A family without labels has one sample.
            return v.encode(m);
        }
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: &std::sync::atomic::AtomicU64) -> ConstCounter<u64> {
    ConstCounter::new(v.load(Ordering::Relaxed))
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("sources", &self.store.sources().len())
            .field("feeds", &self.feeds.len())
            .field("views", &self.views.len())
            .finish_non_exhaustive()
    }
}

impl Collector for Parts {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut enc;
        family(
            e,
            "ready",
            "1 once every full source has synced and views are built; 0 before, and while shutting down",
            [(vec![], gauge(u64::from(self.readiness.is_ready())))],
        )?;
        family(
            e,
            "build_info",
            "The running version",
            [(vec![("version", env!("CARGO_PKG_VERSION"))], gauge(1))],
        )?;

        let sources = self.store.sources();
        let kinds: Vec<(String, &str)> = sources
            .iter()
            .map(|s| {
                (
                    if s.is_view() {
                        "view".to_string()
                    } else {
                        "topic".to_string()
                    },
                    s.origin().unwrap_or(""),
                )
            })
            .collect();
        let labels = |i: usize| -> Labels<'_> {
            vec![
                ("source", sources[i].name()),
                ("kind", kinds[i].0.as_str()),
                ("origin", kinds[i].1),
            ]
        };
        let per_source = |f: &dyn Fn(usize) -> ConstGauge<i64>| {
            (0..sources.len())
                .map(|i| (labels(i), f(i)))
                .collect::<Vec<_>>()
        };
        family(
            e,
            "source_version",
            "Applied version of the source (views: the count of applied changes)",
            per_source(&|i| gauge(sources[i].version())),
        )?;
        family(
            e,
            "source_keys",
            "Keys held",
            per_source(&|i| gauge(sources[i].len() as u64)),
        )?;
        family(
            e,
            "source_bytes",
            "Bytes of keys and values held",
            per_source(&|i| gauge(sources[i].bytes())),
        )?;
        family(
            e,
            "source_synced",
            "1 once the source has its first whole snapshot (views: every input synced)",
            per_source(&|i| gauge(u64::from(sources[i].is_synced()))),
        )?;
        family(
            e,
            "source_staleness_seconds",
            "0 while the origin is live; otherwise seconds since it last confirmed the source current",
            (0..sources.len()).map(|i| {
                (
                    labels(i),
                    ConstGauge::new(sources[i].staleness_ms() as f64 / 1000.0),
                )
            }),
        )?;
        family(
            e,
            "source_upstream_lag_seconds",
            "How far the origin's copy trails the system it follows (a Postgres table's replication lag)",
            (0..sources.len()).map(|i| {
                (
                    labels(i),
                    ConstGauge::new(sources[i].upstream_lag().0 as f64 / 1000.0),
                )
            }),
        )?;
        family(
            e,
            "source_upstream_lag_bytes",
            "WAL bytes between the database's position and what the origin has applied",
            (0..sources.len()).map(|i| {
                (
                    labels(i),
                    ConstGauge::new(sources[i].upstream_lag().1 as f64),
                )
            }),
        )?;
        family(
            e,
            "source_upstream_copied_rows",
            "Rows read so far by the origin's copy of the system it follows that is not loaded yet (a Postgres table's initial copy); 0 when none runs",
            (0..sources.len()).map(|i| {
                (
                    labels(i),
                    ConstGauge::new(sources[i].upstream_copied_rows() as f64),
                )
            }),
        )?;

        // on_demand topics and views: what they hold and how reads went.
        let on_demand: Vec<(&Source, Held)> = sources
            .iter()
            .filter_map(|s| Some((&**s, s.held()?)))
            .collect();
        fn od_labels(s: &Source) -> Labels<'_> {
            vec![
                ("source", s.name()),
                ("kind", if s.is_view() { "view" } else { "topic" }),
                ("origin", s.origin().unwrap_or("")),
            ]
        }
        for (name, help, f) in [
            (
                "on_demand_hits",
                "on_demand reads answered from a resident key (absent keys included)",
                (|s: &OnDemandStats| counter(&s.hits)) as fn(&OnDemandStats) -> ConstCounter<u64>,
            ),
            (
                "on_demand_misses",
                "on_demand reads of a key that was not resident",
                |s| counter(&s.misses),
            ),
            (
                "on_demand_fetches",
                "Feed.Fetch calls made for on_demand misses (one per load, however many wait); \
                 for a view, rounds of fetching a row's missing inputs",
                |s| counter(&s.fetches),
            ),
            (
                "on_demand_fetch_errors",
                "Feed.Fetch calls that failed or timed out",
                |s| counter(&s.fetch_errors),
            ),
            (
                "on_demand_coalesced",
                "on_demand misses that waited for another reader's load instead of fetching",
                |s| counter(&s.coalesced),
            ),
            (
                "on_demand_evictions",
                "on_demand keys dropped for size or idle (each is unsubscribed)",
                |s| counter(&s.evictions),
            ),
            (
                "on_demand_pushed",
                "Pushed changes applied to resident or loading on_demand keys",
                |s| counter(&s.pushed),
            ),
        ] {
            family(
                e,
                name,
                help,
                on_demand
                    .iter()
                    .map(|(s, h)| (od_labels(s), f(h.stats)))
                    .collect::<Vec<_>>(),
            )?;
        }
        family(
            e,
            "on_demand_resident_keys",
            "on_demand keys resident (absent keys included), as of moka's last housekeeping",
            on_demand
                .iter()
                .map(|(s, h)| (od_labels(s), gauge(h.keys)))
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "on_demand_resident_bytes",
            "on_demand weighed bytes resident: keys, values and a fixed per-key overhead",
            on_demand
                .iter()
                .map(|(s, h)| (od_labels(s), gauge(h.bytes)))
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "on_demand_max_bytes",
            "on_demand byte budget (max_bytes)",
            on_demand
                .iter()
                .map(|(s, h)| (od_labels(s), gauge(h.max_bytes)))
                .collect::<Vec<_>>(),
        )?;

        let origin = |f: &dyn Fn(&FeedStats) -> ConstCounter<u64>| {
            self.feeds
                .iter()
                .map(|(n, s)| (vec![("origin", n.as_str())], f(s)))
                .collect::<Vec<_>>()
        };
        family(
            e,
            "origin_connected",
            "1 while the feed stream to the origin is open",
            self.feeds.iter().map(|(n, s)| {
                (
                    vec![("origin", n.as_str())],
                    gauge(u64::from(s.connected.load(Ordering::Relaxed))),
                )
            }),
        )?;
        for (name, help, f) in [
            (
                "origin_connects",
                "Feed streams opened (the first connect and every reconnect)",
                (|s: &FeedStats| counter(&s.connects)) as fn(&FeedStats) -> ConstCounter<u64>,
            ),
            (
                "origin_disconnects",
                "Feed streams lost; each is followed by a reconnect with backoff",
                |s| counter(&s.disconnects),
            ),
            (
                "origin_resets",
                "Reset messages: the origin could not resume a topic and sent a snapshot",
                |s| counter(&s.resets),
            ),
            (
                "origin_snapshots",
                "Whole snapshots received",
                |s| counter(&s.snapshots),
            ),
            (
                "origin_duplicates",
                "Change batches at or below the applied version, ignored",
                |s| counter(&s.duplicates),
            ),
            (
                "origin_gaps",
                "Change batches that did not follow the applied version (resubscribed, never applied across)",
                |s| counter(&s.gaps),
            ),
            (
                "origin_messages",
                "Feed messages received",
                |s| counter(&s.messages),
            ),
            (
                "origin_received_bytes",
                "Bytes of feed messages received (protobuf encoding)",
                |s| counter(&s.bytes),
            ),
            (
                "origin_protocol_errors",
                "Streams dropped because the origin broke the feed protocol",
                |s| counter(&s.protocol_errors),
            ),
            (
                "origin_refusals",
                "Topic subscriptions the origin refused (retried with backoff)",
                |s| counter(&s.refusals),
            ),
        ] {
            family(e, name, help, origin(&f))?;
        }

        let w = &self.writer;
        family(
            e,
            "writer_batches",
            "Change batches applied",
            [(vec![], counter(&w.batches))],
        )?;
        family(
            e,
            "writer_changes",
            "Changes applied",
            [(vec![], counter(&w.changes))],
        )?;
        family(
            e,
            "writer_snapshots",
            "Snapshots swapped in",
            [(vec![], counter(&w.snapshots))],
        )?;

        let view = |f: &dyn Fn(&ViewStats) -> ConstCounter<u64>| {
            self.views
                .iter()
                .map(|(n, s)| (vec![("view", n.as_str())], f(s)))
                .collect::<Vec<_>>()
        };
        family(
            e,
            "view_recomputes",
            "View rows computed",
            view(&|s| counter(&s.recomputes)),
        )?;
        family(
            e,
            "view_row_errors",
            "View rows that could not be computed",
            view(&|s| counter(&s.errors)),
        )?;
        family(
            e,
            "view_changes",
            "View row upserts and deletes emitted",
            view(&|s| counter(&s.changes)),
        )?;
        family(
            e,
            "view_rows_kept",
            "View rows kept at their last good value because an input was not JSON",
            view(&|s| counter(&s.kept)),
        )?;
        let include = |f: &dyn Fn(&crate::views::IncludeStats) -> ConstCounter<u64>| {
            self.views
                .iter()
                .flat_map(|(n, s)| {
                    s.includes.iter().map(move |(i, st)| {
                        (vec![("view", n.as_str()), ("include", i.as_str())], f(st))
                    })
                })
                .collect::<Vec<_>>()
        };
        family(
            e,
            "view_include_lookups",
            "Lookups of a declared view's include (each computation of a row)",
            include(&|s| counter(&s.evaluated)),
        )?;
        family(
            e,
            "view_include_key_missing",
            "Include lookups whose key expression found no field in the row (the include is null)",
            include(&|s| counter(&s.key_missing)),
        )?;
        family(
            e,
            "view_include_lookup_missing",
            "Include lookups whose key found no row of the source (the include is null)",
            include(&|s| counter(&s.lookup_missing)),
        )?;

        let queues = self.hub.queues();
        let (mut watch, mut ws) = (0u64, 0u64);
        let (mut depth, mut deepest) = (0u64, 0u64);
        for q in &queues {
            if q.label.starts_with("ws") {
                ws += 1;
            } else {
                watch += 1;
            }
            depth += q.queued as u64;
            deepest = deepest.max(q.queued as u64);
        }
        family(
            e,
            "subscribers",
            "Consumers of pushed changes: gRPC Watch streams and WebSocket connections",
            [
                (vec![("kind", "watch")], gauge(watch)),
                (vec![("kind", "ws")], gauge(ws)),
            ],
        )?;
        family(
            e,
            "subscriptions",
            "Subscriptions across all consumers",
            [(vec![], gauge(self.hub.subscriptions() as u64))],
        )?;
        family(
            e,
            "subscriber_queue_depth",
            "Changes pending across all consumer queues",
            [(vec![], gauge(depth))],
        )?;
        family(
            e,
            "subscriber_queue_depth_max",
            "Changes pending in the fullest consumer queue",
            [(vec![], gauge(deepest))],
        )?;
        let h = self.hub.stats();
        family(
            e,
            "subscriber_delivered",
            "Changes queued to consumers",
            [(vec![], counter(&h.delivered))],
        )?;
        family(
            e,
            "subscriber_conflated",
            "Queued changes replaced in place by a newer change of the same key",
            [(vec![], counter(&h.conflated))],
        )?;
        family(
            e,
            "subscriber_resets",
            "Consumer queues that overflowed and were reset (current rows resent)",
            [(vec![], counter(&h.lagged))],
        )?;
        family(
            e,
            "subscriber_closed_slow",
            "Consumers closed because they kept falling behind",
            [(vec![], counter(&h.too_slow))],
        )?;
        family(
            e,
            "subscriber_send_timeouts",
            "Consumers (WebSocket, Watch) closed because a send waited past its deadline",
            [(vec![], counter(&h.send_timeouts))],
        )?;

        let s = &self.ws;
        family(
            e,
            "ws_connections",
            "WebSocket connections open",
            [(vec![], gauge(s.open.load(Ordering::Relaxed)))],
        )?;
        family(
            e,
            "ws_accepted",
            "WebSocket connections upgraded",
            [(vec![], counter(&s.accepted))],
        )?;
        family(
            e,
            "ws_rejected",
            "WebSocket upgrades refused, by reason",
            [
                (vec![("reason", "full")], counter(&s.rejected_full)),
                (vec![("reason", "token")], counter(&s.rejected_token)),
                (vec![("reason", "origin")], counter(&s.rejected_origin)),
            ],
        )?;
        family(
            e,
            "ws_closed",
            "WebSocket connections closed by the server, by reason",
            [
                (vec![("reason", "too_big")], counter(&s.closed_too_big)),
                (vec![("reason", "idle")], counter(&s.closed_idle)),
                (vec![("reason", "too_slow")], counter(&s.closed_too_slow)),
                (
                    vec![("reason", "send_timeout")],
                    counter(&s.closed_send_timeout),
                ),
                (vec![("reason", "protocol")], counter(&s.closed_protocol)),
            ],
        )?;
        family(
            e,
            "ws_frames",
            "WebSocket frames sent",
            [(vec![], counter(&s.frames))],
        )?;
        family(
            e,
            "ws_errors",
            "WebSocket client messages answered with an error",
            [(vec![], counter(&s.errors))],
        )?;
        if let Some(r) = &self.redis {
            self.encode_redis(r, e)?;
        }
        if let Some(relay) = &self.relay {
            encode_relay(relay.origin(), e)?;
        }
        Ok(())
    }
}

/// The relay's Feed side (`[listen] feed`): its leaf streams and what it sent them.
fn encode_relay(o: &crate::Origin, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let st = o.stats();
    family(
        e,
        "relay_streams",
        "Leaf Sync streams open at this relay",
        [(vec![], gauge(o.open_streams() as u64))],
    )?;
    for (name, help, c) in relay_counters(st) {
        family(e, name, help, [(vec![], counter(c))])?;
    }
    Ok(())
}

/// The relay's counters: metric name, help, value (`/metrics` and `/status` both list these).
pub(crate) fn relay_counters(
    st: &crate::origin::OriginStats,
) -> [(&'static str, &'static str, &std::sync::atomic::AtomicU64); 9] {
    [
        (
            "relay_streams_opened",
            "Leaf Sync streams opened",
            &st.streams_opened,
        ),
        (
            "relay_snapshots_sent",
            "Snapshots sent to leaves",
            &st.snapshots_sent,
        ),
        (
            "relay_resumes",
            "Leaf subscriptions resumed inside the window",
            &st.resumes,
        ),
        (
            "relay_resets_sent",
            "Resets sent to leaves",
            &st.resets_sent,
        ),
        (
            "relay_batches_sent",
            "Change batches sent to leaves",
            &st.batches_sent,
        ),
        (
            "relay_lagged",
            "Leaf streams that overflowed their queue",
            &st.lagged,
        ),
        ("relay_fetches", "Fetch calls answered", &st.fetches),
        (
            "relay_snapshot_encodings",
            "Snapshots encoded (one per topic and position, shared by every leaf)",
            &st.snapshot_encodings,
        ),
        (
            "relay_batch_encodings",
            "Change batches encoded (shared by every leaf at that position)",
            &st.batch_encodings,
        ),
    ]
}

impl Parts {
    fn encode_redis(
        &self,
        r: &crate::serve::redis::RedisStats,
        e: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        family(
            e,
            "redis_connections",
            "Redis protocol connections open",
            [(vec![], gauge(r.open.load(Ordering::Relaxed)))],
        )?;
        family(
            e,
            "redis_accepted",
            "Redis protocol connections accepted",
            [(vec![], counter(&r.accepted))],
        )?;
        family(
            e,
            "redis_rejected",
            "Redis protocol connections refused (redis.maxclients open)",
            [(vec![], counter(&r.rejected_full))],
        )?;
        family(
            e,
            "redis_commands",
            "Redis protocol commands answered",
            [(vec![], counter(&r.commands))],
        )?;
        family(
            e,
            "redis_auth_failures",
            "AUTH with a wrong token, and commands refused before authenticating",
            [(vec![], counter(&r.auth_failures))],
        )?;
        family(
            e,
            "redis_reads",
            "Redis protocol key reads, by result",
            [
                (vec![("result", "hit")], counter(&r.hits)),
                (vec![("result", "miss")], counter(&r.misses)),
            ],
        )?;
        family(
            e,
            "redis_closed",
            "Redis protocol connections closed by the server, by reason",
            [
                (vec![("reason", "protocol")], counter(&r.closed_protocol)),
                (
                    vec![("reason", "query_buffer")],
                    counter(&r.closed_query_buffer),
                ),
                (
                    vec![("reason", "output_buffer")],
                    counter(&r.closed_output_buffer),
                ),
                (vec![("reason", "idle")], counter(&r.closed_idle)),
            ],
        )?;
        family(
            e,
            "redis_pushes",
            "Pushes sent (keyspace notifications and invalidations)",
            [(vec![], counter(&r.pushes))],
        )?;
        family(
            e,
            "redis_pubsub_clients",
            "Connections subscribed or tracking keys now",
            [(vec![], gauge(r.pubsub_clients.load(Ordering::Relaxed)))],
        )?;
        Ok(())
    }
}

/// Times Cache API calls: wraps the gRPC server, so it sees every call, answered or refused.
#[derive(Clone)]
pub(crate) struct ReadTimingLayer {
    reads: Arc<ReadMetrics>,
}

impl ReadTimingLayer {
    pub(crate) fn new(reads: Arc<ReadMetrics>) -> Self {
        ReadTimingLayer { reads }
    }
}

impl<S> tower::Layer<S> for ReadTimingLayer {
    type Service = ReadTiming<S>;

    fn layer(&self, inner: S) -> ReadTiming<S> {
        ReadTiming {
            inner,
            reads: self.reads.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct ReadTiming<S> {
    inner: S,
    reads: Arc<ReadMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for ReadTiming<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = ReadMetrics::method(req.uri().path());
        let fut = self.inner.call(req);
        let Some(i) = method else {
            return Box::pin(fut);
        };
        let reads = self.reads.clone();
        let start = Instant::now();
        Box::pin(async move {
            let resp = fut.await;
            reads.latency[i].observe(start.elapsed().as_secs_f64());
            // A handler's error is a trailers-only response: grpc-status in the headers. A
            // status sent later in trailers (a stream that fails midway) is not seen here.
            let failed = match &resp {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|s| s.as_bytes() != b"0"),
                Err(_) => true,
            };
            if failed {
                reads.errors[i].inc();
            }
            resp
        })
    }
}

/// Parses Prometheus text into `name{labels} -> value`, checking the line grammar strictly
/// enough for tests: `# HELP`/`# TYPE` comments, then samples of a declared family.
#[doc(hidden)]
pub fn parse_text(text: &str) -> Result<HashMap<String, f64>, String> {
    let mut out = HashMap::new();
    let mut families: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(_), _) => {}
                (Some("TYPE"), Some(name), Some(t))
                    if ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) =>
                {
                    // Prometheus refuses a family declared twice.
                    if families.iter().any(|f| f == name) {
                        return Err(at("family declared twice"));
                    }
                    families.push(name.to_string())
                }
                _ => return Err(at("bad comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("bad value"))?,
        };
        let name = series.split('{').next().unwrap_or_default();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(at("bad metric name"));
        }
        if series.contains('{') && !series.ends_with('}') {
            return Err(at("unclosed labels"));
        }
        // A sample belongs to the family declared last: families are not interleaved.
        let declared = families.last().is_some_and(|f| {
            name == f
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.as_str()))
        });
        if !declared {
            return Err(at("sample outside its family's block"));
        }
        out.insert(series.to_string(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_map_to_methods_and_others_do_not() {
        assert_eq!(ReadMetrics::method("/viewcar.cache.v1.Cache/Get"), Some(0));
        assert_eq!(
            ReadMetrics::method("/viewcar.cache.v1.Cache/ListSources"),
            Some(4)
        );
        assert_eq!(ReadMetrics::method("/grpc.health.v1.Health/Check"), None);
        assert_eq!(ReadMetrics::method("/viewcar.cache.v1.Cache/Nope"), None);
    }

    #[test]
    fn parser_rejects_malformed_text() {
        assert!(parse_text("# TYPE a counter\na_total 1\n").is_err());
        assert!(parse_text("# TYPE a_total counter\na_total x\n").is_err());
        let ok =
            parse_text("# HELP a_total h\n# TYPE a_total counter\na_total{x=\"1\"} 2\n").unwrap();
        assert_eq!(ok["a_total{x=\"1\"}"], 2.0);
    }
}
