//! Preallocated segments (see the crate docs): the active segment's file
//! is reserved to `segment_bytes` up front, so its tail is zeros after the
//! log's logical end. A restart — after a clean stop or a power cut — must
//! recover exactly the records written (the zeros are neither records nor
//! damage nor a torn tail), reserve the segment again and keep appending;
//! sealed segments end with their last frame, byte for byte as without
//! preallocation; a file system without `fallocate` falls back to growing
//! files.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::{prefix_snapshots, recover_from, workload_with_summaries, TempDir, Workload};
use macp_storage::{Storage, StorageRead};
use macp_storage_fs::{FsConfig, FsStorage, LogItem, SimFs, Vfs, WAL_DIR};

const SEG: u64 = 2048;

fn cfg() -> FsConfig {
    FsConfig { segment_bytes: SEG, ..FsConfig::default() }
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(WAL_DIR).join(format!("{n:020}.seg"))
}

/// Just past the last frame of a segment's bytes (frames chained by their
/// length fields; a zero length — the reservation's zeros — ends them).
fn logical_end(bytes: &[u8]) -> usize {
    let mut at = 16;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        at += 16 + len;
    }
    at
}

/// The segment files of `dir` on `fs`, ascending: (number, bytes).
fn segments<V: Vfs>(fs: &V, dir: &Path, read: impl Fn(&Path) -> Vec<u8>) -> Vec<(u64, Vec<u8>)> {
    let wal = dir.join(WAL_DIR);
    let mut out: Vec<(u64, Vec<u8>)> = fs
        .list_dir(&wal)
        .unwrap()
        .iter()
        .filter_map(|n| n.strip_suffix(".seg").and_then(|d| d.parse().ok()))
        .map(|n| (n, read(&seg_path(dir, n))))
        .collect();
    out.sort_by_key(|(n, _)| *n);
    out
}

fn sim_segments(fs: &SimFs, dir: &Path) -> Vec<(u64, Vec<u8>)> {
    segments(fs, dir, |p| fs.read_file(p).expect("segment"))
}

fn real_segments(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    segments(&macp_storage_fs::RealFs, dir, |p| std::fs::read(p).expect("segment"))
}

/// Sealed segments end with their last frame; the last one is reserved to
/// `SEG` (when `reserved`) with zeros after its last frame.
fn check_layout(segs: &[(u64, Vec<u8>)], reserved: bool) {
    let (last, sealed) = segs.split_last().expect("segments");
    assert!(!sealed.is_empty(), "the workload must roll segments");
    for (n, b) in sealed {
        assert_eq!(logical_end(b), b.len(), "sealed segment {n} must end with its last frame");
    }
    let (n, b) = last;
    let end = logical_end(b);
    assert!(b[end..].iter().all(|&x| x == 0), "segment {n}: only zeros after the last frame");
    if reserved {
        assert_eq!(b.len() as u64, SEG.max(end as u64), "the active segment {n} is reserved");
    } else {
        assert_eq!(b.len(), end, "without fallocate the active segment {n} ends with its last frame");
    }
}

/// Recovers and checks that exactly `records[..m]` came back.
fn recover_exactly<V: Vfs>(st: &mut FsStorage<V>, w: &Workload, snaps: &[Vec<u8>], m: usize, what: &str) {
    let (pipe, report) = recover_from(st).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(report.is_clean(), "{what}: {report}");
    assert!(report.torn_tail.is_none(), "{what}: zeros after the last frame are not a torn tail: {report}");
    assert_eq!(pipe.kernel().snapshot(), snaps[m], "{what}: state after {m} records");
    check_histories(&*st.reader(), w, m, what);
}

fn check_histories(r: &dyn StorageRead, w: &Workload, m: usize, what: &str) {
    let mut sids: Vec<&str> = w.records.iter().map(|x| x.session_id.as_str()).filter(|s| !s.is_empty()).collect();
    sids.sort_unstable();
    sids.dedup();
    for sid in sids {
        assert_eq!(r.history(sid, 0, u64::MAX).expect("history"), w.history(sid, m), "{what}: history of {sid}");
    }
}

#[test]
fn clean_restart_with_a_reserved_active_segment_recovers_exactly_and_keeps_appending() {
    let dir = TempDir::new("prealloc-clean");
    let w = workload_with_summaries(3, 60);
    let snaps = prefix_snapshots(&w.records);
    {
        let mut st = FsStorage::open(dir.path(), cfg()).expect("open");
        recover_exactly(&mut st, &w, &snaps, 0, "fresh");
        st.append(&w.records[..30], &w.ended_in(0, 30)).expect("append");
        st.sync().expect("sync");
    }
    check_layout(&real_segments(dir.path()), true);
    {
        let mut st = FsStorage::open(dir.path(), cfg()).expect("reopen");
        recover_exactly(&mut st, &w, &snaps, 30, "after a clean stop");
        // Reserved again, and appends continue at the logical end.
        check_layout(&real_segments(dir.path()), true);
        st.append(&w.records[30..], &w.ended_in(30, 60)).expect("append after the restart");
        st.sync().expect("sync after the restart");
        check_histories(&*st.reader(), &w, 60, "before the second stop");
    }
    check_layout(&real_segments(dir.path()), true);
    let mut st = FsStorage::open(dir.path(), cfg()).expect("reopen");
    recover_exactly(&mut st, &w, &snaps, 60, "after the second stop");
}

