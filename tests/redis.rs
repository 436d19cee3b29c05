//! The Redis protocol listener with a real Redis client (the `redis` crate), RESP2 and RESP3,
//! raw sockets for what a client library would not send, and `redis-cli` where installed.

#[path = "ws_support/mod.rs"]
mod ws_support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, PushKind, Value as RValue};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use viewcar::config::{ByteSize, Dur, RedisConfig};
use viewcar::{Put, SidecarConfig};
use ws_support::{within, Setup};

async fn start(topics: &[&str], redis: RedisConfig) -> Setup {
    start_with(topics, |cfg| cfg.redis = redis).await
}

async fn start_with(topics: &[&str], tweak: impl FnOnce(&mut SidecarConfig)) -> Setup {
    Setup::start_with(topics, |cfg| {
        cfg.listen.redis = Some("127.0.0.1:0".parse().expect("address"));
        tweak(cfg);
    })
    .await
}

fn addr(s: &Setup) -> SocketAddr {
    s.sidecar.redis_addr().expect("redis listener")
}

fn url(s: &Setup, resp3: bool) -> String {
    let proto = if resp3 { "?protocol=resp3" } else { "" };
    format!("redis://{}/{proto}", addr(s))
}

async fn client(s: &Setup, resp3: bool) -> MultiplexedConnection {
    let c = redis::Client::open(url(s, resp3)).expect("client");
    within("connect", c.get_multiplexed_async_connection())
        .await
        .expect("connect")
}

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

async fn raw(s: &Setup) -> TcpStream {
    within("tcp connect", TcpStream::connect(addr(s)))
        .await
        .expect("connect")
}

