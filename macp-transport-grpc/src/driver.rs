//! The driver: the tokio shell around the commit pipeline.
//!
//! RPC handlers send [`Command`]s through a bounded channel (back-pressure:
//! when the kernel is saturated, handlers wait instead of queueing without
//! bound). One task owns the [`Pipeline`] and the [`Storage`]: it drains
//! every queued command into one batch, runs each through the kernel
//! (microseconds), persists the batch with one sync (group commit), and only
//! then releases replies, answers and broadcasts — in the order
//! [`Pipeline::advance`] hands them out. With one client a batch is one
//! command, so nothing waits for company; under load batches grow by
//! themselves.
//!
//! Between batches it checkpoints when due and gives storage a bounded slice
//! of upkeep ([`Storage::maintain`]: retention, compaction), so deleting
//! history never stalls a Send for long.
//!
//! On a storage failure nothing of the batch is acknowledged: every reply
//! becomes INTERNAL_ERROR, broadcasts are dropped, storage is reopened and
//! the pipeline recovered from what is durable (fail-stop for the batch,
//! then carry on). If that fails too, [`Driver::run`] returns the error and
//! the server stops: the binary decides, the library never exits.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use macp_kernel::mode::ModeRegistry;
use macp_kernel::{
    Answer, ErrorCode, Identity, Input, Kernel, KernelConfig, KernelError, Query, Reply, SubscribePoint,
};
use macp_pipeline::{recover, CheckpointPolicy, Pipeline, RecoverOptions, RecoveryError, RecoveryReport, Release};
use macp_storage::{Storage, StorageError, StorageRead};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::hub::{Hub, SessionFeed};
use crate::metrics::Metrics;

/// A passive subscription: replay `(after_sequence, upto]` from `history`,
/// then forward `feed` items with `seq > upto`.
pub struct Subscription {
    /// Live envelopes.
    pub feed: SessionFeed,
    /// Last sequence number covered by history at subscription time.
    pub upto: u64,
    /// Where to read the replay from.
    pub history: Arc<dyn StorageRead>,
}

/// What a caller needs to read one session's whole stored history away
/// from the driver, without following the session (WhatIfReplay, decision
/// receipts): where its stored records end, whether it can still grow, a
/// reader of the storage that holds them, and the mode registry the records
/// were accepted under.
pub struct HistoryAccess {
    /// Sequence number of the session's last record at the time of asking
    /// (durable: asked after the batch in flight).
    pub upto: u64,
    /// Whether the session can still change (OPEN or SUSPENDED).
    pub live: bool,
    /// Where to read the records from.
    pub history: Arc<dyn StorageRead>,
    /// The kernel's mode registry then (a session's mode may be an
    /// extension, which a replay must know).
    pub modes: ModeRegistry,
}

/// A stream binding made while handling an envelope frame.
pub struct Binding {
    /// Live envelopes of the bound session.
    pub feed: SessionFeed,
    /// Items with `seq <= from` were accepted before the binding and are skipped.
    pub from: u64,
}

/// Where a subscription outcome goes.
pub type SubscribeReply = oneshot::Sender<Result<Subscription, KernelError>>;

/// Work for the driver.
#[allow(clippy::large_enum_variant)] // one per request, moved once: boxing buys nothing
pub enum Command {
    /// A kernel input; the driver assigns the request id.
    Submit {
        /// The input (its request id is overwritten).
        input: Input,
        /// Where the reply goes once durable.
        reply: oneshot::Sender<Reply>,
        /// For a StreamSession envelope frame not yet bound: bind to the
        /// envelope's session if, after handling, the caller may read it.
        bind: Option<(Identity, oneshot::Sender<Option<Binding>>)>,
    },
    /// A read-only query, answered after the batch in flight is durable.
    Query(Query, oneshot::Sender<Answer>),
    /// Passive subscribe to a session.
    Subscribe {
        /// Who asks.
        identity: Identity,
        /// Which session.
        session_id: String,
        /// The outcome.
        reply: SubscribeReply,
    },
    /// Read access to a session's stored history, for work done off the
    /// driver (WhatIfReplay, decision receipts): the same access rule as
    /// GetSession and passive subscribe, without a live feed.
    History {
        /// Who asks.
        identity: Identity,
        /// Which session.
        session_id: String,
        /// The outcome.
        reply: oneshot::Sender<Result<HistoryAccess, KernelError>>,
    },
    /// Bring the kernel's registries to `wanted` (a cluster node syncing
    /// each shard it serves to the cluster's registry table): the plan's
    /// inputs, from `operator`, join the batch like requests; `reply` gets
    /// one receiver per input, each answered once its record is durable.
    SyncRegistries {
        /// The registries to hold.
        wanted: Arc<crate::registry_sync::WantedRegistries>,
        /// Who the recorded changes are from (the runtime itself).
        operator: Identity,
        /// The replies to come.
        reply: oneshot::Sender<Vec<oneshot::Receiver<Reply>>>,
    },
    /// Write a checkpoint now (tests, operators).
    Checkpoint,
    /// Finish the current batch, sync, checkpoint and stop, even if some
    /// handler (a long-lived stream) still holds a sender.
    Shutdown,
}

