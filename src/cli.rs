//! The command line's work, below the argument parsing in `main.rs`: the client commands
//! (`get`, `watch`, `sources`) that read a running sidecar, and running an origin or a sidecar
//! as a process until SIGTERM or SIGINT.

use std::process::ExitCode;

use tokio::net::TcpListener;
use tracing::{error, info};

use crate::pb::cache::v1 as cache;
use crate::{Origin, OriginConfig, Sidecar, SidecarConfig};

/// Exit status for bad command lines and configs (EX_USAGE).
pub const EX_USAGE: u8 = 64;

/// Prints `e` and returns [`EX_USAGE`].
pub fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("viewcar: {e}");
    ExitCode::from(EX_USAGE)
}

/// `viewcar sidecar`: runs until SIGTERM or SIGINT. 0 only when everything drained within the
/// grace period, so that an orchestrator (or a script) can tell a clean stop from a cut-short
/// one; 64 for a config the views refuse.
pub async fn run_sidecar(cfg: SidecarConfig) -> ExitCode {
    match Sidecar::start(cfg).await {
        Ok(sidecar) => {
            if sidecar.run_until(crate::shutdown_signal()).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(crate::StartError::Config(e)) => usage(e),
        Err(e) => {
            error!(error = %e, "sidecar failed to start");
            ExitCode::FAILURE
        }
    }
}

/// `viewcar origin`: serves Feed from `cfg` (already validated) until SIGTERM or SIGINT.
pub async fn run_origin(cfg: OriginConfig) -> ExitCode {
    let listen = cfg.listen;
    let origin = match Origin::with_seed(cfg) {
        Ok(o) => o,
        Err(e @ crate::OpenError::Seed(_)) => return usage(e),
        Err(e) => {
            error!(error = %e, "cannot open the origin's data directory");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(%listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    info!(%addr, epoch = origin.epoch(), "origin serving Feed");
    let served = origin.serve(listener, crate::shutdown_signal()).await;
    origin.close();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "origin server failed");
            ExitCode::FAILURE
        }
    }
}

async fn cache_client(
    addr: &str,
) -> Result<cache::cache_client::CacheClient<tonic::transport::Channel>, ExitCode> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    match cache::cache_client::CacheClient::connect(url).await {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("viewcar: cannot connect to {addr}: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn show_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) => s.to_string(),
        Err(_) => format!("<{} bytes, not UTF-8>", v.len()),
    }
}

pub async fn get(addr: &str, source: String, key: String) -> ExitCode {
    let mut client = match cache_client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = cache::GetRequest {
        source,
        key,
        options: Some(cache::ReadOptions {
            wait_ms: 1000,
            ..Default::default()
        }),
    };
    match client.get(req).await {
        Ok(resp) => {
            let resp = resp.into_inner();
            let item = resp.item.unwrap_or_default();
            if item.found {
                println!("{}", show_value(&item.value));
                eprintln!(
                    "(key version {}, source version {}, staleness {} ms)",
                    item.version, resp.source_version, resp.staleness_ms
                );
                ExitCode::SUCCESS
            } else {
                eprintln!("not found (source version {})", resp.source_version);
                ExitCode::from(1)
            }
        }
        Err(s) => {
            eprintln!("viewcar: {}: {}", s.code(), s.message());
            ExitCode::FAILURE
        }
    }
}

pub async fn watch(addr: &str, source: String, keys: Vec<String>, prefix: String) -> ExitCode {
    let mut client = match cache_client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = cache::WatchRequest {
        source,
        keys,
        prefix,
        send_initial: true,
    };
    let mut stream = match client.watch(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            eprintln!("viewcar: {}: {}", s.code(), s.message());
            return ExitCode::FAILURE;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.kind {
                Some(cache::watch_event::Kind::Upsert(i)) => {
                    println!("upsert {} v{} {}", i.key, i.version, show_value(&i.value))
                }
                Some(cache::watch_event::Kind::Delete(i)) => {
                    println!("delete {} v{}", i.key, i.version)
                }
                Some(cache::watch_event::Kind::Synced(v)) => println!("synced at version {v}"),
                Some(cache::watch_event::Kind::Reset(r)) => println!("reset: {r}"),
                None => {}
            },
            Ok(None) => return ExitCode::SUCCESS,
            Err(s) => {
                eprintln!("viewcar: {}: {}", s.code(), s.message());
                return ExitCode::FAILURE;
            }
        }
    }
}

pub async fn sources(addr: &str) -> ExitCode {
    let mut client = match cache_client(addr).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.list_sources(cache::ListSourcesRequest {}).await {
        Ok(resp) => {
            println!(
                "{:<24} {:<6} {:<9} {:<10} {:>8} {:>10} {:>7} {:>10}",
                "source", "kind", "mode", "origin", "keys", "version", "synced", "stale_ms"
            );
            for s in resp.into_inner().sources {
                println!(
                    "{:<24} {:<6} {:<9} {:<10} {:>8} {:>10} {:>7} {:>10}",
                    s.name, s.kind, s.mode, s.origin, s.keys, s.version, s.synced, s.staleness_ms
                );
            }
            ExitCode::SUCCESS
        }
        Err(s) => {
            eprintln!("viewcar: {}: {}", s.code(), s.message());
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging to stderr: `RUST_LOG` (or `default_filter`), text or JSON. Colours only when
/// stderr is a terminal: a file, a pipe or `kubectl logs` gets plain text.
pub fn init_tracing(json: bool, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
