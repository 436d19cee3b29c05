//! The WebSocket endpoint over real sockets: the JSON protocol, bad inputs, and every limit.

mod ws_support;

use std::time::Duration;

use axum::http::StatusCode;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use viewcar::config::{ByteSize, Dur, WsConfig};
use viewcar::ws::{CLOSE_IDLE, CLOSE_TOO_BIG, CLOSE_TOO_SLOW};
use viewcar::Put;
use ws_support::*;

#[tokio::test]
async fn subscribe_by_keys_gets_rows_synced_then_changes_and_deletes() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let v = s.put(
        "products",
        &[("p1", json!({"name":"one"})), ("p2", json!({"name":"two"}))],
    );
    s.applied("products", v).await;
    let mut ws = s.connect().await;
    send(
        &mut ws,
        json!({"op":"subscribe","id":"s1","source":"products","keys":["p1","p2","p3"],"initial":true}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"subscribed","id":"s1","source":"products"})
    );
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"row","id":"s1","source":"products","key":"p1","version":v,"value":{"name":"one"}})
    );
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"row","id":"s1","source":"products","key":"p2","version":v,"value":{"name":"two"}})
    );
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"synced","id":"s1","version":v})
    );

    let v2 = s.put(
        "products",
        &[("p1", json!({"name":"uno"})), ("p9", json!(0))],
    );
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"change","id":"s1","source":"products","key":"p1","version":v2,"value":{"name":"uno"}})
    );
    let v3 = s
        .origin
        .publish(
            "products",
            vec![Put::delete("p2"), Put::upsert("p3", &b"\xff\x00raw"[..])],
        )
        .expect("publish")
        .version;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"delete","id":"s1","source":"products","key":"p2","version":v3})
    );
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"change","id":"s1","source":"products","key":"p3","version":v3,"value_b64":"/wByYXc="})
    );
}

#[tokio::test]
async fn subscribe_by_prefix_without_rows_and_unsubscribe() {
    let s = Setup::start(&["prices"], WsConfig::default()).await;
    let v = s.put("prices", &[("eu/1", json!(1)), ("us/1", json!(2))]);
    s.applied("prices", v).await;
    let mut ws = s.connect().await;
    send(
        &mut ws,
        json!({"op":"subscribe","id":7,"source":"prices","prefix":"eu/"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"synced","id":7,"version":v})
    );
    let v2 = s.put("prices", &[("us/1", json!(3)), ("eu/2", json!(4))]);
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"change","id":7,"source":"prices","key":"eu/2","version":v2,"value":4})
    );

    send(&mut ws, json!({"op":"unsubscribe","id":7})).await;
    assert_eq!(recv(&mut ws).await, json!({"type":"unsubscribed","id":7}));
    // A second subscription is the barrier: its change comes from the same publish as one the
    // first would have wanted.
    subscribe_keys(&mut ws, "b", "prices", &["us/1"], false).await;
    assert_eq!(recv(&mut ws).await["type"], "synced");
    let v3 = s.put("prices", &[("eu/1", json!(5)), ("us/1", json!(6))]);
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"change","id":"b","source":"prices","key":"us/1","version":v3,"value":6})
    );
    send(&mut ws, json!({"op":"unsubscribe","id":7})).await;
    assert_eq!(recv(&mut ws).await["code"], "unknown_id");
}

#[tokio::test]
async fn a_client_close_is_answered() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let mut ws = s.connect().await;
    ws.close(None).await.expect("close");
    let end = within("the close answer", ws.next()).await;
    assert!(matches!(end, Some(Ok(Message::Close(_)))), "{end:?}");
    assert!(matches!(
        within("end of stream", ws.next()).await,
        None | Some(Err(_))
    ));
}

#[tokio::test]
async fn get_answers_found_and_not_found() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let v = s.put("products", &[("p1", json!({"a":[1,2]}))]);
    s.applied("products", v).await;
    let mut ws = s.connect().await;
    send(
        &mut ws,
        json!({"op":"get","id":"g1","source":"products","key":"p1"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"value","id":"g1","found":true,"source":"products","key":"p1","version":v,"value":{"a":[1,2]}})
    );
    send(
        &mut ws,
        json!({"op":"get","id":"g2","source":"products","key":"nope"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"value","id":"g2","found":false,"source":"products","key":"nope"})
    );
}

