//! The fan-out tree: what a product page costs without the sidecar.
//!
//! `viewcar bench tree --depth d --fanout f` serves f^1 + ... + f^d tonic services, each on its
//! own loopback port (distinct services, as in a real call graph). The harness plays the page
//! service and calls the f services of level 1; each service at level l < d calls its f services
//! at level l + 1 in parallel, waits for all, and answers with its own part of the page (a row
//! of one catalog topic for the product) and its dependencies' parts. Each hop sleeps its
//! service time, and with probability p sleeps the tail delay D on top.
//!
//! The nodes speak the Cache API's `Get` (source = the node's topic, key = the product id), so
//! the tree and the sidecar use the same messages and encoding: only the number of calls differs.
//!
//! The process prints `ready <port>,<port>,...` (the level-1 ports) on stdout and serves until its
//! stdin closes, so it never outlives the harness.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::JoinAll;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use super::{BenchArgs, BenchError};
use crate::demo::{self, CatalogSize};
use crate::pb::cache::v1 as pb;
use crate::pb::cache::v1::cache_server::{Cache, CacheServer};

/// The catalog, with the page's lookups resolved per product id.
pub struct Catalog {
    rows: HashMap<&'static str, HashMap<String, Bytes>>,
    /// product id -> (sku, brand id, country code)
    refs: HashMap<String, (String, String, String)>,
}

impl Catalog {
    pub fn new(products: usize) -> Catalog {
        let size = CatalogSize {
            products,
            ..CatalogSize::default()
        };
        let mut rows: HashMap<&'static str, HashMap<String, Bytes>> = HashMap::new();
        for (topic, puts) in demo::catalog(size, 1) {
            let m = rows.entry(topic).or_default();
            for p in puts {
                if let Some(v) = p.value {
                    m.insert(p.key, v);
                }
            }
        }
        let field = |topic: &str, key: &str, f: &str| -> String {
            rows.get(topic)
                .and_then(|m| m.get(key))
                .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                .and_then(|v| v.get(f).and_then(|x| x.as_str().map(str::to_string)))
                .unwrap_or_default()
        };
        let mut refs = HashMap::new();
        if let Some(products) = rows.get("products") {
            for id in products.keys() {
                let sku = field("products", id, "sku");
                let brand = field("products", id, "brand_id");
                let country = field("brands", &brand, "country_id");
                refs.insert(id.clone(), (sku, brand, country));
            }
        }
        Catalog { rows, refs }
    }

    /// The key of `topic` that the page of product `id` reads.
    pub fn key_for(&self, topic: &str, id: &str) -> Option<String> {
        let (sku, brand, country) = self.refs.get(id)?;
        Some(match topic {
            "inventory" => sku.clone(),
            "brands" => brand.clone(),
            "countries" => country.clone(),
            _ => id.to_string(),
        })
    }

    /// The row of `topic` that the page of product `id` reads, if any.
    pub fn part(&self, topic: &str, id: &str) -> Option<Bytes> {
        let key = self.key_for(topic, id)?;
        self.rows.get(topic)?.get(&key).cloned()
    }

    /// Product ids whose status is active (the rows a product page view keeps).
    pub fn active_products(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .rows
            .get("products")
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| {
                        serde_json::from_slice::<serde_json::Value>(v)
                            .ok()
                            .is_some_and(|v| {
                                v.get("status").and_then(|s| s.as_str()) == Some("active")
                            })
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Calls made per page by a tree of this shape: f + f^2 + ... + f^d.
pub fn calls(depth: u32, fanout: u32) -> u64 {
    (1..=depth).map(|l| u64::from(fanout).pow(l)).sum()
}

/// How each hop behaves.
#[derive(Clone, Copy)]
pub struct Hop {
    pub service: Duration,
    pub tail_p: f64,
    pub tail: Duration,
}

struct Node {
    topic: &'static str,
    catalog: Arc<Catalog>,
    children: Vec<pb::cache_client::CacheClient<Channel>>,
    hop: Hop,
}

#[tonic::async_trait]
impl Cache for Node {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let id = request.into_inner().key;
        if self.hop.tail_p > 0.0 && rand::random::<f64>() < self.hop.tail_p {
            tokio::time::sleep(self.hop.tail).await;
        }
        if !self.hop.service.is_zero() {
            tokio::time::sleep(self.hop.service).await;
        }
        let deps = get_all(&self.children, &id).await;
        let own = self.catalog.part(self.topic, &id);
        // {"<topic>": <row or null>, "deps": [<dependency parts>]}
        let mut body = BytesMut::with_capacity(256);
        body.put_slice(b"{\"");
        body.put_slice(self.topic.as_bytes());
        body.put_slice(b"\":");
        body.put_slice(own.as_deref().unwrap_or(b"null"));
        body.put_slice(b",\"deps\":[");
        for (i, d) in deps.into_iter().enumerate() {
            let d = d?.into_inner();
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(d.item.as_ref().map_or(&b"null"[..], |it| &it.value[..]));
        }
        body.put_slice(b"]}");
        Ok(Response::new(pb::GetResponse {
            item: Some(pb::Item {
                source: self.topic.to_string(),
                key: id,
                found: true,
                value: body.freeze(),
                version: 1,
            }),
            source_version: 1,
            staleness_ms: 0,
        }))
    }

    async fn batch_get(
        &self,
        _: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        Err(Status::unimplemented("tree nodes serve Get only"))
    }

    async fn scan(
        &self,
        _: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        Err(Status::unimplemented("tree nodes serve Get only"))
    }

    type WatchStream = tokio_stream::Empty<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("tree nodes serve Get only"))
    }

