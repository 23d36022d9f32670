//! The data directory's guards (format marker, lock) and the behaviour both
//! backends share: tickets and durability, history for passive subscribers,
//! checkpoints, restarts.

mod common;

use common::{replay, workload, TempDir};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::KernelConfig;
use macp_storage_fs::{
    recover, FsConfig, FsStorage, MemoryStorage, Storage, StorageError, FORMAT_FILE, LOCK_FILE, WAL_DIR,
};

fn fresh(dir: &std::path::Path) -> FsStorage {
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    let rec = recover(&mut st, KernelConfig::default()).expect("recover");
    assert!(rec.report.is_clean());
    st
}

#[test]
fn a_second_opener_is_locked_out() {
    let dir = TempDir::new("lock");
    let st = fresh(dir.path());
    let err = FsStorage::open(dir.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::Locked(_)), "{err}");
    drop(st);
    FsStorage::open(dir.path(), FsConfig::default()).expect("lock released on drop");
}

#[test]
fn newer_format_is_refused_with_a_clear_error() {
    let dir = TempDir::new("newer");
    drop(fresh(dir.path()));
    std::fs::write(dir.path().join(FORMAT_FILE), "macp-rs-data 2\n").unwrap();
    let err = FsStorage::open(dir.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NewerFormat { found: 2, supported: 1 }), "{err}");
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[test]
fn foreign_or_unmarked_directories_are_never_initialised_over() {
    let dir = TempDir::new("foreign");
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let err = FsStorage::open(dir.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NotADataDir { .. }), "{err}");

    // A data directory whose marker was lost is not silently restarted empty.
    let dir = TempDir::new("unmarked");
    let mut st = fresh(dir.path());
    st.append(&workload(3, 10)).unwrap();
    st.sync().unwrap();
    drop(st);
    std::fs::remove_file(dir.path().join(FORMAT_FILE)).unwrap();
    let err = FsStorage::open(dir.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NotADataDir { .. }), "{err}");

    std::fs::write(dir.path().join(FORMAT_FILE), "something-else 1\n").unwrap();
    let err = FsStorage::open(dir.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NotADataDir { .. }), "{err}");
}

#[test]
fn fresh_directory_has_the_documented_layout() {
    let dir = TempDir::new("layout");
    drop(fresh(dir.path()));
    let marker = std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap();
    assert_eq!(marker, "macp-rs-data 1\n");
    assert!(dir.path().join(LOCK_FILE).exists());
    assert!(dir.path().join(WAL_DIR).join("00000000000000000001.seg").exists());
}

/// The shared contract, run on any backend. `restart` simulates a clean
/// process restart (everything synced survives).
fn contract<S: Storage>(mut st: S, restart: impl Fn(S) -> S) {
    recover(&mut st, KernelConfig::default()).expect("fresh");
    let records = workload(11, 60);
    let (a, b) = records.split_at(30);
    let t1 = st.append(a).unwrap();
    assert!(st.durable() < t1, "nothing is durable before sync");
    let sid = a.iter().find(|r| !r.session_id.is_empty()).unwrap().session_id.clone();
    assert!(st.history(&sid, 0).unwrap().is_empty(), "history shows only durable records");
    let d = st.sync().unwrap();
    assert!(t1 <= d);
    assert_eq!(st.sync().unwrap(), d, "an idle sync is free and changes nothing");
    let want: Vec<Record> = a.iter().filter(|r| r.session_id == sid).cloned().collect();
    assert_eq!(st.history(&sid, 0).unwrap(), want);
    assert_eq!(st.history(&sid, 2).unwrap(), want[2..].to_vec(), "after_sequence is exclusive");
    assert!(st.history("no-such-session", 0).unwrap().is_empty());

    st.checkpoint(&replay(a).snapshot()).unwrap();
    let t2 = st.append(b).unwrap();
    assert!(t2 > t1);
    st.sync().unwrap();

    let mut st = restart(st);
    let rec = recover(&mut st, KernelConfig::default()).expect("recover");
    assert!(rec.report.is_clean(), "{}", rec.report);
    assert!(rec.report.checkpoint.is_some());
    assert_eq!(rec.report.replayed, 30);
    assert_eq!(rec.report.covered, 30);
    assert_eq!(rec.kernel.snapshot(), replay(&records).snapshot());
    // History spans records before and after the checkpoint.
    let all: Vec<Record> = records.iter().filter(|r| r.session_id == sid).cloned().collect();
    assert_eq!(st.history(&sid, 0).unwrap(), all);
    assert!(matches!(st.load(&mut |_| Ok(())), Err(StorageError::Misuse(_))));
}

