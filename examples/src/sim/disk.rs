//! The simulated server's disk: the real storage backends under simulated
//! power.
//!
//! The server's storage is one of the real [`Storage`] implementations —
//! `macp-storage-fs`'s write-ahead log and index on the fault-injecting
//! [`SimFs`], or the in-memory backend — so the simulator tests the
//! production code, not a model of it. This module only adds what a
//! simulation needs around it: injecting faults (the next few file-system
//! operations fail, so a sync or checkpoint fails part-way), cutting the
//! power (synced bytes survive, unsynced ones are dropped or torn at a
//! random point, unsynced directory changes come back old or new), and
//! opening the backend again after a restart.

use std::path::PathBuf;

use macp_storage::{MemoryConfig, MemoryStorage, Retention, Storage, StorageError};
use macp_storage_fs::{FsConfig, FsStorage, SimFs};

use super::rng::Rng;
use super::Backend;

/// How often storage operations fail on purpose.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Probability that a sync fails.
    pub sync: f64,
    /// Probability that a checkpoint fails.
    pub checkpoint: f64,
    /// Probability that an append fails (a full disk, say).
    pub append: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults { sync: 0.01, checkpoint: 0.05, append: 0.002 }
    }
}

/// Small segments, so runs cross segment boundaries (a new file, a
/// directory sync, the previous segment synced first), retire segments and
/// carry open sessions forward many times.
const SEGMENT_BYTES: u64 = 4 * 1024;

/// A backend the simulator can cut the power of. The real backends are
/// built in; the simulator's own tests plant bugs in wrappers of the memory
/// backend to prove the invariants catch them.
pub trait PowerCut: Storage {
    /// Loses what was not synced and requires a new `load`.
    fn power_cut(&mut self);
}

impl PowerCut for MemoryStorage {
    fn power_cut(&mut self) {
        self.crash()
    }
}

// One value per simulated server, built once per run: the size difference
// between variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Media {
    Memory(MemoryStorage),
    Fs { fs: SimFs, storage: Option<FsStorage<SimFs>> },
    Custom(Box<dyn PowerCut>),
}

/// The simulated server's storage and its power supply.
pub struct Disk {
    media: Media,
    dir: PathBuf,
    retention: Retention,
    faults: Faults,
    rng: Rng,
}

impl Disk {
    /// A fresh, empty disk of `backend`, whose faults draw from `rng`.
    pub fn new(backend: Backend, retention: Retention, faults: Faults, rng: Rng) -> Self {
        let media = match backend {
            Backend::Memory => Media::Memory(MemoryStorage::new(MemoryConfig { retention, ..MemoryConfig::default() })),
            Backend::Fs => Media::Fs { fs: SimFs::new(), storage: None },
        };
        Disk { media, dir: PathBuf::from("/macp-data"), retention, faults, rng }
    }

    /// A disk of a custom backend (planted bugs); no faults are injected.
    pub fn custom(storage: Box<dyn PowerCut>, retention: Retention, rng: Rng) -> Self {
        Disk {
            media: Media::Custom(storage),
            dir: PathBuf::from("/macp-data"),
            retention,
            faults: Faults::default(),
            rng,
        }
    }

    /// The backend's name for reports.
    pub fn name(&self) -> &'static str {
        match self.media {
            Media::Memory(_) => "memory",
            Media::Fs { .. } => "fs",
            Media::Custom(_) => "custom",
        }
    }

    /// Powers the storage up (opens it; not loaded yet).
    pub fn open(&mut self) -> Result<(), StorageError> {
        match &mut self.media {
            Media::Memory(_) | Media::Custom(_) => Ok(()),
            Media::Fs { fs, storage } => {
                // No wall-clock budget: a seed must replay the same operations.
                let cfg = FsConfig {
                    segment_bytes: SEGMENT_BYTES,
                    retention: self.retention,
                    maintain_time_budget: std::time::Duration::MAX,
                    ..FsConfig::default()
                };
                *storage = Some(FsStorage::open_with(fs.clone(), &self.dir, cfg)?);
                Ok(())
            }
        }
    }

    /// The storage while powered up.
    pub fn storage(&mut self) -> Option<&mut dyn Storage> {
        match &mut self.media {
            Media::Memory(m) => Some(m),
            Media::Fs { storage, .. } => storage.as_mut().map(|s| s as &mut dyn Storage),
            Media::Custom(c) => Some(&mut **c),
        }
    }

    /// Arms a fault `p` of the time: one of the next few file-system
    /// operations fails, and every one after it until the power is cut.
    /// The memory backend has no faults to inject.
    fn arm(&mut self, p: f64) {
        if let Media::Fs { fs, .. } = &self.media {
            if self.rng.chance(p) {
                let n = fs.ops() + self.rng.below(4);
                fs.fail_at(n);
            }
        }
    }

    /// Before an append: maybe a full disk.
    pub fn arm_append(&mut self) {
        self.arm(self.faults.append)
    }

    /// Before a sync: maybe a failing device.
    pub fn arm_sync(&mut self) {
        self.arm(self.faults.sync)
    }

    /// Before a checkpoint: maybe a failing write of the checkpoint file.
    pub fn arm_checkpoint(&mut self) {
        self.arm(self.faults.checkpoint)
    }

    /// A power cut: whatever was not synced may be lost, entirely or from
    /// some point on; synced data survives. Faults armed before it are
    /// gone with the old file system.
    pub fn crash(&mut self) {
        match &mut self.media {
            Media::Memory(m) => m.crash(),
            Media::Custom(c) => c.power_cut(),
            Media::Fs { fs, storage } => {
                *storage = None;
                *fs = fs.crash_image(self.rng.next_u64());
            }
        }
    }
}
