//! Sync responses with snapshot chunks read in place.
//!
//! A 1M-key snapshot is a million `Entry` messages. Decoded by prost, each is a `String` (an
//! allocation and a copy) and a `Bytes` (a reference count on the message), and the chunk a
//! `Vec` of them, all freed once the writer has copied the rows into its own allocations.
//! [`SyncMessage`] is wire-compatible with `SyncResponse`: it decodes every other kind as
//! prost does, but keeps a `SnapshotChunk` as the bytes it came in and records where each
//! entry's key and value lie ([`parse`]). Anything the fast path does not expect (a field
//! repeated, an unknown field, a non-minimal form it does not parse) falls back to prost's
//! decoding of that chunk, so what is accepted, and how, stays prost's.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{encode_key, encode_varint, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::pb::feed::v1 as pb;
use crate::writer::{RawEntries, RawEntry, SnapEntries, SnapEntry};

/// A snapshot chunk with its entries as spans of the message.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) topic: String,
    pub(crate) position: Option<pb::Position>,
    pub(crate) entries: SnapEntries,
    pub(crate) last: bool,
    pub(crate) total_entries: u64,
}

/// What a `SyncResponse` carries, with a snapshot chunk kept as its bytes.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Snapshot(Bytes),
    Other(pb::sync_response::Kind),
}

/// A `SyncResponse` as the sidecar reads it (see the module docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncMessage {
    pub(crate) kind: Option<Kind>,
}

const SNAPSHOT_TAG: u32 = 1;

impl From<pb::SyncResponse> for SyncMessage {
    /// Through the wire form, as a stream delivers it (replays and tests).
    fn from(m: pb::SyncResponse) -> Self {
        SyncMessage::decode(m.encode_to_vec().as_slice()).unwrap_or(SyncMessage {
            kind: m.kind.map(Kind::Other),
        })
    }
}

impl Message for SyncMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.kind {
            Some(Kind::Snapshot(b)) => {
                encode_key(SNAPSHOT_TAG, WireType::LengthDelimited, buf);
                encode_varint(b.len() as u64, buf);
                buf.put_slice(b);
            }
            Some(Kind::Other(k)) => k.encode(buf),
            None => {}
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == SNAPSHOT_TAG {
            let mut bytes = Bytes::new();
            prost::encoding::bytes::merge(wire_type, &mut bytes, buf, ctx)?;
            // A oneof field seen twice: prost merges a second message of the same field into
            // the first; the bytes of both, back to back, decode to exactly that.
            if let Some(Kind::Snapshot(prev)) = self.kind.take() {
                let mut both = Vec::with_capacity(prev.len() + bytes.len());
                both.extend_from_slice(&prev);
                both.extend_from_slice(&bytes);
                bytes = Bytes::from(both);
            }
            self.kind = Some(Kind::Snapshot(bytes));
            return Ok(());
        }
        let mut other = match self.kind.take() {
            Some(Kind::Other(k)) => Some(k),
            _ => None,
        };
        let r = pb::sync_response::Kind::merge(&mut other, tag, wire_type, buf, ctx);
        self.kind = other.map(Kind::Other);
        r
    }

    fn encoded_len(&self) -> usize {
        match &self.kind {
            Some(Kind::Snapshot(b)) => prost::encoding::bytes::encoded_len(SNAPSHOT_TAG, b),
            Some(Kind::Other(k)) => k.encoded_len(),
            None => 0,
        }
    }

    fn clear(&mut self) {
        self.kind = None;
    }
}

/// Reads a snapshot chunk: in place when it has the form an encoder makes (each field once,
/// in any order), by prost otherwise.
pub(crate) fn parse(bytes: Bytes) -> Result<Chunk, DecodeError> {
    if let Some(chunk) = fast(&bytes) {
        return Ok(chunk);
    }
    Ok(Chunk::from(pb::SnapshotChunk::decode(bytes)?))
}

/// A `SyncResponse`'s kind with its snapshot chunk read (see [`parse`]).
#[derive(Debug)]
pub(crate) enum Received {
    Snapshot(Chunk),
    Changes(pb::ChangeBatch),
    Progress(pb::Progress),
    Reset(pb::Reset),
    Refused(pb::Refused),
}

impl Received {
    /// `None` for a message without a kind.
    pub(crate) fn read(m: SyncMessage) -> Result<Option<Received>, DecodeError> {
        use pb::sync_response::Kind as K;
        Ok(match m.kind {
            None => None,
            Some(Kind::Snapshot(b)) => Some(Received::Snapshot(parse(b)?)),
            Some(Kind::Other(k)) => Some(match k {
                K::Snapshot(c) => Received::Snapshot(Chunk::from(c)),
                K::Changes(b) => Received::Changes(b),
                K::Progress(p) => Received::Progress(p),
                K::Reset(r) => Received::Reset(r),
                K::Refused(r) => Received::Refused(r),
            }),
        })
    }

