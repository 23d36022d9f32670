//! The generic storage suite of `macp-storage` (what every backend must
//! do), run on the file backend over the real file system and over the
//! simulated one, where `crash` is a real power cut (`SimFs::crash_image`).

mod common;

use common::TempDir;
use macp_storage::suite::{self, Harness};
use macp_storage::Retention;
use macp_storage_fs::{FsConfig, FsStorage, SimFs};

fn cfg(retention: Retention) -> FsConfig {
    // Small segments so the suite's records span several of them.
    FsConfig { segment_bytes: 1024, retention, ..FsConfig::default() }
}

/// Temp directories on the real file system; a "crash" is a drop without
/// anything else (the page cache keeps what was written, which the
/// contract allows).
struct Real {
    dir: Option<TempDir>,
}

impl Harness for Real {
    type S = FsStorage;

    fn open(&mut self, retention: Retention) -> FsStorage {
        let dir = self.dir.get_or_insert_with(|| TempDir::new("suite"));
        FsStorage::open(dir.path(), cfg(retention)).expect("open")
    }

    fn stop(&mut self, storage: FsStorage) {
        drop(storage);
    }

    fn crash(&mut self, storage: FsStorage) {
        drop(storage);
    }

    fn reset(&mut self) {
        self.dir = None;
    }
}

/// The simulated file system: `crash` keeps only what a power cut would.
struct Sim {
    fs: SimFs,
    crashes: u64,
}

impl Harness for Sim {
    type S = FsStorage<SimFs>;

    fn open(&mut self, retention: Retention) -> FsStorage<SimFs> {
        FsStorage::open_with(self.fs.clone(), "/data", cfg(retention)).expect("open")
    }

    fn stop(&mut self, storage: FsStorage<SimFs>) {
        drop(storage);
    }

    fn crash(&mut self, storage: FsStorage<SimFs>) {
        self.crashes += 1;
        let image = storage.vfs().crash_image(0x5eed ^ self.crashes);
        drop(storage);
        self.fs = image;
    }

    fn reset(&mut self) {
        self.fs = SimFs::new();
    }
}

#[test]
fn passes_the_storage_suite_on_the_real_file_system() {
    suite::run_all(&mut Real { dir: None });
}

#[test]
fn passes_the_storage_suite_on_the_simulated_file_system() {
    // Several power-cut seeds: each crash keeps a different part of what
    // was not synced.
    for seed in 0..8 {
        suite::run_all(&mut Sim { fs: SimFs::new(), crashes: seed * 1_000 });
    }
}
