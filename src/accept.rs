//! Accepting connections of the gRPC listeners (the sidecar's Cache API and the origin's Feed)
//! with a bound and a deadline, which tonic's own `TcpIncoming` does not offer, over TCP or a
//! Unix socket.
//!
//! - A connection takes a permit before it is accepted, and holds it until it closes: past the
//!   bound, new connections wait in the kernel's backlog instead of being served (the http
//!   listener does the same).
//! - A connection must send the HTTP/2 client preface (its first 24 bytes) within the header
//!   timeout, or it is closed: a client that connects and says nothing does not hold a
//!   connection (and a file descriptor) for ever. After the preface, HTTP/2 keepalive pings find
//!   peers that went away.
//! - A listener may *cork* its connections' writes (the Feed does): after the preface, a flush
//!   holds what was written for one turn of the runtime's queue, so that the frames of every
//!   stream of the connection that wakes meanwhile leave in one write. A relay that fans one
//!   batch out to a hundred streams of one connection makes one system call, not a hundred
//!   (see [`Cork`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tracing::warn;

/// A listener whose connections a gRPC server serves: TCP or a Unix socket.
pub trait Listen: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;

    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listen for TcpListener {
    type Io = TcpStream;

    /// Nagle off: a reply of more than one segment would otherwise wait for a delayed ACK.
    async fn accept_one(&self) -> io::Result<TcpStream> {
        let (io, _) = self.accept().await?;
        let _ = io.set_nodelay(true);
        Ok(io)
    }
}

impl Listen for UnixListener {
    type Io = UnixStream;

    async fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(io, _)| io)
    }
}

