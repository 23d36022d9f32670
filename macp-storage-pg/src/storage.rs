//! [`PgStorage`]: the caller's side of the backend. It keeps the batch
//! being appended and the log positions; the database work happens on the
//! backend's thread ([`crate::worker`]).

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use macp_storage::{
    summary_id, Damage, DamageKind, LoadEvent, LoadSummary, LogPos, Maintenance, Record, Retention, SessionSummary,
    Storage, StorageError, StorageRead,
};
use prost::Message as _;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::cluster::ShardLease;
use crate::url::PgUrl;
use crate::worker::{self, Batch, LoadItem, Op, Place, ReadOp, Reply, Start, READ_ONLY};

/// Log chunks queued between the backend's thread and a loading caller.
const LOAD_DEPTH: usize = 4;
/// Records replayed between two looks at `cancelled`.
const CANCEL_EVERY: usize = 1024;

/// Settings of the PostgreSQL backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgConfig {
    /// The schema holding the tables (created if missing). One runtime
    /// owns a schema at a time, so several runtimes can share a database
    /// with a schema each; and tests give every case a schema of its own.
    pub schema: String,
    /// How long an ended session stays readable (`forever` never deletes).
    pub retention: Retention,
    /// Largest encoded record [`Storage::append`] accepts, as the file
    /// backend's limit (the kernel's payload limit keeps real records far
    /// below it).
    pub max_record_bytes: u32,
    /// Ended sessions (and covered registry records) deleted per
    /// [`Storage::maintain`] call at most, so one call stays short.
    pub maintain_sessions: u32,
    /// The least kernel time between two upkeep statements when the last
    /// one found no more to do and no checkpoint came since: the driver
    /// asks for upkeep ten times a second, and a cluster node's dozens of
    /// shards would otherwise keep the writer connections busy with
    /// statements that delete nothing.
    pub maintain_every_ms: i64,
    /// Reader connections, besides the writer's: reads (passive-subscribe
    /// history, GetSession of an ended session) are spread over them, so a
    /// slow read does not hold up the others, and none waits for a commit.
    pub readers: usize,
    /// How long opening waits for the schema's lock while another
    /// connection holds it: enough for the server to notice that a
    /// process which just died is gone, not so long that a second runtime
    /// on the same schema hangs before it is refused.
    pub lock_wait: Duration,
    /// Longest wait for any one answer from PostgreSQL (and the connect
    /// timeout, unless the URL sets one). A write that times out poisons
    /// the backend like a failed one: whether it committed is unknown
    /// until storage is loaded again.
    pub timeout: Duration,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            schema: "macp".into(),
            retention: Retention::Forever,
            max_record_bytes: 64 << 20,
            maintain_sessions: 512,
            maintain_every_ms: 5_000,
            readers: 2,
            lock_wait: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What the tables hold, as [`PgStorage::info`] reports it: for
/// `macp-admin inspect` and `verify`, which describe a database the way
/// they describe a data directory's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgInfo {
    /// The version recorded in `macp_schema_version`.
    pub schema_version: u32,
    /// Rows of the log (`macp_records`).
    pub records: u64,
    /// The log's first position, if it has rows. Positions count from 1
    /// and have no gaps until upkeep deletes rows, so a first position
    /// above 1, or fewer rows than positions, means some were deleted.
    pub first_pos: Option<u64>,
    /// The log's last position, if it has rows.
    pub last_pos: Option<u64>,
    /// Ended sessions kept (`macp_ended`).
    pub ended_sessions: u64,
    /// Bytes of the three tables, indexes included (`pg_total_relation_size`).
    pub bytes: u64,
    /// The checkpoint, if one was taken.
    pub checkpoint: Option<PgCheckpointInfo>,
}

/// The checkpoint row, without its open state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgCheckpointInfo {
    /// The first log position it does not cover: loading replays the
    /// records from here on.
    pub covers: u64,
    /// Size of the open state it holds.
    pub bytes: u64,
    /// When it was taken (the database's clock).
    pub taken_at_unix_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Unloaded,
    Ready,
    Poisoned,
}

/// A summary waiting for the next commit.
#[derive(Debug)]
struct PendingEnded {
    ended_at: i64,
    /// The log position after the records appended with it: every record
    /// of its session lies before it.
    ended_pos: i64,
    summary: Vec<u8>,
}

