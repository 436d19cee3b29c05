//! `viewcar bench`: whole-system figures on one machine, in one run, side by side.
//!
//! The sidecar under test always runs as its own `viewcar sidecar` process (the current
//! executable, with a generated config in a temp dir), as in production. The origin and the
//! load generator live in the harness process: the harness publishes at the origin and reads
//! from the sidecar, so it can time a change from publish to visibility on one clock. The
//! fan-out tree is another child process (`viewcar bench tree`, hidden), so are the WebSocket
//! subscribers of the push run (`viewcar bench push-clients`, hidden), and Redis is a
//! `redis-server` child on a free loopback port when it is installed.
//!
//! Scenarios (see BENCHMARKS.md for what each measures and why):
//! - `fanout`: a tree of tonic services composing the product page vs one sidecar read;
//! - `reads`: single-key and page reads: sidecar, Redis (GET, pipelined cache-aside), the
//!   in-process store (floor), and a loopback TCP round trip for reference;
//! - `freshness`: publish -> visible to Get, Watch and WebSocket;
//! - `push`: WebSocket frames delivered per CPU second of the sidecar alone, and publish ->
//!   delivered latency, with many subscribers;
//! - `ingest`: changes applied/s with and without views, snapshot load time, bytes per key;
//! - `fleet`: many leaf feed streams on one origin, directly or through one relay;
//! - `postgres`: an origin fed by a real Postgres: initial copy, streamed changes applied,
//!   commit -> visible at a sidecar.
//!
//! Every figure goes to a table on stdout and `bench.json` in `--out`; the fanout and freshness
//! figures are also drawn as SVG charts there.

mod chart;
mod fanout;
mod fleet;
mod freshness;
mod ingest;
mod load;
pub mod postgres;
mod procs;
mod push;
mod push_clients;
mod reads;
mod report;
mod resp;
mod tree;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

pub use report::Report;

/// `viewcar bench` arguments.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Short runs and smaller sweeps: the whole suite in under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Tiny runs that only prove the harness works end to end (tests use it).
    #[arg(long, hide = true)]
    pub smoke: bool,
    /// Where bench.json and the SVG charts go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// The `viewcar` executable to run the sidecar and the tree with (default: this one).
    #[arg(long, hide = true)]
    pub exe: Option<PathBuf>,
    /// Concurrent requests of closed-loop runs.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Requests per second of open-loop runs (fanout).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Deepest tree of the fanout sweep (1..=depth).
    #[arg(long, default_value_t = 4)]
    pub depth: u32,
    /// Calls each tree node makes to the level below.
    #[arg(long, default_value_t = 3)]
    pub fanout: u32,
    /// Service time of each tree hop, in microseconds (slept; tokio's timer rounds up to 1 ms).
    #[arg(long, default_value_t = 0)]
    pub service_us: u64,
    /// Share of each hop's calls delayed by `--tail-ms`, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub tail_pct: f64,
    /// The delay of a tail call, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub tail_ms: u64,
    /// Changes per second published during the freshness and push runs.
    #[arg(long, default_value_t = 10_000)]
    pub change_rate: u32,
    /// Watch (and WebSocket) subscribers during the freshness run.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// WebSocket subscribers of the push run, one connection each, in a process of their own.
    #[arg(long, default_value_t = 1000)]
    pub push_subscribers: usize,
    /// Keys each push subscriber watches; each key is watched by this many subscribers (there
    /// are as many keys as subscribers).
    #[arg(long, default_value_t = 1)]
    pub push_fanout: usize,
    /// Keys of the snapshot and memory runs (ingest).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: usize,
    /// Value size of the snapshot and memory runs, in bytes (ingest).
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Hidden: the tree's shape when serving it (`viewcar bench tree`).
    #[arg(long, hide = true, default_value_t = 3000)]
    pub products: usize,
    /// Hidden: the sidecar's WebSocket URL (`viewcar bench push-clients`).
    #[arg(long, hide = true)]
    pub ws_url: Option<String>,
    /// How the push scenario's subscribers follow their keys: WebSocket subscriptions, or gRPC
    /// Watch streams (one HTTP/2 connection each, as a WebSocket subscriber has its own).
    #[arg(long, value_enum, default_value_t = PushProtocol::Ws)]
    pub push_protocol: PushProtocol,
    /// Hidden: the sidecar's Cache API address, `host:port` (`viewcar bench push-clients`).
    #[arg(long, hide = true)]
    pub grpc_addr: Option<String>,
    /// Leaf streams of the fleet runs, instead of the sweep's (e.g. `--fleet-streams 1000,5000`).
    #[arg(long, value_delimiter = ',')]
    pub fleet_streams: Vec<usize>,
    /// Changes per second of the fleet runs, instead of the sweep's (e.g. `--fleet-rates 1000`).
    #[arg(long, value_delimiter = ',')]
    pub fleet_rates: Vec<u32>,
    /// Sync streams the fleet's leaves open per HTTP/2 connection (1 to 1000): 100 by default,
    /// 1 for leaves that each dial on their own, as sidecars do.
    #[arg(long, default_value_t = fleet::STREAMS_PER_CONNECTION)]
    pub fleet_streams_per_connection: usize,
}

