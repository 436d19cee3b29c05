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
