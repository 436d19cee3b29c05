//! Scenario `ingest`: how fast the sidecar takes changes in, how fast it loads a snapshot, and
//! what a key costs in memory beside Redis.
//! - changes applied per second: the demo catalog, then a burst of price and stock changes
//!   (batches of 100, one version each) published at the origin; timed from the first publish to
//!   the last version being readable (`Get` with `min_version`), with and without the demo views;
//!   the sidecar's CPU time over the burst gives changes per CPU-second (the writer is one task);
//! - snapshot: N keys of S bytes at the origin, then a sidecar started: process start to synced,
//!   with the CPU the sidecar used (all of its life) and the origin (this process) used meanwhile;
//! - memory: that sidecar's RSS minus an idle sidecar's, per key, beside Redis `used_memory`
//!   (and its RSS) grown by the same keys and values.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::fanout::product_page_views;
use super::procs::{OriginHost, SidecarProc, SidecarSpec};
use super::report::{rate, Table};
use super::resp::{Redis, RedisServer, Reply};
use super::{BenchError, Ctx};
use crate::demo;
use crate::origin::Put;
use crate::pb::cache::v1 as pb;

/// User + system CPU time of a process, from /proc (Linux); zero elsewhere.
fn cpu_time(pid: u32) -> Duration {
    Duration::from_secs_f64(super::procs::cpu_secs(pid))
}

async fn wait_version(
    sidecar: &SidecarProc,
    source: &str,
    key: &str,
    version: u64,
) -> Result<(), BenchError> {
    let mut c = sidecar.client.clone();
    loop {
        let r = c
            .get(pb::GetRequest {
                source: source.into(),
                key: key.into(),
                options: Some(pb::ReadOptions {
                    min_version: version,
                    wait_ms: 10_000,
                    max_staleness_ms: 0,
                    after: Vec::new(),
                }),
            })
            .await;
        match r {
            Ok(r) if r.get_ref().source_version >= version => return Ok(()),
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::Unavailable => {}
            Err(s) => return Err(BenchError::setup(format!("Get {source}: {s}"))),
        }
    }
}

/// One burst of `changes` price and stock changes against a fresh sidecar; returns
/// (changes/s, changes per sidecar CPU-second).
async fn burst(
    ctx: &Ctx,
    views: bool,
    changes: usize,
    products: usize,
) -> Result<(f64, f64, u64), BenchError> {
    let origin = OriginHost::with_catalog(products).await?;
    let sidecar = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: origin.addr,
            topics: &demo::TOPICS,
            views: if views {
                product_page_views(origin.addr)
            } else {
                Vec::new()
            },
            http: false,
            redis: false,
            unix_grpc: false,
            ws_max_connections: None,
        },
        None,
        Duration::from_secs(60),
    )
    .await?;
    // Prepare every batch first so that the timed part is publish + apply only.
    let mut rng = StdRng::seed_from_u64(9);
    let per_batch = 100;
    let mut batches: Vec<(&str, Vec<Put>)> = Vec::with_capacity(changes / per_batch + 1);
    let mut left = changes;
    let mut n = 0usize;
    while left > 0 {
        let k = left.min(per_batch);
        let topic = if n % 2 == 0 { "prices" } else { "inventory" };
        let mut seen = std::collections::HashSet::new();
        let mut puts = Vec::with_capacity(k);
        while puts.len() < k {
            let i = rng.random_range(0..products);
            if !seen.insert(i) {
                continue;
            }
            let v = if topic == "prices" {
                format!(
                    r#"{{"id":"{}","amount":{},"currency":"EUR"}}"#,
                    demo::product_id(i),
                    rng.random_range(199..99_999)
                )
            } else {
                format!(
                    r#"{{"sku":"{}","available":{},"warehouse":"wh-{}"}}"#,
                    demo::sku(i),
                    rng.random_range(0..500),
                    i % 4
                )
            };
            let key = if topic == "prices" {
                demo::product_id(i)
            } else {
                demo::sku(i)
            };
            puts.push(Put::upsert(key, Bytes::from(v)));
        }
        batches.push((topic, puts));
        left -= k;
        n += 1;
    }
    let cpu0 = cpu_time(sidecar.proc.pid());
    let start = Instant::now();
    let mut last = std::collections::HashMap::new();
    for (topic, puts) in batches {
        let pos = origin
            .origin
            .publish(topic, puts)
            .map_err(|e| BenchError::setup(e.to_string()))?;
        last.insert(topic, pos.version);
    }
    let published = start.elapsed();
    for (topic, version) in &last {
        let key = if *topic == "prices" {
            demo::product_id(0)
        } else {
            demo::sku(0)
        };
        wait_version(&sidecar, topic, &key, *version).await?;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(sidecar.proc.pid()).saturating_sub(cpu0);
    let lagged = origin
        .origin
        .stats()
        .lagged
        .load(std::sync::atomic::Ordering::Relaxed);
    ctx.progress(format!(
        "ingest: {} changes ({}), published in {:.0} ms, applied in {:.0} ms, sidecar CPU {:.0} ms",
        changes,
        if views { "with views" } else { "no views" },
        published.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3
    ));
    Ok((
        changes as f64 / elapsed.as_secs_f64(),
        changes as f64 / cpu.as_secs_f64().max(1e-3),
        lagged,
    ))
}

