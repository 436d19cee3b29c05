//! An origin fed by a real Postgres (logical replication): the initial copy under concurrent
//! writes, every kind of row change, positions shared by two origins, a lost slot, and a
//! transaction seen whole through a sidecar's view. Each test starts its own server (initdb in a
//! temp dir, wal_level = logical, a free port, stopped at the end); without Postgres installed
//! the tests print `skipped: postgres not found` and pass.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use common::*;
use viewcar::config::{Dur, PostgresConfig, TableSpec};
use viewcar::origin::postgres::{PgOrigin, PgStatus};
use viewcar::pb::feed::v1 as feed;
use viewcar::OriginConfig;

/// A Postgres server of its own, in a temp dir; stopped (immediate) when dropped.
struct Pg {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Pg {
    fn start() -> Option<Pg> {
        let Some(bin) = viewcar::bench::postgres::postgres_bin() else {
            common::missing("postgres");
            return None;
        };
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let dir = Pg::own_dir(root);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("port")
            .port();
        let pg = Pg {
            bin,
            dir,
            port,
            as_postgres: root,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.launch();
        Some(pg)
    }

    /// Starts the server of `data()` on `port`.
    fn launch(&self) {
        let data = self.data();
        let opts = format!(
            "-c wal_level=logical -c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c max_replication_slots=20 -c max_wal_senders=20 -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// A temp dir the server's user owns.
    fn own_dir(root: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown the data dir to postgres");
        }
        dir
    }

    /// A physical standby of this server (pg_basebackup), set up to serve on this server's
    /// port once this one is stopped: what a failover looks like from the origin's address.
    fn standby(&self) -> Pg {
        let standby = Pg {
            bin: self.bin.clone(),
            dir: Pg::own_dir(self.as_postgres),
            port: self.port,
            as_postgres: self.as_postgres,
        };
        let data = standby.data();
        let port = self.port.to_string();
        standby.run(
            "pg_basebackup",
            &[
                "-D",
                data.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        standby
    }

    /// Stops the server (fast: connections are ended, WAL is flushed).
    fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let path = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .current_dir("/")
                .output()
        } else {
            Command::new(&path).args(args).output()
        }
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A plain SQL connection (blocking; use it from a blocking thread or briefly).
    fn connect(&self) -> Sql {
        Sql(pg_walstream::PgReplicationConnection::connect(&format!(
            "{}?sslmode=disable",
            self.url()
        ))
        .expect("connect to postgres"))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.data();
        let path = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .current_dir("/")
                .output()
        } else {
            Command::new(&path).args(args).output()
        };
    }
}

struct Sql(pg_walstream::PgReplicationConnection);

impl Sql {
    fn exec(&mut self, sql: &str) {
        self.0.exec(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn rows(&mut self, sql: &str) -> Vec<Vec<String>> {
        let r = self.0.exec(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        (0..r.ntuples())
            .map(|i| {
                (0..r.nfields())
                    .map(|j| r.get_value(i, j).unwrap_or_default())
                    .collect()
            })
            .collect()
    }

    /// `key -> row as JSON` of a table, the oracle a replica must equal.
    fn table(&mut self, table: &str, key: &str) -> BTreeMap<String, Value> {
        self.rows(&format!(
            "SELECT {key}, row_to_json(t)::text FROM {table} t"
        ))
        .into_iter()
        .map(|r| {
            (
                r[0].clone(),
                serde_json::from_str(&r[1]).expect("row_to_json"),
            )
        })
        .collect()
    }
}

fn origin_cfg(pg: &Pg, slot: &str, tables: &[&str]) -> OriginConfig {
    OriginConfig {
        listen: loopback0(),
        progress_interval: Dur(Duration::from_millis(100)),
        postgres: Some(PostgresConfig {
            url: pg.url(),
            publication: "viewcar".into(),
            slot: slot.into(),
            tables: tables
                .iter()
                .map(|t| TableSpec::Name(t.to_string()))
                .collect(),
            tls: viewcar::config::PgTls::Disable,
            snapshot_chunk_rows: 1000,
            status_interval: Dur(Duration::from_millis(200)),
            retry_min: Dur(Duration::from_millis(20)),
            retry_max: Dur(Duration::from_millis(200)),
        }),
        ..OriginConfig::default()
    }
}

/// `key -> JSON` of an origin topic.
fn replica(o: &viewcar::Origin, topic: &str) -> BTreeMap<String, Value> {
    o.rows(topic)
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_slice(&v).expect("JSON value")))
        .collect()
}

/// Waits (on status changes, under the deadline) until the origin's topic equals the table.
async fn until_equal(src: &PgOrigin, pg: &Pg, table: &str, key: &str) {
    let mut sql = pg.connect();
    let want = sql.table(table, key);
    let mut rx: watch::Receiver<PgStatus> = src.watch_status();
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if replica(src.origin(), table) == want {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let got = replica(src.origin(), table);
    if done.is_err() || got != want {
        let missing: Vec<_> = want
            .keys()
            .filter(|k| !got.contains_key(*k))
            .take(5)
            .collect();
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(*k))
            .take(5)
            .collect();
        let differ: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .take(3)
            .collect();
        panic!(
            "topic {table} != table: {} vs {} rows; missing {missing:?}; extra {extra:?}; differ {differ:?}; status {:?}",
            got.len(),
            want.len(),
            src.status()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_change_reaches_the_topic() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec(
        "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, active bool, \
         doc jsonb, score float8, big text)",
    );
    sql.exec("CREATE TABLE prices (sku text, region text, amount int8, PRIMARY KEY (sku, region))");
    sql.exec(
        "INSERT INTO products VALUES (1, 'one', 12.50, true, '{\"tags\": [\"a\"]}', 0.25, 'x'), \
         (2, 'two', 3, false, NULL, NULL, NULL)",
    );
    sql.exec("INSERT INTO prices VALUES ('s1', 'eu', 100), ('s1', 'us', 120), ('s2', 'eu', 7)");
    let src = PgOrigin::start(origin_cfg(&pg, "every_change", &["products", "prices"]))
        .await
        .expect("start");
    within(src.wait_copied(1)).await;
    assert!(
        src.origin().epoch().starts_with("pg-"),
        "{}",
        src.origin().epoch()
    );
    until_equal(&src, &pg, "products", "id::text").await;
    until_equal(&src, &pg, "prices", "sku || '/' || region").await;
    let copy_version = src.origin().version("products").unwrap();
    assert_eq!(copy_version, src.status().applied);

    // Insert, update, delete, and a key update (delete old + put new).
    sql.exec("INSERT INTO products VALUES (3, 'three', 1.5, true, '[1, 2]', 1e300, NULL)");
    sql.exec("UPDATE products SET name = 'uno', price = price + 1 WHERE id = 1");
    sql.exec("DELETE FROM products WHERE id = 2");
    sql.exec("UPDATE products SET id = 30 WHERE id = 3");
    sql.exec("UPDATE prices SET region = 'apac' WHERE sku = 's2'");
    until_equal(&src, &pg, "products", "id::text").await;
    until_equal(&src, &pg, "prices", "sku || '/' || region").await;
    let rows = replica(src.origin(), "products");
    assert!(!rows.contains_key("3") && rows.contains_key("30"));
    assert_eq!(rows["1"]["price"], serde_json::json!(13.5));
    assert_eq!(rows["1"]["active"], Value::Bool(true));
    assert_eq!(rows["1"]["doc"]["tags"][0], "a");
    assert!(src.origin().version("products").unwrap() > copy_version);

    // A TOASTed column left unchanged by an update keeps its value.
    sql.exec(
        "INSERT INTO products (id, name, big) SELECT 4, 'toasted', string_agg(md5(i::text), '') \
         FROM generate_series(1, 4000) i",
    );
    sql.exec("UPDATE products SET name = 'still toasted' WHERE id = 4");
    until_equal(&src, &pg, "products", "id::text").await;
    let big = replica(src.origin(), "products")["4"]["big"]
        .as_str()
        .unwrap()
        .len();
    assert_eq!(big, 4000 * 32);

    // TRUNCATE empties the topic; rows inserted after it in the same transaction stay.
    sql.exec("BEGIN; TRUNCATE prices; INSERT INTO prices VALUES ('s9', 'eu', 1); COMMIT");
    until_equal(&src, &pg, "prices", "sku || '/' || region").await;
    assert_eq!(replica(src.origin(), "prices").len(), 1);

    // Publish to a table-backed topic is refused, naming it.
    let err = src
        .origin()
        .publish("products", vec![put("9", "{}")])
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("products"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_is_refused_by_name() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE keyless (a int, b text)");
    let src = PgOrigin::start(origin_cfg(&pg, "keyless", &["keyless"]))
        .await
        .expect("start");
    let mut rx = src.watch_status();
    let s = within(rx.wait_for(|s| s.failures > 0))
        .await
        .unwrap()
        .clone();
    let e = s.last_error.unwrap();
    assert!(e.contains("'keyless'") && e.contains("primary key"), "{e}");
    drop(src);

    // A key chosen in the config must be what deletes carry: refused until REPLICA IDENTITY
    // FULL, then followed.
    sql.exec("INSERT INTO keyless VALUES (1, 'x'), (2, 'y')");
    let mut cfg = origin_cfg(&pg, "keyless_keyed", &["keyless"]);
    if let Some(pg) = cfg.postgres.as_mut() {
        pg.tables = vec![TableSpec::Table {
            name: "keyless".into(),
            key: vec!["a".into()],
        }];
    }
    let src = PgOrigin::start(cfg.clone()).await.expect("start");
    let mut rx = src.watch_status();
    let s = within(rx.wait_for(|s| s.failures > 0))
        .await
        .unwrap()
        .clone();
    let e = s.last_error.unwrap();
    assert!(
        e.contains("'keyless'") && e.contains("REPLICA IDENTITY"),
        "{e}"
    );
    drop(src);
    sql.exec("ALTER TABLE keyless REPLICA IDENTITY FULL");
    let src = PgOrigin::start(cfg).await.expect("start");
    within(src.wait_copied(1)).await;
    sql.exec("DELETE FROM keyless WHERE a = 1");
    sql.exec("UPDATE keyless SET b = 'z' WHERE a = 2");
    until_equal(&src, &pg, "keyless", "a::text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_under_concurrent_writes_equals_the_table() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE items (id int PRIMARY KEY, n int, label text)");
    sql.exec("INSERT INTO items SELECT i, 0, 'item ' || i FROM generate_series(1, 10000) i");
    // Writers run before, during and after the copy: updates, inserts and deletes.
    let writer_url = pg.url();
    let writer = std::thread::spawn(move || {
        let mut c = Sql(pg_walstream::PgReplicationConnection::connect(&format!(
            "{writer_url}?sslmode=disable"
        ))
        .expect("connect"));
        for round in 0..600 {
            let id = (round * 7919) % 10000 + 1;
            c.exec(&format!("UPDATE items SET n = n + 1 WHERE id = {id}"));
            c.exec(&format!(
                "INSERT INTO items VALUES ({}, {round}, 'new') ON CONFLICT (id) DO UPDATE SET n = -1",
                10000 + round
            ));
            if round % 3 == 0 {
                c.exec(&format!("DELETE FROM items WHERE id = {}", id + 1));
            }
        }
    });
    let src = PgOrigin::start(origin_cfg(&pg, "copy_under_writes", &["items"]))
        .await
        .expect("start");
    within(src.wait_copied(1)).await;
    tokio::task::spawn_blocking(move || writer.join().expect("writer"))
        .await
        .unwrap();
    until_equal(&src, &pg, "items", "id::text").await;
    assert!(src.status().copied_rows >= 10000, "{:?}", src.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_origins_on_one_database_serve_the_same_positions() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text)");
    sql.exec("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    let a = PgOrigin::start(origin_cfg(&pg, "origin_a", &["products"]))
        .await
        .expect("a");
    within(a.wait_copied(1)).await;
    let b = PgOrigin::start(origin_cfg(&pg, "origin_b", &["products"]))
        .await
        .expect("b");
    within(b.wait_copied(1)).await;
    for i in 0..20 {
        sql.exec(&format!("UPDATE products SET name = 'v{i}' WHERE id = 1"));
    }
    sql.exec("INSERT INTO products VALUES (3, 'c')");
    until_equal(&a, &pg, "products", "id::text").await;
    until_equal(&b, &pg, "products", "id::text").await;
    assert_eq!(a.origin().epoch(), b.origin().epoch());
    assert_eq!(
        a.origin().version("products"),
        b.origin().version("products")
    );
    let ka = a
        .origin()
        .fetch("products", &["1".into(), "3".into()])
        .unwrap();
    let kb = b
        .origin()
        .fetch("products", &["1".into(), "3".into()])
        .unwrap();
    let versions = |r: &viewcar::pb::feed::v1::FetchResponse| {
        r.entries.iter().map(|e| e.version).collect::<Vec<_>>()
    };
    assert_eq!(versions(&ka), versions(&kb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_the_tables_copied_again() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text)");
    sql.exec("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    let src = PgOrigin::start(origin_cfg(&pg, "dropped", &["products"]))
        .await
        .expect("start");
    within(src.wait_copied(1)).await;
    let before = src.origin().version("products").unwrap();
    let served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    let sidecar = start_sidecar(sidecar_config(&served.url(), &["products"])).await;
    let products = source(&sidecar, "products");
    wait_source(&products, "the copy", |s| s.len() == 2).await;
    let feed = sidecar.feed_stats("o").unwrap().clone();
    assert_eq!(counter(&feed.snapshots), 1);
    let first_epoch = products.epoch().to_string();
    assert_eq!(
        first_epoch,
        src.origin().epoch(),
        "the database's own epoch"
    );
    // End the origin's walsender and drop its slot before it reconnects.
    let mut dropped = false;
    for _ in 0..200 {
        sql.exec(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'dropped' AND active_pid IS NOT NULL",
        );
        let r = pg.connect().0.exec(
            "SELECT pg_drop_replication_slot('dropped') FROM pg_replication_slots WHERE slot_name = 'dropped'",
        );
        if r.is_ok() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "could not drop the slot");
    sql.exec("INSERT INTO products VALUES (3, 'written while the slot was gone')");
    within(src.wait_copied(2)).await;
    until_equal(&src, &pg, "products", "id::text").await;
    let s = src.status();
    assert!(s.slots_lost >= 1, "{s:?}");
    let after = src.origin().version("products").unwrap();
    assert!(after > before);
    // The sidecar is told (Reset) and resnapshots once, at the new copy's position.
    wait_source(&products, "the new copy", |s| {
        s.version() == after && s.len() == 3
    })
    .await;
    assert_eq!(counter(&feed.resets), 1);
    assert_eq!(counter(&feed.snapshots), 2);
    // A new epoch: the changes between the old slot and the copy were never batches, so no
    // stream may resume across the copy, here or at another origin of the database.
    let epoch = products.epoch().to_string();
    assert_ne!(epoch, first_epoch);
    assert!(epoch.starts_with(&first_epoch), "{epoch} of {first_epoch}");
    assert_eq!(src.status().new_epochs, 1, "{:?}", src.status());
}

/// Tables `products` (id, name, rev) and `prices` (id, amount, rev), rows 1 and 2 at rev 0,
/// behind an origin (`origin_cfg`, then `tweak`) that has copied them, served on loopback.
async fn products_and_prices(
    pg: &Pg,
    slot: &str,
    tweak: impl FnOnce(&mut OriginConfig),
) -> (Sql, PgOrigin, TestOrigin) {
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text, rev int)");
    sql.exec("CREATE TABLE prices (id int PRIMARY KEY, amount int, rev int)");
    sql.exec("INSERT INTO products VALUES (1, 'shoe', 0), (2, 'hat', 0)");
    sql.exec("INSERT INTO prices VALUES (1, 10, 0), (2, 20, 0)");
    let mut cfg = origin_cfg(pg, slot, &["products", "prices"]);
    tweak(&mut cfg);
    let src = PgOrigin::start(cfg).await.expect("start");
    within(src.wait_copied(1)).await;
    let served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    (sql, src, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_view_over_two_tables_never_sees_half_a_transaction() {
    let Some(pg) = Pg::start() else { return };
    let (_sql, _src, served) = products_and_prices(&pg, "atomic", |_| {}).await;
    let mut cfg = sidecar_config(&served.url(), &["products", "prices"]);
    cfg.views =
        vec![viewcar::views::ViewSpec::new("page", "products").include("price", "prices", "id")];
    let sidecar = start_sidecar(cfg).await;
    let mut client = cache_client(&sidecar).await;
    let mut watch = open_watch(&mut client, "page", &["1"], true).await;
    within(until_synced(&mut watch)).await;

    const TXNS: i64 = 300;
    let url = pg.url();
    let writer = std::thread::spawn(move || {
        let mut c = Sql(pg_walstream::PgReplicationConnection::connect(&format!(
            "{url}?sslmode=disable"
        ))
        .expect("connect"));
        for i in 1..=TXNS {
            c.exec(&format!(
                "BEGIN; UPDATE products SET rev = {i} WHERE id = 1; \
                 UPDATE prices SET rev = {i}, amount = amount + 1 WHERE id = 1; COMMIT"
            ));
        }
    });
    let mut seen = 0;
    let mut last = 0;
    within(async {
        while last < TXNS {
            let ev = watch.message().await.expect("watch").expect("open");
            let Some(viewcar::pb::cache::v1::watch_event::Kind::Upsert(item)) = ev.kind else {
                continue;
            };
            let row: Value = serde_json::from_slice(&item.value).expect("row JSON");
            let (rev, price_rev) = (
                row["rev"].as_i64().unwrap(),
                row["price"]["rev"].as_i64().unwrap(),
            );
            assert_eq!(rev, price_rev, "half a transaction in the view row: {row}");
            assert!(rev >= last, "went back from {last} to {rev}");
            last = rev;
            seen += 1;
        }
    })
    .await;
    tokio::task::spawn_blocking(move || writer.join().expect("writer"))
        .await
        .unwrap();
    assert!(seen > 0);
    println!("view row pushed {seen} times over {TXNS} transactions, every one whole");
}

/// Tables `items` and `counts` (one row, n = 0) behind an origin whose messages hold 16 KiB at
/// most (then `tweak`), served on loopback.
async fn items_and_counts(
    pg: &Pg,
    slot: &str,
    tweak: impl FnOnce(&mut OriginConfig),
) -> (Sql, PgOrigin, TestOrigin) {
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE items (id int PRIMARY KEY, label text)");
    sql.exec("CREATE TABLE counts (id int PRIMARY KEY, n int)");
    sql.exec("INSERT INTO counts VALUES (1, 0)");
    let mut cfg = origin_cfg(pg, slot, &["items", "counts"]);
    cfg.max_message_bytes = viewcar::config::ByteSize(16 << 10);
    cfg.snapshot_chunk_bytes = viewcar::config::ByteSize(4 << 10);
    tweak(&mut cfg);
    let src = PgOrigin::start(cfg).await.expect("start");
    within(src.wait_copied(1)).await;
    let served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    (sql, src, served)
}

/// One transaction of about 200 KiB (at least a dozen messages of 16 KiB) over both tables of
/// [`items_and_counts`]: 1,000 items, then the count set to 1000. Returns its position, once
/// the origin has it.
async fn large_transaction(sql: &mut Sql, src: &PgOrigin, pg: &Pg) -> u64 {
    sql.exec(
        "BEGIN; INSERT INTO items SELECT i, repeat('x', 200) FROM generate_series(1, 1000) i; \
         UPDATE counts SET n = 1000 WHERE id = 1; COMMIT",
    );
    until_equal(src, pg, "items", "id::text").await;
    src.origin().version("items").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_is_split_below_the_message_limit_and_applied_whole() {
    let Some(pg) = Pg::start() else { return };
    let (mut sql, src, served) = items_and_counts(&pg, "large_txn", |_| {}).await;
    let sidecar = start_sidecar(sidecar_config(&served.url(), &["items", "counts"])).await;
    let items = source(&sidecar, "items");
    let counts = source(&sidecar, "counts");
    // Both topics: each is a stream of its own, and the group's test below needs both to have
    // their snapshot before the transaction.
    sidecar.synced().await;
    let version = large_transaction(&mut sql, &src, &pg).await;
    assert_eq!(src.origin().version("counts"), Some(version));
    let batches = src
        .origin()
        .stats()
        .published
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(batches >= 12, "{batches} batches");
    // The sidecar applied the group: the count and every item, at the transaction's version.
    // (The writer applies a group in one step, so views and subscribers see all of it or none;
    // `a_watch_on_a_view_over_two_tables_never_sees_half_a_transaction` holds that. Point reads
    // of the two sources are not a snapshot of both: while the writer is inside the step, a
    // read of `counts` then of `items` can see the count before all the items, so this waits
    // for the items instead of asserting them at the moment the count is seen.)
    wait_source(&counts, "the count", |s| {
        s.get("1")
            .is_some_and(|r| r.value.as_ref() == br#"{"id":1,"n":1000}"#)
    })
    .await;
    wait_source(&items, "every item", |s| s.len() == 1000).await;
    assert_eq!(items.version(), version);
}

/// A relay keeps a transaction's grouping: the batches one Postgres transaction makes across
/// two topics reach a leaf of the relay marked as one group (one id, `last` on the final one,
/// nothing in between), as they reach the relay from the origin, so the leaf applies them in
/// one step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_passes_a_transaction_on_as_one_group() {
    let Some(pg) = Pg::start() else { return };
    let (mut sql, src, served) = items_and_counts(&pg, "relay_group", |_| {}).await;
    let mut relay_cfg = sidecar_config(&served.url(), &["items", "counts"]);
    relay_cfg.listen.feed = Some(loopback0());
    let relay = start_sidecar(relay_cfg).await;
    relay.synced().await;
    // A leaf of the relay: one Sync stream with both topics.
    let mut client = feed_client(relay.feed_addr().expect("serves feed")).await;
    let (mut stream, _requests) = synced_stream(&mut client, &["items", "counts"]).await;
    let version = large_transaction(&mut sql, &src, &pg).await;
    let (batches, topics) = read_group(&mut stream, version).await;
    assert!(batches >= 12, "{batches} batches");
    assert_eq!(topics.len(), 2, "both topics in the group: {topics:?}");
    wait_source(&source(&relay, "items"), "every item", |s| s.len() == 1000).await;
}

/// Nothing comes between the batches of one group on a stream: not a Progress (the stream's
/// tick), which a sidecar takes as the end of what it gets of the group and so applies half of
/// it. Many streams and a tick far shorter than the time the origin takes to offer one
/// transaction's batches to all of them: a stream that sent the first batch is often woken by
/// its tick before the second is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_comes_between_the_batches_of_a_group() {
    let Some(pg) = Pg::start() else { return };
    let (mut sql, _src, served) = products_and_prices(&pg, "between", |cfg| {
        cfg.progress_interval = Dur(Duration::from_millis(1));
    })
    .await;
    const STREAMS: usize = 200;
    const TXNS: i64 = 100;
    let mut client = feed_client(served.addr).await;
    // Each stream is read from when it has synced: a stream left unread fills its
    // connection's budget of small DATA frames, and the client closes the connection.
    let mut readers = Vec::new();
    for _ in 0..STREAMS {
        let (mut stream, requests) = synced_stream(&mut client, &["products", "prices"]).await;
        readers.push(tokio::spawn(async move {
            let _requests = requests;
            // The group a batch left open, by id.
            let mut open: Option<u64> = None;
            let mut groups = 0;
            loop {
                let b = match next_kind(&mut stream).await {
                    feed::sync_response::Kind::Changes(b) => b,
                    other => match open {
                        Some(open) => {
                            panic!("inside group {open}, before its last batch: {other:?}")
                        }
                        None => continue,
                    },
                };
                if let Some(open) = open {
                    let id = b.group.map(|g| g.id);
                    assert_eq!(id, Some(open), "another batch inside group {open}");
                }
                open = b.group.filter(|g| !g.last).map(|g| g.id);
                if b.group.is_some_and(|g| g.last) {
                    groups += 1;
                }
                let rev = |c: &feed::Change| {
                    serde_json::from_slice::<Value>(&c.value).expect("row")["rev"].as_i64()
                };
                if open.is_none() && b.changes.iter().any(|c| rev(c) == Some(TXNS)) {
                    return groups;
                }
            }
        }));
    }
    sql.exec(&format!(
        "DO $$ BEGIN FOR i IN 1..{TXNS} LOOP \
         UPDATE products SET rev = i WHERE id = 1; UPDATE prices SET rev = i WHERE id = 1; \
         COMMIT; END LOOP; END $$"
    ));
    let mut groups = 0;
    for r in readers {
        groups += r.await.expect("reader");
    }
    assert_eq!(
        groups,
        STREAMS * TXNS as usize,
        "every group reaches every stream"
    );
    println!("{groups} groups over {STREAMS} streams, nothing inside one");
}

/// A stream that cannot keep up inside a transaction (a queue of one batch, and a transaction
/// of a dozen) overflows, is caught up with Reset and a snapshot, and goes on: both topics
/// get their Progress at the transaction's position. A session that kept waiting for the rest
/// of a group that was refused would send nothing more until the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_overflows_inside_a_group_catches_up_and_goes_on() {
    let Some(pg) = Pg::start() else { return };
    let (mut sql, src, served) =
        items_and_counts(&pg, "overflow", |cfg| cfg.stream_queue = 1).await;
    let mut client = feed_client(served.addr).await;
    let (mut stream, _requests) = synced_stream(&mut client, &["items", "counts"]).await;
    let version = large_transaction(&mut sql, &src, &pg).await;
    let mut current = std::collections::HashSet::new();
    while current.len() < 2 {
        if let feed::sync_response::Kind::Progress(p) = next_kind(&mut stream).await {
            if p.position.is_some_and(|at| at.version >= version) {
                current.insert(p.topic);
            }
        }
    }
    let lagged = src
        .origin()
        .stats()
        .lagged
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        lagged > 0,
        "the stream's queue of one batch never overflowed"
    );
}

/// Opens a Sync stream on `client` with `topics`, and reads it until each has its snapshot.
async fn synced_stream(
    client: &mut feed::feed_client::FeedClient<tonic::transport::Channel>,
    topics: &[&str],
) -> (
    tonic::Streaming<feed::SyncResponse>,
    tokio::sync::mpsc::Sender<feed::SyncRequest>,
) {
    let (tx, mut stream) = open_sync(client, subscribe(topics[0], &[], None)).await;
    for topic in &topics[1..] {
        tx.send(subscribe(topic, &[], None)).await.unwrap();
    }
    let mut synced = 0;
    while synced < topics.len() {
        if let feed::sync_response::Kind::Snapshot(s) = next_kind(&mut stream).await {
            synced += usize::from(s.last);
        }
    }
    (stream, tx)
}

/// The next message of `stream`, within the deadline; the stream must not end.
async fn next_kind(stream: &mut tonic::Streaming<feed::SyncResponse>) -> feed::sync_response::Kind {
    within(stream.message())
        .await
        .expect("message")
        .expect("open")
        .kind
        .expect("a message with a kind")
}

/// Reads `stream` up to the last batch of the group `id`: the group's batches only, one after
/// the other (Progress before its first batch is an idle tick). Returns how many there were,
/// and their topics.
async fn read_group(
    stream: &mut tonic::Streaming<feed::SyncResponse>,
    id: u64,
) -> (usize, std::collections::HashSet<String>) {
    let mut batches = 0;
    let mut topics = std::collections::HashSet::new();
    loop {
        let b = match next_kind(stream).await {
            feed::sync_response::Kind::Changes(b) => b,
            feed::sync_response::Kind::Progress(_) if batches == 0 => continue,
            other => panic!("after {batches} batches of the group: {other:?}"),
        };
        let group = b.group.unwrap_or_else(|| {
            panic!(
                "batch {batches} (topic {}, version {}) has no group",
                b.topic, b.version
            )
        });
        assert_eq!(group.id, id, "the group's id is the commit's position");
        batches += 1;
        topics.insert(b.topic);
        if group.last {
            return (batches, topics);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_origin_restarted_during_writes_resumes_from_its_slot_without_a_snapshot() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, n int)");
    sql.exec("INSERT INTO products SELECT i, 0 FROM generate_series(1, 100) i");
    let dir = tempfile::tempdir().expect("data dir");
    let mut cfg = origin_cfg(&pg, "durable", &["products"]);
    cfg.data_dir = Some(dir.path().to_path_buf());
    let src = PgOrigin::start(cfg.clone()).await.expect("start");
    within(src.wait_copied(1)).await;
    let epoch = src.origin().epoch().to_string();
    let mut served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    let sidecar = start_sidecar(sidecar_config(&served.url(), &["products"])).await;
    let products = source(&sidecar, "products");
    wait_source(&products, "synced", |s| s.is_synced()).await;
    let feed = sidecar.feed_stats("o").unwrap().clone();
    assert_eq!(counter(&feed.snapshots), 1);

    let url = pg.url();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let mut c = Sql(pg_walstream::PgReplicationConnection::connect(&format!(
            "{url}?sslmode=disable"
        ))
        .expect("connect"));
        for i in 0..400 {
            if i == 200 {
                let _ = go_tx.send(());
            }
            c.exec(&format!(
                "UPDATE products SET n = n + 1 WHERE id = {}",
                i % 100 + 1
            ));
        }
    });
    // Halfway through the writes, the origin goes away (its source aborted, the feed cut) and a
    // new one opens the same data directory and slot on the same address.
    tokio::task::spawn_blocking(move || go_rx.recv())
        .await
        .unwrap()
        .unwrap();
    served.stop().await;
    src.close();
    drop(src);
    let src = PgOrigin::start(cfg).await.expect("restart");
    assert_eq!(src.origin().epoch(), epoch, "same database, same epoch");
    within(src.wait_streaming()).await;
    assert_eq!(src.status().copies, 0, "resumed from the slot, no copy");
    let _served = TestOrigin::start_on(src.origin().clone(), served.addr).await;
    tokio::task::spawn_blocking(move || writer.join().expect("writer"))
        .await
        .unwrap();
    until_equal(&src, &pg, "products", "id::text").await;
    let version = src.origin().version("products").unwrap();
    wait_source(&products, "the origin's version", |s| {
        s.version() == version
    })
    .await;
    let want = pg.connect().table("products", "id::text");
    for (k, v) in &want {
        let row = products.get(k).expect("row at the sidecar");
        assert_eq!(&serde_json::from_slice::<Value>(&row.value).unwrap(), v);
    }
    assert_eq!(products.len(), want.len());
    assert_eq!(
        counter(&feed.snapshots),
        1,
        "the sidecar resumed without a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_listing_two_origins_continues_on_the_other_without_a_snapshot() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text)");
    sql.exec("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    let a = PgOrigin::start(origin_cfg(&pg, "failover_a", &["products"]))
        .await
        .expect("a");
    within(a.wait_copied(1)).await;
    let b = PgOrigin::start(origin_cfg(&pg, "failover_b", &["products"]))
        .await
        .expect("b");
    within(b.wait_copied(1)).await;
    let mut served_a = TestOrigin::start_on(a.origin().clone(), loopback0()).await;
    let served_b = TestOrigin::start_on(b.origin().clone(), loopback0()).await;
    let mut cfg = sidecar_config(&served_a.url(), &["products"]);
    cfg.origins[0].fallback = vec![served_b.url()];
    let sidecar = start_sidecar(cfg).await;
    let products = source(&sidecar, "products");
    // A change after both copies: its version is inside both origins' windows.
    sql.exec("UPDATE products SET name = 'a2' WHERE id = 1");
    until_equal(&a, &pg, "products", "id::text").await;
    until_equal(&b, &pg, "products", "id::text").await;
    let v = a.origin().version("products").unwrap();
    assert_eq!(b.origin().version("products"), Some(v));
    wait_source(&products, "the update", |s| s.version() == v).await;
    let feed = sidecar.feed_stats("o").unwrap().clone();
    assert_eq!(counter(&feed.snapshots), 1);

    served_a.stop().await;
    a.close();
    sql.exec("UPDATE products SET name = 'a3' WHERE id = 1");
    sql.exec("INSERT INTO products VALUES (3, 'c')");
    until_equal(&b, &pg, "products", "id::text").await;
    let v = b.origin().version("products").unwrap();
    wait_source(&products, "the changes through b", |s| s.version() == v).await;
    assert_eq!(products.len(), 3);
    assert_eq!(
        counter(&feed.snapshots),
        1,
        "continued on the other origin without a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_durable_origin_process_during_writes_loses_nothing_and_needs_no_snapshot() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, n int)");
    sql.exec("INSERT INTO products SELECT i, 0 FROM generate_series(1, 200) i");
    let dir = tempfile::tempdir().expect("data dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_file(
        "postgres-tests",
        &format!("kill9-{port}.toml"),
        &format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nprogress_interval = \"100ms\"\n\
             [postgres]\nurl = \"{}\"\nslot = \"kill9\"\ntables = [\"products\"]\ntls = \"disable\"\n\
             retry_min = \"20ms\"\nretry_max = \"200ms\"\n",
            dir.path().display(),
            pg.url()
        ),
    );
    let start = || async {
        let mut cmd = viewcar();
        cmd.args(["--log-format", "json", "origin", "--config"])
            .arg(&config);
        let (process, mut log) = spawn(cmd);
        let serving = within(log_line(&mut log, "origin serving Feed")).await;
        (process, log, addr(&serving, "addr"))
    };
    let (mut first, _log1, at) = start().await;
    let sidecar = start_sidecar(sidecar_config(&format!("http://{at}"), &["products"])).await;
    let products = source(&sidecar, "products");
    wait_source(&products, "the copy", |s| s.len() == 200).await;
    let feed = sidecar.feed_stats("o").unwrap().clone();
    let snapshots = counter(&feed.snapshots);

    let url = pg.url();
    let (half_tx, half_rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let mut c = Sql(pg_walstream::PgReplicationConnection::connect(&format!(
            "{url}?sslmode=disable"
        ))
        .expect("connect"));
        for i in 0..400 {
            if i == 200 {
                let _ = half_tx.send(());
            }
            c.exec(&format!(
                "BEGIN; UPDATE products SET n = n + 1 WHERE id = {}; \
                 UPDATE products SET n = n + 1 WHERE id = {}; COMMIT",
                i % 200 + 1,
                (i * 7) % 200 + 1
            ));
        }
    });
    tokio::task::spawn_blocking(move || half_rx.recv())
        .await
        .unwrap()
        .unwrap();
    first.kill();
    let (_second, _log2, again) = start().await;
    assert_eq!(again, at);
    tokio::task::spawn_blocking(move || writer.join().expect("writer"))
        .await
        .unwrap();
    let want = pg.connect().table("products", "id::text");
    let equal = |s: &viewcar::store::Source| {
        want.iter().all(|(k, v)| {
            s.get(k)
                .and_then(|r| serde_json::from_slice::<Value>(&r.value).ok())
                .is_some_and(|g| &g == v)
        }) && s.len() == want.len()
    };
    wait_source(&products, "the replica equal to the table", equal).await;
    assert_eq!(
        counter(&feed.snapshots),
        snapshots,
        "the sidecar resumed on the restarted origin without a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_a_durable_origin_is_down_is_a_new_epoch_kept_across_restarts() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text)");
    sql.exec("CREATE TABLE prices (id int PRIMARY KEY, cents int)");
    sql.exec("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    sql.exec("INSERT INTO prices VALUES (1, 100)");
    let dir = tempfile::tempdir().expect("data dir");
    let mut cfg = origin_cfg(&pg, "down", &["products", "prices"]);
    cfg.data_dir = Some(dir.path().to_path_buf());
    let src = PgOrigin::start(cfg.clone()).await.expect("start");
    within(src.wait_streaming()).await;
    let database = src.origin().epoch().to_string();
    src.close();
    drop(src);

    // While the origin is down its slot goes (dropped by an operator, or invalidated), and the
    // tables change.
    sql.exec("SELECT pg_drop_replication_slot('down')");
    sql.exec("UPDATE products SET name = 'changed while down' WHERE id = 1");
    sql.exec("INSERT INTO prices VALUES (2, 200)");
    let src = PgOrigin::start(cfg.clone()).await.expect("restart");
    within(src.wait_streaming()).await;
    let s = src.status();
    assert_eq!((s.copies, s.slots_lost, s.new_epochs), (1, 1, 1), "{s:?}");
    until_equal(&src, &pg, "products", "id::text").await;
    until_equal(&src, &pg, "prices", "id::text").await;
    let version = src.origin().version("products").unwrap();
    let prices_version = src.origin().version("prices").unwrap();
    let served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    let sidecar = start_sidecar(sidecar_config(&served.url(), &["products", "prices"])).await;
    let products = source(&sidecar, "products");
    wait_source(&products, "synced", |s| s.version() == version).await;
    // Each topic is its own stream: "prices" syncs on its own time, not with "products".
    let prices = source(&sidecar, "prices");
    wait_source(&prices, "prices synced", |s| {
        s.version() == prices_version && !s.epoch().is_empty()
    })
    .await;
    let epoch = products.epoch().to_string();
    assert_ne!(epoch, database);
    assert!(epoch.starts_with(&database), "{epoch} of {database}");
    assert_eq!(*prices.epoch(), epoch, "one epoch for the copy");
    drop(sidecar);
    drop(served);
    src.close();
    drop(src);

    // The new epoch is the data directory's now: the next restart resumes from the new slot.
    sql.exec("UPDATE prices SET cents = 150 WHERE id = 1");
    let src = PgOrigin::start(cfg).await.expect("second restart");
    within(src.wait_streaming()).await;
    assert_eq!(src.origin().epoch(), epoch);
    let s = src.status();
    assert_eq!((s.copies, s.new_epochs), (0, 0), "{s:?}");
    until_equal(&src, &pg, "prices", "id::text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_promoted_standby_is_a_new_epoch_and_the_sidecar_resnapshots() {
    let Some(primary) = Pg::start() else { return };
    let mut sql = primary.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text)");
    sql.exec("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    let src = PgOrigin::start(origin_cfg(&primary, "failover", &["products"]))
        .await
        .expect("start");
    within(src.wait_streaming()).await;
    let first_epoch = src.origin().epoch().to_string();
    assert!(first_epoch.ends_with("-1"), "timeline 1: {first_epoch}");
    let served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    let sidecar = start_sidecar(sidecar_config(&served.url(), &["products"])).await;
    let products = source(&sidecar, "products");
    wait_source(&products, "the copy", |s| s.len() == 2).await;
    let feed = sidecar.feed_stats("o").unwrap().clone();

    // The standby is taken now; a row written after it reaches the origin (and the sidecar)
    // but not the standby: the tail an asynchronous failover loses.
    let standby = primary.standby();
    sql.exec("INSERT INTO products VALUES (3, 'lost in the failover')");
    until_equal(&src, &primary, "products", "id::text").await;
    wait_source(&products, "the lost row", |s| s.len() == 3).await;
    drop(sql);
    primary.stop();
    standby.launch();
    standby.run(
        "pg_ctl",
        &["-D", standby.data().to_str().unwrap(), "-w", "promote"],
    );
    let mut sql = standby.connect();
    sql.exec("INSERT INTO products VALUES (4, 'written after the failover')");

    // The origin finds timeline 2 behind its address: the tables are copied again under that
    // epoch, and the sidecar drops the lost row with a Reset and a snapshot.
    within(src.wait_copied(2)).await;
    until_equal(&src, &standby, "products", "id::text").await;
    let epoch = src.status();
    assert_eq!(epoch.new_epochs, 1, "{epoch:?}");
    wait_source(&products, "the new timeline's rows", |s| {
        s.len() == 3 && s.get("3").is_none() && s.get("4").is_some()
    })
    .await;
    let now = products.epoch().to_string();
    assert_ne!(now, first_epoch);
    assert!(now.ends_with("-2"), "timeline 2: {now}");
    assert_eq!(counter(&feed.resets), 1);
    assert_eq!(counter(&feed.snapshots), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_waits_for_the_first_copy_instead_of_syncing_to_an_empty_topic() {
    let Some(pg) = Pg::start() else { return };
    let mut sql = pg.connect();
    sql.exec("CREATE TABLE products (id int PRIMARY KEY, name text)");
    sql.exec("INSERT INTO products SELECT i, 'p' || i FROM generate_series(1, 500) i");
    // The origin's role may replicate but not read the table yet: its copy fails, and is
    // retried, until the privilege is granted.
    sql.exec("CREATE ROLE viewcar LOGIN REPLICATION");
    sql.exec("CREATE PUBLICATION viewcar FOR TABLE products");
    let mut cfg = origin_cfg(&pg, "first", &["products"]);
    if let Some(p) = cfg.postgres.as_mut() {
        p.url = format!("postgres://viewcar@127.0.0.1:{}/postgres", pg.port);
    }
    let src = PgOrigin::start(cfg).await.expect("start");
    let mut status = src.watch_status();
    let failed = within(status.wait_for(|s| s.failures > 0))
        .await
        .unwrap()
        .clone();
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("permission denied")),
        "{failed:?}"
    );
    let served = TestOrigin::start_on(src.origin().clone(), loopback0()).await;
    let sidecar = start_sidecar(sidecar_config(&served.url(), &["products"])).await;
    let products = source(&sidecar, "products");
    let feed = sidecar.feed_stats("o").unwrap().clone();
    // The sidecar has subscribed; the topic is not served (empty) meanwhile.
    within(async {
        while src.origin().subscribers("products") == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!products.is_synced());
    sql.exec("GRANT SELECT ON products TO viewcar");
    wait_source(&products, "the copy", |s| {
        assert!(
            !s.is_synced() || s.len() == 500,
            "synced to {} rows before the copy",
            s.len()
        );
        s.is_synced()
    })
    .await;
    assert_eq!(counter(&feed.snapshots), 1, "one snapshot: the copy's");
    assert_eq!(counter(&feed.resets), 0, "no empty topic to reset");
}
