//! What the backend promises about size: memory follows open sessions (not
//! sessions ever), disk follows retention, each `maintain` call does a
//! bounded amount of work, compaction frees segments a long-open session
//! pins, and reopening the index after a power cut reads a bounded amount.
//! None of these is a timed assertion: they count entries, files and bytes.

mod common;

use std::time::Duration;

use common::TempDir;
use macp_storage::suite::{record, sid, summary};
use macp_storage::{LoadEvent, Maintenance, Retention, Storage};
use macp_storage_fs::{FsConfig, FsStats, FsStorage, SimFs, Vfs};

fn load(s: &mut dyn Storage) -> usize {
    let mut n = 0;
    s.load(&|| false, &mut |ev| {
        if let LoadEvent::Record { .. } = ev {
            n += 1;
        }
        Ok(())
    })
    .expect("load");
    n
}

fn maintain_until_idle(s: &mut dyn Storage, now: i64) -> Maintenance {
    let mut total = Maintenance::default();
    for _ in 0..100_000 {
        let m = s.maintain(now).expect("maintain");
        total.expired_sessions += m.expired_sessions;
        total.retired_segments += m.retired_segments;
        total.carried_records += m.carried_records;
        total.bytes = m.bytes;
        if !m.more {
            return total;
        }
    }
    panic!("maintenance never finished");
}

/// Session `n` starts at time `n` ms and ends right away with two records;
/// `OPEN` sessions stay open alongside, each replaced as it ends.
const OPEN: u64 = 10;

/// Drives 100,000 sessions through the backend, in batches of 100 with one
/// sync each, a `maintain` per batch and a checkpoint every 10 batches.
/// Returns the largest stats seen after a maintain.
fn churn(st: &mut FsStorage, sessions: u64, now_of: impl Fn(u64) -> i64) -> FsStats {
    let mut worst = FsStats::default();
    let batch = 100;
    for b in 0..sessions / batch {
        let mut records = Vec::new();
        let mut ended = Vec::new();
        for n in b * batch + 1..=(b + 1) * batch {
            // Session n is started; session n - OPEN ends.
            records.push(record(n, 1));
            if n > OPEN {
                let e = n - OPEN;
                records.push(record(e, 2));
                ended.push(summary(e, 2, now_of(e)));
            }
        }
        st.append(&records, &ended).expect("append");
        st.sync().expect("sync");
        if b % 10 == 9 {
            st.checkpoint(format!("open state after batch {b}").as_bytes()).expect("checkpoint");
        }
        st.maintain(now_of((b + 1) * batch)).expect("maintain");
        let s = st.stats();
        worst.open_sessions = worst.open_sessions.max(s.open_sessions);
        worst.open_records = worst.open_records.max(s.open_records);
        worst.pending_ended = worst.pending_ended.max(s.pending_ended);
        worst.segments = worst.segments.max(s.segments);
        worst.indexed_segments = worst.indexed_segments.max(s.indexed_segments);
        worst.pinned_segments = worst.pinned_segments.max(s.pinned_segments);
        worst.carry_queue = worst.carry_queue.max(s.carry_queue);
        worst.open_files = worst.open_files.max(s.open_files);
    }
    worst
}

/// The acceptance test: after 100,000 sessions ended, the
/// backend's in-memory structures hold O(open) entries — whatever the
/// retention; with `forever` only the per-segment table grows, one entry
/// per segment file on disk (64 MiB each by default).
#[test]
fn memory_does_not_grow_with_ended_sessions() {
    for retention in [Retention::Forever, Retention::For(Duration::from_secs(2))] {
        let dir = TempDir::new("bounded-memory");
        let cfg = FsConfig { segment_bytes: 1 << 20, retention, ..FsConfig::default() };
        let mut st = FsStorage::open(dir.path(), cfg).expect("open");
        load(&mut st);
        // One session ends per millisecond of kernel time.
        let worst = churn(&mut st, 100_000, |n| n as i64);
        eprintln!("{retention}: worst {worst:?}, now {:?}", st.stats());
        assert!(worst.open_sessions <= OPEN as usize + 100, "{worst:?}");
        assert!(worst.open_records <= 2 * (OPEN as usize + 100), "{worst:?}");
        assert!(worst.pending_ended <= 200, "maintain keeps up with one batch: {worst:?}");
        assert!(worst.open_files <= 64 && worst.carry_queue <= 200, "{worst:?}");
        let files = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
        assert_eq!(st.stats().segments, files, "one entry per segment file, no more");
        match retention {
            Retention::Forever => {
                assert!(files >= 5, "the log grew ({files} segments)");
                // Every ended session is still there, from the index.
                let r = st.reader();
                assert_eq!(r.ended(&sid(1)).unwrap(), Some(summary(1, 2, 1)));
                assert_eq!(r.history(&sid(1), 0, 9).unwrap(), vec![record(1, 1), record(1, 2)]);
                assert_eq!(r.list_ended(None, 3).unwrap().len(), 3);
            }
            Retention::For(_) => {
                assert!(worst.segments <= 6, "retired segments keep the log short: {worst:?}");
                assert_eq!(st.reader().ended(&sid(1)).unwrap(), None, "past retention");
            }
        }
        // A restart brings back the open sessions only, from the checkpoint
        // and the tail.
        drop(st);
        let mut st = FsStorage::open(dir.path(), FsConfig { retention, ..FsConfig::default() }).expect("reopen");
        let replayed = load(&mut st);
        assert!(replayed < 2_000, "only the tail after the last checkpoint replays ({replayed})");
        assert!(st.stats().open_sessions <= OPEN as usize + 100, "{:?}", st.stats());
    }
}

