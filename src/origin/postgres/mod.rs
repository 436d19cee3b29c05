//! Postgres as the source of an origin's topics: logical replication (`pgoutput`) of the
//! `[postgres] tables`, one topic per table.
//!
//! Start: the slot is created with an exported snapshot, the tables are copied under that
//! snapshot and loaded at the slot's consistent point, and streaming starts there: a change is
//! either in the copy or streamed after it, never both, never neither. Positions come from the
//! database, so two origins reading one database serve the same ones: the epoch is the system
//! identifier and timeline, a version is a transaction's commit position. A transaction
//! becomes one version of each topic it touched, sent to every stream as one group.
//!
//! With a data directory, each transaction is written there (with the position it reached, in
//! one commit) before the slot is told it was consumed, so a restart, even after kill -9,
//! resumes from the slot with the same epoch and retained window, and sidecars resume without
//! a snapshot. Without one the copy is redone at every start (the slot is recreated). A slot
//! lost while running is recreated and the tables copied again at the new consistent point,
//! which is past every position served before, so sidecars resnapshot (Reset) but positions
//! stay comparable.
//!
//! Failures (the database down, a refused login, `wal_level` not `logical`, a missing
//! privilege, the slot held by another process) are logged with their cause and retried with
//! exponential backoff and full jitter; what was loaded keeps being served meanwhile.

mod apply;
mod decode;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use pg_walstream::{
    CancellationToken, EventType, LogicalReplicationStream, PgReplicationConnection,
    ReplicationError, ReplicationStreamConfig, RetryConfig, SnapshotOutcome, StreamingMode,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Origin;
use crate::config::{OriginConfig, PgTls, PostgresConfig};
use decode::{TableMeta, Txn};

/// Why the database could not be followed. Each is logged and retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgError {
    #[error("the origin config has no [postgres] section")]
    NotConfigured,
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("the database refused the login: {0}")]
    Auth(String),
    #[error("wal_level is '{0}'; logical replication needs wal_level = logical (postgresql.conf, then restart the server)")]
    WalLevel(String),
    #[error("missing privilege: {0} (the role needs REPLICATION, and CREATE on the database to create the publication)")]
    Privilege(String),
    #[error("replication slot '{slot}' is in use by another process (pid {pid})")]
    SlotInUse { slot: String, pid: String },
    #[error("table '{0}' (in [postgres] tables) does not exist in schema public")]
    NoTable(String),
    #[error("table '{0}' has neither a primary key nor a replica identity, so deletes would not name their row: add a primary key, or set REPLICA IDENTITY FULL and its key columns in [postgres] tables")]
    NoKey(String),
    #[error("table '{table}': key column '{column}' is not in its replica identity, so deletes would not name the row; ALTER TABLE {table} REPLICA IDENTITY FULL (or USING INDEX over the key)")]
    KeyNotInIdentity { table: String, column: String },
    #[error("table '{table}' has no column '{column}' (a key column in [postgres] tables)")]
    NoColumn { table: String, column: String },
    #[error("database error: {0}")]
    Sql(String),
    #[error("replication failed: {0}")]
    Replication(String),
    #[error("the origin's data directory: {0}")]
    Storage(String),
}

impl From<super::StoreError> for PgError {
    fn from(e: super::StoreError) -> Self {
        PgError::Storage(e.to_string())
    }
}

impl PgError {
    /// The error of a libpq call, sorted by its cause.
    fn from_pg(e: ReplicationError) -> PgError {
        let msg = e.to_string();
        let lower = msg.to_lowercase();
        if lower.contains("password authentication failed")
            || lower.contains("no pg_hba.conf entry")
            || lower.contains("authentication")
        {
            PgError::Auth(msg)
        } else if lower.contains("permission denied")
            || lower.contains("must be superuser")
            || lower.contains("must have replication")
            || lower.contains("must be owner")
        {
            PgError::Privilege(msg)
        } else if lower.contains("wal_level") {
            PgError::WalLevel(msg)
        } else if lower.contains("connection refused")
            || lower.contains("could not connect")
            || lower.contains("no such file or directory")
            || lower.contains("timeout")
        {
            PgError::Connect(msg)
        } else if matches!(e, ReplicationError::Authentication(_)) {
            PgError::Auth(msg)
        } else {
            PgError::Replication(msg)
        }
    }
}

