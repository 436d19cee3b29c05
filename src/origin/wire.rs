//! The `Feed` service on the wire, with `Sync` answered by a body that sends a shared, already
//! framed message as its bytes: a change batch or a snapshot chunk that thousands of streams send
//! is encoded once (a relay's whole point), and no stream copies it. Through tonic's encoder each
//! stream copied every message into a buffer of its own, so a relay with a thousand leaves in a
//! snapshot storm held a thousand copies of the snapshot in flight.
//!
//! `Fetch` and `Publish` go to the generated service unchanged; only the `Sync` route is
//! taken here, with the same message size limit. Compression is not built in, as for the rest.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::codec::{DecodeBuf, Decoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::{Code, Status, Streaming};

use super::gate::Gate;
use super::session::{self, Frame};
use super::{FeedService, Origin};
use crate::pb::feed::v1 as pb;

const SYNC_PATH: &str = "/viewcar.feed.v1.Feed/Sync";

/// The gRPC message prefix: a compression flag (0: none) and the length, big-endian.
pub(crate) const HEADER: usize = 5;

fn put_header(buf: &mut [u8], len: usize) {
    buf[0] = 0;
    // A message the prefix cannot state is refused by SyncBody (`too_long`) before it is sent.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    buf[1..HEADER].copy_from_slice(&len.to_be_bytes());
}

/// `msg` as one gRPC message on the wire: the prefix, then its encoding.
pub(crate) fn framed(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(HEADER + len);
    buf.put_bytes(0, HEADER);
    put_header(&mut buf, len);
    msg.encode_raw(&mut buf);
    Bytes::from(buf)
}

/// Decodes `SyncRequest`s.
pub(crate) struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = pb::SyncRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<pb::SyncRequest>, Status> {
        pb::SyncRequest::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("malformed SyncRequest: {e}")))
    }
}

/// The response body of one `Sync` stream: each frame the session sends goes to HTTP/2 as a
/// DATA chunk (a shared frame by reference), and the stream's end or error as the trailers.
/// Small frames already waiting are sent together in one chunk, as tonic's encoder did: one
/// HTTP/2 frame and one copy instead of a frame each.
///
/// The body also runs the session: HTTP/2 polls it on the stream's task, and the body polls the
/// session whenever it has no frame to give. A change offered to the stream thus wakes one task,
/// where a session on a task of its own woke that task and then, with the frame it queued,
/// the stream's (one hop and one wakeup less per delivery, a relay's cost). Dropping the body
/// (a reset stream, a closed connection) drops the session, which leaves its topics at once.
struct SyncBody {
    frames: session::Frames,
    /// The session sending `frames`, until it ends. `None` for frames sent from elsewhere.
    session: Option<session::Running>,
    /// What the session is polled through: only when something it waits on woke it. HTTP/2
    /// polls the body again after every frame it takes, and polling a session nothing woke
    /// polls everything it waits on (the stream's request half, under its connection's lock,
    /// among them) to learn it has nothing.
    gate: Gate,
    /// A frame taken while gathering small ones that did not join them: the next to send.
    held: Option<Result<Frame, Status>>,
    max_message: usize,
    done: bool,
}

/// Whether a message of `len` bytes may not be sent: over `max_message_bytes` (which the
/// config does not cap), or over what the 4-byte length of its prefix can state.
fn too_long(len: usize, max_message: usize) -> bool {
    len > max_message || u32::try_from(len).is_err()
}

/// Frames at most this long that are waiting together go out as one chunk.
const GATHER: usize = 16 * 1024;

impl SyncBody {
    /// The frame's bytes on the wire, or the status that ends the stream.
    fn bytes(&self, frame: Result<Frame, Status>) -> Result<Bytes, Status> {
        let bytes = match frame? {
            Frame::Shared(b) => b,
            Frame::Msg(m) => framed(&m),
        };
        let len = bytes.len() - HEADER;
        if too_long(len, self.max_message) {
            return Err(Status::out_of_range(format!(
                "a Sync message of {len} bytes is over this server's limit of {} bytes \
                 (max_message_bytes)",
                self.max_message
            )));
        }
        Ok(bytes)
    }

