//! The filesystem journal: [`macp_storage_fs::FsStorage`] behind the
//! driver's [`Journal`] trait.
//!
//! The driver task appends and syncs; stream tasks read session history for
//! passive subscribers. Both go through one mutex around the storage: reads
//! are rare next to appends, and a read that waits for a sync in progress
//! returns the freshest durable history anyway.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use macp_kernel::{Kernel, KernelConfig};
use macp_storage_fs::{recover, FsConfig, FsStorage, Storage};
use macp_wire::storage::Record;
use tracing::{info, warn};

use crate::driver::{History, Journal};
use crate::hub::Sequenced;
use crate::journal::history_envelope;

type Shared = Arc<Mutex<Option<FsStorage>>>;

/// The write-ahead log in a data directory.
pub struct FsJournal {
    dir: PathBuf,
    storage: Shared,
}

struct FsHistory(Shared);

fn with<T>(s: &Shared, f: impl FnOnce(&mut FsStorage) -> Result<T, String>) -> Result<T, String> {
    let mut g = s.lock().map_err(|_| "storage lock poisoned".to_string())?;
    let st = g.as_mut().ok_or_else(|| "storage is closed after a failure".to_string())?;
    f(st)
}

impl History for FsHistory {
    fn read(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Sequenced>, String> {
        let records = with(&self.0, |s| s.history(session_id, after).map_err(|e| e.to_string()))?;
        Ok(records
            .iter()
            .filter(|r| r.seq <= upto)
            .filter_map(|r| history_envelope(r).map(|e| Sequenced { seq: r.seq, envelope: Arc::new(e.clone()) }))
            .collect())
    }
}

fn open_and_recover(dir: &Path, kcfg: &KernelConfig) -> Result<(Kernel, FsStorage), String> {
    let mut storage = FsStorage::open(dir, FsConfig::default()).map_err(|e| format!("{}: {e}", dir.display()))?;
    let recovered = recover(&mut storage, kcfg.clone()).map_err(|e| format!("recovery of {}: {e}", dir.display()))?;
    if recovered.report.is_clean() {
        info!("recovered {}: {}", dir.display(), recovered.report);
    } else {
        warn!("recovered {} WITH DAMAGE: {}", dir.display(), recovered.report);
    }
    Ok((recovered.kernel, storage))
}

/// Opens the data directory and recovers the kernel from it.
pub fn open(dir: &Path, kcfg: &KernelConfig) -> Result<(Kernel, Box<dyn Journal>), String> {
    let (kernel, storage) = open_and_recover(dir, kcfg)?;
    Ok((kernel, Box::new(FsJournal { dir: dir.to_path_buf(), storage: Arc::new(Mutex::new(Some(storage))) })))
}

impl Journal for FsJournal {
    fn append(&mut self, records: Vec<Record>) -> Result<(), String> {
        with(&self.storage, |s| s.append(&records).map(|_| ()).map_err(|e| e.to_string()))
    }

    fn sync(&mut self) -> Result<(), String> {
        with(&self.storage, |s| s.sync().map(|_| ()).map_err(|e| e.to_string()))
    }

    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        let mut g = self.storage.lock().map_err(|_| "storage lock poisoned".to_string())?;
        // Drop the poisoned backend first: it holds the directory lock.
        g.take();
        let (kernel, storage) = open_and_recover(&self.dir, config)?;
        *g = Some(storage);
        Ok(kernel)
    }

    fn checkpoint(&mut self, kernel: &Kernel) -> Result<(), String> {
        let snapshot = kernel.snapshot();
        with(&self.storage, |s| s.checkpoint(&snapshot).map(|_| ()).map_err(|e| e.to_string()))
    }

    fn history(&self) -> Arc<dyn History> {
        Arc::new(FsHistory(self.storage.clone()))
    }
}
