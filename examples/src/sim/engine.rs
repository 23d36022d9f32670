//! The event loop: clients, network, and the server — the real commit
//! pipeline ([`macp_pipeline`]) over a real storage backend ([`Disk`]).
//!
//! The server is the gRPC driver's loop without tokio: each delivered
//! request is submitted to the pipeline at once, and at random steps the
//! batch is committed: appended, synced (possibly with a power cut between
//! the two, or a fault injected into either), and only then released —
//! replies, answers, broadcasts, in the order `Pipeline::advance` gives
//! them. Any storage error is fail-stop: the pipeline is consumed, every
//! held reply becomes an error, and the server recovers from storage
//! exactly as after a power cut. Checkpoints and storage upkeep
//! (retention, compaction) run between commits as in the server.

use std::cell::Cell;
use std::rc::Rc;

use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::v1::SessionState;
use macp_kernel::{ErrorCode, Identity, Input, KernelConfig, Query, Reply};
use macp_pipeline::{recover, CheckpointPolicy, Pipeline, RecoverOptions};

use super::disk::{Disk, PowerCut};
use super::oracle::{Oracle, Violation};
use super::rng::Rng;
use super::workload::{self, Action, Script};
use super::{Failure, SimConfig, Stats};

/// The simulated wall clock at the start of every run.
const T0: i64 = 1_700_000_000_000;
/// A client resends a request it has had no reply to after this long.
const RETRY_AFTER_MS: i64 = 300;
/// And gives up after this many attempts.
const MAX_ATTEMPTS: u32 = 12;

/// Runs one seed; `Ok` carries what it did, `Err` the first broken
/// invariant with its reproduction line.
pub fn run_seed(seed: u64, config: &SimConfig) -> Result<Stats, Failure> {
    run_seed_with(seed, config, None)
}

/// Like [`run_seed`], on a custom backend built from the run's storage
/// random generator: how the simulator's own tests plant bugs in storage to
/// prove the invariants catch them.
pub fn run_seed_on(
    seed: u64,
    config: &SimConfig,
    storage: impl FnOnce(Rng) -> Box<dyn PowerCut>,
) -> Result<Stats, Failure> {
    run_seed_with(seed, config, Some(Box::new(storage)))
}

type MakeStorage<'a> = Box<dyn FnOnce(Rng) -> Box<dyn PowerCut> + 'a>;

