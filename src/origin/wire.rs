//! The `Feed` service on the wire, with `Sync` answered through a codec that sends a shared,
//! already encoded message as its bytes: a change batch or a snapshot chunk that thousands of
//! streams send is encoded once (a relay's whole point), not once per stream.
//!
//! `Fetch` and `Publish` go to the generated service unchanged; only the `Sync` route is
//! taken here, with the same message size and compression settings.

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
