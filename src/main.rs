//! The `viewcar` command: parses arguments, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tracing::{error, info};
use viewcar::config::Dur;
use viewcar::pb::cache::v1 as cache;
use viewcar::{demo, ConfigError, Origin, OriginConfig, Sidecar, SidecarConfig};

/// Exit status for bad command lines and configs (EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "viewcar",
    version,
    about = "A cache sidecar that ends IO explosion: one push subscription, precomputed views, localhost reads"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "VIEWCAR_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Embedded origin with a demo catalog and change generator, plus a sidecar subscribed to it.
    Demo(DemoArgs),
    /// Serve viewcar's own origin (the Feed API).
    Origin(OriginArgs),
    /// Run the sidecar.
    ///
    /// Settings come from the config file; the flags below (or their environment variables)
    /// override it, a flag winning over its variable. The address of an `[[origin]]` can also be
    /// set by `VIEWCAR_ORIGIN_<NAME>_ADDRESS`: the origin's name upper-cased, `-` and `.` written
    /// as `_` (origin `catalog-eu` -> `VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS`); one naming no origin
    /// is an error.
    #[command(after_help = SIDECAR_AFTER_HELP)]
    Sidecar(SidecarArgs),
    /// Validate a sidecar config (with the same overrides as `sidecar`) and print its sources;
    /// exit 0 or 64.
    Check(SidecarArgs),
    /// Read one key from a sidecar and print its value.
    Get {
        source: String,
        key: String,
        /// The sidecar's Cache API.
        #[arg(long, default_value = "127.0.0.1:7070", env = "VIEWCAR_ADDR")]
        addr: String,
    },
    /// Watch keys (or, with no keys, every key) of a source and print each change.
    Watch {
        source: String,
        keys: Vec<String>,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value = "127.0.0.1:7070", env = "VIEWCAR_ADDR")]
        addr: String,
    },
    /// Benchmarks: the fan-out tree vs the sidecar, reads beside Redis, freshness, ingest.
    Bench(viewcar::bench::BenchArgs),
    /// List a sidecar's sources with their state.
    Sources {
        #[arg(long, default_value = "127.0.0.1:7070", env = "VIEWCAR_ADDR")]
        addr: String,
    },
}

#[derive(clap::Args, Clone)]
struct DemoArgs {
    /// Where the embedded origin serves Feed (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:7000")]
    origin_listen: SocketAddr,
    /// Where the sidecar serves the Cache API (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_listen: SocketAddr,
    /// Where the sidecar serves WebSocket `/ws` (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:7071")]
    http_listen: SocketAddr,
    /// Catalog changes published per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Products in the catalog.
    #[arg(long, default_value_t = 3000)]
    products: usize,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            origin_listen: "127.0.0.1:7000".parse().expect("literal address"),
            grpc_listen: "127.0.0.1:7070".parse().expect("literal address"),
            http_listen: "127.0.0.1:7071".parse().expect("literal address"),
            rate: 50,
            products: 3000,
        }
    }
}

#[derive(clap::Args)]
struct OriginArgs {
    /// Where to serve Feed; overrides the config's `listen`. An address other than loopback
    /// also needs --allow-non-loopback.
    #[arg(long, value_name = "ADDR", env = "VIEWCAR_ORIGIN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Allow `listen` to be an address other than loopback (such as 0.0.0.0 or a pod IP), as
    /// the config's `allow_non_loopback = true` does. Logs a warning when used.
    #[arg(long, env = "VIEWCAR_ORIGIN_ALLOW_NON_LOOPBACK")]
    allow_non_loopback: bool,
    /// The origin config file.
    #[arg(long, value_name = "FILE", env = "VIEWCAR_ORIGIN_CONFIG")]
    config: Option<PathBuf>,
    /// Data to load at start (JSON or NDJSON); overrides the config's `seed`.
    #[arg(long, value_name = "FILE", env = "VIEWCAR_ORIGIN_SEED")]
    seed: Option<PathBuf>,
    /// Require `authorization: Bearer <TOKEN>` on Publish; overrides the config's
    /// `publish_token`. Prefer the environment variable (from a Secret): a flag shows in `ps`.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "VIEWCAR_PUBLISH_TOKEN",
        hide_env_values = true
    )]
    publish_token: Option<String>,
    /// Keep topics, the retained changes and the epoch in this directory, so a restart resumes
    /// sidecars without a snapshot; overrides the config's `data_dir`. Without it the origin
    /// is in memory and a restart is a new epoch.
    #[arg(long, value_name = "DIR", env = "VIEWCAR_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// What `viewcar sidecar --help` adds after the flags.
const SIDECAR_AFTER_HELP: &str = "\
Environment:
  VIEWCAR_ORIGIN_<NAME>_ADDRESS  address of the [[origin]] named <name> (upper-cased, '-' and '.' as '_')
  RUST_LOG                       log filter, such as 'info' or 'viewcar=debug' (default: info)

