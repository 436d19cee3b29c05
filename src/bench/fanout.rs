//! Scenario `fanout`: the product page composed by a tree of services vs read from the sidecar.
//!
//! Both sides serve the same catalog (demo data, same seed) for the same product ids. The tree
//! pays f + f^2 + ... + f^d calls per page; the sidecar one (a `Get` of the `product_page` view,
//! or, on a build whose demo has no such view yet, one `BatchGet` of the page's six keys).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use super::load::{self, Samples, Summary};
use super::procs::{self, OriginHost, Proc, SidecarProc, SidecarSpec};
use super::report::{latency_cells, us, Table};
use super::tree::{self, Catalog};
use super::{BenchError, Ctx};
use crate::demo;
use crate::pb::cache::v1 as pb;
use crate::views::ViewSpec;

type Client = pb::cache_client::CacheClient<Channel>;

/// The demo's product page view, or this declaration when the demo config has none yet.
pub fn product_page_views(origin: std::net::SocketAddr) -> Vec<ViewSpec> {
    let grpc = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let demo = demo::sidecar_config(origin, grpc).views;
    if demo.iter().any(|v| v.name == "product_page") {
        return demo;
    }
    let text = r#"
[[view]]
name = "product_page"
from = "products"
where = "status == 'active'"
[view.include]
price   = { source = "prices",    key = "id" }
stock   = { source = "inventory", key = "sku" }
brand   = { source = "brands",    key = "brand_id" }
country = { source = "countries", key = "brand.country_id" }
reviews = { source = "reviews",   key = "id" }
"#;
    #[derive(serde::Deserialize)]
    struct Views {
        view: Vec<ViewSpec>,
    }
    toml::from_str::<Views>(text).map_or_else(|_| Vec::new(), |v| v.view)
}

/// The demo catalog in an origin, and a sidecar with the product page view following it.
pub struct PageSetup {
    /// Serves the sidecar's feed for as long as the setup lives.
    pub _origin: OriginHost,
    pub sidecar: SidecarProc,
    pub catalog: Arc<Catalog>,
    pub ids: Arc<Vec<String>>,
}

impl PageSetup {
    pub async fn start(ctx: &Ctx, products: usize) -> Result<PageSetup, BenchError> {
        let origin = OriginHost::with_catalog(products).await?;
        let sidecar = SidecarProc::start(
            &ctx.exe,
            SidecarSpec {
                origin: origin.addr,
                topics: &demo::TOPICS,
                views: product_page_views(origin.addr),
                http: true,
                redis: true,
                unix_grpc: false,
                ws_max_connections: None,
            },
            None,
            Duration::from_secs(60),
        )
        .await?;
        let catalog = Arc::new(Catalog::new(products));
        let ids = Arc::new(catalog.active_products());
        Ok(PageSetup {
            _origin: origin,
            sidecar,
            catalog,
            ids,
        })
    }

    /// Where the origin serves the catalog's feed.
    pub fn origin_addr(&self) -> std::net::SocketAddr {
        self._origin.addr
    }

