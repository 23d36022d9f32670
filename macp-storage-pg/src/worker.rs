//! The backend's own thread: a current-thread tokio runtime holding the
//! writer connection and the reader connections. [`crate::PgStorage`] and
//! its readers talk to it through channels (see the crate docs, "Threads").

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use macp_storage::StorageError;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, NoTls, Statement, Transaction};

use crate::cluster::ShardLease;
use crate::schema::{self, quote_ident, MIGRATIONS, SCHEMA_VERSION};
use crate::storage::{PgCheckpointInfo, PgConfig, PgInfo};
use crate::url::PgUrl;

/// Rows fetched per round trip while loading.
const LOAD_CHUNK: i32 = 2048;
/// How often `open` retries a lock another connection holds.
const LOCK_POLL: Duration = Duration::from_millis(25);
/// What a read-only storage answers to a write.
pub(crate) const READ_ONLY: StorageError = StorageError::Misuse("a read-only storage writes nothing");
/// How long a clean close may take before the connections are dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// A PostgreSQL failure with its whole cause chain in the message
/// (`tokio_postgres::Error` shows only its kind, "db error", itself).
#[derive(Debug)]
pub(crate) struct DbFailure(tokio_postgres::Error);

impl fmt::Display for DbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = std::error::Error::source(&self.0);
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        if let Some(code) = self.0.code() {
            write!(f, " (SQLSTATE {})", code.code())?;
        }
        Ok(())
    }
}

impl std::error::Error for DbFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Where errors say they happened: the URL without password, and the schema.
#[derive(Clone, Debug)]
pub(crate) struct Place(pub Arc<str>);

impl Place {
    /// A database failure of `op`.
    pub fn db(&self, op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StorageError + '_ {
        move |e| StorageError::Io { op, path: self.path(), source: io::Error::other(DbFailure(e)) }
    }

    /// `op` got no answer within `limit`.
    pub fn timed_out(&self, op: &'static str, limit: Duration) -> StorageError {
        let msg = format!("no answer from PostgreSQL within {limit:?}");
        StorageError::Io { op, path: self.path(), source: io::Error::new(io::ErrorKind::TimedOut, msg) }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&*self.0)
    }
}

/// Runs `f` with `limit`, mapping its database error and a timeout.
pub(crate) async fn within<T>(
    place: &Place,
    op: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StorageError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(place.db(op)),
        Err(_) => Err(place.timed_out(op, limit)),
    }
}

/// Records of one batch, as the columns the insert takes.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub pos: Vec<i64>,
    pub session_id: Vec<String>,
    pub seq: Vec<i64>,
    pub record: Vec<Vec<u8>>,
    pub ended_id: Vec<String>,
    pub ended_at: Vec<i64>,
    pub ended_pos: Vec<i64>,
    pub summary: Vec<Vec<u8>>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty() && self.ended_id.is_empty()
    }
}

/// A record row as loading hands it over.
#[derive(Debug)]
pub(crate) struct LoadRow {
    pub pos: i64,
    pub session_id: String,
    pub record: Vec<u8>,
}

/// What loading streams to the caller, in this order: at most one
/// checkpoint, row chunks, then the end (or a failure at any point).
#[derive(Debug)]
pub(crate) enum LoadItem {
    Checkpoint(Vec<u8>),
    Rows(Vec<LoadRow>),
    End {
        /// First log position the checkpoint does not cover (0: none).
        covers: i64,
        /// Where the next append goes.
        next: i64,
    },
    Failed(StorageError),
}

/// What one upkeep statement did.
#[derive(Debug)]
pub(crate) struct Upkeep {
    pub expired: i64,
    pub registry: i64,
    pub bytes: i64,
}

pub(crate) type Reply<T> = SyncSender<Result<T, StorageError>>;

/// Requests to the writer connection (or to a read-only storage's one
/// connection), served in order.
pub(crate) enum Op {
    /// The checkpoint and the records after it, of the lease's shard
    /// (none: shard 0).
    Load(Option<ShardLease>, SyncSender<LoadItem>),
    /// The checkpoint and every record of the log, from its first position.
    Scan(Option<ShardLease>, SyncSender<LoadItem>),
    /// What the tables hold ([`PgInfo`]).
    Info(Reply<PgInfo>),
    /// One batch (and a checkpoint covering everything before `covers`) as
    /// one transaction.
    Commit {
        /// The shard and the lease fencing the write (none: shard 0,
        /// unfenced).
        lease: Option<ShardLease>,
        batch: Batch,
        checkpoint: Option<(i64, Vec<u8>)>,
        reply: Reply<()>,
    },
    Maintain {
        lease: Option<ShardLease>,
        cutoff: Option<i64>,
        covers: i64,
        limit: i64,
        reply: Reply<Upkeep>,
    },
    /// Release the lock, close the connections properly, end the thread.
    Close,
    /// End the thread at once, dropping the connections mid-whatever, as a
    /// killed process would.
    Crash,
}

/// Requests to the reader connections, served concurrently.
pub(crate) enum ReadOp {
    /// `(pos, seq, record)` of one session with `after < seq <= upto`.
    History {
        session_id: String,
        after: i64,
        upto: i64,
        reply: Reply<Vec<(i64, i64, Vec<u8>)>>,
    },
    Ended {
        session_id: String,
        reply: Reply<Option<Vec<u8>>>,
    },
    /// `(session_id, summary)` of those of the ids that ended.
    EndedMany {
        session_ids: Vec<String>,
        reply: Reply<Vec<(String, Vec<u8>)>>,
    },
    List {
        after: Option<String>,
        limit: i64,
        reply: Reply<Vec<Vec<u8>>>,
    },
}

