//! The `Feed` service on the wire, with `Sync` answered through a codec that sends a shared,
//! already encoded message as its bytes: a change batch or a snapshot chunk that thousands of
//! streams send is encoded once (a relay's whole point), not once per stream.
//!
//! `Fetch` and `Publish` go to the generated service unchanged; only the `Sync` route is
//! taken here, with the same message size and compression settings.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BufMut;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::{Request, Response, Status, Streaming};

use super::session::Frame;
use super::{FeedService, Origin};
use crate::pb::feed::v1 as pb;

const SYNC_PATH: &str = "/viewcar.feed.v1.Feed/Sync";

/// Encodes [`Frame`]s (a shared frame is copied as is) and decodes `SyncRequest`s.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FrameCodec;

pub(crate) struct FrameEncoder;
pub(crate) struct RequestDecoder;

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = pb::SyncRequest;
    type Encoder = FrameEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder
    }
}

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, item: Frame, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Frame::Shared(bytes) => buf.put_slice(&bytes),
            // EncodeBuf grows as needed, so encoding into it cannot run out of room.
            Frame::Msg(msg) => msg
                .encode(buf)
                .map_err(|e| Status::internal(format!("encoding a feed message: {e}")))?,
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for RequestDecoder {
    type Item = pb::SyncRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<pb::SyncRequest>, Status> {
        pb::SyncRequest::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("malformed SyncRequest: {e}")))
    }
}

/// The `Feed` service of an origin or a relay: `Sync` with shared encodings, the rest generated.
#[derive(Clone)]
pub struct FeedRoutes {
    origin: Origin,
    rest: pb::feed_server::FeedServer<FeedService>,
    max_message: usize,
}

impl FeedRoutes {
    pub(crate) fn new(origin: Origin, max_message: usize) -> Self {
        let rest = pb::feed_server::FeedServer::new(FeedService {
            origin: origin.clone(),
        })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        FeedRoutes {
            origin,
            rest,
            max_message,
        }
    }
}

impl tonic::server::NamedService for FeedRoutes {
    const NAME: &'static str = pb::feed_server::SERVICE_NAME;
}

struct SyncSvc(Origin);

impl tonic::server::StreamingService<pb::SyncRequest> for SyncSvc {
    type Response = Frame;
    type ResponseStream = ReceiverStream<Result<Frame, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<pb::SyncRequest>>) -> Self::Future {
        let origin = self.0.clone();
        Box::pin(async move { origin.open_sync(request.into_inner()) })
    }
}

impl<B> Service<http::Request<B>> for FeedRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SYNC_PATH {
            return self.rest.call(req);
        }
        let method = SyncSvc(self.origin.clone());
        let max = self.max_message;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(FrameCodec)
                .apply_max_message_size_config(Some(max), Some(max));
            Ok(grpc.streaming(method, req).await)
        })
    }
}

/// Keeps the generated `Sync` of [`FeedService`] working for code that serves it directly:
/// shared frames are decoded back into messages (correct, but without the shared encoding).
pub(crate) fn unshare(frame: Frame) -> Result<pb::SyncResponse, Status> {
    match frame {
        Frame::Msg(m) => Ok(m),
        Frame::Shared(b) => pb::SyncResponse::decode(b)
            .map_err(|e| Status::internal(format!("re-decoding a shared feed message: {e}"))),
    }
}

/// An accepted connection holding one of the listener's `max_connections` permits until it
/// closes.
pub(crate) struct Bounded {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Bounded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Bounded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener` while fewer than `max` are open; past it the next one
/// waits in the kernel's backlog until one closes. Nagle off on each (a reply of more than one
/// segment would otherwise wait for a delayed ACK). An accept error (out of descriptors) is
/// logged once per burst and retried, never the end of the server.
pub(crate) fn bounded_incoming(
    listener: tokio::net::TcpListener,
    max: usize,
) -> impl tokio_stream::Stream<Item = Result<Bounded, std::io::Error>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        let permit = permits.clone().acquire_owned().await.ok()?;
        let mut logged = false;
        loop {
            match listener.accept().await {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    let conn = Bounded {
                        io,
                        _permit: permit,
                    };
                    return Some((Ok(conn), (listener, permits)));
                }
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "feed listener: accept failed; retrying");
                        logged = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
    })
}
