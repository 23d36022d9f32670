//! The commit pipeline: inputs in, and out — in an order fixed by types —
//! records to persist, then replies, answers and broadcasts.
//!
//! ```text
//!   submit / tick / ask ─► Pipeline (kernel) ─► commit() ─► Commit
//!                                                 │  persist(storage): append + one sync
//!                               durable ──► advance(commit) ─► Release: replies, answers, broadcasts
//!                               failed  ──► fail(commit)    ─► Failed: every reply an error;
//!                                                              rebuild with Pipeline::recover
//! ```
//!
//! A reply exists only inside a [`Commit`] until storage has made that
//! commit's records durable, and [`Pipeline::advance`] is the only way to
//! get it out, so no driver can acknowledge what might be lost. Queries are
//! queued like inputs and answered at `advance`, so an answer never shows
//! state that is not yet durable. After a storage failure the kernel is
//! ahead of storage; [`Pipeline::fail`] consumes the pipeline so that the
//! only way on is to recover a fresh one from what storage holds.
//!
//! This is raft-rs's `Ready`/`advance` shape, and the same code runs under
//! tokio (the server's driver), under the deterministic simulator and under
//! the fuzzer, each a thin shell that only moves data.

use std::collections::HashMap;
use std::sync::Arc;

use macp_kernel::{Answer, Broadcast, Effect, ErrorCode, Input, Kernel, KernelConfig, KernelError, Query, Reply};
use macp_storage::{Maintenance, Record, SessionSummary, Storage, StorageError, StorageRead};

use crate::ended::StorageEnded;

/// When to checkpoint: after this many records, or this long after the
/// first record since the last checkpoint, whichever comes first. A
/// checkpoint holds open state only, so its cost follows open sessions; the
/// time bound lets retention delete ended sessions even on a quiet server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Records between checkpoints (0: no record bound).
    pub every_records: u64,
    /// Most milliseconds a record waits for a checkpoint (0: no time bound).
    pub every_ms: i64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy { every_records: 100_000, every_ms: 30_000 }
    }
}

#[derive(Debug)]
struct Batch<T, Q> {
    records: Vec<Record>,
    ended: Vec<SessionSummary>,
    replies: Vec<(T, Reply)>,
    broadcasts: Vec<Broadcast>,
    queries: Vec<(Q, Query)>,
}

impl<T, Q> Default for Batch<T, Q> {
    fn default() -> Self {
        Batch {
            records: Vec::new(),
            ended: Vec::new(),
            replies: Vec::new(),
            broadcasts: Vec::new(),
            queries: Vec::new(),
        }
    }
}

impl<T, Q> Batch<T, Q> {
    fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.ended.is_empty()
            && self.replies.is_empty()
            && self.broadcasts.is_empty()
            && self.queries.is_empty()
    }
}

/// The kernel plus the batch being built. `T` is whatever a driver uses to
/// route a reply to its caller, `Q` the same for query answers.
pub struct Pipeline<T, Q> {
    kernel: Kernel,
    reader: Arc<dyn StorageRead>,
    batch: Batch<T, Q>,
    effects: Vec<Effect>,
    /// Number of the commit in flight, if any.
    in_flight: Option<u64>,
    commits: u64,
    policy: CheckpointPolicy,
    records_since_checkpoint: u64,
    /// Kernel time of the first record after the last checkpoint.
    first_record_since_checkpoint: Option<i64>,
    /// Ended-session lookups answered ahead for the inputs absorbed until
    /// the next commit ([`Pipeline::prefetch_ended`]).
    prefetched: HashMap<String, Option<SessionSummary>>,
}

impl<T, Q> std::fmt::Debug for Pipeline<T, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("sessions", &self.kernel.session_count())
            .field("in_flight", &self.in_flight)
            .field("records_since_checkpoint", &self.records_since_checkpoint)
            .finish_non_exhaustive()
    }
}

/// Everything absorbed since the previous commit, to make durable.
#[derive(Debug)]
#[must_use = "a commit holds replies that are released only through Pipeline::advance or Pipeline::fail"]
pub struct Commit<T, Q> {
    id: u64,
    batch: Batch<T, Q>,
}

impl<T, Q> Commit<T, Q> {
    /// The records to persist, in order.
    pub fn records(&self) -> &[Record] {
        &self.batch.records
    }

