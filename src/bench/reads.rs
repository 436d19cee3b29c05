//! Scenario `reads`: a single-key read and the product page read, side by side at one
//! concurrency, over the same demo catalog values:
//! - the sidecar over TCP loopback (`Get` of `products`; `Get` of the `product_page` view);
//! - Redis (`GET`; the page as one pipelined batch of its six keys, composed by the client:
//!   the best case of cache-aside, since every key is known up front);
//! - the in-process store (`Source::get`), the floor any out-of-process read is paid on top of;
//! - a TCP round trip on loopback (64 bytes echoed), the floor of any loopback protocol;
//! - the Redis protocol, one RESP client for both servers: the sidecar's `GET` and Redis's,
//!   one at a time and 16 pipelined; the page as one `GET product_page:ID` from the sidecar
//!   against Redis cache-aside as an application does it: 3 dependent rounds (the product;
//!   then its price, stock, brand and reviews, pipelined; then the brand's country);
//! - the Cache API over a Unix socket (a second sidecar, `listen.grpc = "unix:..."`): `Get`
//!   and the page, to set beside the TCP rows.
//!
//! Every worker has its own connection, for every system.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::fanout::PageSetup;
use super::load::{self, Samples};
use super::procs::{self, SidecarProc, SidecarSpec};
use super::report::{latency_cells, Table};
use super::resp::{Redis, RedisServer, Reply};
use super::{BenchError, Ctx};
use crate::demo::{self, CatalogSize};
use crate::hub::Hub;
use crate::store::Clock;
use crate::store::{Source, SourceKind};
use crate::types::Mode;
use crate::writer::{SnapEntry, Step, Writer, WriterStats};

/// The catalog loaded into in-process sources, one per topic, through the sidecar's writer.
fn in_process_sources(products: usize) -> Vec<(&'static str, Arc<Source>)> {
    let size = CatalogSize {
        products,
        ..CatalogSize::default()
    };
    let mut writer = Writer::without_views(Arc::new(Hub::new()), Arc::new(WriterStats::default()));
    let mut out = Vec::new();
    for (topic, puts) in demo::catalog(size, 1) {
        let src = Arc::new(Source::new(
            topic,
            SourceKind::Topic {
                origin: Arc::from("bench"),
            },
            Mode::Full,
            Clock::new(),
            Duration::from_secs(10),
        ));
        let entries: Vec<SnapEntry> = puts
            .into_iter()
            .filter_map(|p| {
                p.value.map(|value| SnapEntry {
                    key: p.key,
                    value,
                    version: 1,
                })
            })
            .collect();
        let mut events = Vec::new();
        writer.apply(
            Step::SnapshotChunk {
                in_flight: None,
                total: entries.len() as u64,
                source: src.clone(),
                epoch: "bench".into(),
                version: 1,
                entries: entries.into(),
                last: true,
            },
            &mut events,
        );
        writer.flush(&mut events);
        out.push((topic, src));
    }
    out
}

