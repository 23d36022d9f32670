//! A deterministic simulator of a whole macp-rs deployment: clients, a lossy
//! network and one server whose storage fails and whose power is cut, all in
//! one thread, driven by one seed.
//!
//! The kernel is pure, so the simulator runs the server's own code
//! in-process — the commit pipeline (`macp-pipeline`) and a real storage
//! backend, by default `macp-storage-fs` on its fault-injecting simulated
//! file system — and only simulates what surrounds it: clients that retry,
//! a network that delays, reorders, duplicates and loses, clocks that drift
//! and step back, and the power ([`disk`]: injected faults, power cuts).
//! Storage runs with a short retention, so ended sessions are deleted and
//! segments retired during the run. Thousands of sessions of every mode run
//! per second, and after every step the [`oracle`] checks: no acknowledged
//! record lost, exactly one resolution per resolved session, replay equal
//! to live state, nothing accepted after a terminal state, every ended
//! session answered from storage exactly as its history says until its
//! retention passes.
//!
//! A seed is a complete reproduction: a failure prints one line with the
//! command that replays it (`--trace` shows every event).
//!
//! ```no_run
//! use macp_examples::sim::{run_seed, SimConfig};
//! let outcome = run_seed(42, &SimConfig::default());
//! assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
//! ```

pub mod disk;
mod engine;
pub mod oracle;
pub mod rng;
pub mod workload;

use std::fmt;
use std::ops::AddAssign;
use std::time::Duration;

pub use disk::{Faults, PowerCut};
pub use engine::{run_seed, run_seed_on};
use macp_storage::Retention;

/// Which storage backend the simulated server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// `macp-storage-fs`: the write-ahead log and ended-session index on
    /// its fault-injecting simulated file system (faults, torn writes).
    #[default]
    Fs,
    /// `macp-storage`'s in-memory backend (power cuts lose what was not
    /// synced; no faults).
    Memory,
}

impl Backend {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fs => "fs",
            Backend::Memory => "memory",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "fs" => Some(Backend::Fs),
            "memory" => Some(Backend::Memory),
            _ => None,
        }
    }
}

/// Knobs of a run. The defaults are what `cargo test` and the documented
/// large run use; a failure's reproduction line repeats any that differ.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The storage backend.
    pub backend: Backend,
    /// Storage fault rates.
    pub faults: Faults,
    /// How long storage keeps ended sessions (simulated time).
    pub retention: Retention,
    /// Fewest and most sessions per seed.
    pub sessions: (u64, u64),
    /// Probability per step that the server loses power.
    pub crash_rate: f64,
    /// Probability per step that the network duplicates a request in flight.
    pub duplicate_rate: f64,
    /// Probability that a released reply is lost on its way back.
    pub reply_loss: f64,
    /// Steps after which a run stops even if clients are not done.
    pub max_steps: usize,
    /// Print every event to stderr.
    pub trace: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            backend: Backend::Fs,
            faults: Faults::default(),
            retention: Retention::For(Duration::from_secs(5)),
            sessions: (4, 16),
            crash_rate: 0.004,
            duplicate_rate: 0.03,
            reply_loss: 0.02,
            max_steps: 20_000,
            trace: false,
        }
    }
}

impl SimConfig {
    /// The command-line flags that reproduce this configuration (beyond
    /// the defaults).
    pub fn flags(&self) -> String {
        let d = SimConfig::default();
        let mut f = String::new();
        if self.backend != d.backend {
            f.push_str(&format!(" --storage {}", self.backend.name()));
        }
        if self.faults.sync != d.faults.sync {
            f.push_str(&format!(" --sync-faults {}", self.faults.sync));
        }
        if self.crash_rate != d.crash_rate {
            f.push_str(&format!(" --crash-rate {}", self.crash_rate));
        }
        if self.sessions != d.sessions {
            f.push_str(&format!(" --sessions {}..{}", self.sessions.0, self.sessions.1));
        }
        f
    }

    /// The one-line command that replays `seed` under this configuration.
    pub fn reproduce(&self, seed: u64) -> String {
        format!("cargo run --release -p macp-examples --bin macp-sim -- --seed {seed}{} --trace", self.flags())
    }
}

/// A seed that broke an invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The step at which the violation was seen.
    pub step: usize,
    /// The invariant's short name.
    pub invariant: &'static str,
    /// What was observed.
    pub detail: String,
    /// The command that replays it.
    pub reproduce: String,
}

impl fmt::Display for Failure {
    /// One line, always: seed, invariant, evidence, reproduction.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail: String = self.detail.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        write!(
            f,
            "macp-sim: seed {} FAILED at step {}: {}: {} | reproduce: {}",
            self.seed, self.step, self.invariant, detail, self.reproduce
        )
    }
}

impl std::error::Error for Failure {}

