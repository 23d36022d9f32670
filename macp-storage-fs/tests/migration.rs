//! Format 1 data directories (no index; a checkpoint holding every session
//! in a kernel snapshot format this build no longer restores) are migrated
//! on open, not refused: the whole log replays, recovery hands back every
//! ended session, and the first checkpoint writes format 2. A crash at any
//! point of the migration leaves a directory that migrates again.

mod common;

use std::path::{Path, PathBuf};

use common::{prefix_snapshots, recover_from, Gen, Workload};
use macp_kernel::macp_wire::Message as _;
use macp_storage::{summary_id, Retention, Storage};
use macp_storage_fs::{FsConfig, FsStorage, SimFs, Vfs, VfsFile, FORMAT_FILE};

const DIR: &str = "/v1";

/// Sessions that end, sessions that stay open, a registry record.
fn history() -> Workload {
    let mut g = Gen::new(3);
    let open: Vec<String> = (0..3).map(|_| g.start(3_600_000)).collect();
    for i in 0..8 {
        let s = g.start(600_000);
        g.note(&s, "A", 20);
        if i % 4 != 3 {
            g.commit(&s);
        }
        g.note(&open[i % 3], "I", 10);
    }
    g.advance(1_000);
    g.workload()
}

/// A frame as format 1 wrote it (the same framing format 2 reads).
fn v1_frame(segment: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + payload.len());
    h.extend_from_slice(b"MREC");
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    h.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let mut pos = Vec::new();
    pos.extend_from_slice(&segment.to_le_bytes());
    pos.extend_from_slice(&offset.to_le_bytes());
    pos.extend_from_slice(&h[..12]);
    h.extend_from_slice(&crc32c::crc32c(&pos).to_le_bytes());
    h.extend_from_slice(payload);
    h
}

fn put(fs: &SimFs, path: &Path, bytes: &[u8]) {
    let f = fs.open(path, true).expect("create");
    f.write_all_at(bytes, 0).expect("write");
    f.sync_data().expect("sync");
}

/// A format-1 directory holding `w`'s records in segments of about 1 KiB,
/// and a format-1 checkpoint.
fn v1_dir(w: &Workload) -> SimFs {
    let fs = SimFs::new();
    put(&fs, &Path::new(DIR).join(FORMAT_FILE), b"macp-rs-data 1\n");
    put(&fs, &Path::new(DIR).join("LOCK"), b"");
    let mut ck = b"MACPCKP1".to_vec();
    ck.extend_from_slice(&[7u8; 64]);
    put(&fs, &Path::new(DIR).join("checkpoint"), &ck);
    let mut segment = 1u64;
    let mut bytes = Vec::new();
    let flush = |segment: u64, bytes: &[u8]| {
        let p: PathBuf = Path::new(DIR).join("wal").join(format!("{segment:020}.seg"));
        put(&fs, &p, bytes);
    };
    for r in &w.records {
        if bytes.is_empty() {
            bytes.extend_from_slice(b"MACPSEG1");
            bytes.extend_from_slice(&segment.to_le_bytes());
        }
        let frame = v1_frame(segment, bytes.len() as u64, &r.encode_to_vec());
        bytes.extend_from_slice(&frame);
        if bytes.len() > 1024 {
            flush(segment, &bytes);
            bytes.clear();
            segment += 1;
        }
    }
    if !bytes.is_empty() {
        flush(segment, &bytes);
    }
    assert!(segment >= 3, "the history spans several segments");
    fs.sync_dir(Path::new(DIR)).expect("sync");
    fs.sync_dir(&Path::new(DIR).join("wal")).expect("sync");
    fs
}

fn format_on_disk(fs: &SimFs) -> String {
    String::from_utf8(fs.read_file(&Path::new(DIR).join(FORMAT_FILE)).expect("FORMAT")).expect("text")
}

fn cfg() -> FsConfig {
    FsConfig { segment_bytes: 1024, retention: Retention::from_secs(1), ..FsConfig::default() }
}

