//! Closed-loop load on a sidecar's Cache `Get`: C concurrent clients, each on its own HTTP/2
//! connection, each issuing one Get after another for D seconds. Prints throughput and latency
//! percentiles.
//!
//! ```sh
//! viewcar demo --grpc-listen 127.0.0.1:7070 &
//! cargo run --release --example get_load -- --addr 127.0.0.1:7070 --clients 16 --seconds 10
//! ```

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use viewcar::pb::cache::v1 as pb;

struct Args {
    addr: String,
    clients: usize,
    seconds: u64,
    source: String,
    keys: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:7070".into(),
        clients: 16,
        seconds: 10,
        source: "products".into(),
        keys: 3000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_default();
        match flag.as_str() {
            "--addr" => a.addr = v,
            "--clients" => a.clients = v.parse().expect("--clients takes a number"),
            "--seconds" => a.seconds = v.parse().expect("--seconds takes a number"),
            "--source" => a.source = v,
            "--keys" => a.keys = v.parse().expect("--keys takes a number"),
            other => {
                panic!("unknown flag {other}; flags: --addr --clients --seconds --source --keys")
            }
        }
    }
    a
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args();
    let url = format!("http://{}", args.addr);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let mut client = pb::cache_client::CacheClient::new(channel);
        let source = args.source.clone();
        let keys = args.keys;
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut i = c * 7919;
            let mut errors = 0u64;
            while Instant::now() < deadline {
                i = (i + 104_729) % keys;
                let req = pb::GetRequest {
                    source: source.clone(),
                    key: format!("p{i:05}"),
                    options: None,
                };
                let t = Instant::now();
                match client.get(req).await {
                    Ok(r) if r.get_ref().item.as_ref().is_some_and(|i| i.found) => {
                        hist.saturating_record(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            (hist, errors)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    let n = all.len();
    println!(
        "clients={} seconds={} requests={} errors={} throughput={:.0}/s p50={}us p90={}us p99={}us p99.9={}us max={}us",
        args.clients,
        args.seconds,
        n,
        errors,
        n as f64 / args.seconds as f64,
        all.value_at_quantile(0.50),
        all.value_at_quantile(0.90),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999),
        all.max()
    );
    Ok(())
}
