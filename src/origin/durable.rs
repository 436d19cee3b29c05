//! The durable copy of an origin: its epoch, every topic's rows (with their versions) and
//! version, and the retained change window, in one redb file under `data_dir`.
//!
//! The in-memory topics stay the serving state; this copy is read once at open and written
//! before a publish is applied in memory, so an acknowledged batch is on disk (per the fsync
//! policy) before any stream sees it. With `fsync = "interval"` batches are committed without
//! a sync (redb `Durability::None`) and a thread makes them durable every `fsync_interval`; a
//! run that ends without a clean close may have lost acknowledged batches, so the next open
//! starts a new epoch instead of reissuing versions that sidecars may already hold.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use tracing::{info, warn};

use super::{Batch, Inner, Stored};
use crate::config::Fsync;
use crate::pb::feed::v1 as pb;

/// File name of the database inside `data_dir`.
pub const FILE: &str = "origin.redb";

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("topic_versions");
/// (topic, key) -> (version, value).
const ROWS: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("rows");
/// (topic, version) -> the batch's changes, each a length-delimited `pb::Change`.
const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");

const EPOCH: &str = "epoch";
/// Present while a run with `fsync = "interval"` has the database open: found at open, it
/// means that run ended without syncing its last batches.
const UNSYNCED: &str = "unsynced_run";
/// The database position (commit LSN) the last source transaction written reached, for an
/// origin fed by Postgres: it resumes after it.
const SOURCE_POSITION: &str = "source_position";
/// Set for an origin whose versions are a database's commit positions, not contiguous.
const SPARSE: &str = "sparse_versions";

/// One topic's part of a source transaction: the topic, its batches `(version, changes)`, and
/// the version below which its log is dropped.
pub(crate) type TxnPart<'a> = (&'a str, Vec<(u64, &'a [pb::Change])>, u64);

/// Why the durable copy could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir}: {message}")]
    Storage { dir: String, message: String },
    #[error("data directory {dir}: a logged batch of topic '{topic}' version {version} does not decode: {message}")]
    Corrupt {
        dir: String,
        topic: String,
        version: u64,
        message: String,
    },
    #[error("origin is closed: its data directory was released")]
    Closed,
}

/// A topic as loaded from disk.
pub(crate) struct LoadedTopic {
    pub version: u64,
    pub data: imbl::OrdMap<Arc<str>, Stored>,
    pub log: VecDeque<Arc<Batch>>,
}

pub(crate) struct Loaded {
    pub epoch: String,
    pub topics: BTreeMap<String, LoadedTopic>,
}

pub(crate) struct Store {
    db: Database,
    dir: String,
    every_batch: bool,
    /// Commits not yet synced (interval policy).
    dirty: AtomicBool,
    /// Dropped with the store: ends the sync thread.
    _stop_sync: Option<mpsc::Sender<()>>,
}

fn err(dir: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage {
        dir: dir.to_string(),
        message: e.to_string(),
    }
}

/// Bytes a batch counts against `retain_bytes`; the same measure as a fresh publish uses.
pub(crate) fn batch_bytes(changes: &[pb::Change]) -> usize {
    changes
        .iter()
        .map(|c| c.key.len() + c.value.len() + 8)
        .sum()
}

