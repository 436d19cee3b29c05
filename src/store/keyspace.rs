//! The rows of a full source: one allocation per row in a sharded hash table, and a compact
//! ordered index of the keys for prefix scans.
//!
//! Layout, and why. A sidecar runs in every pod, so its bytes per key are multiplied by the
//! fleet. A row is one boxed byte string, `[version: u64 LE][key length: LEB128][key][value]`:
//! one malloc chunk, no separate key, no reference counts (a value of 100 B with a 12 B key is a
//! 144 B chunk). The table stores only that box (16 B a slot), and it is sharded into a number
//! of shards chosen so that a known row count (a snapshot's `total_entries`) fills the
//! power-of-two tables near their load limit instead of leaving them half empty.
//!
//! The ordered index holds each key once more, packed: the keys in order in one arena (a
//! snapshot builds it in bulk), plus small overlays of keys added and removed since, merged
//! into a new arena when they grow past a quarter of it. Updating a key's value never touches
//! the index.
//!
//! Readers copy a row's value out under the shard's read lock; only the writer task mutates.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use hashbrown::HashTable;

use super::Row;

/// A row, borrowed from its keyspace: its key, version and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef<'a> {
    pub key: &'a str,
    pub version: u64,
    pub value: &'a [u8],
}

impl RowRef<'_> {
    /// The row as an owned answer (the value copied).
    pub fn to_row(&self) -> Row {
        Row {
            value: Bytes::copy_from_slice(self.value),
            version: self.version,
        }
    }
}

/// One row in one allocation: `[version: u64 LE][key length: LEB128][key][value]`.
type Packed = Box<[u8]>;

fn pack(key: &[u8], version: u64, value: &[u8]) -> Packed {
    let mut len = [0u8; 10];
    let n = leb128(key.len() as u64, &mut len);
    let mut v = Vec::with_capacity(8 + n + key.len() + value.len());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&len[..n]);
    v.extend_from_slice(key);
    v.extend_from_slice(value);
    v.into_boxed_slice()
}

fn leb128(mut x: u64, out: &mut [u8; 10]) -> usize {
    let mut i = 0;
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            out[i] = b;
            return i + 1;
        }
        out[i] = b | 0x80;
        i += 1;
    }
}

/// Reads a row made by [`pack`]. Rows are only made by `pack` from a `&str` key, so the
/// layout holds; a malformed one would be a bug here, and reads as an empty key and value
/// rather than panicking a reader.
fn unpack(p: &[u8]) -> RowRef<'_> {
    let (version, key, value) = parts(p);
    RowRef {
        key: std::str::from_utf8(key).unwrap_or(""),
        version,
        value,
    }
}

