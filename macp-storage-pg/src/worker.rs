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
use tokio_postgres::{Client, NoTls, Statement};

use crate::schema::{self, quote_ident, MIGRATIONS, SCHEMA_VERSION};
use crate::storage::PgConfig;
use crate::url::PgUrl;

/// Rows fetched per round trip while loading.
const LOAD_CHUNK: i32 = 2048;
/// How often `open` retries a lock another connection holds.
const LOCK_POLL: Duration = Duration::from_millis(25);
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
async fn within<T>(
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

/// Requests to the writer connection, served in order.
pub(crate) enum Op {
    Load(SyncSender<LoadItem>),
    /// One batch (and a checkpoint covering everything before `covers`) as
    /// one transaction.
    Commit {
        batch: Batch,
        checkpoint: Option<(i64, Vec<u8>)>,
        reply: Reply<()>,
    },
    Maintain {
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
}

/// The thread's body: opens everything, reports readiness on `ready`,
/// then serves until [`Op::Close`], [`Op::Crash`] or the storage is gone.
pub(crate) fn run(
    start: Start,
    ready: SyncSender<Result<(), StorageError>>,
    ops: UnboundedReceiver<Op>,
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
        let opened = tokio::time::timeout(start.cfg.timeout + start.cfg.lock_wait, open(&start)).await;
        let (writer, readers) = match opened {
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
        if writer.serve(ops).await {
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
struct Conn {
    client: Client,
    task: JoinHandle<()>,
}

async fn connect(start: &Start, role: &str) -> Result<Conn, StorageError> {
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

async fn open(start: &Start) -> Result<(Writer, Vec<ReaderConn>), StorageError> {
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
    lock(&conn.client, start, oid).await?;
    let mut conn = conn;
    migrate(&mut conn.client, start).await?;
    let st = WriterStatements::prepare(&conn.client, place, t).await?;
    let mut readers = Vec::with_capacity(start.cfg.readers.max(1));
    for _ in 0..start.cfg.readers.max(1) {
        readers.push(open_reader(start).await?);
    }
    Ok((Writer { conn, st, place: place.clone(), timeout: t }, readers))
}

/// A reader connection: read-only, its statements prepared.
async fn open_reader(start: &Start) -> Result<ReaderConn, StorageError> {
    let (place, t) = (&start.place, start.cfg.timeout);
    let r = connect(start, "reader").await?;
    within(place, "set read-only", t, r.client.batch_execute("SET default_transaction_read_only = on")).await?;
    let st = ReaderStatements::prepare(&r.client, place, t).await?;
    Ok(ReaderConn { conn: Arc::new(Reader { client: r.client, st }), task: r.task })
}

/// The oid of the schema, created first if missing.
async fn schema_oid(client: &Client, start: &Start) -> Result<i64, StorageError> {
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

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction, or refuses
/// a schema this build does not know.
async fn migrate(client: &mut Client, start: &Start) -> Result<(), StorageError> {
    let (place, t, schema) = (&start.place, start.cfg.timeout, &start.cfg.schema);
    let tx = within(place, "migrate", t, client.transaction()).await?;
    let tables: Vec<String> = within(place, "migrate", t, tx.query(schema::OUR_TABLES, &[schema]))
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(place.db("migrate"))?;
    let current = if tables.iter().any(|n| n == schema::VERSION_TABLE) {
        let row = within(place, "migrate", t, tx.query_one(schema::CURRENT_VERSION, &[])).await?;
        let v: i64 = row.try_get(0).map_err(place.db("migrate"))?;
        u32::try_from(v).map_err(|_| StorageError::NotADataDir {
            path: place.path(),
            reason: format!("{} says version {v}", schema::VERSION_TABLE),
        })?
    } else if !tables.is_empty() {
        // Never initialise over tables we did not create (or whose record
        // of versions was lost).
        return Err(StorageError::NotADataDir {
            path: place.path(),
            reason: format!("it holds tables named like ours ({}) but no {}", tables.join(", "), schema::VERSION_TABLE),
        });
    } else {
        within(place, "migrate", t, tx.batch_execute(schema::CREATE_VERSION_TABLE)).await?;
        0
    };
    if current > SCHEMA_VERSION {
        return Err(StorageError::NewerFormat { found: current, supported: SCHEMA_VERSION });
    }
    let by = concat!("macp-rs ", env!("CARGO_PKG_VERSION"));
    for (v, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        within(place, "migrate", t, tx.batch_execute(sql)).await?;
        let version = v as i32 + 1;
        within(place, "migrate", t, tx.execute(schema::RECORD_VERSION, &[&version, &by])).await?;
    }
    within(place, "migrate", t, tx.commit()).await
}

struct WriterStatements {
    batch: Statement,
    batch_checkpoint: Statement,
    load_checkpoint: Statement,
    load_records: Statement,
    maintain: Statement,
}

/// Prepares `sql` on `c`. Called for several statements at once, so the
/// requests are pipelined: one round trip for all.
async fn prepare(c: &Client, place: &Place, t: Duration, sql: &str) -> Result<Statement, StorageError> {
    within(place, "prepare", t, c.prepare(sql)).await
}

impl WriterStatements {
    async fn prepare(c: &Client, place: &Place, t: Duration) -> Result<Self, StorageError> {
        let (batch, batch_checkpoint, load_checkpoint, load_records, maintain) = tokio::try_join!(
            prepare(c, place, t, schema::BATCH),
            prepare(c, place, t, schema::BATCH_CHECKPOINT),
            prepare(c, place, t, schema::LOAD_CHECKPOINT),
            prepare(c, place, t, schema::LOAD_RECORDS),
            prepare(c, place, t, schema::MAINTAIN),
        )?;
        Ok(WriterStatements { batch, batch_checkpoint, load_checkpoint, load_records, maintain })
    }
}

struct Writer {
    conn: Conn,
    st: WriterStatements,
    place: Place,
    timeout: Duration,
}

impl Writer {
    /// Serves `ops` in order; true when it ended with a clean close.
    async fn serve(mut self, mut ops: UnboundedReceiver<Op>) -> bool {
        while let Some(op) = ops.recv().await {
            match op {
                Op::Load(out) => {
                    if let Err(e) = self.load(&out).await {
                        let _ = out.send(LoadItem::Failed(e));
                    }
                }
                Op::Commit { batch, checkpoint, reply } => {
                    let _ = reply.send(self.commit(batch, checkpoint).await);
                }
                Op::Maintain { cutoff, covers, limit, reply } => {
                    let _ = reply.send(self.maintain(cutoff, covers, limit).await);
                }
                Op::Crash => return false,
                Op::Close => break,
            }
        }
        // Release the lock at once (a reopen right after must not wait for
        // the server to notice the connection is gone), then say goodbye.
        let unlock = self.conn.client.execute(schema::UNLOCK, &[]);
        let _ = tokio::time::timeout(CLOSE_WITHIN, unlock).await;
        drop(self.conn.client);
        let _ = tokio::time::timeout(CLOSE_WITHIN, self.conn.task).await;
        true
    }

    async fn load(&mut self, out: &SyncSender<LoadItem>) -> Result<(), StorageError> {
        let (place, t) = (&self.place, self.timeout);
        let tx = within(place, "load", t, self.conn.client.transaction()).await?;
        let covers = match within(place, "load", t, tx.query_opt(&self.st.load_checkpoint, &[])).await? {
            Some(row) => {
                let covers: i64 = row.try_get(0).map_err(place.db("load the checkpoint"))?;
                let state: Vec<u8> = row.try_get(1).map_err(place.db("load the checkpoint"))?;
                // The caller stopped listening (cancelled): the
                // transaction rolls back as it is dropped.
                if out.send(LoadItem::Checkpoint(state)).is_err() {
                    return Ok(());
                }
                covers
            }
            None => 0,
        };
        let portal = within(place, "load", t, tx.bind(&self.st.load_records, &[&covers])).await?;
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
            // Blocks this thread while the caller is behind: loading is
            // all the writer does meanwhile, and readers wait a moment.
            if !chunk.is_empty() && out.send(LoadItem::Rows(chunk)).is_err() {
                return Ok(());
            }
            if done {
                break;
            }
        }
        within(place, "load", t, tx.commit()).await?;
        let next = last.map_or(1, |p| p + 1).max(covers).max(1);
        let _ = out.send(LoadItem::End { covers, next });
        Ok(())
    }

    async fn commit(&self, b: Batch, checkpoint: Option<(i64, Vec<u8>)>) -> Result<(), StorageError> {
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&b.pos, &b.session_id, &b.seq, &b.record, &b.ended_id, &b.ended_at, &b.ended_pos, &b.summary];
        let statement = match &checkpoint {
            Some((covers, state)) => {
                params.push(covers);
                params.push(state);
                &self.st.batch_checkpoint
            }
            None => &self.st.batch,
        };
        let op = if checkpoint.is_some() { "checkpoint" } else { "commit" };
        within(&self.place, op, self.timeout, self.conn.client.execute(statement, &params)).await.map(|_| ())
    }

    async fn maintain(&self, cutoff: Option<i64>, covers: i64, limit: i64) -> Result<Upkeep, StorageError> {
        let (place, t) = (&self.place, self.timeout);
        let row =
            within(place, "maintain", t, self.conn.client.query_one(&self.st.maintain, &[&cutoff, &covers, &limit]))
                .await?;
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
        let c = &self.client;
        match op {
            ReadOp::History { session_id, after, upto, reply } => {
                let r = within(place, "history", t, c.query(&self.st.history, &[&session_id, &after, &upto])).await;
                let r = r.and_then(|rows| {
                    rows.iter()
                        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                        .map_err(place.db("history"))
                });
                let _ = reply.send(r);
            }
            ReadOp::Ended { session_id, reply } => {
                let r = within(place, "ended", t, c.query_opt(&self.st.ended, &[&session_id])).await;
                let r = r.and_then(|row| row.map(|r| r.try_get(0)).transpose().map_err(place.db("ended")));
                let _ = reply.send(r);
            }
            ReadOp::EndedMany { session_ids, reply } => {
                let rows = within(place, "ended", t, c.query(&self.st.ended_many, &[&session_ids])).await;
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
                    Some(a) => within(place, "list ended", t, c.query(&self.st.list_after, &[a, &limit])).await,
                    None => within(place, "list ended", t, c.query(&self.st.list_first, &[&limit])).await,
                };
                let r = rows.and_then(|rows| {
                    rows.iter().map(|r| r.try_get(0)).collect::<Result<Vec<_>, _>>().map_err(place.db("list ended"))
                });
                let _ = reply.send(r);
            }
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