    /// The next frame: one waiting, else whatever running the session makes; `None` once every
    /// frame is taken and the session has ended (its sender ends with it).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, Status>>> {
        if let Some(held) = self.held.take() {
            return Poll::Ready(Some(held));
        }
        if let Some(frame) = self.frames.try_recv() {
            return Poll::Ready(Some(frame));
        }
        if let Some(session) = self.session.as_mut() {
            if self
                .gate
                .poll(cx, |cx| session.as_mut().poll(cx))
                .is_pending()
            {
                // The session sends only while it is polled here: with nothing queued, the
                // body waits on what the session waits on.
                return match self.frames.try_recv() {
                    Some(frame) => Poll::Ready(Some(frame)),
                    None => Poll::Pending,
                };
            }
            self.session = None;
        }
        self.frames.poll_recv(cx)
    }

    /// `first`, followed by the small frames already waiting behind it.
    fn gather(&mut self, first: Bytes) -> Bytes {
        if first.len() > GATHER {
            return first;
        }
        let mut chunk: Option<bytes::BytesMut> = None;
        while let Some(next) = self.frames.try_recv() {
            let next = match self.bytes(next) {
                Ok(b) if chunk.as_ref().map_or(first.len(), |c| c.len()) + b.len() <= GATHER => b,
                other => {
                    self.held = Some(other.map(Frame::Shared));
                    break;
                }
            };
            chunk
                .get_or_insert_with(|| {
                    let mut c = bytes::BytesMut::with_capacity(GATHER);
                    c.put_slice(&first);
                    c
                })
                .put_slice(&next);
        }
        chunk.map_or(first, bytes::BytesMut::freeze)
    }
}

impl Body for SyncBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = ready!(self.poll_next(cx));
        let status = match next.map(|f| self.bytes(f)) {
            Some(Ok(first)) => {
                let chunk = self.gather(first);
                return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
            }
            Some(Err(status)) => status,
            None => Status::new(Code::Ok, ""),
        };
        self.done = true;
        // A session still running (its frame was refused as too long) ends here.
        self.session = None;
        self.frames.close();
        let mut trailers = http::HeaderMap::new();
        if let Err(bad) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = bad.add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
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
        let origin = self.origin.clone();
        let max_message = self.max_message;
        Box::pin(async move { Ok(sync(origin, req, max_message)) })
    }
}

/// Answers one `Sync` call: its requests decoded by tonic, its frames sent by [`SyncBody`].
fn sync<B>(
    origin: Origin,
    req: http::Request<B>,
    max_message: usize,
) -> http::Response<tonic::body::Body>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    if let Some(encoding) = req.headers().get("grpc-encoding") {
        if encoding.as_bytes() != b"identity" {
            return Status::unimplemented(format!(
                "Sync requests compressed with '{}' are not supported: send them uncompressed",
                String::from_utf8_lossy(encoding.as_bytes())
            ))
            .into_http();
        }
    }
    let conn = connection_key(req.extensions());
    let requests = Streaming::new_request(RequestDecoder, req.into_body(), None, Some(max_message));
    match origin.open_sync(requests, conn) {
        Ok((frames, running)) => {
            let body = SyncBody {
                frames,
                session: Some(running),
                gate: Gate::new(),
                held: None,
                max_message,
                done: false,
            };
            let mut resp = http::Response::new(tonic::body::Body::new(body));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            resp
        }
        Err(status) => status.into_http(),
    }
}