/// The PostgreSQL backend. See the crate docs.
pub struct PgStorage {
    ops: UnboundedSender<Op>,
    reads: UnboundedSender<ReadOp>,
    thread: Option<JoinHandle<()>>,
    cfg: PgConfig,
    place: Place,
    phase: Phase,
    /// The log position of the next appended record.
    next_pos: i64,
    /// First log position the latest checkpoint does not cover (0: no
    /// checkpoint): ended sessions whose summary lies before it may go.
    covers: i64,
    /// Records appended since the last commit.
    batch: Batch,
    /// Summaries appended since the last commit, one per session (the
    /// latest wins, as it would in the table).
    ended: BTreeMap<String, PendingEnded>,
    /// Opened with [`PgStorage::open_read_only`].
    read_only: bool,
    /// The shard and the lease fencing its writes, for a cluster's
    /// storage (none: the single node's shard 0).
    lease: Option<ShardLease>,
    /// The last upkeep: its kernel time, the checkpoint it saw, and what it
    /// reported (see [`PgConfig::maintain_every_ms`]).
    last_upkeep: Option<(i64, i64, Maintenance)>,
}

impl std::fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStorage")
            .field("place", &self.place.0)
            .field("phase", &self.phase)
            .field("next_pos", &self.next_pos)
            .field("covers", &self.covers)
            .field("pending_records", &self.batch.pos.len())
            .field("pending_ended", &self.ended.len())
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl PgStorage {
    /// Connects, takes the schema's lock, creates or migrates the schema,
    /// and opens the reader connections. Not loaded yet: call
    /// [`Storage::load`] first.
    ///
    /// Fails with [`StorageError::Locked`] if another runtime holds the
    /// schema, [`StorageError::NewerFormat`] if a newer macp-rs migrated
    /// it, [`StorageError::NotADataDir`] if it holds tables named like ours
    /// that we did not create, and [`StorageError::Io`] (the URL without
    /// password, and PostgreSQL's message) if the database cannot be
    /// reached or refuses.
    pub fn open(url: &PgUrl, cfg: PgConfig) -> Result<PgStorage, StorageError> {
        Self::start(url, cfg, false, None)
    }

    /// Opens one shard of a cluster's schema for the node holding `lease`
    /// (from [`crate::Membership`]): loading reads that shard's checkpoint
    /// and log only, and every write (commit, checkpoint, upkeep) commits
    /// only while the lease is still the node's at the same epoch and not
    /// lapsed, checked in the write's own transaction; otherwise the
    /// write fails with [`StorageError::Fenced`] and nothing of it is
    /// stored. No advisory lock: the lease is what keeps other nodes out.
    /// Reads are not fenced (they see only committed rows).
    ///
    /// Fails like [`PgStorage::open`], and with
    /// [`StorageError::NotADataDir`] on a schema no cluster created.
    pub fn open_shard(url: &PgUrl, cfg: PgConfig, lease: ShardLease) -> Result<PgStorage, StorageError> {
        Self::start(url, cfg, false, Some(lease))
    }

    /// Opens the schema for reading only, for tools (`macp-admin`) that
    /// look at a runtime's database, possibly while that runtime runs
    /// (see the crate docs, "Reading without writing"): no lock, no
    /// migration, and every read, [`Storage::load`] included, sees one
    /// consistent snapshot taken while opening. Writes are refused
    /// ([`StorageError::Misuse`]), except that the summaries recovery
    /// hands back are accepted and dropped: they are in the database
    /// already.
    ///
    /// Fails with [`StorageError::NotADataDir`] if the schema is missing,
    /// holds no macp-rs tables, or is at an older version (which only a
    /// writer migrates), [`StorageError::NewerFormat`] if a newer macp-rs
    /// migrated it, and [`StorageError::Io`] if the database cannot be
    /// reached or refuses.
    pub fn open_read_only(url: &PgUrl, cfg: PgConfig) -> Result<PgStorage, StorageError> {
        Self::start(url, cfg, true, None)
    }

    fn start(
        url: &PgUrl,
        cfg: PgConfig,
        read_only: bool,
        lease: Option<ShardLease>,
    ) -> Result<PgStorage, StorageError> {
        if cfg.schema.is_empty() || cfg.schema.len() > 63 || cfg.schema.contains('\0') {
            return Err(StorageError::Misuse("the schema name must be 1 to 63 bytes without NUL"));
        }
        let place = Place(Arc::from(format!("{url} schema {}", cfg.schema)));
        let (ops, ops_rx) = unbounded_channel();
        let (reads, reads_rx) = unbounded_channel();
        let (ready_tx, ready) = sync_channel(1);
        let place = match &lease {
            Some(l) => Place(Arc::from(format!("{} shard {}", place.0, l.shard))),
            None => place,
        };
        let cluster = lease.clone().map(Some);
        let start = Start { url: url.clone(), cfg: cfg.clone(), place: place.clone(), read_only, cluster, writers: 1 };
        let thread = std::thread::Builder::new()
            .name("macp-pg".into())
            .spawn(move || worker::run(start, ready_tx, vec![ops_rx], reads_rx))
            .map_err(|e| StorageError::io("start the PostgreSQL thread", place.path(), e))?;
        let opened = ready.recv().unwrap_or(Err(StorageError::Closed));
        if let Err(e) = opened {
            let _ = thread.join();
            return Err(e);
        }
        Ok(PgStorage {
            ops,
            reads,
            thread: Some(thread),
            cfg,
            place,
            phase: Phase::Unloaded,
            next_pos: 1,
            covers: 0,
            batch: Batch::default(),
            ended: BTreeMap::new(),
            read_only,
            lease,
            last_upkeep: None,
        })
    }

    /// What the tables hold: schema version, log rows and positions, ended
    /// sessions, bytes, the checkpoint. In a read-only storage, as of its
    /// snapshot.
    pub fn info(&self) -> Result<PgInfo, StorageError> {
        self.ask(Op::Info)
    }

    /// Reads the checkpoint (first, if any) and then every record of the
    /// log from its first position, in log order, handing each to `visit`
    /// as loading would: what [`Storage::load`] never does, since it reads
    /// only the records after the checkpoint; `macp-admin verify` replays
    /// them all. A row that does not decode is
    /// [`macp_storage::DamageKind::Undecodable`] damage at its log position
    /// (the damage's `offset`). Changes nothing: the storage need not be
    /// loaded, and may be loaded afterwards. In a read-only storage it
    /// reads the same snapshot as everything else.
    pub fn scan_log(
        &self,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let (tx, rx) = sync_channel(LOAD_DEPTH);
        self.ops.send(Op::Scan(self.lease.clone(), tx)).map_err(|_| StorageError::Closed)?;
        self.replay(&rx, &|| false, visit).map(|_| ())
    }

    /// Ends the backend as a killed process would: the connections are
    /// dropped without a goodbye, so PostgreSQL rolls back whatever was in
    /// flight and releases the lock when it notices; nothing appended
    /// since the last sync is kept. For tests and fault drills.
    /// A shard storage of a [`PgHost`] shares the host's connections:
    /// crashing it only drops what it appended since the last sync.
    pub fn crash(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.ops.send(Op::Crash);
            let _ = t.join();
        }
    }

    /// Where the data is, as errors and logs name it: the URL without its
    /// password, and the schema.
    pub fn place(&self) -> &str {
        &self.place.0
    }

    /// Sends `op` to the writer and waits for its answer.
    fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StorageError> {
        let (tx, rx) = sync_channel(1);
        self.ops.send(op(tx)).map_err(|_| StorageError::Closed)?;
        rx.recv().unwrap_or(Err(StorageError::Closed))
    }

    fn ready(&self) -> Result<(), StorageError> {
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Poisoned => Err(StorageError::Poisoned),
            Phase::Unloaded => Err(StorageError::Misuse("append before load")),
        }
    }

    /// A failed write leaves the database's state unknown to us: refuse
    /// everything until the driver loads storage again.
    fn poison(&mut self, e: StorageError) -> StorageError {
        self.phase = Phase::Poisoned;
        self.batch = Batch::default();
        self.ended.clear();
        e
    }

    /// The batch appended since the last commit, summaries included.
    fn take_batch(&mut self) -> Batch {
        let mut batch = std::mem::take(&mut self.batch);
        for (id, e) in std::mem::take(&mut self.ended) {
            batch.ended_id.push(id);
            batch.ended_at.push(e.ended_at);
            batch.ended_pos.push(e.ended_pos);
            batch.summary.push(e.summary);
        }
        batch
    }

    fn replay(
        &self,
        rx: &Receiver<LoadItem>,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<(i64, i64), StorageError> {
        let mut seen = 0usize;
        loop {
            match rx.recv().map_err(|_| StorageError::Closed)? {
                LoadItem::Checkpoint(state) => visit(LoadEvent::Checkpoint { open_state: &state })?,
                LoadItem::Rows(rows) => {
                    for row in rows {
                        if seen % CANCEL_EVERY == 0 && cancelled() {
                            return Err(StorageError::Cancelled);
                        }
                        seen += 1;
                        let pos = LogPos::new(0, row.pos as u64);
                        match Record::decode(row.record.as_slice()) {
                            Ok(record) => visit(LoadEvent::Record { pos, record })?,
                            Err(e) => visit(LoadEvent::Damage(Damage {
                                segment: 0,
                                offset: row.pos as u64,
                                len: row.record.len() as u64,
                                kind: DamageKind::Undecodable(e.to_string()),
                                session_hint: (!row.session_id.is_empty()).then_some(row.session_id),
                            }))?,
                        }
                    }
                }
                LoadItem::End { covers, next } => return Ok((covers, next)),
                LoadItem::Failed(e) => return Err(e),
            }
        }
    }
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.ops.send(Op::Close);
            let _ = t.join();
        }
    }
}