    /// Back to prost's type (keyed subscriptions, whose snapshots are small, read that).
    pub(crate) fn into_pb(self) -> pb::sync_response::Kind {
        use pb::sync_response::Kind as K;
        match self {
            Received::Snapshot(c) => K::Snapshot(c.into_pb()),
            Received::Changes(b) => K::Changes(b),
            Received::Progress(p) => K::Progress(p),
            Received::Reset(r) => K::Reset(r),
            Received::Refused(r) => K::Refused(r),
        }
    }
}

impl From<pb::SnapshotChunk> for Chunk {
    fn from(c: pb::SnapshotChunk) -> Self {
        Chunk {
            topic: c.topic,
            position: c.position,
            entries: SnapEntries::Decoded(
                c.entries
                    .into_iter()
                    .map(|e| SnapEntry {
                        key: e.key,
                        value: e.value,
                        version: e.version,
                    })
                    .collect(),
            ),
            last: c.last,
            total_entries: c.total_entries,
        }
    }
}

impl Chunk {
    fn into_pb(self) -> pb::SnapshotChunk {
        let entries = match self.entries {
            SnapEntries::Decoded(v) => v
                .into_iter()
                .map(|e| pb::Entry {
                    key: e.key,
                    value: e.value,
                    version: e.version,
                })
                .collect(),
            raw @ SnapEntries::Raw(_) => {
                let mut out = Vec::with_capacity(raw.len());
                raw.for_each(|key, version, value| {
                    out.push(pb::Entry {
                        key: String::from_utf8_lossy(key).into_owned(),
                        value: Bytes::copy_from_slice(value),
                        version,
                    })
                });
                out
            }
        };
        pb::SnapshotChunk {
            topic: self.topic,
            position: self.position,
            entries,
            last: self.last,
            total_entries: self.total_entries,
        }
    }
}

/// A cursor over a message's bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.at >= self.b.len()
    }

    /// A varint of at most 10 bytes whose value fits 64 bits, as prost reads it.
    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let byte = *self.b.get(self.at)?;
            self.at += 1;
            if i == 9 && byte > 1 {
                return None;
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// A field's key: its number and wire type.
    fn key(&mut self) -> Option<(u64, u64)> {
        let k = self.varint()?;
        if k > u64::from(u32::MAX) {
            return None;
        }
        Some((k >> 3, k & 7))
    }

    /// A length-delimited field's byte range.
    fn span(&mut self) -> Option<(usize, usize)> {
        let len = usize::try_from(self.varint()?).ok()?;
        let end = self.at.checked_add(len).filter(|&e| e <= self.b.len())?;
        let span = (self.at, end);
        self.at = end;
        Some(span)
    }
}

const VARINT: u64 = 0;
const LEN: u64 = 2;

/// The fast path: `None` for anything it does not read exactly as prost would.
fn fast(buf: &Bytes) -> Option<Chunk> {
    let mut r = Reader { b: buf, at: 0 };
    let mut topic: Option<(usize, usize)> = None;
    let mut position: Option<(usize, usize)> = None;
    let mut last: Option<bool> = None;
    let mut total: Option<u64> = None;
    let mut spans = Vec::new();
    while !r.done() {
        match r.key()? {
            (1, LEN) if topic.is_none() => topic = Some(r.span()?),
            (2, LEN) if position.is_none() => position = Some(r.span()?),
            (3, LEN) => {
                let (start, end) = r.span()?;
                spans.push(entry(buf, start, end)?);
            }
            (4, VARINT) if last.is_none() => last = Some(r.varint()? != 0),
            (5, VARINT) if total.is_none() => total = Some(r.varint()?),
            _ => return None,
        }
    }
    let topic = match topic {
        Some((s, e)) => std::str::from_utf8(&buf[s..e]).ok()?.to_owned(),
        None => String::new(),
    };
    let position = match position {
        Some((s, e)) => Some(pb::Position::decode(&buf[s..e]).ok()?),
        None => None,
    };
    Some(Chunk {
        topic,
        position,
        entries: SnapEntries::Raw(RawEntries {
            buf: buf.clone(),
            spans,
        }),
        last: last.unwrap_or(false),
        total_entries: total.unwrap_or(0),
    })
}

