//! The demo: an embedded origin serving a realistic product catalog with a change generator,
//! and a sidecar subscribed to it. `viewcar demo` (or a bare `viewcar`) runs it.
//!
//! The catalog is what a product page fans out to: products, their prices, inventory (by SKU),
//! brands, the brands' countries, and review summaries. Data is deterministic for a given seed,
//! so tests and benchmarks can rely on its shape.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{OriginConfig, OriginSpec, SidecarConfig, TopicSpec};
use crate::origin::{Origin, Put};
use crate::views::ViewSpec;

/// The demo's topics, in the order a product page reads them.
pub const TOPICS: [&str; 6] = [
    "products",
    "prices",
    "inventory",
    "brands",
    "countries",
    "reviews",
];

/// The shape of the generated catalog.
#[derive(Debug, Clone, Copy)]
pub struct CatalogSize {
    pub products: usize,
    pub brands: usize,
}

impl Default for CatalogSize {
    fn default() -> Self {
        CatalogSize {
            products: 3000,
            brands: 120,
        }
    }
}

const COUNTRIES: [(&str, &str, &str); 16] = [
    ("DE", "Germany", "EUR"),
    ("FR", "France", "EUR"),
    ("IT", "Italy", "EUR"),
    ("ES", "Spain", "EUR"),
    ("NL", "Netherlands", "EUR"),
    ("SE", "Sweden", "SEK"),
    ("DK", "Denmark", "DKK"),
    ("PL", "Poland", "PLN"),
    ("GB", "United Kingdom", "GBP"),
    ("US", "United States", "USD"),
    ("CA", "Canada", "CAD"),
    ("JP", "Japan", "JPY"),
    ("KR", "South Korea", "KRW"),
    ("CN", "China", "CNY"),
    ("BR", "Brazil", "BRL"),
    ("AU", "Australia", "AUD"),
];

const CATEGORIES: [&str; 12] = [
    "audio", "cameras", "phones", "laptops", "kitchen", "garden", "toys", "books", "sports",
    "fashion", "beauty", "tools",
];

const WORDS: [&str; 16] = [
    "Nova", "Vector", "Aero", "Pulse", "Terra", "Lumen", "Orbit", "Quartz", "Echo", "Summit",
    "Drift", "Falcon", "Harbor", "Cobalt", "Ember", "Zephyr",
];

pub fn product_id(i: usize) -> String {
    format!("p{i:05}")
}

pub fn sku(i: usize) -> String {
    format!("SKU-{i:05}")
}

pub fn brand_id(i: usize) -> String {
    format!("b{i:03}")
}

fn json_bytes(v: serde_json::Value) -> Bytes {
    Bytes::from(v.to_string())
}

/// The whole catalog as one batch of puts per topic.
pub fn catalog(size: CatalogSize, seed: u64) -> Vec<(&'static str, Vec<Put>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let countries = COUNTRIES
        .iter()
        .enumerate()
        .map(|(i, (code, name, currency))| {
            Put::upsert(
                *code,
                json_bytes(
                    json!({"id": code, "name": name, "currency": currency, "vat": 5 + (i % 4) * 5}),
                ),
            )
        })
        .collect();
    let brands = (0..size.brands)
        .map(|i| {
            let country = COUNTRIES[i % COUNTRIES.len()].0;
            Put::upsert(
                brand_id(i),
                json_bytes(json!({
                    "id": brand_id(i),
                    "name": format!("{} {}", WORDS[i % WORDS.len()], WORDS[(i / WORDS.len()) % WORDS.len()]),
                    "country_id": country,
                })),
            )
        })
        .collect();
    let mut products = Vec::with_capacity(size.products);
    let mut prices = Vec::with_capacity(size.products);
    let mut inventory = Vec::with_capacity(size.products);
    let mut reviews = Vec::with_capacity(size.products);
    for i in 0..size.products {
        let id = product_id(i);
        let brand = rng.random_range(0..size.brands.max(1));
        let status = if rng.random_ratio(1, 10) {
            "discontinued"
        } else {
            "active"
        };
        products.push(Put::upsert(
            id.clone(),
            json_bytes(json!({
                "id": id,
                "sku": sku(i),
                "name": format!("{} {} {}", WORDS[rng.random_range(0..WORDS.len())], CATEGORIES[i % CATEGORIES.len()], i),
                "brand_id": brand_id(brand),
                "category": CATEGORIES[i % CATEGORIES.len()],
                "status": status,
            })),
        ));
        prices.push(Put::upsert(
            id.clone(),
            json_bytes(
                json!({"id": id, "amount": rng.random_range(199..99_999), "currency": "EUR"}),
            ),
        ));
        inventory.push(Put::upsert(
            sku(i),
            json_bytes(json!({"sku": sku(i), "available": rng.random_range(0..500), "warehouse": format!("wh-{}", i % 4)})),
        ));
        if rng.random_ratio(4, 5) {
            let count: u32 = rng.random_range(1..2000);
            reviews.push(Put::upsert(
                id.clone(),
                json_bytes(json!({"product_id": id, "count": count, "average": rng.random_range(10..50) as f64 / 10.0})),
            ));
        }
    }
    vec![
        ("products", products),
        ("prices", prices),
        ("inventory", inventory),
        ("brands", brands),
        ("countries", countries),
        ("reviews", reviews),
    ]
}