impl Storage for PgStorage {
    fn load(
        &mut self,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        match self.phase {
            Phase::Unloaded => {}
            Phase::Ready => return Err(StorageError::Misuse("load called twice")),
            Phase::Poisoned => return Err(StorageError::Poisoned),
        }
        if cancelled() {
            return Err(StorageError::Cancelled);
        }
        let (tx, rx) = sync_channel(LOAD_DEPTH);
        self.ops.send(Op::Load(self.lease.clone(), tx)).map_err(|_| StorageError::Closed)?;
        // Returning early drops `rx`: the thread stops sending and rolls
        // its read transaction back.
        let (covers, next) = self.replay(&rx, cancelled, visit)?;
        self.covers = covers;
        self.next_pos = next;
        self.phase = Phase::Ready;
        Ok(LoadSummary { torn_tail: None, end: LogPos::new(0, next as u64) })
    }

    fn append(&mut self, records: &[Record], ended: &[SessionSummary]) -> Result<(), StorageError> {
        self.ready()?;
        if self.read_only {
            // Recovery hands back the summaries of sessions that ended in
            // the replayed log; here each was committed with the record
            // that ended its session, so there is nothing to keep.
            return if records.is_empty() { Ok(()) } else { Err(READ_ONLY) };
        }
        for r in records {
            let encoded = r.encode_to_vec();
            if encoded.len() > self.cfg.max_record_bytes as usize {
                let e = StorageError::RecordTooLarge { len: encoded.len(), max: self.cfg.max_record_bytes as usize };
                return Err(self.poison(e));
            }
            // PostgreSQL's bigint holds sequence numbers below 2^63 only;
            // the kernel counts from 1 and never gets near.
            let Ok(seq) = i64::try_from(r.seq) else {
                return Err(self.poison(StorageError::Misuse("a sequence number at or beyond 2^63")));
            };
            self.batch.pos.push(self.next_pos);
            self.batch.session_id.push(r.session_id.clone());
            self.batch.seq.push(seq);
            self.batch.record.push(encoded);
            self.next_pos += 1;
        }
        for s in ended {
            let e = PendingEnded { ended_at: s.ended_at_unix_ms, ended_pos: self.next_pos, summary: s.encode_to_vec() };
            self.ended.insert(summary_id(s).to_string(), e);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        match self.phase {
            Phase::Ready => {}
            Phase::Poisoned => return Err(StorageError::Poisoned),
            Phase::Unloaded => return Err(StorageError::Misuse("sync before load")),
        }
        if self.batch.is_empty() && self.ended.is_empty() {
            return Ok(());
        }
        let batch = self.take_batch();
        let lease = self.lease.clone();
        self.ask(|reply| Op::Commit { lease, batch, checkpoint: None, reply }).map_err(|e| self.poison(e))
    }

    fn checkpoint(&mut self, open_state: &[u8]) -> Result<(), StorageError> {
        match self.phase {
            Phase::Ready => {}
            Phase::Poisoned => return Err(StorageError::Poisoned),
            Phase::Unloaded => return Err(StorageError::Misuse("checkpoint before load")),
        }
        if self.read_only {
            return Err(READ_ONLY);
        }
        let batch = self.take_batch();
        let covers = self.next_pos;
        let checkpoint = Some((covers, open_state.to_vec()));
        let lease = self.lease.clone();
        self.ask(|reply| Op::Commit { lease, batch, checkpoint, reply }).map_err(|e| self.poison(e))?;
        self.covers = covers;
        Ok(())
    }

    fn maintain(&mut self, now_ms: i64) -> Result<Maintenance, StorageError> {
        match self.phase {
            Phase::Ready => {}
            Phase::Poisoned => return Err(StorageError::Poisoned),
            Phase::Unloaded => return Err(StorageError::Misuse("maintain before load")),
        }
        if self.read_only {
            return Err(READ_ONLY);
        }
        let cutoff = self.cfg.retention.cutoff(now_ms);
        let limit = i64::from(self.cfg.maintain_sessions.max(1));
        let covers = self.covers;
        if let Some((at, seen, last)) = &self.last_upkeep {
            if !last.more && *seen == covers && now_ms.saturating_sub(*at) < self.cfg.maintain_every_ms {
                // Nothing became deletable since: no statement.
                return Ok(Maintenance { bytes: last.bytes, segments: None, ..Maintenance::default() });
            }
        }
        let lease = self.lease.clone();
        let done = self.ask(|reply| Op::Maintain { lease, cutoff, covers, limit, reply })?;
        let m = Maintenance {
            expired_sessions: done.expired.max(0) as u64,
            bytes: done.bytes.max(0) as u64,
            segments: None,
            more: done.expired >= limit || done.registry >= limit,
            retention_cutoff_ms: cutoff,
            ..Maintenance::default()
        };
        self.last_upkeep = Some((now_ms, covers, m.clone()));
        Ok(m)
    }

    fn reader(&self) -> Arc<dyn StorageRead> {
        Arc::new(PgReader { reads: self.reads.clone() })
    }
}

/// The reading side: each call is answered by one of the reader
/// connections on the backend's thread. After the storage is dropped,
/// every call fails with [`StorageError::Closed`].
struct PgReader {
    reads: UnboundedSender<ReadOp>,
}

impl PgReader {
    fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> ReadOp) -> Result<T, StorageError> {
        let (tx, rx) = sync_channel(1);
        self.reads.send(op(tx)).map_err(|_| StorageError::Closed)?;
        rx.recv().unwrap_or(Err(StorageError::Closed))
    }
}

