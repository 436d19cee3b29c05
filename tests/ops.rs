//! Operations: readiness, `/metrics`, `/status`, gRPC health and reflection, graceful shutdown.
//! Everything on loopback port 0; waits are on events, bounded by deadlines.

mod common;
mod ops_support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use common::{
    cache_client, channel, loopback0, open_watch, origin_config, until_synced, within, TestOrigin,
};
use ops_support::{get, health_watch, sample};
use viewcar::config::Dur;
use viewcar::internals::parse_prometheus_text;
use viewcar::pb::cache::v1 as cache;
use viewcar::{demo, Origin, Put, Sidecar};

async fn health_status(sidecar: &Sidecar, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(common::grpc_channel(sidecar).await);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check answers");
    ServingStatus::try_from(resp.into_inner().status).expect("known status")
}

#[tokio::test]
async fn readiness_flips_only_after_sync() {
    within(async {
        // The origin's port is bound but not served yet: the sidecar cannot sync.
        let listener = TcpListener::bind(loopback0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = Origin::new(origin_config());
        origin
            .publish("prices", vec![Put::upsert("p1", "100")])
            .unwrap();
        origin
            .publish("products", vec![Put::upsert("p1", "{}")])
            .unwrap();
        let cfg = common::sidecar_config(&format!("http://{addr}"), &["products", "prices"]);
        let sidecar = common::start_sidecar(cfg).await;
        let http = sidecar.http_addr();

        assert_eq!(get(http, "/healthz").await.status, 200, "alive before sync");
        let r = get(http, "/readyz").await;
        assert_eq!(r.status, 503);
        assert!(
            r.body.contains("products") && r.body.contains("prices"),
            "{}",
            r.body
        );
        let status: serde_json::Value =
            serde_json::from_str(&get(http, "/status").await.body).unwrap();
        assert_eq!(status["ready"], false);
        assert_eq!(
            status["waiting_for"],
            serde_json::json!(["products", "prices"])
        );
        assert!(!sidecar.readiness().is_ready());
        assert_eq!(health_status(&sidecar, "").await, ServingStatus::NotServing);
        assert_eq!(
            health_status(&sidecar, "viewcar.cache.v1.Cache").await,
            ServingStatus::NotServing
        );
        let mut health = HealthClient::new(common::grpc_channel(&sidecar).await);
        let mut statuses = health_watch(&mut health, "viewcar.cache.v1.Cache").await;
        let first = statuses.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::NotServing as i32);

        // Serve the origin: the sidecar syncs, and only then is it ready.
        let serving = origin.clone();
        tokio::spawn(async move {
            let _ = serving.serve(listener, std::future::pending()).await;
        });
        let next = statuses.message().await.unwrap().unwrap();
        assert_eq!(next.status, ServingStatus::Serving as i32);
        assert!(sidecar.readiness().is_ready());
        for s in sidecar.store().sources() {
            assert!(s.is_synced(), "{} serving before synced", s.name());
        }
        let r = get(http, "/readyz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
        assert_eq!(health_status(&sidecar, "").await, ServingStatus::Serving);
        let status: serde_json::Value =
            serde_json::from_str(&get(http, "/status").await.body).unwrap();
        assert_eq!(status["ready"], true);
        assert_eq!(status["sources"][1]["name"], "prices");
        assert_eq!(status["sources"][1]["keys"], 1);
        assert_eq!(status["origins"][0]["connected"], true);
        sidecar.shutdown().await;
    })
    .await
}

/// A demo-sized catalog with its views, then reads and changes: every family the issue names
/// is exposed, the text parses, and the counters move.
#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_the_demo() {
    within(async {
        let origin = Origin::new(demo::origin_config(loopback0()));
        let size = demo::CatalogSize {
            products: 200,
            ..demo::CatalogSize::default()
        };
        demo::load(&origin, size, 1);
        let o = TestOrigin::start_on(origin.clone(), loopback0()).await;
        let cfg = demo::sidecar_config(o.addr, loopback0());
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;
        let http = sidecar.http_addr();

        let r = get(http, "/metrics").await;
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("text/plain; version=0.0.4"),
            "{:?}",
            r.headers
        );
        let before = parse_prometheus_text(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
        for series in [
            "viewcar_ready 1",
            "viewcar_source_synced{source=\"products\",kind=\"topic\",origin=\"catalog\"}",
            "viewcar_source_keys{source=\"product_page\",kind=\"view\",origin=\"\"}",
            "viewcar_source_bytes{source=\"prices\",kind=\"topic\",origin=\"catalog\"}",
            "viewcar_source_staleness_seconds{source=\"prices\",kind=\"topic\",origin=\"catalog\"}",
            "viewcar_origin_connected{origin=\"catalog\"}",
            "viewcar_origin_connects_total{origin=\"catalog\"}",
            "viewcar_origin_resets_total{origin=\"catalog\"}",
            "viewcar_origin_snapshots_total{origin=\"catalog\"}",
            "viewcar_origin_duplicates_total{origin=\"catalog\"}",
            "viewcar_origin_gaps_total{origin=\"catalog\"}",
            "viewcar_view_recomputes_total{view=\"product_page\"}",
            "viewcar_view_row_errors_total{view=\"product_page\"}",
            "viewcar_subscribers{kind=\"watch\"}",
            "viewcar_subscriber_queue_depth",
            "viewcar_subscriber_conflated_total",
            "viewcar_subscriber_resets_total",
            "viewcar_subscriber_closed_slow_total",
        ] {
            let name = series.split(' ').next().unwrap();
            assert!(before.contains_key(name), "{name} missing:\n{}", r.body);
        }
        assert_eq!(sample(&before, "viewcar_ready"), 1.0);
        assert_eq!(
            sample(
                &before,
                "viewcar_origin_snapshots_total{origin=\"catalog\"}"
            ),
            6.0
        );
        assert_eq!(
            sample(
                &before,
                "viewcar_source_keys{source=\"products\",kind=\"topic\",origin=\"catalog\"}"
            ),
            200.0
        );

        // Reads and a Watch through the Cache API, then catalog changes.
        let mut client = cache_client(&sidecar).await;
        for _ in 0..3 {
            client
                .get(cache::GetRequest {
                    source: "product_page".into(),
                    key: demo::product_id(1),
                    options: None,
                })
                .await
                .unwrap();
        }
        let missing = client
            .get(cache::GetRequest {
                source: "nope".into(),
                key: "k".into(),
                options: None,
            })
            .await;
        assert!(missing.is_err());
        let mut watch = client
            .watch(cache::WatchRequest {
                source: "prices".into(),
                keys: vec![],
                prefix: String::new(),
                send_initial: false,
            })
            .await
            .unwrap()
            .into_inner();
        let prices = common::source(&sidecar, "prices");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
        let mut published = 0;
        while published < 20 {
            let (topic, puts) = demo::random_change(&mut rng, size);
            origin.publish(topic, puts).unwrap();
            published += 1;
        }
        let pos = origin
            .publish(
                "prices",
                vec![Put::upsert(demo::product_id(1), r#"{"amount":1}"#)],
            )
            .unwrap();
        common::wait_position(&prices, &pos.epoch, pos.version).await;
        // The Watch sees the last price change, so the hub has delivered it.
        loop {
            let ev = watch.message().await.unwrap().unwrap();
            if let Some(cache::watch_event::Kind::Upsert(i)) = ev.kind {
                if i.value.as_ref() == br#"{"amount":1}"# {
                    break;
                }
            }
        }

        let r = get(http, "/metrics").await;
        let after = parse_prometheus_text(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
        let moved = |series: &str, by: f64| {
            let (b, a) = (
                before.get(series).copied().unwrap_or(0.0),
                sample(&after, series),
            );
            assert!(a - b >= by, "{series}: {b} -> {a}, expected +{by}");
        };
        moved("viewcar_origin_messages_total{origin=\"catalog\"}", 21.0);
        moved(
            "viewcar_origin_received_bytes_total{origin=\"catalog\"}",
            1.0,
        );
        moved("viewcar_writer_batches_total", 21.0);
        moved("viewcar_view_recomputes_total{view=\"product_page\"}", 1.0);
        moved("viewcar_subscriber_delivered_total", 1.0);
        moved("viewcar_read_duration_seconds_count{method=\"Get\"}", 4.0);
        moved("viewcar_read_errors_total{method=\"Get\"}", 1.0);
        moved("viewcar_read_duration_seconds_count{method=\"Watch\"}", 1.0);
        assert_eq!(sample(&after, "viewcar_subscribers{kind=\"watch\"}"), 1.0);
        assert!(
            after.contains_key("viewcar_read_duration_seconds_bucket{le=\"0.001\",method=\"Get\"}")
                || after.contains_key(
                    "viewcar_read_duration_seconds_bucket{method=\"Get\",le=\"0.001\"}"
                ),
            "{}",
            r.body
        );
        drop(watch);
        sidecar.shutdown().await;
    })
    .await
}

/// `grpcurl -plaintext ADDR list` asks the reflection service which services exist.
#[tokio::test]
async fn reflection_lists_the_services_without_proto_files() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        let sidecar = common::start_sidecar(common::sidecar_config(&o.url(), &["t"])).await;
        let grpc = sidecar.grpc_addr().tcp().expect("a TCP listener");
        for addr in [grpc, o.addr] {
            let mut client = ServerReflectionClient::new(channel(addr).await);
            let reqs = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol("viewcar.cache.v1.Cache".into()),
            ]
            .map(|m| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            });
            let mut resp = client
                .server_reflection_info(tokio_stream::iter(reqs))
                .await
                .unwrap()
                .into_inner();
            let Some(MessageResponse::ListServicesResponse(list)) =
                resp.message().await.unwrap().unwrap().message_response
            else {
                panic!("expected a service list");
            };
            let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            assert!(
                names.contains(&"grpc.health.v1.Health".to_string()),
                "{names:?}"
            );
            if addr == grpc {
                assert!(
                    names.contains(&"viewcar.cache.v1.Cache".to_string()),
                    "{names:?}"
                );
                assert!(
                    !names.contains(&"viewcar.feed.v1.Feed".to_string()),
                    "{names:?}"
                );
                let Some(MessageResponse::FileDescriptorResponse(files)) =
                    resp.message().await.unwrap().unwrap().message_response
                else {
                    panic!("expected the file of the Cache service");
                };
                assert!(!files.file_descriptor_proto.is_empty());
            } else {
                assert!(
                    names.contains(&"viewcar.feed.v1.Feed".to_string()),
                    "{names:?}"
                );
            }
        }
        sidecar.shutdown().await;
    })
    .await
}

