//! Damage that is not a crash-torn tail: in the log after the checkpoint it
//! must be reported with segment and offset at load, the sessions it
//! touches quarantined (by the pipeline's recovery) and everything else
//! recovered exactly (DECISIONS 16). In history before the checkpoint it is
//! not looked for at load (a restart does not read history); the read that
//! meets it fails with segment and offset. Arbitrary damage to any file,
//! the index included, never panics.

mod common;

use std::path::{Path, PathBuf};

use common::{prefix_snapshots, recover_from, Gen, Pipe, TempDir};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::Message as _;
use macp_kernel::{Kernel, KernelConfig};
use macp_pipeline::{RecoveryError, RecoveryReport};
use macp_storage::{DamageKind, Retention, Storage, StorageError};
use macp_storage_fs::{FsConfig, FsStorage, SimFs, CHECKPOINT_FILE, INDEX_FILE, WAL_DIR};

/// Six sessions whose records interleave, so damage in the middle of a
/// segment sits between records of other sessions.
fn interleaved() -> Vec<Record> {
    let mut g = Gen::new(1);
    let sids: Vec<String> = (0..6).map(|_| g.start(600_000)).collect();
    for round in 0..6 {
        for (i, sid) in sids.iter().enumerate() {
            g.note(sid, if (round + i) % 2 == 0 { "I" } else { "A" }, 40);
        }
    }
    g.records
}

fn write_log(dir: &Path, records: &[Record], cfg: FsConfig, checkpoint_after: Option<usize>) {
    let mut st = FsStorage::open(dir, cfg).expect("open");
    recover_from(&mut st).expect("fresh recover");
    let snaps = prefix_snapshots(records);
    for (i, chunk) in records.chunks(5).enumerate() {
        st.append(chunk, &[]).expect("append");
        st.sync().expect("sync");
        if checkpoint_after == Some((i + 1) * 5) {
            st.checkpoint(&snaps[(i + 1) * 5]).expect("checkpoint");
        }
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(WAL_DIR).join(format!("{n:020}.seg"))
}

/// Frames of a segment file: (offset, payload range, record). They end
/// where zeros start: the active segment is preallocated.
fn frames(bytes: &[u8]) -> Vec<(usize, std::ops::Range<usize>, Record)> {
    let mut out = Vec::new();
    let mut at = 16;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let range = at + 16..at + 16 + len;
        let r = Record::decode(&bytes[range.clone()]).expect("test log decodes");
        out.push((at, range.clone(), r));
        at = range.end;
    }
    out
}

fn reopen(dir: &Path, cfg: FsConfig) -> (FsStorage, Pipe, RecoveryReport) {
    let mut st = FsStorage::open(dir, cfg).expect("reopen");
    let (pipe, report) = recover_from(&mut st).expect("recovery must not fail on isolated damage");
    (st, pipe, report)
}

/// The expected state: everything replayed, then the damaged sessions
/// quarantined.
fn expected(records: &[Record], quarantined: &[&str]) -> Vec<u8> {
    let mut k = Kernel::new(KernelConfig::default());
    for r in records {
        k.apply_record(r).expect("applies");
    }
    for s in quarantined {
        k.quarantine_session(s);
    }
    k.snapshot()
}

fn check_others(st: &FsStorage, records: &[Record], victim: &str) {
    let mut sids: Vec<&str> = records.iter().map(|r| r.session_id.as_str()).filter(|s| !s.is_empty()).collect();
    sids.sort_unstable();
    sids.dedup();
    let r = st.reader();
    for sid in sids.into_iter().filter(|s| *s != victim) {
        let want: Vec<Record> = records.iter().filter(|r| r.session_id == sid).cloned().collect();
        assert_eq!(r.history(sid, 0, u64::MAX).expect("history"), want, "history of {sid}");
    }
}

#[test]
fn corrupted_record_mid_segment_quarantines_only_its_session() {
    let records = interleaved();
    let dir = TempDir::new("corrupt-payload");
    write_log(dir.path(), &records, FsConfig::default(), None);
    let seg = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let all = frames(&bytes);
    // The third record of some session, in the middle of the segment.
    let (off, range, victim) = all.iter().find(|(_, _, r)| r.seq == 3).cloned().expect("a seq-3 record");
    // The log's end, not the file's: the active segment is preallocated.
    let end = all.last().expect("frames").1.end;
    assert!(off > end / 5 && off < end * 4 / 5, "damage must sit mid-segment");
    bytes[range.end - 3] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    let (st, pipe, r) = reopen(dir.path(), FsConfig::default());
    assert!(r.torn_tail.is_none(), "mid-segment damage is not a torn tail: {r}");
    assert_eq!(r.damage.len(), 1, "{r}");
    let d = &r.damage[0];
    assert_eq!((d.segment, d.offset, &d.kind), (1, off as u64, &DamageKind::BadChecksum));
    assert_eq!(d.session_hint.as_deref(), Some(victim.session_id.as_str()));
    assert_eq!(r.quarantined.keys().collect::<Vec<_>>(), vec![&victim.session_id], "{r}");
    assert!(pipe.kernel().quarantined().contains(&victim.session_id));
    assert!(pipe.kernel().session(&victim.session_id).is_none());
    assert_eq!(pipe.kernel().snapshot(), expected(&records, &[&victim.session_id]));
    check_others(&st, &records, &victim.session_id);
    // The report is meant for humans too.
    let text = r.to_string();
    assert!(text.contains("segment 1") && text.contains(&format!("offset {off}")), "{text}");
}