/// What the thread needs to start (and to reconnect a reader).
#[derive(Clone)]
pub(crate) struct Start {
    pub url: PgUrl,
    pub cfg: PgConfig,
    pub place: Place,
    /// A read-only storage ([`crate::PgStorage::open_read_only`]): one
    /// snapshot, no lock, no migration, nothing written.
    pub read_only: bool,
    /// A cluster's storage: no advisory lock (leases keep nodes apart),
    /// the schema must be a cluster's, and a writer connection lost is
    /// opened again. With `lease`, one shard's
    /// ([`crate::PgStorage::open_shard`]); without, a [`crate::PgHost`]
    /// serving the shards a node holds.
    pub cluster: Option<Option<ShardLease>>,
    /// Writer connections (a host spreads its shards over several).
    pub writers: usize,
}

/// The thread's body: opens everything, reports readiness on `ready`,
/// then serves until [`Op::Close`], [`Op::Crash`] or the storage is gone.
pub(crate) fn run(
    start: Start,
    ready: SyncSender<Result<(), StorageError>>,
    mut ops: Vec<UnboundedReceiver<Op>>,
    reads: UnboundedReceiver<ReadOp>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(StorageError::io("start the PostgreSQL runtime", start.place.path(), e)));
            return;
        }
    };
    rt.block_on(async move {
        if start.read_only {
            let Some(ops) = ops.pop() else { return };
            return serve_snapshot(start, ready, ops, reads).await;
        }
        let opened = tokio::time::timeout(start.cfg.timeout + start.cfg.lock_wait, open(&start)).await;
        let (writers, readers) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                let _ = ready.send(Err(e));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(start.place.timed_out("open", start.cfg.timeout + start.cfg.lock_wait)));
                return;
            }
        };
        if ready.send(Ok(())).is_err() {
            return;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let dispatcher = tokio::spawn(serve_reads(start.clone(), readers, reads, stopped));
        let serving: Vec<_> = writers.into_iter().zip(ops).map(|(w, ops)| tokio::spawn(w.serve(ops))).collect();
        let mut clean = true;
        for w in serving {
            clean &= w.await.unwrap_or(false);
        }
        if clean {
            let _ = stop.send(());
            if let Ok(readers) = dispatcher.await {
                close_readers(readers).await;
            }
        }
    });
    // Dropping the runtime drops whatever is left: after a crash, the
    // connections close without a goodbye and the server rolls back.
}

/// A connection and the task driving it.
pub(crate) struct Conn {
    pub client: Client,
    pub task: JoinHandle<()>,
}

pub(crate) async fn connect(start: &Start, role: &str) -> Result<Conn, StorageError> {
    let mut config = start.url.config().clone();
    config.application_name(format!("macp-rs {role}"));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(start.cfg.timeout);
    }
    let (client, connection) = config.connect(NoTls).await.map_err(start.place.db("connect"))?;
    let task = tokio::spawn(async move {
        // Its error (a lost connection) reaches the client's calls too.
        let _ = connection.await;
    });
    // Only our schema: every statement names our tables unqualified.
    let path = quote_ident(&start.cfg.schema);
    let set = "SELECT set_config('search_path', $1, false)";
    within(&start.place, "set search_path", start.cfg.timeout, client.execute(set, &[&path])).await?;
    Ok(Conn { client, task })
}

async fn open(start: &Start) -> Result<(Vec<Writer>, Vec<ReaderConn>), StorageError> {
    let mut writers = vec![open_writer(start).await?];
    for _ in 1..start.writers {
        writers.push(open_writer(start).await?);
    }
    let mut readers = Vec::with_capacity(start.cfg.readers.max(1));
    for _ in 0..start.cfg.readers.max(1) {
        readers.push(open_reader(start).await?);
    }
    Ok((writers, readers))
}

/// A writer connection: keepalives, the schema's lock (single node only),
/// migrated, checked, statements prepared.
async fn open_writer(start: &Start) -> Result<Writer, StorageError> {
    let conn = connect(start, "writer").await?;
    let place = &start.place;
    let t = start.cfg.timeout;
    // A host that dies leaves its server-side connection (and so the lock)
    // behind until the server notices; make it notice within about a
    // minute instead of the operating system's two hours. No effect on
    // Unix sockets.
    let keepalive = "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3";
    within(place, "set keepalives", t, conn.client.batch_execute(keepalive)).await?;
    let oid = schema_oid(&conn.client, start).await?;
    if start.cluster.is_none() {
        lock(&conn.client, start, oid).await?;
    }
    let mut conn = conn;
    migrate(&mut conn.client, start).await?;
    check_cluster(&conn.client, start).await?;
    let st = WriterStatements::prepare(&conn.client, place, t).await?;
    Ok(Writer { conn, st, place: place.clone(), timeout: t, start: start.clone() })
}

/// A connection whose transactions are read-only unless one asks
/// otherwise (`default_transaction_read_only`): a guard against our own
/// mistakes, not against a client that means to write.
async fn connect_read_only(start: &Start, role: &str) -> Result<Conn, StorageError> {
    let r = connect(start, role).await?;
    within(
        &start.place,
        "set read-only",
        start.cfg.timeout,
        r.client.batch_execute("SET default_transaction_read_only = on"),
    )
    .await?;
    Ok(r)
}