#[test]
fn memory_backend_honours_the_contract() {
    contract(MemoryStorage::new(), |mut m| {
        m.crash();
        m
    });
}

#[test]
fn fs_backend_honours_the_contract() {
    let dir = TempDir::new("contract");
    let path = dir.path().to_path_buf();
    let st = FsStorage::open(&path, FsConfig { segment_bytes: 2048, ..FsConfig::default() }).unwrap();
    contract(st, |st| {
        drop(st);
        FsStorage::open(&path, FsConfig { segment_bytes: 2048, ..FsConfig::default() }).unwrap()
    });
}

#[test]
fn memory_crash_drops_only_unsynced_records() {
    let mut m = MemoryStorage::new();
    recover(&mut m, KernelConfig::default()).unwrap();
    let records = workload(5, 20);
    m.append(&records[..12]).unwrap();
    m.sync().unwrap();
    m.append(&records[12..]).unwrap();
    m.crash();
    let rec = recover(&mut m, KernelConfig::default()).unwrap();
    assert_eq!(rec.kernel.snapshot(), replay(&records[..12]).snapshot());
    assert_eq!(m.len(), 12);
}

#[test]
fn using_storage_before_recovery_is_an_error_not_a_panic() {
    let dir = TempDir::new("misuse");
    let mut st = FsStorage::open(dir.path(), FsConfig::default()).unwrap();
    assert!(matches!(st.append(&workload(1, 1)), Err(StorageError::Misuse(_))));
    assert!(matches!(st.sync(), Err(StorageError::Misuse(_))));
    let mut m = MemoryStorage::new();
    assert!(matches!(m.append(&workload(1, 1)), Err(StorageError::Misuse(_))));
}

#[test]
fn oversized_record_poisons_the_backend() {
    let dir = TempDir::new("oversize");
    let mut st = FsStorage::open(dir.path(), FsConfig { max_record_bytes: 64, ..FsConfig::default() }).unwrap();
    recover(&mut st, KernelConfig::default()).unwrap();
    let err = st.append(&workload(1, 1)).unwrap_err();
    assert!(matches!(err, StorageError::RecordTooLarge { .. }), "{err}");
    assert!(st.is_poisoned());
    assert!(matches!(st.sync(), Err(StorageError::Poisoned)));
    assert!(matches!(st.history("x", 0), Err(StorageError::Poisoned)));
}

#[test]
fn group_commit_issues_one_fdatasync_per_batch() {
    use macp_storage_fs::SimFs;
    let fs = SimFs::new();
    let mut st = FsStorage::open_with(fs.clone(), "/d", FsConfig::default()).unwrap();
    recover(&mut st, KernelConfig::default()).unwrap();
    let records = workload(9, 300);
    let before = fs.sync_counts();
    // A driver drains its queue: many appends (one per kernel step)...
    let tickets: Vec<_> = records.chunks(1).map(|r| st.append(r).unwrap()).collect();
    // ...then one sync covers them all.
    let durable = st.sync().unwrap();
    assert!(tickets.iter().all(|t| *t <= durable));
    let after = fs.sync_counts();
    assert_eq!(after.0 - before.0, 1, "exactly one fdatasync for the batch");
    assert_eq!(after.1, before.1, "no directory sync without a new segment");
    // An idle sync costs nothing.
    st.sync().unwrap();
    assert_eq!(fs.sync_counts(), after);
}

#[test]
fn backends_can_move_to_a_driver_task() {
    fn send<T: Send>() {}
    send::<FsStorage>();
    send::<MemoryStorage>();
    send::<Box<dyn Storage + Send>>();
}

#[test]
fn lowering_the_append_limit_does_not_turn_old_records_into_damage() {
    let dir = TempDir::new("limit");
    let records = workload(4, 30);
    let mut st = fresh(dir.path());
    st.append(&records).unwrap();
    st.sync().unwrap();
    drop(st);
    let mut st = FsStorage::open(dir.path(), FsConfig { max_record_bytes: 16, ..FsConfig::default() }).unwrap();
    let rec = recover(&mut st, KernelConfig::default()).unwrap();
    assert!(rec.report.is_clean(), "{}", rec.report);
    assert_eq!(rec.kernel.snapshot(), replay(&records).snapshot());
}

#[test]
fn a_crash_during_first_initialisation_does_not_brick_the_directory() {
    // Killed after the temporary marker was written but before the rename.
    let dir = TempDir::new("half-init");
    std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
    std::fs::write(dir.path().join(format!("{FORMAT_FILE}.tmp")), "macp-rs-da").unwrap();
    let st = fresh(dir.path());
    drop(st);
    assert_eq!(std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(), "macp-rs-data 1\n");
}