/// Shutdown with a Watch stream and a WebSocket open: both end (the WebSocket with 1001), the
/// health check says NOT_SERVING, and it all takes far less than the grace period.
#[tokio::test]
async fn shutdown_ends_watch_and_websocket_within_the_grace_period() {
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        o.origin.publish("t", vec![Put::upsert("a", "1")]).unwrap();
        let mut cfg = common::sidecar_config(&o.url(), &["t"]);
        let grace = Duration::from_secs(5);
        cfg.shutdown.grace = Dur(grace);
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;

        let mut client = cache_client(&sidecar).await;
        let mut watch = open_watch(&mut client, "t", &["a"], true).await;
        // Initial row, then synced: the stream is established end to end.
        until_synced(&mut watch).await;
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws", sidecar.http_addr()))
                .await
                .unwrap();
        ws.send(Message::text(
            r#"{"op":"subscribe","id":"s","source":"t","keys":["a"],"initial":false}"#,
        ))
        .await
        .unwrap();
        loop {
            if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
                if t.contains("\"synced\"") {
                    break;
                }
            }
        }
        let mut health = HealthClient::new(common::grpc_channel(&sidecar).await);
        let mut statuses = health_watch(&mut health, "").await;
        assert_eq!(
            statuses.message().await.unwrap().unwrap().status,
            ServingStatus::Serving as i32
        );

        let start = Instant::now();
        let stopping = tokio::spawn(sidecar.shutdown());
        let close = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
        while let Ok(Some(_)) = watch.message().await {}
        let drained = stopping.await.unwrap();
        assert!(drained, "shutdown did not finish within the grace period");
        assert!(start.elapsed() < grace, "took {:?}", start.elapsed());
        // The health stream told NOT_SERVING before the listener went away: the sidecar
        // turns unready before it stops serving.
        let told = statuses.message().await;
        assert!(
            matches!(&told, Ok(Some(s)) if s.status == ServingStatus::NotServing as i32),
            "the health stream ended without NOT_SERVING: {told:?}"
        );
    })
    .await
}

