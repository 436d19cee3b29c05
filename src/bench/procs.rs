//! Child processes of the harness (the sidecar under test, the fan-out tree, redis-server) and
//! the in-process origin that feeds the sidecar.
//!
//! Every child is killed when its handle drops, so a failed or interrupted run leaves nothing
//! behind. Ports come from binding port 0 and releasing it just before the child binds: a small
//! race with other programs, acceptable for a benchmark on a quiet machine.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use super::BenchError;
use crate::config::{OriginConfig, SidecarConfig};
use crate::demo::{self, CatalogSize};
use crate::origin::Origin;
use crate::pb::cache::v1 as pb;
use crate::views::ViewSpec;

/// A free loopback port (released before return).
pub fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A fresh temp directory for one child's config and log.
pub fn temp_dir(tag: &str) -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!(
        "viewcar-bench-{}-{tag}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    /// Held so a child that waits for stdin EOF lives exactly as long as this handle; also
    /// where a child that takes commands reads them.
    stdin: Option<ChildStdin>,
    pub log: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in bytes, from /proc (Linux); 0 where unavailable.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id())
    }

    /// The tail of the child's log, for error messages.
    pub fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// User + system CPU seconds the child has used so far; None where /proc is unavailable.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.child.id())
    }

    /// Writes one command line to the child's stdin. A line is a few bytes and the child reads
    /// its stdin all along, so the blocking write returns at once.
    pub fn send_line(&mut self, line: &str) -> Result<(), BenchError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| BenchError::setup("child has no stdin"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU seconds of a process so far (every thread), from `/proc/<pid>/stat` (Linux);
/// None where unavailable.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces, so fields are counted
    // from its closing one: field 3 (state) comes first, utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // In clock ticks of USER_HZ, which Linux fixes at 100 for user space on every architecture
    // it runs on (sysconf(_SC_CLK_TCK) would need unsafe code, which this crate forbids).
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// [`cpu_seconds`], 0 where unavailable.
pub fn cpu_secs(pid: u32) -> f64 {
    cpu_seconds(pid).unwrap_or(0.0)
}

/// Spawns `exe args`, stdout piped (for a ready line), stderr to `log`.
pub fn spawn(
    exe: &Path,
    args: &[String],
    log: &Path,
    piped_stdout: bool,
) -> Result<(Proc, Option<std::process::ChildStdout>), BenchError> {
    let log_file = std::fs::File::create(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(if piped_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::from(log_file))
        .env("RUST_LOG", "warn");
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError::setup(format!("cannot start {}: {e}", exe.display())))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    Ok((
        Proc {
            child,
            stdin,
            log: Some(log.to_path_buf()),
        },
        stdout,
    ))
}

/// Reads the child's first stdout line (its ready line) within `timeout`.
pub async fn ready_line(
    stdout: std::process::ChildStdout,
    timeout: Duration,
) -> Result<String, BenchError> {
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(Ok(line))) if !line.is_empty() => Ok(line.trim().to_string()),
        Ok(_) => Err(BenchError::setup("child exited before it was ready")),
        Err(_) => Err(BenchError::setup("child not ready in time")),
    }
}

/// The child's stdout as lines, read on a thread of its own, for a child that reports more
/// than once. At most 16 lines wait unread; past that the thread, then the child's writes,
/// wait. The thread ends when the child's stdout closes (it exits or is killed).
pub fn stdout_lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line of [`stdout_lines`] within `timeout`.
pub async fn next_line(
    lines: &mut mpsc::Receiver<String>,
    timeout: Duration,
) -> Result<String, BenchError> {
    match tokio::time::timeout(timeout, lines.recv()).await {
        Ok(Some(line)) => Ok(line.trim().to_string()),
        Ok(None) => Err(BenchError::setup("child closed its stdout")),
        Err(_) => Err(BenchError::setup("no line from the child in time")),
    }
}

/// The origin the sidecar follows, served from the harness process.
pub struct OriginHost {
    pub origin: Origin,
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl OriginHost {
    /// An origin with the given topics (undeclared when empty) and generous stream queues, so
    /// a burst from the ingest run is streamed, not caught up by snapshot.
    pub async fn start(topics: &[&str]) -> Result<OriginHost, BenchError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cfg = OriginConfig {
            listen: addr,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            stream_queue: 1 << 16,
            retain_batches: 1 << 16,
            retain_bytes: crate::config::ByteSize(512 << 20),
            ..OriginConfig::default()
        };
        OriginHost::serve(Origin::new(cfg), listener)
    }