/// With a retention, the log's disk use stops growing: old segments are
/// retired as their sessions expire; with `forever` nothing is deleted.
#[test]
fn disk_follows_retention() {
    let dir = TempDir::new("bounded-disk");
    let cfg =
        FsConfig { segment_bytes: 64 << 10, retention: Retention::For(Duration::from_secs(1)), ..FsConfig::default() };
    let mut st = FsStorage::open(dir.path(), cfg).expect("open");
    load(&mut st);
    let mut sizes = Vec::new();
    for round in 0..4u64 {
        churn_round(&mut st, round);
        sizes.push(maintain_until_idle(&mut st, (round as i64 + 1) * 20_000).bytes);
    }
    eprintln!("bytes after each round: {sizes:?}");
    // The later rounds hold about as much as the first (each round's
    // sessions replace the last round's), not four times as much.
    assert!(sizes[3] < sizes[0] * 2, "{sizes:?}");
}

fn churn_round(st: &mut FsStorage, round: u64) {
    for b in 0..20u64 {
        let base = round * 10_000 + b * 100;
        let records: Vec<_> = (base + 1..=base + 100).flat_map(|n| [record(n, 1), record(n, 2)]).collect();
        let ended: Vec<_> = (base + 1..=base + 100).map(|n| summary(n, 2, round as i64 * 20_000 + b as i64)).collect();
        st.append(&records, &ended).expect("append");
        st.sync().expect("sync");
    }
    st.checkpoint(b"open state").expect("checkpoint");
}

/// Each `maintain` call deletes at most `maintain_sessions` sessions and
/// says when more is waiting; the calls together delete everything due.
#[test]
fn each_maintain_call_does_a_bounded_amount_of_work() {
    let dir = TempDir::new("bounded-maintain");
    let cfg =
        FsConfig { retention: Retention::For(Duration::from_secs(1)), maintain_sessions: 100, ..FsConfig::default() };
    let mut st = FsStorage::open(dir.path(), cfg).expect("open");
    load(&mut st);
    let ended: Vec<_> = (1..=1_000u64).map(|n| summary(n, 1, 5)).collect();
    let records: Vec<_> = (1..=1_000u64).map(|n| record(n, 1)).collect();
    st.append(&records, &ended).expect("append");
    st.checkpoint(b"cp").expect("checkpoint");
    assert_eq!(st.stats().pending_ended, 0, "a checkpoint indexes every ended session");
    let mut calls = 0;
    let mut deleted = 0;
    loop {
        let m = st.maintain(1_000_000).expect("maintain");
        calls += 1;
        assert!(m.expired_sessions <= 100, "{m:?}");
        deleted += m.expired_sessions;
        if !m.more {
            break;
        }
    }
    assert_eq!(deleted, 1_000);
    assert!(calls >= 10, "{calls} calls");
    assert_eq!(st.reader().list_ended(None, 10).unwrap(), vec![]);
}