/// A key shared by the streams of one connection (see `SessionId`): its peer's address,
/// which tonic puts in each request's extensions; 0 without one (a Unix socket).
fn connection_key(ext: &http::Extensions) -> u64 {
    use std::hash::{Hash, Hasher};
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let peer = ext
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|t| t.get_ref().remote_addr())
        });
    peer.map_or(0, |addr| {
        // Any fixed hash: two connections that collide only share an ordering slot.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        addr.hash(&mut h);
        h.finish()
    })
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
/// from the origin's rows, framed as one gRPC message ([`HEADER`], then the same bytes as
/// building the message and `encode_to_vec`), without
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
    let message_len = msg_len(1, chunk_len);
    let mut buf = Vec::with_capacity(HEADER + message_len);
    buf.put_bytes(0, HEADER);
    put_header(&mut buf, message_len);
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
            let encoded = msg.encode_to_vec();
            prop_assert_eq!(&direct[HEADER..], &encoded[..]);
            prop_assert_eq!(&direct[..HEADER], &framed(&msg)[..HEADER]);
            prop_assert_eq!(u32::from_be_bytes(direct[1..HEADER].try_into().unwrap()) as usize, encoded.len());
        }
    }
}

#[cfg(test)]
mod body_tests {
    use std::pin::Pin;

    use bytes::Bytes;
    use proptest::prelude::*;
    use tokio::sync::mpsc;
    use tonic::Status;

    use super::*;

    /// What a session may send: a shared frame (`len` payload bytes), a message built for the
    /// stream, or the status that ends it.
    #[derive(Debug, Clone)]
    enum Step {
        Shared(usize),
        Msg(u64),
        Fail,
    }

    fn shared(len: usize, seed: u8) -> Bytes {
        let payload: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
        let mut b = vec![0; HEADER];
        put_header(&mut b, len);
        b.extend(payload);
        Bytes::from(b)
    }

    fn msg(version: u64) -> pb::SyncResponse {
        pb::SyncResponse {
            kind: Some(pb::sync_response::Kind::Progress(pb::Progress {
                topic: "t".into(),
                position: Some(pb::Position {
                    epoch: "e".into(),
                    version,
                }),
                ..Default::default()
            })),
        }
    }