/// A grace period that runs out: `shutdown` returns false instead of hanging. A client holding
/// a half-sent request keeps its http connection open past the grace period.
#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    use tokio::io::AsyncWriteExt;
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        let mut cfg = common::sidecar_config(&o.url(), &["t"]);
        let grace = Duration::from_millis(300);
        cfg.shutdown.grace = Dur(grace);
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;
        let mut half = tokio::net::TcpStream::connect(sidecar.http_addr())
            .await
            .unwrap();
        half.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // The request is in the server's hands before the shutdown starts.
        assert_eq!(get(sidecar.http_addr(), "/healthz").await.status, 200);
        let readiness = sidecar.readiness().clone();
        assert!(readiness.is_ready());
        let http = sidecar.http_addr();
        let start = Instant::now();
        let stopping = tokio::spawn(sidecar.shutdown());
        // Unready from the moment shutdown starts, while it waits for the connection: /readyz
        // answers 503 on a connection still served, and new connections are no longer accepted.
        common::eventually("unready during shutdown", || !readiness.is_ready()).await;
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(http),
        )
        .await
        {
            use tokio::io::AsyncReadExt;
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = String::new();
            let _ = tokio::time::timeout(Duration::from_millis(500), s.read_to_string(&mut answer))
                .await;
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
                "/readyz during shutdown answered {answer:?}"
            );
        }
        assert!(
            !stopping.await.unwrap(),
            "shutdown reported everything finished while a connection was still open"
        );
        let took = start.elapsed();
        assert!(
            took >= grace,
            "gave up after {took:?}, before the grace period"
        );
        drop(half);
    })
    .await
}

