//! The data directory's guards (format marker, lock), the write path's
//! promises (group commit, fail-stop), and a kernel-level round trip
//! through the pipeline's recovery.

mod common;

use common::{prefix_snapshots, recover_from, workload, workload_with_summaries, TempDir};
use macp_storage::{Storage, StorageError};
use macp_storage_fs::{FsConfig, FsStorage, SimFs, FORMAT_FILE, INDEX_FILE, LOCK_FILE, WAL_DIR};

fn fresh(dir: &std::path::Path) -> FsStorage {
    let mut st = FsStorage::open(dir, FsConfig::default()).expect("open");
    let (_, report) = recover_from(&mut st).expect("recover");
    assert!(report.is_clean());
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
    std::fs::write(dir.path().join(FORMAT_FILE), "macp-rs-data 3\n").unwrap();
    let err = FsStorage::open(dir.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NewerFormat { found: 3, supported: 2 }), "{err}");
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
    st.append(&workload(3, 10), &[]).unwrap();
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
    assert_eq!(marker, "macp-rs-data 2\n");
    assert!(dir.path().join(LOCK_FILE).exists());
    assert!(dir.path().join(INDEX_FILE).exists());
    assert!(dir.path().join(WAL_DIR).join("00000000000000000001.seg").exists());
}

/// Records, summaries and checkpoints from a real kernel: a restart
/// recovers the same open state, ended sessions are readable with their
/// whole history, and history spans records before and after the
/// checkpoint.
#[test]
fn a_kernel_round_trip_through_checkpoint_and_restart() {
    let dir = TempDir::new("contract");
    let cfg = FsConfig { segment_bytes: 2048, ..FsConfig::default() };
    let w = workload_with_summaries(11, 300);
    let snaps = prefix_snapshots(&w.records);
    let mut st = FsStorage::open(dir.path(), cfg.clone()).unwrap();
    recover_from(&mut st).expect("fresh");
    let half = 150;
    for (a, b) in [(0, 70), (70, half)] {
        st.append(&w.records[a..b], &w.ended_in(a, b)).unwrap();
        st.sync().unwrap();
    }
    st.checkpoint(&snaps[half]).unwrap();
    st.append(&w.records[half..], &w.ended_in(half, 300)).unwrap();
    st.sync().unwrap();
    drop(st);

    let mut st = FsStorage::open(dir.path(), cfg).unwrap();
    let (pipe, report) = recover_from(&mut st).expect("recover");
    assert!(report.is_clean(), "{report}");
    assert!(report.checkpoint);
    assert_eq!(report.replayed, 150, "only the records after the checkpoint replay");
    assert_eq!(pipe.kernel().snapshot(), snaps[300]);
    let r = st.reader();
    let ended: Vec<_> = w.ended_before(300).collect();
    assert!(ended.len() > 10, "the workload must end sessions ({})", ended.len());
    for s in ended {
        let sid = macp_storage::summary_id(s);
        assert_eq!(r.ended(sid).unwrap().as_ref(), Some(s), "summary of {sid}");
        assert_eq!(r.history(sid, 0, u64::MAX).unwrap(), w.history(sid, 300), "history of {sid}");
    }
    for m in pipe.kernel().all_sessions() {
        let h = r.history(&m.session_id, 0, u64::MAX).unwrap();
        assert_eq!(h, w.history(&m.session_id, 300), "history of open {}", m.session_id);
        assert_eq!(r.history(&m.session_id, 1, 2).unwrap(), h[1..2.min(h.len())].to_vec(), "after is exclusive");
    }
    assert!(matches!(st.load(&|| false, &mut |_| Ok(())), Err(StorageError::Misuse(_))));
}

#[test]
fn using_storage_before_recovery_is_an_error_not_a_panic() {
    let dir = TempDir::new("misuse");
    let mut st = FsStorage::open(dir.path(), FsConfig::default()).unwrap();
    assert!(matches!(st.append(&workload(1, 1), &[]), Err(StorageError::Misuse(_))));
    assert!(matches!(st.sync(), Err(StorageError::Misuse(_))));
    assert!(matches!(st.checkpoint(b"x"), Err(StorageError::Misuse(_))));
    assert!(matches!(st.maintain(0), Err(StorageError::Misuse(_))));
}

#[test]
fn oversized_record_poisons_the_backend() {
    let dir = TempDir::new("oversize");
    let mut st = FsStorage::open(dir.path(), FsConfig { max_record_bytes: 64, ..FsConfig::default() }).unwrap();
    recover_from(&mut st).unwrap();
    let err = st.append(&workload(1, 1), &[]).unwrap_err();
    assert!(matches!(err, StorageError::RecordTooLarge { .. }), "{err}");
    assert!(st.is_poisoned());
    assert!(matches!(st.sync(), Err(StorageError::Poisoned)));
    assert!(matches!(st.maintain(0), Err(StorageError::Poisoned)));
    assert!(matches!(st.checkpoint(b"x"), Err(StorageError::Poisoned)));
}

