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

/// One row as a snapshot entry message.
pub(crate) fn entry(key: &str, row: &super::Stored) -> pb::Entry {
    pb::Entry {
        key: key.to_string(),
        value: row.value.clone(),
        version: row.version,
    }
}

/// Encodes a whole-topic snapshot chunk (`SyncResponse { snapshot: SnapshotChunk }`) straight
/// from the origin's rows: the same bytes as building the message and `encode_to_vec`, without
/// a `String` copy of every key and a reference-count round trip of every value. A million-key
/// snapshot is encoded once per epoch and version, before its first chunk can go out.
pub(crate) fn encode_snapshot_chunk(
    topic: &str,
    epoch: &str,
    version: u64,
    entries: &[(&std::sync::Arc<str>, &super::Stored)],
    last: bool,
    total_entries: u64,
) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    fn str_len(tag: u32, s: &[u8]) -> usize {
        if s.is_empty() {
            0
        } else {
            prost::encoding::key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
        }
    }
    fn u64_len(tag: u32, v: u64) -> usize {
        if v == 0 {
            0
        } else {
            prost::encoding::key_len(tag) + encoded_len_varint(v)
        }
    }
    fn put_str(tag: u32, s: &[u8], buf: &mut Vec<u8>) {
        if !s.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(s.len() as u64, buf);
            buf.put_slice(s);
        }
    }
    fn put_u64(tag: u32, v: u64, buf: &mut Vec<u8>) {
        if v != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(v, buf);
        }
    }
    fn msg_len(tag: u32, len: usize) -> usize {
        prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
    }
    // Entry { key = 1; value = 2; version = 3 }
    let entry_len = |k: &str, s: &super::Stored| {
        str_len(1, k.as_bytes()) + str_len(2, &s.value) + u64_len(3, s.version)
    };
    // Position { epoch = 1; version = 2 } (always present)
    let position_len = str_len(1, epoch.as_bytes()) + u64_len(2, version);
    // SnapshotChunk { topic = 1; position = 2; entries = 3; last = 4; total_entries = 5 }
    let entries_len: usize = entries
        .iter()
        .map(|(k, s)| msg_len(3, entry_len(k, s)))
        .sum();
    let chunk_len = str_len(1, topic.as_bytes())
        + msg_len(2, position_len)
        + entries_len
        + if last { 2 } else { 0 }
        + u64_len(5, total_entries);
    // SyncResponse { snapshot = 1 }
    let mut buf = Vec::with_capacity(msg_len(1, chunk_len));
    encode_key(1, WireType::LengthDelimited, &mut buf);
    encode_varint(chunk_len as u64, &mut buf);
    put_str(1, topic.as_bytes(), &mut buf);
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(position_len as u64, &mut buf);
    put_str(1, epoch.as_bytes(), &mut buf);
    put_u64(2, version, &mut buf);
    for (k, s) in entries {
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(entry_len(k, s) as u64, &mut buf);
        put_str(1, k.as_bytes(), &mut buf);
        put_str(2, &s.value, &mut buf);
        put_u64(3, s.version, &mut buf);
    }
    if last {
        encode_key(4, WireType::Varint, &mut buf);
        encode_varint(1, &mut buf);
    }
    put_u64(5, total_entries, &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use proptest::prelude::*;
    use prost::Message;

    use super::super::Stored;
    use super::*;

    proptest! {
        /// The direct encoding is byte for byte what prost makes of the same message.
        #[test]
        fn a_snapshot_chunk_encodes_as_prost_does(
            topic in "[a-z]{0,8}",
            epoch in "[a-z0-9-]{0,12}",
            version in prop_oneof![Just(0u64), any::<u64>()],
            rows in prop::collection::vec(
                ("[a-zé]{0,6}", prop::collection::vec(any::<u8>(), 0..200), prop_oneof![Just(0u64), any::<u64>()]),
                0..20,
            ),
            last in any::<bool>(),
            total in prop_oneof![Just(0u64), any::<u64>()],
        ) {
            let rows: Vec<(Arc<str>, Stored)> = rows
                .into_iter()
                .map(|(k, v, ver)| (Arc::from(k), Stored { value: Bytes::from(v), version: ver }))
                .collect();
            let refs: Vec<(&Arc<str>, &Stored)> = rows.iter().map(|(k, s)| (k, s)).collect();
            let direct = encode_snapshot_chunk(&topic, &epoch, version, &refs, last, total);
            let msg = pb::SyncResponse {
                kind: Some(pb::sync_response::Kind::Snapshot(pb::SnapshotChunk {
                    topic: topic.clone(),
                    position: Some(pb::Position { epoch: epoch.clone(), version }),
                    entries: rows.iter().map(|(k, s)| entry(k, s)).collect(),
                    last,
                    total_entries: total,
                })),
            };
            prop_assert_eq!(direct, msg.encode_to_vec());
        }
    }
}