/// The status page is served from the binary, self-contained: no external resource.
#[tokio::test]
async fn status_page_is_self_contained() {
    within(async {
        let o = TestOrigin::start(origin_config()).await;
        let sidecar = common::start_sidecar(common::sidecar_config(&o.url(), &["t"])).await;
        let r = get(sidecar.http_addr(), "/").await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert!(r.body.contains("<table id=\"sources\">"));
        // The SVG namespace is a name, not a resource: nothing is fetched from it.
        let body = r.body.replace("\"http://www.w3.org/2000/svg\"", "");
        for external in ["http://", "https://", "<link", "src=\""] {
            assert!(
                !body.contains(external),
                "page loads something external: {external}"
            );
        }
        sidecar.shutdown().await;
    })
    .await
}

/// Credentials in an origin's address never reach the unauthenticated `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_an_origin_address_are_not_shown() {
    within(async {
        let listener = TcpListener::bind(loopback0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = common::sidecar_config(&format!("http://user:pa55word@{addr}"), &["t"]);
        let sidecar = common::start_sidecar(cfg).await;
        let body = get(sidecar.http_addr(), "/status").await.body;
        assert!(!body.contains("pa55word"), "{body}");
        assert!(body.contains(&format!("http://***@{addr}")), "{body}");
        sidecar.shutdown().await;
    })
    .await;
}