async fn echo_server() -> Result<std::net::SocketAddr, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One row of the remote reads: what is read, from which system, and the op that reads it.
struct Row {
    system: &'static str,
    read: &'static str,
    calls: u32,
    op: load::Op,
}

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let products = if ctx.args.smoke { 200 } else { 3000 };
    let setup = PageSetup::start(ctx, products).await?;
    let conc = ctx.args.concurrency.max(1);
    let run_for = ctx.run_for(Duration::from_secs(4));
    let warmup = ctx.warmup();
    let ids = setup.ids.clone();
    let catalog = setup.catalog.clone();
    let mut rows: Vec<Row> = Vec::new();

    // TCP loopback round trip: the floor under every remote read below.
    let echo = echo_server().await?;
    let mut conns = Vec::new();
    for _ in 0..conc {
        let s = TcpStream::connect(echo).await?;
        s.set_nodelay(true)?;
        conns.push(Arc::new(Mutex::new(s)));
    }
    let conns = Arc::new(conns);
    rows.push(Row {
        system: "tcp loopback",
        read: "64 B echo",
        calls: 1,
        op: load::op(move |w, _| {
            let c = conns[w % conns.len()].clone();
            async move {
                let mut s = c.lock().await;
                let mut buf = [7u8; 64];
                s.write_all(&buf).await.map_err(|e| e.to_string())?;
                s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                Ok(())
            }
        }),
    });

    // The sidecar over gRPC (TCP).
    let clients = Arc::new(setup.sidecar.clients(conc).await?);
    rows.push(Row {
        system: "sidecar",
        read: "Get",
        calls: 1,
        op: grpc_get_op(&clients, &ids),
    });
    let page_label = if setup.page_mode() == "view" {
        "page: Get product_page"
    } else {
        "page: BatchGet 6 keys"
    };
    rows.push(Row {
        system: "sidecar",
        read: page_label,
        calls: 1,
        op: setup.page_op(clients.to_vec()),
    });

    // The Cache API over a Unix socket: a second sidecar on the same origin.
    let unix = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: setup.origin_addr(),
            topics: &demo::TOPICS,
            views: super::fanout::product_page_views(setup.origin_addr()),
            http: false,
            redis: false,
            unix_grpc: true,
            ws_max_connections: None,
        },
        None,
        Duration::from_secs(60),
    )
    .await?;
    let unix_clients = Arc::new(unix.clients(conc).await?);
    rows.push(Row {
        system: "sidecar (unix)",
        read: "Get",
        calls: 1,
        op: grpc_get_op(&unix_clients, &ids),
    });
    rows.push(Row {
        system: "sidecar (unix)",
        read: page_label,
        calls: 1,
        op: setup.page_op(unix_clients.to_vec()),
    });

    // The sidecar over the Redis protocol.
    if let Some(port) = setup.sidecar.redis {
        let rc = resp_connections(port, conc).await?;
        rows.push(Row {
            system: "sidecar",
            read: "RESP GET",
            calls: 1,
            op: resp_get_op(&rc, &ids, "products"),
        });
        rows.push(Row {
            system: "sidecar",
            read: "RESP GET -P 16",
            calls: 1,
            op: resp_pipelined_op(&rc, &ids),
        });
        if setup.page_mode() == "view" {
            rows.push(Row {
                system: "sidecar",
                read: "page: RESP GET product_page",
                calls: 1,
                op: resp_get_op(&rc, &ids, "product_page"),
            });
        }
    }

    // Redis, with the same client.
    let redis = RedisServer::start().await?;
    match &redis {
        None => {
            ctx.progress("reads: skipped: redis-server not found");
            ctx.report.note(
                "reads",
                "skipped: redis-server not found (apt-get install redis-server)",
            );
        }
        Some(server) => {
            let size = CatalogSize {
                products,
                ..CatalogSize::default()
            };
            let catalog_rows = demo::catalog(size, 1)
                .into_iter()
                .flat_map(|(topic, puts)| {
                    puts.into_iter()
                        .filter_map(move |p| p.value.map(|v| (format!("{topic}:{}", p.key), v)))
                });
            server.load(catalog_rows).await?;
            let rc = resp_connections(server.port, conc).await?;
            rows.push(Row {
                system: "redis",
                read: "GET",
                calls: 1,
                op: resp_get_op(&rc, &ids, "products"),
            });
            rows.push(Row {
                system: "redis",
                read: "RESP GET -P 16",
                calls: 1,
                op: resp_pipelined_op(&rc, &ids),
            });
            rows.push(Row {
                system: "redis",
                read: "page: 6 GETs pipelined",
                calls: 1,
                op: redis_page_pipelined_op(&rc, &ids, &catalog),
            });
            rows.push(Row {
                system: "redis",
                read: "page: cache-aside, 3 rounds",
                calls: 3,
                op: cache_aside_op(&rc, &ids),
            });
        }
    }

    // Every row in turn, `rounds` times, each turn a slice of the run: a machine whose load
    // drifts during the run (it is shared) weighs on every row alike instead of on whichever
    // ran at the bad moment.
    let rounds: u32 = if ctx.args.smoke {
        1
    } else if ctx.args.quick {
        2
    } else {
        4
    };
    let slice = run_for / rounds;
    let mut samples: Vec<Samples> = rows.iter().map(|_| Samples::new()).collect();
    for round in 0..rounds {
        for (row, acc) in rows.iter().zip(samples.iter_mut()) {
            ctx.progress(format!(
                "reads: {} {}, C={conc}, round {}/{rounds}",
                row.system,
                row.read,
                round + 1
            ));
            // Connections are warm after the first turn; a short warm-up settles each turn.
            let w = if round == 0 { warmup } else { warmup / 4 };
            acc.absorb(load::closed_loop(conc, w, slice, row.op.clone()).await);
        }
    }
    drop(unix);
    let mut results: Vec<(&str, &str, u32, Samples)> = rows
        .iter()
        .zip(samples)
        .map(|(r, s)| (r.system, r.read, r.calls, s))
        .collect();

    // The in-process floor, on as many threads as there are cores (not C: threads would only
    // queue for the CPU).
    let sources = Arc::new(in_process_sources(products));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(conc);
    ctx.progress(format!("reads: in-process store, {threads} threads"));
    let keys: Arc<Vec<String>> = ids.clone();
    let srcs = sources.clone();
    let s = tokio::task::spawn_blocking(move || {
        load::threads_loop(threads, run_for, move |_, i| {
            let key = &keys[(i as usize * 7919) % keys.len()];
            srcs[0].1.get(key).is_some()
        })
    })
    .await
    .map_err(|e| BenchError::setup(e.to_string()))?;
    results.push(("in-process", "Source::get", 0, s));
    let keys: Arc<Vec<(String, Vec<String>)>> = Arc::new(
        ids.iter()
            .map(|id| {
                let ks = demo::TOPICS
                    .iter()
                    .map(|t| catalog.key_for(t, id).unwrap_or_default())
                    .collect();
                (id.clone(), ks)
            })
            .collect(),
    );
    let srcs = sources.clone();
    let s = tokio::task::spawn_blocking(move || {
        load::threads_loop(threads, run_for, move |_, i| {
            let (_, ks) = &keys[(i as usize * 7919) % keys.len()];
            let mut found = 0;
            for ((_, src), k) in srcs.iter().zip(ks) {
                found += usize::from(std::hint::black_box(src.get(k)).is_some());
            }
            found >= 5
        })
    })
    .await
    .map_err(|e| BenchError::setup(e.to_string()))?;
    results.push(("in-process", "page: 6 Source::get", 0, s));

    let mut table = Table::new(
        format!("reads: demo catalog values, closed loop C={conc} (in-process: {threads} threads)"),
        &[
            "system",
            "read",
            "calls",
            "throughput",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "errors",
        ],
    );
    for (system, read, calls, s) in &results {
        let sum = s.summary(format!("{system} {read}"));
        let mut row = vec![system.to_string(), read.to_string(), calls.to_string()];
        row.extend(latency_cells(&sum));
        table.row(row);
        let mut v = serde_json::to_value(&sum).unwrap_or_default();
        v["system"] = json!(system);
        v["read"] = json!(read);
        v["calls"] = json!(calls);
        ctx.report.push("reads", "runs", v);
    }
    ctx.report.add_table(table);
    let find = |system: &str, prefix: &str| {
        results
            .iter()
            .find(|(s, r, _, _)| *s == system && r.starts_with(prefix))
            .map(|(_, _, _, s)| s.summary(""))
    };
    let mut ratios = serde_json::Map::new();
    if let (Some(a), Some(b)) = (find("sidecar", "Get"), find("redis", "GET")) {
        ratios.insert(
            "get_throughput_sidecar_over_redis".into(),
            json!(a.throughput / b.throughput.max(1e-9)),
        );
        ratios.insert("get_p99_sidecar_us".into(), json!(a.p99_us));
        ratios.insert("get_p99_redis_us".into(), json!(b.p99_us));
    }
    if let (Some(a), Some(b)) = (find("sidecar", "page"), find("redis", "page")) {
        ratios.insert(
            "page_throughput_sidecar_over_redis".into(),
            json!(a.throughput / b.throughput.max(1e-9)),
        );
        ratios.insert("page_p99_sidecar_us".into(), json!(a.p99_us));
        ratios.insert("page_p99_redis_us".into(), json!(b.p99_us));
    }
    let exact = |system: &str, read: &str| {
        results
            .iter()
            .find(|(s, r, _, _)| *s == system && *r == read)
            .map(|(_, _, _, s)| s.summary(""))
    };
    for (name, a, b) in [
        (
            "resp_get_sidecar_over_redis",
            exact("sidecar", "RESP GET"),
            exact("redis", "GET"),
        ),
        (
            "resp_pipelined_sidecar_over_redis",
            exact("sidecar", "RESP GET -P 16"),
            exact("redis", "RESP GET -P 16"),
        ),
        (
            "page_resp_view_over_redis_cache_aside",
            exact("sidecar", "page: RESP GET product_page"),
            exact("redis", "page: cache-aside, 3 rounds"),
        ),
        (
            "get_unix_over_tcp",
            exact("sidecar (unix)", "Get"),
            exact("sidecar", "Get"),
        ),
    ] {
        if let (Some(a), Some(b)) = (a, b) {
            ratios.insert(name.into(), json!(a.throughput / b.throughput.max(1e-9)));
            ratios.insert(format!("{name}_p99_us"), json!([a.p99_us, b.p99_us]));
        }
    }
    if let (Some(a), Some(b)) = (find("sidecar", "Get"), find("tcp loopback", "")) {
        ratios.insert(
            "get_p50_over_tcp_rtt_p50".into(),
            json!(a.p50_us / b.p50_us.max(1e-9)),
        );
    }
    ctx.report
        .set("reads", "ratios", serde_json::Value::Object(ratios));
    ctx.report
        .set("reads", "page_read", json!(setup.page_mode()));
    Ok(())
}