fn damaged(place: String, reason: String) -> StorageError {
    StorageError::Damaged { place, reason }
}

impl StorageRead for PgReader {
    fn history(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Record>, StorageError> {
        // Stored sequence numbers are below 2^63 (see `append`).
        let Ok(after) = i64::try_from(after) else { return Ok(Vec::new()) };
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        if upto <= after {
            return Ok(Vec::new());
        }
        let session_id = session_id.to_string();
        let rows = self.ask(|reply| ReadOp::History { session_id: session_id.clone(), after, upto, reply })?;
        rows.into_iter()
            .map(|(pos, seq, bytes)| {
                let place = || format!("log position {pos}");
                let r = Record::decode(bytes.as_slice())
                    .map_err(|e| damaged(place(), format!("record does not decode: {e}")))?;
                if r.session_id != session_id || r.seq != seq as u64 {
                    return Err(damaged(
                        place(),
                        format!(
                            "expected record {seq} of session {session_id}, found record {} of session '{}'",
                            r.seq, r.session_id
                        ),
                    ));
                }
                Ok(r)
            })
            .collect()
    }

    fn ended(&self, session_id: &str) -> Result<Option<SessionSummary>, StorageError> {
        let id = session_id.to_string();
        let bytes = self.ask(|reply| ReadOp::Ended { session_id: id, reply })?;
        bytes
            .map(|b| {
                SessionSummary::decode(b.as_slice()).map_err(|e| {
                    damaged(format!("ended session {session_id}"), format!("summary does not decode: {e}"))
                })
            })
            .transpose()
    }

    fn ended_many(&self, session_ids: &[&str]) -> Result<Vec<Option<SessionSummary>>, StorageError> {
        if session_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = session_ids.iter().map(|s| s.to_string()).collect();
        let rows = self.ask(|reply| ReadOp::EndedMany { session_ids: ids, reply })?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for (id, bytes) in rows {
            let summary = SessionSummary::decode(bytes.as_slice())
                .map_err(|e| damaged(format!("ended session {id}"), format!("summary does not decode: {e}")))?;
            found.insert(id, summary);
        }
        Ok(session_ids.iter().map(|id| found.get(*id).cloned()).collect())
    }

    fn list_ended(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionSummary>, StorageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(str::to_string);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.ask(|reply| ReadOp::List { after, limit, reply })?;
        rows.into_iter()
            .map(|b| {
                SessionSummary::decode(b.as_slice())
                    .map_err(|e| damaged("ended sessions list".into(), format!("a summary does not decode: {e}")))
            })
            .collect()
    }
}

/// The connections a cluster node's shard storages share: a few writer
/// connections and the reader connections, on one thread. A node holding
/// dozens of shards would otherwise open three connections per shard, far
/// beyond what a PostgreSQL server allows (`max_connections` is 100 by
/// default). Shard `s` writes on writer connection `s % writers`, so the
/// commits of different shards run side by side while each shard's stay
/// in order; a writer connection found lost is opened again.
pub struct PgHost {
    url: PgUrl,
    cfg: PgConfig,
    place: Place,
    writers: Vec<UnboundedSender<Op>>,
    reads: UnboundedSender<ReadOp>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHost").field("place", &self.place.0).field("writers", &self.writers.len()).finish()
    }
}