    async fn list_sources(
        &self,
        _: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        Err(Status::unimplemented("tree nodes serve Get only"))
    }
}

async fn bind_node(node: Node) -> Result<SocketAddr, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself, so the incoming
    // stream sets it: without it, Nagle plus delayed ACKs hold multi-frame replies ~40 ms.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(CacheServer::new(node))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(addr)
}

/// `Get(id)` to every service of `services` at once: what the page does with level 1, and
/// every service of the tree with the level below it.
pub fn get_all(
    services: &[pb::cache_client::CacheClient<Channel>],
    id: &str,
) -> JoinAll<impl Future<Output = Result<Response<pb::GetResponse>, Status>>> {
    futures_util::future::join_all(services.iter().map(|c| {
        let mut c = c.clone();
        let req = pb::GetRequest {
            source: String::new(),
            key: id.to_string(),
            options: None,
        };
        async move { c.get(req).await }
    }))
}

fn client(addr: SocketAddr) -> Result<pb::cache_client::CacheClient<Channel>, BenchError> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| BenchError::setup(e.to_string()))?
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(pb::cache_client::CacheClient::new(ch))
}

/// Builds the subtree rooted at a node of `level` (1-based) and returns the node's address.
fn build(
    level: u32,
    index: usize,
    depth: u32,
    fanout: u32,
    catalog: Arc<Catalog>,
    hop: Hop,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<SocketAddr, BenchError>> + Send>> {
    Box::pin(async move {
        let mut children = Vec::new();
        if level < depth {
            for c in 0..fanout as usize {
                let addr = build(
                    level + 1,
                    index * fanout as usize + c,
                    depth,
                    fanout,
                    catalog.clone(),
                    hop,
                )
                .await?;
                children.push(client(addr)?);
            }
        }
        let topic = demo::TOPICS[(level as usize + index) % demo::TOPICS.len()];
        bind_node(Node {
            topic,
            catalog,
            children,
            hop,
        })
        .await
    })
}

/// Serves a tree as described by `args` until stdin closes.
pub async fn serve(args: &BenchArgs) -> Result<(), BenchError> {
    let catalog = Arc::new(Catalog::new(args.products));
    let hop = Hop {
        service: Duration::from_micros(args.service_us),
        tail_p: (args.tail_pct / 100.0).clamp(0.0, 1.0),
        tail: Duration::from_millis(args.tail_ms),
    };
    let mut roots = Vec::new();
    for i in 0..args.fanout.max(1) as usize {
        roots.push(
            build(
                1,
                i,
                args.depth.max(1),
                args.fanout.max(1),
                catalog.clone(),
                hop,
            )
            .await?
            .port()
            .to_string(),
        );
    }
    println!("ready {}", roots.join(","));
    // Serve until the harness closes our stdin (or dies).
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .map_err(|e| BenchError::setup(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_match_the_design_example() {
        assert_eq!(calls(3, 3), 39);
        assert_eq!(calls(1, 5), 5);
    }

    #[test]
    fn catalog_resolves_every_page_part() {
        let c = Catalog::new(50);
        let id = &c.active_products()[0];
        for t in demo::TOPICS {
            if t != "reviews" {
                assert!(c.part(t, id).is_some(), "{t} for {id}");
            }
        }
    }
}