/// The listen backlog of every TCP listener: connections the kernel completes before they are
/// accepted. The standard library's (and tokio's) 128 overflows when a fleet reconnects at once
/// (a relay's leaves after its restart, sidecars after an origin's): past it the kernel drops
/// handshakes, and answers some of those peers' first bytes with a reset. Linux caps it at
/// `net.core.somaxconn` (4096 by default since 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets it, so that a restart binds while old connections linger).
pub async fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds a Unix socket at `path` with file mode `mode` and [`LISTEN_BACKLOG`]. A file left
/// there by a previous run (nothing accepts on it) is replaced; a socket something still
/// listens on is not, nor is a file that is not a socket.
pub async fn bind_unix(path: &std::path::Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        // A listener whose backlog is full refuses with EAGAIN: it is alive all the same.
        let live = match UnixStream::connect(path).await {
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        if live {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process listens on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    // With the same backlog as TCP: a full one refuses a local client's connect at once.
    let socket = tokio::net::UnixSocket::new_stream()?;
    socket.bind(path)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE: usize = 24;

/// The bounds of one gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Open connections at most.
    pub max_connections: usize,
    /// The client's first bytes (the HTTP/2 preface) must arrive within this long.
    pub header_timeout: Duration,
    /// Whether writes are corked after the preface ([`Cork`]).
    pub cork: bool,
}

/// One accepted connection: its permit, and the preface deadline until the preface is in.
pub struct Accepted<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
    /// Bytes still expected before the deadline is lifted, and the deadline.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    /// Writes held for one turn; `None` when the listener does not cork.
    cork: Option<Cork>,
}

/// Bytes a corked connection holds at most; a write that would pass it sends what is held first.
const CORK_BYTES: usize = 32 * 1024;
/// A held buffer whose capacity grew past this is released once sent, so that an idle
/// connection keeps at most this much. The frames of one change to a hundred streams (~10 KiB)
/// fit: below that, a connection gathering such rounds regrew its buffer from nothing each
/// time (a dozen reallocations and copies per round).
const CORK_KEEP: usize = 16 * 1024;

/// The writes of one connection, held until its task's next turn.
///
/// Why: the runtime runs a task woken by the running one next (its LIFO slot), so when a
/// stream's body hands a frame to the HTTP/2 connection, the connection task runs at once and
/// writes that one frame. Corked, a write is copied here and the first flush after it is
/// answered "done" while the task wakes itself: a self-woken task goes to the back of the
/// queue, so every other task that is ready (the other streams of a fan-out) runs first and
/// adds its frames. At the task's next turn the flush sends all of them in one write.
///
/// Why nothing stays held: the task that flushed is woken, and what it does at its next turn
/// sends. The HTTP/2 connection task reads and then flushes at every poll that leaves it
/// pending (h2's `poll_complete`), and drains on shutdown. A task that only reads (a TLS
/// handshake waiting for the peer's next flight: TLS runs above this, and with TLS the first
/// bytes counted as the preface are the handshake's) is woken once more by its first read
/// after the flush, and its second read sends: at most two turns, however the task is built.
#[derive(Default)]
struct Cork {
    buf: Vec<u8>,
    /// Sent so far of `buf`.
    sent: usize,
    /// A flush was answered and the task woken: the next flush sends.
    held: bool,
    /// A read came while `held`, and woke the task again: the next read sends.
    read_while_held: bool,
}

impl Cork {
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Makes room for `len` more bytes, sending what is held first when they would not fit:
    /// `Ready(Ok(true))` to copy them in, `Ready(Ok(false))` when they are more than is ever
    /// held (write them straight through; nothing is held before them any more).
    fn room<Io: AsyncWrite + Unpin>(
        &mut self,
        io: &mut Io,
        cx: &mut Context<'_>,
        len: usize,
    ) -> Poll<io::Result<bool>> {
        if self.pending() + len > CORK_BYTES {
            ready!(self.drain(io, cx))?;
        }
        Poll::Ready(Ok(len <= CORK_BYTES))
    }

    /// Sends what is held, until done or `io` would block.
    fn drain<Io: AsyncWrite + Unpin>(
        &mut self,
        io: &mut Io,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.buf[self.sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.sent = 0;
        if self.buf.capacity() > CORK_KEEP {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.held = false;
        self.read_while_held = false;
        Poll::Ready(Ok(()))
    }
}

impl<Io: Connected> Connected for Accepted<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> AsyncRead for Accepted<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(cork) = this.cork.as_mut().filter(|c| c.held) {
            // See [`Cork`]: a task that reads twice without flushing sends at its second read.
            if cork.read_while_held {
                if let Poll::Ready(Err(e)) = cork.drain(&mut this.io, cx) {
                    return Poll::Ready(Err(e));
                }
            } else {
                cork.read_while_held = true;
                cx.waker().wake_by_ref();
            }
        }
        let Some((missing, deadline)) = this.preface.as_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if got >= *missing {
                    this.preface = None;
                } else {
                    *missing -= got;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the header timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            err => err,
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Accepted<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match corked(&this.preface, &mut this.cork) {
            None => Pin::new(&mut this.io).poll_write(cx, buf),
            Some(cork) => {
                if !ready!(cork.room(&mut this.io, cx, buf.len()))? {
                    return Pin::new(&mut this.io).poll_write(cx, buf);
                }
                cork.buf.extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match corked(&this.preface, &mut this.cork) {
            None => Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
            Some(cork) => {
                let len: usize = bufs.iter().map(|b| b.len()).sum();
                if !ready!(cork.room(&mut this.io, cx, len))? {
                    return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
                }
                for b in bufs {
                    cork.buf.extend_from_slice(b);
                }
                Poll::Ready(Ok(len))
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.cork.is_some() || self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(cork) = this.cork.as_mut() {
            if cork.pending() > 0 {
                if !cork.held {
                    // Hold for one turn: see [`Cork`].
                    cork.held = true;
                    cx.waker().wake_by_ref();
                    return Poll::Ready(Ok(()));
                }
                ready!(cork.drain(&mut this.io, cx))?;
            }
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(cork) = this.cork.as_mut() {
            ready!(cork.drain(&mut this.io, cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The cork of a connection once its preface is in (before it, writes go straight through).
fn corked<'a, T>(preface: &Option<T>, cork: &'a mut Option<Cork>) -> Option<&'a mut Cork> {
    match preface {
        Some(_) => None,
        None => cork.as_mut(),
    }
}

/// The connections of `listener`, accepted within `bounds`. `what` names the listener in logs.
pub fn incoming<L: Listen>(
    listener: L,
    bounds: Bounds,
    what: &'static str,
) -> impl Stream<Item = io::Result<Accepted<L::Io>>> {
    let permits = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    futures_util::stream::unfold(
        (listener, permits, false),
        move |(listener, permits, mut full_logged)| async move {
            loop {
                if permits.available_permits() == 0 && !full_logged {
                    warn!(
                        listener = what,
                        max_connections = bounds.max_connections,
                        "listener at its connection bound; new connections wait"
                    );
                    full_logged = true;
                }
                let permit = permits.clone().acquire_owned().await.ok()?;
                if permits.available_permits() > 0 {
                    full_logged = false;
                }
                match listener.accept_one().await {
                    Ok(io) => {
                        let conn = Accepted {
                            io,
                            _permit: permit,
                            preface: Some((
                                PREFACE,
                                Box::pin(tokio::time::sleep(bounds.header_timeout)),
                            )),
                            cork: bounds.cork.then(Cork::default),
                        };
                        return Some((Ok(conn), (listener, permits, full_logged)));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: not the listener's end. Back off
                        // a little so that a full table is not spun on.
                        warn!(listener = what, error = %e, "accept failed");
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::counting;
    use proptest::prelude::*;
    use std::sync::atomic::Ordering;

    /// A peer's end as the connection's writes reach it: every write call, and how much of each
    /// it took. It takes at most `take` bytes per call and is not ready on every `stall`-th call
    /// (0: always ready; never 1).
    #[derive(Default)]
    struct Wire {
        calls: Vec<Vec<u8>>,
        take: usize,
        stall: usize,
        flushes: usize,
        shut: bool,
    }

    impl AsyncWrite for Wire {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stall > 0 && (self.calls.len() + 1) % self.stall == 0 {
                // Not ready this time; ready again at once.
                self.calls.push(Vec::new());
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.take.max(1));
            self.calls.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// The peer sends nothing.
    impl AsyncRead for Wire {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl Wire {
        fn bytes(&self) -> Vec<u8> {
            self.calls.concat()
        }
        fn writes(&self) -> usize {
            self.calls.iter().filter(|c| !c.is_empty()).count()
        }
    }

    fn conn(wire: Wire, preface_in: bool) -> Accepted<Wire> {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        Accepted {
            io: wire,
            _permit: permit,
            preface: (!preface_in).then(|| {
                (
                    PREFACE,
                    Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
                )
            }),
            cork: Some(Cork::default()),
        }
    }

    /// A peer that takes every write whole.
    fn whole() -> Wire {
        Wire {
            take: usize::MAX,
            ..Wire::default()
        }
    }

    fn write(c: &mut Accepted<Wire>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(c).poll_write(cx, b)
    }
    fn flush(c: &mut Accepted<Wire>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(c).poll_flush(cx)
    }
    /// Writes `b`, which is taken whole at once.
    fn put(c: &mut Accepted<Wire>, cx: &mut Context<'_>, b: &[u8]) {
        assert!(matches!(write(c, cx, b), Poll::Ready(Ok(n)) if n == b.len()));
    }
    /// Flushes, which answers at once.
    fn flushed(c: &mut Accepted<Wire>, cx: &mut Context<'_>) {
        assert!(matches!(flush(c, cx), Poll::Ready(Ok(()))));
    }
    /// Reads; whether the read waits (the peer never sends).
    fn read_waits(c: &mut Accepted<Wire>, cx: &mut Context<'_>) -> bool {
        let mut space = [0u8; 16];
        let mut buf = ReadBuf::new(&mut space);
        Pin::new(c).poll_read(cx, &mut buf).is_pending()
    }

    /// The frames of one turn leave in one write: the first flush holds them and wakes the task,
    /// the flush of its next turn sends what was written in between too.
    #[tokio::test]
    async fn a_flush_is_held_for_one_turn_and_the_next_sends_everything_in_one_write() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut c = conn(whole(), true);
        put(&mut c, &mut cx, b"one ");
        flushed(&mut c, &mut cx);
        assert_eq!(c.io.writes(), 0, "the first flush holds");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "and wakes the task");
        // Other streams' frames, added before the task's next turn.
        put(&mut c, &mut cx, b"two ");
        put(&mut c, &mut cx, b"three");
        flushed(&mut c, &mut cx);
        assert_eq!(c.io.calls, vec![b"one two three".to_vec()]);
        assert_eq!(c.io.flushes, 1);
        // Nothing held: a flush goes through, and does not wake the task again.
        flushed(&mut c, &mut cx);
        assert_eq!(c.io.writes(), 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // Shutdown sends what is held.
        put(&mut c, &mut cx, b" four");
        flushed(&mut c, &mut cx);
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.io.bytes(), b"one two three four".to_vec());
        assert!(c.io.shut);
    }

    /// A task that flushed and then only reads (a TLS handshake waiting for the peer) is woken
    /// again by its first read, and its second read sends what is held.
    #[tokio::test]
    async fn a_task_that_only_reads_after_a_held_flush_sends_at_its_second_read() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut c = conn(whole(), true);
        // Nothing held: a read wakes nobody.
        assert!(read_waits(&mut c, &mut cx));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        put(&mut c, &mut cx, b"hello");
        flushed(&mut c, &mut cx);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(read_waits(&mut c, &mut cx));
        assert_eq!(c.io.writes(), 0, "the first read holds on");
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            2,
            "and wakes the task again"
        );
        assert!(read_waits(&mut c, &mut cx));
        assert_eq!(c.io.calls, vec![b"hello".to_vec()], "the second read sends");
        assert!(read_waits(&mut c, &mut cx));
        assert_eq!(c.io.writes(), 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    /// Before the preface is in (a TLS handshake may run below it), writes go straight through.
    #[tokio::test]
    async fn nothing_is_held_before_the_preface() {
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut c = conn(whole(), false);
        put(&mut c, &mut cx, b"hello");
        flushed(&mut c, &mut cx);
        assert_eq!(c.io.calls, vec![b"hello".to_vec()]);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize),
        Vectored(usize, usize),
        Flush,
        Read,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..3000).prop_map(Op::Write),
            1 => (CORK_BYTES - 10..CORK_BYTES + 10).prop_map(Op::Write),
            2 => (0usize..2000, 0usize..2000).prop_map(|(a, b)| Op::Vectored(a, b)),
            3 => Just(Op::Flush),
            2 => Just(Op::Read),
        ]
    }

    proptest! {
        /// Oracle: the bytes the caller was told were written, in order. Whatever the sizes,
        /// the peer's partial writes and stalls, after a final flush and shutdown the peer has
        /// exactly them, and never more than CORK_BYTES was held.
        #[test]
        fn corked_bytes_reach_the_peer_whole_and_in_order(
            ops in proptest::collection::vec(op(), 1..60),
            take in 1usize..70_000,
            stall in prop_oneof![Just(0usize), 2usize..6],
        ) {
            let (_wakes, waker) = counting();
            let mut cx = Context::from_waker(&waker);
            let mut c = conn(Wire { take, stall, ..Wire::default() }, true);
            let mut sent: Vec<u8> = Vec::new();
            let mut next = 0u8;
            let mut fill = |n: usize| -> Vec<u8> {
                (0..n).map(|_| { next = next.wrapping_add(1); next }).collect()
            };
            // Like a caller: a write that is not ready is tried again, as is a flush.
            for op in ops {
                match op {
                    Op::Write(n) => {
                        let data = fill(n);
                        let mut at = 0;
                        while at < data.len() || (n == 0 && at == 0) {
                            match write(&mut c, &mut cx, &data[at..]) {
                                Poll::Ready(Ok(k)) => { at += k; if n == 0 { break; } }
                                Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                                Poll::Pending => {}
                            }
                        }
                        sent.extend_from_slice(&data);
                    }
                    Op::Vectored(a, b) => {
                        let (x, y) = (fill(a), fill(b));
                        let slices = [io::IoSlice::new(&x), io::IoSlice::new(&y)];
                        let k = loop {
                            match Pin::new(&mut c).poll_write_vectored(&mut cx, &slices) {
                                Poll::Ready(Ok(k)) => break k,
                                Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                                Poll::Pending => {}
                            }
                        };
                        let both = [x, y].concat();
                        sent.extend_from_slice(&both[..k]);
                    }
                    Op::Flush => {
                        while flush(&mut c, &mut cx).is_pending() {}
                    }
                    Op::Read => prop_assert!(read_waits(&mut c, &mut cx)),
                }
                let held = c.cork.as_ref().unwrap().pending();
                prop_assert!(held <= CORK_BYTES, "{held} bytes held");
            }
            while Pin::new(&mut c).poll_shutdown(&mut cx).is_pending() {}
            prop_assert!(c.io.shut);
            prop_assert_eq!(c.io.bytes(), sent);
        }
    }
}