/// The push scenario's subscriber protocol.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushProtocol {
    /// WebSocket (`/ws`), JSON frames.
    Ws,
    /// gRPC `Cache.Watch`, protobuf messages on HTTP/2.
    Watch,
}

impl PushProtocol {
    pub fn name(self) -> &'static str {
        match self {
            PushProtocol::Ws => "ws",
            PushProtocol::Watch => "watch",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Fanout,
    Reads,
    Freshness,
    Push,
    Ingest,
    Fleet,
    Postgres,
    All,
    /// Internal: serve a fan-out tree and print its root addresses (the fanout scenario runs it).
    #[value(hide = true)]
    Tree,
    /// Internal: the WebSocket subscribers of the push scenario (it runs them).
    #[value(hide = true)]
    PushClients,
}

/// Shared state of one harness run.
pub(crate) struct Ctx {
    pub args: BenchArgs,
    pub exe: PathBuf,
    pub report: Report,
    pub started: Instant,
}

impl Ctx {
    /// Measurement length of one run, scaled by the mode.
    pub fn run_for(&self, full: Duration) -> Duration {
        if self.args.smoke {
            Duration::from_millis(300)
        } else if self.args.quick {
            (full / 4).max(Duration::from_millis(700))
        } else {
            full
        }
    }

    /// Warm-up before a measured run: connections made, caches hot.
    pub fn warmup(&self) -> Duration {
        if self.args.smoke {
            Duration::from_millis(50)
        } else if self.args.quick {
            Duration::from_millis(150)
        } else {
            Duration::from_millis(500)
        }
    }

    /// A progress line on stderr, stamped with the time since the harness started.
    pub fn progress(&self, msg: impl std::fmt::Display) {
        eprintln!("[{:>6.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }
}

/// Why a scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    pub(crate) fn setup(msg: impl Into<String>) -> Self {
        BenchError::Setup(msg.into())
    }
}

/// Runs `viewcar bench`.
pub async fn run(args: BenchArgs) -> ExitCode {
    if args.scenario == Scenario::Tree {
        return match tree::serve(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("viewcar bench tree: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.scenario == Scenario::PushClients {
        return match push_clients::run(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("viewcar bench push-clients: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = match args.exe.clone().map_or_else(std::env::current_exe, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("viewcar bench: cannot find the viewcar executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("viewcar bench: cannot create {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let mut ctx = Ctx {
        report: Report::new(&args),
        args,
        exe,
        started: Instant::now(),
    };
    let all = ctx.args.scenario == Scenario::All;
    let mut failed = false;
    let scenarios = [
        Scenario::Fanout,
        Scenario::Reads,
        Scenario::Freshness,
        Scenario::Push,
        Scenario::Ingest,
        Scenario::Fleet,
        Scenario::Postgres,
    ];
    for s in scenarios {
        if !(all || ctx.args.scenario == s) {
            continue;
        }
        ctx.progress(format!("{s:?}: starting").to_lowercase());
        let result = match s {
            Scenario::Fanout => fanout::run(&mut ctx).await,
            Scenario::Reads => reads::run(&mut ctx).await,
            Scenario::Freshness => freshness::run(&mut ctx).await,
            Scenario::Push => push::run(&mut ctx).await,
            Scenario::Ingest => ingest::run(&mut ctx).await,
            Scenario::Fleet => fleet::run(&mut ctx).await,
            Scenario::Postgres => postgres::run(&mut ctx).await,
            Scenario::All | Scenario::Tree | Scenario::PushClients => Ok(()),
        };
        if let Err(e) = result {
            failed = true;
            ctx.progress(format!("{s:?} failed: {e}").to_lowercase());
            ctx.report
                .note(&format!("{s:?}").to_lowercase(), format!("failed: {e}"));
        }
    }
    ctx.report.finish(ctx.started.elapsed());
    print!("{}", ctx.report.table());
    let written = ctx
        .report
        .write(&ctx.args.out)
        .and_then(|()| chart::draw(&ctx.report, &ctx.args.out));
    match written {
        Ok(()) => eprintln!("figures written to {}", ctx.args.out.display()),
        Err(e) => {
            eprintln!("viewcar bench: cannot write results: {e}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