/// What the source is doing, for logs, status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgStatus {
    /// `connecting`, `copying` or `streaming`.
    pub phase: &'static str,
    /// Streaming has started at least once since this origin started.
    pub streamed: bool,
    /// Initial copies completed (1 after a normal start; more after a lost slot).
    pub copies: u64,
    /// Rows read by the copy in progress (or the last one).
    pub copied_rows: u64,
    /// The commit position of the last transaction applied.
    pub applied: u64,
    /// The database's WAL position as last reported to the stream.
    pub server_lsn: u64,
    /// Milliseconds between the last applied transaction's commit and its apply here.
    pub lag_ms: u64,
    /// Transactions applied.
    pub transactions: u64,
    /// Failures so far, and the last one.
    pub failures: u64,
    pub last_error: Option<String>,
    /// Slots found lost or missing while the origin held data (each forced a new copy).
    pub slots_lost: u64,
    /// Times the epoch served changed (a lost slot, a new timeline): each one resnapshots
    /// every sidecar.
    pub new_epochs: u64,
}

impl PgStatus {
    /// Bytes of WAL between the database's position and what was applied.
    pub fn lag_bytes(&self) -> u64 {
        self.server_lsn.saturating_sub(self.applied)
    }
}

/// An [`Origin`] whose topics follow Postgres tables. Dropping it stops following (the
/// origin keeps serving what it holds as long as a clone of it lives).
pub struct PgOrigin {
    origin: Origin,
    status: watch::Receiver<PgStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgOrigin {
    /// Identifies the database (retrying while it cannot be reached), builds the origin with
    /// the database's epoch, and starts following the tables in the background: the first
    /// copy is loaded when [`PgOrigin::wait_copied`] returns.
    pub async fn start(mut cfg: OriginConfig) -> Result<PgOrigin, PgError> {
        let pg = cfg.postgres.clone().ok_or(PgError::NotConfigured)?;
        for t in pg.table_names() {
            if !cfg.topics.contains(&t) {
                cfg.topics.push(t);
            }
        }
        let urls = Urls::new(&pg);
        let mut attempt = 0;
        let identity = loop {
            let repl = urls.replication.clone();
            match blocking(move || identify(&repl)).await {
                Ok(id) => break id,
                Err(e) => {
                    attempt += 1;
                    let wait = backoff(&pg, attempt);
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot identify the database");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let origin = match cfg.data_dir.clone() {
            None => Origin::build(cfg, identity.clone(), None, Default::default()),
            Some(dir) => {
                let id = identity.clone();
                blocking(move || {
                    let stored = super::durable::Store::stored_epoch(&dir)?;
                    if !stored.as_deref().is_some_and(|s| of_database(s, &id)) {
                        if let Some(old) = stored {
                            warn!(dir = %dir.display(), stored = %old, epoch = %id, "the data directory holds another database's or timeline's data; copying the tables again");
                        }
                        super::durable::Store::reset_epoch(&dir, &id)?;
                    }
                    Ok(Origin::open(cfg)?)
                })
                .await?
            }
        };
        // What the data directory holds, and where it resumes from.
        let resumed = match origin.inner.store_guard().as_ref() {
            Some(store) => store.source_position()?,
            None => None,
        };
        if resumed.is_none() {
            origin.await_first_copy(&pg.table_names());
        }
        info!(epoch = %identity, tables = ?pg.table_names(), slot = %pg.slot, resumes_after = ?resumed, "origin follows postgres");
        let (tx, status) = watch::channel(PgStatus {
            phase: "connecting",
            ..Default::default()
        });
        // The epoch served: the database's, or (stored) the one a lost slot's copy started.
        let epoch = origin.epoch().to_string();
        let source = Source {
            origin: origin.clone(),
            pg,
            urls,
            database: identity,
            epoch,
            tables: HashMap::new(),
            applied: resumed.unwrap_or(0),
            loaded: resumed.is_some(),
            status: tx,
        };
        let task = tokio::spawn(source.run());
        Ok(PgOrigin {
            origin,
            status,
            task,
        })
    }

    /// Stops following the database and releases the data directory (a clean close; the
    /// origin serves what it holds as long as a clone lives).
    pub fn close(&self) {
        self.task.abort();
        self.origin.close();
    }

    /// The origin: serve it, read its topics.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// What the source is doing now.
    pub fn status(&self) -> PgStatus {
        self.status.borrow().clone()
    }

    /// A receiver of every status change.
    pub fn watch_status(&self) -> watch::Receiver<PgStatus> {
        self.status.clone()
    }

    /// Waits until the source streams from the slot (after a copy, or resuming a data
    /// directory).
    pub async fn wait_streaming(&self) {
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| s.streamed).await;
    }

    /// Waits until `n` initial copies in all have been loaded (1 = the first).
    pub async fn wait_copied(&self, n: u64) {
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| s.copies >= n).await;
    }

    /// Waits until a transaction committed at or after `lsn` has been applied (or the copy
    /// loaded past it).
    pub async fn wait_applied(&self, lsn: u64) {
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| s.applied >= lsn).await;
    }
}