    /// Serves `origin` (built elsewhere: a Postgres-fed one) on `listener` until dropped.
    pub fn serve(origin: Origin, listener: TcpListener) -> Result<OriginHost, BenchError> {
        let addr = listener.local_addr()?;
        let (stop, mut stop_rx) = watch::channel(false);
        let serving = origin.clone();
        tokio::spawn(async move {
            let _ = serving
                .serve(listener, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(OriginHost { origin, addr, stop })
    }

    /// An origin with the demo topics, loaded with the demo catalog of `products` products
    /// (seed 1), published in batches of 5000 puts.
    pub async fn with_catalog(products: usize) -> Result<OriginHost, BenchError> {
        let host = OriginHost::start(&demo::TOPICS).await?;
        let size = CatalogSize {
            products,
            ..CatalogSize::default()
        };
        for (topic, puts) in demo::catalog(size, 1) {
            for chunk in puts.chunks(5000) {
                host.origin
                    .publish(topic, chunk.to_vec())
                    .map_err(|e| BenchError::setup(format!("loading {topic}: {e}")))?;
            }
        }
        Ok(host)
    }
}

impl Drop for OriginHost {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A Cache API client of a sidecar under test.
pub type Client = pb::cache_client::CacheClient<Channel>;

/// What the generated sidecar config asks for.
pub struct SidecarSpec<'a> {
    pub origin: SocketAddr,
    pub topics: &'a [&'a str],
    /// View declarations to include (written as `[[view]]` tables).
    pub views: Vec<ViewSpec>,
    /// Ask for an http listener (WebSocket `/ws`); dropped when this build's config lacks it.
    pub http: bool,
    /// Also serve the Redis protocol, on a free TCP port.
    pub redis: bool,
    /// Serve the Cache API on a Unix socket (in the child's temp directory) instead of TCP.
    pub unix_grpc: bool,
    /// Set `ws.max_connections` (default 1024) to this, and the http listener's connection
    /// bound with it, for a run with more WebSocket subscribers.
    pub ws_max_connections: Option<usize>,
}

/// A running `viewcar sidecar` child.
pub struct SidecarProc {
    pub proc: Proc,
    /// The Cache API: `127.0.0.1:port` or `unix:/path`.
    pub grpc: String,
    /// The Redis protocol's TCP port, when asked for.
    pub redis: Option<u16>,
    /// The http listener, when this build's config has one.
    pub http: Option<SocketAddr>,
    pub views: Vec<String>,
    pub client: pb::cache_client::CacheClient<Channel>,
    pub dir: PathBuf,
}

fn view_toml(v: &ViewSpec) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = format!("\n[[view]]\nname = {}\nfrom = {}\n", q(&v.name), q(&v.from));
    if let Some(w) = &v.filter {
        out.push_str(&format!("where = {}\n", q(w)));
    }
    if let Some(g) = &v.group_by {
        out.push_str(&format!("group_by = {}\n", q(g)));
    }
    if let Some(sel) = &v.select {
        let items: Vec<String> = sel.iter().map(|s| q(s)).collect();
        out.push_str(&format!("select = [{}]\n", items.join(", ")));
    }
    if !v.include.0.is_empty() {
        out.push_str("[view.include]\n");
        for i in &v.include.0 {
            out.push_str(&format!(
                "{} = {{ source = {}, key = {} }}\n",
                q(&i.name),
                q(&i.source),
                q(&i.key)
            ));
        }
    }
    out
}

fn sidecar_toml(spec: &SidecarSpec, grpc: &str, http: Option<u16>, redis: Option<u16>) -> String {
    let mut t = format!("[listen]\ngrpc = \"{grpc}\"\n");
    if let Some(r) = redis {
        t.push_str(&format!("redis = \"127.0.0.1:{r}\"\n"));
    }
    // Without an explicit port the http listener takes its default (7071), which another
    // process on the machine may hold: any free port will do when nobody connects to it.
    let h = http.unwrap_or(0);
    t.push_str(&format!("http = \"127.0.0.1:{h}\"\n"));
    if let Some(n) = spec.ws_max_connections {
        // Room beside the subscribers (WebSockets or Watch streams, each on its own
        // connection) for the harness's own requests.
        t.push_str(&format!("http_max_connections = {}\n", (n + 64).max(4096)));
        t.push_str(&format!("grpc_max_connections = {}\n", (n + 64).max(4096)));
    }
    t.push_str("\n[limits]\nwriter_queue = 65536\nmax_batch_keys = 10000\n");
    if let Some(n) = spec.ws_max_connections {
        t.push_str(&format!("\n[ws]\nmax_connections = {n}\n"));
    }
    let topics: Vec<String> = spec.topics.iter().map(|t| format!("\"{t}\"")).collect();
    t.push_str(&format!(
        "\n[[origin]]\nname = \"bench\"\naddress = \"http://{}\"\ntopics = [{}]\n",
        spec.origin,
        topics.join(", ")
    ));
    for v in &spec.views {
        t.push_str(&view_toml(v));
    }
    t
}

impl SidecarProc {
    /// Writes the config, starts `viewcar sidecar`, and waits until every source has synced
    /// (and, when `expect_keys` is given, a topic holds that many keys).
    pub async fn start(
        exe: &Path,
        spec: SidecarSpec<'_>,
        expect_keys: Option<(&str, u64)>,
        timeout: Duration,
    ) -> Result<SidecarProc, BenchError> {
        let dir = temp_dir("sidecar")?;
        let grpc = if spec.unix_grpc {
            format!("unix:{}", dir.join("grpc.sock").display())
        } else {
            format!("127.0.0.1:{}", free_port()?)
        };
        let http = if spec.http { Some(free_port()?) } else { None };
        let redis = if spec.redis { Some(free_port()?) } else { None };
        // The config is checked here so that a refusal names the generated file's problem
        // instead of surfacing as a sidecar that never came up.
        let text = sidecar_toml(&spec, &grpc, http, redis);
        SidecarConfig::parse("bench sidecar config", &text)
            .map_err(|e| BenchError::setup(format!("generated sidecar config refused: {e}")))?;
        let config = dir.join("viewcar.toml");
        std::fs::write(&config, text)?;
        let args = vec![
            "sidecar".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ];
        let (mut proc, _) = spawn(exe, &args, &dir.join("sidecar.log"), false)?;
        let deadline = Instant::now() + timeout;
        let channel = loop {
            if let Some(status) = proc.exited() {
                return Err(BenchError::setup(format!(
                    "sidecar exited ({status}): {}",
                    proc.log_tail()
                )));
            }
            match crate::cli::channel(&grpc).await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(BenchError::setup(format!("sidecar unreachable: {e}"))),
            }
        };
        let client = pb::cache_client::CacheClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let views = spec.views.iter().map(|v| v.name.clone()).collect();
        let sc = SidecarProc {
            proc,
            grpc,
            redis,
            http: http.map(|h| SocketAddr::from(([127, 0, 0, 1], h))),
            views,
            client,
            dir,
        };
        sc.wait_synced(expect_keys, deadline).await?;
        Ok(sc)
    }

