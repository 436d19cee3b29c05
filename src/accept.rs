//! Accepting connections of the gRPC listeners (the sidecar's Cache API and the origin's Feed)
//! with a bound and a deadline, which tonic's own `TcpIncoming` does not offer.
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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

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
pub struct Accepted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Bytes still expected before the deadline is lifted, and the deadline.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
}

impl Connected for Accepted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Accepted {
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

impl AsyncWrite for Accepted {
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

/// The connections of `listener`, accepted within `bounds`, Nagle off (a reply of more than one
/// segment would otherwise wait for a delayed ACK). `what` names the listener in logs.
pub fn incoming(
    listener: TcpListener,
    bounds: Bounds,
    what: &'static str,
) -> impl Stream<Item = io::Result<Accepted>> {
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
                match listener.accept().await {
                    Ok((io, _)) => {
                        let _ = io.set_nodelay(true);
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