/// Clients that send half a request and wait (`GET /status HTTP/1.1\r\nHost: x\r\n` and nothing
/// more) are closed after `listen.http_header_timeout`, and while they are open they hold at most
/// `listen.http_max_connections`: they cannot starve `/healthz` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_and_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(async {
        let listener = TcpListener::bind(loopback0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = common::sidecar_config(&format!("http://{addr}"), &["t"]);
        cfg.listen.http_max_connections = 4;
        cfg.listen.http_header_timeout = Dur(Duration::from_millis(500));
        let sidecar = common::start_sidecar(cfg).await;
        let http = sidecar.http_addr();
        let mut stuck = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
            s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            stuck.push(s);
        }
        // Every permit is held by a half-sent request; the next client is served once they are
        // closed for taking too long (before, this waited for ever: `within` fails the test).
        assert_eq!(get(http, "/healthz").await.status, 200);
        for mut s in stuck {
            let mut buf = Vec::new();
            // The server closes the connection (possibly after a 408): EOF, not a hang.
            let _ = s.read_to_end(&mut buf).await;
        }
        sidecar.shutdown().await;
    })
    .await;
}

/// Connects to `addr` and says nothing; returns once the server has closed the connection.
async fn silent_until_closed(mut s: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            // What a server may say before it hangs up (an HTTP/2 SETTINGS or GOAWAY frame).
            Ok(_) => continue,
        }
    }
}

/// The gRPC listeners (the Cache API and the origin's Feed) close a connection that never
/// sends its HTTP/2 preface, and hold at most their connection bound: silent clients cannot
/// starve Gets or Syncs for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_grpc_connections_are_closed_and_bounded() {
    within(async {
        let mut ocfg = common::origin_config();
        ocfg.max_connections = 2;
        ocfg.header_timeout = Dur(Duration::from_millis(500));
        let origin = common::TestOrigin::start(ocfg).await;
        // Two silent connections hold the origin's every slot ...
        let mut feed_silent: Vec<_> = futures_util::future::join_all(
            (0..2).map(|_| tokio::net::TcpStream::connect(origin.addr)),
        )
        .await
        .into_iter()
        .map(|s| s.unwrap())
        .collect();
        // One of them starts the HTTP/2 preface and stops two-thirds of the way: some bytes
        // are not the preface, and the deadline still applies.
        {
            use tokio::io::AsyncWriteExt;
            feed_silent[1]
                .write_all(b"PRI * HTTP/2.0\r\n")
                .await
                .unwrap();
        }

        let mut cfg = common::sidecar_config(&origin.url(), &["t"]);
        cfg.listen.grpc_max_connections = 2;
        cfg.listen.grpc_header_timeout = Dur(Duration::from_millis(500));
        // ... so the sidecar's feed gets in only once they are closed.
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;
        for s in feed_silent {
            silent_until_closed(s).await;
        }

        let grpc = sidecar.grpc_addr().tcp().expect("a TCP listener");
        let silent: Vec<_> =
            futures_util::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(grpc)))
                .await
                .into_iter()
                .map(|s| s.unwrap())
                .collect();
        // Every Cache API slot is held by a silent client; a Get is served once they are
        // closed for saying nothing (before, this waited for ever: `within` fails the test).
        let mut client = common::cache_client(&sidecar).await;
        let got = client
            .get(common::get_request("t", "nope"))
            .await
            .expect("Get served")
            .into_inner();
        assert!(!got.item.expect("item").found);
        for s in silent {
            silent_until_closed(s).await;
        }
        sidecar.shutdown().await;
    })
    .await;
}