/// Reads until `want` bytes have come or the server closes; returns what came.
async fn read_some(conn: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    within("a reply", async {
        let mut buf = [0u8; 4096];
        while got.len() < want {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// Reads until the server closes the connection; returns everything it sent.
async fn until_closed(conn: &mut TcpStream) -> String {
    let got = read_some(conn, usize::MAX).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn every_read_command_over_resp2_and_resp3() {
    let s = start(&["products", "prices"], RedisConfig::default()).await;
    let v = s.put(
        "products",
        &[("p1", json!({"name": "one"})), ("p2", json!(2))],
    );
    s.applied("products", v).await;
    for resp3 in [false, true] {
        let mut c = client(&s, resp3).await;
        let got: Option<String> = c.get("products:p1").await.expect("GET");
        assert_eq!(got.as_deref(), Some(r#"{"name":"one"}"#));
        for absent in ["products:nope", "nosuch:p1", "products", "products:"] {
            let got: Option<String> = c.get(absent).await.expect("GET");
            assert_eq!(got, None, "{absent}");
        }
        let many: Vec<Option<String>> = c
            .mget(&["products:p2", "nosuch:x", "products:p1", "prices:x"])
            .await
            .expect("MGET");
        assert_eq!(
            many,
            vec![
                Some("2".to_string()),
                None,
                Some(r#"{"name":"one"}"#.to_string()),
                None
            ]
        );
        let n: i64 = redis::cmd("EXISTS")
            .arg(&["products:p1", "products:p2", "products:p9", "products:p1"])
            .query_async(&mut c)
            .await
            .expect("EXISTS");
        assert_eq!(n, 3);
        let len: i64 = c.strlen("products:p1").await.expect("STRLEN");
        assert_eq!(len, 14);
        let len: i64 = c.strlen("products:p9").await.expect("STRLEN");
        assert_eq!(len, 0);
        let t: String = redis::cmd("TYPE")
            .arg("products:p1")
            .query_async(&mut c)
            .await
            .expect("TYPE");
        assert_eq!(t, "string");
        let t: String = redis::cmd("TYPE")
            .arg("products:p9")
            .query_async(&mut c)
            .await
            .expect("TYPE");
        assert_eq!(t, "none");
        let n: i64 = redis::cmd("DBSIZE")
            .query_async(&mut c)
            .await
            .expect("DBSIZE");
        assert_eq!(n, 2);
        let pong: String = redis::cmd("PING").query_async(&mut c).await.expect("PING");
        assert_eq!(pong, "PONG");
        let echo: String = redis::cmd("ECHO")
            .arg("hi there")
            .query_async(&mut c)
            .await
            .expect("ECHO");
        assert_eq!(echo, "hi there");
        let ok: String = redis::cmd("SELECT")
            .arg(0)
            .query_async(&mut c)
            .await
            .expect("SELECT 0");
        assert_eq!(ok, "OK");
        let e = redis::cmd("SELECT")
            .arg(1)
            .query_async::<String>(&mut c)
            .await
            .expect_err("SELECT 1");
        assert!(e.to_string().contains("out of range"), "{e}");
        let _: () = redis::cmd("CLIENT")
            .arg(&["SETNAME", "reader-1"])
            .query_async(&mut c)
            .await
            .expect("SETNAME");
        let name: String = redis::cmd("CLIENT")
            .arg("GETNAME")
            .query_async(&mut c)
            .await
            .expect("GETNAME");
        assert_eq!(name, "reader-1");
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut c)
            .await
            .expect("ID");
        assert!(id > 0);
        let _: () = redis::cmd("CLIENT")
            .arg(&["SETINFO", "LIB-NAME", "tests"])
            .query_async(&mut c)
            .await
            .expect("SETINFO");
        let info: String = redis::cmd("INFO").query_async(&mut c).await.expect("INFO");
        assert!(info.contains("# Sources"), "{info}");
        assert!(info.contains(&format!("source_products:kind=topic,mode=full,origin=o,synced=1,connected=1,version={v},keys=2,staleness_ms=0")), "{info}");
        assert!(info.contains("connected_clients:"), "{info}");
        assert!(info.contains("db0:keys=2"), "{info}");
        let only: String = redis::cmd("INFO")
            .arg("keyspace")
            .query_async(&mut c)
            .await
            .expect("INFO keyspace");
        assert!(
            only.starts_with("# Keyspace") && !only.contains("# Server"),
            "{only}"
        );
        let count: i64 = redis::cmd("COMMAND")
            .arg("COUNT")
            .query_async(&mut c)
            .await
            .expect("COMMAND COUNT");
        assert!(count >= 15);
        let info: RValue = redis::cmd("COMMAND")
            .arg(&["INFO", "get", "nope"])
            .query_async(&mut c)
            .await
            .expect("COMMAND INFO");
        let RValue::Array(entries) = info else {
            panic!("COMMAND INFO: {info:?}")
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1], RValue::Nil);
        let hello: RValue = redis::cmd("HELLO")
            .arg(if resp3 { 3 } else { 2 })
            .query_async(&mut c)
            .await
            .expect("HELLO");
        let text = format!("{hello:?}");
        assert!(text.contains("proto"), "{text}");
    }
}

#[tokio::test]
async fn writes_are_readonly_and_unknown_commands_are_errors() {
    let s = start(&["products"], RedisConfig::default()).await;
    let mut c = client(&s, false).await;
    for cmd in [
        redis::cmd("SET").arg("products:p1").arg("x").clone(),
        redis::cmd("DEL").arg("products:p1").clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("PUBLISH").arg("ch").arg("m").clone(),
    ] {
        let e = cmd
            .query_async::<RValue>(&mut c)
            .await
            .expect_err("a write");
        assert_eq!(e.code(), Some("READONLY"), "{e}");
        assert!(e.to_string().contains("viewcar"), "{e}");
    }
    let e = redis::cmd("FROB")
        .arg("a")
        .query_async::<RValue>(&mut c)
        .await
        .expect_err("unknown");
    assert!(e.to_string().contains("unknown command 'FROB'"), "{e}");
    let e = redis::cmd("GET")
        .query_async::<RValue>(&mut c)
        .await
        .expect_err("arity");
    assert!(e.to_string().contains("wrong number of arguments"), "{e}");
    // The connection is still good after every refusal.
    let pong: String = redis::cmd("PING").query_async(&mut c).await.expect("PING");
    assert_eq!(pong, "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_pages_ten_thousand_keys_with_match_and_count() {
    let s = start(&["products", "prices"], RedisConfig::default()).await;
    let keys: Vec<String> = (0..10_000).map(|i| format!("p{i:05}")).collect();
    let puts = keys.iter().map(|k| Put::upsert(k.as_str(), "1")).collect();
    let v = s.origin.publish("products", puts).expect("publish").version;
    s.applied("products", v).await;
    let v = s.put("prices", &[("p00001", json!(5)), ("x", json!(6))]);
    s.applied("prices", v).await;
    let mut c = client(&s, false).await;

    async fn walk(
        c: &mut MultiplexedConnection,
        pattern: Option<&str>,
        count: usize,
    ) -> (Vec<String>, usize) {
        let mut cursor: u64 = 0;
        let mut all = Vec::new();
        let mut calls = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor);
            if let Some(p) = pattern {
                cmd.arg("MATCH").arg(p);
            }
            cmd.arg("COUNT").arg(count);
            let (next, page): (u64, Vec<String>) = cmd.query_async(c).await.expect("SCAN");
            assert!(page.len() <= count);
            all.extend(page);
            calls += 1;
            if next == 0 {
                return (all, calls);
            }
            cursor = next;
        }
    }

    let (got, calls) = walk(&mut c, Some("products:p01*"), 100).await;
    let want: Vec<String> = keys
        .iter()
        .filter(|k| k.starts_with("p01"))
        .map(|k| format!("products:{k}"))
        .collect();
    assert_eq!(got, want);
    assert!(calls >= 10, "{calls} calls for 1000 keys at COUNT 100");
    let (got, _) = walk(&mut c, None, 1000).await;
    assert_eq!(got.len(), 10_002);
    let mut uniq = got.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), got.len(), "no key twice");
    // A pattern that is not a literal prefix is matched key by key, across sources.
    let (got, _) = walk(&mut c, Some("*:p00001"), 500).await;
    assert_eq!(got, vec!["products:p00001", "prices:p00001"]);
    // The redis crate's own SCAN iterator walks the same way.
    let mut it: redis::AsyncIter<String> = c.scan_match("prices:*").await.expect("scan_match");
    let mut seen = Vec::new();
    while let Some(k) = it.next_item().await {
        seen.push(k.expect("a key"));
    }
    seen.sort();
    assert_eq!(seen, vec!["prices:p00001", "prices:x"]);
    let mut c = client(&s, false).await;
    let e = redis::cmd("SCAN")
        .arg(987654321u64)
        .query_async::<RValue>(&mut c)
        .await
        .expect_err("unknown cursor");
    assert!(e.to_string().contains("invalid cursor"), "{e}");
}

#[tokio::test]
async fn auth_with_a_token_compared_whole() {
    let s = start(
        &["products"],
        RedisConfig {
            token: Some("s3cret".to_string()),
            ..RedisConfig::default()
        },
    )
    .await;
    let v = s.put("products", &[("p1", json!(1))]);
    s.applied("products", v).await;
    let mut conn = raw(&s).await;
    conn.write_all(b"GET products:p1\r\nAUTH s3cre\r\nAUTH nobody s3cret\r\nAUTH s3cret\r\nGET products:p1\r\n")
        .await
        .expect("send");
    let want = "-NOAUTH Authentication required.\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n+OK\r\n$1\r\n1\r\n";
    let got = read_some(&mut conn, want.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), want);
    assert_eq!(counter(&s.sidecar.redis_stats().auth_failures), 3);
    // A client library authenticates from the URL (HELLO 3 AUTH in RESP3, AUTH in RESP2).
    for resp3 in [false, true] {
        let proto = if resp3 { "?protocol=resp3" } else { "" };
        let c = redis::Client::open(format!("redis://default:s3cret@{}/{proto}", addr(&s)))
            .expect("client");
        let mut c = c
            .get_multiplexed_async_connection()
            .await
            .expect("connect with the token");
        let got: Option<String> = c.get("products:p1").await.expect("GET");
        assert_eq!(got.as_deref(), Some("1"));
        let bad = redis::Client::open(format!("redis://default:wrong@{}/{proto}", addr(&s)))
            .expect("client");
        assert!(
            bad.get_multiplexed_async_connection().await.is_err(),
            "resp3={resp3}"
        );
    }
}

#[tokio::test]
async fn maxclients_refuses_the_next_connection() {
    let s = start(
        &["products"],
        RedisConfig {
            maxclients: 1,
            ..RedisConfig::default()
        },
    )
    .await;
    let mut first = raw(&s).await;
    first.write_all(b"PING\r\n").await.expect("send");
    assert_eq!(read_some(&mut first, 7).await, b"+PONG\r\n");
    let mut second = raw(&s).await;
    let said = until_closed(&mut second).await;
    assert!(
        said.starts_with("-ERR max number of clients reached"),
        "{said}"
    );
    assert_eq!(counter(&s.sidecar.redis_stats().rejected_full), 1);
    drop(first);
    // The permit comes back when the first connection ends.
    let mut c = None;
    for _ in 0..100 {
        let mut again = raw(&s).await;
        again.write_all(b"PING\r\n").await.expect("send");
        if read_some(&mut again, 7).await == b"+PONG\r\n" {
            c = Some(again);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.is_some(), "a connection is accepted again");
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let s = start(
        &["products"],
        RedisConfig {
            idle_timeout: Dur(Duration::from_millis(200)),
            ..RedisConfig::default()
        },
    )
    .await;
    let mut conn = raw(&s).await;
    assert_eq!(until_closed(&mut conn).await, "");
    assert_eq!(counter(&s.sidecar.redis_stats().closed_idle), 1);
}

#[tokio::test]
async fn oversized_and_malformed_requests_are_answered_then_closed() {
    let s = start(
        &["products"],
        RedisConfig {
            max_bulk_bytes: ByteSize(1024),
            max_query_bytes: ByteSize(4096),
            max_args: 4,
            ..RedisConfig::default()
        },
    )
    .await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"*2\r\n$3\r\nGET\r\n$999999999\r\n".to_vec(),
            "invalid bulk length",
        ),
        (b"*9\r\n".to_vec(), "invalid multibulk length"),
        (b"*1\r\n+PING\r\n".to_vec(), "expected '$'"),
        (vec![b'x'; 5000], "too big inline request"),
        (b"*2\r\n$3\r\nGET\r\n$3\r\nabcXY".to_vec(), "expected"),
        (b"*1\r\n".repeat(10_000), "expected '$'"),
    ];
    for (input, want) in cases {
        let mut conn = raw(&s).await;
        let _ = conn.write_all(&input).await;
        let said = until_closed(&mut conn).await;
        assert!(
            said.starts_with("-ERR Protocol error") && said.contains(want),
            "{want}: {said:?}"
        );
    }
    // A request split at the bulk-length bound: within one byte is fine.
    let mut conn = raw(&s).await;
    let key = format!("products:{}", "k".repeat(1024 - 9));
    conn.write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes())
        .await
        .expect("send");
    assert_eq!(read_some(&mut conn, 5).await, b"$-1\r\n");
    // Random garbage: an error and a close, never a crash; the server still serves.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..50 {
        let junk: Vec<u8> = (0..300)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        let mut conn = raw(&s).await;
        let _ = conn.write_all(&junk).await;
        let _ = conn.write_all(b"\r\n").await;
        drop(conn);
    }
    let mut c = client(&s, true).await;
    let pong: String = redis::cmd("PING").query_async(&mut c).await.expect("PING");
    assert_eq!(pong, "PONG");
    assert!(counter(&s.sidecar.redis_stats().closed_protocol) >= 6);
}

