//! The Redis protocol listener (`[listen] redis`): RESP2 and RESP3 (`HELLO 3`), read-only, so
//! that any language's Redis client reads the sidecar with no new dependency.
//!
//! A key is `SOURCE:KEY`, split at the first `:` (source names hold no `:`). Reads go through
//! the one read path ([`super::read`]) that gRPC and WebSocket use; an absent key, or a source
//! that does not exist, reads as nil, as in Redis. Writes are refused with `-READONLY`.
//!
//! One connection = one task. It parses every whole command its input buffer holds, answers
//! them all into one output buffer, and writes that with one syscall when it can, so a
//! pipeline of N commands costs one read and one write. Bounds: `redis.maxclients` (a permit
//! taken at accept, as mini-redis does), `redis.max_query_bytes` of unparsed input,
//! `redis.max_args` and `redis.max_bulk_bytes` per request (checked on each header, before
//! anything is buffered for it), `redis.max_output_bytes` of output a client has not read
//! (then it is closed and counted), and `redis.idle_timeout`.

mod cmd;
mod parse;
mod push;
mod reply;
mod scan;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::read::{Freshness, ReadError, Reader};
use crate::config::{Limits, RedisConfig};
use crate::hub::Hub;
use crate::store::Store;

pub use parse::ParseError;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 << 10;

/// Counters of the Redis protocol listener.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Connections accepted (and given a permit).
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections refused: `redis.maxclients` open.
    pub rejected_full: AtomicU64,
    /// Commands answered.
    pub commands: AtomicU64,
    /// `AUTH`/`HELLO AUTH` with a wrong token, and commands refused before authenticating.
    pub auth_failures: AtomicU64,
    /// Reads that found their key, and reads that did not.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Connections closed for a malformed request.
    pub closed_protocol: AtomicU64,
    /// Connections closed for more than `redis.max_query_bytes` of unparsed input.
    pub closed_query_buffer: AtomicU64,
    /// Connections closed for more than `redis.max_output_bytes` of unread output.
    pub closed_output_buffer: AtomicU64,
    /// Connections closed as idle.
    pub closed_idle: AtomicU64,
    /// Pushes sent (keyspace notifications and invalidations).
    pub pushes: AtomicU64,
    /// Connections in subscribe mode or tracking keys now.
    pub pubsub_clients: AtomicU64,
    warned_full: AtomicBool,
}

/// What every connection shares.
pub(crate) struct Shared {
    reader: Reader,
    store: Arc<Store>,
    hub: Arc<Hub>,
    cfg: RedisConfig,
    freshness: Freshness,
    bounds: parse::Bounds,
    scan_max: usize,
    cursors: scan::Cursors,
    /// Connections subscribed to `__redis__:invalidate`, for `CLIENT TRACKING ... REDIRECT`.
    redirects: push::Redirects,
    clients: Arc<Semaphore>,
    next_id: AtomicU64,
    stats: Arc<RedisStats>,
    started: Instant,
    port: u16,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn new(
        store: Arc<Store>,
        hub: Arc<Hub>,
        cfg: RedisConfig,
        limits: &Limits,
        port: u16,
        shutdown: watch::Receiver<bool>,
        stats: Arc<RedisStats>,
    ) -> Self {
        let freshness = Freshness {
            min_version: 0,
            wait: cfg.wait.0,
            max_staleness_ms: cfg.max_staleness_ms,
            after: Vec::new(),
        };
        let bounds = parse::Bounds {
            max_args: cfg.max_args,
            max_bulk: cfg.max_bulk_bytes.as_usize(),
            max_inline: cfg.max_bulk_bytes.as_usize(),
        };
        Shared {
            reader: Reader::new(store.clone(), limits),
            store,
            hub,
            clients: Arc::new(Semaphore::new(cfg.maxclients)),
            cursors: scan::Cursors::new(cfg.scan_cursors),
            redirects: push::Redirects::default(),
            freshness,
            bounds,
            scan_max: limits.scan_max_limit as usize,
            cfg,
            next_id: AtomicU64::new(1),
            stats,
            started: Instant::now(),
            port,
            shutdown,
        }
    }
}

/// A refused read as a Redis error: a source not synced yet is `LOADING` (as Redis loading
/// its dataset), data too stale or an origin out of reach `MASTERDOWN` (as a replica with
/// `replica-serve-stale-data no`).
fn read_error(e: &ReadError) -> String {
    match e {
        ReadError::NotSynced { .. }
        | ReadError::BelowVersion { .. }
        | ReadError::BeforeAfter { .. } => format!("LOADING {e}"),
        ReadError::TooStale { .. } | ReadError::Fetch(_) => format!("MASTERDOWN {e}"),
        _ => format!("ERR {e}"),
    }
}

/// A bound listener: TCP, or a Unix socket (whose file is removed when the listener stops).
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

/// An accepted connection.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                Accepted::Tcp(s, peer)
            }),
            Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// Accepts connections until shutdown.