Exit status:
  0   stopped by SIGTERM or SIGINT, and everything drained within [shutdown] grace
  1   could not start (such as a listener that cannot bind), or the grace period ran out
  64  bad command line, config or override (EX_USAGE)";

/// `viewcar sidecar` and `viewcar check`: the config file and what overrides it.
#[derive(clap::Args)]
struct SidecarArgs {
    /// The sidecar config file (viewcar.toml).
    #[arg(long, value_name = "FILE", env = "VIEWCAR_CONFIG")]
    config: PathBuf,
    /// Where the Cache gRPC API listens; overrides `[listen] grpc`.
    #[arg(long, value_name = "ADDR", env = "VIEWCAR_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// Where the http listener (WebSocket /ws, /metrics, /healthz, /readyz, /status and the
    /// status page) listens; overrides `[listen] http`.
    #[arg(long, value_name = "ADDR", env = "VIEWCAR_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Allow listen addresses other than loopback (such as 0.0.0.0 or a pod IP), as
    /// `[listen] allow_non_loopback = true` does. Logs a warning for each such listener.
    #[arg(long, env = "VIEWCAR_ALLOW_NON_LOOPBACK")]
    allow_non_loopback: bool,
    /// Point the `[[origin]]` named NAME at ADDRESS (http://host:port, or https:// with its
    /// `tls`); repeatable. Wins over VIEWCAR_ORIGIN_<NAME>_ADDRESS.
    #[arg(long = "origin", value_name = "NAME=ADDRESS", value_parser = parse_origin)]
    origins: Vec<(String, String)>,
    /// How long in-flight reads, Watch streams and WebSockets get to finish on SIGTERM or
    /// SIGINT (such as "10s"); overrides `[shutdown] grace`.
    #[arg(long, value_name = "DURATION", env = "VIEWCAR_SHUTDOWN_GRACE", value_parser = parse_dur)]
    shutdown_grace: Option<Dur>,
    /// Require this bearer token on WebSocket /ws; overrides `[ws] token`. Prefer the
    /// environment variable (from a Secret): a flag shows in `ps`.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "VIEWCAR_WS_TOKEN",
        hide_env_values = true
    )]
    ws_token: Option<String>,
}

fn parse_origin(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, address)) if !name.is_empty() && !address.is_empty() => {
            Ok((name.to_string(), address.to_string()))
        }
        _ => Err(format!("expected NAME=ADDRESS, got {s:?}")),
    }
}

fn parse_dur(s: &str) -> Result<Dur, String> {
    Dur::parse(s)
}

impl SidecarArgs {
    /// The config file with every override applied, validated again.
    fn load(&self) -> Result<SidecarConfig, ConfigError> {
        let mut cfg = SidecarConfig::load(&self.config)?;
        cfg.apply_origin_env(std::env::vars())?;
        for (name, address) in &self.origins {
            cfg.set_origin_address(name, address, "--origin")?;
        }
        if let Some(a) = self.grpc_listen {
            cfg.listen.grpc = a;
        }
        if let Some(a) = self.http_listen {
            cfg.listen.http = Some(a);
        }
        if self.allow_non_loopback {
            cfg.listen.allow_non_loopback = true;
        }
        if let Some(g) = self.shutdown_grace {
            cfg.shutdown.grace = g;
        }
        if let Some(t) = &self.ws_token {
            cfg.ws.token = Some(t.clone());
        }
        let from = format!(
            "{} (with command-line and environment overrides)",
            self.config.display()
        );
        cfg.validate(&from)?;
        Ok(cfg)
    }
}

fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench prints its own progress; the embedded origin's info logs would bury it.
    let default_filter = match cli.command {
        Some(Command::Bench(_)) => "warn",
        // The replication crate logs every query it sends at info; the origin logs what matters.
        _ => "info,pg_walstream=warn",
    };
    init_tracing(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("viewcar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Demo(DemoArgs::default()));
    runtime.block_on(run(command))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Demo(args) => run_demo(args).await,
        Command::Origin(args) => run_origin(args).await,
        Command::Sidecar(args) => {
            let cfg = match args.load() {
                Ok(c) => c,
                Err(e) => return usage(e),
            };
            match Sidecar::start(cfg).await {
                // 0 only when everything drained within the grace period, so that an
                // orchestrator (or a script) can tell a clean stop from a cut-short one.
                Ok(sidecar) => {
                    if sidecar.run_until(shutdown_signal()).await {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    error!(error = %e, "sidecar failed to start");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) if is_origin_config(&args.config) => {
            match OriginConfig::load(&args.config) {
                Ok(cfg) => {
                    print!("{}", viewcar::config::describe_origin(&cfg));
                    ExitCode::SUCCESS
                }
                Err(e) => usage(e),
            }
        }
        Command::Check(args) => match args.load() {
            Ok(cfg) => {
                print!("{}", viewcar::config::describe(&cfg));
                ExitCode::SUCCESS
            }
            Err(e) => usage(e),
        },
        Command::Get { source, key, addr } => client_get(&addr, source, key).await,
        Command::Watch {
            source,
            keys,
            prefix,
            addr,
        } => client_watch(&addr, source, keys, prefix).await,
        Command::Sources { addr } => client_sources(&addr).await,
        Command::Bench(args) => viewcar::bench::run(args).await,
    }
}

/// An origin.toml rather than a viewcar.toml: it has a `[postgres]` section (a sidecar config
/// never does), so `viewcar check` validates it as the origin's.
fn is_origin_config(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("postgres"))
}

fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("viewcar: {e}");
    ExitCode::from(EX_USAGE)
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            info!(%addr, "address in use; taking any free port");
            TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
        }
        Err(e) => Err(e),
    }
}