/// Keys per pipelined batch of the `-P 16` rows (as `redis-benchmark -P 16`).
const PIPELINE: usize = 16;

/// `n` RESP connections to `port` on loopback.
async fn resp_connections(port: u16, n: usize) -> Result<Arc<Vec<Arc<Mutex<Redis>>>>, BenchError> {
    let mut rc = Vec::with_capacity(n);
    for _ in 0..n {
        rc.push(Arc::new(Mutex::new(Redis::connect(port).await?)));
    }
    Ok(Arc::new(rc))
}

/// One gRPC `Get` of `products` per op.
fn grpc_get_op(clients: &Arc<Vec<procs::Client>>, ids: &Arc<Vec<String>>) -> load::Op {
    let clients = clients.clone();
    let ids = ids.clone();
    load::op(move |w, i| {
        let mut c = clients[w % clients.len()].clone();
        let key = ids[(i as usize * 7919) % ids.len()].clone();
        async move { procs::get_found(&mut c, "products", key).await }
    })
}

/// The page's six keys in one pipelined batch, every key known up front: the best case of
/// cache-aside, and not how an application can do it (it learns the brand from the product).
fn redis_page_pipelined_op(
    rc: &Arc<Vec<Arc<Mutex<Redis>>>>,
    ids: &Arc<Vec<String>>,
    catalog: &Arc<super::tree::Catalog>,
) -> load::Op {
    let rc = rc.clone();
    let ids = ids.clone();
    let catalog = catalog.clone();
    load::op(move |w, i| {
        let c = rc[w % rc.len()].clone();
        let id = ids[(i as usize * 7919) % ids.len()].clone();
        let keys: Vec<String> = demo::TOPICS
            .iter()
            .filter_map(|t| catalog.key_for(t, &id).map(|k| format!("{t}:{k}")))
            .collect();
        async move {
            let replies = get_all(&c, &keys).await?;
            // Only fetched, not parsed or merged: the sidecar's read is not parsed either, so
            // both sides do the same client work.
            if replies
                .iter()
                .filter(|r| matches!(r, Reply::Bulk(Some(_))))
                .count()
                < 5
            {
                return Err("page parts missing".into());
            }
            Ok(())
        }
    })
}