#[test]
fn destroyed_frame_header_resyncs_and_quarantines_by_gap() {
    let records = interleaved();
    let dir = TempDir::new("corrupt-header");
    write_log(dir.path(), &records, FsConfig::default(), None);
    let seg = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let all = frames(&bytes);
    let (off, range, victim) = all.iter().find(|(_, _, r)| r.seq == 4).cloned().unwrap();
    // Wipe the header and the start of the payload (session id included),
    // so only the gap in the session's sequence can reveal the victim.
    for b in &mut bytes[off..range.start + 12] {
        *b = 0;
    }
    std::fs::write(&seg, &bytes).unwrap();

    let (st, pipe, r) = reopen(dir.path(), FsConfig::default());
    assert_eq!(r.damage.len(), 1, "{r}");
    assert_eq!((r.damage[0].segment, r.damage[0].offset), (1, off as u64));
    assert_eq!(r.damage[0].kind, DamageKind::BadFrame);
    assert_eq!(r.damage[0].len, (range.end - off) as u64, "resync lands on the next frame");
    assert_eq!(r.quarantined.keys().collect::<Vec<_>>(), vec![&victim.session_id], "{r}");
    assert_eq!(pipe.kernel().snapshot(), expected(&records, &[&victim.session_id]));
    check_others(&st, &records, &victim.session_id);
}

