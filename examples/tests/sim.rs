//! The deterministic simulator under `cargo test`: a small seed range must
//! pass every invariant, a seed must reproduce exactly, and — so that a pass
//! means something — storage backends with planted bugs must be caught.
//!
//! The large run is documented in `examples/SIMULATION.md`:
//! `cargo run --release -p macp-examples --bin macp-sim -- --seeds 0..10000`.

use std::sync::Arc;

use macp_examples::sim::rng::Rng;
use macp_examples::sim::{run_range, run_seed, run_seed_on, Backend, PowerCut, SimConfig};
use macp_kernel::macp_wire::storage::{Record, SessionSummary};
use macp_storage::{
    LoadEvent, LoadSummary, Maintenance, MemoryConfig, MemoryStorage, Storage, StorageError, StorageRead,
};

/// Seeds 0..200 pass on the default backend (`macp-storage-fs` on its
/// fault-injecting file system, retention 5 s), and the runs did real work:
/// sessions of every mode resolved, expired and were cancelled, the server
/// crashed and recovered, storage failed, unsynced records survived power
/// cuts, timers fired, clients retried and the network duplicated, ended
/// sessions were read back from storage and deleted by retention.
#[test]
fn seeds_0_to_200_pass_every_invariant() {
    let stats = run_range(0..200, &SimConfig::default()).unwrap_or_else(|f| panic!("{f}"));
    eprintln!("{stats}");
    assert_eq!(stats.seeds, 200);
    assert!(stats.sessions > 1_000, "{stats}");
    assert!(stats.per_mode.iter().all(|&n| n > 100), "every mode runs: {stats}");
    assert!(stats.resolved * 2 > stats.sessions, "most sessions resolve: {stats}");
    assert!(stats.expired > 10 && stats.cancelled > 10, "{stats}");
    assert!(stats.crashes > 100 && stats.restarts >= stats.crashes, "{stats}");
    assert!(stats.storage_faults > 10 && stats.survived_unsynced > 10, "{stats}");
    assert!(stats.checkpoints > 100 && stats.timer_records > 50, "{stats}");
    assert!(stats.duplicates > 1_000 && stats.net_duplicates > 100 && stats.retries > 1_000, "{stats}");
    assert!(stats.clock_steps_back > 10, "{stats}");
    assert!(stats.probes > 100 && stats.expired_deleted > 100, "{stats}");
}

/// The same workload on the in-memory backend (what `MACP_MEMORY_ONLY=1`
/// runs on): power cuts lose what was not synced, nothing else.
#[test]
fn seeds_0_to_100_pass_on_the_memory_backend() {
    let cfg = SimConfig { backend: Backend::Memory, ..SimConfig::default() };
    let stats = run_range(0..100, &cfg).unwrap_or_else(|f| panic!("{f}"));
    eprintln!("{stats}");
    assert!(stats.crashes > 50 && stats.checkpoints > 50, "{stats}");
    assert!(stats.resolved * 2 > stats.sessions, "{stats}");
    assert!(stats.expired_deleted > 50, "{stats}");
}

/// A seed is a complete reproduction: the same seed gives the same run.
#[test]
fn a_seed_reproduces_exactly() {
    let cfg = SimConfig::default();
    for seed in [3, 1_000_003] {
        assert_eq!(run_seed(seed, &cfg), run_seed(seed, &cfg));
    }
    assert_ne!(run_seed(1, &cfg), run_seed(2, &cfg));
}

/// A memory backend with a planted bug, for the negative controls.
struct Planted {
    inner: MemoryStorage,
    /// Records handed to `append`, not yet passed on.
    pending: Vec<Record>,
    pending_ended: Vec<SessionSummary>,
    bug: Bug,
    rng: Rng,
}

#[derive(Clone, Copy)]
enum Bug {
    /// `sync` sometimes reports success but silently drops the batch's
    /// last record: acknowledged data is lost.
    LyingSync,
    /// Loading forgets the newest record: an off-by-one in log replay.
    ForgetfulLoad,
}

impl Planted {
    fn new(bug: Bug, rng: Rng) -> Self {
        Planted {
            inner: MemoryStorage::new(MemoryConfig::default()),
            pending: Vec::new(),
            pending_ended: Vec::new(),
            bug,
            rng,
        }
    }
}

impl Storage for Planted {
    fn load(
        &mut self,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        let mut events = Vec::new();
        let summary = self.inner.load(cancelled, &mut |ev| {
            events.push(match ev {
                LoadEvent::Checkpoint { open_state } => Err(open_state.to_vec()),
                LoadEvent::Record { pos, record } => Ok((pos, record)),
                LoadEvent::Damage(_) => return Ok(()),
            });
            Ok(())
        })?;
        if matches!(self.bug, Bug::ForgetfulLoad) && events.last().is_some_and(|e| e.is_ok()) {
            events.pop();
        }
        for e in events {
            match e {
                Err(open_state) => visit(LoadEvent::Checkpoint { open_state: &open_state })?,
                Ok((pos, record)) => visit(LoadEvent::Record { pos, record })?,
            }
        }
        Ok(summary)
    }
    fn append(&mut self, records: &[Record], ended: &[SessionSummary]) -> Result<(), StorageError> {
        self.pending.extend_from_slice(records);
        self.pending_ended.extend_from_slice(ended);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        if matches!(self.bug, Bug::LyingSync) && self.rng.chance(0.2) {
            self.pending.pop();
        }
        let (records, ended) = (std::mem::take(&mut self.pending), std::mem::take(&mut self.pending_ended));
        self.inner.append(&records, &ended)?;
        self.inner.sync()
    }
    fn checkpoint(&mut self, open_state: &[u8]) -> Result<(), StorageError> {
        self.sync()?;
        self.inner.checkpoint(open_state)
    }
    fn maintain(&mut self, now_ms: i64) -> Result<Maintenance, StorageError> {
        self.inner.maintain(now_ms)
    }
    fn reader(&self) -> Arc<dyn StorageRead> {
        self.inner.reader()
    }
}

impl PowerCut for Planted {
    fn power_cut(&mut self) {
        self.pending.clear();
        self.pending_ended.clear();
        self.inner.crash();
    }
}

/// Negative controls: planted storage bugs are caught within a few seeds,
/// and the failure is one line that names the seed and how to replay it.
#[test]
fn planted_storage_bugs_are_caught() {
    let cfg = SimConfig::default();
    let lying =
        (0..20).find_map(|seed| run_seed_on(seed, &cfg, |rng| Box::new(Planted::new(Bug::LyingSync, rng))).err());
    let f = lying.expect("a lying fsync must be caught");
    assert!(
        matches!(f.invariant, "no-acked-record-lost" | "replay-equals-live"),
        "caught as {}: {}",
        f.invariant,
        f.detail
    );
    let line = f.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains(&format!("reproduce: cargo run --release -p macp-examples --bin macp-sim -- --seed {}", f.seed)),
        "{line}"
    );

    let forgetful =
        (0..20).find_map(|seed| run_seed_on(seed, &cfg, |rng| Box::new(Planted::new(Bug::ForgetfulLoad, rng))).err());
    let f = forgetful.expect("a recovery that forgets the newest record must be caught");
    assert!(matches!(f.invariant, "no-acked-record-lost" | "replay-equals-live"), "{f}");
}