/// Loads the catalog into `origin` (one version per topic).
pub fn load(origin: &Origin, size: CatalogSize, seed: u64) {
    for (topic, puts) in catalog(size, seed) {
        if let Err(e) = origin.publish_inner(topic, puts, false) {
            warn!(topic, error = %e, "demo catalog load failed");
        }
    }
}

/// One generated change: which topic, and the puts of its batch.
pub fn random_change(rng: &mut StdRng, size: CatalogSize) -> (&'static str, Vec<Put>) {
    let i = rng.random_range(0..size.products);
    let id = product_id(i);
    match rng.random_range(0..100) {
        0..60 => (
            "prices",
            vec![Put::upsert(
                id.clone(),
                json_bytes(
                    json!({"id": id, "amount": rng.random_range(199..99_999), "currency": "EUR"}),
                ),
            )],
        ),
        60..90 => (
            "inventory",
            vec![Put::upsert(
                sku(i),
                json_bytes(
                    json!({"sku": sku(i), "available": rng.random_range(0..500), "warehouse": format!("wh-{}", i % 4)}),
                ),
            )],
        ),
        90..98 => (
            "reviews",
            vec![Put::upsert(
                id.clone(),
                json_bytes(
                    json!({"product_id": id, "count": rng.random_range(1..2000), "average": rng.random_range(10..50) as f64 / 10.0}),
                ),
            )],
        ),
        98 => {
            let b = rng.random_range(0..size.brands.max(1));
            let country = COUNTRIES[rng.random_range(0..COUNTRIES.len())].0;
            (
                "brands",
                vec![Put::upsert(
                    brand_id(b),
                    json_bytes(
                        json!({"id": brand_id(b), "name": format!("{} {}", WORDS[b % WORDS.len()], WORDS[rng.random_range(0..WORDS.len())]), "country_id": country}),
                    ),
                )],
            )
        }
        _ => {
            let status = if rng.random_bool(0.5) {
                "active"
            } else {
                "discontinued"
            };
            (
                "products",
                vec![Put::upsert(
                    id.clone(),
                    json_bytes(json!({
                        "id": id, "sku": sku(i), "name": format!("{} {} {}", WORDS[i % WORDS.len()], CATEGORIES[i % CATEGORIES.len()], i),
                        "brand_id": brand_id(i % size.brands.max(1)), "category": CATEGORIES[i % CATEGORIES.len()], "status": status,
                    })),
                )],
            )
        }
    }
}

/// Publishes random catalog changes at `rate` per second until `stop` flips.
pub async fn generate(
    origin: Origin,
    size: CatalogSize,
    rate: u32,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    if rate == 0 {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    // Ticks of at least 10 ms; several changes per tick at high rates.
    let per_tick = (rate / 100).max(1);
    let tick = Duration::from_secs_f64(f64::from(per_tick) / f64::from(rate));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = crate::signalled(&mut stop) => return,
        }
        for _ in 0..per_tick {
            let (topic, puts) = random_change(&mut rng, size);
            if let Err(e) = origin.publish(topic, puts) {
                warn!(topic, error = %e, "demo change refused");
            }
        }
    }
}