    /// Waits until every source reports synced (and `expect` holds).
    pub async fn wait_synced(
        &self,
        expect: Option<(&str, u64)>,
        deadline: Instant,
    ) -> Result<(), BenchError> {
        loop {
            let mut c = self.client.clone();
            if let Ok(r) = c.list_sources(pb::ListSourcesRequest {}).await {
                let sources = r.into_inner().sources;
                let synced = !sources.is_empty() && sources.iter().all(|s| s.synced);
                let enough = expect
                    .is_none_or(|(name, n)| sources.iter().any(|s| s.name == name && s.keys >= n));
                if synced && enough {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::setup(format!(
                    "sidecar did not sync in time: {}",
                    self.proc.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `n` separate connections to the Cache API (one HTTP/2 connection per client worker).
    pub async fn clients(
        &self,
        n: usize,
    ) -> Result<Vec<pb::cache_client::CacheClient<Channel>>, BenchError> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let ch = crate::cli::channel(&self.grpc)
                .await
                .map_err(|e| BenchError::setup(format!("sidecar unreachable: {e}")))?;
            out.push(pb::cache_client::CacheClient::new(ch));
        }
        Ok(out)
    }

    pub fn has_view(&self, name: &str) -> bool {
        self.views.iter().any(|v| v == name)
    }
}

/// One `Get` of `source[key]` from the sidecar, as a load op: an error if it fails or the row
/// is not found.
pub async fn get_found(
    client: &mut pb::cache_client::CacheClient<Channel>,
    source: &str,
    key: String,
) -> Result<(), String> {
    let r = client
        .get(pb::GetRequest {
            source: source.to_string(),
            key,
            options: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    if r.get_ref().item.as_ref().is_some_and(|it| it.found) {
        Ok(())
    } else {
        Err(format!("{source} row not found"))
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_max_connections_reaches_the_sidecar_config() {
        let spec = SidecarSpec {
            origin: SocketAddr::from(([127, 0, 0, 1], 1)),
            topics: &["t"],
            views: Vec::new(),
            http: true,
            redis: false,
            unix_grpc: false,
            ws_max_connections: Some(5000),
        };
        let text = sidecar_toml(&spec, "127.0.0.1:2", Some(3), None);
        let cfg = SidecarConfig::parse("test", &text).expect("valid config");
        assert_eq!(cfg.ws.max_connections, 5000);
        assert!(cfg.listen.http_max_connections >= 5000);
    }

    #[test]
    fn cpu_seconds_reads_this_process() {
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
