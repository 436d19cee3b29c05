//! The command line's work, below the argument parsing in `main.rs`: the client commands
//! (`get`, `watch`, `sources`) that read a running sidecar, and running an origin or a sidecar
//! as a process until SIGTERM or SIGINT.

use std::process::ExitCode;

use tonic::transport::Channel;
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

/// An origin.toml rather than a viewcar.toml: it has a `[postgres]` section (a sidecar config
/// never does), so `viewcar check` validates it as the origin's.
pub fn is_origin_config(path: &std::path::Path) -> bool {
    // Read as config files are (a regular file, bounded), so that /dev/zero or a FIFO is
    // refused by the loader instead of read here without end.
    crate::config::read(path)
        .ok()
        .and_then(|(_, t)| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("postgres"))
}

/// `viewcar sidecar`: runs until SIGTERM or SIGINT. 0 only when everything drained within the
/// grace period, so that an orchestrator (or a script) can tell a clean stop from a cut-short
/// one; 64 for a config the views refuse.
pub async fn run_sidecar(cfg: SidecarConfig) -> ExitCode {
    // Installed before the sidecar says it started (see `shutdown_signal`).
    let signal = crate::shutdown_signal();
    match Sidecar::start(cfg).await {
        Ok(sidecar) => {
            if sidecar.run_until(signal).await {
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
    // With [postgres] the origin takes its epoch from the database and its topics from the
    // tables; the source is held (and follows the database) for as long as the origin serves.
    let mut source = None;
    let origin = if cfg.postgres.is_some() {
        match crate::origin::postgres::PgOrigin::start(cfg).await {
            Ok(pg) => {
                let origin = pg.origin().clone();
                source = Some(pg);
                origin
            }
            Err(e) => return usage(e),
        }
    } else {
        match Origin::with_seed(cfg) {
            Ok(o) => o,
            Err(e @ crate::OpenError::Seed(_)) => return usage(e),
            Err(e) => {
                error!(error = %e, "cannot open the origin's data directory");
                return ExitCode::FAILURE;
            }
        }
    };
    let listener = match crate::accept::bind_tcp(listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(%listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    let signal = crate::shutdown_signal();
    info!(%addr, epoch = origin.epoch(), "origin serving Feed");
    let served = origin.serve(listener, signal).await;
    drop(source);
    origin.close();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "origin server failed");
            ExitCode::FAILURE
        }
    }
}

/// A command's outcome: `Err` carries the exit code of a failure already reported.
type Outcome = Result<ExitCode, ExitCode>;

/// A gRPC channel to `addr`: `host:port`, `http://host:port` (or `https://`), or
/// `unix:/path` for a Cache API on a Unix socket. It connects at once, so an address where
/// nothing listens is an error here rather than at the first call.
pub async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = std::path::PathBuf::from(path);
        // The URI is not dialled: the connector opens the socket; it only names the authority
        // of the HTTP/2 requests.
        return tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let io = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                }
            }))
            .await;
    }
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await
}

async fn cache_client(addr: &str) -> Result<cache::cache_client::CacheClient<Channel>, ExitCode> {
    channel(addr)
        .await
        .map(cache::cache_client::CacheClient::new)
        .map_err(|e| {
            eprintln!("viewcar: cannot connect to {addr}: {e}");
            ExitCode::FAILURE
        })
}

/// `viewcar check --probe`: each origin address and topic, reachable and served or why not.
/// Exit 69 (EX_UNAVAILABLE) when anything is not.
pub async fn probe(cfg: &crate::SidecarConfig) -> ExitCode {
    println!("probe:");
    let findings = crate::feed::probe::probe(cfg).await;
    let mut bad = 0;
    for f in &findings {
        let what = match &f.topic {
            Some(t) => format!("origin {} ({}) topic {t}", f.origin, f.address),
            None => format!("origin {} ({})", f.origin, f.address),
        };
        match &f.problem {
            None => println!("  ok    {what}"),
            Some(p) => {
                bad += 1;
                println!("  FAIL  {what}: {p}");
            }
        }
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("viewcar: {bad} probe(s) failed");
        ExitCode::from(69)
    }
}