/// A session suspended for "days" pins the segment its records sit in;
/// compaction carries them forward, the next checkpoint unpins the segment
/// and it is retired. The session's history reads the same before, after,
/// and after a restart (from the checkpoint, and from the carried copies in
/// the tail when the restart comes before the next checkpoint).
#[test]
fn compaction_frees_segments_pinned_by_a_long_open_session() {
    let dir = TempDir::new("bounded-carry");
    let cfg =
        FsConfig { segment_bytes: 4 << 10, retention: Retention::For(Duration::from_secs(1)), ..FsConfig::default() };
    let mut st = FsStorage::open(dir.path(), cfg.clone()).expect("open");
    load(&mut st);
    let long = 1u64;
    let long_history = vec![record(long, 1), record(long, 2), record(long, 3)];
    st.append(&long_history, &[]).expect("append");
    st.sync().expect("sync");
    // A reader keeps reading the open session's history while its records
    // move and their old segments go: it must never see an error or a gap.
    let reader = st.reader();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, want) = (stop.clone(), long_history.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(reader.history(&sid(1), 0, 9).expect("history while compacting"), want);
                reads += 1;
            }
            reads
        })
    };
    let mut carried = 0;
    let mut retired = 0;
    for round in 0..6u64 {
        let base = 100 + round * 100;
        let records: Vec<_> = (base..base + 60).flat_map(|n| [record(n, 1), record(n, 2)]).collect();
        let ended: Vec<_> = (base..base + 60).map(|n| summary(n, 2, round as i64 * 10_000)).collect();
        st.append(&records, &ended).expect("append");
        st.checkpoint(b"cp").expect("checkpoint");
        let m = maintain_until_idle(&mut st, (round as i64 + 1) * 10_000);
        carried += m.carried_records;
        retired += m.retired_segments;
        assert_eq!(st.reader().history(&sid(long), 0, 9).unwrap(), long_history, "round {round}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = watcher.join().expect("the reader saw no error");
    assert!(reads > 0);
    assert!(carried >= 3, "the open session's records were carried ({carried})");
    assert!(retired >= 2, "segments retired ({retired})");
    let first = dir.path().join("wal").join(format!("{:020}.seg", 1));
    assert!(!first.exists(), "the segment the open session pinned is gone");
    // Carry once more, then restart before any checkpoint: the carried
    // copies in the tail move the locations the checkpoint names.
    let records: Vec<_> = (5_000..5_060u64).flat_map(|n| [record(n, 1), record(n, 2)]).collect();
    let ended: Vec<_> = (5_000..5_060u64).map(|n| summary(n, 2, 70_000)).collect();
    st.append(&records, &ended).expect("append");
    st.checkpoint(b"cp").expect("checkpoint");
    let m = maintain_until_idle(&mut st, 90_000);
    eprintln!("last round: {m:?}");
    drop(st);
    let mut st = FsStorage::open(dir.path(), cfg).expect("reopen");
    load(&mut st);
    assert_eq!(st.reader().history(&sid(long), 0, 9).unwrap(), long_history, "after a restart");
}

/// Opening the index after a power cut loads redb's recorded allocator
/// state instead of walking the file: the bytes read stay far below the
/// index's size (and do not grow with it).
#[test]
fn index_open_after_a_power_cut_reads_a_bounded_amount() {
    let fs = SimFs::new();
    let cfg = FsConfig { segment_bytes: 1 << 20, ..FsConfig::default() };
    let mut st = FsStorage::open_with(fs.clone(), "/d", cfg.clone()).expect("open");
    load(&mut st);
    let mut reads = Vec::new();
    let mut n = 0u64;
    // `count` more sessions of one record end; the index takes them.
    let end_sessions = |st: &mut FsStorage<SimFs>, n: &mut u64, count: u64| {
        let records: Vec<_> = (*n + 1..=*n + count).map(|k| record(k, 1)).collect();
        let ended: Vec<_> = (*n + 1..=*n + count).map(|k| summary(k, 1, k as i64)).collect();
        *n += count;
        st.append(&records, &ended).expect("append");
        st.sync().expect("sync");
        st.maintain(0).expect("maintain");
    };
    for round in 0..3 {
        for _ in 0..10 {
            end_sessions(&mut st, &mut n, 1_000);
        }
        st.checkpoint(b"cp").expect("checkpoint");
        // Non-durable index commits after the checkpoint, then the power cut.
        end_sessions(&mut st, &mut n, 500);
        let image = st.vfs().crash_image(round);
        drop(st);
        let index_bytes = image.read_file(std::path::Path::new("/d/index.redb")).map_or(0, |b| b.len());
        let before = image.bytes_read();
        st = FsStorage::open_with(image.clone(), "/d", cfg.clone()).expect("reopen after the power cut");
        let read = image.bytes_read() - before;
        eprintln!("round {round}: index {index_bytes} bytes, opening read {read} bytes");
        reads.push((index_bytes, read));
        load(&mut st);
        // The sessions ended before the checkpoint are all there.
        assert!(st.reader().ended(&sid(n - 600)).unwrap().is_some());
        let _ = image.exists(std::path::Path::new("/d"));
    }
    let (last_size, last_read) = *reads.last().unwrap();
    assert!(last_size > 2 << 20, "the index must be big enough to tell ({last_size} bytes)");
    assert!(last_read < 128 << 10, "opening read {last_read} of {last_size} bytes");
    assert!(reads[2].1 < reads[0].1 * 3 + 65_536, "opening cost does not follow the index size: {reads:?}");
}