async fn run_demo(args: DemoArgs) -> ExitCode {
    let origin_listener = match bind(args.origin_listen).await {
        Ok(l) => l,
        Err(e) => return usage(format!("cannot listen on {}: {e}", args.origin_listen)),
    };
    let origin_addr = match origin_listener.local_addr() {
        Ok(a) => a,
        Err(e) => return usage(e),
    };
    let origin = Origin::new(demo::origin_config(origin_addr));
    let size = demo::CatalogSize {
        products: args.products.max(1),
        ..demo::CatalogSize::default()
    };
    demo::load(&origin, size, 1);
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
        Err(e) => return usage(format!("cannot listen on {}: {e}", args.grpc_listen)),
    };
    let http = match bind(args.http_listen).await.and_then(|l| l.local_addr()) {
        Ok(a) => a,
        Err(e) => return usage(format!("cannot listen on {}: {e}", args.http_listen)),
    };
    let mut cfg = demo::sidecar_config(origin_addr, grpc);
    cfg.listen.http = Some(http);
    let sidecar = match Sidecar::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "sidecar failed to start");
            return ExitCode::FAILURE;
        }
    };
    sidecar.synced().await;
    let generator = tokio::spawn(demo::generate(origin.clone(), size, args.rate, 2, stop_rx));
    let g = sidecar.grpc_addr();
    println!(
        "viewcar demo is running ({} catalog changes/s). Ctrl-C stops it.",
        args.rate
    );
    println!();
    println!("  origin  (Feed API)   http://{origin_addr}");
    println!("  sidecar (Cache API)  {g}");
    println!("  sidecar (WebSocket)  ws://{}/ws", sidecar.http_addr());
    println!("  status page          http://{}/", sidecar.http_addr());
    println!();
    println!("Sources:");
    for s in sidecar.store().sources() {
        println!(
            "  {:<22} {:>6} keys  version {}",
            s.name(),
            s.len(),
            s.version()
        );
    }
    println!();
    println!("Read a key (in another terminal):");
    println!("  viewcar get product_page p00042 --addr {g}   # the whole product page, one read");
    println!("  viewcar get products p00042 --addr {g}");
    println!("  viewcar watch prices p00042 p00043 --addr {g}");
    println!("  viewcar sources --addr {g}");
    println!("  grpcurl -plaintext -import-path proto -proto viewcar/cache/v1/cache.proto \\");
    println!(
        "    -d '{{\"source\":\"products\",\"key\":\"p00042\"}}' {g} viewcar.cache.v1.Cache/Get"
    );
    println!("Subscribe over WebSocket:");
    println!(
        "  cargo run --example ws_subscriber -- ws://{}/ws prices p00042 p00043",
        sidecar.http_addr()
    );
    shutdown_signal().await;
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

async fn run_origin(args: OriginArgs) -> ExitCode {
    let mut cfg = match &args.config {
        Some(path) => match OriginConfig::load(path) {
            Ok(c) => c,
            Err(e) => return usage(e),
        },
        None => OriginConfig::default(),
    };
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if args.allow_non_loopback {
        cfg.allow_non_loopback = true;
    }
    if let Some(s) = args.seed {
        cfg.seed = Some(s);
    }
    if let Some(t) = args.publish_token {
        cfg.publish_token = Some(t);
    }
    if let Some(d) = args.data_dir {
        cfg.data_dir = Some(d);
    }
    let file = args
        .config
        .as_ref()
        .map_or_else(|| "command line".to_string(), |p| p.display().to_string());
    if let Err(e) = cfg.validate(&file) {
        return usage(e);
    }
    let listen = cfg.listen;
    // With [postgres] the origin takes its epoch from the database and its topics from the
    // tables; the source is held (and follows the database) for as long as the origin serves.
    let mut source = None;
    let origin = if cfg.postgres.is_some() {
        match viewcar::origin::postgres::PgOrigin::start(cfg).await {
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
            Err(e @ viewcar::OpenError::Seed(_)) => return usage(e),
            Err(e) => {
                error!(error = %e, "cannot open the origin's data directory");
                return ExitCode::FAILURE;
            }
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
    let served = origin.serve(listener, shutdown_signal()).await;
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

async fn client_get(addr: &str, source: String, key: String) -> ExitCode {
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

async fn client_watch(addr: &str, source: String, keys: Vec<String>, prefix: String) -> ExitCode {
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

async fn client_sources(addr: &str) -> ExitCode {
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