#[tokio::test]
async fn a_pipeline_is_answered_in_order() {
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!("a")), ("p2", json!("b"))]);
    s.applied("products", v).await;
    let mut conn = raw(&s).await;
    let mut req = Vec::new();
    for k in ["products:p1", "products:p2", "products:p3"] {
        req.extend_from_slice(format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).as_bytes());
    }
    req.extend_from_slice(b"QUIT\r\n");
    conn.write_all(&req).await.expect("send");
    assert_eq!(
        until_closed(&mut conn).await,
        "$3\r\n\"a\"\r\n$3\r\n\"b\"\r\n$-1\r\n+OK\r\n"
    );
}

#[tokio::test]
async fn keyspace_notifications_deliver_set_and_del() {
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!(1))]);
    s.applied("products", v).await;
    let c = redis::Client::open(url(&s, false)).expect("client");
    let mut ps = c.get_async_pubsub().await.expect("pubsub");
    ps.subscribe("__keyspace@0__:products:p1")
        .await
        .expect("SUBSCRIBE");
    ps.psubscribe("__keyspace@0__:products:q*")
        .await
        .expect("PSUBSCRIBE");
    let mut messages = ps.on_message();
    let mut got = Vec::new();
    let mut next = async |got: &mut Vec<(String, String)>| {
        let m = within(
            "a notification",
            futures_util::StreamExt::next(&mut messages),
        )
        .await
        .expect("stream");
        let payload: String = m.get_payload().expect("payload");
        got.push((m.get_channel_name().to_string(), payload));
    };
    s.put(
        "products",
        &[("p1", json!(2)), ("q7", json!(3)), ("z", json!(4))],
    );
    next(&mut got).await;
    next(&mut got).await;
    // Each key's notifications are conflated like every push (a slow subscriber gets the
    // latest), so the delete is published once the set has been read.
    s.origin
        .publish("products", vec![Put::delete("p1")])
        .expect("publish");
    next(&mut got).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("__keyspace@0__:products:p1".to_string(), "del".to_string()),
            ("__keyspace@0__:products:p1".to_string(), "set".to_string()),
            ("__keyspace@0__:products:q7".to_string(), "set".to_string()),
        ]
    );
}

