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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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

/// Binds a Unix socket at `path` with file mode `mode`. A file left there by a previous run
/// (nothing accepts on it) is replaced; a socket something still listens on is not, nor is a
/// file that is not a socket.
pub async fn bind_unix(path: &std::path::Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process listens on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
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
}

/// One accepted connection: its permit, and the preface deadline until the preface is in.
pub struct Accepted<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
    /// Bytes still expected before the deadline is lifted, and the deadline.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
}

impl<Io: Connected> Connected for Accepted<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Accepted<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