/// The origin config the demo uses: the catalog's topics, declared.
pub fn origin_config(listen: SocketAddr) -> OriginConfig {
    OriginConfig {
        listen,
        topics: TOPICS.iter().map(|t| t.to_string()).collect(),
        ..OriginConfig::default()
    }
}

/// The demo's views: what a product page and a category page read, each in one call.
///
/// `product_page` collapses the fan-out tree of a product page (product -> price, stock,
/// brand -> country, reviews) into one row per active product; `products_by_category` is an
/// index: one row per category listing its products.
pub fn views() -> Vec<ViewSpec> {
    vec![
        ViewSpec::new("product_page", "products")
            .filter("status == 'active'")
            .include("price", "prices", "id")
            .include("stock", "inventory", "sku")
            .include("brand", "brands", "brand_id")
            .include("country", "countries", "brand.country_id")
            .include("reviews", "reviews", "id"),
        ViewSpec::new("products_by_category", "products")
            .group_by("category")
            .select(["id", "name", "brand_id", "status"]),
    ]
}

/// The sidecar config the demo uses: every catalog topic as a full replica, and the demo views.
pub fn sidecar_config(origin: SocketAddr, grpc: SocketAddr) -> SidecarConfig {
    let mut cfg = SidecarConfig::default();
    cfg.listen.grpc = grpc.into();
    cfg.origins.push(OriginSpec {
        name: "catalog".into(),
        address: format!("http://{origin}"),
        fallback: Vec::new(),
        topics: TOPICS
            .iter()
            .map(|t| TopicSpec {
                name: t.to_string(),
                mode: crate::types::Mode::Full,
                max_bytes: None,
                idle: None,
            })
            .collect(),
        tls: None,
    });
    cfg.views = views();
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_deterministic_and_consistent() {
        let size = CatalogSize::default();
        let a = catalog(size, 7);
        let b = catalog(size, 7);
        assert_eq!(a, b);
        let products = &a[0].1;
        assert_eq!(products.len(), size.products);
        let brands: std::collections::HashSet<_> = a[3].1.iter().map(|p| p.key.clone()).collect();
        for p in products {
            let v: serde_json::Value = serde_json::from_slice(p.value.as_ref().unwrap()).unwrap();
            assert!(brands.contains(v["brand_id"].as_str().unwrap()));
        }
    }
}

/// Binds `addr`, or any free port of its host when `addr` is taken.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match crate::accept::bind_tcp(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            info!(%addr, "address in use; taking any free port");
            crate::accept::bind_tcp(SocketAddr::new(addr.ip(), 0)).await
        }
        Err(e) => Err(e),
    }
}

/// Where and how fast `viewcar demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the embedded origin serves Feed (port 0 = any free port).
    pub origin_listen: SocketAddr,
    /// Where the sidecar serves the Cache API (port 0 = any free port).
    pub grpc_listen: SocketAddr,
    /// Where the sidecar serves WebSocket `/ws` (port 0 = any free port).
    pub http_listen: SocketAddr,
    /// Catalog changes published per second.
    pub rate: u32,
    /// Products in the catalog.
    pub products: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            origin_listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            rate: 50,
            products: 3000,
        }
    }
}

