//! Storage as the simulator sees it: an append-only record log with group
//! commit, checkpoints, injected faults and power cuts.
//!
//! The simulated server drives storage exactly like the real driver: append
//! every `Effect::Persist` record, sync once per batch, release replies only
//! after the sync, and treat any storage error as fail-stop (drop the kernel
//! and recover from what is on disk). [`SimStorage`] is that contract;
//! [`ModelDisk`] is an in-memory model of it with the failure behaviour of a
//! real disk. The simulator never looks inside a backend: it checks what
//! recovery returns against what it knows was synced (see `node.rs`), so any
//! backend with this contract can be run under the same invariants.

use macp_kernel::macp_wire::storage::Record;
use macp_kernel::{Kernel, KernelConfig};

use super::rng::Rng;

/// The storage contract the simulated server uses.
pub trait SimStorage {
    /// A short name for reports and reproduction lines.
    fn name(&self) -> &'static str;

    /// Queues records; nothing is durable yet. An error is fail-stop.
    fn append(&mut self, records: &[Record]) -> Result<(), String>;

    /// Makes every appended record durable. An error is fail-stop: some,
    /// all or none of the unsynced records may be on disk afterwards.
    fn sync(&mut self) -> Result<(), String>;

    /// Stores `snapshot` as the state after every appended record (syncing
    /// them first). An error is fail-stop.
    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), String>;

    /// A power cut: whatever was not synced may be lost, entirely or from
    /// some point on (a torn write); synced data survives.
    fn crash(&mut self);

    /// Restart: rebuild the kernel from disk (checkpoint, then the log
    /// after it) and get ready to append again. An error here means stored
    /// data could not be recovered, which the simulator reports as a bug.
    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String>;
}

/// How often the [`ModelDisk`] fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Probability that a sync fails.
    pub sync: f64,
    /// Probability that a checkpoint write fails.
    pub checkpoint: f64,
    /// Probability that an append fails (a full disk, say).
    pub append: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults { sync: 0.01, checkpoint: 0.05, append: 0.002 }
    }
}

/// The in-memory model of a group-committed log.
///
/// Durability is explicit: `durable` survives anything, `volatile` holds
/// appended-but-unsynced records. A failed sync or a power cut keeps a
/// random prefix of `volatile` (the writes the OS happened to flush; a torn
/// last record is detected by its checksum and dropped, so it behaves as a
/// shorter prefix) and loses the rest. A checkpoint is written atomically
/// (temporary file + rename): it either fully replaces the previous one or
/// leaves it untouched.
#[derive(Debug)]
pub struct ModelDisk {
    durable: Vec<Record>,
    volatile: Vec<Record>,
    checkpoint: Option<(Vec<u8>, usize)>,
    faults: Faults,
    rng: Rng,
    poisoned: bool,
}

impl ModelDisk {
    /// An empty disk whose faults draw from `rng`.
    pub fn new(faults: Faults, rng: Rng) -> Self {
        ModelDisk { durable: Vec::new(), volatile: Vec::new(), checkpoint: None, faults, rng, poisoned: false }
    }

    /// Records known durable (for tests of the model itself).
    pub fn durable_len(&self) -> usize {
        self.durable.len()
    }

    fn check(&self) -> Result<(), String> {
        if self.poisoned {
            Err("storage is poisoned by an earlier failure; recover first".into())
        } else {
            Ok(())
        }
    }

    /// A failed write: some prefix of the unsynced records reached the disk.
    fn tear(&mut self) {
        let keep = self.rng.index(self.volatile.len() + 1);
        self.durable.extend(self.volatile.drain(..keep));
        self.volatile.clear();
    }
}

impl SimStorage for ModelDisk {
    fn name(&self) -> &'static str {
        "model"
    }

    fn append(&mut self, records: &[Record]) -> Result<(), String> {
        self.check()?;
        if self.rng.chance(self.faults.append) {
            self.poisoned = true;
            return Err("injected fault: append failed (disk full)".into());
        }
        self.volatile.extend_from_slice(records);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.check()?;
        if self.volatile.is_empty() {
            return Ok(());
        }
        if self.rng.chance(self.faults.sync) {
            self.poisoned = true;
            self.tear();
            return Err("injected fault: fdatasync failed".into());
        }
        self.durable.append(&mut self.volatile);
        Ok(())
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.sync()?;
        if self.rng.chance(self.faults.checkpoint) {
            self.poisoned = true;
            return Err("injected fault: checkpoint write failed".into());
        }
        self.checkpoint = Some((snapshot.to_vec(), self.durable.len()));
        Ok(())
    }

    fn crash(&mut self) {
        self.tear();
    }

    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        self.volatile.clear();
        self.poisoned = false;
        let (mut kernel, from) = match &self.checkpoint {
            Some((snap, covered)) => (
                Kernel::restore(config.clone(), snap).map_err(|e| format!("checkpoint does not restore: {e}"))?,
                *covered,
            ),
            None => (Kernel::new(config.clone()), 0),
        };
        for (i, r) in self.durable.iter().enumerate().skip(from) {
            kernel.apply_record(r).map_err(|e| format!("durable record {i} ({r:?}) does not replay: {e}"))?;
        }
        Ok(kernel)
    }
}