#[test]
fn group_commit_issues_one_fdatasync_per_batch() {
    let fs = SimFs::new();
    let mut st = FsStorage::open_with(fs.clone(), "/d", FsConfig::default()).unwrap();
    recover_from(&mut st).unwrap();
    let w = workload_with_summaries(9, 300);
    let before = fs.sync_counts();
    // A driver drains its queue: many appends (one per kernel step)...
    for (i, r) in w.records.iter().enumerate() {
        st.append(std::slice::from_ref(r), &w.ended_in(i, i + 1)).unwrap();
    }
    // ...then one sync covers them all, summaries included (they go to the
    // index later, from maintain or checkpoint).
    st.sync().unwrap();
    let after = fs.sync_counts();
    assert_eq!(after.0 - before.0, 1, "exactly one fdatasync for the batch");
    assert_eq!(after.1, before.1, "no directory sync without a new segment");
    // An idle sync costs nothing.
    st.sync().unwrap();
    assert_eq!(fs.sync_counts(), after);
    // Indexing the ended sessions from maintain is a non-durable commit: no
    // sync, except one when redb grows its file (it makes a new length
    // durable before a header can name it; growth doubles, so that is rare).
    st.maintain(0).unwrap();
    let maintained = fs.sync_counts();
    assert!(maintained.0 - after.0 <= 1 && maintained.1 == after.1, "{after:?} -> {maintained:?}");
}

#[test]
fn backends_can_move_to_a_driver_task() {
    fn send<T: Send>() {}
    send::<FsStorage>();
    send::<FsStorage<SimFs>>();
    send::<Box<dyn Storage>>();
}

#[test]
fn lowering_the_append_limit_does_not_turn_old_records_into_damage() {
    let dir = TempDir::new("limit");
    let records = workload(4, 30);
    let mut st = fresh(dir.path());
    st.append(&records, &[]).unwrap();
    st.sync().unwrap();
    drop(st);
    let mut st = FsStorage::open(dir.path(), FsConfig { max_record_bytes: 16, ..FsConfig::default() }).unwrap();
    let (pipe, report) = recover_from(&mut st).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(&pipe.kernel().snapshot(), prefix_snapshots(&records).last().unwrap());
}

#[test]
fn a_crash_during_first_initialisation_does_not_brick_the_directory() {
    // Killed after the temporary marker was written but before the rename.
    let dir = TempDir::new("half-init");
    std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
    std::fs::write(dir.path().join(format!("{FORMAT_FILE}.tmp")), "macp-rs-da").unwrap();
    let st = fresh(dir.path());
    drop(st);
    assert_eq!(std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(), "macp-rs-data 2\n");
}

#[test]
fn a_reader_left_behind_is_closed_not_pointed_at_a_new_owner() {
    let dir = TempDir::new("closed");
    let mut st = fresh(dir.path());
    let w = workload_with_summaries(2, 60);
    st.append(&w.records, &w.ended_in(0, 60)).unwrap();
    st.checkpoint(&prefix_snapshots(&w.records)[60]).unwrap();
    let old = st.reader();
    let sid = macp_storage::summary_id(w.ended_before(60).next().expect("an ended session")).to_string();
    assert!(old.ended(&sid).unwrap().is_some());
    drop(st);
    let _new = fresh(dir.path());
    assert!(matches!(old.ended(&sid), Err(StorageError::Closed)), "the old reader must not use the index");
}

/// A shutdown during a long recovery stops it promptly: `cancelled` is
/// polled while the tail replays, and loading returns Cancelled.
#[test]
fn loading_stops_when_cancelled() {
    use macp_storage::suite::record;
    let fs = SimFs::new();
    let mut st = FsStorage::open_with(fs.clone(), "/d", FsConfig::default()).unwrap();
    recover_from(&mut st).unwrap();
    for chunk in (1..=20_000u64).collect::<Vec<_>>().chunks(1_000) {
        let records: Vec<_> = chunk.iter().map(|&n| record(n, 1)).collect();
        st.append(&records, &[]).unwrap();
    }
    st.sync().unwrap();
    drop(st);
    let mut st = FsStorage::open_with(fs, "/d", FsConfig::default()).unwrap();
    let polls = std::cell::Cell::new(0u32);
    let mut seen = 0u64;
    let r = st.load(
        &|| {
            polls.set(polls.get() + 1);
            polls.get() > 3
        },
        &mut |_| {
            seen += 1;
            Ok(())
        },
    );
    assert!(matches!(r, Err(StorageError::Cancelled)), "{r:?}");
    assert!(seen < 5_000, "stopped within a few thousand records, not at the end ({seen})");
    assert!(matches!(st.append(&[], &[]), Err(StorageError::Misuse(_))), "a cancelled load leaves it unloaded");
}