#[tokio::test]
async fn get_waits_for_a_version_published_after_it_was_sent() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let v = s.put("products", &[("p1", json!("one"))]);
    s.applied("products", v).await;
    let mut ws = s.connect().await;
    send(
        &mut ws,
        json!({"op":"get","id":"later","source":"products","key":"p1","min_version":v + 1,"wait_ms":20_000}),
    )
    .await;
    // The waiting get holds nothing up: a get sent after it is answered first, which also
    // proves the sidecar has the waiting one before the publish below.
    send(
        &mut ws,
        json!({"op":"get","id":"now","source":"products","key":"p1"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"value","id":"now","found":true,"source":"products","key":"p1","version":v,"value":"one"})
    );
    let v2 = s.put("products", &[("p1", json!("two"))]);
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"value","id":"later","found":true,"source":"products","key":"p1","version":v2,"value":"two"})
    );
}

/// The WebSocket get takes `after` as the Cache API does: it waits until the named source
/// has made the version visible; a malformed `after` is a bad request naming the shape.
#[tokio::test]
async fn get_with_after_waits_for_the_named_version() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let v = s.put("products", &[("p1", json!("one"))]);
    s.applied("products", v).await;
    let mut ws = s.connect().await;
    send(
        &mut ws,
        json!({"op":"get","id":"later","source":"products","key":"p1","wait_ms":20_000,
               "after":[{"source":"products","version":v + 1}]}),
    )
    .await;
    send(
        &mut ws,
        json!({"op":"get","id":"now","source":"products","key":"p1","after":[{"source":"products","version":v}]}),
    )
    .await;
    let first = recv(&mut ws).await;
    assert_eq!(first["id"], "now", "{first}");
    let v2 = s.put("products", &[("p1", json!("two"))]);
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"value","id":"later","found":true,"source":"products","key":"p1","version":v2,"value":"two"})
    );
    for (id, after) in [
        ("not_a_list", json!({"products": 1})),
        ("no_version", json!([{"source":"products"}])),
    ] {
        send(
            &mut ws,
            json!({"op":"get","id":id,"source":"products","key":"p1","after":after}),
        )
        .await;
        let e = recv(&mut ws).await;
        assert_eq!(
            (e["id"].as_str(), e["code"].as_str()),
            (Some(id), Some("bad_request")),
            "{e}"
        );
        assert!(e["message"].as_str().unwrap_or("").contains("after"), "{e}");
    }
    send(
        &mut ws,
        json!({"op":"get","id":"unknown","source":"products","key":"p1","after":[{"source":"nosuch","version":1}]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "not_found");
}

#[tokio::test]
async fn get_below_min_version_is_unavailable_once_its_wait_is_over() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let v = s.put("products", &[("p1", json!(1))]);
    s.applied("products", v).await;
    let mut ws = s.connect().await;
    for (id, wait) in [("at_once", json!(null)), ("after_wait", json!(50))] {
        send(
            &mut ws,
            json!({"op":"get","id":id,"source":"products","key":"p1","min_version":v + 1,"wait_ms":wait}),
        )
        .await;
        let e = recv(&mut ws).await;
        assert_eq!(
            (e["type"].as_str(), e["id"].as_str()),
            (Some("error"), Some(id)),
            "{e}"
        );
        assert_eq!(e["code"], "unavailable", "{e}");
        assert!(
            e["message"].as_str().unwrap_or("").contains("min_version"),
            "{e}"
        );
    }
    send(
        &mut ws,
        json!({"op":"get","id":"bad","source":"products","key":"p1","wait_ms":-1}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
}

#[tokio::test]
async fn waiting_gets_are_bounded_per_connection() {
    let s = Setup::start(
        &["products"],
        WsConfig {
            max_waiting_gets: 1,
            ..WsConfig::default()
        },
    )
    .await;
    let v = s.put("products", &[("p1", json!(1))]);
    s.applied("products", v).await;
    let mut ws = s.connect().await;
    for id in ["w1", "w2"] {
        send(
            &mut ws,
            json!({"op":"get","id":id,"source":"products","key":"p1","min_version":v + 1,"wait_ms":20_000}),
        )
        .await;
    }
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("w2"), Some("limit")),
        "{e}"
    );
    let v2 = s.put("products", &[("p1", json!(2))]);
    let got = recv(&mut ws).await;
    assert_eq!(
        (got["id"].as_str(), got["version"].as_u64()),
        (Some("w1"), Some(v2)),
        "{got}"
    );
}