/// What a query's answer is for: the shell turns it into what the caller
/// waits for.
enum Asked {
    Answer(oneshot::Sender<Answer>),
    Bind { tx: oneshot::Sender<Option<Binding>>, session_id: String, from: u64 },
    Subscribe { tx: SubscribeReply, session_id: String },
    History(oneshot::Sender<Result<HistoryAccess, KernelError>>),
}

/// The subscribe point a [`Query::Subscribe`] was answered with.
fn subscribe_point(answer: Answer) -> Result<SubscribePoint, KernelError> {
    match answer {
        Answer::Subscription(point) => point,
        _ => Err(KernelError::new(ErrorCode::InternalError, "a session read got an unexpected answer")),
    }
}

type Pipe = Pipeline<oneshot::Sender<Reply>, Asked>;

/// Reopens storage after a failure poisoned it (the file backend must drop
/// its handles and read the directory again).
pub type Reopen = Box<dyn FnMut() -> Result<Box<dyn Storage>, StorageError> + Send>;

/// The kernel clock: wall-clock milliseconds. The kernel never reads a clock
/// itself; this is the only place time enters.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn set_request(input: &mut Input, id: u64) {
    match input {
        Input::Envelope { request, .. }
        | Input::Control { request, .. }
        | Input::RegisterPolicy { request, .. }
        | Input::UnregisterPolicy { request, .. }
        | Input::RegisterExtMode { request, .. }
        | Input::UnregisterExtMode { request, .. }
        | Input::PromoteMode { request, .. } => *request = id,
        Input::Tick => {}
    }
}

/// Largest number of commands folded into one batch.
const MAX_BATCH: usize = 4096;
/// How often storage gets a slice of upkeep when there is no backlog.
const MAINTAIN_EVERY: Duration = Duration::from_millis(100);

