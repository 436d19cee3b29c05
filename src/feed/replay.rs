//! For fuzzing and property tests only (`cfg(any(test, feature = "fuzzing"))`): plays arbitrary
//! Sync streams against the feed client's protocol checks, as the session loop does, and
//! panics when an invariant breaks. The only panicking code in the library, and not built into
//! the binary.

// A test harness: its checks are meant to panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

/// What [`replay`] saw.
#[doc(hidden)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Messages handled without error.
    pub handled: usize,
    /// Streams ended by a protocol error (the rest of that stream's messages are not read).
    pub protocol_errors: usize,
}

/// For fuzzing and property tests: plays `streams` (each the messages of one Sync stream, in
/// order) against a feed client of a full topic `t` and an on_demand topic `k`, as the session
/// loop would, applying every writer step at once. A stream that breaks the protocol is dropped
/// like a real one (the client disconnects, and the next stream starts from its cursors).
/// Panics if an invariant breaks: the full topic's version never goes back within an epoch, and
/// a resident on_demand key's version never goes back.
#[doc(hidden)]
pub async fn replay(streams: Vec<Vec<pb::SyncResponse>>) -> Replayed {
    use crate::store::{Clock, SourceKind};
    use crate::types::Mode;
    use crate::writer::Writer;

    let clock = Clock::new();
    let origin: Arc<str> = Arc::from("o");
    let full = Arc::new(Source::new(
        "t",
        SourceKind::Topic {
            origin: origin.clone(),
        },
        Mode::Full,
        clock,
        Duration::from_secs(1),
    ));
    let od = OnDemand::new("k", 1 << 20, None);
    let keyed = Arc::new(
        Source::new(
            "k",
            SourceKind::Topic { origin },
            Mode::OnDemand,
            clock,
            Duration::from_secs(1),
        )
        .with_on_demand(od.clone()),
    );
    let (wtx, mut wrx) = mpsc::channel(1 << 16);
    let mut client = FeedClient::unconnected(vec![full.clone(), keyed], wtx);
    let mut writer = Writer::new(
        Arc::new(crate::hub::Hub::new()),
        None,
        Arc::new(crate::writer::WriterStats::default()),
    );
    // Keys of `k` read before the streams, so that keyed subscribes and snapshots have keys.
    for key in ["a", "b", "c"] {
        od.pin(&Arc::from(key));
    }
    let mut out = Replayed::default();
    let mut events = Vec::new();
    let mut last = full.position();
    let mut resident: HashMap<String, u64> = HashMap::new();
    let mut od_epoch = od.epoch();
    for stream in streams {
        let (req_tx, _req_rx) = client.request_channel();
        client.open_stream(&req_tx);
        for msg in stream {
            let r = client.handle(msg.into(), &req_tx).await;
            while let Ok(op) = wrx.try_recv() {
                writer.apply(op, &mut events);
            }
            writer.flush(&mut events);
            let now = full.position();
            assert!(
                now.0 != last.0 || now.1 >= last.1,
                "full topic went back from {}@{} to {}@{}",
                last.0,
                last.1,
                now.0,
                now.1
            );
            last = now;
            // Versions of another epoch are not comparable.
            let epoch = od.epoch();
            if epoch != od_epoch {
                resident.clear();
                od_epoch = epoch;
            }
            for key in ["a", "b", "c"] {
                if let Some(slot) = od.pinned(key) {
                    let seen = resident.entry(key.to_string()).or_insert(slot.version);
                    assert!(
                        slot.version >= *seen,
                        "k[{key}] went back from version {seen} to {}",
                        slot.version
                    );
                    *seen = slot.version;
                }
            }
            match r {
                Ok(()) => out.handled += 1,
                Err(FeedError::Protocol(_)) => {
                    out.protocol_errors += 1;
                    break;
                }
                Err(e) => panic!("replay: unexpected error {e}"),
            }
        }
        client.disconnected().await;
        while let Ok(op) = wrx.try_recv() {
            writer.apply(op, &mut events);
        }
        writer.flush(&mut events);
    }
    out
}

/// For fuzzing and property tests: decodes arbitrary bytes into Sync streams for [`replay`]:
/// up to 4 streams of up to 16 messages over the topics `t`, `k` and an unknown `x`, with two
/// epochs, versions 0 to 7 and keys `a` to `d`, so that duplicates, gaps, regressions, stray
/// chunks and epoch changes are frequent. Missing bytes read as zeros.
#[doc(hidden)]
pub fn decode_streams(data: &[u8]) -> Vec<Vec<pb::SyncResponse>> {
    use pb::sync_response::Kind;
    struct Input<'a>(&'a [u8]);
    impl Input<'_> {
        fn byte(&mut self) -> u8 {
            match self.0.split_first() {
                Some((b, rest)) => {
                    self.0 = rest;
                    *b
                }
                None => 0,
            }
        }
        fn topic(&mut self) -> String {
            ["t", "k", "t", "k", "x"][usize::from(self.byte() % 5)].to_string()
        }
        fn epoch(&mut self) -> String {
            format!("e{}", self.byte() % 2)
        }
        fn version(&mut self) -> u64 {
            u64::from(self.byte() % 8)
        }
        fn key(&mut self) -> String {
            ["a", "b", "c", "d"][usize::from(self.byte() % 4)].to_string()
        }
        fn position(&mut self) -> Option<pb::Position> {
            (self.byte() % 8 != 0).then(|| pb::Position {
                epoch: self.epoch(),
                version: self.version(),
            })
        }
    }
    let mut inp = Input(data);
    let mut streams = Vec::new();
    while !inp.0.is_empty() && streams.len() < 4 {
        let n = usize::from(inp.byte() % 17);
        let mut msgs = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = match inp.byte() % 9 {
                0..=2 => {
                    let topic = inp.topic();
                    let position = inp.position();
                    let entries: Vec<pb::Entry> = (0..inp.byte() % 4)
                        .map(|_| pb::Entry {
                            key: inp.key(),
                            value: bytes::Bytes::from(vec![b'v'; usize::from(inp.byte() % 3)]),
                            version: inp.version(),
                        })
                        .collect();
                    // A hint from the peer, wrong and up to absurd (derived, so that the byte
                    // layout of recorded streams stays as it was).
                    let total_entries = (entries.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    Kind::Snapshot(pb::SnapshotChunk {
                        total_entries,
                        topic,
                        position,
                        entries,
                        last: inp.byte() % 3 != 0,
                    })
                }
                3..=5 => {
                    let topic = inp.topic();
                    let epoch = inp.epoch();
                    let prev_version = inp.version();
                    let version = if inp.byte() % 4 == 0 {
                        inp.version()
                    } else {
                        prev_version + 1
                    };
                    let changes = (0..inp.byte() % 3)
                        .map(|_| pb::Change {
                            key: inp.key(),
                            value: bytes::Bytes::from(vec![b'w'; usize::from(inp.byte() % 3)]),
                            deleted: inp.byte() % 4 == 0,
                        })
                        .collect();
                    Kind::Changes(pb::ChangeBatch {
                        topic,
                        epoch,
                        prev_version,
                        version,
                        changes,
                        group: None,
                    })
                }
                6 | 7 => Kind::Progress(pb::Progress {
                    topic: inp.topic(),
                    position: inp.position(),
                    ..Default::default()
                }),
                _ => Kind::Reset(pb::Reset {
                    topic: inp.topic(),
                    reason: "replay".into(),
                }),
            };
            msgs.push(pb::SyncResponse { kind: Some(kind) });
        }
        streams.push(msgs);
    }
    streams
}