#[test]
fn read_only_tools_see_no_damage_and_no_torn_tail_in_the_reservation() {
    let dir = TempDir::new("prealloc-ro");
    let w = workload_with_summaries(4, 40);
    let snaps = prefix_snapshots(&w.records);
    {
        let mut st = FsStorage::open(dir.path(), cfg()).expect("open");
        recover_from(&mut st).expect("recover");
        st.append(&w.records, &w.ended_in(0, 40)).expect("append");
        st.sync().expect("sync");
    }
    let before = real_segments(dir.path());
    check_layout(&before, true);
    let mut st = FsStorage::open_read_only(dir.path(), cfg()).expect("open read-only");
    let mut records = 0;
    st.scan_log(&mut |item| {
        match item {
            LogItem::Record { .. } => records += 1,
            LogItem::Damage(d) => panic!("the reservation is not damage: {d:?}"),
            LogItem::TornTail { pos, bytes } => panic!("the reservation is not a torn tail: {pos:?} {bytes}"),
            LogItem::Carried { .. } | LogItem::SegmentEnd { .. } => {}
        }
        ControlFlow::Continue(())
    })
    .expect("scan");
    assert_eq!(records, 40);
    recover_exactly(&mut st, &w, &snaps, 40, "read-only");
    drop(st);
    assert_eq!(real_segments(dir.path()), before, "a read-only open changes nothing on disk");
}

#[test]
fn power_cut_with_a_reserved_active_segment_recovers_the_synced_records_and_keeps_appending() {
    let w = workload_with_summaries(5, 40);
    let snaps = prefix_snapshots(&w.records);
    // Small write buffer: unsynced appends reach the file before the cut.
    let cfg = FsConfig { write_buffer_bytes: 300, ..cfg() };
    let mut lost = 0;
    for seed in 0..64u64 {
        let what = format!("seed {seed}");
        let fs = SimFs::new();
        let mut st = FsStorage::open_with(fs.clone(), "/d", cfg.clone()).expect("open");
        recover_from(&mut st).expect("recover");
        st.append(&w.records[..20], &w.ended_in(0, 20)).expect("append");
        st.sync().expect("sync");
        st.append(&w.records[20..30], &w.ended_in(20, 30)).expect("append, not synced");
        let image = fs.crash_image(seed);
        drop(st);
        let mut st = FsStorage::open_with(image.clone(), "/d", cfg.clone()).expect("reopen");
        let (pipe, report) = recover_from(&mut st).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(report.is_clean(), "{what}: {report}");
        let snap = pipe.kernel().snapshot();
        let r = st.reader();
        let m = (20..=30)
            .find(|&m| {
                snaps[m] == snap
                    && w.records[..30].iter().all(|x| {
                        x.session_id.is_empty()
                            || r.history(&x.session_id, 0, u64::MAX).unwrap() == w.history(&x.session_id, m)
                    })
            })
            .unwrap_or_else(|| panic!("{what}: not a prefix of the appended records with every synced one"));
        lost += usize::from(m < 30);
        // Reserved again; appending goes on from the logical end.
        check_layout(&sim_segments(&image, Path::new("/d")), true);
        st.append(&w.records[m..], &w.ended_in(m, 40)).expect("append after recovery");
        st.sync().expect("sync after recovery");
        drop(st);
        let mut st = FsStorage::open_with(image.clone(), "/d", cfg.clone()).expect("reopen");
        recover_exactly(&mut st, &w, &snaps, 40, &format!("{what}, after continuing"));
    }
    assert!(lost > 0, "the crash model never dropped an unsynced write: it is not testing");
}

#[test]
fn sealed_segments_are_byte_identical_to_unreserved_ones() {
    let w = workload_with_summaries(6, 50);
    let run = |allocate: bool| {
        let fs = SimFs::new();
        fs.set_allocate_supported(allocate);
        let mut st = FsStorage::open_with(fs.clone(), "/d", cfg()).expect("open");
        recover_from(&mut st).expect("recover");
        for (i, chunk) in w.records.chunks(7).enumerate() {
            st.append(chunk, &w.ended_in(i * 7, i * 7 + chunk.len())).expect("append");
            st.sync().expect("sync");
        }
        drop(st);
        sim_segments(&fs, Path::new("/d"))
    };
    let reserved = run(true);
    let grown = run(false);
    check_layout(&reserved, true);
    check_layout(&grown, false);
    assert_eq!(reserved.len(), grown.len());
    let (last_r, sealed_r) = reserved.split_last().unwrap();
    let (last_g, sealed_g) = grown.split_last().unwrap();
    assert_eq!(sealed_r, sealed_g, "sealed segments do not depend on preallocation");
    assert_eq!(&last_r.1[..last_g.1.len()], &last_g.1[..], "the active segment holds the same frames");
}

