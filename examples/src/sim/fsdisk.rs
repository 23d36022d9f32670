//! The real storage crate under the simulator: `macp-storage-fs`'s
//! write-ahead log ([`FsStorage`]) on its simulated file system ([`SimFs`]).
//!
//! Where [`super::storage::ModelDisk`] is a model of what a group-committed
//! log should do, this is the production code: frames, checksums, segment
//! rollover, atomic checkpoints, torn-tail truncation and crash recovery.
//! Faults are injected with `SimFs::fail_at` (the next few file-system
//! operations fail, so a sync or checkpoint fails part-way), and a power cut
//! replaces the file system by `SimFs::crash_image`: synced bytes survive,
//! unsynced bytes are dropped or torn at a random point, unsynced directory
//! changes come back old or new. Recovery is the crate's own `recover`, so
//! the simulator's invariants check the storage crate end to end.

use std::path::PathBuf;

use macp_kernel::macp_wire::storage::Record;
use macp_kernel::{Kernel, KernelConfig};
use macp_storage_fs::{recover, FsConfig, FsStorage, SimFs, Storage};

use super::rng::Rng;
use super::storage::{Faults, SimStorage};

/// Small segments, so runs cross segment boundaries (a new file, a
/// directory sync, the previous segment synced first) many times.
const SEGMENT_BYTES: u64 = 4 * 1024;

/// [`FsStorage`] on a [`SimFs`], as a [`SimStorage`].
pub struct FsDisk {
    fs: SimFs,
    dir: PathBuf,
    storage: Option<FsStorage<SimFs>>,
    faults: Faults,
    rng: Rng,
}

impl FsDisk {
    /// A fresh, empty data directory on a fresh simulated file system.
    pub fn new(faults: Faults, rng: Rng) -> Result<Self, String> {
        let mut d = FsDisk { fs: SimFs::new(), dir: PathBuf::from("/macp-data"), storage: None, faults, rng };
        d.recover(&KernelConfig::default())?;
        Ok(d)
    }

    fn cfg() -> FsConfig {
        FsConfig { segment_bytes: SEGMENT_BYTES, ..FsConfig::default() }
    }

    fn storage(&mut self) -> Result<&mut FsStorage<SimFs>, String> {
        self.storage.as_mut().ok_or_else(|| "storage is down; recover first".to_string())
    }

    /// Arms a fault `p` of the time: one of the next few file-system
    /// operations fails, and every one after it.
    fn maybe_arm(&mut self, p: f64) {
        if self.rng.chance(p) {
            let n = self.fs.ops() + self.rng.below(4);
            self.fs.fail_at(n);
        }
    }
}

impl SimStorage for FsDisk {
    fn name(&self) -> &'static str {
        "fs"
    }

    fn append(&mut self, records: &[Record]) -> Result<(), String> {
        self.maybe_arm(self.faults.append);
        self.storage()?.append(records).map(|_| ()).map_err(|e| e.to_string())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.maybe_arm(self.faults.sync);
        self.storage()?.sync().map(|_| ()).map_err(|e| e.to_string())
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.maybe_arm(self.faults.checkpoint);
        self.storage()?.checkpoint(snapshot).map(|_| ()).map_err(|e| e.to_string())
    }

    fn crash(&mut self) {
        self.storage = None;
        self.fs = self.fs.crash_image(self.rng.next_u64());
    }

    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        self.storage = None;
        let mut storage = FsStorage::open_with(self.fs.clone(), &self.dir, Self::cfg())
            .map_err(|e| format!("the data directory does not open: {e}"))?;
        let recovered = recover(&mut storage, config.clone()).map_err(|e| format!("recovery failed: {e}"))?;
        // Power cuts and failed syncs may tear the tail of the log, and
        // nothing else: any other damage, or a quarantined session, means
        // the storage lost or garbled data it had synced.
        let r = &recovered.report;
        if !r.is_clean() {
            return Err(format!("recovery reported damage after a clean power cut: {r}"));
        }
        self.storage = Some(storage);
        Ok(recovered.kernel)
    }
}
