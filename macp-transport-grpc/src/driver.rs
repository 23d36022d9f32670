//! The driver: one task owns the kernel.
//!
//! RPC handlers send [`Command`]s through a bounded channel (back-pressure:
//! when the kernel is saturated, handlers wait instead of queueing without
//! bound). The task drains every queued command into one batch, runs each
//! through the kernel (microseconds), appends all records of the batch and
//! makes them durable with one sync (group commit), and only then releases
//! replies, then broadcasts. With one client a batch is one command, so
//! nothing waits for company; under load batches grow by themselves.
//!
//! On a storage failure nothing of the batch is acknowledged: every reply
//! becomes INTERNAL_ERROR, broadcasts are dropped, and the kernel is rebuilt
//! from what is durable (fail-stop for the batch, then carry on).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use macp_kernel::{Answer, Effect, ErrorCode, Identity, Input, Kernel, KernelConfig, KernelError, Query, Reply};
use macp_wire::storage::Record;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::hub::{Hub, Sequenced, SessionFeed};

/// Durable storage as the driver needs it.
pub trait Journal: Send + 'static {
    /// Appends records to the log (buffered; not yet durable). Takes them
    /// by value so a journal that keeps records (the memory journal) need
    /// not copy them.
    fn append(&mut self, records: Vec<Record>) -> Result<(), String>;
    /// Makes everything appended so far durable (one sync).
    fn sync(&mut self) -> Result<(), String>;
    /// Rebuilds the kernel from what is durable (after a failed write).
    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String>;
    /// Writes a checkpoint of `kernel` covering everything appended so far.
    fn checkpoint(&mut self, kernel: &Kernel) -> Result<(), String>;
    /// A reader for session history, usable from other tasks.
    fn history(&self) -> Arc<dyn History>;
}

/// Reads a session's accepted history (passive subscribe replay).
pub trait History: Send + Sync + 'static {
    /// Envelopes with `after < seq <= upto`, in order.
    fn read(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Sequenced>, String>;
}

/// A passive subscription: replay `(after_sequence, upto]` from `history`,
/// then forward `feed` items with `seq > upto`.
pub struct Subscription {
    /// Live envelopes.
    pub feed: SessionFeed,
    /// Last sequence number covered by history at subscription time.
    pub upto: u64,
    /// Where to read the replay from.
    pub history: Arc<dyn History>,
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
    /// A read-only query, answered after the batch is durable.
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
    /// Write a checkpoint now (tests, shutdown).
    Checkpoint,
    /// Finish the current batch, sync, checkpoint and stop, even if some
    /// handler (a long-lived stream) still holds a sender.
    Shutdown,
}

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

/// The driver task's state.
pub struct Driver {
    kernel: Kernel,
    journal: Box<dyn Journal>,
    hub: Hub,
    rx: mpsc::Receiver<Command>,
    next_request: u64,
    checkpoint_every: u64,
    since_checkpoint: u64,
}

struct Batch {
    records: Vec<Record>,
    replies: Vec<(oneshot::Sender<Reply>, Reply)>,
    broadcasts: Vec<macp_kernel::Broadcast>,
    binds: Vec<(oneshot::Sender<Option<Binding>>, Option<Binding>)>,
    subscribes: Vec<(SubscribeReply, Result<Subscription, KernelError>)>,
    queries: Vec<(Query, oneshot::Sender<Answer>)>,
    checkpoint: bool,
    stop: bool,
}

impl Driver {
    /// Creates the driver and the sender handlers use.
    pub fn new(
        kernel: Kernel,
        journal: Box<dyn Journal>,
        hub: Hub,
        checkpoint_every: u64,
    ) -> (Self, mpsc::Sender<Command>) {
        let (tx, rx) = mpsc::channel(8192);
        (Driver { kernel, journal, hub, rx, next_request: 0, checkpoint_every, since_checkpoint: 0 }, tx)
    }

    /// Access to the hub's watch channels (before the task starts).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// A history reader.
    pub fn history(&self) -> Arc<dyn History> {
        self.journal.history()
    }

