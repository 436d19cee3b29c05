//! The `viewcar` command: parses arguments, sets up logging, and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use viewcar::cli::{self, usage};
use viewcar::config::{Dur, OriginOverrides, SidecarOverrides};
use viewcar::demo::DemoOptions;
use viewcar::{ConfigError, OriginConfig, SidecarConfig};

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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
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
    /// as `_` (origin `catalog-eu` -> `VIEWCAR_ORIGIN_CATALOG_EU_ADDRESS`), one address or several
    /// separated by commas; one naming no origin is an error.
    #[command(after_help = SIDECAR_AFTER_HELP)]
    Sidecar(SidecarArgs),
    /// Validate a sidecar config (with the same overrides as `sidecar`) and print its sources;
    /// exit 0 or 64. With --probe, also dial each origin and ask for each topic (exit 69 if
    /// one is unreachable or lacks a topic).
    Check {
        #[command(flatten)]
        args: SidecarArgs,
        /// Dial every origin address as the sidecar would (timeouts, TLS) and check that it
        /// serves each configured topic.
        #[arg(long)]
        probe: bool,
    },
    /// Read one key from a sidecar and print its value.
    Get {
        source: String,
        key: String,
        /// The sidecar's Cache API: `host:port` or `unix:/path`.
        #[arg(long, default_value = "127.0.0.1:7070", env = "VIEWCAR_ADDR")]
        addr: String,
    },
    /// Watch keys (or, with no keys, every key) of a source and print each change.
    Watch {
        source: String,
        keys: Vec<String>,
        #[arg(long, default_value = "")]
        prefix: String,
        /// The sidecar's Cache API: `host:port` or `unix:/path`.
        #[arg(long, default_value = "127.0.0.1:7070", env = "VIEWCAR_ADDR")]
        addr: String,
    },
    /// Benchmarks: the fan-out tree vs the sidecar, reads beside Redis, freshness, ingest.
    #[cfg(feature = "bench")]
    Bench(viewcar::bench::BenchArgs),
    /// List a sidecar's sources with their state.
    Sources {
        /// The sidecar's Cache API: `host:port` or `unix:/path`.
        #[arg(long, default_value = "127.0.0.1:7070", env = "VIEWCAR_ADDR")]
        addr: String,
    },
}

#[derive(clap::Parser, Clone)]
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
    /// Products in the catalog (1 to 1,000,000).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    products: u32,
}

impl From<DemoArgs> for DemoOptions {
    fn from(a: DemoArgs) -> Self {
        DemoOptions {
            origin_listen: a.origin_listen,
            grpc_listen: a.grpc_listen,
            http_listen: a.http_listen,
            rate: a.rate,
            products: a.products as usize,
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
  VIEWCAR_ORIGIN_<NAME>_ADDRESS  address(es, comma-separated) of the [[origin]] named <name> (upper-cased, '-' and '.' as '_')
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
    /// Where the Cache gRPC API listens (`host:port` or `unix:/path`); overrides
    /// `[listen] grpc`.
    #[arg(long, value_name = "ADDR", env = "VIEWCAR_GRPC_LISTEN")]
    grpc_listen: Option<viewcar::config::ListenAddr>,
    /// Where the http listener (WebSocket /ws, /metrics, /healthz, /readyz, /status and the
    /// status page) listens; overrides `[listen] http`.
    #[arg(long, value_name = "ADDR", env = "VIEWCAR_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Allow listen addresses other than loopback (such as 0.0.0.0 or a pod IP), as
    /// `[listen] allow_non_loopback = true` does. Logs a warning for each such listener.
    #[arg(long, env = "VIEWCAR_ALLOW_NON_LOOPBACK")]
    allow_non_loopback: bool,
    /// Point the `[[origin]]` named NAME at ADDRESS (http://host:port, or https:// with its
    /// `tls`), or several separated by commas (tried in turn on a lost feed); repeatable. Wins
    /// over VIEWCAR_ORIGIN_<NAME>_ADDRESS.
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
    /// The config file with every override applied, checked again (view graph included).
    fn load(&self) -> Result<SidecarConfig, ConfigError> {
        let mut cfg = SidecarConfig::load(&self.config)?;
        let overrides = SidecarOverrides {
            grpc_listen: self.grpc_listen.clone(),
            http_listen: self.http_listen,
            allow_non_loopback: self.allow_non_loopback,
            origins: self.origins.clone(),
            shutdown_grace: self.shutdown_grace,
            ws_token: self.ws_token.clone(),
        };
        cfg.apply_overrides(&overrides, std::env::vars())?;
        let from = format!(
            "{} (with command-line and environment overrides)",
            self.config.display()
        );
        viewcar::check_config(&from, &cfg)?;
        Ok(cfg)
    }
}

impl OriginArgs {
    /// The config file (or the defaults) with every override applied, validated.
    fn load(self) -> Result<OriginConfig, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => OriginConfig::load(path)?,
            None => OriginConfig::default(),
        };
        let file = self
            .config
            .as_ref()
            .map_or_else(|| "command line".to_string(), |p| p.display().to_string());
        cfg.apply_overrides(OriginOverrides {
            listen: self.listen,
            allow_non_loopback: self.allow_non_loopback,
            seed: self.seed,
            publish_token: self.publish_token,
            data_dir: self.data_dir,
        });
        cfg.validate(&file)?;
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    // A bad flag or variable is a usage error (64), like a bad config; help and version are not
    // errors.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { cli::EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // The bench prints its own progress; the embedded origin's info logs would bury it.
    #[cfg(feature = "bench")]
    let default_filter = match cli.command {
        Some(Command::Bench(_)) => "warn",
        // The replication crate logs every query it sends at info; the origin logs what matters.
        _ => "info,pg_walstream=warn",
    };
    #[cfg(not(feature = "bench"))]
    let default_filter = "info,pg_walstream=warn";
    cli::init_tracing(cli.log_format == LogFormat::Json, default_filter);
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
    let command = cli
        .command
        .unwrap_or(Command::Demo(DemoArgs::parse_from(["demo"])));
    runtime.block_on(run(command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Demo(args) => viewcar::demo::run(args.into()).await,
        Command::Origin(args) => match args.load() {
            Ok(cfg) => cli::run_origin(cfg).await,
            Err(e) => usage(e),
        },
        Command::Sidecar(args) => match args.load() {
            Ok(cfg) => cli::run_sidecar(cfg).await,
            Err(e) => usage(e),
        },
        Command::Check { args, .. } if cli::is_origin_config(&args.config) => {
            match OriginConfig::load(&args.config) {
                Ok(cfg) => {
                    print!("{}", viewcar::config::describe_origin(&cfg));
                    ExitCode::SUCCESS
                }
                Err(e) => usage(e),
            }
        }
        Command::Check { args, probe } => match args.load() {
            Ok(cfg) => {
                print!("{}", viewcar::config::describe(&cfg));
                print!("{}", viewcar::views::describe(&cfg.views));
                if probe {
                    cli::probe(&cfg).await
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => usage(e),
        },
        Command::Get { source, key, addr } => cli::get(&addr, source, key).await,
        Command::Watch {
            source,
            keys,
            prefix,
            addr,
        } => cli::watch(&addr, source, keys, prefix).await,
        Command::Sources { addr } => cli::sources(&addr).await,
        #[cfg(feature = "bench")]
        Command::Bench(args) => viewcar::bench::run(args).await,
    }
}