#[test]
fn fallocate_unsupported_falls_back_to_growing_files() {
    let w = workload_with_summaries(7, 50);
    let snaps = prefix_snapshots(&w.records);
    let fs = SimFs::new();
    fs.set_allocate_supported(false);
    {
        let mut st = FsStorage::open_with(fs.clone(), "/d", cfg()).expect("open");
        recover_exactly(&mut st, &w, &snaps, 0, "fresh");
        st.append(&w.records[..25], &w.ended_in(0, 25)).expect("append");
        st.sync().expect("sync");
    }
    check_layout(&sim_segments(&fs, Path::new("/d")), false);
    {
        let mut st = FsStorage::open_with(fs.clone(), "/d", cfg()).expect("reopen");
        recover_exactly(&mut st, &w, &snaps, 25, "after a clean stop, no fallocate");
        st.append(&w.records[25..], &w.ended_in(25, 50)).expect("append");
        st.sync().expect("sync");
        // A power cut after the sync: everything is there.
        let image = fs.crash_image(9);
        drop(st);
        let mut st = FsStorage::open_with(image, "/d", cfg()).expect("reopen after the cut");
        recover_exactly(&mut st, &w, &snaps, 50, "after a power cut, no fallocate");
    }
    check_layout(&sim_segments(&fs, Path::new("/d")), false);
}

#[test]
fn at_most_one_write_into_reserved_space_between_syncs() {
    // A batch bigger than the write buffer is written in several pieces;
    // into reserved space each piece but the last is synced before the
    // next is written, so a power cut can only tear the end.
    let w = workload_with_summaries(8, 30);
    let cfg = FsConfig { segment_bytes: 1 << 20, write_buffer_bytes: 300, ..FsConfig::default() };
    let syncs = |allocate: bool| {
        let fs = SimFs::new();
        fs.set_allocate_supported(allocate);
        let mut st = FsStorage::open_with(fs.clone(), "/d", cfg.clone()).expect("open");
        recover_from(&mut st).expect("recover");
        let before = fs.sync_counts().0;
        st.append(&w.records, &w.ended_in(0, 30)).expect("append");
        st.sync().expect("sync");
        fs.sync_counts().0 - before
    };
    let bytes: usize = w.records.iter().map(|r| 16 + macp_kernel::macp_wire::Message::encoded_len(r)).sum();
    let pieces = (bytes / 300) as u64;
    assert!(pieces > 3, "the batch must span several write buffers ({bytes} bytes)");
    assert_eq!(syncs(false), 1, "growing files: one sync per batch");
    // Each piece is at least a buffer-full, so at most `pieces` of them.
    let reserved = syncs(true);
    assert!(reserved > 2 && reserved <= pieces, "reserved: a sync per buffer-full ({reserved}, pieces {pieces})");
}

#[test]
fn a_torn_write_before_the_zeros_is_a_torn_tail_of_its_own_length() {
    let w = workload_with_summaries(9, 20);
    let snaps = prefix_snapshots(&w.records);
    let fs = SimFs::new();
    let big = FsConfig { segment_bytes: 1 << 16, ..FsConfig::default() };
    {
        let mut st = FsStorage::open_with(fs.clone(), "/d", big.clone()).expect("open");
        recover_from(&mut st).expect("recover");
        st.append(&w.records, &w.ended_in(0, 20)).expect("append");
        st.sync().expect("sync");
    }
    let path = seg_path(Path::new("/d"), 1);
    let mut bytes = fs.read_file(&path).expect("segment");
    assert_eq!(bytes.len(), 1 << 16);
    let end = logical_end(&bytes);
    // Half a frame's header and payload, as a cut write leaves it.
    let torn: Vec<u8> = bytes[16..16 + 40].to_vec();
    bytes[end..end + 40].copy_from_slice(&torn);
    fs.write_file_durable(&path, bytes);
    let mut st = FsStorage::open_with(fs.clone(), "/d", big).expect("reopen");
    let (pipe, report) = recover_from(&mut st).expect("recover");
    let t = report.torn_tail.as_ref().unwrap_or_else(|| panic!("a torn tail: {report}"));
    assert_eq!((t.segment, t.offset, t.dropped_bytes), (1, end as u64, 40), "{report}");
    assert!(report.damage.is_empty(), "{report}");
    assert_eq!(pipe.kernel().snapshot(), snaps[20]);
    // Cut, then reserved again: zeros after the last frame.
    let bytes = fs.read_file(&path).expect("segment");
    assert_eq!((bytes.len(), logical_end(&bytes)), (1 << 16, end));
    assert!(bytes[end..].iter().all(|&b| b == 0));
}