#[tokio::test]
async fn tracking_invalidates_a_read_key_on_change_and_delete() {
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!(1)), ("p2", json!(2))]);
    s.applied("products", v).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = redis::Client::open(url(&s, true)).expect("client");
    let cfg = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut c = c
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .expect("connect");
    let _: () = redis::cmd("CLIENT")
        .arg(&["TRACKING", "ON"])
        .query_async(&mut c)
        .await
        .expect("TRACKING ON");
    let _: Option<String> = c.get("products:p1").await.expect("GET");
    s.put("products", &[("p2", json!(20))]);
    s.put("products", &[("p1", json!(10))]);
    let invalidated = |p: redis::PushInfo| {
        assert_eq!(p.kind, PushKind::Invalidate, "{p:?}");
        format!("{:?}", p.data)
    };
    let first = within("an invalidation", rx.recv()).await.expect("push");
    let text = invalidated(first);
    assert!(
        text.contains("products:p1") && !text.contains("products:p2"),
        "{text}"
    );
    // Invalidated once: read again to be told again; a delete invalidates too.
    let _: Option<String> = c.get("products:p1").await.expect("GET");
    s.origin
        .publish("products", vec![Put::delete("p1")])
        .expect("publish");
    let text = invalidated(within("an invalidation", rx.recv()).await.expect("push"));
    assert!(text.contains("products:p1"), "{text}");

    // BCAST with a prefix: every change under it, read or not.
    let _: () = redis::cmd("CLIENT")
        .arg(&["TRACKING", "OFF"])
        .query_async(&mut c)
        .await
        .expect("OFF");
    let _: () = redis::cmd("CLIENT")
        .arg(&["TRACKING", "ON", "BCAST", "PREFIX", "products:q", "NOLOOP"])
        .query_async(&mut c)
        .await
        .expect("BCAST");
    s.put("products", &[("p5", json!(5)), ("q1", json!(1))]);
    let text = invalidated(within("an invalidation", rx.recv()).await.expect("push"));
    assert!(
        text.contains("products:q1") && !text.contains("products:p5"),
        "{text}"
    );
}