pub(crate) async fn serve(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::signalled(&mut shutdown) => break,
        };
        let stream = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: the listener itself is fine.
                debug!(error = %e, "Redis protocol accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = shared.clients.clone().try_acquire_owned() else {
            shared.stats.rejected_full.fetch_add(1, Ordering::Relaxed);
            if !shared.stats.warned_full.swap(true, Ordering::Relaxed) {
                warn!(
                    limit = shared.cfg.maxclients,
                    "Redis protocol connection limit reached; refusing connections (logged once)"
                );
            }
            tokio::spawn(async move {
                let full = b"-ERR max number of clients reached (redis.maxclients)\r\n";
                let _ = match stream {
                    Accepted::Tcp(mut s, _) => s.write_all(full).await,
                    Accepted::Unix(mut s) => s.write_all(full).await,
                };
            });
            continue;
        };
        tokio::spawn(connection(stream, shared.clone(), permit));
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// Why a connection ends.
enum End {
    /// The client left, or asked to (QUIT), or the socket failed.
    Gone,
    /// The sidecar is shutting down.
    Shutdown,
    /// Idle past `redis.idle_timeout`.
    Idle,
    /// A malformed request (answered with the error first).
    Protocol,
    /// More unparsed input than `redis.max_query_bytes`.
    QueryBuffer,
    /// More unread output than `redis.max_output_bytes`.
    OutputBuffer,
}

async fn connection(stream: Accepted, shared: Arc<Shared>, _permit: OwnedSemaphorePermit) {
    let st = &shared.stats;
    st.accepted.fetch_add(1, Ordering::Relaxed);
    st.open.fetch_add(1, Ordering::Relaxed);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let peer = match &stream {
        Accepted::Tcp(_, peer) => peer.to_string(),
        Accepted::Unix(_) => "unix".to_string(),
    };
    let mut conn = cmd::Conn::new(id, peer.clone(), &shared);
    let end = match stream {
        Accepted::Tcp(mut s, _) => {
            let (mut rd, mut wr) = s.split();
            run(&mut rd, &mut wr, &mut conn, &shared).await
        }
        Accepted::Unix(mut s) => {
            let (mut rd, mut wr) = s.split();
            run(&mut rd, &mut wr, &mut conn, &shared).await
        }
    };
    match end {
        End::Idle => st.closed_idle.fetch_add(1, Ordering::Relaxed),
        End::Protocol => st.closed_protocol.fetch_add(1, Ordering::Relaxed),
        End::QueryBuffer => st.closed_query_buffer.fetch_add(1, Ordering::Relaxed),
        End::OutputBuffer => st.closed_output_buffer.fetch_add(1, Ordering::Relaxed),
        End::Gone | End::Shutdown => 0,
    };
    if matches!(end, End::OutputBuffer) {
        debug!(%peer, "closing a Redis client past its output buffer limit");
    }
    conn.close(&shared);
    st.open.fetch_sub(1, Ordering::Relaxed);
}

async fn run<R, W>(rd: &mut R, wr: &mut W, conn: &mut cmd::Conn, sh: &Shared) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut shutdown = sh.shutdown.clone();
    let idle = sh.cfg.idle_timeout.0;
    let max_query = sh.cfg.max_query_bytes.as_usize();
    let max_output = sh.cfg.max_output_bytes.as_usize();
    let idle_sleep = tokio::time::sleep(idle);
    tokio::pin!(idle_sleep);
    loop {
        // Answer every whole command buffered, unless the client is not reading its answers.
        while conn.out.buf.len() < max_output && !conn.quit {
            match parse::next_command(&mut input, &sh.bounds) {
                Ok(Some(args)) => conn.execute(sh, args).await,
                Ok(None) => break,
                Err(e) => {
                    conn.out.error(&format!("ERR {e}"));
                    let _ = wr.write_all(&conn.out.buf).await;
                    return End::Protocol;
                }
            }
        }
        if input.len() > max_query {
            conn.out
                .error("ERR Protocol error: query buffer limit (redis.max_query_bytes)");
            let _ = wr.write_all(&conn.out.buf).await;
            return End::QueryBuffer;
        }
        // The common case: the whole answer goes out now, in one syscall (a write polled once:
        // what the socket takes without waiting).
        if !conn.out.buf.is_empty() {
            match wr.write(&conn.out.buf).now_or_never() {
                Some(Ok(0)) | Some(Err(_)) => return End::Gone,
                Some(Ok(n)) => {
                    let _ = conn.out.buf.split_to(n);
                }
                None => {}
            }
        }
        if conn.quit && conn.out.buf.is_empty() {
            return End::Gone;
        }
        if conn.out.buf.len() > max_output {
            return End::OutputBuffer;
        }
        let pushing = conn.push.is_active();
        let idle_applies = !idle.is_zero() && !pushing;
        if idle_applies {
            idle_sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + idle);
        }
        if input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        let reading = conn.out.buf.len() < max_output && !conn.quit;
        tokio::select! {
            biased;
            _ = crate::signalled(&mut shutdown) => return End::Shutdown,
            w = wr.write_buf(&mut conn.out.buf), if !conn.out.buf.is_empty() => {
                if !matches!(w, Ok(n) if n > 0) {
                    return End::Gone;
                }
            }
            r = rd.read_buf(&mut input), if reading => {
                if !matches!(r, Ok(n) if n > 0) {
                    return End::Gone;
                }
            }
            d = conn.push.next(), if pushing => {
                if conn.deliver(sh, d).is_err() {
                    return End::OutputBuffer;
                }
            }
            _ = &mut idle_sleep, if idle_applies => return End::Idle,
        }
    }
}

/// Parses requests from `input` with the default bounds until it holds no whole command, or
/// one breaks the protocol: an entry point for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub fn fuzz_parse(input: &[u8]) -> Result<usize, ParseError> {
    let d = RedisConfig::default();
    let bounds = parse::Bounds {
        max_args: d.max_args,
        max_bulk: d.max_bulk_bytes.as_usize(),
        max_inline: d.max_bulk_bytes.as_usize(),
    };
    let mut buf = BytesMut::from(input);
    let mut n = 0;
    while parse::next_command(&mut buf, &bounds)?.is_some() {
        n += 1;
    }
    Ok(n)
}