    /// One poll of the body: `None` when it would wait.
    async fn poll_one(
        body: &mut SyncBody,
    ) -> Option<Option<Result<http_body::Frame<Bytes>, Status>>> {
        std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(f) => Poll::Ready(Some(f)),
        })
        .await
    }

    /// How many whole gRPC messages `chunk` holds (it must hold nothing else).
    fn messages(chunk: &[u8]) -> usize {
        let (mut at, mut n) = (0, 0);
        while at < chunk.len() {
            let len = u32::from_be_bytes(chunk[at + 1..at + HEADER].try_into().unwrap());
            at += HEADER + len as usize;
            n += 1;
        }
        assert_eq!(at, chunk.len(), "a chunk ends inside a message");
        n
    }

    /// The edges of a message's length: up to the limit, and never past the prefix's 4 bytes
    /// whatever the limit says.
    #[test]
    fn a_message_the_prefix_cannot_state_is_too_long_under_any_limit() {
        let four_gib = u32::MAX as usize;
        assert!(!too_long(1024, 1024));
        assert!(too_long(1025, 1024));
        assert!(!too_long(four_gib, usize::MAX));
        assert!(too_long(four_gib + 1, usize::MAX));
    }

    /// The session is polled when something it waits on woke it, not each time HTTP/2 polls the
    /// body; and no wakeup is lost: what the session can send once woken comes out at the
    /// body's next poll, and its end ends the body with OK.
    #[tokio::test]
    async fn the_session_is_polled_only_when_woken() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let (tx, rx) = crate::origin::pipe::channel(64);
        let (items_tx, mut items_rx) = mpsc::channel::<u8>(64);
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let session = Box::pin(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            loop {
                match items_rx.poll_recv(cx) {
                    Poll::Ready(Some(i)) => tx.try_send(Ok(Frame::Shared(shared(10, i)))).unwrap(),
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }));
        let mut body = SyncBody {
            frames: rx,
            session: Some(session),
            gate: Gate::new(),
            held: None,
            max_message: usize::MAX,
            done: false,
        };
        for _ in 0..10 {
            assert!(poll_one(&mut body).await.is_none(), "nothing to send yet");
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled without being woken"
        );
        for i in 0..5u8 {
            items_tx.send(i).await.unwrap();
            let got = poll_one(&mut body).await.flatten().unwrap().unwrap();
            assert_eq!(got.into_data().unwrap(), shared(10, i), "item {i}");
            assert!(poll_one(&mut body).await.is_none());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 6, "one poll per wake");
        drop(items_tx);
        let end = poll_one(&mut body).await.flatten().unwrap().unwrap();
        let trailers = end.into_trailers().expect("the stream's end");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert!(poll_one(&mut body).await.flatten().is_none(), "ended");
    }

    /// What makes a snapshot storm cost one copy: a shared chunk comes out of every stream's
    /// body as the very bytes it went in as, not a copy of them; small ones are gathered.
    #[tokio::test]
    async fn a_shared_frame_goes_out_of_every_stream_uncopied() {
        let chunk = shared(100_000, 7);
        let small = shared(10, 1);
        for _ in 0..2 {
            let (tx, rx) = crate::origin::pipe::channel(4);
            let mut body = SyncBody {
                frames: rx,
                session: None,
                gate: Gate::new(),
                held: None,
                max_message: usize::MAX,
                done: false,
            };
            tx.send(Ok(Frame::Shared(chunk.clone()))).await.unwrap();
            tx.send(Ok(Frame::Shared(small.clone()))).await.unwrap();
            tx.send(Ok(Frame::Shared(small.clone()))).await.unwrap();
            let data = |f: Option<Option<Result<http_body::Frame<Bytes>, Status>>>| {
                f.flatten().unwrap().unwrap().into_data().unwrap()
            };
            let first = data(poll_one(&mut body).await);
            assert_eq!(
                first.as_ptr(),
                chunk.as_ptr(),
                "the shared chunk was copied"
            );
            assert_eq!(first.len(), chunk.len());
            let second = data(poll_one(&mut body).await);
            assert_eq!(
                second.len(),
                2 * small.len(),
                "two small frames in one chunk"
            );
        }
    }

    proptest! {
        /// Oracle: the body's DATA chunks, concatenated, are the sent frames' wire bytes in
        /// order up to the first failure or oversized frame; the trailers carry that status,
        /// or OK; a gathered chunk never passes GATHER, and a frame over it goes alone. The
        /// frames are queued in two rounds, with the body drained between them, so that
        /// gathering stops both at an empty queue and in the middle of one.
        #[test]
        fn a_sync_body_sends_every_frame_in_order_and_ends_with_the_status(
            steps in prop::collection::vec(
                prop_oneof![
                    6 => (0usize..3000).prop_map(Step::Shared),
                    1 => (GATHER - 64..GATHER + 64).prop_map(Step::Shared),
                    2 => any::<u64>().prop_map(Step::Msg),
                    1 => Just(Step::Fail),
                ],
                0..60,
            ),
            split in 0usize..60,
            max_message in prop_oneof![Just(usize::MAX), 1000usize..20_000],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (tx, rx) = crate::origin::pipe::channel(64);
                let mut body = SyncBody { frames: rx, session: None, gate: Gate::new(), held: None, max_message, done: false };
                let mut want = Vec::new();
                let mut want_status: Option<(tonic::Code, String)> = None;
                let mut sent = Vec::new();
                for (i, step) in steps.iter().enumerate() {
                    let (frame, bytes) = match step {
                        Step::Shared(len) => {
                            let b = shared(*len, i as u8);
                            (Ok(Frame::Shared(b.clone())), Some(b))
                        }
                        Step::Msg(v) => (Ok(Frame::Msg(msg(*v))), Some(framed(&msg(*v)))),
                        Step::Fail => (Err(Status::aborted(format!("failure {i}"))), None),
                    };
                    sent.push(frame);
                    if want_status.is_some() {
                        continue;
                    }
                    match bytes {
                        Some(b) if b.len() - HEADER <= max_message => want.extend_from_slice(&b),
                        Some(_) => want_status = Some((tonic::Code::OutOfRange, "max_message_bytes".into())),
                        None => want_status = Some((tonic::Code::Aborted, format!("failure {i}"))),
                    }
                }
                let (want_code, want_text) = want_status.unwrap_or((tonic::Code::Ok, String::new()));
                let split = split.min(sent.len());
                let mut later = sent.split_off(split);
                for f in sent {
                    tx.send(f).await.unwrap();
                }
                let mut got = Vec::new();
                let mut trailers = None;
                // Round one: everything queued so far, until the body waits.
                loop {
                    match poll_one(&mut body).await {
                        None => break,
                        Some(Some(Ok(f))) => match f.into_data() {
                            Ok(d) => {
                                prop_assert!(messages(&d) == 1 || d.len() <= GATHER, "{} bytes", d.len());
                                got.extend_from_slice(&d);
                            }
                            Err(f) => trailers = f.into_trailers().ok(),
                        },
                        Some(Some(Err(e))) => prop_assert!(false, "body error {e}"),
                        Some(None) => break,
                    }
                    if trailers.is_some() {
                        break;
                    }
                }
                for f in later.drain(..) {
                    // The body stops taking frames once it has ended.
                    let _ = tx.send(f).await;
                }
                drop(tx);
                while trailers.is_none() {
                    match poll_one(&mut body).await {
                        Some(Some(Ok(f))) => match f.into_data() {
                            Ok(d) => {
                                prop_assert!(messages(&d) == 1 || d.len() <= GATHER, "{} bytes", d.len());
                                got.extend_from_slice(&d);
                            }
                            Err(f) => trailers = f.into_trailers().ok(),
                        },
                        other => prop_assert!(false, "the body ended without trailers: {other:?}"),
                    }
                }
                prop_assert!(body.is_end_stream());
                prop_assert_eq!(&got, &want);
                let trailers = trailers.unwrap();
                let status = Status::from_header_map(&trailers).expect("a grpc-status trailer");
                prop_assert_eq!(status.code(), want_code);
                prop_assert!(status.message().contains(&want_text), "{}", status.message());
                Ok(())
            })?;
        }
    }
}

