//! The deterministic simulator under `cargo test`: a small seed range must
//! pass every invariant, a seed must reproduce exactly, and — so that a pass
//! means something — storage backends with planted bugs must be caught.
//!
//! The large run is documented in `examples/SIMULATION.md`:
//! `cargo run --release -p macp-examples --bin macp-sim -- --seeds 0..10000`.

use macp_examples::sim::rng::Rng;
use macp_examples::sim::storage::SimStorage;
use macp_examples::sim::{run_range, run_seed, run_seed_on, Backend, SimConfig};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::{Kernel, KernelConfig};

/// Seeds 0..200 pass, and the runs did real work: sessions of every mode
/// resolved, expired and were cancelled, the server crashed and recovered,
/// storage failed, unsynced records survived power cuts, timers fired,
/// clients retried and the network duplicated.
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
}

/// The same workload and faults on the real storage crate: its WAL on its
/// fault-injecting simulated file system, power cuts as its crash images,
/// recovery by its own `recover`.
#[test]
fn seeds_0_to_100_pass_on_macp_storage_fs() {
    let cfg = SimConfig { backend: Backend::Fs, ..SimConfig::default() };
    let stats = run_range(0..100, &cfg).unwrap_or_else(|f| panic!("{f}"));
    eprintln!("{stats}");
    assert!(stats.crashes > 50 && stats.storage_faults > 10 && stats.checkpoints > 50, "{stats}");
    assert!(stats.resolved * 2 > stats.sessions, "{stats}");
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

/// A disk whose `fsync` sometimes reports success but silently drops the
/// batch's last record: acknowledged data is lost.
struct LyingDisk {
    durable: Vec<Record>,
    volatile: Vec<Record>,
    rng: Rng,
}

impl SimStorage for LyingDisk {
    fn name(&self) -> &'static str {
        "lying"
    }
    fn append(&mut self, records: &[Record]) -> Result<(), String> {
        self.volatile.extend_from_slice(records);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        if self.rng.chance(0.2) {
            self.volatile.pop();
        }
        self.durable.append(&mut self.volatile);
        Ok(())
    }
    fn checkpoint(&mut self, _snapshot: &[u8]) -> Result<(), String> {
        self.sync()
    }
    fn crash(&mut self) {
        self.volatile.clear();
    }
    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        let mut k = Kernel::new(config.clone());
        for r in &self.durable {
            // A record after a lost one no longer applies; skip it, as a
            // careless recovery would.
            let _ = k.apply_record(r);
        }
        Ok(k)
    }
}

/// A disk that keeps everything but whose recovery forgets the newest
/// record: a classic off-by-one in log replay.
struct ForgetfulRecovery {
    durable: Vec<Record>,
    volatile: Vec<Record>,
}

impl SimStorage for ForgetfulRecovery {
    fn name(&self) -> &'static str {
        "forgetful"
    }
    fn append(&mut self, records: &[Record]) -> Result<(), String> {
        self.volatile.extend_from_slice(records);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        self.durable.append(&mut self.volatile);
        Ok(())
    }
    fn checkpoint(&mut self, _snapshot: &[u8]) -> Result<(), String> {
        self.sync()
    }
    fn crash(&mut self) {
        self.volatile.clear();
    }
    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        let mut k = Kernel::new(config.clone());
        let n = self.durable.len().saturating_sub(1);
        for r in &self.durable[..n] {
            k.apply_record(r).map_err(|e| e.to_string())?;
        }
        Ok(k)
    }
}

/// Negative controls: planted storage bugs are caught within a few seeds,
/// and the failure is one line that names the seed and how to replay it.
#[test]
fn planted_storage_bugs_are_caught() {
    let cfg = SimConfig::default();
    let lying = (0..20).find_map(|seed| {
        run_seed_on(seed, &cfg, |rng| Box::new(LyingDisk { durable: vec![], volatile: vec![], rng })).err()
    });
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

    let forgetful = (0..20).find_map(|seed| {
        run_seed_on(seed, &cfg, |_| Box::new(ForgetfulRecovery { durable: vec![], volatile: vec![] })).err()
    });
    let f = forgetful.expect("a recovery that forgets the newest record must be caught");
    assert!(matches!(f.invariant, "no-acked-record-lost" | "replay-equals-live"), "{f}");
}
