//! The event loop: clients, network, the server's driver and its storage.
//!
//! The server is modelled on the gRPC driver: each request is handled by the
//! kernel at once, its records are appended, and its reply is *held* until
//! a sync makes those records durable (group commit); broadcasts follow the
//! replies. Any storage error is fail-stop: the server drops its kernel and
//! held replies and recovers from disk, exactly as after a power cut.

use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::v1::SessionState;
use macp_kernel::{Broadcast, Effect, ErrorCode, Identity, Input, Kernel, KernelConfig, Reply};

use super::oracle::{Oracle, Violation};
use super::rng::Rng;
use super::storage::{ModelDisk, SimStorage};
use super::workload::{self, Action, Script};
use super::{Backend, Failure, SimConfig, Stats};

/// The simulated wall clock at the start of every run.
const T0: i64 = 1_700_000_000_000;
/// A client resends a request it has had no reply to after this long.
const RETRY_AFTER_MS: i64 = 300;
/// And gives up after this many attempts.
const MAX_ATTEMPTS: u32 = 12;

/// Runs one seed; `Ok` carries what it did, `Err` the first broken
/// invariant with its reproduction line.
pub fn run_seed(seed: u64, config: &SimConfig) -> Result<Stats, Failure> {
    run_seed_on(seed, config, |rng| match config.backend {
        Backend::Model => Box::new(ModelDisk::new(config.faults, rng)),
        Backend::Fs => {
            Box::new(super::fsdisk::FsDisk::new(config.faults, rng).expect("a fresh simulated data directory opens"))
        }
    })
}

