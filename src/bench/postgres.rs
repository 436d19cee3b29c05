//! Scenario `postgres`: an origin fed by a real Postgres (logical replication, pgoutput), as
//! `[postgres]` in origin.toml runs it.
//!
//! - copy: a table of `--keys` rows of ~100 B copied under the slot's snapshot, then a sidecar
//!   process synced to it: rows/s at the origin and from origin start to the sidecar synced;
//! - apply: row changes streamed from the database (transactions of 1,000 row updates, written
//!   back to back): changes applied per second of wall clock and per CPU-second of the origin
//!   (the harness process, which holds it and does nothing else meanwhile);
//! - latency: single-row transactions at 1k and 5k per second from several connections
//!   (pgbench-style, autocommit `UPDATE`), each writing its send time into the row: the time
//!   until a sidecar `Get` and WebSocket subscribers of the table see it. The clock starts before
//!   the `UPDATE` is sent, so the figure includes the database's own commit.
//!
//! The server is a private one: `initdb` in a temp dir (as the `postgres` user when the harness
//! runs as root), `wal_level = logical`, a free port, `fsync = off` (commits do not wait for this
//! machine's disk, so the figures are the replication path's; `synchronous_commit` stays on,
//! because with it off the WAL writer hands commits to the walsender only every
//! `wal_writer_delay`, 200 ms), stopped at the end. Without Postgres installed the scenario is
//! skipped with a note.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pg_walstream::PgReplicationConnection;
use serde_json::json;
use tokio::sync::watch;

use super::load::{self, Samples};
use super::procs::{cpu_secs, free_port, temp_dir, OriginHost, SidecarProc, SidecarSpec};
use super::report::{rate, us, Table};
use super::{BenchError, Ctx};
use crate::config::{ByteSize, Dur, OriginConfig, PgTls, PostgresConfig, TableSpec};
use crate::origin::postgres::PgOrigin;
use crate::pb::cache::v1 as pb;

/// A Postgres server of the harness's own, stopped (immediate) when dropped.
pub struct LocalPostgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The newest `bin` directory of a Debian-style Postgres install that has `initdb`.
pub fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