/// Rows between two progress lines of the initial copy in the log.
const PROGRESS_ROWS: u64 = 500_000;
/// How often the replication lag is logged.
const LAG_LOG_EVERY: Duration = Duration::from_secs(60);

/// The two connection strings: replication (the slot) and plain (SQL, the copy).
#[derive(Clone)]
struct Urls {
    plain: String,
    replication: String,
}

impl Urls {
    fn new(pg: &PostgresConfig) -> Urls {
        let url = pg.url.trim();
        let mut params = Vec::new();
        if !url.contains("sslmode") {
            params.push(format!(
                "sslmode={}",
                match pg.tls {
                    PgTls::Disable => "disable",
                    PgTls::Prefer => PgTls::Prefer.as_str(),
                    PgTls::Require => "require",
                }
            ));
        }
        if !url.contains("connect_timeout") {
            params.push("connect_timeout=10".to_string());
        }
        let plain = with_params(url, &params);
        params.push("replication=database".to_string());
        Urls {
            plain,
            replication: with_params(url, &params),
        }
    }
}

/// Appends `key=value` parameters to a URL (`?a=b&c=d`) or a key=value string.
fn with_params(url: &str, params: &[String]) -> String {
    if params.is_empty() {
        return url.to_string();
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{}", params.join("&"))
    } else {
        format!("{url} {}", params.join(" "))
    }
}

/// Runs blocking libpq work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PgError> + Send + 'static,
) -> Result<T, PgError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(PgError::Sql(format!("database task failed: {e}"))))
}

/// The wait before retry `attempt` (1 = the first): full jitter below an exponential cap.
fn backoff(pg: &PostgresConfig, attempt: u32) -> Duration {
    let min = pg.retry_min.0.as_millis() as u64;
    let max = pg.retry_max.0.as_millis() as u64;
    let cap = min
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(max);
    Duration::from_millis(rand::random_range(0..=cap.max(1)))
}

/// Longest suffix [`epoch_after_lost_slot`] adds to a database's epoch.
pub(crate) const EPOCH_SUFFIX_MAX: usize = 18;

/// The epoch of a copy taken because the slot was lost: the database's, and the copy's
/// position. Versions stay commit positions, but the batches between what was applied and the
/// copy were never seen, so a stream must not resume across it, here or at another origin.
fn epoch_after_lost_slot(database: &str, at: u64) -> String {
    format!("{database}-c{at:x}")
}