/// One `GET SOURCE:ID` per op over RESP (`products`, or the `product_page` view).
fn resp_get_op(
    rc: &Arc<Vec<Arc<Mutex<Redis>>>>,
    ids: &Arc<Vec<String>>,
    source: &'static str,
) -> load::Op {
    let rc = rc.clone();
    let ids = ids.clone();
    load::op(move |w, i| {
        let c = rc[w % rc.len()].clone();
        let key = format!("{source}:{}", ids[(i as usize * 7919) % ids.len()]);
        async move {
            match c.lock().await.get(&key).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(format!("{key} not found")),
                Err(e) => Err(e.to_string()),
            }
        }
    })
}

/// `GET` of every key of `keys` in one pipelined write.
async fn get_all(c: &Mutex<Redis>, keys: &[String]) -> Result<Vec<Reply>, String> {
    let cmds: Vec<Vec<&[u8]>> = keys
        .iter()
        .map(|k| vec![&b"GET"[..], k.as_bytes()])
        .collect();
    c.lock()
        .await
        .pipeline(&cmds)
        .await
        .map_err(|e| e.to_string())
}

/// [`PIPELINE`] `GET products:ID` per op, written at once and read back in order.
fn resp_pipelined_op(rc: &Arc<Vec<Arc<Mutex<Redis>>>>, ids: &Arc<Vec<String>>) -> load::Op {
    let rc = rc.clone();
    let ids = ids.clone();
    load::op(move |w, i| {
        let c = rc[w % rc.len()].clone();
        let keys: Vec<String> = (0..PIPELINE as u64)
            .map(|j| {
                let n = (i * PIPELINE as u64 + j) as usize;
                format!("products:{}", ids[(n * 7919) % ids.len()])
            })
            .collect();
        async move {
            let replies = get_all(&c, &keys).await?;
            if replies.iter().all(|r| matches!(r, Reply::Bulk(Some(_)))) {
                Ok(())
            } else {
                Err("a pipelined GET missed".into())
            }
        }
    })
}