fn blob_key(i: usize) -> String {
    format!("key:{i:09}")
}

fn blob_value(i: usize, size: usize) -> Bytes {
    let mut v = format!("{i:x}-").into_bytes();
    v.resize(size, b'x');
    Bytes::from(v)
}

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let (changes, products) = if ctx.args.smoke {
        (5_000, 200)
    } else if ctx.args.quick {
        (200_000, 3000)
    } else {
        (1_000_000, 3000)
    };
    let mut table = Table::new(
        "ingest: changes applied (batches of 100 price/stock changes), snapshot load, memory per key",
        &["measure", "figure", "detail"],
    );
    for views in [false, true] {
        ctx.progress(format!(
            "ingest: {changes} changes, {}",
            if views {
                "with the demo views"
            } else {
                "without views"
            }
        ));
        let (per_s, per_cpu_s, lagged) = burst(ctx, views, changes, products).await?;
        let label = if views {
            "with demo views"
        } else {
            "without views"
        };
        table.row(vec![
            format!("changes applied, {label}"),
            rate(per_s),
            format!("{} per sidecar CPU-second", rate(per_cpu_s)),
        ]);
        ctx.report.push(
            "ingest",
            "changes",
            json!({"views": views, "changes": changes, "per_s": per_s, "per_cpu_s": per_cpu_s, "lagged_streams": lagged}),
        );
        if lagged > 0 {
            ctx.report.note(
                "ingest",
                format!(
                    "{label}: the origin caught a lagging stream up by snapshot {lagged} times"
                ),
            );
        }
    }

    // Snapshot load and memory.
    let keys = if ctx.args.smoke {
        20_000
    } else {
        ctx.args.keys.max(1)
    };
    let size = ctx.args.value_bytes.max(1);
    ctx.progress(format!(
        "ingest: snapshot of {keys} keys x {size} B, loading the origin"
    ));
    let origin = OriginHost::start(&["blobs", "empty"]).await?;
    let idle = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: origin.addr,
            topics: &["empty"],
            views: Vec::new(),
            http: false,
            redis: false,
            unix_grpc: false,
            ws_max_connections: None,
        },
        None,
        Duration::from_secs(30),
    )
    .await?;
    let idle_rss = idle.proc.rss_bytes();
    drop(idle);
    let mut i = 0;
    while i < keys {
        let end = (i + 10_000).min(keys);
        let puts = (i..end)
            .map(|j| Put::upsert(blob_key(j), blob_value(j, size)))
            .collect();
        origin
            .origin
            .publish("blobs", puts)
            .map_err(|e| BenchError::setup(e.to_string()))?;
        i = end;
    }
    ctx.progress("ingest: starting a sidecar on the loaded origin");
    // The origin is served from this process: its CPU over the load is the origin's side
    // (chunk encoding, HTTP/2), give or take the harness waiting for the sidecar.
    let origin_cpu0 = cpu_time(std::process::id());
    let start = Instant::now();
    let full = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: origin.addr,
            topics: &["blobs"],
            views: Vec::new(),
            http: false,
            redis: false,
            unix_grpc: false,
            ws_max_connections: None,
        },
        Some(("blobs", keys as u64)),
        Duration::from_secs(120),
    )
    .await?;
    let load_s = start.elapsed().as_secs_f64();
    let load_cpu = cpu_time(full.proc.pid()).as_secs_f64();
    let origin_cpu = cpu_time(std::process::id())
        .saturating_sub(origin_cpu0)
        .as_secs_f64();
    // Let the allocator settle (snapshot staging buffers freed) before reading RSS.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let full_rss = full.proc.rss_bytes();
    let per_key = full_rss.saturating_sub(idle_rss) as f64 / keys as f64;
    let payload = (blob_key(0).len() + size) as f64;
    drop(full);
    drop(origin);
    table.row(vec![
        format!("snapshot of {keys} keys x {size} B"),
        format!("{load_s:.2} s"),
        format!(
            "{} keys/s, process start to synced; CPU: sidecar {load_cpu:.2} s, origin {origin_cpu:.2} s",
            rate(keys as f64 / load_s)
        ),
    ]);
    table.row(vec![
        "sidecar memory per key".into(),
        format!("{per_key:.0} B"),
        format!(
            "RSS {} MiB - idle {} MiB; payload {payload:.0} B/key",
            full_rss >> 20,
            idle_rss >> 20
        ),
    ]);
    let mut mem = json!({"keys": keys, "value_bytes": size, "payload_bytes_per_key": payload,
        "snapshot_load_s": load_s, "snapshot_sidecar_cpu_s": load_cpu, "snapshot_origin_cpu_s": origin_cpu, "sidecar_rss": full_rss, "sidecar_idle_rss": idle_rss, "sidecar_bytes_per_key": per_key});

    match RedisServer::start().await? {
        None => {
            ctx.report
                .note("ingest", "Redis memory skipped: redis-server not found");
        }
        Some(server) => {
            ctx.progress(format!("ingest: loading {keys} keys into Redis"));
            let mut c = Redis::connect(server.port).await?;
            let before = c.used_memory().await?;
            let rss_before = server.proc.rss_bytes();
            server
                .load((0..keys).map(|j| (blob_key(j), blob_value(j, size))))
                .await?;
            let after = c.used_memory().await?;
            let rss_after = server.proc.rss_bytes();
            if let Reply::Int(n) = c.cmd(&[b"DBSIZE"]).await? {
                if n as usize != keys {
                    ctx.report
                        .note("ingest", format!("Redis holds {n} keys, expected {keys}"));
                }
            }
            let redis_per_key = after.saturating_sub(before) as f64 / keys as f64;
            let redis_rss_per_key = rss_after.saturating_sub(rss_before) as f64 / keys as f64;
            table.row(vec![
                "Redis used_memory per key".into(),
                format!("{redis_per_key:.0} B"),
                format!("RSS grew {redis_rss_per_key:.0} B/key"),
            ]);
            mem["redis_used_memory_per_key"] = json!(redis_per_key);
            mem["redis_rss_per_key"] = json!(redis_rss_per_key);
            mem["sidecar_over_redis"] = json!(per_key / redis_per_key.max(1e-9));
        }
    }
    ctx.report.set("ingest", "memory", mem);
    ctx.report.add_table(table);
    Ok(())
}