/// Every ended session readable with its whole history.
fn check_ended(st: &FsStorage<SimFs>, w: &Workload, what: &str) {
    let n = w.records.len();
    let r = st.reader();
    let mut count = 0;
    for s in w.ended_before(n) {
        let sid = summary_id(s);
        assert_eq!(r.ended(sid).expect("ended").as_ref(), Some(s), "{what}: summary of {sid}");
        assert_eq!(r.history(sid, 0, u64::MAX).expect("history"), w.history(sid, n), "{what}: history of {sid}");
        count += 1;
    }
    assert!(count >= 5, "{what}: the history must end sessions");
    assert_eq!(r.list_ended(None, 100).expect("list").len(), count, "{what}");
}

#[test]
fn a_format_1_directory_is_migrated_on_open() {
    let w = history();
    let snaps = prefix_snapshots(&w.records);
    let n = w.records.len();
    let fs = v1_dir(&w);
    let mut st = FsStorage::open_with(fs.clone(), DIR, cfg()).expect("a format-1 directory opens");
    assert_eq!(st.format(), 1);
    let (pipe, report) = recover_from(&mut st).expect("migrating recovery");
    assert!(report.is_clean() && !report.checkpoint, "the format-1 checkpoint is ignored: {report}");
    assert_eq!(report.replayed as usize, n, "the whole log replays");
    assert_eq!(report.ended as usize, w.ended_before(n).count());
    assert_eq!(pipe.kernel().snapshot(), snaps[n]);
    check_ended(&st, &w, "after recovery");
    // Nothing is deleted while the directory is still format 1 (a crash
    // would replay the whole log again).
    let m = st.maintain(i64::MAX / 2).expect("maintain");
    assert_eq!((m.expired_sessions, m.retired_segments), (0, 0), "{m:?}");
    assert_eq!(format_on_disk(&fs), "macp-rs-data 1\n");
    st.checkpoint(&pipe.kernel().snapshot()).expect("the first checkpoint");
    assert_eq!(format_on_disk(&fs), "macp-rs-data 2\n", "the first checkpoint completes the migration");
    assert_eq!(st.format(), 2);
    drop(st);

    let mut st = FsStorage::open_with(fs, DIR, FsConfig::default()).expect("reopen");
    let (pipe, report) = recover_from(&mut st).expect("recover");
    assert!(report.checkpoint && report.replayed == 0 && report.is_clean(), "{report}");
    assert_eq!(pipe.kernel().snapshot(), snaps[n]);
    check_ended(&st, &w, "after the migration");
}

#[test]
fn a_crash_during_migration_migrates_again() {
    let w = history();
    let snaps = prefix_snapshots(&w.records);
    let n = w.records.len();
    // Returns the operations done before the storage is dropped (a fault
    // after that hits only the index's clean close).
    let migrate = |fs: &SimFs| -> Result<u64, String> {
        let mut st = FsStorage::open_with(fs.clone(), DIR, cfg()).map_err(|e| e.to_string())?;
        let (pipe, _) = recover_from(&mut st).map_err(|e| e.to_string())?;
        st.maintain(0).map_err(|e| e.to_string())?;
        st.checkpoint(&pipe.kernel().snapshot()).map_err(|e| e.to_string())?;
        Ok(fs.ops())
    };
    let dry = v1_dir(&w);
    let base = dry.ops();
    let total = migrate(&dry).expect("the dry run migrates") - base;
    let mut formats = [0usize; 3];
    for k in 0..total {
        let fs = v1_dir(&w);
        fs.fail_at(fs.ops() + k);
        assert!(migrate(&fs).is_err(), "op {k} of {total} must fail the migration");
        for seed in 0..2 {
            let what = format!("crash at migration op {k}/{total} image {seed}");
            let image = fs.crash_image(k * 7 + seed);
            let mut st = FsStorage::open_with(image.clone(), DIR, cfg()).unwrap_or_else(|e| panic!("{what}: {e}"));
            formats[st.format() as usize] += 1;
            let (pipe, report) = recover_from(&mut st).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(report.is_clean(), "{what}: {report}");
            assert_eq!(pipe.kernel().snapshot(), snaps[n], "{what}");
            check_ended(&st, &w, &what);
            st.checkpoint(&pipe.kernel().snapshot()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(format_on_disk(&image), "macp-rs-data 2\n", "{what}");
        }
    }
    eprintln!("crash points: {total}; reopened as format 1: {}, format 2: {}", formats[1], formats[2]);
    assert!(formats[1] > 0 && formats[2] > 0, "crashes before and after the format switch");
}