    /// Summaries of the sessions that ended in this commit.
    pub fn ended(&self) -> &[SessionSummary] {
        &self.batch.ended
    }

    /// Whether there is nothing to persist (replies and answers may still
    /// wait for release).
    pub fn is_empty(&self) -> bool {
        self.batch.records.is_empty() && self.batch.ended.is_empty()
    }

    /// Appends the records and summaries (not yet durable). A driver that
    /// wants to cut power between append and sync (the simulator) calls
    /// this, then [`Commit::sync`]; others call [`Commit::persist`].
    pub fn append(&self, storage: &mut dyn Storage) -> Result<(), StorageError> {
        if self.is_empty() {
            return Ok(());
        }
        storage.append(&self.batch.records, &self.batch.ended)
    }

    /// Makes the appended records durable (one sync).
    pub fn sync(&self, storage: &mut dyn Storage) -> Result<(), StorageError> {
        if self.is_empty() {
            return Ok(());
        }
        storage.sync()
    }

    /// Appends and syncs: the group commit.
    pub fn persist(&self, storage: &mut dyn Storage) -> Result<(), StorageError> {
        self.append(storage)?;
        self.sync(storage)
    }
}

/// What a durable commit releases, in the order to release it: replies to
/// the callers, then answers to queries, then broadcasts to observers.
#[derive(Debug)]
pub struct Release<T, Q> {
    /// Answers to inputs.
    pub replies: Vec<(T, Reply)>,
    /// Answers to queries.
    pub answers: Vec<(Q, Answer)>,
    /// What observers hear.
    pub broadcasts: Vec<Broadcast>,
}

/// What a failed commit leaves: nothing of it may be acknowledged. Every
/// reply is INTERNAL_ERROR; the queries are to be asked again of the
/// pipeline recovered from storage.
#[derive(Debug)]
pub struct Failed<T, Q> {
    /// The storage error.
    pub error: StorageError,
    /// Every reply of the commit (and of inputs absorbed after it), as an
    /// error: nothing was recorded.
    pub replies: Vec<(T, Reply)>,
    /// Queries to ask the recovered pipeline.
    pub queries: Vec<(Q, Query)>,
}

/// A commit handed to [`Pipeline::advance`] that is not the one in flight.
#[derive(Debug, thiserror::Error)]
#[error("commit {given} is not the commit in flight ({expected:?}); commits are advanced in order")]
pub struct OutOfOrder {
    given: u64,
    expected: Option<u64>,
}

impl<T, Q> Pipeline<T, Q> {
    /// A pipeline over an already recovered kernel (see
    /// [`crate::recover`], which builds one from storage).
    pub fn new(kernel: Kernel, reader: Arc<dyn StorageRead>, policy: CheckpointPolicy) -> Self {
        Pipeline {
            kernel,
            reader,
            batch: Batch::default(),
            effects: Vec::with_capacity(16),
            in_flight: None,
            commits: 0,
            policy,
            records_since_checkpoint: 0,
            first_record_since_checkpoint: None,
            prefetched: HashMap::new(),
        }
    }

    /// A pipeline just recovered: the `replayed` records after the last
    /// checkpoint count toward the next one, which is due at once by time,
    /// so the next restart replays less.
    pub(crate) fn recovered(
        kernel: Kernel,
        reader: Arc<dyn StorageRead>,
        policy: CheckpointPolicy,
        replayed: u64,
    ) -> Self {
        let mut p = Pipeline::new(kernel, reader, policy);
        p.records_since_checkpoint = replayed;
        if replayed > 0 {
            p.first_record_since_checkpoint = Some(i64::MIN);
        }
        p
    }

    /// The kernel (read-only: everything that changes it goes through
    /// [`Pipeline::submit`]).
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The kernel configuration.
    pub fn config(&self) -> &KernelConfig {
        self.kernel.config()
    }

    /// The storage reader ended sessions are looked up in.
    pub fn reader(&self) -> &Arc<dyn StorageRead> {
        &self.reader
    }

    /// When the driver must call [`Pipeline::tick`], if ever.
    pub fn next_deadline(&self) -> Option<i64> {
        self.kernel.next_deadline()
    }