/// Why the driver stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A write failed and the state could not be rebuilt from storage.
    #[error("storage failed and the state could not be rebuilt from it: {0}")]
    Unrecoverable(#[source] RecoveryError),
    /// A write failed and storage could not be reopened.
    #[error("storage failed and could not be reopened: {0}")]
    Reopen(#[source] StorageError),
    /// The database refused a write because this cluster node's lease on
    /// the shard was taken over or lapsed: the shard is served elsewhere
    /// now. The requests of the refused batch were left unanswered (their
    /// callers learn to retry; nothing of them was stored).
    #[error("{0}")]
    Fenced(#[source] StorageError),
}

/// The driver task's state.
pub struct Driver {
    pipeline: Pipe,
    storage: Box<dyn Storage>,
    reopen: Reopen,
    hub: Hub,
    rx: mpsc::Receiver<Command>,
    next_request: u64,
    policy: CheckpointPolicy,
    /// Storage asked to be called again soon.
    maintenance_backlog: bool,
    last_maintenance: Instant,
    /// Batch sizes, sync latency, accepted envelopes, session lifecycle
    /// and storage figures, when metrics are on.
    metrics: Option<Arc<Metrics>>,
    /// Waits for storage off the runtime's workers (see
    /// [`Driver::waiting_off_the_workers`]).
    off_workers: bool,
}

impl Driver {
    /// Recovers the pipeline from `storage` (see [`macp_pipeline::recover`])
    /// and creates the driver around it, with the sender handlers use.
    /// `cancelled` is polled during recovery (a shutdown signal).
    pub fn recover(
        config: KernelConfig,
        mut storage: Box<dyn Storage>,
        reopen: Reopen,
        hub: Hub,
        policy: CheckpointPolicy,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Self, mpsc::Sender<Command>, RecoveryReport), RecoveryError> {
        let options = RecoverOptions { policy, cancelled };
        let (pipeline, report) = recover(config, &mut *storage, options)?;
        let (tx, rx) = mpsc::channel(8192);
        let driver = Driver {
            pipeline,
            storage,
            reopen,
            hub,
            rx,
            next_request: 0,
            policy,
            maintenance_backlog: false,
            last_maintenance: Instant::now(),
            metrics: None,
            off_workers: false,
        };
        Ok((driver, tx, report))
    }

    /// Makes the driver wait for storage (commits, checkpoints, upkeep,
    /// reads of ended sessions) off the runtime's workers: for the many
    /// drivers of a cluster node's shards, which would otherwise park a
    /// worker each while they wait and so commit at most a core's count at
    /// a time (see `off_the_workers`). A single driver leaves it off: its
    /// wait parks one worker and costs nothing else, where handing the
    /// worker off at every commit would start threads (each with
    /// allocator caches of its own) for no gain.
    pub fn waiting_off_the_workers(mut self) -> Self {
        self.off_workers = true;
        self
    }

    /// Updates `metrics` from now on (and the hub's subscriber counts),
    /// starting from the sessions recovery rebuilt.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.hub.set_metrics(metrics.clone());
        self.metrics = metrics;
        self.count_open_sessions();
        self
    }

    /// Sets the open-sessions gauges from what the kernel holds.
    fn count_open_sessions(&self) {
        if let Some(m) = &self.metrics {
            let kernel = self.pipeline.kernel();
            m.set_open_sessions(kernel.all_sessions().map(|s| {
                let state = s.state();
                (s.mode, state)
            }));
        }
    }

    /// Open (and suspended) sessions held: what recovery rebuilt, at start.
    pub fn open_sessions(&self) -> usize {
        self.pipeline.kernel().session_count()
    }

    /// The policy registry as recovered (start-up configuration compares
    /// it with the policies directory).
    pub fn policies(&self) -> Vec<macp_wire::v1::PolicyDescriptor> {
        self.pipeline.kernel().policies().all().cloned().collect()
    }

    /// The registry inputs that bring this driver's kernel to `wanted`
    /// (see [`crate::registry_sync`]).
    pub fn registry_plan(&self, wanted: &crate::registry_sync::WantedRegistries, operator: &Identity) -> Vec<Input> {
        wanted.plan(self.pipeline.kernel(), operator)
    }

    /// Runs inputs through the kernel and makes their records durable
    /// before the driver serves anything: start-up configuration that is
    /// recorded like any other change (the policies directory), so a
    /// restart replays it and checkpoints hold it. Returns the replies in
    /// input order; on a storage failure every reply is an error, as for a
    /// batch of requests.
    pub fn apply_before_serving(&mut self, inputs: Vec<Input>) -> Result<Vec<Reply>, DriverError> {
        let waiting = self.submit_all(now_ms(), inputs);
        self.commit()?;
        Ok(waiting
            .into_iter()
            .map(|mut rx| {
                rx.try_recv().unwrap_or_else(|_| {
                    Reply::Registry(Err(KernelError::new(ErrorCode::InternalError, "the input was not answered")))
                })
            })
            .collect())
    }

    /// Hands the driver's own inputs (registry changes it records) to the
    /// pipeline; each receiver is answered once its record is durable.
    fn submit_all(&mut self, now: i64, inputs: Vec<Input>) -> Vec<oneshot::Receiver<Reply>> {
        let mut waiting = Vec::with_capacity(inputs.len());
        for mut input in inputs {
            self.next_request += 1;
            set_request(&mut input, self.next_request);
            let (tx, rx) = oneshot::channel();
            self.pipeline.submit(now, input, tx);
            waiting.push(rx);
        }
        waiting
    }

    /// Access to the hub's watch channels (before the task starts).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// [`Driver::run`] on a thread of its own, under a current-thread
    /// runtime; the returned future ends with it (and panics if it did).
    /// For the single-node runtime's one driver (issue 15), two reasons:
    ///
    /// * Memory: every allocation the kernel and the store keep (sessions,
    ///   indexes, the open map) comes from one thread's heap, packed
    ///   densely. Run as a task, the driver moved between the runtime's
    ///   workers, and each worker's heap kept pages part-filled with long-
    ///   lived objects between the requests' short-lived buffers: 100,000
    ///   open sessions, file-backed, held 108 MiB of RSS as a task and
    ///   104 MiB on this thread (97 MiB with a single worker).
    /// * Waiting: a commit's fdatasync parks this thread, not one of the
    ///   workers that serve the network.
    ///
    /// A cluster node's shard drivers stay tasks (one per shard; they wait
    /// through `block_in_place`). Fails only if the thread or its runtime
    /// cannot be created.
    pub fn spawn_on_own_thread(
        self,
    ) -> std::io::Result<impl std::future::Future<Output = Result<(), DriverError>> + Send + 'static> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new().name("macp-driver".into()).spawn(move || {
            let _ = done_tx.send(runtime.block_on(self.run()));
        })?;
        Ok(async move {
            match done_rx.await {
                Ok(r) => r,
                // The thread ended without an answer: `run` panicked.
                Err(_) => std::panic::resume_unwind(Box::new("the driver thread panicked")),
            }
        })
    }

    /// Runs until every command sender is dropped or a shutdown is
    /// requested, then writes a final checkpoint.
    pub async fn run(mut self) -> Result<(), DriverError> {
        let mut prune = tokio::time::interval(Duration::from_secs(30));
        let mut maintain = tokio::time::interval(MAINTAIN_EVERY);
        maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.pipeline.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep(Duration::from_millis((d - now_ms()).max(0) as u64)).await,
                    None => std::future::pending::<()>().await,
                }
            };
            let first = tokio::select! {
                c = self.rx.recv() => match c {
                    Some(c) => Some(c),
                    None => break,
                },
                _ = sleep => None,
                _ = maintain.tick() => { self.maintain(); continue; }
                _ = prune.tick() => { self.hub.prune(); continue; }
            };
            let mut cmds = Vec::new();
            cmds.extend(first);
            while cmds.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            if !self.run_batch(cmds)? {
                break;
            }
            if self.maintenance_backlog || self.last_maintenance.elapsed() >= MAINTAIN_EVERY {
                self.maintain();
            }
        }
        match self.pipeline.checkpoint(&mut *self.storage) {
            Ok(()) => info!("final checkpoint written"),
            Err(e) => warn!("final checkpoint failed (the log still has everything): {e}"),
        }
        Ok(())
    }

    /// Runs one batch; false once a shutdown was requested.
    fn run_batch(&mut self, cmds: Vec<Command>) -> Result<bool, DriverError> {
        let now = now_ms();
        self.pipeline.tick(now);
        // One storage read for the batch's sessions the kernel does not
        // hold (every SessionStart's id is checked against ended sessions).
        let ids = self.pipeline.ended_to_prefetch(cmds.iter().filter_map(|c| match c {
            Command::Submit { input: Input::Envelope { envelope, .. }, .. } => Some(envelope.session_id.as_str()),
            _ => None,
        }));
        if !ids.is_empty() {
            let pipeline = &mut self.pipeline;
            off_the_workers(self.off_workers && self.storage.sync_waits(), || pipeline.fetch_ended(&ids));
        }
        let mut checkpoint = false;
        let mut stop = false;
        for cmd in cmds {
            match cmd {
                Command::Submit { mut input, reply, bind } => {
                    self.next_request += 1;
                    set_request(&mut input, self.next_request);
                    let bind_to = match (&input, bind) {
                        (Input::Envelope { envelope, .. }, Some((identity, tx))) => {
                            let session_id = envelope.session_id.clone();
                            let from = self.pipeline.kernel().session(&session_id).map_or(0, |s| s.seq);
                            Some((identity, tx, session_id, from))
                        }
                        _ => None,
                    };
                    self.pipeline.submit(now, input, reply);
                    if let Some((identity, tx, session_id, from)) = bind_to {
                        let q = Query::Subscribe { identity, session_id: session_id.clone() };
                        self.pipeline.ask(q, Asked::Bind { tx, session_id, from });
                    }
                }
                Command::Query(q, tx) => self.pipeline.ask(q, Asked::Answer(tx)),
                Command::Subscribe { identity, session_id, reply } => {
                    let q = Query::Subscribe { identity, session_id: session_id.clone() };
                    self.pipeline.ask(q, Asked::Subscribe { tx: reply, session_id });
                }
                Command::History { identity, session_id, reply } => {
                    self.pipeline.ask(Query::Subscribe { identity, session_id }, Asked::History(reply));
                }
                Command::SyncRegistries { wanted, operator, reply } => {
                    let inputs = wanted.plan(self.pipeline.kernel(), &operator);
                    let _ = reply.send(self.submit_all(now, inputs));
                }
                Command::Checkpoint => checkpoint = true,
                Command::Shutdown => stop = true,
            }
        }
        self.commit()?;
        if checkpoint || self.pipeline.checkpoint_due(now_ms()) {
            let (pipeline, storage) = (&mut self.pipeline, &mut *self.storage);
            if let Err(e) = off_the_workers(self.off_workers && storage.sync_waits(), || pipeline.checkpoint(storage)) {
                if matches!(e, StorageError::Fenced { .. }) {
                    return Err(DriverError::Fenced(e));
                }
                // The log still holds everything; a failed checkpoint write
                // poisons the file backend, so rebuild as after a failed sync.
                error!("checkpoint failed: {e}; rebuilding from storage");
                self.rebuild(Vec::new())?;
            }
        }
        Ok(!stop)
    }

    /// Persists what the pipeline absorbed and releases it; on failure
    /// answers every request with an error and rebuilds from storage.
    fn commit(&mut self) -> Result<(), DriverError> {
        if self.pipeline.is_idle() {
            return Ok(());
        }
        let commit = self.pipeline.commit();
        let waits = self.off_workers && self.storage.sync_waits();
        let storage = &mut *self.storage;
        let persisted = match &self.metrics {
            None => off_the_workers(waits, || commit.persist(storage)),
            Some(m) if !commit.is_empty() => commit.append(storage).and_then(|()| {
                m.batch_records.observe(commit.records().len() as u64);
                let started = Instant::now();
                let synced = off_the_workers(waits, || commit.sync(storage));
                m.sync_seconds.observe_duration(started.elapsed());
                synced
            }),
            Some(_) => Ok(()),
        };
        match persisted {
            Ok(()) => match self.pipeline.advance(commit) {
                Ok(release) => {
                    self.release(release);
                    Ok(())
                }
                // Commits are advanced in the order taken: cannot happen here.
                Err(e) => {
                    error!("{e}");
                    Ok(())
                }
            },
            Err(e @ StorageError::Fenced { .. }) => {
                warn!("{e}; stopping");
                // Unanswered, not INTERNAL_ERROR: each caller sees its
                // request dropped and retries on the shard's new node.
                let config = self.pipeline.config().clone();
                let placeholder = Pipeline::new(Kernel::new(config), self.storage.reader(), self.policy);
                let pipeline = std::mem::replace(&mut self.pipeline, placeholder);
                let failed = pipeline.fail(commit, e);
                drop(failed.replies);
                Err(DriverError::Fenced(failed.error))
            }
            Err(e) => {
                error!("storage failure, acknowledging nothing of this batch: {e}");
                // The pipeline is consumed by `fail`; an empty stand-in holds
                // its place until `rebuild` recovers the real one.
                let config = self.pipeline.config().clone();
                let placeholder = Pipeline::new(Kernel::new(config), self.storage.reader(), self.policy);
                let pipeline = std::mem::replace(&mut self.pipeline, placeholder);
                let failed = pipeline.fail(commit, e);
                for (tx, reply) in failed.replies {
                    let _ = tx.send(reply);
                }
                self.rebuild(failed.queries)
            }
        }
    }

    /// Reopens storage, recovers a fresh pipeline from it, and answers the
    /// queries that were waiting.
    fn rebuild(&mut self, queries: Vec<(Asked, Query)>) -> Result<(), DriverError> {
        let config = self.pipeline.config().clone();
        // Drop the failed backend first: the file backend holds the lock.
        self.storage = Box::new(macp_storage::MemoryStorage::default());
        let mut storage = (self.reopen)().map_err(DriverError::Reopen)?;
        let options = RecoverOptions { policy: self.policy, ..RecoverOptions::default() };
        let (pipeline, report) = recover(config, &mut *storage, options).map_err(DriverError::Unrecoverable)?;
        if report.is_clean() {
            info!("rebuilt from storage: {report}");
        } else {
            warn!("rebuilt from storage WITH DAMAGE: {report}");
        }
        self.storage = storage;
        self.pipeline = pipeline;
        self.count_open_sessions();
        for (asked, q) in queries {
            self.pipeline.ask(q, asked);
        }
        self.commit()
    }

    /// Hands a durable commit's results out: replies, then answers (which
    /// may create stream feeds), then broadcasts.
    fn release(&mut self, r: Release<oneshot::Sender<Reply>, Asked>) {
        for (tx, reply) in r.replies {
            let _ = tx.send(reply);
        }
        for (asked, answer) in r.answers {
            match asked {
                Asked::Answer(tx) => {
                    let _ = tx.send(answer);
                }
                Asked::Bind { tx, session_id, from } => {
                    let binding = match answer {
                        Answer::Subscription(Ok(p)) => Some(Binding { feed: self.feed_for(&session_id, p.live), from }),
                        _ => None,
                    };
                    let _ = tx.send(binding);
                }
                Asked::Subscribe { tx, session_id } => {
                    let outcome = subscribe_point(answer).map(|p| Subscription {
                        feed: self.feed_for(&session_id, p.live),
                        upto: p.upto,
                        history: self.pipeline.reader().clone(),
                    });
                    let _ = tx.send(outcome);
                }
                Asked::History(tx) => {
                    let outcome = subscribe_point(answer).map(|p| HistoryAccess {
                        upto: p.upto,
                        live: p.live,
                        history: self.pipeline.reader().clone(),
                        modes: self.pipeline.kernel().modes().clone(),
                    });
                    let _ = tx.send(outcome);
                }
            }
        }
        for b in r.broadcasts {
            if let Some(m) = &self.metrics {
                m.broadcast(&b);
            }
            self.hub.dispatch(b);
        }
    }

    fn feed_for(&mut self, sid: &str, live: bool) -> SessionFeed {
        if live {
            self.hub.subscribe(sid)
        } else {
            Hub::finished_feed()
        }
    }

    /// One bounded slice of storage upkeep.
    fn maintain(&mut self) {
        self.last_maintenance = Instant::now();
        let (pipeline, storage) = (&mut self.pipeline, &mut *self.storage);
        match off_the_workers(self.off_workers && storage.sync_waits(), || pipeline.maintain(storage, now_ms())) {
            Ok(m) => {
                if let Some(metrics) = &self.metrics {
                    metrics.maintenance(&m);
                }
                self.maintenance_backlog = m.more;
                if m.expired_sessions + m.retired_segments + m.carried_records > 0 {
                    debug!(
                        "retention: {} ended sessions deleted, {} segments retired, {} records carried forward",
                        m.expired_sessions, m.retired_segments, m.carried_records
                    );
                }
                if m.evicted_sessions > 0 {
                    warn!(
                        "memory history limit reached: the {} oldest ended sessions were dropped before their retention",
                        m.evicted_sessions
                    );
                }
            }
            Err(e) => {
                self.maintenance_backlog = false;
                warn!("storage upkeep failed (will retry): {e}");
            }
        }
    }
}

/// Runs `f`, which waits on storage when `waits`, without holding up the
/// runtime's other tasks: on a multi-thread runtime's worker the worker
/// hands its queue to another thread for the wait (`block_in_place`).
/// Without this, a driver waiting for its commit parks a whole worker; a
/// cluster node's shard drivers (one per shard, on as many workers as
/// cores) then commit at most a core's count at a time, and the batches
/// of the others, which PostgreSQL could take in the same transaction,
/// wait behind them. Elsewhere (a current-thread runtime, a blocking
/// thread, outside a runtime) `f` just runs.
fn off_the_workers<T>(waits: bool, f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if waits && multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