/// The version, key bytes and value of a packed row (see [`unpack`]).
fn parts(p: &[u8]) -> (u64, &[u8], &[u8]) {
    let version = p
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    let mut klen: u64 = 0;
    let mut at = 8;
    let mut shift = 0;
    while let Some(&b) = p.get(at) {
        at += 1;
        klen |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let kend = usize::try_from(klen)
        .ok()
        .and_then(|k| at.checked_add(k))
        .filter(|&e| e <= p.len())
        .unwrap_or(at.min(p.len()));
    (version, &p[at.min(kend)..kend], &p[kend..])
}

/// A packed row's version and the key + value bytes it counts for in [`Keyspace::bytes`].
fn counted(p: &[u8]) -> (u64, u64) {
    let (version, key, value) = parts(p);
    (version, (key.len() + value.len()) as u64)
}

/// A packed row's key, as bytes: probes compare and hash bytes, so that a lookup does not
/// check UTF-8 again (rows are only made from `&str` keys).
fn packed_key(p: &Packed) -> &[u8] {
    parts(p).1
}

type Hasher = foldhash::fast::RandomState;
type Shard = RwLock<HashTable<Packed>>;

/// Shard counts tried when sizing for a known row count.
const SHARDS: std::ops::RangeInclusive<usize> = 8..=64;
/// Shards of a keyspace of unknown size.
const SHARDS_DEFAULT: usize = 16;

/// Buckets hashbrown allocates for `cap` rows (its own rule: 7/8 load, powers of two).
fn buckets(cap: usize) -> usize {
    if cap < 8 {
        return if cap < 4 { 4 } else { 8 };
    }
    (cap.saturating_mul(8) / 7).next_power_of_two()
}

/// The shard count and per-shard capacity that hold `rows` in the fewest buckets. Each shard
/// gets its expected share plus four standard deviations, so that no shard grows (doubles)
/// while a snapshot of `rows` keys loads.
fn plan(rows: usize) -> (usize, usize) {
    if rows == 0 {
        return (SHARDS_DEFAULT, 0);
    }
    SHARDS
        .map(|s| {
            let share = rows.div_ceil(s);
            let cap = share + 4 * share.isqrt() + 16;
            (s.saturating_mul(buckets(cap)), s, cap)
        })
        .min()
        .map_or((SHARDS_DEFAULT, 0), |(_, s, cap)| (s, cap))
}

/// The shard of a hash among `shards`. hashbrown places rows by the hash's low bits and tags
/// them with its top seven, so the shard is taken from the bits between.
fn shard_index(hash: u64, shards: usize) -> usize {
    let mid = (hash >> 24) & 0xffff_ffff;
    ((mid * shards as u64) >> 32) as usize
}

/// The rows of a source at one moment: a sharded hash table for point reads plus an ordered
/// key index for prefix scans. Only the writer inserts or removes keys.
pub struct Keyspace {
    /// Keys come from the origin's data, not from readers: a fast hasher, randomly seeded.
    hasher: Hasher,
    shards: Box<[Shard]>,
    index: RwLock<KeyIndex>,
    len: AtomicUsize,
    bytes: AtomicU64,
}

impl std::fmt::Debug for Keyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyspace")
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl Default for Keyspace {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while holding it; every mutation here is a
    // single table or set operation, so the data is consistent: keep using it.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl Keyspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// A keyspace sized for `rows` rows.
    fn with_capacity(rows: usize) -> Self {
        let (n, cap) = plan(rows);
        Keyspace {
            hasher: Hasher::default(),
            shards: (0..n)
                .map(|_| RwLock::new(HashTable::with_capacity(cap)))
                .collect(),
            index: RwLock::new(KeyIndex::default()),
            len: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[shard_index(hash, self.shards.len())]
    }

    /// Calls `f` with the row of `key`, under its shard's read lock.
    pub fn with<T>(&self, key: &str, f: impl FnOnce(RowRef<'_>) -> T) -> Option<T> {
        self.with_opt(key, |r| r.map(f))
    }

    /// Calls `f` with the row of `key` or `None`, under its shard's read lock.
    pub fn with_opt<T>(&self, key: &str, f: impl FnOnce(Option<RowRef<'_>>) -> T) -> T {
        let h = self.hash(key.as_bytes());
        let shard = read(self.shard(h));
        let row = shard.find(h, |p| packed_key(p) == key.as_bytes()).map(|p| {
            // The key matched `key`, so it needs no UTF-8 check of its own.
            let (version, _, value) = parts(p);
            RowRef {
                key,
                version,
                value,
            }
        });
        f(row)
    }

    /// The row of `key`, its value copied out (a read that can use the value in place, under
    /// the lock, goes through [`Keyspace::with`] and copies nothing).
    pub fn get(&self, key: &str) -> Option<Row> {
        self.with(key, |r| r.to_row())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values held (not counting the table and the index).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Inserts or replaces a row without touching the index; returns the previous row's
    /// version.
    fn upsert(&self, key: &str, version: u64, value: &[u8]) -> Option<u64> {
        let h = self.hash(key.as_bytes());
        let new = pack(key.as_bytes(), version, value);
        let add = (key.len() + value.len()) as u64;
        let old = {
            let mut shard = write(self.shard(h));
            match shard.entry(
                h,
                |p| packed_key(p) == key.as_bytes(),
                |p| self.hash(packed_key(p)),
            ) {
                hashbrown::hash_table::Entry::Occupied(mut e) => {
                    Some(std::mem::replace(e.get_mut(), new))
                }
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(new);
                    None
                }
            }
        };
        match old {
            Some(o) => {
                let (version, sub) = counted(&o);
                self.adjust_bytes(add, sub);
                Some(version)
            }
            None => {
                self.bytes.fetch_add(add, Ordering::Relaxed);
                self.len.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Inserts or replaces; returns the previous row's version.
    pub(crate) fn put(&self, key: &str, version: u64, value: &[u8]) -> Option<u64> {
        let old = self.upsert(key, version, value);
        if old.is_none() {
            write(&self.index).insert(key);
            self.merge_if_due();
        }
        old
    }

    /// Merges the index's overlays into a new arena when they have grown. Only the writer
    /// mutates the index, so it is built under the read lock (scans go on) and swapped in.
    fn merge_if_due(&self) {
        let merged = {
            let index = read(&self.index);
            if !index.wants_merge() {
                return;
            }
            index.merged()
        };
        *write(&self.index) = merged;
    }

    /// Removes `key`; returns the removed row's version.
    pub(crate) fn remove(&self, key: &str) -> Option<u64> {
        let h = self.hash(key.as_bytes());
        let old = {
            let mut shard = write(self.shard(h));
            let e = shard
                .find_entry(h, |p| packed_key(p) == key.as_bytes())
                .ok()?;
            e.remove().0
        };
        let (version, sub) = counted(&old);
        self.bytes.fetch_sub(sub, Ordering::Relaxed);
        self.len.fetch_sub(1, Ordering::Relaxed);
        write(&self.index).remove(key);
        self.merge_if_due();
        Some(version)
    }

    fn adjust_bytes(&self, add: u64, sub: u64) {
        if add >= sub {
            self.bytes.fetch_add(add - sub, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(sub - add, Ordering::Relaxed);
        }
    }

    /// Up to `limit` rows whose key starts with `prefix` and sorts after `after`, in key order.
    pub fn scan(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<(Arc<str>, Row)> {
        self.scan_keys(prefix, after, limit)
            .into_iter()
            .filter_map(|k| {
                let row = self.get(&k)?;
                Some((k, row))
            })
            .collect()
    }

    /// Up to `limit` keys that start with `prefix` and sort after `after`, in key order, as
    /// the ordered index holds them (a key removed meanwhile may still be listed): a cursor
    /// walk knows it reached the end when fewer than `limit` come back.
    pub fn scan_keys(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<Arc<str>> {
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let index = read(&self.index);
        index
            .iter_from(start)
            .take_while(|k| k.starts_with(prefix))
            .take(limit)
            .map(Arc::from)
            .collect()
    }

    /// Every key, in order (for tests and diagnostics; not a reader path).
    pub fn keys(&self) -> Vec<Arc<str>> {
        read(&self.index)
            .iter_from(Bound::Unbounded)
            .map(Arc::from)
            .collect()
    }

    /// Calls `f` with every row, in no particular order, without a lookup per key.
    pub(crate) fn for_each_unordered(&self, mut f: impl FnMut(RowRef<'_>)) {
        for shard in self.shards.iter() {
            for p in read(shard).iter() {
                f(unpack(p));
            }
        }
    }

    /// Calls `f` with every row, in key order, without copying the key list first (a snapshot
    /// diff walks a million keys). Holds the index's read lock throughout, so `f` must not
    /// insert into or remove from this keyspace.
    pub(crate) fn for_each(&self, mut f: impl FnMut(RowRef<'_>)) {
        let index = read(&self.index);
        for key in index.iter_from(Bound::Unbounded) {
            self.with(key, &mut f);
        }
    }
}

/// A keyspace being filled by snapshot chunks, before any reader can see it.
///
/// Each key is appended to the arena that becomes the ordered index as it arrives;
/// [`Staging::finish`] sorts it only if the keys did not come in order (an origin sends them
/// in order). Rows are packed as they arrive and go into the table a run at a time, in the
/// order of the table slots they hash to (see [`Staging::settle`]).
#[derive(Debug, Default)]
pub(crate) struct Staging {
    rows: Keyspace,
    keys: Arena,
    /// Packed rows not in the table yet, with their hashes, in arrival order.
    pending: Vec<(u64, Packed)>,
    len: usize,
    bytes: u64,
}

/// Rows packed before they are inserted as one run: enough that a run touches the table's
/// slots nearly in address order, few enough that the rows waiting (24 B each, plus the rows
/// themselves: 4.7 MB of 100 B values) stay small beside a snapshot.
const RUN: usize = 1 << 15;

/// A shard's buckets are split into 2^this regions when a run is ordered (see
/// [`Staging::settle`]): 131,072 buckets make regions of 256 (4 KiB of slots).
const REGION_BITS: u32 = 9;

impl Staging {
    /// Staging with room for `rows` rows.
    pub(crate) fn with_capacity(rows: usize) -> Self {
        Staging {
            rows: Keyspace::with_capacity(rows),
            keys: Arena::with_capacity(rows),
            pending: Vec::new(),
            len: 0,
            bytes: 0,
        }
    }

    /// Stages a row; a key repeated (in this chunk or a later one) keeps the later row.
    ///
    /// `key` must be UTF-8: the writer hands it on from a decoded `String` or from the feed's
    /// chunk parser, which checked it, so it is not checked a second time here (it was 6% of a
    /// load's samples). A key that were not would read back as empty, never unsafely.
    pub(crate) fn put(&mut self, key: &[u8], version: u64, value: &[u8]) {
        let h = self.rows.hasher.hash_one(key);
        self.keys.push(key);
        self.pending.push((h, pack(key, version, value)));
        if self.pending.len() >= RUN {
            self.settle();
        }
    }

    /// Inserts the pending rows into the table.
    ///
    /// One at a time in arrival order, each insert was two cache misses (the probe's control
    /// bytes, then the slot), a third of a 1M-row load. So a run is first put in the order of
    /// where its hashes start probing: by shard, then by one of 2^[`REGION_BITS`] regions of
    /// the shard's buckets (a counting sort, linear; a comparison sort of a run cost as much as
    /// it saved). The inserts then walk each table in order. The sort is stable, so a key
    /// staged twice in one run is inserted in arrival order and keeps its later row.
    ///
    /// No reader sees a staged keyspace, so this takes no lock and counts in plain fields: a
    /// locked instruction after each insert made the core wait for the slot's cache line.
    fn settle(&mut self) {
        let Keyspace { hasher, shards, .. } = &mut self.rows;
        let n = shards.len();
        // Every shard is planned with the same capacity; one that grew is still correct,
        // just walked less in order.
        let mask = shards.first_mut().map_or(0, |s| {
            let cap = s.get_mut().unwrap_or_else(|p| p.into_inner()).capacity();
            (buckets(cap) - 1) as u64
        });
        let bits = (mask + 1).trailing_zeros();
        let rbits = bits.min(REGION_BITS);
        let region =
            |h: u64| (shard_index(h, n) << rbits) | ((h & mask) >> (bits - rbits)) as usize;
        let mut starts = vec![0usize; (n << rbits) + 1];
        for (h, _) in &self.pending {
            starts[region(*h) + 1] += 1;
        }
        for r in 1..starts.len() {
            starts[r] += starts[r - 1];
        }
        let mut order = vec![0u32; self.pending.len()];
        for (i, (h, _)) in self.pending.iter().enumerate() {
            let at = &mut starts[region(*h)];
            order[*at] = i as u32;
            *at += 1;
        }
        for i in order {
            let (h, new) = std::mem::take(&mut self.pending[i as usize]);
            let table = shards[shard_index(h, n)]
                .get_mut()
                .unwrap_or_else(|p| p.into_inner());
            let (_, key, value) = parts(&new);
            let add = (key.len() + value.len()) as u64;
            match table.entry(
                h,
                |p| packed_key(p) == key,
                |p| hasher.hash_one(packed_key(p)),
            ) {
                hashbrown::hash_table::Entry::Occupied(mut e) => {
                    let old = std::mem::replace(e.get_mut(), new);
                    self.bytes = self.bytes + add - counted(&old).1;
                }
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(new);
                    self.len += 1;
                    self.bytes += add;
                }
            }
        }
        self.pending.clear();
    }

    /// Rows staged, a key staged twice counted once.
    #[cfg(test)]
    pub(crate) fn len(&mut self) -> usize {
        self.settle();
        self.len
    }

    /// The staged rows with their index, ready to swap in.
    pub(crate) fn finish(mut self) -> Keyspace {
        self.settle();
        let Staging {
            rows,
            keys,
            len,
            bytes,
            ..
        } = self;
        rows.len.store(len, Ordering::Relaxed);
        rows.bytes.store(bytes, Ordering::Relaxed);
        // The arena has every staged key, a repeated one as often as it came: sorted without
        // repeats, it holds exactly the table's keys.
        *write(&rows.index) = KeyIndex {
            base: keys.sorted(),
            ..KeyIndex::default()
        };
        rows
    }
}

/// Keys, each once, packed: each is its length (LEB128) and its bytes, back to back, and
/// every [`MARK_EVERY`]th key's offset is kept for seeking. A 13 B key costs 14.5 B.
#[derive(Debug, Default)]
struct Arena {
    text: Vec<u8>,
    marks: Vec<usize>,
    len: usize,
}

/// Keys per seek mark: a seek decodes at most this many keys past a binary search.
const MARK_EVERY: usize = 16;

/// The key at `at` in an arena's text and the offset after it. Keys are only written by
/// [`Arena::push`] from a `&str`, so the layout holds; a malformed one would be a bug here,
/// and ends the walk rather than panicking a reader.
fn key_at(text: &[u8], at: usize) -> Option<(&str, usize)> {
    let mut len: u64 = 0;
    let mut shift = 0;
    let mut i = at;
    loop {
        let b = *text.get(i)?;
        i += 1;
        len |= u64::from(b & 0x7f).checked_shl(shift)?;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = i.checked_add(usize::try_from(len).ok()?)?;
    let key = std::str::from_utf8(text.get(i..end)?).ok()?;
    Some((key, end))
}

impl Arena {
    fn with_capacity(keys: usize) -> Self {
        Arena {
            text: Vec::new(),
            marks: Vec::with_capacity(keys / MARK_EVERY + 1),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, key: &[u8]) {
        if self.len % MARK_EVERY == 0 {
            self.marks.push(self.text.len());
        }
        let mut len = [0u8; 10];
        let n = leb128(key.len() as u64, &mut len);
        self.text.extend_from_slice(&len[..n]);
        self.text.extend_from_slice(key);
        self.len += 1;
    }

    /// The keys from byte offset `at` on.
    fn iter_at(&self, mut at: usize) -> impl Iterator<Item = &str> {
        std::iter::from_fn(move || {
            let (k, next) = key_at(&self.text, at)?;
            at = next;
            Some(k)
        })
    }

    /// The byte offset of the first key not before `bound`.
    fn seek(&self, bound: Bound<&str>) -> usize {
        let before = |k: &str| match bound {
            Bound::Included(b) => k < b,
            Bound::Excluded(b) => k <= b,
            Bound::Unbounded => false,
        };
        // The last mark whose key is before the bound (keys before it are all before it).
        let first = |m: usize| key_at(&self.text, self.marks[m]).map_or("", |(k, _)| k);
        let (mut lo, mut hi) = (0, self.marks.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(first(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut at = match lo {
            0 => 0,
            m => self.marks[m - 1],
        };
        while let Some((k, next)) = key_at(&self.text, at) {
            if !before(k) {
                break;
            }
            at = next;
        }
        at
    }

    /// The same keys in order, each once: as is when they already are.
    fn sorted(self) -> Arena {
        let mut prev: Option<&str> = None;
        let in_order = self.iter_at(0).all(|k| {
            let ok = prev.is_none_or(|p| p < k);
            prev = Some(k);
            ok
        });
        if in_order {
            return self;
        }
        let mut keys: Vec<&str> = self.iter_at(0).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out = Arena::with_capacity(keys.len());
        out.text.reserve(self.text.len());
        for k in keys {
            out.push(k.as_bytes());
        }
        out
    }
}

/// The ordered keys of a keyspace: a packed arena plus overlays of the keys added to it and
/// removed from it since it was built. `added` and the arena are disjoint, and `removed` is a
/// subset of the arena.
#[derive(Debug, Default)]
struct KeyIndex {
    base: Arena,
    added: BTreeSet<Box<str>>,
    removed: BTreeSet<Box<str>>,
}

/// Overlays this large are merged into the arena whatever its size.
const MERGE_AT_LEAST: usize = if cfg!(test) { 8 } else { 1024 };

impl KeyIndex {
    /// Records a key the table did not hold.
    fn insert(&mut self, key: &str) {
        // Not in the table means: in the arena only if it was removed since.
        if !self.removed.remove(key) {
            self.added.insert(key.into());
        }
    }

    /// Records the removal of a key the table held.
    fn remove(&mut self, key: &str) {
        if !self.added.remove(key) {
            self.removed.insert(key.into());
        }
    }

    /// The overlays cost a small allocation per key; past a quarter of the arena, merging
    /// them (linear) is cheaper than keeping them.
    fn wants_merge(&self) -> bool {
        self.added.len() + self.removed.len() > MERGE_AT_LEAST.max(self.base.len() / 4)
    }

    fn merged(&self) -> KeyIndex {
        let mut base = Arena::with_capacity(self.base.len() + self.added.len());
        base.text
            .reserve(self.base.text.len() + 16 * self.added.len());
        for k in self.iter_from(Bound::Unbounded) {
            base.push(k.as_bytes());
        }
        KeyIndex {
            base,
            ..KeyIndex::default()
        }
    }

    /// The keys from `start` on, in order.
    fn iter_from<'a>(&'a self, start: Bound<&str>) -> impl Iterator<Item = &'a str> + 'a {
        let base = self
            .base
            .iter_at(self.base.seek(start))
            .filter(|k| self.removed.is_empty() || !self.removed.contains(*k));
        let added = self
            .added
            .range::<str, _>((start, Bound::Unbounded))
            .map(|k| &**k);
        Merge {
            a: base.peekable(),
            b: added.peekable(),
        }
    }
}

/// Two ascending iterators of distinct keys, merged.
struct Merge<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<'a, A, B> Iterator for Merge<A, B>
where
    A: Iterator<Item = &'a str>,
    B: Iterator<Item = &'a str>,
{
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        match (self.a.peek(), self.b.peek()) {
            (Some(x), Some(y)) if y < x => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_packed_row_reads_back() {
        for key in ["", "k", &"x".repeat(200), "ключ"] {
            for value in [&b""[..], b"v", &[7u8; 300][..]] {
                let p = pack(key.as_bytes(), u64::MAX, value);
                assert_eq!(
                    unpack(&p),
                    RowRef {
                        key,
                        version: u64::MAX,
                        value
                    }
                );
            }
        }
    }

    #[test]
    fn a_known_row_count_fills_the_tables() {
        let (s, cap) = plan(1_000_000);
        let slots = s * buckets(cap);
        assert!(slots < 1_300_000, "{s} shards x {} buckets", buckets(cap));
        let ks = Keyspace::with_capacity(1_000_000);
        let before: usize = ks.shards.iter().map(|s| read(s).capacity()).sum();
        for i in 0..1_000_000u32 {
            ks.upsert(&format!("key:{i:07}"), 1, b"");
        }
        let after: usize = ks.shards.iter().map(|s| read(s).capacity()).sum();
        assert_eq!(
            before, after,
            "no shard grew while loading the planned rows"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Remove(u8),
        Scan(u8, Option<u8>, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            2 => any::<u8>().prop_map(Op::Remove),
            1 => (0u8..4, proptest::option::of(any::<u8>()), 0u8..20)
                .prop_map(|(p, a, l)| Op::Scan(p, a, l)),
        ]
    }

    fn key(k: u8) -> String {
        format!("{}{k:03}", (b'a' + k % 3) as char)
    }

    proptest! {
        /// The keyspace against a `BTreeMap`: the same rows, bytes and scans after any mix of
        /// puts and removes, across index merges, starting staged or empty.
        #[test]
        fn keyspace_matches_a_btreemap(
            staged in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..300),
            ops in proptest::collection::vec(op(), 0..3000),
        ) {
            let mut model: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
            let mut st = Staging::with_capacity(staged.len());
            for (i, (k, v)) in staged.iter().enumerate() {
                let value = vec![*v; usize::from(*v % 7)];
                st.put(key(*k).as_bytes(), i as u64, &value);
                model.insert(key(*k), (i as u64, value));
            }
            prop_assert_eq!(st.len(), model.len());
            let ks = st.finish();
            for (n, op) in ops.into_iter().enumerate() {
                let version = 1000 + n as u64;
                match op {
                    Op::Put(k, v) => {
                        let value = vec![v; usize::from(v % 7)];
                        let old = ks.put(&key(k), version, &value);
                        let was = model.insert(key(k), (version, value));
                        prop_assert_eq!(old, was.map(|w| w.0));
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(ks.remove(&key(k)), model.remove(&key(k)).map(|w| w.0));
                    }
                    Op::Scan(p, after, limit) => {
                        let prefix = ["", "a", "b0", "c1"][usize::from(p)];
                        let after = after.map(key);
                        let got: Vec<(String, u64, Vec<u8>)> = ks
                            .scan(prefix, after.as_deref(), usize::from(limit))
                            .into_iter()
                            .map(|(k, r)| (k.to_string(), r.version, r.value.to_vec()))
                            .collect();
                        let want: Vec<(String, u64, Vec<u8>)> = model
                            .iter()
                            .filter(|(k, _)| k.starts_with(prefix))
                            .filter(|(k, _)| match &after {
                                Some(a) if a.as_str() >= prefix => k.as_str() > a.as_str(),
                                _ => true,
                            })
                            .take(usize::from(limit))
                            .map(|(k, (v, val))| (k.clone(), *v, val.clone()))
                            .collect();
                        prop_assert_eq!(got, want);
                    }
                }
            }
            prop_assert_eq!(ks.len(), model.len());
            let bytes: usize = model.iter().map(|(k, (_, v))| k.len() + v.len()).sum();
            prop_assert_eq!(ks.bytes(), bytes as u64);
            let keys: Vec<String> = ks.keys().iter().map(|k| k.to_string()).collect();
            prop_assert_eq!(keys, model.keys().cloned().collect::<Vec<_>>());
            let mut walked = Vec::new();
            ks.for_each(|r| walked.push((r.key.to_string(), r.version, r.value.to_vec())));
            let want: Vec<_> = model.iter().map(|(k, (v, val))| (k.clone(), *v, val.clone())).collect();
            prop_assert_eq!(&walked, &want);
            let mut unordered = Vec::new();
            ks.for_each_unordered(|r| unordered.push((r.key.to_string(), r.version, r.value.to_vec())));
            unordered.sort();
            prop_assert_eq!(unordered, want);
        }
    }
}