/// Whether `epoch` is one this database's origin serves (its own or after a lost slot).
fn of_database(epoch: &str, database: &str) -> bool {
    epoch == database
        || epoch
            .strip_prefix(database)
            .and_then(|rest| rest.strip_prefix("-c"))
            .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `<system identifier>-<timeline>`: the epoch of an origin following this database.
fn identify(replication_url: &str) -> Result<String, PgError> {
    let mut c = PgReplicationConnection::connect(replication_url).map_err(PgError::from_pg)?;
    let r = c.identify_system().map_err(PgError::from_pg)?;
    match (r.get_value(0, 0), r.get_value(0, 1)) {
        (Some(sys), Some(tli)) => Ok(format!("pg-{sys}-{tli}")),
        _ => Err(PgError::Replication(
            "IDENTIFY_SYSTEM returned no system identifier".into(),
        )),
    }
}

/// One SQL statement on a plain connection; names in it were checked to be plain identifiers.
fn exec(c: &mut PgReplicationConnection, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
    let r = c.exec(sql).map_err(PgError::from_pg)?;
    let mut rows = Vec::with_capacity(r.ntuples().max(0) as usize);
    for i in 0..r.ntuples() {
        rows.push((0..r.nfields()).map(|j| r.get_value(i, j)).collect());
    }
    Ok(rows)
}

/// What the control plane found and made ready.
struct Prepared {
    tables: Vec<TableMeta>,
    /// The slot was (or is now) absent: a copy must be taken when it is created.
    copy: bool,
    slot_lost: bool,
}

/// The control plane, on a plain connection: `wal_level`, the tables and their keys, the
/// publication (created, or completed with missing tables) and the slot (dropped when a copy
/// must be taken: the copy is only consistent with a slot created with it).
fn prepare(url: &str, pg: &PostgresConfig, loaded: bool) -> Result<Prepared, PgError> {
    let mut c = PgReplicationConnection::connect(url).map_err(PgError::from_pg)?;
    let level = exec(&mut c, "SHOW wal_level")?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    if level != "logical" {
        return Err(PgError::WalLevel(level));
    }
    let mut tables = Vec::new();
    for spec in &pg.tables {
        let name = spec.name();
        let found = exec(
            &mut c,
            &format!(
                "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relname = '{name}' AND c.relkind IN ('r', 'p')"
            ),
        )?;
        let Some(row) = found.first() else {
            return Err(PgError::NoTable(name.into()));
        };
        let oid = row[0].clone().unwrap_or_default();
        let ident = row[1].clone().unwrap_or_default();
        let mut types = HashMap::new();
        for r in exec(
            &mut c,
            &format!(
                "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = {oid} AND attnum > 0 \
                 AND NOT attisdropped ORDER BY attnum"
            ),
        )? {
            if let (Some(n), Some(t)) = (&r[0], &r[1]) {
                types.insert(n.clone(), t.parse().unwrap_or(0));
            }
        }
        let mut index = |which: &str| -> Result<Vec<String>, PgError> {
            Ok(exec(
                &mut c,
                &format!(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid \
                     AND a.attnum = ANY(i.indkey) WHERE i.indrelid = {oid} AND i.{which} \
                     ORDER BY array_position(i.indkey::int2[], a.attnum)"
                ),
            )?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect())
        };
        let pk = index("indisprimary")?;
        let replident = index("indisreplident")?;
        // The columns an UPDATE or DELETE carries to name its old row.
        let identity: Option<Vec<String>> = match ident.as_str() {
            "f" => None,
            "i" => Some(replident.clone()),
            "n" => Some(Vec::new()),
            _ => Some(pk.clone()),
        };
        let key: Vec<String> = if spec.key().is_empty() {
            if pk.is_empty() {
                replident
            } else {
                pk
            }
        } else {
            for k in spec.key() {
                if !types.contains_key(k) {
                    return Err(PgError::NoColumn {
                        table: name.into(),
                        column: k.clone(),
                    });
                }
            }
            spec.key().to_vec()
        };
        if key.is_empty() || identity.as_ref().is_some_and(|i| i.is_empty()) {
            return Err(PgError::NoKey(name.into()));
        }
        if let Some(identity) = &identity {
            if let Some(col) = key.iter().find(|k| !identity.contains(k)) {
                return Err(PgError::KeyNotInIdentity {
                    table: name.into(),
                    column: col.clone(),
                });
            }
        }
        tables.push(TableMeta {
            name: name.into(),
            key,
            types,
        });
    }
    let publication = &pg.publication;
    let listed = |t: &TableMeta| format!("public.{}", t.name);
    if exec(
        &mut c,
        &format!("SELECT 1 FROM pg_publication WHERE pubname = '{publication}'"),
    )?
    .is_empty()
    {
        let list: Vec<String> = tables.iter().map(listed).collect();
        exec(
            &mut c,
            &format!(
                "CREATE PUBLICATION {publication} FOR TABLE {}",
                list.join(", ")
            ),
        )?;
        info!(%publication, tables = ?list, "publication created");
    } else {
        let have: Vec<String> = exec(
            &mut c,
            &format!(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = '{publication}' AND schemaname = 'public'"
            ),
        )?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
        for t in &tables {
            if !have.contains(&t.name) {
                exec(
                    &mut c,
                    &format!("ALTER PUBLICATION {publication} ADD TABLE {}", listed(t)),
                )?;
                info!(%publication, table = %t.name, "table added to the publication");
            }
        }
    }
    let slot = &pg.slot;
    let found = exec(
        &mut c,
        &format!(
            "SELECT active_pid, wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )?;
    let mut copy = !loaded;
    let mut slot_lost = false;
    match found.first() {
        Some(row) => {
            if let Some(pid) = row[0].clone() {
                return Err(PgError::SlotInUse {
                    slot: slot.clone(),
                    pid,
                });
            }
            if row[1].as_deref() == Some("lost") {
                slot_lost = loaded;
                copy = true;
            }
            if copy {
                exec(
                    &mut c,
                    &format!("SELECT pg_drop_replication_slot('{slot}')"),
                )?;
            }
        }
        None => {
            slot_lost = loaded;
            copy = true;
        }
    }
    Ok(Prepared {
        tables,
        copy,
        slot_lost,
    })
}

/// The task that follows the database.
struct Source {
    origin: Origin,
    pg: PostgresConfig,
    urls: Urls,
    /// `pg-<system identifier>-<timeline>` of the database followed.
    database: String,
    /// The epoch served: `database`, or after a lost slot `database` and the new copy's
    /// position (see [`epoch_after_lost_slot`]).
    epoch: String,
    tables: HashMap<String, TableMeta>,
    /// The commit position of the last transaction applied (or of the copy).
    applied: u64,
    /// A copy has been loaded: the topics hold the tables.
    loaded: bool,
    status: watch::Sender<PgStatus>,
}

impl Source {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let before = self.applied;
            let err = match self.session().await {
                Ok(()) => PgError::Replication("the replication stream ended".into()),
                Err(e) => e,
            };
            attempt = if self.applied > before {
                1
            } else {
                attempt + 1
            };
            // A copy that failed is not in progress any more.
            self.origin.set_upstream_copied(0);
            let wait = backoff(&self.pg, attempt);
            warn!(error = %err, attempt, retry_in_ms = wait.as_millis() as u64, "postgres source failed; retrying");
            self.status.send_modify(|s| {
                s.phase = "connecting";
                s.failures += 1;
                s.last_error = Some(err.to_string());
            });
            tokio::time::sleep(wait).await;
        }
    }

    async fn session(&mut self) -> Result<(), PgError> {
        let repl = self.urls.replication.clone();
        let now = blocking(move || identify(&repl)).await?;
        // A new timeline (a standby promoted) or another database behind the address: what
        // is held cannot be continued from there. The tables are copied again and served
        // under the new epoch, so every sidecar resnapshots.
        let mut new_epoch = None;
        if now != self.database {
            warn!(was = %self.database, now = %now, "the database has a new timeline or identity; copying the tables again under a new epoch");
            self.database = now.clone();
            self.loaded = false;
            new_epoch = Some(now);
        }
        let (url, pg, loaded) = (self.urls.plain.clone(), self.pg.clone(), self.loaded);
        let prepared = blocking(move || prepare(&url, &pg, loaded)).await?;
        if prepared.slot_lost {
            warn!(slot = %self.pg.slot, "replication slot lost; copying the tables again under a new epoch");
            self.status.send_modify(|s| s.slots_lost += 1);
        }
        self.tables = prepared
            .tables
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let config = ReplicationStreamConfig::builder(&self.pg.slot, &self.pg.publication)
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            .with_feedback_interval(self.pg.status_interval.0)
            .with_connection_timeout(Duration::from_secs(30))
            .with_retry_config(RetryConfig {
                max_attempts: 1,
                ..RetryConfig::default()
            });
        let mut stream = LogicalReplicationStream::new(&self.urls.replication, config)
            .await
            .map_err(PgError::from_pg)?;
        if prepared.copy {
            stream = self.copy(stream, new_epoch, prepared.slot_lost).await?;
        }
        stream.start(None).await.map_err(PgError::from_pg)?;
        let applied = self.applied;
        self.status.send_modify(|s| {
            s.phase = "streaming";
            s.streamed = true;
            s.applied = s.applied.max(applied);
        });
        info!(slot = %self.pg.slot, from = self.applied, "streaming from postgres");
        self.stream(stream).await
    }

    /// Creates the slot with an exported snapshot, copies the tables under it and loads them
    /// at the slot's consistent point.
    /// The copy is served under `new_epoch` when the database changed, under a new epoch of
    /// this database when `slot_lost` (changes between what was applied and the copy were
    /// never seen as batches, so no stream may resume across it), and otherwise under the
    /// database's own epoch (a first copy: two origins on one database then agree).
    async fn copy(
        &mut self,
        stream: LogicalReplicationStream,
        new_epoch: Option<String>,
        slot_lost: bool,
    ) -> Result<LogicalReplicationStream, PgError> {
        self.status.send_modify(|s| {
            s.phase = "copying";
            s.copied_rows = 0;
        });
        let snap = match stream.snapshot().await.map_err(PgError::from_pg)? {
            SnapshotOutcome::Available(s) => s,
            SnapshotOutcome::Unavailable(_) => {
                return Err(PgError::Replication(format!(
                    "slot '{}' appeared while the copy was being prepared (another origin with the same slot?)",
                    self.pg.slot
                )))
            }
        };
        // The slot exists now, so the server is out of recovery and its timeline is final: a
        // standby promoted between this session's IDENTIFY_SYSTEM and here is a new database
        // epoch, not a lost slot of the old timeline.
        let repl = self.urls.replication.clone();
        let now = blocking(move || identify(&repl)).await?;
        let new_epoch = if now != self.database {
            warn!(was = %self.database, now = %now, "the database has a new timeline or identity");
            self.database = now.clone();
            Some(now)
        } else {
            new_epoch
        };
        let at = snap.consistent_point().value();
        let started = std::time::Instant::now();
        let mut rows = snap.rows();
        let mut loaded: HashMap<String, Vec<(String, Bytes)>> = self
            .tables
            .keys()
            .map(|t| (t.clone(), Vec::new()))
            .collect();
        let mut n = 0u64;
        while let Some(row) = rows.next_row().await.map_err(PgError::from_pg)? {
            if &*row.relation.namespace != "public" {
                continue;
            }
            let table = &*row.relation.relation_name;
            let (Some(meta), Some(out)) = (self.tables.get(table), loaded.get_mut(table)) else {
                continue;
            };
            let Some(key) = meta.key_of(&row.data) else {
                continue;
            };
            out.push((key, meta.value_of(&row.data, None)));
            n += 1;
            if n.is_multiple_of(10_000) {
                self.status.send_modify(|s| s.copied_rows = n);
                self.origin.set_upstream_copied(n);
                if n.is_multiple_of(PROGRESS_ROWS) {
                    info!(
                        rows = n,
                        ms = started.elapsed().as_millis() as u64,
                        "initial copy in progress"
                    );
                }
            }
        }
        let stream = rows.finish().await.map_err(PgError::from_pg)?;
        let epoch = match new_epoch {
            Some(e) => e,
            None if slot_lost => epoch_after_lost_slot(&self.database, at),
            None => self.database.clone(),
        };
        if epoch != self.epoch {
            warn!(was = %self.epoch, epoch = %epoch, "serving a new epoch: sidecars resnapshot");
            self.status.send_modify(|s| s.new_epochs += 1);
        }
        self.origin
            .replace_topics(loaded.into_iter().collect(), at, &epoch)?;
        self.origin.set_upstream_copied(0);
        self.epoch = epoch;
        self.applied = at;
        self.loaded = true;
        let ms = started.elapsed().as_millis() as u64;
        info!(rows = n, ms, position = at, "initial copy loaded");
        self.status.send_modify(|s| {
            s.copies += 1;
            s.copied_rows = n;
            s.applied = at;
        });
        Ok(stream)
    }

    fn meta(&self, schema: &str, table: &str) -> Option<&TableMeta> {
        (schema == "public")
            .then(|| self.tables.get(table))
            .flatten()
    }

    /// The value `key` of `table` has at this point of `txn`.
    fn previous(&self, txn: &Txn, table: &str, key: &str) -> Option<Bytes> {
        match txn.pending(table, key) {
            Some(v) => v.cloned(),
            None => self.origin.value(table, key),
        }
    }

    /// Hands the replication lag to the origin, which tells it in Progress.
    fn report_lag(&self) {
        let s = self.status.borrow();
        self.origin.set_upstream_lag(s.lag_ms, s.lag_bytes());
    }

    async fn stream(&mut self, mut stream: LogicalReplicationStream) -> Result<(), PgError> {
        let cancel = CancellationToken::new();
        let feedback = stream.shared_lsn_feedback.clone();
        let mut txn = Txn::default();
        let mut in_txn = false;
        let idle = self.pg.status_interval.0.min(Duration::from_secs(1));
        let mut logged = std::time::Instant::now();
        loop {
            if logged.elapsed() >= LAG_LOG_EVERY {
                logged = std::time::Instant::now();
                let s = self.status.borrow().clone();
                info!(
                    lag_bytes = s.lag_bytes(),
                    lag_ms = s.lag_ms,
                    applied = s.applied,
                    transactions = s.transactions,
                    "replication"
                );
            }
            let ev = match tokio::time::timeout(idle, stream.next_event(&cancel)).await {
                Ok(ev) => ev.map_err(PgError::from_pg)?,
                Err(_) => {
                    // Idle between transactions: everything the server sent up to its last
                    // keepalive is applied (a transaction at or below it was delivered
                    // before it), so the slot may move there. Without this a quiet database
                    // keeps WAL for the slot, and a server shutting down waits for the reply.
                    if !in_txn {
                        let at = stream.current_lsn();
                        if at > 0 {
                            feedback.update_applied_lsn(at);
                            feedback.update_flushed_lsn(at);
                            stream.send_feedback().await.map_err(PgError::from_pg)?;
                        }
                        let applied = self.applied;
                        self.status.send_modify(|s| {
                            s.server_lsn = at.max(applied);
                            s.lag_ms = 0;
                        });
                        self.report_lag();
                    }
                    continue;
                }
            };
            match ev.event_type {
                EventType::Begin { .. } => {
                    txn = Txn::default();
                    in_txn = true;
                }
                EventType::Insert {
                    schema,
                    table,
                    data,
                    ..
                } => {
                    if let Some(meta) = self.meta(&schema, &table) {
                        if let Some(key) = meta.key_of(&data) {
                            let value = meta.value_of(&data, None);
                            txn.put(&table, key, value);
                        }
                    }
                }
                EventType::Update {
                    schema,
                    table,
                    old_data,
                    new_data,
                    ..
                } => {
                    let Some(meta) = self.meta(&schema, &table) else {
                        continue;
                    };
                    let old_key = old_data.as_ref().and_then(|o| meta.key_of(o));
                    let Some(new_key) = meta.key_of(&new_data).or_else(|| old_key.clone()) else {
                        continue;
                    };
                    let prev_key = old_key.as_deref().unwrap_or(&new_key);
                    let prev = self.previous(&txn, &table, prev_key);
                    let value = meta.value_of(&new_data, prev.as_deref());
                    if let Some(old) = old_key.filter(|o| *o != new_key) {
                        txn.delete(&table, old);
                    }
                    txn.put(&table, new_key, value);
                }
                EventType::Delete {
                    schema,
                    table,
                    old_data,
                    ..
                } => {
                    if let Some(key) = self
                        .meta(&schema, &table)
                        .and_then(|meta| meta.key_of(&old_data))
                    {
                        txn.delete(&table, key);
                    }
                }
                EventType::Truncate { tables, .. } => {
                    for t in tables {
                        let Some(name) = t.strip_prefix("public.") else {
                            continue;
                        };
                        if self.tables.contains_key(name) {
                            txn.truncate(name, self.origin.keys(name));
                        }
                    }
                }
                EventType::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_timestamp,
                } => {
                    in_txn = false;
                    let lag_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64)
                        .saturating_sub(commit_timestamp.timestamp_millis())
                        .max(0) as u64;
                    let version = commit_lsn.value();
                    let changes = std::mem::take(&mut txn);
                    if version > self.applied {
                        if !changes.is_empty() {
                            self.origin.apply_txn(version, changes.into_changes())?;
                        }
                        self.applied = version;
                    }
                    // With a data directory the transaction is on disk now; without one
                    // nothing is kept across a restart (the copy is taken again), so what is
                    // applied in memory may be confirmed.
                    feedback.update_applied_lsn(end_lsn);
                    feedback.update_flushed_lsn(end_lsn);
                    let server = stream.current_lsn();
                    let applied = self.applied;
                    self.status.send_modify(|s| {
                        s.applied = applied;
                        s.server_lsn = server.max(applied);
                        s.transactions += 1;
                        s.lag_ms = lag_ms;
                    });
                    self.report_lag();
                }
                _ => {}
            }
        }
    }
}

/// Topics of `cfg` that are fed by Postgres tables.
pub(crate) fn is_table(cfg: &OriginConfig, topic: &str) -> bool {
    cfg.postgres
        .as_ref()
        .is_some_and(|pg| pg.tables.iter().any(|t| t.name() == topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_after_a_lost_slot_is_still_the_databases_and_fits_its_bound() {
        let db = "pg-7340293837712938473-1";
        let e = epoch_after_lost_slot(db, u64::MAX);
        assert!(e.len() - db.len() <= EPOCH_SUFFIX_MAX, "{e}");
        assert!(of_database(&e, db));
        assert!(of_database(db, db));
        assert!(of_database(&epoch_after_lost_slot(db, 0x16b3748), db));
        // Another timeline, another database, or something that only looks like a suffix.
        assert!(!of_database(
            &epoch_after_lost_slot(db, 1),
            "pg-7340293837712938473-2"
        ));
        assert!(!of_database("pg-7340293837712938473-12", db));
        assert!(!of_database("pg-7340293837712938473-1-c", db));
        assert!(!of_database("pg-7340293837712938473-1-cxyz", db));
        assert!(!of_database("pg-1-1", db));
    }
}