    /// Reads in one storage call whether any of `session_ids` ended, for
    /// the inputs about to be submitted. The kernel asks storage about the
    /// id of every new session (a reused id is refused), one read per
    /// SessionStart; over a backend whose reads are round trips
    /// (PostgreSQL) a driver that calls this with a batch's session ids
    /// pays one round trip for the batch instead. Ids the kernel holds or
    /// has cached are skipped. The answers serve the inputs absorbed until
    /// the next [`Pipeline::commit`] or [`Pipeline::maintain`]: storage
    /// changes only through those, and a session that ends in the meantime
    /// is in the kernel's cache, which is asked first. A failed
    /// read is ignored (each input then reads for itself and gets its own
    /// error).
    pub fn prefetch_ended<'a>(&mut self, session_ids: impl IntoIterator<Item = &'a str>) {
        let ids = self.ended_to_prefetch(session_ids);
        self.fetch_ended(&ids);
    }

    /// The ids among `session_ids` [`Pipeline::prefetch_ended`] would read
    /// (neither held nor fetched already), sorted, without repeats: a
    /// caller that must not wait on storage where it runs learns whether
    /// there is a read to make, and makes it with
    /// [`Pipeline::fetch_ended`] where waiting is harmless.
    pub fn ended_to_prefetch<'a>(&self, session_ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut ids: Vec<&str> = session_ids
            .into_iter()
            .filter(|id| {
                self.kernel.session(id).is_none()
                    && self.kernel.ended_session(id).is_none()
                    && !self.prefetched.contains_key(*id)
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Reads `ids` (from [`Pipeline::ended_to_prefetch`]) in one storage
    /// read, for the next inputs to find.
    pub fn fetch_ended(&mut self, ids: &[&str]) {
        if ids.is_empty() {
            return;
        }
        if let Ok(found) = self.reader.ended_many(ids) {
            if found.len() == ids.len() {
                self.prefetched.extend(ids.iter().map(|id| id.to_string()).zip(found));
            }
        }
    }

    /// Runs one input through the kernel; its reply waits in the batch.
    pub fn submit(&mut self, now_ms: i64, input: Input, token: T) {
        self.run(now_ms, input, Some(token));
    }

    /// Services due timers (TTL expiry, suspension caps, mode timers).
    /// Returns whether anything was due.
    pub fn tick(&mut self, now_ms: i64) -> bool {
        if self.kernel.next_deadline().is_some_and(|d| d <= now_ms) {
            self.run(now_ms, Input::Tick, None);
            true
        } else {
            false
        }
    }

    /// Queues a read-only question, answered when the batch is released.
    pub fn ask(&mut self, query: Query, token: Q) {
        self.batch.queries.push((token, query));
    }

    fn run(&mut self, now_ms: i64, input: Input, token: Option<T>) {
        let ended = StorageEnded::with_prefetched(&*self.reader, &self.prefetched);
        self.effects.clear();
        self.kernel.handle_with(now_ms, input, &ended, &mut self.effects);
        let mut token = token;
        for e in self.effects.drain(..) {
            match e {
                Effect::Persist(r) => {
                    self.first_record_since_checkpoint.get_or_insert(now_ms);
                    self.batch.records.push(r)
                }
                Effect::Ended(s) => self.batch.ended.push(*s),
                Effect::Reply { reply, .. } => {
                    if let Some(t) = token.take() {
                        self.batch.replies.push((t, reply));
                    }
                }
                Effect::Broadcast(b) => self.batch.broadcasts.push(b),
            }
        }
    }

    /// The records absorbed since the last commit, in order (a simulator
    /// attributes each input's records to it by the length before and
    /// after [`Pipeline::submit`]).
    pub fn absorbed_records(&self) -> &[Record] {
        &self.batch.records
    }

    /// Whether nothing waits to be committed.
    pub fn is_idle(&self) -> bool {
        self.batch.is_empty()
    }

    /// Takes everything absorbed since the previous commit. Persist it, then
    /// hand it to [`Pipeline::advance`] (durable) or [`Pipeline::fail`].
    pub fn commit(&mut self) -> Commit<T, Q> {
        self.prefetched.clear();
        self.commits += 1;
        self.in_flight = Some(self.commits);
        Commit { id: self.commits, batch: std::mem::take(&mut self.batch) }
    }

    /// The commit is durable: releases its replies, then the answers to its
    /// queries (asked of the state the commit left), then its broadcasts.
    pub fn advance(&mut self, commit: Commit<T, Q>) -> Result<Release<T, Q>, OutOfOrder> {
        if self.in_flight != Some(commit.id) {
            return Err(OutOfOrder { given: commit.id, expected: self.in_flight });
        }
        self.in_flight = None;
        let b = commit.batch;
        self.records_since_checkpoint += b.records.len() as u64;
        // The summaries are in storage now: the kernel may forget them.
        self.kernel.settle_ended();
        let ended = StorageEnded::direct(&*self.reader);
        let answers = b.queries.into_iter().map(|(t, q)| (t, self.kernel.answer(&q, &ended))).collect();
        Ok(Release { replies: b.replies, answers, broadcasts: b.broadcasts })
    }

    /// The commit could not be made durable. The kernel already applied its
    /// records, so this pipeline is consumed: recover a new one from storage
    /// (after reopening it, since a failed backend is poisoned).
    pub fn fail(self, commit: Commit<T, Q>, error: StorageError) -> Failed<T, Q> {
        let mut replies = Vec::new();
        let mut queries = Vec::new();
        for b in [commit.batch, self.batch] {
            for (t, r) in b.replies {
                let e = KernelError::new(
                    ErrorCode::InternalError,
                    format!("storage failure; nothing was recorded, retry: {error}"),
                );
                replies.push((t, failed_reply(r, e)));
            }
            queries.extend(b.queries);
        }
        Failed { error, replies, queries }
    }

    /// Whether a checkpoint is due at `now_ms` (see [`CheckpointPolicy`]).
    /// Take it between commits, when nothing is in flight.
    pub fn checkpoint_due(&self, now_ms: i64) -> bool {
        if self.in_flight.is_some() || !self.batch.records.is_empty() {
            return false;
        }
        let by_count = self.policy.every_records > 0 && self.records_since_checkpoint >= self.policy.every_records;
        let by_time = self.policy.every_ms > 0
            && self.first_record_since_checkpoint.is_some_and(|t| now_ms.saturating_sub(t) >= self.policy.every_ms);
        by_count || by_time
    }

    /// Writes a checkpoint of the open state into `storage`. Only between
    /// commits: the state must match exactly what storage holds.
    pub fn checkpoint(&mut self, storage: &mut dyn Storage) -> Result<(), StorageError> {
        if self.in_flight.is_some() || !self.batch.records.is_empty() {
            return Err(StorageError::Misuse("checkpoint while records are not yet durable"));
        }
        if storage.needs_open_state() {
            let kernel = &self.kernel;
            storage.checkpoint_streamed(&mut |out| kernel.write_snapshot(out))?;
        } else {
            storage.checkpoint(&[])?;
        }
        self.records_since_checkpoint = 0;
        self.first_record_since_checkpoint = None;
        Ok(())
    }

    /// One bounded slice of storage upkeep ([`Storage::maintain`]:
    /// retention, compaction), then the kernel forgets cached ended
    /// sessions that retention has passed, so it never answers for a
    /// session storage has deleted. Call it between commits.
    pub fn maintain(&mut self, storage: &mut dyn Storage, now_ms: i64) -> Result<Maintenance, StorageError> {
        // Retention may delete what was looked up ahead: look again.
        self.prefetched.clear();
        let m = storage.maintain(now_ms)?;
        if let Some(cutoff) = m.retention_cutoff_ms {
            self.kernel.forget_ended_before(cutoff);
        }
        Ok(m)
    }

    /// Asks a question of the current state directly. Only correct when
    /// nothing absorbed is undurable ([`Pipeline::is_idle`] and no commit
    /// in flight); otherwise use [`Pipeline::ask`].
    pub fn answer_now(&self, query: &Query) -> Option<Answer> {
        if self.in_flight.is_some() || !self.batch.is_empty() {
            return None;
        }
        Some(self.kernel.answer(query, &StorageEnded::direct(&*self.reader)))
    }
}

/// The error reply for an input whose commit failed.
fn failed_reply(r: Reply, e: KernelError) -> Reply {
    match r {
        Reply::Session { at_unix_ms, .. } => Reply::Session { at_unix_ms, result: Err(e) },
        Reply::Registry(_) => Reply::Registry(Err(e)),
    }
}