#[test]
fn damage_before_the_checkpoint_is_found_by_the_read_that_meets_it() {
    // A restart does not read history: damage under the checkpoint is not
    // looked for at load, and the history read that meets it fails with
    // the place, instead of returning a history with a hole.
    let records = interleaved();
    let dir = TempDir::new("corrupt-covered");
    write_log(dir.path(), &records, FsConfig::default(), Some(35));
    let seg = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let all = frames(&bytes);
    let (off, range, victim) = all[..35].iter().find(|(_, _, r)| r.seq == 2).cloned().unwrap();
    bytes[range.end - 1] ^= 0x11;
    std::fs::write(&seg, &bytes).unwrap();
    let (st, pipe, r) = reopen(dir.path(), FsConfig::default());
    assert!(r.checkpoint && r.is_clean(), "{r}");
    assert_eq!(pipe.kernel().snapshot(), expected(&records, &[]));
    match st.reader().history(&victim.session_id, 0, u64::MAX) {
        Err(StorageError::Damaged { place, reason }) => {
            assert_eq!(place, format!("segment 1 offset {off}"));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected a damage error, got {other:?}"),
    }
    assert_eq!(st.reader().history(&victim.session_id, 2, u64::MAX).unwrap().len(), 5, "other records still read");
    check_others(&st, &records, &victim.session_id);
}

/// Re-frames `payload` in place at `off` of segment `seg` with valid
/// checksums (the layout documented in the crate docs).
fn reframe(bytes: &mut [u8], seg: u64, off: usize, payload_range: std::ops::Range<usize>) {
    let payload_crc = crc32c::crc32c(&bytes[payload_range.clone()]);
    bytes[off + 8..off + 12].copy_from_slice(&payload_crc.to_le_bytes());
    let mut pos = Vec::new();
    pos.extend_from_slice(&seg.to_le_bytes());
    pos.extend_from_slice(&(off as u64).to_le_bytes());
    pos.extend_from_slice(&bytes[off..off + 12]);
    let hc = crc32c::crc32c(&pos);
    bytes[off + 12..off + 16].copy_from_slice(&hc.to_le_bytes());
}

#[test]
fn checksummed_but_undecodable_record_names_its_session() {
    // A record whose frame verifies but whose protobuf does not decode (a
    // bug, or damage before checksumming): its session is still named.
    let records = interleaved();
    let dir = TempDir::new("undecodable");
    write_log(dir.path(), &records, FsConfig::default(), None);
    let seg = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let all = frames(&bytes);
    // The last record of some session: no later gap could reveal it.
    let (off, range, victim) = all
        .iter()
        .rev()
        .find(|(_, _, r)| {
            r.fact.as_ref().is_some_and(|f| matches!(f, macp_kernel::macp_wire::storage::record::Fact::Accepted(_)))
        })
        .cloned()
        .unwrap();
    // Make the envelope's message id invalid UTF-8: structurally still
    // protobuf, so only a full decode notices.
    let mid = message_id_of(&victim);
    let at = bytes[range.clone()].windows(mid.len()).position(|w| w == mid.as_bytes()).unwrap() + range.start;
    for b in &mut bytes[at..at + mid.len()] {
        *b = 0xff;
    }
    reframe(&mut bytes, 1, off, range);
    std::fs::write(&seg, &bytes).unwrap();
    let (_st, pipe, r) = reopen(dir.path(), FsConfig::default());
    assert_eq!(r.damage.len(), 1, "{r}");
    assert!(matches!(r.damage[0].kind, DamageKind::Undecodable(_)), "{r}");
    assert_eq!(r.damage[0].offset, off as u64);
    assert_eq!(r.quarantined.keys().collect::<Vec<_>>(), vec![&victim.session_id], "{r}");
    assert_eq!(pipe.kernel().snapshot(), expected(&records, &[&victim.session_id]));
}

fn message_id_of(r: &Record) -> String {
    match &r.fact {
        Some(macp_kernel::macp_wire::storage::record::Fact::Accepted(env)) => env.message_id.clone(),
        _ => unreachable!("an accepted-envelope record"),
    }
}

#[test]
fn truncated_earlier_segment_is_damage_not_a_torn_tail() {
    let records = interleaved();
    let dir = TempDir::new("corrupt-middle-seg");
    let cfg = FsConfig { segment_bytes: 1500, ..FsConfig::default() };
    write_log(dir.path(), &records, cfg.clone(), None);
    let seg = segment_path(dir.path(), 2);
    assert!(segment_path(dir.path(), 4).exists(), "workload must span several segments");
    let bytes = std::fs::read(&seg).unwrap();
    let all = frames(&bytes);
    let (off, _, _) = all.last().cloned().unwrap();
    std::fs::write(&seg, &bytes[..off + 20]).unwrap();
    let (_st, _pipe, r) = reopen(dir.path(), cfg);
    assert!(r.torn_tail.is_none(), "{r}");
    assert_eq!(r.damage.len(), 1, "{r}");
    assert_eq!((r.damage[0].segment, r.damage[0].offset), (2, off as u64));
    assert!(!r.quarantined.is_empty(), "{r}");
}

#[test]
fn missing_segment_is_reported_and_sessions_quarantined() {
    let records = interleaved();
    let dir = TempDir::new("missing-seg");
    let cfg = FsConfig { segment_bytes: 1500, ..FsConfig::default() };
    write_log(dir.path(), &records, cfg.clone(), None);
    std::fs::remove_file(segment_path(dir.path(), 2)).unwrap();
    let (_st, pipe, r) = reopen(dir.path(), cfg);
    assert!(r.damage.iter().any(|d| d.kind == DamageKind::MissingSegment && d.segment == 2), "{r}");
    assert!(!r.quarantined.is_empty(), "{r}");
    assert!(pipe.kernel().session_count() + r.quarantined.len() >= 6);
}

#[test]
fn unreadable_checkpoint_replays_the_whole_log() {
    let records = interleaved();
    let dir = TempDir::new("bad-checkpoint");
    write_log(dir.path(), &records, FsConfig::default(), Some(20));
    let ck = dir.path().join(CHECKPOINT_FILE);
    let mut bytes = std::fs::read(&ck).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&ck, &bytes).unwrap();
    let (_st, pipe, r) = reopen(dir.path(), FsConfig::default());
    assert!(matches!(r.damage[..], [ref d] if matches!(d.kind, DamageKind::CheckpointUnreadable(_))));
    assert!(!r.checkpoint);
    assert!(r.quarantined.is_empty());
    assert_eq!(pipe.kernel().snapshot(), expected(&records, &[]));
}

fn refuses_to_start(dir: &Path, cfg: FsConfig) -> StorageError {
    let mut st = FsStorage::open(dir, cfg).unwrap();
    match recover_from(&mut st) {
        Err(RecoveryError::Storage(e)) => e,
        Err(e) => panic!("expected a storage error, got {e}"),
        Ok((_, r)) => panic!("recovered: {r}"),
    }
}