/// RESP2 client-side caching, as Redis does it: a second connection subscribes to
/// `__redis__:invalidate`, the tracking connection names it with `REDIRECT <id>`, and the
/// invalidations of the keys the tracker reads arrive there as messages of that channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_tracking_redirects_invalidations_to_a_subscribed_connection() {
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!(1)), ("p2", json!(2))]);
    s.applied("products", v).await;

    // The receiver: its id, then the channel.
    let mut inbox = raw(&s).await;
    inbox.write_all(b"CLIENT ID\r\n").await.expect("send");
    let id_line = String::from_utf8(read_some(&mut inbox, 4).await).expect("utf-8");
    let id: u64 = id_line
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|e| panic!("{id_line:?}: {e}"));
    inbox
        .write_all(b"SUBSCRIBE __redis__:invalidate\r\n")
        .await
        .expect("send");
    let confirmed = read_some(&mut inbox, 40).await;
    assert!(
        String::from_utf8_lossy(&confirmed).contains("__redis__:invalidate"),
        "{confirmed:?}"
    );

    // The tracker, RESP2 through a real client.
    let mut c = client(&s, false).await;
    let refused = redis::cmd("CLIENT")
        .arg(&["TRACKING", "ON"])
        .query_async::<()>(&mut c)
        .await
        .expect_err("RESP2 tracking without REDIRECT");
    assert!(refused.to_string().contains("REDIRECT"), "{refused}");
    let missing = redis::cmd("CLIENT")
        .arg(&["TRACKING", "ON", "REDIRECT", "987654"])
        .query_async::<()>(&mut c)
        .await
        .expect_err("no such client");
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let _: () = redis::cmd("CLIENT")
        .arg(&["TRACKING", "ON", "REDIRECT", &id.to_string()])
        .query_async(&mut c)
        .await
        .expect("TRACKING ON REDIRECT");
    let redir: i64 = redis::cmd("CLIENT")
        .arg("GETREDIR")
        .query_async(&mut c)
        .await
        .expect("GETREDIR");
    assert_eq!(redir, id as i64);
    let _: Option<String> = c.get("products:p1").await.expect("GET");
    s.put("products", &[("p2", json!(20))]);
    s.put("products", &[("p1", json!(10))]);
    let want =
        b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$11\r\nproducts:p1\r\n";
    let got = read_some(&mut inbox, want.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want),
        "one invalidation, of the key read only"
    );
    // The tracker's own connection got nothing but its answers: it still reads normally.
    let got: Option<String> = c.get("products:p1").await.expect("GET");
    assert_eq!(got.as_deref(), Some("10"));
    s.origin
        .publish("products", vec![Put::delete("p1")])
        .expect("publish");
    let got = read_some(&mut inbox, want.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));

    // The receiver unsubscribes: the tracker's redirect is broken, and CLIENT TRACKING
    // REDIRECT to it is refused from then on.
    inbox
        .write_all(b"UNSUBSCRIBE __redis__:invalidate\r\n")
        .await
        .expect("send");
    let _ = read_some(&mut inbox, 30).await;
    let gone = redis::cmd("CLIENT")
        .arg(&["TRACKING", "ON", "REDIRECT", &id.to_string()])
        .query_async::<()>(&mut c)
        .await
        .expect_err("the receiver left the channel");
    assert!(gone.to_string().contains("does not exist"), "{gone}");
}