/// A relay's Feed listener (`[listen] feed`) has the origin's bounds: at most
/// `relay.max_connections` connections, and one that never sends its preface is closed after
/// `relay.header_timeout`, so silent clients cannot keep leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_feed_listener_closes_silent_connections_and_holds_its_bound() {
    within(async {
        let origin = common::TestOrigin::start(common::origin_config()).await;
        origin
            .origin
            .publish("t", vec![common::put("a", "1")])
            .unwrap();
        let mut cfg = common::sidecar_config(&origin.url(), &["t"]);
        cfg.listen.feed = Some(loopback0());
        cfg.relay.max_connections = 2;
        cfg.relay.header_timeout = Dur(Duration::from_secs(2));
        let relay = common::start_sidecar(cfg).await;
        relay.synced().await;
        let feed = relay.feed_addr().expect("serves feed");
        // Two silent connections hold the relay's every feed slot ...
        let silent: Vec<_> =
            futures_util::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(feed)))
                .await
                .into_iter()
                .map(|s| s.unwrap())
                .collect();
        // ... so a Fetch is not served while they are open ...
        let fetch = async {
            let mut c = common::feed_client(feed).await;
            c.fetch(viewcar::pb::feed::v1::FetchRequest {
                topic: "t".into(),
                keys: vec!["a".into()],
            })
            .await
        };
        assert!(
            tokio::time::timeout(Duration::from_millis(300), fetch)
                .await
                .is_err(),
            "served past the relay's connection bound"
        );
        // ... and a leaf gets in once they are closed for saying nothing.
        let leaf =
            common::start_sidecar(common::sidecar_config(&format!("http://{feed}"), &["t"])).await;
        leaf.synced().await;
        assert_eq!(
            common::source(&leaf, "t").get("a").map(|e| e.value),
            Some("1".into())
        );
        for s in silent {
            silent_until_closed(s).await;
        }
        let served = relay.relay().expect("relay").origin().clone();
        assert_eq!(common::counter(&served.stats().streams_opened), 1);
        leaf.shutdown().await;
        relay.shutdown().await;
    })
    .await;
}

/// Every series the README's metrics table names is exposed (the table stays true to the code).
#[tokio::test]
async fn every_metric_the_readme_names_is_exposed() {
    within(async {
        let origin = Origin::new(demo::origin_config(loopback0()));
        demo::load(
            &origin,
            demo::CatalogSize {
                products: 50,
                ..demo::CatalogSize::default()
            },
            1,
        );
        let o = TestOrigin::start_on(origin.clone(), loopback0()).await;
        let mut cfg = demo::sidecar_config(o.addr, loopback0());
        cfg.listen.redis = Some("127.0.0.1:0".parse().expect("address"));
        cfg.listen.feed = Some(loopback0());
        let sidecar = common::start_sidecar(cfg).await;
        sidecar.synced().await;
        let body = get(sidecar.http_addr(), "/metrics").await.body;
        let readme = include_str!("../README.md");
        let table = readme
            .split("**Metrics** (all prefixed `viewcar_`):")
            .nth(1)
            .and_then(|rest| rest.split("**Logs**").next())
            .expect("the README's metrics table");
        let mut named = 0;
        for row in table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| area"))
        {
            let Some(series) = row.split(" | ").nth(1) else {
                continue;
            };
            for name in series.split('`').skip(1).step_by(2) {
                let name = name.split('{').next().unwrap_or(name);
                if name.ends_with('*') || name.is_empty() {
                    continue;
                }
                named += 1;
                let family = format!("viewcar_{name}");
                assert!(
                    body.lines().any(|l| l
                        .strip_prefix("# TYPE ")
                        .is_some_and(|t| t.split(' ').next() == Some(family.as_str()))
                        || l.starts_with(&format!("{family}{{"))
                        || l.starts_with(&format!("{family} "))
                        || l.starts_with(&format!("{family}_"))),
                    "README names {family}, /metrics has no such series"
                );
            }
        }
        assert!(named > 40, "only {named} series read from the README table");
        sidecar.shutdown().await;
    })
    .await
}