#[test]
fn unreadable_checkpoint_without_the_full_log_refuses_to_start() {
    let records = interleaved();
    let dir = TempDir::new("bad-checkpoint-retired");
    let cfg = FsConfig { segment_bytes: 1500, ..FsConfig::default() };
    write_log(dir.path(), &records, cfg.clone(), Some(40));
    std::fs::write(dir.path().join(CHECKPOINT_FILE), b"garbage").unwrap();
    std::fs::remove_file(segment_path(dir.path(), 1)).unwrap();
    let err = refuses_to_start(dir.path(), cfg);
    assert!(matches!(err, StorageError::CheckpointCorrupt { .. }), "{err}");
}

/// Once a segment was retired, a lost checkpoint cannot be replaced by a
/// full replay, even if the log happens to start at segment 1 again.
#[test]
fn a_lost_checkpoint_after_retirement_refuses_to_start() {
    let dir = TempDir::new("lost-checkpoint");
    let cfg = FsConfig { segment_bytes: 1200, retention: Retention::from_secs(1), ..FsConfig::default() };
    let mut g = Gen::new(5);
    for _ in 0..12 {
        let s = g.start(60_000);
        g.note(&s, "I", 40);
        g.commit(&s);
        g.advance(5_000);
    }
    let w = g.workload();
    let snaps = prefix_snapshots(&w.records);
    let mut st = FsStorage::open(dir.path(), cfg.clone()).unwrap();
    recover_from(&mut st).unwrap();
    let n = w.records.len();
    st.append(&w.records, &w.ended_in(0, n)).unwrap();
    st.checkpoint(&snaps[n]).unwrap();
    let mut retired = 0;
    for _ in 0..100 {
        let m = st.maintain(g.now + 60_000).unwrap();
        retired += m.retired_segments;
        if !m.more {
            break;
        }
    }
    assert!(retired > 0, "the test needs a retired segment");
    drop(st);
    std::fs::remove_file(dir.path().join(CHECKPOINT_FILE)).unwrap();
    let err = refuses_to_start(dir.path(), cfg.clone());
    assert!(matches!(err, StorageError::CheckpointCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("restore from backup"), "{err}");
    // And a lost index next to a checkpoint is damage, never recreated empty.
    let dir2 = TempDir::new("lost-index");
    write_log(dir2.path(), &interleaved(), FsConfig::default(), Some(20));
    std::fs::remove_file(dir2.path().join(INDEX_FILE)).unwrap();
    let err = FsStorage::open(dir2.path(), FsConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::Damaged { .. }), "{err}");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Arbitrary damage to segments, checkpoint and index: opening and
        /// recovery return a report or an error, never panic, and whatever
        /// recovers is consistent (every open session's history reads back
        /// or fails with a typed error; the storage stays appendable).
        #[test]
        fn arbitrary_damage_never_panics(
            seed in 0u64..1000,
            edits in proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u8>()), 1..8),
        ) {
            let w = common::workload_with_summaries(seed, 40);
            let snaps = prefix_snapshots(&w.records);
            let fs = SimFs::new();
            let cfg = FsConfig { segment_bytes: 900, ..FsConfig::default() };
            {
                let mut st = FsStorage::open_with(fs.clone(), "/d", cfg.clone()).unwrap();
                recover_from(&mut st).unwrap();
                st.append(&w.records[..25], &w.ended_in(0, 25)).unwrap();
                st.checkpoint(&snaps[25]).unwrap();
                st.append(&w.records[25..], &w.ended_in(25, 40)).unwrap();
                st.sync().unwrap();
                st.maintain(0).unwrap();
            }
            let paths: Vec<PathBuf> = fs.paths().into_iter().filter(|p| !p.ends_with("FORMAT")).collect();
            for (which, at, val) in edits {
                let path = &paths[which as usize % paths.len()];
                let mut bytes = fs.read_file(path).unwrap();
                if bytes.is_empty() { continue; }
                let i = at as usize % bytes.len();
                match val % 4 {
                    0 => bytes.truncate(i),
                    1 => bytes.insert(i, val),
                    2 => { bytes.remove(i); }
                    _ => bytes[i] ^= val | 1,
                }
                fs.write_file_durable(path, bytes);
            }
            let Ok(mut st) = FsStorage::open_with(fs, "/d", cfg) else { return Ok(()) };
            if let Ok((pipe, _)) = recover_from(&mut st) {
                let r = st.reader();
                for m in pipe.kernel().all_sessions() {
                    if let Ok(h) = r.history(&m.session_id, 0, u64::MAX) {
                        prop_assert!(h.iter().all(|x| x.session_id == m.session_id));
                    }
                }
                for s in w.ended_before(40) {
                    let _ = r.ended(macp_storage::summary_id(s));
                }
                let _ = r.list_ended(None, 100);
                // The log is still appendable.
                prop_assert!(st.sync().is_ok());
            }
        }
    }
}
