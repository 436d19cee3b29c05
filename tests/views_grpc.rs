//! Views end to end over loopback gRPC: an origin with the demo catalog, a sidecar with the demo
//! views plus one Rust-defined view; `product_page` read with the Cache API follows a price
//! published at the origin, waited for with Watch and `min_version` (no sleeps).

mod common;

use common::*;
use serde_json::{json, Value};
use viewcar::demo::{self, CatalogSize};
use viewcar::pb::cache::v1 as cache;
use viewcar::views::View;
use viewcar::Sidecar;

const SIZE: CatalogSize = CatalogSize {
    products: 200,
    brands: 10,
};

fn value(b: &[u8]) -> Value {
    serde_json::from_slice(b).expect("view rows are JSON")
}

#[tokio::test]
async fn product_page_follows_a_published_price() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        demo::load(&origin.origin, SIZE, 3);
        let cfg = demo::sidecar_config(origin.addr, loopback0());
        let in_stock = View::map("in_stock", "product_page", |_, page, _| {
            let available = page["stock"]["available"].as_u64().unwrap_or(0);
            Ok((available > 0).then(|| json!({ "name": page["name"], "available": available })))
        });
        let sidecar = Sidecar::start_with_views(cfg, vec![in_stock])
            .await
            .expect("sidecar starts");
        sidecar.synced().await;
        let page = source(&sidecar, "product_page");
        assert!(page.is_synced() && page.len() > 100);
        let key = page.keyspace().keys()[0].to_string();
        let mut client = cache_client(&sidecar).await;

        let first = client
            .get(get_request("product_page", &key))
            .await
            .unwrap()
            .into_inner();
        let item = first.item.unwrap();
        assert!(item.found);
        let row = value(&item.value);
        assert_eq!(row["id"], key.as_str());
        assert!(row["brand"]["name"].is_string() && row["country"]["name"].is_string());
        assert_eq!(first.staleness_ms, 0);

        let mut watch = open_watch(&mut client, "product_page", &[&key], true).await;
        until_synced(&mut watch).await;

        let price = json!({"id": key, "amount": 123_456, "currency": "EUR"}).to_string();
        origin
            .origin
            .publish("prices", vec![put(&key, &price)])
            .expect("publish");

        let changed = loop {
            let ev = watch.message().await.unwrap().expect("watch open");
            if let Some(cache::watch_event::Kind::Upsert(i)) = ev.kind {
                break i;
            }
        };
        assert_eq!(changed.key, key);
        assert_eq!(value(&changed.value)["price"]["amount"], 123_456);
        assert!(changed.version > item.version);

        // A reader that knows the view version it needs waits for it with min_version.
        let mut req = get_request("product_page", &key);
        req.options.as_mut().unwrap().min_version = changed.version;
        let after = client.get(req).await.unwrap().into_inner();
        let item = after.item.unwrap();
        assert_eq!(value(&item.value)["price"]["amount"], 123_456);
        assert_eq!(item.version, changed.version);
        assert!(after.source_version >= changed.version);

        // Views are listed as sources, and the Rust view over a view is served like any other.
        let list = client
            .list_sources(cache::ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner();
        for name in ["product_page", "products_by_category", "in_stock"] {
            let s = list.sources.iter().find(|s| s.name == name).unwrap();
            assert_eq!(s.kind, "view");
            assert!(s.synced && s.connected && s.keys > 0, "{s:?}");
        }
        let cat = client
            .get(get_request("products_by_category", "audio"))
            .await
            .unwrap()
            .into_inner()
            .item
            .unwrap();
        assert!(value(&cat.value).as_array().unwrap().len() > 5);
        assert!(sidecar.view_stats("in_stock").is_some());
        sidecar.shutdown().await;
    })
    .await
}