/// Prints what the sidecar refused and returns failure.
fn failed(s: tonic::Status) -> ExitCode {
    eprintln!("viewcar: {}: {}", s.code(), s.message());
    ExitCode::FAILURE
}

fn show_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) => s.to_string(),
        Err(_) => format!("<{} bytes, not UTF-8>", v.len()),
    }
}

/// `viewcar get`: one key, waiting up to a second for the source to sync.
pub async fn get(addr: &str, source: String, key: String) -> ExitCode {
    let req = cache::GetRequest {
        source,
        key,
        options: Some(cache::ReadOptions {
            wait_ms: 1000,
            ..Default::default()
        }),
    };
    let run = async {
        let resp = cache_client(addr)
            .await?
            .get(req)
            .await
            .map_err(failed)?
            .into_inner();
        let item = resp.item.unwrap_or_default();
        if !item.found {
            eprintln!("not found (source version {})", resp.source_version);
            return Ok(ExitCode::from(1));
        }
        println!("{}", show_value(&item.value));
        eprintln!(
            "(key version {}, source version {}, staleness {} ms)",
            item.version, resp.source_version, resp.staleness_ms
        );
        Outcome::Ok(ExitCode::SUCCESS)
    };
    run.await.unwrap_or_else(|code| code)
}

/// `viewcar watch`: every change of the keys (or the prefix), until the stream ends.
pub async fn watch(addr: &str, source: String, keys: Vec<String>, prefix: String) -> ExitCode {
    let req = cache::WatchRequest {
        source,
        keys,
        prefix,
        send_initial: true,
    };
    let run = async {
        let mut stream = cache_client(addr)
            .await?
            .watch(req)
            .await
            .map_err(failed)?
            .into_inner();
        while let Some(ev) = stream.message().await.map_err(failed)? {
            match ev.kind {
                Some(cache::watch_event::Kind::Upsert(i)) => {
                    println!("upsert {} v{} {}", i.key, i.version, show_value(&i.value))
                }
                Some(cache::watch_event::Kind::Delete(i)) => {
                    println!("delete {} v{}", i.key, i.version)
                }
                Some(cache::watch_event::Kind::Synced(v)) => println!("synced at version {v}"),
                Some(cache::watch_event::Kind::Reset(r)) => println!("reset: {r}"),
                None => {}
            }
        }
        Outcome::Ok(ExitCode::SUCCESS)
    };
    run.await.unwrap_or_else(|code| code)
}

/// `viewcar sources`: every source of the sidecar with its state.
pub async fn sources(addr: &str) -> ExitCode {
    let run = async {
        let resp = cache_client(addr)
            .await?
            .list_sources(cache::ListSourcesRequest {})
            .await
            .map_err(failed)?;
        println!(
            "{:<24} {:<6} {:<9} {:<10} {:>8} {:>10} {:>7} {:>9} {:>10} {:>8} {:>10}  last_error",
            "source",
            "kind",
            "mode",
            "origin",
            "keys",
            "version",
            "synced",
            "connected",
            "stale_ms",
            "lag_ms",
            "copied",
        );
        for s in resp.into_inner().sources {
            println!(
                "{:<24} {:<6} {:<9} {:<10} {:>8} {:>10} {:>7} {:>9} {:>10} {:>8} {:>10}  {}",
                s.name,
                s.kind,
                s.mode,
                s.origin,
                s.keys,
                s.version,
                s.synced,
                s.connected,
                s.staleness_ms,
                s.upstream_lag_ms,
                s.upstream_copied_rows,
                if s.last_error.is_empty() {
                    "-"
                } else {
                    &s.last_error
                }
            );
        }
        Outcome::Ok(ExitCode::SUCCESS)
    };
    run.await.unwrap_or_else(|code| code)
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