/// A string field of a JSON row.
fn field(row: &[u8], name: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(row).map_err(|e| e.to_string())?;
    v.get(name)
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("row without {name}"))
}

/// The product page as an application reads it from a Redis cache: the product; then, from
/// its fields, its price, stock, brand and reviews in one pipelined round; then the brand's
/// country. Each round parses what the one before returned, as the application must.
fn cache_aside_op(rc: &Arc<Vec<Arc<Mutex<Redis>>>>, ids: &Arc<Vec<String>>) -> load::Op {
    let rc = rc.clone();
    let ids = ids.clone();
    load::op(move |w, i| {
        let c = rc[w % rc.len()].clone();
        let id = ids[(i as usize * 7919) % ids.len()].clone();
        async move {
            let mut c = c.lock().await;
            let product = c
                .get(&format!("products:{id}"))
                .await
                .map_err(|e| e.to_string())?
                .ok_or("product not found")?;
            let sku = field(&product, "sku")?;
            let brand = field(&product, "brand_id")?;
            let keys = [
                format!("prices:{id}"),
                format!("inventory:{sku}"),
                format!("brands:{brand}"),
                format!("reviews:{id}"),
            ];
            let cmds: Vec<Vec<&[u8]>> = keys
                .iter()
                .map(|k| vec![&b"GET"[..], k.as_bytes()])
                .collect();
            let replies = c.pipeline(&cmds).await.map_err(|e| e.to_string())?;
            let Some(Reply::Bulk(Some(brand_row))) = replies.get(2) else {
                return Err("brand not found".into());
            };
            let country = field(brand_row, "country_id")?;
            c.get(&format!("countries:{country}"))
                .await
                .map_err(|e| e.to_string())?
                .ok_or("country not found")?;
            Ok(())
        }
    })
}