/// What runs did, added up over seeds: the evidence that the invariants
/// were checked against real work, not an idle server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Seeds run.
    pub seeds: u64,
    /// Sessions scripted.
    pub sessions: u64,
    /// Sessions scripted per mode, in [`workload::MODES`] order.
    pub per_mode: [u64; 6],
    /// Sessions RESOLVED at the end.
    pub resolved: u64,
    /// Sessions RESOLVED at the end, per mode.
    pub resolved_per_mode: [u64; 6],
    /// Sessions EXPIRED at the end.
    pub expired: u64,
    /// Sessions CANCELLED at the end.
    pub cancelled: u64,
    /// Sessions still OPEN or SUSPENDED at the end.
    pub live: u64,
    /// Requests delivered to a running server.
    pub delivered: u64,
    /// Replies released: accepted (new).
    pub accepted: u64,
    /// Replies released: duplicates acknowledged.
    pub duplicates: u64,
    /// Replies released: rejections.
    pub rejected: u64,
    /// Client retries after a timeout.
    pub retries: u64,
    /// Requests the network duplicated.
    pub net_duplicates: u64,
    /// Replies the network lost.
    pub replies_lost: u64,
    /// Successful syncs (group commits).
    pub syncs: u64,
    /// Injected storage faults (fail-stop crashes).
    pub storage_faults: u64,
    /// Power cuts.
    pub crashes: u64,
    /// Restarts (recoveries checked).
    pub restarts: u64,
    /// Unsynced records that survived a crash.
    pub survived_unsynced: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Records durable at the end.
    pub records: u64,
    /// Ticks that produced records (expiries, implicit accepts).
    pub timer_records: u64,
    /// Times the server clock stepped back.
    pub clock_steps_back: u64,
    /// GetSession probes answered and checked.
    pub probes: u64,
    /// Ended sessions deleted by retention.
    pub expired_deleted: u64,
    /// Log segments retired.
    pub segments_retired: u64,
    /// Records of long-open sessions carried forward.
    pub records_carried: u64,
    /// Session ids started again after retention deleted their first
    /// session (a late retried SessionStart).
    pub ids_reused_after_retention: u64,
    /// Simulation steps.
    pub steps: u64,
}

impl AddAssign<&Stats> for Stats {
    fn add_assign(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.sessions += o.sessions;
        for (a, b) in self.per_mode.iter_mut().zip(o.per_mode) {
            *a += b;
        }
        self.resolved += o.resolved;
        for (a, b) in self.resolved_per_mode.iter_mut().zip(o.resolved_per_mode) {
            *a += b;
        }
        self.expired += o.expired;
        self.cancelled += o.cancelled;
        self.live += o.live;
        self.delivered += o.delivered;
        self.accepted += o.accepted;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
        self.retries += o.retries;
        self.net_duplicates += o.net_duplicates;
        self.replies_lost += o.replies_lost;
        self.syncs += o.syncs;
        self.storage_faults += o.storage_faults;
        self.crashes += o.crashes;
        self.restarts += o.restarts;
        self.survived_unsynced += o.survived_unsynced;
        self.checkpoints += o.checkpoints;
        self.records += o.records;
        self.timer_records += o.timer_records;
        self.clock_steps_back += o.clock_steps_back;
        self.probes += o.probes;
        self.ids_reused_after_retention += o.ids_reused_after_retention;
        self.expired_deleted += o.expired_deleted;
        self.segments_retired += o.segments_retired;
        self.records_carried += o.records_carried;
        self.steps += o.steps;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seeds {}  steps {}  sessions {}", self.seeds, self.steps, self.sessions)?;
        let modes: Vec<String> = workload::MODES
            .iter()
            .zip(self.per_mode.iter().zip(self.resolved_per_mode))
            .map(|(m, (n, r))| format!("{}={n} ({r} resolved)", m.rsplit('.').nth(1).unwrap_or(m)))
            .collect();
        writeln!(f, "  sessions per mode: {}", modes.join(" "))?;
        writeln!(
            f,
            "  final states: resolved {}  expired {}  cancelled {}  open/suspended {}",
            self.resolved, self.expired, self.cancelled, self.live
        )?;
        writeln!(
            f,
            "  requests delivered {}  accepted {}  duplicate acks {}  rejected {}  retries {}",
            self.delivered, self.accepted, self.duplicates, self.rejected, self.retries
        )?;
        writeln!(
            f,
            "  network: duplicated {}  replies lost {}  clock steps back {}",
            self.net_duplicates, self.replies_lost, self.clock_steps_back
        )?;
        write!(
            f,
            "  storage: syncs {}  records {}  timer records {}  checkpoints {}  faults {}  power cuts {}  restarts {}  unsynced records that survived {}",
            self.syncs,
            self.records,
            self.timer_records,
            self.checkpoints,
            self.storage_faults,
            self.crashes,
            self.restarts,
            self.survived_unsynced
        )?;
        write!(
            f,
            "\n  retention: ended sessions deleted {}  segments retired {}  records carried forward {}  GetSession probes {}  ids reused after retention {}",
            self.expired_deleted, self.segments_retired, self.records_carried, self.probes, self.ids_reused_after_retention
        )
    }
}

/// Runs `seeds` in order, stopping at the first failure.
pub fn run_range(seeds: std::ops::Range<u64>, config: &SimConfig) -> Result<Stats, Failure> {
    let mut total = Stats::default();
    for seed in seeds {
        total += &run_seed(seed, config)?;
    }
    Ok(total)
}