/// Like [`run_seed`], on a storage backend built by `storage` from the
/// run's storage random generator: how tests run the simulator on a
/// deliberately broken backend to prove the invariants catch it.
pub fn run_seed_on(
    seed: u64,
    config: &SimConfig,
    storage: impl FnOnce(Rng) -> Box<dyn SimStorage>,
) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, config, storage);
    match sim.run() {
        Ok(()) => Ok(sim.stats),
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

/// A reply waiting for the sync that makes its records durable.
struct Held {
    client: usize,
    item: usize,
    reply: Reply,
    covers: Vec<Record>,
}

struct Node {
    kernel: Option<Kernel>,
    storage: Box<dyn SimStorage>,
    held: Vec<Held>,
    broadcasts: Vec<Broadcast>,
    unsynced: Vec<Record>,
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

impl<'c> Sim<'c> {
    fn new(seed: u64, cfg: &'c SimConfig, storage: impl FnOnce(Rng) -> Box<dyn SimStorage>) -> Self {
        let mut rng = Rng::new(seed);
        let storage = storage(rng.fork());
        let mut workload_rng = rng.fork();
        let kconfig = KernelConfig::default();
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
            oracle: Oracle::new(kconfig.clone()),
            node: Node {
                kernel: Some(Kernel::new(kconfig.clone())),
                storage,
                held: Vec::new(),
                broadcasts: Vec::new(),
                unsynced: Vec::new(),
                offset: 0,
                down_at: 0,
            },
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
        while self.step < self.cfg.max_steps {
            self.step += 1;
            self.stats.steps += 1;
            self.advance_clock();
            if self.node.kernel.is_none() {
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
            let pending = !self.node.held.is_empty() || !self.node.unsynced.is_empty();
            if self.node.kernel.is_some() && pending && self.rng.chance(0.5) {
                self.sync()?;
            }
            if self.node.kernel.is_some() && self.rng.chance(self.cfg.crash_rate) {
                self.trace(|| "power cut".into());
                self.crash();
            }
            if self.clients.iter().all(Client::done) && self.packets.is_empty() && self.node.held.is_empty() {
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
                if self.node.kernel.is_none() {
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
                if self.node.kernel.is_some() {
                    self.handle(input, Some((client, item)));
                }
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
        let due = self.node.kernel.as_ref().and_then(Kernel::next_deadline).is_some_and(|d| d <= now);
        if due {
            let before = self.node.unsynced.len();
            self.handle(Input::Tick, None);
            let produced = self.node.unsynced.len().saturating_sub(before) as u64;
            self.stats.timer_records += produced;
        }
    }

    /// The driver's `absorb`: handle, append the records, hold the reply.
    fn handle(&mut self, input: Input, from: Option<(usize, usize)>) {
        let now = self.server_now();
        let Some(kernel) = self.node.kernel.as_mut() else { return };
        let effects = kernel.handle(now, input);
        let mut records = Vec::new();
        for e in effects {
            match e {
                Effect::Persist(r) => records.push(r),
                Effect::Reply { reply, .. } => {
                    if let Some((client, item)) = from {
                        self.node.held.push(Held { client, item, reply, covers: records.clone() });
                    }
                }
                Effect::Broadcast(b) => self.node.broadcasts.push(b),
            }
        }
        if records.is_empty() {
            return;
        }
        self.node.unsynced.extend(records.iter().cloned());
        if let Err(e) = self.node.storage.append(&records) {
            self.stats.storage_faults += 1;
            self.trace(|| format!("storage fault: {e}"));
            self.crash();
        }
    }

    /// Group commit: one sync, then release held replies and broadcasts.
    fn sync(&mut self) -> Result<(), Violation> {
        if let Err(e) = self.node.storage.sync() {
            self.stats.storage_faults += 1;
            self.trace(|| format!("storage fault: {e}"));
            self.crash();
            return Ok(());
        }
        self.stats.syncs += 1;
        let synced = std::mem::take(&mut self.node.unsynced);
        self.oracle.on_synced(&synced)?;
        if let Some(k) = &self.node.kernel {
            self.oracle.check_live(k)?;
        }
        for h in std::mem::take(&mut self.node.held) {
            let action = &self.clients[h.client].script.items[h.item];
            self.oracle.on_release(action, &h.reply, &h.covers)?;
            match &h.reply {
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
                let verdict = match &h.reply {
                    Reply::Session { result, .. } => describe(result),
                    Reply::Registry(r) => format!("{r:?}"),
                };
                self.trace(|| format!("reply to client {} item {}: {what}: {verdict}", h.client, h.item));
            }
            if self.rng.chance(self.cfg.reply_loss) {
                self.stats.replies_lost += 1;
                continue;
            }
            // A message refused as out of order (its predecessors were
            // reordered behind it: a ballot before its request, a Commitment
            // before its ballots) is tried again a little later, a few
            // times, as a patient client would.
            let retry = matches!(&h.reply, Reply::Session { result: Err(e), .. } if e.code == ErrorCode::InvalidEnvelope)
                && matches!(self.clients[h.client].states[h.item], ItemState::InFlight { attempts, .. } if attempts < 4);
            let at = self.now + self.rng.range(0, 30);
            self.packets.push(Packet::ToClient { at, client: h.client, item: h.item, retry });
        }
        for b in std::mem::take(&mut self.node.broadcasts) {
            self.oracle.on_broadcast(&b)?;
        }
        if self.rng.chance(0.05) {
            let snapshot = self.node.kernel.as_ref().map(Kernel::snapshot).unwrap_or_default();
            match self.node.storage.checkpoint(&snapshot) {
                Ok(()) => self.stats.checkpoints += 1,
                Err(e) => {
                    self.stats.storage_faults += 1;
                    self.trace(|| format!("storage fault: {e}"));
                    self.crash();
                }
            }
        }
        Ok(())
    }

    /// Power cut (or fail-stop after a storage error).
    fn crash(&mut self) {
        self.node.kernel = None;
        self.node.held.clear();
        self.node.broadcasts.clear();
        self.node.storage.crash();
        self.oracle.on_crash(std::mem::take(&mut self.node.unsynced));
        self.node.down_at = self.now;
        self.stats.crashes += 1;
    }

    fn restart(&mut self) -> Result<(), Violation> {
        let kernel = self
            .node
            .storage
            .recover(&self.kconfig)
            .map_err(|e| Violation { invariant: "no-acked-record-lost", detail: format!("recovery failed: {e}") })?;
        let survived = self.oracle.on_recover(&kernel)?;
        self.stats.survived_unsynced += survived as u64;
        self.stats.restarts += 1;
        self.node.offset = self.rng.range(-3_000, 3_000);
        self.node.kernel = Some(kernel);
        self.trace(|| format!("restart: recovered, {survived} unsynced records had survived"));
        Ok(())
    }

    /// Drain, make everything durable, cut the power once more, recover and
    /// run the end-of-run checks.
    fn finish(&mut self) -> Result<(), Violation> {
        if self.node.kernel.is_none() {
            self.restart()?;
        }
        // Without new faults: the last sync must go through.
        while !self.node.unsynced.is_empty() || !self.node.held.is_empty() {
            self.sync()?;
            if self.node.kernel.is_none() {
                self.restart()?;
            }
        }
        self.crash();
        self.restart()?;
        let kernel = self.node.kernel.as_ref().expect("just restarted");
        self.oracle.finish(kernel)?;
        for m in kernel.all_sessions() {
            match SessionState::try_from(m.state).unwrap_or(SessionState::Unspecified) {
                SessionState::Resolved => {
                    self.stats.resolved += 1;
                    if let Some(i) = workload::MODES.iter().position(|x| *x == m.mode) {
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

/// A session reply in a few words, for traces.
fn describe(r: &Result<macp_kernel::Accepted, macp_kernel::KernelError>) -> String {
    match r {
        Ok(a) if a.duplicate => "duplicate".into(),
        Ok(_) => "accepted".into(),
        Err(e) => format!("rejected {}: {}", e.code, e.message),
    }
}