    /// Runs until every command sender is dropped or a shutdown is
    /// requested, then syncs and writes a final checkpoint. Fails only when
    /// storage failed and the state could not be rebuilt from what is
    /// durable: then nothing can be served and the binary decides what to do.
    pub async fn run(mut self) -> Result<(), DriverError> {
        let mut prune = tokio::time::interval(Duration::from_secs(30));
        loop {
            let deadline = self.kernel.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => {
                        let wait = (d - now_ms()).max(0) as u64;
                        tokio::time::sleep(Duration::from_millis(wait)).await
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let first = tokio::select! {
                c = self.rx.recv() => match c {
                    Some(c) => Some(c),
                    None => break,
                },
                _ = sleep => None,
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
        }
        if let Err(e) = self.journal.sync() {
            error!("final sync failed: {e}");
        }
        if let Err(e) = self.journal.checkpoint(&self.kernel) {
            warn!("final checkpoint failed: {e}");
        }
        Ok(())
    }

    /// Runs one batch; false once a shutdown was requested.
    fn run_batch(&mut self, cmds: Vec<Command>) -> Result<bool, DriverError> {
        let mut b = Batch {
            records: Vec::new(),
            replies: Vec::new(),
            broadcasts: Vec::new(),
            binds: Vec::new(),
            subscribes: Vec::new(),
            queries: Vec::new(),
            checkpoint: false,
            stop: false,
        };
        let now = now_ms();
        if self.kernel.next_deadline().is_some_and(|d| d <= now) {
            self.absorb(now, Input::Tick, None, &mut b);
        }
        for cmd in cmds {
            match cmd {
                Command::Submit { mut input, reply, bind } => {
                    self.next_request += 1;
                    set_request(&mut input, self.next_request);
                    let session = match (&input, &bind) {
                        (Input::Envelope { envelope, .. }, Some(_)) => Some(envelope.session_id.clone()),
                        _ => None,
                    };
                    let from = session.as_deref().and_then(|s| self.kernel.session(s)).map(|s| s.seq).unwrap_or(0);
                    self.absorb(now, input, Some(reply), &mut b);
                    if let (Some((identity, tx)), Some(session_id)) = (bind, session) {
                        let binding =
                            match self.kernel.answer(&Query::Subscribe { identity, session_id: session_id.clone() }) {
                                Answer::Subscription(Ok(p)) => {
                                    Some(Binding { feed: self.feed_for(&session_id, p.live), from })
                                }
                                _ => None,
                            };
                        b.binds.push((tx, binding));
                    }
                }
                Command::Query(q, tx) => b.queries.push((q, tx)),
                Command::Subscribe { identity, session_id, reply } => {
                    let r = match self.kernel.answer(&Query::Subscribe { identity, session_id: session_id.clone() }) {
                        Answer::Subscription(Ok(p)) => Ok(Subscription {
                            feed: self.feed_for(&session_id, p.live),
                            upto: p.upto,
                            history: self.journal.history(),
                        }),
                        Answer::Subscription(Err(e)) => Err(e),
                        _ => Err(KernelError::new(
                            ErrorCode::InternalError,
                            "the kernel answered a subscription with something else",
                        )),
                    };
                    b.subscribes.push((reply, r));
                }
                Command::Checkpoint => b.checkpoint = true,
                Command::Shutdown => b.stop = true,
            }
        }
        let stop = b.stop;
        self.finish(b)?;
        Ok(!stop)
    }

    fn feed_for(&mut self, sid: &str, live: bool) -> SessionFeed {
        if live {
            self.hub.subscribe(sid)
        } else {
            Hub::finished_feed()
        }
    }

    fn absorb(&mut self, now: i64, input: Input, reply: Option<oneshot::Sender<Reply>>, b: &mut Batch) {
        let mut reply = reply;
        for effect in self.kernel.handle(now, input) {
            match effect {
                Effect::Persist(r) => b.records.push(r),
                Effect::Reply { reply: r, .. } => {
                    if let Some(tx) = reply.take() {
                        b.replies.push((tx, r));
                    }
                }
                Effect::Broadcast(x) => b.broadcasts.push(x),
            }
        }
    }

    fn finish(&mut self, mut b: Batch) -> Result<(), DriverError> {
        if !b.records.is_empty() {
            let n = b.records.len() as u64;
            let durable = self.journal.append(std::mem::take(&mut b.records)).and_then(|_| self.journal.sync());
            if let Err(e) = durable {
                error!("storage failure, acknowledging nothing of this batch: {e}");
                self.fail_batch(&mut b, &e)?;
            } else {
                self.since_checkpoint += n;
            }
        }
        for (tx, r) in b.replies {
            let _ = tx.send(r);
        }
        for (tx, r) in b.binds {
            let _ = tx.send(r);
        }
        for (tx, r) in b.subscribes {
            let _ = tx.send(r);
        }
        for x in b.broadcasts {
            self.hub.dispatch(x);
        }
        for (q, tx) in b.queries {
            let _ = tx.send(self.kernel.answer(&q));
        }
        if b.checkpoint || (self.checkpoint_every > 0 && self.since_checkpoint >= self.checkpoint_every) {
            match self.journal.checkpoint(&self.kernel) {
                Ok(()) => self.since_checkpoint = 0,
                Err(e) => warn!("checkpoint failed (the log still has everything): {e}"),
            }
        }
        Ok(())
    }

    fn fail_batch(&mut self, b: &mut Batch, cause: &str) -> Result<(), DriverError> {
        let now = now_ms();
        for (_, r) in b.replies.iter_mut() {
            let err =
                KernelError::new(ErrorCode::InternalError, format!("storage failure; nothing was recorded: {cause}"));
            *r = match r {
                Reply::Session { .. } => Reply::Session { at_unix_ms: now, result: Err(err) },
                Reply::Registry(_) => Reply::Registry(Err(err)),
            };
        }
        b.broadcasts.clear();
        b.binds.iter_mut().for_each(|(_, x)| *x = None);
        b.subscribes.iter_mut().for_each(|(_, x)| {
            *x = Err(KernelError::new(ErrorCode::InternalError, format!("storage failure: {cause}")))
        });
        match self.journal.recover(self.kernel.config()) {
            Ok(k) => {
                self.kernel = k;
                Ok(())
            }
            Err(e) => {
                error!("cannot rebuild state from storage after a failed write: {e}");
                Err(DriverError::Unrecoverable(e))
            }
        }
    }
}

/// Why the driver stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A write failed and the state could not be rebuilt from storage.
    #[error("storage failed and the state could not be rebuilt from it: {0}")]
    Unrecoverable(String),
}