fn run_seed_with(seed: u64, config: &SimConfig, storage: Option<MakeStorage<'_>>) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, config, storage);
    match sim.run() {
        Ok(()) => Ok(Stats { ids_reused_after_retention: sim.oracle.reincarnated(), ..sim.stats }),
        Err(v) => Err(Failure {
            seed,
            step: sim.step,
            invariant: v.invariant,
            detail: v.detail,
            reproduce: config.reproduce(seed),
        }),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ItemState {
    Pending,
    InFlight { since: i64, attempts: u32 },
    Done,
}

struct Client {
    script: Script,
    states: Vec<ItemState>,
    next: usize,
    /// Waits for the admin (client 0) to finish registering policies.
    gated: bool,
}

impl Client {
    fn done(&self) -> bool {
        self.states.iter().all(|s| *s == ItemState::Done)
    }

    fn in_flight(&self) -> usize {
        self.states.iter().filter(|s| matches!(s, ItemState::InFlight { .. })).count()
    }
}

enum Packet {
    ToServer {
        at: i64,
        request: u64,
        client: usize,
        item: usize,
    },
    /// A reply; `retry` when the client will send the item again (it was
    /// refused because the session was not ready for it yet).
    ToClient {
        at: i64,
        client: usize,
        item: usize,
        retry: bool,
    },
}

impl Packet {
    fn at(&self) -> i64 {
        match self {
            Packet::ToServer { at, .. } | Packet::ToClient { at, .. } => *at,
        }
    }
}

/// Who a reply goes to: the client, its script item, and the records the
/// input produced (its share of the commit, for the oracle).
struct Token {
    client: usize,
    item: usize,
    /// Indices into the commit's records; filled in right after the submit
    /// (the token moves into the pipeline before the kernel runs).
    covers: Rc<Cell<(usize, usize)>>,
}

/// A read the simulator asks of the server: GetSession of `session_id` by
/// an observer, checked against the oracle's own view.
struct Probe {
    session_id: String,
}

type Pipe = Pipeline<Token, Probe>;

struct Node {
    /// `None` while the power is off.
    pipeline: Option<Pipe>,
    disk: Disk,
    /// Server clock minus simulated time.
    offset: i64,
    down_at: i64,
}

struct Sim<'c> {
    cfg: &'c SimConfig,
    kconfig: KernelConfig,
    rng: Rng,
    now: i64,
    step: usize,
    clients: Vec<Client>,
    packets: Vec<Packet>,
    next_request: u64,
    node: Node,
    oracle: Oracle,
    stats: Stats,
}

/// The checkpoint policy of the simulated server: often, so restarts start
/// from checkpoints and retention gets to delete.
const POLICY: CheckpointPolicy = CheckpointPolicy { every_records: 40, every_ms: 2_000 };

impl<'c> Sim<'c> {
    fn new(seed: u64, cfg: &'c SimConfig, storage: Option<MakeStorage<'_>>) -> Self {
        let mut rng = Rng::new(seed);
        let disk = match storage {
            Some(make) => {
                let r = rng.fork();
                Disk::custom(make(r), cfg.retention, rng.fork())
            }
            None => Disk::new(cfg.backend, cfg.retention, cfg.faults, rng.fork()),
        };
        let mut workload_rng = rng.fork();
        // A small cache of ended sessions, so most lookups of ended sessions
        // go to storage, as on a busy server.
        let kconfig = KernelConfig { ended_cache: 2, ..KernelConfig::default() };
        let mut clients = vec![Client {
            script: workload::admin_script(workload::policies(&mut workload_rng)),
            states: Vec::new(),
            next: 0,
            gated: false,
        }];
        let n = workload_rng.range(cfg.sessions.0 as i64, cfg.sessions.1 as i64) as u64;
        let mut stats = Stats { seeds: 1, sessions: n, ..Stats::default() };
        for i in 0..n {
            let script = workload::session_script(&mut workload_rng, i);
            if let Some(m) = workload::MODES.iter().position(|m| *m == script.mode) {
                stats.per_mode[m] += 1;
            }
            clients.push(Client { script, states: Vec::new(), next: 0, gated: true });
        }
        for c in &mut clients {
            c.states = vec![ItemState::Pending; c.script.items.len()];
        }
        Sim {
            cfg,
            oracle: Oracle::new(kconfig.clone(), cfg.retention),
            node: Node { pipeline: None, disk, offset: 0, down_at: T0 - 1_000 },
            kconfig,
            rng,
            now: T0,
            step: 0,
            clients,
            packets: Vec::new(),
            next_request: 0,
            stats,
        }
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.cfg.trace {
            eprintln!("[step {} t+{}ms] {}", self.step, self.now - T0, what());
        }
    }

    fn run(&mut self) -> Result<(), Violation> {
        self.restart()?;
        while self.step < self.cfg.max_steps {
            self.step += 1;
            self.stats.steps += 1;
            self.advance_clock();
            if self.node.pipeline.is_none() {
                if self.now - self.node.down_at > self.rng.range(0, 400) {
                    self.restart()?;
                }
            } else {
                if self.rng.chance(0.001) {
                    let back = self.rng.range(1, 1_000);
                    self.node.offset -= back;
                    self.stats.clock_steps_back += 1;
                    self.trace(|| format!("server clock steps back {back} ms"));
                }
                self.tick_if_due();
            }
            self.client_actions();
            for _ in 0..self.rng.range(0, 3) {
                self.deliver_one()?;
            }
            if self.rng.chance(self.cfg.duplicate_rate) {
                self.duplicate_one();
            }
            if self.node.pipeline.is_some() && self.rng.chance(0.02) {
                self.probe();
            }
            let pending = self.node.pipeline.as_ref().is_some_and(|p| !p.is_idle());
            if pending && self.rng.chance(0.5) {
                self.commit()?;
            }
            if self.node.pipeline.is_some() && self.rng.chance(0.05) {
                self.upkeep()?;
            }
            if self.node.pipeline.is_some() && self.rng.chance(self.cfg.crash_rate) {
                self.trace(|| "power cut".into());
                self.crash();
            }
            let idle = self.node.pipeline.as_ref().is_none_or(|p| p.is_idle());
            if self.clients.iter().all(Client::done) && self.packets.is_empty() && idle {
                break;
            }
        }
        self.finish()
    }

    fn advance_clock(&mut self) {
        let r = self.rng.below(1_000);
        // Mostly milliseconds; now and then a stall long enough for
        // implicit-accept timers and short TTLs; rarely a jump past the
        // default TTL (a minute), which expires whatever is open.
        self.now += match r {
            0..=699 => self.rng.range(0, 2),
            700..=949 => self.rng.range(2, 20),
            950..=998 => self.rng.range(20, 400),
            _ => {
                if self.rng.chance(0.5) {
                    self.rng.range(5_000, 70_000)
                } else {
                    0
                }
            }
        };
    }

    fn server_now(&self) -> i64 {
        self.now + self.node.offset
    }

    // ----- clients -----------------------------------------------------------

    fn client_actions(&mut self) {
        let admin_done = self.clients[0].done();
        for c in 0..self.clients.len() {
            // Timeouts first: resend what has had no reply.
            for i in 0..self.clients[c].states.len() {
                if let ItemState::InFlight { since, attempts } = self.clients[c].states[i] {
                    if self.now - since > RETRY_AFTER_MS {
                        if attempts >= MAX_ATTEMPTS {
                            self.clients[c].states[i] = ItemState::Done;
                        } else {
                            self.stats.retries += 1;
                            self.send(c, i, attempts + 1);
                        }
                    }
                }
            }
            let client = &self.clients[c];
            if (client.gated && !admin_done) || self.now - T0 < client.script.start_at {
                continue;
            }
            let window = client.script.window;
            let ready = client.next < client.states.len() && client.in_flight() < window;
            if ready && self.rng.chance(0.6) {
                let i = client.next;
                self.clients[c].next += 1;
                self.send(c, i, 1);
            }
        }
    }

    fn send(&mut self, client: usize, item: usize, attempts: u32) {
        self.next_request += 1;
        let request = self.next_request;
        let at = self.now + self.rng.range(0, 30);
        self.packets.push(Packet::ToServer { at, request, client, item });
        self.clients[client].states[item] = ItemState::InFlight { since: self.now, attempts };
    }

    // ----- network -------------------------------------------------------------

    fn deliver_one(&mut self) -> Result<(), Violation> {
        let due: Vec<usize> = (0..self.packets.len()).filter(|&i| self.packets[i].at() <= self.now).collect();
        if due.is_empty() {
            return Ok(());
        }
        let p = self.packets.swap_remove(due[self.rng.index(due.len())]);
        match p {
            Packet::ToClient { client, item, retry, .. } => {
                let state = &mut self.clients[client].states[item];
                *state = match (*state, retry) {
                    // Try again after the usual timeout.
                    (ItemState::InFlight { attempts, .. }, true) => ItemState::InFlight { since: self.now, attempts },
                    _ => ItemState::Done,
                };
            }
            Packet::ToServer { request, client, item, .. } => {
                if self.node.pipeline.is_none() {
                    return Ok(());
                }
                self.stats.delivered += 1;
                let input = match self.clients[client].script.items[item].clone() {
                    Action::Envelope { identity, envelope } => Input::Envelope { request, identity, envelope },
                    Action::Control { identity, op, session_id } => {
                        Input::Control { request, identity, op, session_id, reason: "simulated".into() }
                    }
                    Action::RegisterPolicy(descriptor) => {
                        Input::RegisterPolicy { request, identity: Identity::new(workload::ADMIN), descriptor }
                    }
                };
                self.tick_if_due();
                self.handle(input, client, item);
            }
        }
        Ok(())
    }

    fn duplicate_one(&mut self) {
        let to_server: Vec<usize> =
            (0..self.packets.len()).filter(|&i| matches!(self.packets[i], Packet::ToServer { .. })).collect();
        if to_server.is_empty() {
            return;
        }
        if let Packet::ToServer { request, client, item, .. } = self.packets[to_server[self.rng.index(to_server.len())]]
        {
            let at = self.now + self.rng.range(0, 50);
            self.packets.push(Packet::ToServer { at, request, client, item });
            self.stats.net_duplicates += 1;
        }
    }

    // ----- the server ------------------------------------------------------------

    fn tick_if_due(&mut self) {
        let now = self.server_now();
        if let Some(p) = self.node.pipeline.as_mut() {
            let before = p.absorbed_records().len();
            if p.tick(now) {
                self.stats.timer_records += p.absorbed_records().len().saturating_sub(before) as u64;
            }
        }
    }

    /// The driver's submit: the kernel decides now, the reply waits for the
    /// commit that makes the input's records durable.
    fn handle(&mut self, input: Input, client: usize, item: usize) {
        let now = self.server_now();
        let Some(p) = self.node.pipeline.as_mut() else { return };
        // As the server's driver does for a batch, look the session up ahead
        // for every other item (Pipeline::prefetch_ended; chosen without the
        // RNG, so seeds replay as before): the answers it keeps until the
        // next commit must change nothing the oracle sees.
        if let (Input::Envelope { envelope, .. }, true) = (&input, item % 2 == 0) {
            p.prefetch_ended([envelope.session_id.as_str()]);
        }
        let before = p.absorbed_records().len();
        let covers = Rc::new(Cell::new((before, before)));
        p.submit(now, input, Token { client, item, covers: covers.clone() });
        covers.set((before, p.absorbed_records().len()));
    }

    /// Asks a read of the server, checked when released.
    fn probe(&mut self) {
        let Some(sid) = self.oracle.known_session(&mut self.rng) else { return };
        let q = Query::GetSession { identity: observer(), session_id: sid.clone() };
        if let Some(p) = self.node.pipeline.as_mut() {
            p.ask(q, Probe { session_id: sid });
        }
    }

    /// Group commit: append, sync, release (replies, answers, broadcasts).
    fn commit(&mut self) -> Result<(), Violation> {
        if self.node.disk.storage().is_none() {
            return Ok(());
        }
        let Some(mut p) = self.node.pipeline.take() else { return Ok(()) };
        let commit = p.commit();
        self.node.disk.arm_append();
        let appended = match self.node.disk.storage() {
            Some(st) => commit.append(st),
            None => Err(macp_storage::StorageError::Misuse("the disk is off")),
        };
        if let Err(e) = appended {
            return self.storage_fault(p, commit, e);
        }
        // Now and then the power goes between the write and the sync: the
        // records are in the OS's hands, not on disk.
        if self.rng.chance(self.cfg.crash_rate * 5.0) {
            self.trace(|| "power cut between append and sync".into());
            self.oracle.on_crash(commit.records().to_vec());
            self.node.pipeline = None;
            self.power_off();
            return Ok(());
        }
        self.node.disk.arm_sync();
        let synced = match self.node.disk.storage() {
            Some(st) => commit.sync(st),
            None => Err(macp_storage::StorageError::Misuse("the disk is off")),
        };
        if let Err(e) = synced {
            return self.storage_fault(p, commit, e);
        }
        self.stats.syncs += 1;
        self.oracle.on_synced(commit.records())?;
        let records: Vec<Record> = commit.records().to_vec();
        let release = match p.advance(commit) {
            Ok(r) => r,
            Err(e) => return Err(Violation { invariant: "pipeline-order", detail: e.to_string() }),
        };
        self.oracle.check_live(p.kernel())?;
        let reader = p.reader().clone();
        self.node.pipeline = Some(p);
        for (t, reply) in release.replies {
            let action = &self.clients[t.client].script.items[t.item];
            let (from, to) = t.covers.get();
            self.oracle.on_release(action, &reply, &records[from..to])?;
            match &reply {
                Reply::Session { result: Ok(a), .. } if a.duplicate => self.stats.duplicates += 1,
                Reply::Session { result: Ok(_), .. } => self.stats.accepted += 1,
                Reply::Registry(Ok(_)) => self.stats.accepted += 1,
                _ => self.stats.rejected += 1,
            }
            if self.cfg.trace {
                let what = match action {
                    Action::Envelope { envelope, .. } => format!("{} {}", envelope.message_type, envelope.message_id),
                    Action::Control { op, session_id, .. } => format!("{op:?} {session_id}"),
                    Action::RegisterPolicy(d) => format!("RegisterPolicy {}", d.policy_id),
                };
                let verdict = match &reply {
                    Reply::Session { result, .. } => describe(result),
                    Reply::Registry(r) => format!("{r:?}"),
                };
                self.trace(|| format!("reply to client {} item {}: {what}: {verdict}", t.client, t.item));
            }
            if self.rng.chance(self.cfg.reply_loss) {
                self.stats.replies_lost += 1;
                continue;
            }
            // A message refused as out of order (its predecessors were
            // reordered behind it: a ballot before its request, a Commitment
            // before its ballots) is tried again a little later, a few
            // times, as a patient client would.
            let retry = matches!(&reply, Reply::Session { result: Err(e), .. } if e.code == ErrorCode::InvalidEnvelope)
                && matches!(self.clients[t.client].states[t.item], ItemState::InFlight { attempts, .. } if attempts < 4);
            let at = self.now + self.rng.range(0, 30);
            self.packets.push(Packet::ToClient { at, client: t.client, item: t.item, retry });
        }
        for (probe, answer) in release.answers {
            self.stats.probes += 1;
            let now = self.server_now();
            self.oracle.on_probe(&probe.session_id, &answer, now, &*reader)?;
        }
        for b in release.broadcasts {
            self.oracle.on_broadcast(&b)?;
        }
        Ok(())
    }

    /// A failed append or sync: nothing of the commit is acknowledged and
    /// the server restarts from storage (fail-stop).
    fn storage_fault(
        &mut self,
        p: Pipe,
        commit: macp_pipeline::Commit<Token, Probe>,
        e: macp_storage::StorageError,
    ) -> Result<(), Violation> {
        self.stats.storage_faults += 1;
        self.trace(|| format!("storage fault: {e}"));
        // Whatever reached the disk before the failure may survive.
        self.oracle.on_crash(commit.records().to_vec());
        let failed = p.fail(commit, e);
        for (t, reply) in failed.replies {
            if reply.error().is_none_or(|e| e.code != ErrorCode::InternalError) {
                return Err(Violation {
                    invariant: "no-acked-record-lost",
                    detail: format!("a failed commit released a non-error reply to client {}: {reply:?}", t.client),
                });
            }
        }
        self.power_off();
        Ok(())
    }

    /// Between commits: a checkpoint when due (or now and then), and a
    /// slice of storage upkeep (retention, compaction).
    fn upkeep(&mut self) -> Result<(), Violation> {
        let now = self.server_now();
        let Some(mut p) = self.node.pipeline.take() else { return Ok(()) };
        if !p.is_idle() {
            self.node.pipeline = Some(p);
            return Ok(());
        }
        if p.checkpoint_due(now) || self.rng.chance(0.2) {
            self.node.disk.arm_checkpoint();
            let done = match self.node.disk.storage() {
                Some(st) => p.checkpoint(st),
                None => Err(macp_storage::StorageError::Misuse("the disk is off")),
            };
            if let Err(e) = done {
                self.stats.storage_faults += 1;
                self.trace(|| format!("checkpoint failed: {e}"));
                self.power_off();
                return Ok(());
            }
            self.stats.checkpoints += 1;
        }
        let maintained = match self.node.disk.storage() {
            Some(st) => p.maintain(st, now),
            None => Err(macp_storage::StorageError::Misuse("the disk is off")),
        };
        match maintained {
            Ok(m) => {
                self.stats.expired_deleted += m.expired_sessions;
                self.stats.segments_retired += m.retired_segments;
                self.stats.records_carried += m.carried_records;
                self.oracle.on_maintained(now);
            }
            Err(e) => {
                // Upkeep failing is not fatal in the server either; a
                // poisoned backend shows at the next commit. It may have
                // done part of its work first (deleted sessions past
                // retention from its index, then failed to sync), which
                // retention permits: from now on those sessions may be gone.
                self.trace(|| format!("upkeep failed: {e}"));
                self.oracle.on_maintained(now);
            }
        }
        self.node.pipeline = Some(p);
        Ok(())
    }

    /// Power cut (or fail-stop after a storage error).
    fn crash(&mut self) {
        // Records absorbed but not yet appended never reached the disk.
        self.oracle.on_crash(Vec::new());
        self.power_off();
    }

    fn power_off(&mut self) {
        self.node.pipeline = None;
        self.node.disk.crash();
        self.node.down_at = self.now;
        self.stats.crashes += 1;
    }

    fn restart(&mut self) -> Result<(), Violation> {
        let lost = |e: String| Violation { invariant: "no-acked-record-lost", detail: format!("recovery failed: {e}") };
        self.node.disk.open().map_err(|e| lost(format!("the storage does not open: {e}")))?;
        let Some(st) = self.node.disk.storage() else { return Err(lost("no storage after opening".into())) };
        let options = RecoverOptions { policy: POLICY, ..RecoverOptions::default() };
        let (p, report): (Pipe, _) = recover(self.kconfig.clone(), st, options).map_err(|e| lost(e.to_string()))?;
        // Power cuts and failed syncs may tear the tail of the log, and
        // nothing else: any other damage, or a quarantined session, means
        // the storage lost or garbled data it had synced.
        if !report.is_clean() {
            return Err(lost(format!("recovery reported damage after a clean power cut: {report}")));
        }
        let survived = self.oracle.on_recover(p.kernel(), &**p.reader())?;
        self.stats.survived_unsynced += survived as u64;
        self.stats.restarts += 1;
        self.node.offset = self.rng.range(-3_000, 3_000);
        self.node.pipeline = Some(p);
        self.trace(|| format!("restart: recovered ({report}), {survived} unsynced records had survived"));
        Ok(())
    }

    /// Drain, make everything durable, cut the power once more, recover and
    /// run the end-of-run checks.
    fn finish(&mut self) -> Result<(), Violation> {
        if self.node.pipeline.is_none() {
            self.restart()?;
        }
        // The last commits must go through: retry until one does.
        for _ in 0..100 {
            if self.node.pipeline.is_none() {
                self.restart()?;
            }
            if self.node.pipeline.as_ref().is_some_and(|p| p.is_idle()) {
                break;
            }
            self.commit()?;
        }
        self.upkeep()?;
        self.crash();
        self.restart()?;
        let Some(p) = self.node.pipeline.as_ref() else { return Ok(()) };
        let now = self.server_now();
        self.oracle.finish(p.kernel(), &**p.reader(), now)?;
        let finals = self.oracle.final_states(p.kernel(), &**p.reader());
        for (mode, state) in finals {
            match state {
                SessionState::Resolved => {
                    self.stats.resolved += 1;
                    if let Some(i) = workload::MODES.iter().position(|x| *x == mode) {
                        self.stats.resolved_per_mode[i] += 1;
                    }
                }
                SessionState::Expired => self.stats.expired += 1,
                SessionState::Cancelled => self.stats.cancelled += 1,
                _ => self.stats.live += 1,
            }
        }
        self.stats.records += self.oracle.durable_records() as u64;
        Ok(())
    }
}

/// The identity probes read as: an observer may read every session.
fn observer() -> Identity {
    let mut i = Identity::new("agent://sim-observer");
    i.grants.is_observer = true;
    i
}

/// A session reply in a few words, for traces.
fn describe(r: &Result<macp_kernel::Accepted, macp_kernel::KernelError>) -> String {
    match r {
        Ok(a) if a.duplicate => "duplicate".into(),
        Ok(_) => "accepted".into(),
        Err(e) => format!("rejected {}: {}", e.code, e.message),
    }
}