#[cfg(test)]
mod connection_tests {
    use futures_util::StreamExt as _;

    use super::super::{Origin, Put};
    use crate::config::OriginConfig;
    use crate::pb::feed::v1 as pb;

    /// Opens a Sync stream of topic `t` on `channel`'s connection, and reads it to its snapshot.
    async fn synced(channel: tonic::transport::Channel) -> tonic::Streaming<pb::SyncResponse> {
        let sub = pb::SyncRequest {
            kind: Some(pb::sync_request::Kind::Subscribe(pb::Subscribe {
                topic: "t".into(),
                keys: vec![],
                resume: None,
            })),
        };
        let mut stream = pb::feed_client::FeedClient::new(channel)
            .sync(futures_util::stream::iter([sub]).chain(futures_util::stream::pending()))
            .await
            .expect("sync")
            .into_inner();
        loop {
            let msg = stream.message().await.expect("message").expect("open");
            if let Some(pb::sync_response::Kind::Snapshot(s)) = msg.kind {
                if s.last {
                    return stream;
                }
            }
        }
    }

    /// A topic's streams are kept connection by connection, whatever order they opened in: the
    /// key tonic's connection info gives is the same for the streams of one connection and
    /// differs between two.
    #[tokio::test]
    async fn a_topics_streams_are_kept_by_connection() {
        let origin = Origin::new(OriginConfig::default());
        origin.publish("t", vec![Put::upsert("k", "v")]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = origin.clone();
        let server = tokio::spawn(async move {
            served
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        let connect = || async {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .expect("connect")
        };
        let (a, b) = (connect().await, connect().await);
        // Opened alternately: a, b, a, b.
        let mut streams = Vec::new();
        for channel in [&a, &b, &a, &b] {
            streams.push(synced(channel.clone()).await);
        }
        let keys: Vec<u64> = origin
            .topic("t", false)
            .unwrap()
            .lock()
            .interests
            .keys()
            .map(|id| id.conn)
            .collect();
        assert_eq!(keys.len(), 4);
        assert_ne!(keys[0], keys[3], "two connections, two keys: {keys:?}");
        assert_eq!(
            keys[0], keys[1],
            "one connection's streams together: {keys:?}"
        );
        assert_eq!(
            keys[2], keys[3],
            "one connection's streams together: {keys:?}"
        );
        drop(streams);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