impl PgHost {
    /// Connects `writers` writer connections (at least one) and
    /// [`PgConfig::readers`] reader connections to a cluster's schema
    /// (which [`crate::Membership::join`] created). Fails with
    /// [`StorageError::NotADataDir`] if the schema is not a cluster's.
    pub fn open(url: &PgUrl, cfg: PgConfig, writers: usize) -> Result<PgHost, StorageError> {
        if cfg.schema.is_empty() || cfg.schema.len() > 63 || cfg.schema.contains('\0') {
            return Err(StorageError::Misuse("the schema name must be 1 to 63 bytes without NUL"));
        }
        let place = Place(Arc::from(format!("{url} schema {}", cfg.schema)));
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for _ in 0..writers.max(1) {
            let (tx, rx) = unbounded_channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let (reads, reads_rx) = unbounded_channel();
        let (ready_tx, ready) = sync_channel(1);
        let start = Start {
            url: url.clone(),
            cfg: cfg.clone(),
            place: place.clone(),
            read_only: false,
            cluster: Some(None),
            writers: senders.len(),
        };
        let thread = std::thread::Builder::new()
            .name("macp-pg-host".into())
            .spawn(move || worker::run(start, ready_tx, receivers, reads_rx))
            .map_err(|e| StorageError::io("start the PostgreSQL thread", place.path(), e))?;
        if let Err(e) = ready.recv().unwrap_or(Err(StorageError::Closed)) {
            let _ = thread.join();
            return Err(e);
        }
        Ok(PgHost { url: url.clone(), cfg, place, writers: senders, reads, thread: Some(thread) })
    }

    /// The storage of the shard `lease` names, on this host's connections
    /// (not loaded yet), fenced by the lease as
    /// [`PgStorage::open_shard`]'s is.
    pub fn shard(&self, lease: ShardLease) -> PgStorage {
        let ops = self.writers[lease.shard as usize % self.writers.len()].clone();
        PgStorage {
            ops,
            reads: self.reads.clone(),
            thread: None,
            cfg: self.cfg.clone(),
            place: Place(Arc::from(format!("{} shard {}", self.place.0, lease.shard))),
            phase: Phase::Unloaded,
            next_pos: 1,
            covers: 0,
            batch: Batch::default(),
            ended: BTreeMap::new(),
            read_only: false,
            lease: Some(lease),
            last_upkeep: None,
        }
    }

    /// A reader of the whole schema (history and ended sessions of every
    /// shard: reads are by session id, and ids are unique cluster-wide).
    pub fn reader(&self) -> Arc<dyn StorageRead> {
        Arc::new(PgReader { reads: self.reads.clone() })
    }

    /// The database and schema, as errors name them.
    pub fn place(&self) -> &str {
        &self.place.0
    }

    /// The URL the host connects to.
    pub fn url(&self) -> &PgUrl {
        &self.url
    }
}

impl Drop for PgHost {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            for w in &self.writers {
                let _ = w.send(Op::Close);
            }
            let _ = t.join();
        }
    }
}