impl LocalPostgres {
    /// `initdb` and start a server with logical replication on a free loopback port; `None`
    /// when Postgres is not installed.
    pub fn start(tag: &str) -> Result<Option<LocalPostgres>, BenchError> {
        let Some(bin) = postgres_bin() else {
            return Ok(None);
        };
        let dir = temp_dir(tag)?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?
                .success();
            if !ok {
                return Err(BenchError::setup(format!(
                    "cannot chown {} to postgres",
                    dir.display()
                )));
            }
        }
        let pg = LocalPostgres {
            bin,
            port: free_port()?,
            dir,
            as_postgres,
        };
        let data = pg.data();
        let data = data.to_string_lossy();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-c wal_level=logical -c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off \
             -c shared_buffers=256MB -c max_wal_size=4GB",
            pg.port,
            pg.dir.display()
        );
        let log = pg.dir.join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-o",
                &opts,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        )?;
        Ok(Some(pg))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path).current_dir("/");
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), BenchError> {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .map_err(|e| BenchError::setup(format!("{tool}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(BenchError::setup(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// CPU seconds used so far by the server: the postmaster and its children (backends, the
    /// walsender, background workers), from /proc.
    pub fn cpu_secs(&self) -> f64 {
        let Some(postmaster) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok())
        else {
            return 0.0;
        };
        let mut total = cpu_secs(postmaster);
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return total;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The parent is the second field after the command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                total += cpu_secs(pid);
            }
        }
        total
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data.to_string_lossy(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect(url: &str) -> Result<Sql, BenchError> {
    PgReplicationConnection::connect(&format!("{url}?sslmode=disable"))
        .map(Sql)
        .map_err(|e| BenchError::setup(format!("connect to postgres: {e}")))
}

/// A blocking SQL connection.
pub struct Sql(PgReplicationConnection);

impl Sql {
    /// Runs `sql` (several statements run as one implicit transaction) and returns the first
    /// column of the last statement's first row, if any.
    pub fn exec(&mut self, sql: &str) -> Result<Option<String>, BenchError> {
        let r = self
            .0
            .exec(sql)
            .map_err(|e| BenchError::setup(format!("{sql}: {e}")))?;
        Ok((r.ntuples() > 0).then(|| r.get_value(0, 0)).flatten())
    }

    /// An LSN as Postgres prints it (`16/B374D848`), as the origin counts versions: a u64.
    fn lsn_of(text: &str) -> Result<u64, BenchError> {
        let (hi, lo) = text
            .split_once('/')
            .ok_or_else(|| BenchError::setup(format!("not an LSN: {text}")))?;
        let p = |s: &str| {
            u64::from_str_radix(s, 16).map_err(|_| BenchError::setup(format!("not an LSN: {text}")))
        };
        Ok((p(hi)? << 32) | p(lo)?)
    }

    /// Runs `sql` followed, in the same transaction, by reading the WAL insert position: a
    /// position at or below the transaction's commit.
    fn exec_before_commit(&mut self, sql: &str) -> Result<u64, BenchError> {
        let text = self
            .exec(&format!("{sql}; SELECT pg_current_wal_insert_lsn()::text"))?
            .ok_or_else(|| BenchError::setup("pg_current_wal_insert_lsn returned nothing"))?;
        Sql::lsn_of(&text)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> Result<T, BenchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BenchError::setup(format!("blocking task: {e}")))?
}

/// The send time written into a row's `t` column, read back from the replicated JSON.
fn stamp(v: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(v).ok()?["t"].as_u64()
}

/// The `t` column of a WebSocket `change` frame: `{"type":"change",...,"value":{...,"t":123,...}}`.
/// (`"t":` occurs in no other field of these frames: the payload is hex.)
fn frame_stamp(text: &str) -> Option<u64> {
    if !text.contains("\"type\":\"change\"") {
        return None;
    }
    let at = text.find("\"t\":")? + 4;
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

type Shared = Arc<Mutex<Histogram<u64>>>;

fn record(h: &Shared, from: u64, now: u64, t: u64) {
    if t >= from && t > 0 {
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record(now.saturating_sub(t).max(1));
    }
}

fn origin_config(pg: &LocalPostgres) -> OriginConfig {
    OriginConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        stream_queue: 1 << 16,
        retain_batches: 1 << 16,
        retain_bytes: ByteSize(512 << 20),
        postgres: Some(PostgresConfig {
            url: pg.url(),
            publication: "viewcar".into(),
            slot: "viewcar_bench".into(),
            tables: vec![TableSpec::Name("items".into())],
            tls: PgTls::Disable,
            snapshot_chunk_rows: 10_000,
            status_interval: Dur(Duration::from_millis(500)),
            retry_min: Dur(Duration::from_millis(50)),
            retry_max: Dur(Duration::from_secs(1)),
        }),
        ..OriginConfig::default()
    }
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let pg = match LocalPostgres::start("postgres")? {
        Some(pg) => pg,
        None => {
            ctx.progress("postgres: skipped: postgres not found");
            ctx.report.note(
                "postgres",
                "skipped: postgres not found (no initdb under /usr/lib/postgresql)",
            );
            return Ok(());
        }
    };
    let rows = if ctx.args.smoke {
        2_000
    } else if ctx.args.quick {
        (ctx.args.keys / 5).max(1000)
    } else {
        ctx.args.keys.max(1000)
    };
    let base = Instant::now();
    let now_ns = move || base.elapsed().as_nanos() as u64;

    // The table: `rows` rows whose JSON value is ~100 bytes:
    // {"id":123456,"t":0,"payload":"<70 characters>"}.
    ctx.progress(format!("postgres: loading {rows} rows into the database"));
    let url = pg.url();
    {
        let url = url.clone();
        blocking(move || {
            let mut sql = connect(&url)?;
            sql.exec(
                "CREATE TABLE items (id int PRIMARY KEY, t bigint NOT NULL, payload text NOT NULL)",
            )?;
            sql.exec(&format!(
                "INSERT INTO items SELECT g, 0, substr(repeat(md5(g::text), 3), 1, 70) \
                 FROM generate_series(1, {rows}) g"
            ))?;
            // The Get probe's row, outside the load's keys.
            sql.exec("INSERT INTO items VALUES (0, 0, 'probe')")?;
            sql.exec("VACUUM ANALYZE items")?;
            Ok(())
        })
        .await?;
    }
    let total_rows = rows as u64 + 1;

    // Copy: origin start -> copy loaded -> a sidecar process synced.
    ctx.progress("postgres: initial copy");
    let started = Instant::now();
    let source = PgOrigin::start(origin_config(&pg))
        .await
        .map_err(|e| BenchError::setup(format!("postgres origin: {e}")))?;
    tokio::time::timeout(Duration::from_secs(600), source.wait_streaming())
        .await
        .map_err(|_| {
            BenchError::setup(format!("the copy did not finish: {:?}", source.status()))
        })?;
    let copied = started.elapsed();
    let copied_rows = source.status().copied_rows;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let host = OriginHost::serve(source.origin().clone(), listener)?;
    let sidecar = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: host.addr,
            topics: &["items"],
            views: Vec::new(),
            http: true,
            redis: false,
            unix_grpc: false,
            ws_max_connections: None,
        },
        Some(("items", total_rows)),
        Duration::from_secs(600),
    )
    .await?;
    let synced = started.elapsed();
    let row_bytes = source.origin().value("items", "1").map_or(0, |v| v.len());
    let mut table = Table::new(
        format!("postgres: initial copy of {total_rows} rows of ~{row_bytes} B (values as JSON)"),
        &["stage", "seconds", "rows/s"],
    );
    let per_s = |d: Duration| total_rows as f64 / d.as_secs_f64().max(1e-9);
    table.row(vec![
        "copied into the origin".into(),
        format!("{:.2}", copied.as_secs_f64()),
        rate(per_s(copied)),
    ]);
    table.row(vec![
        "origin start -> sidecar synced".into(),
        format!("{:.2}", synced.as_secs_f64()),
        rate(per_s(synced)),
    ]);
    ctx.report.add_table(table);
    ctx.report.set(
        "postgres",
        "copy",
        json!({"rows": total_rows, "copied_rows": copied_rows, "row_bytes": row_bytes,
               "origin_copy_s": copied.as_secs_f64(), "origin_rows_per_s": per_s(copied),
               "synced_s": synced.as_secs_f64(), "rows_per_s_to_synced": per_s(synced)}),
    );

    apply(ctx, &url, &source, &sidecar, rows).await?;

    let rates: &[u32] = if ctx.args.smoke {
        &[200]
    } else {
        &[1000, 5000]
    };
    let mut table = Table::new(
        "postgres: commit -> visible (single-row transactions from 4 connections)",
        &[
            "tx/s asked",
            "tx/s done",
            "visible to",
            "samples",
            "p50",
            "p90",
            "p99",
            "max",
            "CPU/s harness",
            "sidecar",
            "postgres",
        ],
    );
    for &r in rates {
        latency(ctx, &pg, &sidecar, rows, r, now_ns, &mut table).await?;
    }
    ctx.report.add_table(table);
    drop(sidecar);
    drop(host);
    drop(source);
    drop(pg);
    Ok(())
}

/// Transactions of 1,000 row updates written back to back; the origin's apply rate.
async fn apply(
    ctx: &mut Ctx,
    url: &str,
    source: &PgOrigin,
    sidecar: &SidecarProc,
    rows: usize,
) -> Result<(), BenchError> {
    const PER_TXN: usize = 1000;
    let changes = if ctx.args.smoke {
        PER_TXN * 2
    } else if ctx.args.quick {
        100_000
    } else {
        400_000
    }
    .min(rows / PER_TXN * PER_TXN)
    .max(PER_TXN);
    ctx.progress(format!(
        "postgres: streaming {changes} row changes in transactions of {PER_TXN}"
    ));
    let me = std::process::id();
    let cpu0 = cpu_secs(me);
    let sidecar_cpu0 = cpu_secs(sidecar.proc.pid());
    let started = Instant::now();
    let url = url.to_string();
    let last = blocking(move || {
        let mut sql = connect(&url)?;
        let mut last = 0;
        for i in 0..changes / PER_TXN {
            let from = (i * PER_TXN) % rows + 1;
            last = sql.exec_before_commit(&format!(
                "UPDATE items SET t = t + 1 WHERE id BETWEEN {from} AND {}",
                from + PER_TXN - 1
            ))?;
        }
        Ok(last)
    })
    .await?;
    let written = started.elapsed();
    tokio::time::timeout(Duration::from_secs(300), source.wait_applied(last))
        .await
        .map_err(|_| BenchError::setup(format!("changes not applied: {:?}", source.status())))?;
    let applied = started.elapsed();
    let cpu = cpu_secs(me) - cpu0;
    // The sidecar has them when a read at that position returns.
    let mut c = sidecar.client.clone();
    c.get(pb::GetRequest {
        source: "items".into(),
        key: "1".into(),
        options: Some(pb::ReadOptions {
            min_version: last,
            wait_ms: 60_000,
            max_staleness_ms: 0,
            after: Vec::new(),
        }),
    })
    .await
    .map_err(|e| BenchError::setup(format!("sidecar Get: {e}")))?;
    let at_sidecar = started.elapsed();
    let sidecar_cpu = cpu_secs(sidecar.proc.pid()) - sidecar_cpu0;
    let n = changes as f64;
    let mut table = Table::new(
        format!("postgres: {changes} streamed row changes (transactions of {PER_TXN})"),
        &["", "value"],
    );
    table.row(vec![
        "written by the database (s)".into(),
        format!("{:.2}", written.as_secs_f64()),
    ]);
    table.row(vec![
        "applied at the origin (s)".into(),
        format!("{:.2}", applied.as_secs_f64()),
    ]);
    table.row(vec![
        "applied/s (wall)".into(),
        rate(n / applied.as_secs_f64()),
    ]);
    table.row(vec!["origin CPU (s)".into(), format!("{cpu:.2}")]);
    table.row(vec![
        "applied per origin CPU-s".into(),
        rate(n / cpu.max(0.01)),
    ]);
    table.row(vec![
        "in the sidecar (s)".into(),
        format!("{:.2}", at_sidecar.as_secs_f64()),
    ]);
    table.row(vec![
        "applied per sidecar CPU-s".into(),
        rate(n / sidecar_cpu.max(0.01)),
    ]);
    ctx.report.add_table(table);
    ctx.report.set(
        "postgres",
        "apply",
        json!({"changes": changes, "per_transaction": PER_TXN,
               "written_s": written.as_secs_f64(), "applied_s": applied.as_secs_f64(),
               "applied_per_s": n / applied.as_secs_f64(), "origin_cpu_s": cpu,
               "applied_per_origin_cpu_s": n / cpu.max(0.01),
               "sidecar_s": at_sidecar.as_secs_f64(), "sidecar_cpu_s": sidecar_cpu,
               "applied_per_sidecar_cpu_s": n / sidecar_cpu.max(0.01)}),
    );
    Ok(())
}

const WRITERS: usize = 4;

/// Single-row transactions at `tx_rate`; Get probe and WebSocket subscribers time them.
#[allow(clippy::too_many_arguments)]
async fn latency(
    ctx: &mut Ctx,
    pg: &LocalPostgres,
    sidecar: &SidecarProc,
    rows: usize,
    tx_rate: u32,
    now_ns: impl Fn() -> u64 + Send + Sync + Copy + 'static,
    table: &mut Table,
) -> Result<(), BenchError> {
    let subscribers = if ctx.args.smoke {
        2
    } else {
        ctx.args.subscribers.max(1)
    };
    let run_for = ctx.run_for(Duration::from_secs(10));
    let warmup = ctx.warmup().max(Duration::from_millis(300));
    let url = pg.url();
    let url = url.as_str();
    let (stop_tx, stop) = watch::channel(false);
    let record_from = Arc::new(AtomicU64::new(u64::MAX));
    let ws_hist: Shared = Arc::new(Mutex::new(load::histogram()));
    let mut tasks = Vec::new();

    let http = sidecar
        .http
        .ok_or_else(|| BenchError::setup("the sidecar has no http listener"))?;
    let ws_url = format!("ws://{http}/ws");
    for n in 0..subscribers {
        let (mut socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .map_err(|e| BenchError::setup(format!("WebSocket {ws_url}: {e}")))?;
        let sub = json!({"op":"subscribe","id":format!("s{n}"),"source":"items","prefix":"","initial":false});
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                sub.to_string(),
            ))
            .await
            .map_err(|e| BenchError::setup(format!("WebSocket subscribe: {e}")))?;
        let (h, from, mut stop) = (ws_hist.clone(), record_from.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = socket.next() => match msg {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                            let now = now_ns();
                            // A scan, not a JSON parse: these subscribers share the harness's
                            // two cores with the origin and the load.
                            if let Some(t) = frame_stamp(text.as_str()) {
                                record(&h, from.load(Ordering::Relaxed), now, t);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }));
    }

    // The load: WRITERS connections, each at tx_rate / WRITERS, on keys of its own.
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, done, errors, stop) =
            (url.to_string(), done.clone(), errors.clone(), stop.clone());
        writers.push(std::thread::spawn(move || -> Result<(), BenchError> {
            let mut sql = connect(&url)?;
            let per_s = f64::from(tx_rate) / WRITERS as f64;
            let start = Instant::now();
            let mut sent = 0u64;
            while !*stop.borrow() {
                // Sleep until this writer's next transaction is due (open loop: a slow
                // commit is not made up for by skipping the wait of the next).
                let next = Duration::from_secs_f64(sent as f64 / per_s);
                let now = start.elapsed();
                if next > now {
                    std::thread::sleep(next - now);
                    continue;
                }
                let id = (sent as usize * WRITERS + w) * 7919 % rows + 1;
                let sql_text = format!("UPDATE items SET t = {} WHERE id = {id}", now_ns());
                match sql.exec(&sql_text) {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                sent += 1;
            }
            Ok(())
        }));
    }

    // The Get probe: update the probe row, then read with min_version at a position at or
    // below its commit, reading again past each version that does not hold it yet.
    let probe = {
        let url = url.to_string();
        let client = sidecar.client.clone();
        let from = record_from.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut s = Samples::new();
            let sql = match blocking(move || connect(&url)).await {
                Ok(c) => Arc::new(Mutex::new(c)),
                Err(e) => {
                    s.errors += 1;
                    s.first_error = Some(e.to_string());
                    return s;
                }
            };
            while !*stop.borrow() {
                let t = now_ns();
                let conn = sql.clone();
                let at = blocking(move || {
                    conn.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .exec_before_commit(&format!("UPDATE items SET t = {t} WHERE id = 0"))
                })
                .await;
                let mut min_version = match at {
                    Ok(v) => v,
                    Err(e) => {
                        s.errors += 1;
                        s.first_error.get_or_insert(e.to_string());
                        break;
                    }
                };
                let seen = loop {
                    let mut c = client.clone();
                    let r = c
                        .get(pb::GetRequest {
                            source: "items".into(),
                            key: "0".into(),
                            options: Some(pb::ReadOptions {
                                min_version,
                                wait_ms: 2000,
                                max_staleness_ms: 0,
                                after: Vec::new(),
                            }),
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            let value = r.item.as_ref().and_then(|it| stamp(&it.value));
                            if value >= Some(t) {
                                break Ok(now_ns());
                            }
                            min_version = r.source_version + 1;
                        }
                        Err(e) => break Err(e.to_string()),
                    }
                };
                if t >= from.load(Ordering::Relaxed) {
                    match seen {
                        Ok(at) => s.hist.saturating_record(at.saturating_sub(t).max(1)),
                        Err(e) => {
                            s.errors += 1;
                            s.first_error.get_or_insert(e);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            s
        })
    };

    ctx.progress(format!(
        "postgres: {tx_rate} tx/s, {subscribers} WebSocket subscribers, warming up"
    ));
    tokio::time::sleep(warmup).await;
    let done0 = done.load(Ordering::Relaxed);
    let me = std::process::id();
    let cpu0 = [cpu_secs(me), cpu_secs(sidecar.proc.pid()), pg.cpu_secs()];
    record_from.store(now_ns(), Ordering::Relaxed);
    tokio::time::sleep(run_for).await;
    let done1 = done.load(Ordering::Relaxed);
    let cpu1 = [cpu_secs(me), cpu_secs(sidecar.proc.pid()), pg.cpu_secs()];
    // CPU-seconds per second of the window: the harness (origin, load, subscribers), the
    // sidecar, Postgres. This machine has two cores.
    let cpu: Vec<f64> = cpu0
        .iter()
        .zip(cpu1)
        .map(|(a, b)| (b - a) / run_for.as_secs_f64())
        .collect();
    record_from.store(u64::MAX, Ordering::Relaxed);
    stop_tx.send_replace(true);
    for w in writers {
        let _ = w.join();
    }
    let probe_s = probe.await.map_err(|e| BenchError::setup(e.to_string()))?;
    // Let the last changes arrive before the subscribers stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for t in tasks {
        t.abort();
    }
    let achieved = (done1 - done0) as f64 / run_for.as_secs_f64();
    let ws = ws_hist.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (name, h) in [("Get (min_version)", &probe_s.hist), ("WebSocket", &ws)] {
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        table.row(vec![
            rate(f64::from(tx_rate)),
            rate(achieved),
            name.to_string(),
            h.len().to_string(),
            us(q(0.5)),
            us(q(0.9)),
            us(q(0.99)),
            us(h.max() as f64 / 1000.0),
            format!("{:.2}", cpu[0]),
            format!("{:.2}", cpu[1]),
            format!("{:.2}", cpu[2]),
        ]);
        ctx.report.push(
            "postgres",
            "latency",
            json!({"tx_rate_asked": tx_rate, "tx_rate_achieved": achieved, "channel": name,
                   "subscribers": subscribers, "samples": h.len(), "p50_us": q(0.5),
                   "p90_us": q(0.9), "p99_us": q(0.99), "max_us": h.max() as f64 / 1000.0,
                   "cpu_per_s": {"harness": cpu[0], "sidecar": cpu[1], "postgres": cpu[2]}}),
        );
    }
    let write_errors = errors.load(Ordering::Relaxed);
    if probe_s.errors > 0 || write_errors > 0 {
        ctx.report.note(
            "postgres",
            format!(
                "at {tx_rate} tx/s: {write_errors} load transactions failed; {} Get probes failed: {}",
                probe_s.errors,
                probe_s.first_error.unwrap_or_default()
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_reads_as_the_origin_counts_versions() {
        assert_eq!(Sql::lsn_of("0/16B3748").unwrap(), 0x16B3748);
        assert_eq!(Sql::lsn_of("1/0").unwrap(), 1 << 32);
        assert_eq!(Sql::lsn_of("FFFFFFFF/FFFFFFFF").unwrap(), u64::MAX);
        assert!(Sql::lsn_of("16B3748").is_err());
        assert!(Sql::lsn_of("0/xyz").is_err());
    }

    #[test]
    fn the_stamp_is_read_from_a_change_frame() {
        let frame = r#"{"type":"change","id":"s0","source":"items","key":"5","value":{"id":5,"t":987,"payload":"ab"},"version":1}"#;
        assert_eq!(frame_stamp(frame), Some(987));
        assert_eq!(frame_stamp(r#"{"type":"synced","id":"s0"}"#), None);
        assert_eq!(frame_stamp(r#"{"type":"change","value":{"id":5}}"#), None);
    }

    #[test]
    fn the_stamp_is_read_from_the_row_json() {
        assert_eq!(stamp(br#"{"id":1,"t":42,"payload":"x"}"#), Some(42));
        assert_eq!(stamp(br#"{"id":1,"payload":"x"}"#), None);
    }
}