/// `NODE_PATH` for the ioredis interop test: `VIEWCAR_TEST_NODE_PATH` (.ci/run installs ioredis
/// there) or the environment's, if `node` finds ioredis with it.
fn node_with_ioredis() -> Option<String> {
    let path = std::env::var("VIEWCAR_TEST_NODE_PATH")
        .or_else(|_| std::env::var("NODE_PATH"))
        .unwrap_or_default();
    std::process::Command::new("node")
        .args(["-e", "require('ioredis')"])
        .env("NODE_PATH", &path)
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(path)
}

/// ioredis (Node.js), a client we did not write, connects without an error or a warning
/// and reads: GET, MGET, a pipeline, SCAN; a write is refused READONLY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioredis_connects_and_reads() {
    let Some(node_path) = node_with_ioredis() else {
        ws_support::common::missing("node with ioredis (npm install ioredis)");
        return;
    };
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put(
        "products",
        &[("p1", json!({"name": "one"})), ("p2", json!(2))],
    );
    s.applied("products", v).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/ioredis_read.js");
    let port = addr(&s).port().to_string();
    let out = within(
        "ioredis",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("node")
                .args([script, &port])
                .env("NODE_PATH", node_path)
                .output()
        }),
    )
    .await
    .expect("join")
    .expect("run node");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python interpreter with redis-py for the interop test: `VIEWCAR_TEST_PYTHON` (.ci/run
/// sets it to a venv of its own) or `python3`, if it has redis-py with its client-side cache.
fn python_with_redis_py() -> Option<String> {
    let python = std::env::var("VIEWCAR_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    std::process::Command::new(&python)
        .args(["-c", "import redis.cache"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(python)
}

/// redis-py's near cache (RESP3 tracking, a peer we did not write) turns on against the
/// sidecar, answers a repeated read itself, and drops the key when it changes at the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_client_side_cache_stays_exact() {
    use std::io::{BufRead, Write};
    let Some(python) = python_with_redis_py() else {
        ws_support::common::missing("redis-py (pip install redis)");
        return;
    };
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!({"price": 1}))]);
    s.applied("products", v).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/redis_py_cache.py"
    );
    let mut child = std::process::Command::new(python)
        .args([script, &addr(&s).port().to_string(), "products:p1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = tokio::task::spawn_blocking(move || {
        let l = lines.next();
        (l, lines)
    });
    let (line, mut lines) = within("redis-py to cache the key", first)
        .await
        .expect("join");
    if line.as_ref().map(|l| l.as_ref().ok().map(String::as_str)) != Some(Some("cached")) {
        let out = child.wait_with_output().expect("python output");
        panic!(
            "redis-py did not cache the key: {line:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let new = json!({"price": 2});
    let v = s.put("products", &[("p1", new.clone())]);
    s.applied("products", v).await;
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{new}").expect("tell python");
    drop(stdin);
    let rest = tokio::task::spawn_blocking(move || lines.next());
    let line = within("redis-py to see the change", rest)
        .await
        .expect("join");
    let out = child.wait_with_output().expect("python output");
    assert!(
        matches!(&line, Some(Ok(l)) if l == "ok") && out.status.success(),
        "{line:?} {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_closed_and_counted() {
    let s = start(
        &["products"],
        RedisConfig {
            max_output_bytes: ByteSize(16 << 10),
            queue: 256,
            ..RedisConfig::default()
        },
    )
    .await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut conn = within("connect", socket.connect(addr(&s)))
        .await
        .expect("connect");
    conn.write_all(b"PSUBSCRIBE __keyspace@0__:products:*\r\n")
        .await
        .expect("send");
    // Wait for the subscription to be in place (its confirmation), then never read again.
    let _ = read_some(&mut conn, 10).await;
    let stats = s.sidecar.redis_stats().clone();
    let value = "v".repeat(200);
    within("the subscriber to be cut", async {
        let mut round = 0u64;
        while counter(&stats.closed_output_buffer) == 0 {
            let puts = (0..500)
                .map(|i| Put::upsert(format!("k{round}-{i}"), value.clone()))
                .collect();
            let v = s.origin.publish("products", puts).expect("publish").version;
            // Let the sidecar's writer catch up (and go idle) between rounds.
            s.applied("products", v).await;
            round += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The cut is counted before the connection's close takes it off the subscriber count.
    within("the cut subscriber to leave the count", async {
        while counter(&stats.pubsub_clients) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Others are unaffected.
    let mut c = client(&s, false).await;
    let pong: String = redis::cmd("PING").query_async(&mut c).await.expect("PING");
    assert_eq!(pong, "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_reads_the_sidecar() {
    if !ws_support::common::installed("redis-cli") {
        ws_support::common::missing("redis-cli");
        return;
    }
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!({"a": 1}))]);
    s.applied("products", v).await;
    let port = addr(&s).port().to_string();
    let cli = |args: &[&str]| {
        let port = port.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("redis-cli")
                    .args(["-h", "127.0.0.1", "-p", &port])
                    .args(&args)
                    .output()
                    .expect("redis-cli runs")
            })
            .await
            .expect("redis-cli task");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    assert_eq!(cli(&["GET", "products:p1"]).await, "{\"a\":1}\n");
    assert_eq!(cli(&["-3", "GET", "products:p1"]).await, "{\"a\":1}\n");
    assert_eq!(cli(&["-3", "GET", "products:nope"]).await, "\n");
    assert_eq!(cli(&["MGET", "products:p1", "x:y"]).await, "{\"a\":1}\n\n");
    assert!(cli(&["INFO", "sources"]).await.contains("source_products:"));
    assert_eq!(
        cli(&["--scan", "--pattern", "products:*"]).await,
        "products:p1\n"
    );
    let refused = cli(&["SET", "products:p1", "x"]).await;
    assert!(refused.contains("READONLY"), "{refused}");
}

#[tokio::test]
async fn a_unix_socket_listener_replaces_a_stale_socket_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("redis.sock");
    // A socket file left by an earlier run: nothing listens on it any more.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let listen = format!("unix:{}", path.display());
    let s = start_with(&["products"], |cfg| {
        cfg.listen.redis = Some(listen.parse().expect("unix address"));
        cfg.redis.socket_mode = 0o600;
    })
    .await;
    assert_eq!(s.sidecar.redis_addr(), None);
    let mode = std::fs::metadata(&path)
        .expect("socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let v = s.put("products", &[("p1", json!("u"))]);
    s.applied("products", v).await;
    let c = redis::Client::open(format!("redis+unix://{}", path.display())).expect("client");
    let mut c = c
        .get_multiplexed_async_connection()
        .await
        .expect("connect over the socket");
    let got: Option<String> = c.get("products:p1").await.expect("GET");
    assert_eq!(got.as_deref(), Some("\"u\""));
    // A second sidecar on the same path is refused while the first listens.
    let mut cfg = SidecarConfig::default();
    cfg.listen.grpc = ws_support::common::loopback0().into();
    cfg.listen.redis = Some(listen.parse().expect("unix address"));
    let err = viewcar::Sidecar::start(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("listens on this socket"), "{err}");
}

/// The Redis listener's counters are in `/metrics`: connections, commands, hits and misses.
#[tokio::test]
async fn redis_counters_are_in_metrics() {
    let s = start(&["products"], RedisConfig::default()).await;
    let v = s.put("products", &[("p1", json!({"n": 1}))]);
    let src = s
        .sidecar
        .store()
        .source("products")
        .expect("source")
        .clone();
    within("the put applied", async {
        while src.version() < v {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut c = client(&s, false).await;
    let _: Option<String> = redis::cmd("GET")
        .arg("products:p1")
        .query_async(&mut c)
        .await
        .expect("GET hit");
    let _: Option<String> = redis::cmd("GET")
        .arg("products:nope")
        .query_async(&mut c)
        .await
        .expect("GET miss");
    let body = {
        use tokio::io::AsyncWriteExt;
        let mut http = TcpStream::connect(s.sidecar.http_addr())
            .await
            .expect("http");
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        until_closed(&mut http).await
    };
    for line in [
        "viewcar_redis_connections 1",
        "viewcar_redis_accepted_total 1",
        "viewcar_redis_reads_total{result=\"hit\"} 1",
        "viewcar_redis_reads_total{result=\"miss\"} 1",
    ] {
        assert!(body.contains(line), "no {line:?} in\n{body}");
    }
    assert!(body.contains("viewcar_redis_commands_total"), "{body}");
}