/// A reader connection: read-only, its statements prepared.
async fn open_reader(start: &Start) -> Result<ReaderConn, StorageError> {
    let (place, t) = (&start.place, start.cfg.timeout);
    let r = connect_read_only(start, "reader").await?;
    let st = ReaderStatements::prepare(&r.client, place, t).await?;
    Ok(ReaderConn { conn: Arc::new(Reader { client: r.client, st }), task: r.task })
}

/// The statements of a read-only storage's one connection.
struct SnapshotStatements {
    log: LogStatements,
    reads: ReaderStatements,
}

/// Starts the snapshot of a read-only storage on `client`: one
/// `REPEATABLE READ READ ONLY` transaction, whose first statement (the
/// look at the schema) fixes the snapshot every later read sees. Takes no
/// lock and creates nothing: a schema that is missing, not ours, or not
/// at [`SCHEMA_VERSION`] is refused.
async fn open_snapshot<'c>(
    client: &'c mut Client,
    start: &Start,
) -> Result<(Transaction<'c>, SnapshotStatements), StorageError> {
    let (place, t, schema) = (&start.place, start.cfg.timeout, &start.cfg.schema);
    let begin = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start();
    let tx = within(place, "begin a snapshot", t, begin).await?;
    let found = within(place, "find the schema", t, tx.query_opt(schema::SCHEMA_OID, &[schema])).await?;
    let version = match found {
        Some(_) => recorded_version(&tx, start, "read the schema version").await?,
        None => {
            let reason = format!("there is no schema {schema} (no macp-rs runtime has stored anything there)");
            return Err(StorageError::NotADataDir { path: place.path(), reason });
        }
    };
    match version {
        Some(SCHEMA_VERSION) => {}
        Some(v) => {
            let reason = format!(
                "its schema is at version {v}, older than this build's {SCHEMA_VERSION}; \
                 a runtime of this build migrates it when it opens it, a read-only look never does"
            );
            return Err(StorageError::NotADataDir { path: place.path(), reason });
        }
        None => {
            let reason = format!("schema {schema} holds no macp-rs tables");
            return Err(StorageError::NotADataDir { path: place.path(), reason });
        }
    }
    let c = tx.client();
    let (log, reads) = tokio::try_join!(LogStatements::prepare(c, place, t), ReaderStatements::prepare(c, place, t))?;
    Ok((tx, SnapshotStatements { log, reads }))
}

/// The thread's body for a read-only storage: one connection, one
/// snapshot ([`open_snapshot`]) for the storage's lifetime, every request
/// answered in it, in arrival order. Writes are refused without a word to
/// the database.
async fn serve_snapshot(
    start: Start,
    ready: SyncSender<Result<(), StorageError>>,
    mut ops: UnboundedReceiver<Op>,
    mut reads: UnboundedReceiver<ReadOp>,
) {
    let (place, t) = (&start.place, start.cfg.timeout);
    let mut conn = match connect_read_only(&start, "read-only").await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (tx, st) = match open_snapshot(&mut conn.client, &start).await {
        Ok(opened) => opened,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    loop {
        tokio::select! {
            op = ops.recv() => match op {
                Some(Op::Load(_, out)) => streamed(&out, stream_log(&tx, &st.log, 0, false, &out, place, t).await),
                Some(Op::Scan(_, out)) => streamed(&out, stream_log(&tx, &st.log, 0, true, &out, place, t).await),
                Some(Op::Info(reply)) => drop(reply.send(info(tx.client(), place, t).await)),
                Some(Op::Commit { reply, .. }) => drop(reply.send(Err(READ_ONLY))),
                Some(Op::Maintain { reply, .. }) => drop(reply.send(Err(READ_ONLY))),
                Some(Op::Crash) => return,
                Some(Op::Close) | None => break,
            },
            Some(op) = reads.recv() => answer(tx.client(), &st.reads, op, t, place).await,
        }
    }
    let _ = tokio::time::timeout(CLOSE_WITHIN, tx.rollback()).await;
    drop(conn.client);
    let _ = tokio::time::timeout(CLOSE_WITHIN, conn.task).await;
}

/// Sends the end of a [`stream_log`] in the snapshot, or its failure, to
/// `out` (nothing when the caller stopped listening).
fn streamed(out: &SyncSender<LoadItem>, result: Result<Option<LoadItem>, StorageError>) {
    match result {
        Ok(Some(end)) => drop(out.send(end)),
        Ok(None) => {}
        Err(e) => drop(out.send(LoadItem::Failed(e))),
    }
}

/// The oid of the schema, created first if missing.
pub(crate) async fn schema_oid(client: &Client, start: &Start) -> Result<i64, StorageError> {
    let (place, t, schema) = (&start.place, start.cfg.timeout, &start.cfg.schema);
    for _ in 0..2 {
        let row = within(place, "find the schema", t, client.query_opt(schema::SCHEMA_OID, &[schema])).await?;
        if let Some(row) = row {
            return row.try_get(0).map_err(place.db("find the schema"));
        }
        let create = format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema));
        match within(place, "create the schema", t, client.batch_execute(&create)).await {
            Ok(()) => {}
            // Created by someone else at the same moment: look again.
            Err(StorageError::Io { source, .. }) if is_unique_violation(&source) => {}
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::NotADataDir { path: place.path(), reason: "the schema cannot be created or found".into() })
}