    /// How the sidecar serves the page: "view" or "batch_get".
    pub fn page_mode(&self) -> &'static str {
        if self.sidecar.has_view("product_page") {
            "view"
        } else {
            "batch_get"
        }
    }

    /// One page read from the sidecar: one call either way.
    pub fn page_op(&self, clients: Vec<Client>) -> load::Op {
        let ids = self.ids.clone();
        let catalog = self.catalog.clone();
        let view = self.sidecar.has_view("product_page");
        let clients = Arc::new(clients);
        load::op(move |w, i| {
            let mut c = clients[w % clients.len()].clone();
            let id = ids[(i as usize * 7919) % ids.len()].clone();
            let catalog = catalog.clone();
            async move {
                if view {
                    procs::get_found(&mut c, "product_page", id).await
                } else {
                    let keys = demo::TOPICS
                        .iter()
                        .filter_map(|t| {
                            catalog.key_for(t, &id).map(|key| pb::Key {
                                source: t.to_string(),
                                key,
                            })
                        })
                        .collect();
                    c.batch_get(pb::BatchGetRequest {
                        keys,
                        options: None,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                }
            }
        })
    }
}

/// A running tree process and clients for its level-1 services.
struct TreeProc {
    _proc: Proc,
    roots: Vec<Client>,
    calls: u64,
}

async fn start_tree(
    ctx: &Ctx,
    depth: u32,
    fanout: u32,
    products: usize,
) -> Result<TreeProc, BenchError> {
    let dir = procs::temp_dir("tree")?;
    let a = &ctx.args;
    let args: Vec<String> = [
        "bench",
        "tree",
        "--depth",
        &depth.to_string(),
        "--fanout",
        &fanout.to_string(),
        "--service-us",
        &a.service_us.to_string(),
        "--tail-pct",
        &a.tail_pct.to_string(),
        "--tail-ms",
        &a.tail_ms.to_string(),
        "--products",
        &products.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (proc, stdout) = procs::spawn(&ctx.exe, &args, &dir.join("tree.log"), true)?;
    let stdout = stdout.ok_or_else(|| BenchError::setup("tree: no stdout"))?;
    let line = procs::ready_line(stdout, Duration::from_secs(60))
        .await
        .map_err(|e| BenchError::setup(format!("tree: {e}: {}", proc.log_tail())))?;
    let ports = line
        .strip_prefix("ready ")
        .ok_or_else(|| BenchError::setup(format!("tree: unexpected line {line:?}")))?;
    let mut roots = Vec::new();
    for p in ports.split(',') {
        let ch = Endpoint::from_shared(format!("http://127.0.0.1:{p}"))
            .map_err(|e| BenchError::setup(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| BenchError::setup(format!("tree: {e}")))?;
        roots.push(Client::new(ch));
    }
    Ok(TreeProc {
        _proc: proc,
        roots,
        calls: tree::calls(depth, fanout),
    })
}

/// One page from the tree: the harness plays the page service and calls every level-1 service.
fn tree_op(tree: &TreeProc, ids: Arc<Vec<String>>) -> load::Op {
    let roots = Arc::new(tree.roots.clone());
    load::op(move |_, i| {
        let id = ids[(i as usize * 7919) % ids.len()].clone();
        let all = tree::get_all(&roots, &id);
        async move {
            for r in all.await {
                r.map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    })
}

fn summary_json(s: &Summary, calls: u64, tail_share: f64) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["calls_per_page"] = json!(calls);
    v["share_over_tail"] = json!(tail_share);
    v
}

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let products = if ctx.args.smoke { 200 } else { 3000 };
    let setup = PageSetup::start(ctx, products).await?;
    let conc = ctx.args.concurrency.max(1);
    let rate = ctx.args.rate;
    let tail_ns = ctx.args.tail_ms * 1_000_000;
    let p = (ctx.args.tail_pct / 100.0).clamp(0.0, 1.0);
    let max_depth = if ctx.args.smoke {
        2
    } else {
        ctx.args.depth.max(1)
    };
    let fanout = ctx.args.fanout.max(1);
    let run_for = ctx.run_for(Duration::from_secs(4));
    let warmup = ctx.warmup();
    ctx.report
        .set("fanout", "page_read", json!(setup.page_mode()));
    ctx.report.set(
        "fanout",
        "params",
        json!({"fanout": fanout, "max_depth": max_depth, "concurrency": conc, "rate": rate,
               "service_us": ctx.args.service_us, "tail_pct": ctx.args.tail_pct, "tail_ms": ctx.args.tail_ms,
               "products": products, "run_s": run_for.as_secs_f64()}),
    );
    if setup.page_mode() != "view" {
        ctx.report.note(
            "fanout",
            "this build has no product_page view: the sidecar page is one BatchGet of its 6 keys",
        );
    }

    let mut table = Table::new(
        format!(
            "fanout: product page, tree of fan-out {fanout} (tail {}% x {} ms per hop) vs sidecar, closed loop C={conc} and open loop R={rate}/s",
            ctx.args.tail_pct, ctx.args.tail_ms
        ),
        &[
            "page from", "load", "calls", "throughput", "p50", "p90", "p99", "p99.9", "errors",
        ],
    );
    let clients = setup.sidecar.clients(conc).await?;
    let side_op = setup.page_op(clients);
    ctx.progress(format!("fanout: sidecar, closed loop C={conc}"));
    let side_closed = load::closed_loop(conc, warmup, run_for, side_op.clone()).await;
    ctx.progress(format!("fanout: sidecar, open loop R={rate}/s"));
    let side_open = load::open_loop(rate, warmup, run_for, 2000, side_op.clone()).await;
    for (label, s) in [("closed", &side_closed), ("open", &side_open)] {
        let sum = s.summary(format!("sidecar {label}"));
        let mut row = vec!["sidecar".into(), label.into(), "1".into()];
        row.extend(latency_cells(&sum));
        table.row(row);
        ctx.report.push(
            "fanout",
            &format!("sidecar_{label}"),
            summary_json(&sum, 1, s.share_over(tail_ns)),
        );
    }

    for depth in 1..=max_depth {
        ctx.progress(format!(
            "fanout: tree depth {depth} ({} calls/page), starting",
            tree::calls(depth, fanout)
        ));
        let t = start_tree(ctx, depth, fanout, products).await?;
        let op = tree_op(&t, setup.ids.clone());
        ctx.progress(format!("fanout: tree depth {depth}, closed loop C={conc}"));
        let closed = load::closed_loop(conc, warmup, run_for, op.clone()).await;
        ctx.progress(format!("fanout: tree depth {depth}, open loop R={rate}/s"));
        let open = load::open_loop(rate, warmup, run_for, 2000, op).await;
        for (label, s) in [("closed", &closed), ("open", &open)] {
            let sum = s.summary(format!("tree depth {depth} {label}"));
            let mut row = vec![format!("tree d={depth}"), label.into(), t.calls.to_string()];
            row.extend(latency_cells(&sum));
            table.row(row);
            let mut v = summary_json(&sum, t.calls, s.share_over(tail_ns));
            v["depth"] = json!(depth);
            ctx.report.push("fanout", &format!("tree_{label}"), v);
        }
    }
    ctx.report.add_table(table);
    // Ratios at depth 3 (or the deepest run), measured side by side above.
    let side_tp = side_closed.summary("").throughput;
    let side_p99 = side_closed.summary("").p99_us;
    if let Some(arr) = ctx
        .report
        .get("fanout", "tree_closed")
        .and_then(|v| v.as_array())
    {
        let pick = arr
            .iter()
            .find(|v| v["depth"] == json!(3))
            .or_else(|| arr.last())
            .cloned();
        if let Some(t) = pick {
            let tp = t["throughput"].as_f64().unwrap_or(0.0).max(1e-9);
            let p99 = t["p99_us"].as_f64().unwrap_or(0.0);
            ctx.report.set(
                "fanout",
                "ratio_vs_tree",
                json!({"depth": t["depth"], "throughput_x": side_tp / tp, "tree_p99_us": p99, "sidecar_p99_us": side_p99}),
            );
        }
    }

    tail_sweep(ctx, &setup, fanout, p, tail_ns, products).await?;
    Ok(())
}

/// "The Tail at Scale": the share of pages slower than the tail delay as the page's fan-out n
/// grows, beside 1 - (1 - p)^n; the sidecar's share at the same load for comparison.
async fn tail_sweep(
    ctx: &mut Ctx,
    setup: &PageSetup,
    _fanout: u32,
    p: f64,
    tail_ns: u64,
    products: usize,
) -> Result<(), BenchError> {
    let ns: &[u32] = if ctx.args.smoke {
        &[1, 4]
    } else if ctx.args.quick {
        &[1, 4, 16, 64]
    } else {
        &[1, 2, 4, 8, 16, 32, 64, 100]
    };
    // Low concurrency, so a page is slow because one of its calls was, not because of queueing.
    let conc = 4;
    let run_for = ctx.run_for(Duration::from_secs(8));
    let warmup = ctx.warmup();
    let mut table = Table::new(
        format!(
            "fanout: share of pages slower than the tail delay ({} ms), depth 1, fan-out n, closed loop C={conc}",
            ctx.args.tail_ms
        ),
        &["n (calls)", "predicted 1-(1-p)^n", "tree measured", "tree p50", "tree p99", "sidecar measured", "sidecar p99"],
    );
    let clients = setup.sidecar.clients(conc).await?;
    let side_op = setup.page_op(clients);
    for &n in ns {
        ctx.progress(format!("fanout: tail sweep, n = {n}"));
        let t = start_tree(ctx, 1, n, products).await?;
        let tree_s: Samples =
            load::closed_loop(conc, warmup, run_for, tree_op(&t, setup.ids.clone())).await;
        drop(t);
        let side_s = load::closed_loop(conc, warmup, run_for / 4, side_op.clone()).await;
        let predicted = 1.0 - (1.0 - p).powi(n as i32);
        let tree_share = tree_s.share_over(tail_ns);
        let side_share = side_s.share_over(tail_ns);
        let ts = tree_s.summary("");
        let ss = side_s.summary("");
        table.row(vec![
            n.to_string(),
            format!("{:.1}%", predicted * 100.0),
            format!("{:.1}%", tree_share * 100.0),
            us(ts.p50_us),
            us(ts.p99_us),
            format!("{:.2}%", side_share * 100.0),
            us(ss.p99_us),
        ]);
        ctx.report.push(
            "fanout",
            "tail_sweep",
            json!({"n": n, "predicted": predicted, "tree_share": tree_share, "tree_pages": ts.requests,
                   "tree_p50_us": ts.p50_us, "tree_p99_us": ts.p99_us,
                   "sidecar_share": side_share, "sidecar_pages": ss.requests, "sidecar_p99_us": ss.p99_us}),
        );
    }
    ctx.report.add_table(table);
    Ok(())
}