/// `ReadOptions.after`: a view read after `{prices, V}` reflects the price write that returned
/// V, for Get, BatchGet and Scan, 50 times in a row, with no other wait (a view counts versions
/// of its own, so `min_version` cannot say this). The feed runs through a proxy that delays it
/// by 5 ms, so a read that did not wait would find the old price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_reads_a_view_after_the_write_that_fed_it() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        demo::load(&origin.origin, SIZE, 3);
        let proxy = Proxy::start(origin.addr).await;
        let cfg = demo::sidecar_config(proxy.addr, loopback0());
        let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");
        sidecar.synced().await;
        proxy.set_latency(std::time::Duration::from_millis(5));
        let page = source(&sidecar, "product_page");
        let keys: Vec<String> = page
            .keyspace()
            .keys()
            .iter()
            .take(5)
            .map(|k| k.to_string())
            .collect();
        let mut client = cache_client(&sidecar).await;
        let mut writer = origin.feed_client().await;
        let options = |version: u64| cache::ReadOptions {
            wait_ms: 5_000,
            after: vec![cache::SourceVersion {
                source: "prices".into(),
                version,
            }],
            ..Default::default()
        };
        for i in 0..50u64 {
            let key = &keys[i as usize % keys.len()];
            let amount = 1_000 + i;
            let price = json!({"id": key, "amount": amount, "currency": "EUR"}).to_string();
            let v = writer
                .publish(viewcar::pb::feed::v1::PublishRequest {
                    topic: "prices".into(),
                    changes: vec![viewcar::pb::feed::v1::Change {
                        key: key.clone(),
                        value: price.into_bytes().into(),
                        deleted: false,
                    }],
                })
                .await
                .expect("publish")
                .into_inner()
                .position
                .expect("position")
                .version;
            let got = match i % 3 {
                0 => client
                    .get(cache::GetRequest {
                        source: "product_page".into(),
                        key: key.clone(),
                        options: Some(options(v)),
                    })
                    .await
                    .expect("Get")
                    .into_inner()
                    .item
                    .expect("item"),
                1 => client
                    .batch_get(cache::BatchGetRequest {
                        keys: vec![cache::Key {
                            source: "product_page".into(),
                            key: key.clone(),
                        }],
                        options: Some(options(v)),
                    })
                    .await
                    .expect("BatchGet")
                    .into_inner()
                    .items
                    .remove(0),
                _ => client
                    .scan(cache::ScanRequest {
                        source: "product_page".into(),
                        prefix: key.clone(),
                        limit: 1,
                        page_token: String::new(),
                        options: Some(options(v)),
                    })
                    .await
                    .expect("Scan")
                    .into_inner()
                    .items
                    .remove(0),
            };
            assert_eq!(
                value(&got.value)["price"]["amount"],
                amount,
                "cycle {i}: the view row after {{prices, {v}}}"
            );
        }

        // Refusals name what is wrong: an unknown source in `after`, a version never reached.
        let mut req = get_request("product_page", &keys[0]);
        req.options = Some(cache::ReadOptions {
            after: vec![cache::SourceVersion {
                source: "nosuch".into(),
                version: 1,
            }],
            ..Default::default()
        });
        let e = client.get(req.clone()).await.expect_err("unknown source");
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("nosuch"), "{}", e.message());
        req.options = Some(cache::ReadOptions {
            wait_ms: 50,
            after: vec![cache::SourceVersion {
                source: "prices".into(),
                version: u64::MAX,
            }],
            ..Default::default()
        });
        let e = client.get(req).await.expect_err("never reached");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            e.message().contains("'prices'") && e.message().contains("after"),
            "{}",
            e.message()
        );
        sidecar.shutdown().await;
    })
    .await
}

/// The README's Python example through grpcio, a gRPC implementation other than ours, against
/// the real binary (`viewcar demo`: its origin and sidecar, no generated changes): stubs
/// generated from `proto/`, Publish at the origin, then the product page read with `after`,
/// 50 times. Needs Python with grpcio and grpcio-tools (`VIEWCAR_TEST_PYTHON`, as .ci/run sets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_publishes_and_reads_the_view_after_its_write() {
    use std::io::{BufRead, BufReader};
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let run = within(tokio::task::spawn_blocking(move || {
        let mut demo = common::Kill(
            viewcar()
                .args([
                    "demo",
                    "--origin-listen",
                    "127.0.0.1:0",
                    "--grpc-listen",
                    "127.0.0.1:0",
                    "--http-listen",
                    "127.0.0.1:0",
                    "--products",
                    "300",
                    "--rate",
                    "0",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start the demo"),
        );
        let out = demo.0.stdout.take().expect("stdout");
        let (mut origin, mut sidecar) = (None, None);
        let mut lines = BufReader::new(out).lines();
        for line in lines.by_ref() {
            let line = line.expect("demo output");
            if let Some(a) = line.trim().strip_prefix("origin  (Feed API)") {
                origin = Some(a.trim().trim_start_matches("http://").to_string());
            }
            if let Some(a) = line.trim().strip_prefix("sidecar (Cache API)") {
                sidecar = Some(a.trim().to_string());
            }
            if origin.is_some() && sidecar.is_some() {
                break;
            }
        }
        // The demo goes on printing: keep its stdout open and read, or a write to a closed
        // pipe ends it.
        std::thread::spawn(move || lines.for_each(drop));
        let out = tempfile::tempdir().expect("temp dir");
        let root = env!("CARGO_MANIFEST_DIR");
        let args = vec![
            format!("{root}/tests/interop/python_publish_read.py"),
            format!("{root}/proto"),
            out.path().display().to_string(),
            origin.expect("the demo names its origin"),
            sidecar.expect("the demo names its sidecar"),
            "p00042".to_string(),
        ];
        std::process::Command::new(python)
            .args(&args)
            .output()
            .expect("run python")
    }))
    .await
    .expect("join");
    assert!(
        run.status.success() && String::from_utf8_lossy(&run.stdout).contains("ok"),
        "{:?}\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