fn is_unique_violation(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<DbFailure>())
        .and_then(|f| f.0.code())
        .is_some_and(|c| *c == SqlState::UNIQUE_VIOLATION)
}

/// Takes the schema's advisory lock for this connection's lifetime, waiting
/// up to `lock_wait` for a holder that is going away.
async fn lock(client: &Client, start: &Start, oid: i64) -> Result<(), StorageError> {
    let deadline = Instant::now() + start.cfg.lock_wait;
    loop {
        let row = within(
            &start.place,
            "lock",
            start.cfg.timeout,
            client.query_one(schema::TRY_LOCK, &[&schema::LOCK_CLASS, &oid]),
        )
        .await?;
        let got: bool = row.try_get(0).map_err(start.place.db("lock"))?;
        if got {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StorageError::Locked(start.place.path()));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// The schema version recorded in `tx`'s schema: `None` when the schema
/// holds none of our tables (a new one), an error for tables named like
/// ours without a record of versions, or a version newer than this build.
async fn recorded_version(tx: &Transaction<'_>, start: &Start, op: &'static str) -> Result<Option<u32>, StorageError> {
    let (place, t, schema) = (&start.place, start.cfg.timeout, &start.cfg.schema);
    let tables: Vec<String> = within(place, op, t, tx.query(schema::OUR_TABLES, &[schema]))
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(place.db(op))?;
    if tables.is_empty() {
        return Ok(None);
    }
    if !tables.iter().any(|n| n == schema::VERSION_TABLE) {
        // Never initialise over (or read as ours) tables we did not create,
        // or whose record of versions was lost.
        return Err(StorageError::NotADataDir {
            path: place.path(),
            reason: format!("it holds tables named like ours ({}) but no {}", tables.join(", "), schema::VERSION_TABLE),
        });
    }
    let row = within(place, op, t, tx.query_one(schema::CURRENT_VERSION, &[])).await?;
    let v: i64 = row.try_get(0).map_err(place.db(op))?;
    let current = u32::try_from(v).map_err(|_| StorageError::NotADataDir {
        path: place.path(),
        reason: format!("{} says version {v}", schema::VERSION_TABLE),
    })?;
    if current > SCHEMA_VERSION {
        return Err(StorageError::NewerFormat { found: current, supported: SCHEMA_VERSION });
    }
    Ok(Some(current))
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction, or refuses
/// a schema this build does not know.
pub(crate) async fn migrate(client: &mut Client, start: &Start) -> Result<(), StorageError> {
    let (place, t) = (&start.place, start.cfg.timeout);
    let tx = within(place, "migrate", t, client.transaction()).await?;
    // Nodes of a cluster open the schema at the same moment: one migrates,
    // the others wait here and then find it done.
    within(place, "migrate", t, tx.execute(schema::MIGRATE_LOCK, &[&start.cfg.schema])).await?;
    let current = match recorded_version(&tx, start, "migrate").await? {
        Some(v) => v,
        None => {
            within(place, "migrate", t, tx.batch_execute(schema::CREATE_VERSION_TABLE)).await?;
            0
        }
    };
    let by = concat!("macp-rs ", env!("CARGO_PKG_VERSION"));
    for (v, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        within(place, "migrate", t, tx.batch_execute(sql)).await?;
        let version = v as i32 + 1;
        within(place, "migrate", t, tx.execute(schema::RECORD_VERSION, &[&version, &by])).await?;
    }
    within(place, "migrate", t, tx.commit()).await
}

/// Refuses a schema of the other kind: a cluster's (shard count stored)
/// to the single-node runtime, and a single-node runtime's (no shard
/// count) or a shard beyond the count to a cluster node's storage. The
/// two lay their sessions out differently (one log, or a log per shard),
/// so neither may read the other's.
async fn check_cluster(c: &Client, start: &Start) -> Result<(), StorageError> {
    let (place, t) = (&start.place, start.cfg.timeout);
    let row = within(place, "read the shard count", t, c.query_opt(schema::CLUSTER_SHARDS, &[])).await?;
    let shards: Option<i32> = row.map(|r| r.try_get(0)).transpose().map_err(place.db("read the shard count"))?;
    match (&start.cluster, shards) {
        (None, None) => Ok(()),
        (None, Some(n)) => Err(StorageError::NotADataDir {
            path: place.path(),
            reason: format!(
                "it holds a cluster's data ({n} shards): start this runtime as a cluster node (--node-id), \
                 or give it a schema of its own"
            ),
        }),
        (Some(_), None) => Err(StorageError::NotADataDir {
            path: place.path(),
            reason: "it is not a cluster's schema (no shard count stored): a cluster node joins it first".into(),
        }),
        (Some(Some(l)), Some(n)) if l.shard >= n.max(0) as u32 => {
            Err(StorageError::Misuse("a shard beyond the cluster's shard count"))
        }
        (Some(_), Some(_)) => Ok(()),
    }
}

struct WriterStatements {
    batch: Statement,
    batch_checkpoint: Statement,
    log: LogStatements,
    maintain: Statement,
}

/// The statements that read the log: the checkpoint, and the records from
/// a position on.
struct LogStatements {
    checkpoint: Statement,
    records: Statement,
}

impl LogStatements {
    async fn prepare(c: &Client, place: &Place, t: Duration) -> Result<Self, StorageError> {
        let (checkpoint, records) = tokio::try_join!(
            prepare(c, place, t, schema::LOAD_CHECKPOINT),
            prepare(c, place, t, schema::LOAD_RECORDS),
        )?;
        Ok(LogStatements { checkpoint, records })
    }
}

/// Streams the checkpoint (if any) and then the records to `out` in log
/// order, [`LOAD_CHUNK`] a round trip through a cursor of `tx`: the
/// records the checkpoint does not cover, or with `whole` every record
/// from the log's first position. Returns the [`LoadItem::End`] to send
/// once the transaction is done with, or `None` when the caller stopped
/// listening.
async fn stream_log(
    tx: &Transaction<'_>,
    st: &LogStatements,
    shard: i32,
    whole: bool,
    out: &SyncSender<LoadItem>,
    place: &Place,
    t: Duration,
) -> Result<Option<LoadItem>, StorageError> {
    let covers = match within(place, "load", t, tx.query_opt(&st.checkpoint, &[&shard])).await? {
        Some(row) => {
            let covers: i64 = row.try_get(0).map_err(place.db("load the checkpoint"))?;
            let state: Vec<u8> = row.try_get(1).map_err(place.db("load the checkpoint"))?;
            if out.send(LoadItem::Checkpoint(state)).is_err() {
                return Ok(None);
            }
            covers
        }
        None => 0,
    };
    let from: i64 = if whole { 0 } else { covers };
    let portal = within(place, "load", t, tx.bind(&st.records, &[&shard, &from])).await?;
    let mut last = None;
    loop {
        let rows = within(place, "load", t, tx.query_portal(&portal, LOAD_CHUNK)).await?;
        let done = rows.len() < LOAD_CHUNK as usize;
        let chunk = rows
            .iter()
            .map(|r| Ok(LoadRow { pos: r.try_get(0)?, session_id: r.try_get(1)?, record: r.try_get(2)? }))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(place.db("load"))?;
        if let Some(r) = chunk.last() {
            last = Some(r.pos);
        }
        // Blocks this thread while the caller is behind: loading is all
        // the connection does meanwhile, and readers wait a moment.
        if !chunk.is_empty() && out.send(LoadItem::Rows(chunk)).is_err() {
            return Ok(None);
        }
        if done {
            break;
        }
    }
    let next = last.map_or(1, |p| p + 1).max(covers).max(1);
    Ok(Some(LoadItem::End { covers, next }))
}

/// [`PgInfo`] as `c` sees the tables (inside a snapshot's transaction
/// when `c` is that transaction's client).
async fn info(c: &Client, place: &Place, t: Duration) -> Result<PgInfo, StorageError> {
    let row = within(place, "info", t, c.query_one(schema::INFO, &[])).await?;
    let int = |i| row.try_get::<_, Option<i64>>(i).map_err(place.db("info"));
    let count = |i| int(i).map(|v| v.unwrap_or(0).max(0) as u64);
    let pos = |i| int(i).map(|v| v.map(|p| p.max(0) as u64));
    let checkpoint = match (int(6)?, int(7)?, int(8)?) {
        (Some(covers), bytes, taken_at) => Some(PgCheckpointInfo {
            covers: covers.max(0) as u64,
            bytes: bytes.unwrap_or(0).max(0) as u64,
            taken_at_unix_ms: taken_at.unwrap_or(0),
        }),
        _ => None,
    };
    Ok(PgInfo {
        schema_version: u32::try_from(count(0)?).unwrap_or(u32::MAX),
        records: count(1)?,
        first_pos: pos(2)?,
        last_pos: pos(3)?,
        ended_sessions: count(4)?,
        bytes: count(5)?,
        checkpoint,
    })
}

/// Prepares `sql` on `c`. Called for several statements at once, so the
/// requests are pipelined: one round trip for all.
async fn prepare(c: &Client, place: &Place, t: Duration, sql: &str) -> Result<Statement, StorageError> {
    within(place, "prepare", t, c.prepare(sql)).await
}

impl WriterStatements {
    async fn prepare(c: &Client, place: &Place, t: Duration) -> Result<Self, StorageError> {
        let (batch, batch_checkpoint, log, maintain) = tokio::try_join!(
            prepare(c, place, t, schema::BATCH),
            prepare(c, place, t, schema::BATCH_CHECKPOINT),
            LogStatements::prepare(c, place, t),
            prepare(c, place, t, schema::MAINTAIN),
        )?;
        Ok(WriterStatements { batch, batch_checkpoint, log, maintain })
    }
}

struct Writer {
    conn: Conn,
    st: WriterStatements,
    place: Place,
    timeout: Duration,
    /// How it was opened: a cluster's writer connection is opened again
    /// when found lost (a single node's holds the lock and is not).
    start: Start,
}

/// The shard a request is about: the lease's, or the single node's 0.
fn shard_of_lease(lease: &Option<ShardLease>) -> i32 {
    lease.as_ref().map_or(0, |l| l.shard as i32)
}

/// The node id and epoch fencing a write (nulls: unfenced).
fn fence(lease: &Option<ShardLease>) -> (Option<&str>, i64) {
    lease.as_ref().map_or((None, 0), |l| (Some(l.node_id.as_str()), l.epoch))
}

impl Writer {
    /// Serves `ops` in order; true when it ended with a clean close.
    async fn serve(mut self, mut ops: UnboundedReceiver<Op>) -> bool {
        let mut held: Option<Op> = None;
        loop {
            let op = match held.take() {
                Some(op) => op,
                None => match ops.recv().await {
                    Some(op) => op,
                    None => break,
                },
            };
            if !matches!(op, Op::Close | Op::Crash) {
                if let Err(e) = self.reconnect_if_lost().await {
                    op.fail(e);
                    continue;
                }
            }
            match op {
                Op::Load(lease, out) => {
                    if let Err(e) = self.load(&lease, &out, false).await {
                        let _ = out.send(LoadItem::Failed(e));
                    }
                }
                Op::Scan(lease, out) => {
                    if let Err(e) = self.load(&lease, &out, true).await {
                        let _ = out.send(LoadItem::Failed(e));
                    }
                }
                Op::Info(reply) => {
                    let _ = reply.send(info(&self.conn.client, &self.place, self.timeout).await);
                }
                Op::Commit { lease, batch, checkpoint, reply } => {
                    // The commits of other shards queued behind this one go
                    // in the same transaction: one WAL flush for them all
                    // (a host's shards share this connection).
                    let mut group = vec![(lease, batch, checkpoint, reply)];
                    while group.len() < MAX_GROUP {
                        match ops.try_recv() {
                            Ok(Op::Commit { lease, batch, checkpoint, reply }) => {
                                group.push((lease, batch, checkpoint, reply))
                            }
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if group.len() == 1 {
                        let (lease, batch, checkpoint, reply) = group.pop().expect("one commit");
                        let _ = reply.send(self.commit(&lease, batch, checkpoint).await);
                    } else {
                        self.commit_group(group).await;
                    }
                }
                Op::Maintain { lease, cutoff, covers, limit, reply } => {
                    let _ = reply.send(self.maintain(&lease, cutoff, covers, limit).await);
                }
                Op::Crash => return false,
                Op::Close => break,
            }
        }
        // Release the lock at once (a reopen right after must not wait for
        // the server to notice the connection is gone), then say goodbye.
        if self.start.cluster.is_none() {
            let unlock = self.conn.client.execute(schema::UNLOCK, &[]);
            let _ = tokio::time::timeout(CLOSE_WITHIN, unlock).await;
        }
        drop(self.conn.client);
        let _ = tokio::time::timeout(CLOSE_WITHIN, self.conn.task).await;
        true
    }

    /// Streams the log to `out` (see [`stream_log`]) in a transaction of
    /// its own.
    /// A cluster's writer connection found closed (the database restarted,
    /// an operator ended it) is opened again; a single node's is not: it
    /// held the schema's lock, and the driver reopens the whole storage.
    async fn reconnect_if_lost(&mut self) -> Result<(), StorageError> {
        if self.start.cluster.is_none() || !self.conn.client.is_closed() {
            return Ok(());
        }
        let fresh = open_writer(&self.start).await?;
        let old = std::mem::replace(self, fresh);
        drop(old.conn.client);
        let _ = tokio::time::timeout(CLOSE_WITHIN, old.conn.task).await;
        Ok(())
    }

    async fn load(
        &mut self,
        lease: &Option<ShardLease>,
        out: &SyncSender<LoadItem>,
        whole: bool,
    ) -> Result<(), StorageError> {
        let (place, t) = (&self.place, self.timeout);
        let tx = within(place, "load", t, self.conn.client.transaction()).await?;
        // The caller stopped listening (cancelled): the transaction rolls
        // back as it is dropped.
        let Some(end) = stream_log(&tx, &self.st.log, shard_of_lease(lease), whole, out, place, t).await? else {
            return Ok(());
        };
        within(place, "load", t, tx.commit()).await?;
        let _ = out.send(end);
        Ok(())
    }

    /// Several shards' commits in one transaction. Each statement is fenced
    /// on its own (a fenced one inserts nothing and answers false), so one
    /// shard's lost lease refuses only that shard's commit; a database
    /// error fails them all, as nothing of the transaction was stored.
    async fn commit_group(&mut self, group: Vec<Commit>) {
        let (place, t) = (self.place.clone(), self.timeout);
        let mut outcomes = Vec::with_capacity(group.len());
        let result: Result<(), StorageError> = async {
            let tx = within(&place, "commit", t, self.conn.client.transaction()).await?;
            // The group's lease rows, locked in shard order before any
            // statement locks one (see schema::LOCK_LEASES_SHARED).
            let mut shards: Vec<i32> = group.iter().filter(|c| c.0.is_some()).map(|c| shard_of_lease(&c.0)).collect();
            if !shards.is_empty() {
                shards.sort_unstable();
                within(&place, "commit", t, tx.execute(schema::LOCK_LEASES_SHARED, &[&shards])).await?;
            }
            let (tx_ref, st) = (&tx, &self.st);
            let runs = group
                .iter()
                .map(|(lease, b, checkpoint, _)| run_batch(tx_ref, st, lease, b, checkpoint.as_ref(), &place, t));
            for outcome in futures_util::future::join_all(runs).await {
                outcomes.push(outcome?);
            }
            within(&place, "commit", t, tx.commit()).await
        }
        .await;
        match result {
            Ok(()) => {
                for ((_, _, _, reply), outcome) in group.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, _, _, reply) in group {
                    let source = io::Error::other(msg.clone());
                    let _ = reply.send(Err(StorageError::Io { op: "commit", path: place.path(), source }));
                }
            }
        }
    }

    async fn commit(
        &self,
        lease: &Option<ShardLease>,
        b: Batch,
        checkpoint: Option<(i64, Vec<u8>)>,
    ) -> Result<(), StorageError> {
        // One statement: its own transaction.
        run_batch(&self.conn.client, &self.st, lease, &b, checkpoint.as_ref(), &self.place, self.timeout).await?
    }
}

/// A commit waiting in a writer's queue.
type Commit = (Option<ShardLease>, Batch, Option<(i64, Vec<u8>)>, Reply<()>);

/// Most commits one writer transaction groups.
const MAX_GROUP: usize = 256;

/// Runs one batch statement (with the checkpoint, if any) on `c`: the
/// outer error is the database's, the inner one the fence's refusal.
async fn run_batch(
    c: &impl tokio_postgres::GenericClient,
    st: &WriterStatements,
    lease: &Option<ShardLease>,
    b: &Batch,
    checkpoint: Option<&(i64, Vec<u8>)>,
    place: &Place,
    t: Duration,
) -> Result<Result<(), StorageError>, StorageError> {
    let (node, epoch) = fence(lease);
    let shard = shard_of_lease(lease);
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &b.pos,
        &b.session_id,
        &b.seq,
        &b.record,
        &b.ended_id,
        &b.ended_at,
        &b.ended_pos,
        &b.summary,
        &shard,
        &node,
        &epoch,
    ];
    let statement = match checkpoint {
        Some((covers, state)) => {
            params.push(covers);
            params.push(state);
            &st.batch_checkpoint
        }
        None => &st.batch,
    };
    let op = if checkpoint.is_some() { "checkpoint" } else { "commit" };
    let row = within(place, op, t, c.query_one(statement, &params)).await?;
    let stored: bool = row.try_get(0).map_err(place.db(op))?;
    Ok(if stored { Ok(()) } else { Err(StorageError::Fenced { shard: shard as u32, epoch }) })
}

impl Writer {
    async fn maintain(
        &self,
        lease: &Option<ShardLease>,
        cutoff: Option<i64>,
        covers: i64,
        limit: i64,
    ) -> Result<Upkeep, StorageError> {
        let (place, t) = (&self.place, self.timeout);
        let (node, epoch) = fence(lease);
        let shard = shard_of_lease(lease);
        let params: [&(dyn ToSql + Sync); 6] = [&cutoff, &covers, &limit, &shard, &node, &epoch];
        let row = within(place, "maintain", t, self.conn.client.query_one(&self.st.maintain, &params)).await?;
        let get = |i| row.try_get::<_, i64>(i).map_err(place.db("maintain"));
        Ok(Upkeep { expired: get(0)?, registry: get(1)?, bytes: get(2)? })
    }
}

struct ReaderStatements {
    history: Statement,
    ended: Statement,
    ended_many: Statement,
    list_first: Statement,
    list_after: Statement,
}

impl ReaderStatements {
    async fn prepare(c: &Client, place: &Place, t: Duration) -> Result<Self, StorageError> {
        let (history, ended, ended_many, list_first, list_after) = tokio::try_join!(
            prepare(c, place, t, schema::HISTORY),
            prepare(c, place, t, schema::ENDED),
            prepare(c, place, t, schema::ENDED_MANY),
            prepare(c, place, t, schema::LIST_FIRST),
            prepare(c, place, t, schema::LIST_AFTER),
        )?;
        Ok(ReaderStatements { history, ended, ended_many, list_first, list_after })
    }
}

/// A reader connection, shared by the read tasks it serves (queries on
/// one connection are pipelined).
struct Reader {
    client: Client,
    st: ReaderStatements,
}

struct ReaderConn {
    conn: Arc<Reader>,
    task: JoinHandle<()>,
}

/// Hands each read to the next reader connection, round robin, in a task
/// of its own so reads never wait for each other's answers. A reader
/// connection found closed (the server restarted, or an operator ended
/// it) is opened again first; if that fails, so does the read. Returns
/// the connections once `stop` fires, to be closed properly.
async fn serve_reads(
    start: Start,
    mut readers: Vec<ReaderConn>,
    mut reads: UnboundedReceiver<ReadOp>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<ReaderConn> {
    let mut next = 0usize;
    loop {
        let op = tokio::select! {
            op = reads.recv() => match op {
                Some(op) => op,
                None => break,
            },
            _ = &mut stop => break,
        };
        let Some(i) = (!readers.is_empty()).then(|| next % readers.len()) else { break };
        next = next.wrapping_add(1);
        if readers[i].conn.client.is_closed() {
            match open_reader(&start).await {
                // The old connection's task ended with its connection.
                Ok(fresh) => readers[i] = fresh,
                Err(e) => {
                    op.fail(e);
                    continue;
                }
            }
        }
        let (reader, t, place) = (readers[i].conn.clone(), start.cfg.timeout, start.place.clone());
        tokio::spawn(async move { reader.serve(op, t, &place).await });
    }
    readers
}

impl Op {
    /// Answers the request with `e` (close and crash need no answer).
    fn fail(self, e: StorageError) {
        match self {
            Op::Load(_, out) | Op::Scan(_, out) => drop(out.send(LoadItem::Failed(e))),
            Op::Info(reply) => drop(reply.send(Err(e))),
            Op::Commit { reply, .. } => drop(reply.send(Err(e))),
            Op::Maintain { reply, .. } => drop(reply.send(Err(e))),
            Op::Close | Op::Crash => {}
        }
    }
}

impl ReadOp {
    /// Answers the read with `e`.
    fn fail(self, e: StorageError) {
        // A reader that stopped waiting needs no answer.
        match self {
            ReadOp::History { reply, .. } => drop(reply.send(Err(e))),
            ReadOp::Ended { reply, .. } => drop(reply.send(Err(e))),
            ReadOp::EndedMany { reply, .. } => drop(reply.send(Err(e))),
            ReadOp::List { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

impl Reader {
    async fn serve(&self, op: ReadOp, t: Duration, place: &Place) {
        answer(&self.client, &self.st, op, t, place).await
    }
}

/// Answers `op` on `c` with statements `st` prepared on it.
async fn answer(c: &Client, st: &ReaderStatements, op: ReadOp, t: Duration, place: &Place) {
    match op {
        ReadOp::History { session_id, after, upto, reply } => {
            let r = within(place, "history", t, c.query(&st.history, &[&session_id, &after, &upto])).await;
            let r = r.and_then(|rows| {
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                    .map_err(place.db("history"))
            });
            let _ = reply.send(r);
        }
        ReadOp::Ended { session_id, reply } => {
            let r = within(place, "ended", t, c.query_opt(&st.ended, &[&session_id])).await;
            let r = r.and_then(|row| row.map(|r| r.try_get(0)).transpose().map_err(place.db("ended")));
            let _ = reply.send(r);
        }
        ReadOp::EndedMany { session_ids, reply } => {
            let rows = within(place, "ended", t, c.query(&st.ended_many, &[&session_ids])).await;
            let r = rows.and_then(|rows| {
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                    .map_err(place.db("ended"))
            });
            let _ = reply.send(r);
        }
        ReadOp::List { after, limit, reply } => {
            let rows = match &after {
                Some(a) => within(place, "list ended", t, c.query(&st.list_after, &[a, &limit])).await,
                None => within(place, "list ended", t, c.query(&st.list_first, &[&limit])).await,
            };
            let r = rows.and_then(|rows| {
                rows.iter().map(|r| r.try_get(0)).collect::<Result<Vec<_>, _>>().map_err(place.db("list ended"))
            });
            let _ = reply.send(r);
        }
    }
}

/// Closes the reader connections properly once in-flight reads are done.
async fn close_readers(readers: Vec<ReaderConn>) {
    // Our references go here; the read tasks in flight hold the only
    // others. Once they finish, the clients drop and the connections end
    // with a goodbye.
    let tasks: Vec<JoinHandle<()>> = readers.into_iter().map(|r| r.task).collect();
    for task in tasks {
        let _ = tokio::time::timeout(CLOSE_WITHIN, task).await;
    }
}

#[cfg(test)]
mod tests {
    use macp_pg_test::{unique_name, PgServer};
    use macp_storage::suite::{self, record, sid};
    use macp_storage::Storage as _;

    use super::*;
    use crate::PgStorage;

    fn is_read_only_refusal(e: &tokio_postgres::Error) -> bool {
        e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
    }

    /// The read-only storage's connection itself refuses to write, in and
    /// out of its snapshot, so a write this crate sent by mistake would
    /// fail in PostgreSQL rather than change the runtime's tables; and it
    /// opens beside a writer that holds the schema's lock.
    #[test]
    fn the_read_only_connection_cannot_write() {
        let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
        let db = unique_name("ro");
        let url: PgUrl = pg.create_database(&db).expect("a database").parse().expect("its URL");
        let cfg = PgConfig { schema: unique_name("ro"), ..PgConfig::default() };
        let mut writer = PgStorage::open(&url, cfg.clone()).expect("open");
        suite::load(&mut writer);
        writer.append(&[record(1, 1), record(1, 2)], &[]).unwrap();
        writer.sync().unwrap();
        let rows = || {
            pg.psql(
                &db,
                &format!(
                    "SELECT string_agg(pos || ':' || md5(record), ',' ORDER BY pos) FROM {}.macp_records",
                    cfg.schema
                ),
            )
            .unwrap()
        };
        let before = rows();

        let place = Place(Arc::from("test"));
        let start = Start { url: url.clone(), cfg: cfg.clone(), place, read_only: true, cluster: None, writers: 1 };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut conn = connect_read_only(&start, "read-only").await.expect("connect");
            let path = quote_ident(&cfg.schema);
            conn.client.execute("SELECT set_config('search_path', $1, false)", &[&path]).await.unwrap();
            for write in [
                "INSERT INTO macp_records (pos, session_id, seq, record) VALUES (99, 'x', 1, '\\x00')",
                "DELETE FROM macp_records",
                "CREATE TABLE macp_other (i int)",
            ] {
                match conn.client.batch_execute(write).await {
                    Err(e) if is_read_only_refusal(&e) => {}
                    other => panic!("{write}: expected a read-only refusal, got {other:?}"),
                }
            }
            let (tx, _st) =
                open_snapshot(&mut conn.client, &start).await.expect("the snapshot opens beside the writer");
            let e = tx.batch_execute("UPDATE macp_records SET seq = seq + 1").await.unwrap_err();
            assert!(is_read_only_refusal(&e), "{e:?}");
        });
        assert_eq!(rows(), before, "nothing changed");
        writer.append(&[record(1, 3)], &[]).unwrap();
        writer.sync().expect("the writer was not disturbed");
        assert_eq!(
            pg.psql(&db, &format!("SELECT count(*) FROM {}.macp_records WHERE session_id = '{}'", cfg.schema, sid(1)))
                .unwrap(),
            "3"
        );
    }
}