/// `viewcar demo`: an embedded origin with the demo catalog and a change generator, and a
/// sidecar subscribed to it; prints the addresses and ways to read, runs until SIGTERM or
/// SIGINT.
pub async fn run(args: DemoOptions) -> ExitCode {
    let origin_listener = match bind(args.origin_listen).await {
        Ok(l) => l,
        Err(e) => {
            return crate::cli::usage(format!("cannot listen on {}: {e}", args.origin_listen))
        }
    };
    let origin_addr = match origin_listener.local_addr() {
        Ok(a) => a,
        Err(e) => return crate::cli::usage(e),
    };
    let origin = Origin::new(origin_config(origin_addr));
    let size = CatalogSize {
        products: args.products.max(1),
        ..CatalogSize::default()
    };
    load(&origin, size, 1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = {
        let origin = origin.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _ = origin
                .serve(origin_listener, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        })
    };
    let grpc = match bind(args.grpc_listen).await.and_then(|l| l.local_addr()) {
        Ok(a) => a,
        Err(e) => return crate::cli::usage(format!("cannot listen on {}: {e}", args.grpc_listen)),
    };
    let http = match bind(args.http_listen).await.and_then(|l| l.local_addr()) {
        Ok(a) => a,
        Err(e) => return crate::cli::usage(format!("cannot listen on {}: {e}", args.http_listen)),
    };
    let mut cfg = sidecar_config(origin_addr, grpc);
    cfg.listen.http = Some(http);
    // SIGTERM and Ctrl-C are handled from before the sidecar serves anything: its Cache API
    // answers (sources listed as synced, say) before the banner is written, and a signal
    // sent then is a shutdown, not the default kill.
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    let sidecar = match crate::Sidecar::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "sidecar failed to start");
            return ExitCode::FAILURE;
        }
    };
    let stopped = tokio::select! {
        _ = sidecar.synced() => false,
        _ = &mut stop => true,
    };
    let generator = tokio::spawn(generate(origin.clone(), size, args.rate, 2, stop_rx));
    if !stopped {
        banner(&sidecar, origin_addr, args.rate);
        stop.await;
    }
    stop_tx.send_replace(true);
    let _ = generator.await;
    let drained = sidecar.shutdown().await;
    let _ = serving.await;
    if drained {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What the demo prints once it is up: where to connect and what to try. One write, and a
/// closed stdout (`viewcar demo | head`) is not an error: the demo goes on serving whoever
/// reads it over the network.
fn banner(sidecar: &crate::Sidecar, origin_addr: SocketAddr, rate: u32) {
    let g = sidecar.grpc_addr();
    let mut out = String::new();
    {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "viewcar demo is running ({} catalog changes/s). Ctrl-C stops it.",
            rate
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  origin  (Feed API)   http://{origin_addr}");
        let _ = writeln!(out, "  sidecar (Cache API)  {g}");
        let _ = writeln!(
            out,
            "  sidecar (WebSocket)  ws://{}/ws",
            sidecar.http_addr()
        );
        let _ = writeln!(
            out,
            "  status page          http://{}/",
            sidecar.http_addr()
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "Sources:");
        for s in sidecar.store().sources() {
            let _ = writeln!(
                out,
                "  {:<22} {:>6} keys  version {}",
                s.name(),
                s.len(),
                s.version()
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Read a key (in another terminal):");
        let _ = writeln!(
            out,
            "  viewcar get product_page p00042 --addr {g}   # the whole product page, one read"
        );
        let _ = writeln!(out, "  viewcar get products p00042 --addr {g}");
        let _ = writeln!(out, "  viewcar watch prices p00042 p00043 --addr {g}");
        let _ = writeln!(out, "  viewcar sources --addr {g}");
        // The sidecar serves gRPC reflection: grpcurl needs no proto files, so this works with a
        // prebuilt binary as well as from a checkout.
        let _ = writeln!(
            out,
            "  grpcurl -plaintext -d '{{\"source\":\"products\",\"key\":\"p00042\"}}' {g} viewcar.cache.v1.Cache/Get"
        );
        let _ = writeln!(
            out,
            "Subscribe over WebSocket (any client, e.g. websocat), then send the line below:"
        );
        let _ = writeln!(out, "  websocat ws://{}/ws", sidecar.http_addr());
        let _ = writeln!(
            out,
            "  {{\"op\":\"subscribe\",\"id\":\"s1\",\"source\":\"prices\",\"keys\":[\"p00042\",\"p00043\"]}}"
        );
        let _ = writeln!(
            out,
            "  (from a source checkout: cargo run --example ws_subscriber -- ws://{}/ws prices p00042 p00043)",
            sidecar.http_addr()
        );
    }
    // One write, and a closed stdout (`viewcar demo | head`) is not an error: the demo goes on
    // serving whoever reads it over the network.
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush());
    }
}