/// An `Entry` at `buf[start..end]`.
fn entry(buf: &[u8], start: usize, end: usize) -> Option<RawEntry> {
    let mut r = Reader {
        b: &buf[..end],
        at: start,
    };
    let mut key: Option<(usize, usize)> = None;
    let mut value: Option<(usize, usize)> = None;
    let mut version: Option<u64> = None;
    while !r.done() {
        match r.key()? {
            (1, LEN) if key.is_none() => key = Some(r.span()?),
            (2, LEN) if value.is_none() => value = Some(r.span()?),
            (3, VARINT) if version.is_none() => version = Some(r.varint()?),
            _ => return None,
        }
    }
    let key = key.unwrap_or((start, start));
    std::str::from_utf8(&buf[key.0..key.1]).ok()?;
    Some(RawEntry {
        key,
        value: value.unwrap_or((start, start)),
        version: version.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(c: &Chunk) -> Vec<(String, u64, Vec<u8>)> {
        let mut out = Vec::new();
        c.entries.for_each(|k, v, val| {
            out.push((String::from_utf8_lossy(k).into_owned(), v, val.to_vec()))
        });
        out
    }

    fn chunk() -> impl Strategy<Value = pb::SnapshotChunk> {
        (
            "[a-z]{0,4}",
            proptest::option::of(("[a-z0-9]{0,6}", any::<u64>())),
            proptest::collection::vec(
                (
                    "\\PC{0,6}",
                    proptest::collection::vec(any::<u8>(), 0..8),
                    any::<u64>(),
                ),
                0..6,
            ),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(topic, pos, entries, last, total)| pb::SnapshotChunk {
                topic,
                position: pos.map(|(epoch, version)| pb::Position { epoch, version }),
                entries: entries
                    .into_iter()
                    .map(|(key, value, version)| pb::Entry {
                        key,
                        value: value.into(),
                        version,
                    })
                    .collect(),
                last,
                total_entries: total,
            })
    }

    proptest! {
        /// Oracle: prost's decoding of the same bytes. Every encoded chunk takes the fast
        /// path; bytes changed at random are accepted by `parse` exactly when prost accepts
        /// them, with the same result.
        #[test]
        fn parse_agrees_with_prost(
            c in chunk(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let bytes = c.encode_to_vec();
            prop_assert!(fast(&Bytes::from(bytes.clone())).is_some(), "an encoder's form takes the fast path");
            let mut bytes = bytes;
            for (i, b) in flips {
                if !bytes.is_empty() {
                    let i = i.index(bytes.len());
                    bytes[i] = b;
                }
            }
            if let Some(cut) = cut {
                if !bytes.is_empty() {
                    bytes.truncate(cut.index(bytes.len()));
                }
            }
            let want = pb::SnapshotChunk::decode(&bytes[..]);
            let got = parse(Bytes::from(bytes));
            match (want, got) {
                (Ok(w), Ok(g)) => {
                    prop_assert_eq!(&g.topic, &w.topic);
                    prop_assert_eq!(&g.position, &w.position);
                    prop_assert_eq!(g.last, w.last);
                    prop_assert_eq!(g.total_entries, w.total_entries);
                    let want: Vec<_> = w
                        .entries
                        .iter()
                        .map(|e| (e.key.clone(), e.version, e.value.to_vec()))
                        .collect();
                    prop_assert_eq!(decoded(&g), want);
                }
                (Err(_), Err(_)) => {}
                (w, g) => prop_assert!(false, "prost {:?}, parse {:?}", w.map(|_| ()), g.map(|_| ())),
            }
        }

        /// A `SyncResponse` of any kind reads the same through [`SyncMessage`].
        #[test]
        fn sync_messages_read_as_sync_responses(c in chunk(), which in 0u8..3) {
            let kind = match which {
                0 => pb::sync_response::Kind::Snapshot(c.clone()),
                1 => pb::sync_response::Kind::Progress(pb::Progress {
                    topic: c.topic.clone(),
                    ..Default::default()
                }),
                _ => pb::sync_response::Kind::Reset(pb::Reset {
                    topic: c.topic.clone(),
                    reason: "r".into(),
                }),
            };
            let m = pb::SyncResponse { kind: Some(kind.clone()) };
            let bytes = m.encode_to_vec();
            let got = SyncMessage::decode(&bytes[..]).expect("decodes");
            prop_assert_eq!(got.encoded_len(), bytes.len());
            prop_assert_eq!(got.encode_to_vec(), bytes);
            match (got.kind, kind) {
                (Some(Kind::Snapshot(b)), pb::sync_response::Kind::Snapshot(want)) => {
                    prop_assert_eq!(pb::SnapshotChunk::decode(b).expect("chunk"), want);
                }
                (Some(Kind::Other(k)), want) => prop_assert_eq!(k, want),
                (got, want) => prop_assert!(false, "{:?} for {:?}", got, want),
            }
        }
    }
}