impl Store {
    /// Opens (or creates) the database under `dir` and loads it. Returns the epoch to serve:
    /// the stored one, or a new one when there is none or the last run may have lost batches.
    /// `cache_bytes` bounds redb's page cache (its default is 1 GiB).
    pub(crate) fn open(
        dir: &Path,
        fsync: Fsync,
        cache_bytes: u64,
    ) -> Result<(Store, Loaded), StoreError> {
        let name = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| err(&name, e))?;
        let path: PathBuf = dir.join(FILE);
        let db = Database::builder()
            .set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX))
            .create(&path)
            .map_err(|e| err(&name, e))?;
        let every_batch = fsync == Fsync::EveryBatch;

        let rtx = db.begin_read().map_err(|e| err(&name, e))?;
        let (stored_epoch, unsynced) = match rtx.open_table(META) {
            Ok(meta) => (
                meta.get(EPOCH)
                    .map_err(|e| err(&name, e))?
                    .map(|v| v.value().to_string()),
                meta.get(UNSYNCED).map_err(|e| err(&name, e))?.is_some(),
            ),
            Err(redb::TableError::TableDoesNotExist(_)) => (None, false),
            Err(e) => return Err(err(&name, e)),
        };
        drop(rtx);
        let epoch = match stored_epoch {
            Some(e) if !unsynced => e,
            previous => {
                let fresh = format!("{:016x}", rand::random::<u64>());
                if previous.is_some() {
                    warn!(
                        dir = %name,
                        epoch = %fresh,
                        "the last run (fsync = interval) ended without syncing; its last batches may be lost, so this is a new epoch"
                    );
                }
                fresh
            }
        };

        let mut wtx = db.begin_write().map_err(|e| err(&name, e))?;
        wtx.set_durability(Durability::Immediate);
        {
            let mut meta = wtx.open_table(META).map_err(|e| err(&name, e))?;
            meta.insert(EPOCH, epoch.as_str())
                .map_err(|e| err(&name, e))?;
            if every_batch {
                meta.remove(UNSYNCED).map_err(|e| err(&name, e))?;
            } else {
                meta.insert(UNSYNCED, "1").map_err(|e| err(&name, e))?;
            }
            // Create the other tables so that reads below find them.
            wtx.open_table(VERSIONS).map_err(|e| err(&name, e))?;
            wtx.open_table(ROWS).map_err(|e| err(&name, e))?;
            wtx.open_table(LOG).map_err(|e| err(&name, e))?;
        }
        wtx.commit().map_err(|e| err(&name, e))?;

        let loaded = Self::load(&db, &name, epoch)?;
        Ok((
            Store {
                db,
                dir: name,
                every_batch,
                dirty: AtomicBool::new(false),
                _stop_sync: None,
            },
            loaded,
        ))
    }

    fn load(db: &Database, dir: &str, epoch: String) -> Result<Loaded, StoreError> {
        let rtx = db.begin_read().map_err(|e| err(dir, e))?;
        let mut topics: BTreeMap<String, LoadedTopic> = BTreeMap::new();
        let entry = |topics: &mut BTreeMap<String, LoadedTopic>, t: &str| {
            if !topics.contains_key(t) {
                topics.insert(
                    t.to_string(),
                    LoadedTopic {
                        version: 0,
                        data: imbl::OrdMap::new(),
                        log: VecDeque::new(),
                    },
                );
            }
        };
        let versions = rtx.open_table(VERSIONS).map_err(|e| err(dir, e))?;
        for row in versions.iter().map_err(|e| err(dir, e))? {
            let (k, v) = row.map_err(|e| err(dir, e))?;
            entry(&mut topics, k.value());
            if let Some(t) = topics.get_mut(k.value()) {
                t.version = v.value();
            }
        }
        let rows = rtx.open_table(ROWS).map_err(|e| err(dir, e))?;
        for row in rows.iter().map_err(|e| err(dir, e))? {
            let (k, v) = row.map_err(|e| err(dir, e))?;
            let (topic, key) = k.value();
            let (version, value) = v.value();
            entry(&mut topics, topic);
            if let Some(t) = topics.get_mut(topic) {
                t.data.insert(
                    Arc::from(key),
                    Stored {
                        value: Bytes::copy_from_slice(value),
                        version,
                    },
                );
            }
        }
        let log = rtx.open_table(LOG).map_err(|e| err(dir, e))?;
        for row in log.iter().map_err(|e| err(dir, e))? {
            let (k, v) = row.map_err(|e| err(dir, e))?;
            let (topic, version) = k.value();
            let mut buf = v.value();
            let mut changes = Vec::new();
            while !buf.is_empty() {
                let c = pb::Change::decode_length_delimited(&mut buf).map_err(|e| {
                    StoreError::Corrupt {
                        dir: dir.to_string(),
                        topic: topic.to_string(),
                        version,
                        message: e.to_string(),
                    }
                })?;
                changes.push(c);
            }
            entry(&mut topics, topic);
            if let Some(t) = topics.get_mut(topic) {
                let prev = t
                    .log
                    .back()
                    .map_or(version.saturating_sub(1), |b| b.version);
                let bytes = batch_bytes(&changes);
                t.log.push_back(Arc::new(Batch::new(
                    Arc::from(topic),
                    version,
                    prev,
                    changes,
                    bytes,
                )));
            }
        }
        // The log must end at the topic's version and have no holes; a prefix that does not
        // join the rest (left by an older retention) is dropped, as resuming from it is
        // impossible anyway. Versions of a database-fed origin are commit positions, with
        // gaps between them by nature: its log is kept whole.
        let meta = rtx.open_table(META).map_err(|e| err(dir, e))?;
        let sparse = meta.get(SPARSE).map_err(|e| err(dir, e))?.is_some();
        for t in topics.values_mut() {
            while t.log.back().is_some_and(|b| b.version > t.version) {
                t.log.pop_back();
            }
            if sparse {
                continue;
            }
            let mut expect = t.version;
            let mut keep = 0;
            for b in t.log.iter().rev() {
                if b.version != expect {
                    break;
                }
                keep += 1;
                expect -= 1;
            }
            let skip = t.log.len() - keep;
            t.log.drain(..skip);
        }
        let keys: usize = topics.values().map(|t| t.data.len()).sum();
        info!(dir, %epoch, topics = topics.len(), keys, "durable origin loaded");
        Ok(Loaded { epoch, topics })
    }

    /// Starts the thread that syncs interval-policy commits; it holds only a weak reference,
    /// so it never keeps the origin alive, and ends when the store is dropped.
    pub(crate) fn start_sync(&mut self, inner: Weak<Inner>, every: Duration) {
        if self.every_batch {
            return;
        }
        let (tx, rx) = mpsc::channel::<()>();
        self._stop_sync = Some(tx);
        let spawned = std::thread::Builder::new()
            .name("viewcar-origin-fsync".to_string())
            .spawn(move || loop {
                match rx.recv_timeout(every) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let store = inner.store_guard();
                if let Some(Err(e)) = store.as_ref().map(Store::sync) {
                    warn!(error = %e, "origin fsync failed");
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the origin fsync thread; batches sync only at close");
        }
    }

    /// Makes every commit so far durable (interval policy).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut wtx = self.db.begin_write().map_err(|e| err(&self.dir, e))?;
        wtx.set_durability(Durability::Immediate);
        wtx.commit().map_err(|e| {
            self.dirty.store(true, Ordering::Release);
            err(&self.dir, e)
        })
    }

    /// Writes one published batch: its rows, the topic's version, the batch into the log, and
    /// drops the log versions in `trim` (those the in-memory retention lets go with it).
    pub(crate) fn write_batch(
        &self,
        topic: &str,
        version: u64,
        changes: &[pb::Change],
        trim: Range<u64>,
    ) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut encoded = Vec::with_capacity(batch_bytes(changes) + 8 * changes.len());
        for c in changes {
            // Writing into a Vec cannot run out of room.
            let _ = c.encode_length_delimited(&mut encoded);
        }
        let mut wtx = self.db.begin_write().map_err(|e| err(dir, e))?;
        wtx.set_durability(if self.every_batch {
            Durability::Immediate
        } else {
            Durability::None
        });
        {
            let mut rows = wtx.open_table(ROWS).map_err(|e| err(dir, e))?;
            for c in changes {
                if c.deleted {
                    rows.remove((topic, c.key.as_str()))
                        .map_err(|e| err(dir, e))?;
                } else {
                    rows.insert((topic, c.key.as_str()), (version, &c.value[..]))
                        .map_err(|e| err(dir, e))?;
                }
            }
            let mut versions = wtx.open_table(VERSIONS).map_err(|e| err(dir, e))?;
            versions.insert(topic, version).map_err(|e| err(dir, e))?;
            let mut log = wtx.open_table(LOG).map_err(|e| err(dir, e))?;
            log.insert((topic, version), encoded.as_slice())
                .map_err(|e| err(dir, e))?;
            for v in trim {
                log.remove((topic, v)).map_err(|e| err(dir, e))?;
            }
        }
        wtx.commit().map_err(|e| err(dir, e))?;
        if !self.every_batch {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The database position of the last source transaction written (an origin fed by
    /// Postgres), if any.
    pub(crate) fn source_position(&self) -> Result<Option<u64>, StoreError> {
        let dir = &self.dir;
        let rtx = self.db.begin_read().map_err(|e| err(dir, e))?;
        let meta = rtx.open_table(META).map_err(|e| err(dir, e))?;
        let v = meta.get(SOURCE_POSITION).map_err(|e| err(dir, e))?;
        Ok(v.and_then(|v| v.value().parse().ok()))
    }

    /// Writes one source transaction in one commit: for each topic its batches `(version,
    /// changes)` and its log below `keep_from` dropped, and the source `position` it reached.
    pub(crate) fn write_txn(&self, parts: &[TxnPart<'_>], position: u64) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut wtx = self.db.begin_write().map_err(|e| err(dir, e))?;
        wtx.set_durability(if self.every_batch {
            Durability::Immediate
        } else {
            Durability::None
        });
        {
            let mut rows = wtx.open_table(ROWS).map_err(|e| err(dir, e))?;
            let mut versions = wtx.open_table(VERSIONS).map_err(|e| err(dir, e))?;
            let mut log = wtx.open_table(LOG).map_err(|e| err(dir, e))?;
            for (topic, batches, keep_from) in parts {
                for (version, changes) in batches {
                    let mut encoded = Vec::with_capacity(batch_bytes(changes));
                    for c in changes.iter() {
                        // Writing into a Vec cannot run out of room.
                        let _ = c.encode_length_delimited(&mut encoded);
                        if c.deleted {
                            rows.remove((*topic, c.key.as_str()))
                                .map_err(|e| err(dir, e))?;
                        } else {
                            rows.insert((*topic, c.key.as_str()), (*version, &c.value[..]))
                                .map_err(|e| err(dir, e))?;
                        }
                    }
                    versions.insert(*topic, *version).map_err(|e| err(dir, e))?;
                    log.insert((*topic, *version), encoded.as_slice())
                        .map_err(|e| err(dir, e))?;
                }
                log.retain_in((*topic, 0)..(*topic, *keep_from), |_, _| false)
                    .map_err(|e| err(dir, e))?;
            }
            let mut meta = wtx.open_table(META).map_err(|e| err(dir, e))?;
            meta.insert(SOURCE_POSITION, position.to_string().as_str())
                .map_err(|e| err(dir, e))?;
        }
        wtx.commit().map_err(|e| err(dir, e))?;
        if !self.every_batch {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Replaces every row of each of `topics` with its rows at `version` (an initial copy),
    /// empties their logs, and records `epoch` and the source `position`, in one commit: a
    /// copy interrupted by a crash leaves the previous state whole, never some tables copied
    /// and the position moved past the others.
    pub(crate) fn replace_topics(
        &self,
        topics: &[(&str, &[(String, Bytes)])],
        version: u64,
        position: u64,
        epoch: &str,
    ) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut wtx = self.db.begin_write().map_err(|e| err(dir, e))?;
        wtx.set_durability(Durability::Immediate);
        {
            let mut rows = wtx.open_table(ROWS).map_err(|e| err(dir, e))?;
            let mut versions = wtx.open_table(VERSIONS).map_err(|e| err(dir, e))?;
            let mut log = wtx.open_table(LOG).map_err(|e| err(dir, e))?;
            for &(topic, rows_in) in topics {
                rows.retain_in((topic, "")..=(topic, "\u{10FFFF}"), |_, _| false)
                    .map_err(|e| err(dir, e))?;
                for (k, v) in rows_in {
                    rows.insert((topic, k.as_str()), (version, &v[..]))
                        .map_err(|e| err(dir, e))?;
                }
                versions.insert(topic, version).map_err(|e| err(dir, e))?;
                log.retain_in((topic, 0)..=(topic, u64::MAX), |_, _| false)
                    .map_err(|e| err(dir, e))?;
                // An empty batch at the copy's version marks where the log starts: reloaded,
                // the topic resumes streams that are at the copy (versions are not contiguous
                // here, so the start could not be told from the first change after it).
                log.insert((topic, version), &[][..])
                    .map_err(|e| err(dir, e))?;
            }
            let mut meta = wtx.open_table(META).map_err(|e| err(dir, e))?;
            meta.insert(SOURCE_POSITION, position.to_string().as_str())
                .map_err(|e| err(dir, e))?;
            meta.insert(EPOCH, epoch).map_err(|e| err(dir, e))?;
        }
        wtx.commit().map_err(|e| err(dir, e))
    }

    /// Sets the epoch stored under `dir` (creating the database if needed), marks its versions
    /// as sparse (commit positions), and forgets the source position: what is stored belongs to another database or timeline, and is
    /// served under `epoch` only until a new copy replaces it.
    pub(crate) fn reset_epoch(dir: &Path, epoch: &str) -> Result<(), StoreError> {
        let name = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| err(&name, e))?;
        let db = Database::create(dir.join(FILE)).map_err(|e| err(&name, e))?;
        let wtx = db.begin_write().map_err(|e| err(&name, e))?;
        {
            let mut meta = wtx.open_table(META).map_err(|e| err(&name, e))?;
            meta.insert(EPOCH, epoch).map_err(|e| err(&name, e))?;
            meta.insert(SPARSE, "1").map_err(|e| err(&name, e))?;
            meta.remove(SOURCE_POSITION).map_err(|e| err(&name, e))?;
            meta.remove(UNSYNCED).map_err(|e| err(&name, e))?;
        }
        wtx.commit().map_err(|e| err(&name, e))
    }

    /// The epoch stored under `dir`, if there is a database there.
    pub(crate) fn stored_epoch(dir: &Path) -> Result<Option<String>, StoreError> {
        let name = dir.display().to_string();
        let path = dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let db = Database::create(path).map_err(|e| err(&name, e))?;
        let rtx = db.begin_read().map_err(|e| err(&name, e))?;
        let meta = match rtx.open_table(META) {
            Ok(m) => m,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(&name, e)),
        };
        let unsynced = meta.get(UNSYNCED).map_err(|e| err(&name, e))?.is_some();
        let epoch = meta.get(EPOCH).map_err(|e| err(&name, e))?;
        Ok(epoch.filter(|_| !unsynced).map(|e| e.value().to_string()))
    }

    /// Drops log versions of `topic` below `keep_from` (retention applied at open).
    pub(crate) fn trim(&self, topic: &str, keep_from: u64) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut wtx = self.db.begin_write().map_err(|e| err(dir, e))?;
        wtx.set_durability(Durability::Immediate);
        {
            let mut log = wtx.open_table(LOG).map_err(|e| err(dir, e))?;
            log.retain_in((topic, 0)..(topic, keep_from), |_, _| false)
                .map_err(|e| err(dir, e))?;
        }
        wtx.commit().map_err(|e| err(dir, e))
    }
}

impl Drop for Store {
    /// A clean close: everything is synced and the run is marked as such, so the next open
    /// keeps this epoch.
    fn drop(&mut self) {
        let result = (|| -> Result<(), StoreError> {
            let dir = &self.dir;
            let mut wtx = self.db.begin_write().map_err(|e| err(dir, e))?;
            wtx.set_durability(Durability::Immediate);
            {
                let mut meta = wtx.open_table(META).map_err(|e| err(dir, e))?;
                meta.remove(UNSYNCED).map_err(|e| err(dir, e))?;
            }
            wtx.commit().map_err(|e| err(dir, e))
        })();
        if let Err(e) = result {
            warn!(error = %e, "origin data directory not closed cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: &str) -> pb::Change {
        pb::Change {
            key: key.to_string(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            deleted: false,
        }
    }

    #[test]
    fn the_log_is_trimmed_on_disk_and_an_unsynced_run_means_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path(), Fsync::EveryBatch, 8 << 20).unwrap();
        let epoch = loaded.epoch;
        for v in 1..=5u64 {
            let trim = if v > 3 { v - 3..v - 2 } else { 1..1 };
            store
                .write_batch("t", v, &[change("k", &v.to_string())], trim)
                .unwrap();
        }
        drop(store);

        let (store, loaded) = Store::open(dir.path(), Fsync::Interval, 8 << 20).unwrap();
        assert_eq!(loaded.epoch, epoch, "a clean close keeps the epoch");
        let t = &loaded.topics["t"];
        assert_eq!(t.version, 5);
        let logged: Vec<u64> = t.log.iter().map(|b| b.version).collect();
        assert_eq!(logged, vec![3, 4, 5], "trimmed versions are gone from disk");
        assert_eq!(t.data["k"].value, Bytes::from("5"));
        drop(store);

        // What a crash of an interval-policy run leaves: the run's marker still set.
        let db = Database::create(dir.path().join(FILE)).unwrap();
        let wtx = db.begin_write().unwrap();
        wtx.open_table(META).unwrap().insert(UNSYNCED, "1").unwrap();
        wtx.commit().unwrap();
        drop(db);
        let (_store, loaded) = Store::open(dir.path(), Fsync::EveryBatch, 8 << 20).unwrap();
        assert_ne!(loaded.epoch, epoch, "batches may be lost: a new epoch");
        assert_eq!(loaded.topics["t"].version, 5, "the data is kept");
    }
}