/// Sends `text`, expects an `error` with `code`, then proves the connection still works.
async fn bad_input_keeps_connection(text: &str, code: &str) {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let mut ws = s.connect().await;
    ws.send(Message::Text(text.into())).await.expect("send");
    let e = recv(&mut ws).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    send(
        &mut ws,
        json!({"op":"get","id":"after","source":"products","key":"k"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "value");
}

#[tokio::test]
async fn malformed_json_is_an_error_and_the_connection_stays() {
    bad_input_keeps_connection("{\"op\":\"subscribe\",", "bad_json").await;
}

#[tokio::test]
async fn unknown_op_is_an_error_and_the_connection_stays() {
    bad_input_keeps_connection(r#"{"op":"explode","id":"x"}"#, "unknown_op").await;
}

#[tokio::test]
async fn unknown_source_is_not_found() {
    bad_input_keeps_connection(
        r#"{"op":"subscribe","id":"s","source":"nope","keys":["a"]}"#,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn keys_and_prefix_together_are_a_bad_request() {
    bad_input_keeps_connection(
        r#"{"op":"subscribe","id":"s","source":"products","keys":["a"],"prefix":"a"}"#,
        "bad_request",
    )
    .await;
}

#[tokio::test]
async fn binary_messages_are_an_error() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let mut ws = s.connect().await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("send");
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
}

#[tokio::test]
async fn duplicate_subscription_id_is_an_error() {
    let s = Setup::start(&["products"], WsConfig::default()).await;
    let mut ws = s.connect().await;
    subscribe_keys(&mut ws, "s", "products", &["a"], false).await;
    assert_eq!(recv(&mut ws).await["type"], "synced");
    send(
        &mut ws,
        json!({"op":"subscribe","id":"s","source":"products","keys":["b"]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "duplicate_id");
}

#[tokio::test]
async fn too_many_keys_in_one_subscribe_is_refused() {
    let ws_cfg = WsConfig {
        max_keys: 3,
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let mut ws = s.connect().await;
    send(
        &mut ws,
        json!({"op":"subscribe","id":"s","source":"products","keys":["a","b","c","d"]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "limit");
}

#[tokio::test]
async fn max_subscriptions_per_connection() {
    let ws_cfg = WsConfig {
        max_subscriptions: 2,
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let mut ws = s.connect().await;
    for id in ["a", "b"] {
        subscribe_keys(&mut ws, id, "products", &[id], false).await;
        assert_eq!(recv(&mut ws).await["type"], "synced");
    }
    send(
        &mut ws,
        json!({"op":"subscribe","id":"c","source":"products","keys":["c"]}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(e["code"], "limit", "{e}");
    // Room again after an unsubscribe.
    send(&mut ws, json!({"op":"unsubscribe","id":"a"})).await;
    assert_eq!(recv(&mut ws).await["type"], "unsubscribed");
    subscribe_keys(&mut ws, "c", "products", &["c"], false).await;
}

fn status_of(err: tungstenite::Error) -> StatusCode {
    match err {
        tungstenite::Error::Http(resp) => {
            StatusCode::from_u16(resp.status().as_u16()).expect("status")
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn max_connections_refuses_the_upgrade_with_503() {
    let ws_cfg = WsConfig {
        max_connections: 2,
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let a = s.connect().await;
    let _b = s.connect().await;
    let err = tokio_tungstenite::connect_async(s.url())
        .await
        .expect_err("third refused");
    assert_eq!(status_of(err), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        s.sidecar
            .ws_stats()
            .rejected_full
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Closing one gives its permit back once the server has seen it go.
    drop(a);
    within("a permit to come back", async {
        loop {
            if let Ok((ws, _)) = tokio_tungstenite::connect_async(s.url()).await {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn message_above_the_bound_closes_with_1009() {
    let ws_cfg = WsConfig {
        max_message_bytes: ByteSize(1024),
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let mut ws = s.connect().await;
    // Just under the bound is fine.
    let key = "k".repeat(900);
    send(
        &mut ws,
        json!({"op":"get","id":"g","source":"products","key":key}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "value");
    let key = "k".repeat(2000);
    send(
        &mut ws,
        json!({"op":"get","id":"g","source":"products","key":key}),
    )
    .await;
    assert_eq!(close_code(&mut ws).await, CLOSE_TOO_BIG);
}

#[tokio::test]
async fn silent_client_is_closed_after_the_idle_timeout() {
    let ws_cfg = WsConfig {
        ping_interval: Dur(Duration::from_millis(100)),
        idle_timeout: Dur(Duration::from_millis(300)),
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let mut silent = s.connect().await;
    let mut live = s.connect().await;
    subscribe_keys(&mut live, "s", "products", &["k"], false).await;
    // The live client keeps reading (so answering pings) well past the idle timeout; the
    // silent one reads nothing, so it answers no ping.
    let until = tokio::time::Instant::now() + Duration::from_millis(900);
    while let Ok(frame) = tokio::time::timeout_at(until, live.next()).await {
        assert!(
            matches!(frame, Some(Ok(_))),
            "live client closed: {frame:?}"
        );
    }
    assert_eq!(close_code(&mut silent).await, CLOSE_IDLE);
    let v = s.put("products", &[("k", json!(1))]);
    let got = recv(&mut live).await;
    assert_eq!(got["version"], v, "{got}");
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    let ws_cfg = WsConfig {
        token: Some("s3cret".into()),
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let err = tokio_tungstenite::connect_async(s.url())
        .await
        .expect_err("no token");
    assert_eq!(status_of(err), StatusCode::UNAUTHORIZED);
    let mut req = s.url().into_client_request().expect("request");
    req.headers_mut()
        .insert("authorization", "Bearer wrong".parse().expect("header"));
    let err = tokio_tungstenite::connect_async(req)
        .await
        .expect_err("wrong token");
    assert_eq!(status_of(err), StatusCode::UNAUTHORIZED);
    let mut req = s.url().into_client_request().expect("request");
    req.headers_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("header"));
    tokio_tungstenite::connect_async(req)
        .await
        .expect("header token accepted");
    tokio_tungstenite::connect_async(format!("{}?access_token=s3cret", s.url()))
        .await
        .expect("query token accepted");
}

#[tokio::test]
async fn origin_allowlist_is_checked_at_the_handshake() {
    let ws_cfg = WsConfig {
        allowed_origins: vec!["https://app.example.com".into()],
        ..WsConfig::default()
    };
    let s = Setup::start(&["products"], ws_cfg).await;
    let with_origin = |o: &str| {
        let mut req = s.url().into_client_request().expect("request");
        req.headers_mut()
            .insert("origin", o.parse().expect("header"));
        req
    };
    let err = tokio_tungstenite::connect_async(with_origin("https://evil.example"))
        .await
        .expect_err("foreign origin");
    assert_eq!(status_of(err), StatusCode::FORBIDDEN);
    tokio_tungstenite::connect_async(with_origin("https://app.example.com"))
        .await
        .expect("allowed origin");
    // Scheme and host are case-insensitive.
    tokio_tungstenite::connect_async(with_origin("HTTPS://App.Example.com"))
        .await
        .expect("allowed origin, other case");
    // Two Origin headers (an allowed one first) are refused: every one is checked.
    let mut two = with_origin("https://app.example.com");
    two.headers_mut()
        .append("origin", "https://evil.example".parse().expect("header"));
    let err = tokio_tungstenite::connect_async(two)
        .await
        .expect_err("two origins");
    assert_eq!(status_of(err), StatusCode::FORBIDDEN);
    // Non-browser clients send no Origin.
    tokio_tungstenite::connect_async(s.url())
        .await
        .expect("no origin");
}

#[tokio::test]
async fn a_client_that_keeps_falling_behind_is_closed_with_4008() {
    let ws_cfg = WsConfig {
        queue: 4,
        max_resets: 1,
        ..WsConfig::default()
    };
    let s = Setup::start(&["t"], ws_cfg).await;
    let (mut ws, _) = connect_small_buffer(s.sidecar.http_addr()).await;
    send(
        &mut ws,
        json!({"op":"subscribe","id":"s","source":"t","prefix":""}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    assert_eq!(recv(&mut ws).await["type"], "synced");
    // Publish large values to many keys while reading a frame now and then.
    let origin = s.origin.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let value = format!("\"{}\"", "x".repeat(8 << 10));
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let puts = (0..16)
                    .map(|i| Put::upsert(format!("k{}", (n * 16 + i) % 4096), value.clone()))
                    .collect();
                let _ = origin.publish("t", puts);
                n += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    let code = within("a 4008 close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
                other => panic!("connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = publishing.await;
    assert_eq!(code, CLOSE_TOO_SLOW);
    assert!(
        s.sidecar
            .hub()
            .stats()
            .too_slow
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_sources_are_read_through_by_get_and_refuse_subscribe() {
    let s = Setup::start_with(&["users"], |cfg| {
        cfg.origins[0].topics[0].mode = viewcar::config::Mode::OnDemand;
    })
    .await;
    s.put("users", &[("u1", json!({"name": "a"}))]);
    // Readiness counts full sources only; a get before the feed connects answers unavailable.
    s.synced("users").await;
    let mut ws = s.connect().await;
    // A key that is not resident is fetched, not answered from the (empty) full keyspace.
    send(
        &mut ws,
        json!({"op": "get", "id": "g1", "source": "users", "key": "u1"}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "value", "{v}");
    assert_eq!(v["found"], true, "{v}");
    assert_eq!(v["value"], json!({"name": "a"}), "{v}");
    send(
        &mut ws,
        json!({"op": "get", "id": "g2", "source": "users", "key": "u2"}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["id"].as_str(), v["found"].as_bool()),
        (Some("g2"), Some(false)),
        "{v}"
    );
    // A subscription would get nothing for keys that are not resident: it is refused.
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "s1", "source": "users", "keys": ["u1"]}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "failed_precondition", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("on_demand"),
        "{v}"
    );
}

/// Four clients with a tiny receive buffer subscribe to every row of a 20k-key source and never
/// read: each write to them waits for a socket that does not drain. With `max_connections = 4`
/// they would lock everyone out; the send deadline closes them (4008, counted) and a fifth
/// client gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_closed_and_free_their_slots() {
    let ws_cfg = WsConfig {
        max_connections: 4,
        queue: 16,
        ping_interval: Dur(Duration::from_secs(1)),
        idle_timeout: Dur(Duration::from_secs(3)),
        send_timeout: Dur(Duration::from_secs(1)),
        ..WsConfig::default()
    };
    let s = Setup::start(&["t"], ws_cfg).await;
    let value = json!({"pad": "x".repeat(200)});
    let mut version = 0;
    for chunk in 0..20 {
        let kvs: Vec<(String, serde_json::Value)> = (0..1000)
            .map(|i| (format!("k{:05}", chunk * 1000 + i), value.clone()))
            .collect();
        let kvs: Vec<(&str, serde_json::Value)> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        version = s.put("t", &kvs);
    }
    // Every row is in the sidecar before the clients subscribe.
    let src = s.sidecar.store().source("t").expect("source t").clone();
    within("20k rows in the sidecar", async {
        while src.version() < version {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(src.len(), 20_000);

    let mut stuck = Vec::new();
    for _ in 0..4 {
        let (mut ws, _) = connect_small_buffer(s.sidecar.http_addr()).await;
        send(
            &mut ws,
            json!({"op":"subscribe","id":"s","source":"t","prefix":"","initial":true}),
        )
        .await;
        stuck.push(ws);
    }
    let mut fifth = within("a fifth client after the stuck ones are closed", async {
        loop {
            match tokio_tungstenite::connect_async(s.url()).await {
                Ok((ws, _)) => return ws,
                Err(tungstenite::Error::Http(r))
                    if r.status() == StatusCode::SERVICE_UNAVAILABLE =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("fifth client: {e:?}"),
            }
        }
    })
    .await;
    send(
        &mut fifth,
        json!({"op":"get","id":"g","source":"t","key":"k00001"}),
    )
    .await;
    assert_eq!(recv(&mut fifth).await["found"], true);
    let timed_out = s
        .sidecar
        .ws_stats()
        .closed_send_timeout
        .load(std::sync::atomic::Ordering::Relaxed);
    let idle = s
        .sidecar
        .ws_stats()
        .closed_idle
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        timed_out >= 1 && timed_out + idle >= 4,
        "send timeouts {timed_out}, idle {idle}"
    );
    drop(stuck);
}

/// Upgrades a raw TCP connection to `/ws` by hand, so that the test can then write frames no
/// WebSocket library would send.
async fn raw_upgrade(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.expect("upgrade response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// Reads server frames up to the close frame; returns its code.
async fn raw_close_code(tcp: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    loop {
        let mut h = [0u8; 2];
        tcp.read_exact(&mut h).await.expect("frame header");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                tcp.read_exact(&mut l).await.expect("length");
                u16::from_be_bytes(l) as usize
            }
            127 => panic!("unexpected huge frame"),
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.expect("payload");
        if h[0] & 0x0f == 0x8 {
            assert!(payload.len() >= 2, "close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A masked client frame (`opcode`, FIN set) carrying `payload`.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Protocol violations close with the code that names them (RFC 6455 7.4.1), not an empty
/// close: 1007 for text that is not UTF-8, 1002 for an unmasked frame or a reserved bit.
#[tokio::test]
async fn protocol_violations_close_with_1007_or_1002() {
    use tokio::io::AsyncWriteExt;
    use viewcar::ws::{CLOSE_INVALID_DATA, CLOSE_PROTOCOL_ERROR};
    let s = Setup::start(&["t"], WsConfig::default()).await;
    let addr = s.sidecar.http_addr();
    let cases: [(&str, Vec<u8>, u16); 3] = [
        (
            "invalid UTF-8",
            masked(0x1, &[0xff, 0xfe, 0x41]),
            CLOSE_INVALID_DATA,
        ),
        (
            "unmasked frame",
            vec![0x81, 0x02, b'h', b'i'],
            CLOSE_PROTOCOL_ERROR,
        ),
        (
            "reserved bit",
            {
                let mut f = masked(0x1, b"hi");
                f[0] |= 0x40;
                f
            },
            CLOSE_PROTOCOL_ERROR,
        ),
    ];
    for (what, frame, want) in cases {
        let mut tcp = within("upgrade", raw_upgrade(addr)).await;
        tcp.write_all(&frame).await.expect("frame");
        let code = within(what, raw_close_code(&mut tcp)).await;
        assert_eq!(code, want, "{what}");
    }
    assert!(
        s.sidecar
            .ws_stats()
            .closed_protocol
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
}

/// Each origin restart (a new epoch) resets a WebSocket subscription once: one `reset`, the
/// new epoch's rows, one `synced`, and nothing of that restart after it. Five restarts in a
/// row, each replacing 600 keys (a diff larger than a page), with the subscription open; a
/// marker written after each resync ends that round, so a late second reset would be seen
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_epoch_change_resets_a_subscription_once() {
    use viewcar::Origin;
    use ws_support::common::{origin_config, sidecar_config, within, TestOrigin};
    within(async {
        let puts = |round: u32| -> Vec<Put> {
            (0..600)
                .map(|i| Put::upsert(format!("k{i:04}"), format!("\"r{round}-{i}\"")))
                .collect()
        };
        let first = Origin::new(origin_config());
        first.publish("t", puts(0)).expect("publish");
        let mut origin = TestOrigin::start_on(first, ws_support::common::loopback0()).await;
        let sidecar =
            ws_support::common::start_sidecar(sidecar_config(&origin.url(), &["t"])).await;
        sidecar.synced().await;
        let mut ws = connect(&format!("ws://{}/ws", sidecar.http_addr())).await;
        send(
            &mut ws,
            json!({"op":"subscribe","id":"s","source":"t","prefix":"","initial":true}),
        )
        .await;
        loop {
            if recv(&mut ws).await["type"] == "synced" {
                break;
            }
        }
        for round in 1..=5u32 {
            let next = Origin::new(origin_config());
            next.publish("t", puts(round)).expect("publish");
            origin.stop().await;
            origin = TestOrigin::start_on(next, origin.addr).await;
            let marker = format!("m{round}");
            let (mut resets, mut synced, mut rows) = (0, 0, 0);
            loop {
                let f = recv(&mut ws).await;
                match f["type"].as_str() {
                    Some("reset") => {
                        resets += 1;
                        assert_eq!(synced, 0, "round {round}: a reset after synced: {f}");
                    }
                    Some("row") => rows += 1,
                    Some("synced") => {
                        synced += 1;
                        assert_eq!(resets, 1, "round {round}: synced without one reset");
                        // The round's resync is over: write the marker that ends it.
                        origin
                            .origin
                            .publish("t", vec![Put::upsert(marker.clone(), "1")])
                            .expect("publish marker");
                    }
                    Some("change") if f["key"] == marker.as_str() => break,
                    Some("change") => rows += 1,
                    Some("delete") => {}
                    other => panic!("round {round}: unexpected frame {other:?}: {f}"),
                }
            }
            assert_eq!((resets, synced), (1, 1), "round {round}");
            assert!(
                rows >= 600,
                "round {round}: {rows} rows and changes after the reset"
            );
        }
    })
    .await
}
