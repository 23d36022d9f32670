//! Damage that is not a crash-torn tail: it must be reported with segment
//! and offset, the sessions it touches quarantined, and everything else
//! recovered exactly (DECISIONS 16).

mod common;

use std::path::{Path, PathBuf};

use common::{replay, Gen, TempDir};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::Message as _;
use macp_kernel::{Kernel, KernelConfig};
use macp_storage_fs::{
    recover, DamageKind, FsConfig, FsStorage, Recovered, Storage, StorageError, CHECKPOINT_FILE, WAL_DIR,
};

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
    recover(&mut st, KernelConfig::default()).expect("fresh recover");
    let mut k = Kernel::new(KernelConfig::default());
    for (i, chunk) in records.chunks(5).enumerate() {
        st.append(chunk).expect("append");
        st.sync().expect("sync");
        for r in chunk {
            k.apply_record(r).expect("applies");
        }
        if checkpoint_after == Some((i + 1) * 5) {
            st.checkpoint(&k.snapshot()).expect("checkpoint");
        }
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(WAL_DIR).join(format!("{n:020}.seg"))
}

/// Frames of a segment file: (offset, payload range, record).
fn frames(bytes: &[u8]) -> Vec<(usize, std::ops::Range<usize>, Record)> {
    let mut out = Vec::new();
    let mut at = 16;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let range = at + 16..at + 16 + len;
        let r = Record::decode(&bytes[range.clone()]).expect("test log decodes");
        out.push((at, range.clone(), r));
        at = range.end;
    }
    out
}

fn reopen(dir: &Path, cfg: FsConfig) -> (FsStorage, Recovered) {
    let mut st = FsStorage::open(dir, cfg).expect("reopen");
    let rec = recover(&mut st, KernelConfig::default()).expect("recovery must not fail on isolated damage");
    (st, rec)
}

/// The expected state: everything replayed, then the damaged sessions
/// quarantined.
fn expected(records: &[Record], quarantined: &[&str]) -> Vec<u8> {
    let mut k = replay(records);
    for s in quarantined {
        k.quarantine_session(s);
    }
    k.snapshot()
}

fn check_others(st: &FsStorage, records: &[Record], victim: &str) {
    let mut sids: Vec<&str> = records.iter().map(|r| r.session_id.as_str()).filter(|s| !s.is_empty()).collect();
    sids.dedup();
    for sid in sids.into_iter().filter(|s| *s != victim) {
        let want: Vec<Record> = records.iter().filter(|r| r.session_id == sid).cloned().collect();
        assert_eq!(st.history(sid, 0).expect("history"), want, "history of {sid}");
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
    assert!(off > bytes.len() / 5 && off < bytes.len() * 4 / 5, "damage must sit mid-segment");
    bytes[range.end - 3] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    let (st, rec) = reopen(dir.path(), FsConfig::default());
    let r = &rec.report;
    assert!(r.torn_tail.is_none(), "mid-segment damage is not a torn tail: {r}");
    assert_eq!(r.damage.len(), 1, "{r}");
    let d = &r.damage[0];
    assert_eq!((d.segment, d.offset, &d.kind), (1, off as u64, &DamageKind::BadChecksum));
    assert_eq!(d.session_hint.as_deref(), Some(victim.session_id.as_str()));
    assert_eq!(r.quarantined.keys().collect::<Vec<_>>(), vec![&victim.session_id], "{r}");
    assert!(rec.kernel.quarantined().contains(&victim.session_id));
    assert!(rec.kernel.session(&victim.session_id).is_none());
    assert_eq!(rec.kernel.snapshot(), expected(&records, &[&victim.session_id]));
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

    let (st, rec) = reopen(dir.path(), FsConfig::default());
    let r = &rec.report;
    assert_eq!(r.damage.len(), 1, "{r}");
    assert_eq!((r.damage[0].segment, r.damage[0].offset), (1, off as u64));
    assert_eq!(r.damage[0].kind, DamageKind::BadFrame);
    assert_eq!(r.damage[0].len, (range.end - off) as u64, "resync lands on the next frame");
    assert_eq!(r.quarantined.keys().collect::<Vec<_>>(), vec![&victim.session_id], "{r}");
    assert_eq!(rec.kernel.snapshot(), expected(&records, &[&victim.session_id]));
    check_others(&st, &records, &victim.session_id);
}

#[test]
fn damage_under_a_checkpoint_still_quarantines() {
    // The checkpoint holds the state, but the history a passive subscriber
    // would read is damaged: the session is quarantined all the same.
    let records = interleaved();
    let dir = TempDir::new("corrupt-covered");
    write_log(dir.path(), &records, FsConfig::default(), Some(35));
    let seg = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let all = frames(&bytes);
    // A session's last record before the checkpoint, header and payload start wiped.
    let (off, range, victim) = all[..35]
        .iter()
        .rev()
        .find(|(_, _, r)| !r.session_id.is_empty() && all[35..].iter().all(|(_, _, o)| o.session_id != r.session_id))
        .or_else(|| all[..35].iter().rev().find(|(_, _, r)| r.seq > 1))
        .cloned()
        .unwrap();
    for b in &mut bytes[off..range.start + 12] {
        *b = 0;
    }
    std::fs::write(&seg, &bytes).unwrap();
    let (_st, rec) = reopen(dir.path(), FsConfig::default());
    assert!(rec.report.checkpoint.is_some());
    assert!(rec.report.quarantined.contains_key(&victim.session_id), "{}", rec.report);
    assert_eq!(rec.report.quarantined.len(), 1, "{}", rec.report);
    assert_eq!(rec.kernel.snapshot(), expected(&records, &[&victim.session_id]));
}

/// Re-frames `payload` in place at `off` of segment `seg` with valid
/// checksums (the layout documented in the crate docs).
fn reframe(bytes: &mut [u8], seg: u64, off: usize, payload_range: std::ops::Range<usize>) {
    let payload_crc = crc32c::crc32c(&bytes[payload_range.clone()]);
    bytes[off + 8..off + 12].copy_from_slice(&payload_crc.to_le_bytes());
    let mut pos = Vec::new();
    pos.extend_from_slice(&seg.to_le_bytes());
    pos.extend_from_slice(&(off as u64).to_le_bytes());
    let hc = crc32c::crc32c_append(crc32c::crc32c(&pos), &bytes[off..off + 12]);
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
    let (_st, rec) = reopen(dir.path(), FsConfig::default());
    let r = &rec.report;
    assert_eq!(r.damage.len(), 1, "{r}");
    assert!(matches!(r.damage[0].kind, DamageKind::Undecodable(_)), "{r}");
    assert_eq!(r.damage[0].offset, off as u64);
    assert_eq!(r.quarantined.keys().collect::<Vec<_>>(), vec![&victim.session_id], "{r}");
    assert_eq!(rec.kernel.snapshot(), expected(&records, &[&victim.session_id]));
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
    let (_st, rec) = reopen(dir.path(), cfg);
    let r = &rec.report;
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
    let (_st, rec) = reopen(dir.path(), cfg);
    let r = &rec.report;
    assert!(r.damage.iter().any(|d| d.kind == DamageKind::MissingSegment && d.segment == 2), "{r}");
    assert!(!r.quarantined.is_empty(), "{r}");
    assert!(rec.kernel.session_count() + r.quarantined.len() >= 6);
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
    let (_st, rec) = reopen(dir.path(), FsConfig::default());
    assert!(matches!(rec.report.damage[..], [ref d] if matches!(d.kind, DamageKind::CheckpointUnreadable(_))));
    assert!(rec.report.checkpoint.is_none());
    assert!(rec.report.quarantined.is_empty());
    assert_eq!(rec.kernel.snapshot(), replay(&records).snapshot());
}

#[test]
fn unreadable_checkpoint_without_the_full_log_refuses_to_start() {
    let records = interleaved();
    let dir = TempDir::new("bad-checkpoint-retired");
    let cfg = FsConfig { segment_bytes: 1500, ..FsConfig::default() };
    write_log(dir.path(), &records, cfg.clone(), Some(40));
    std::fs::write(dir.path().join(CHECKPOINT_FILE), b"garbage").unwrap();
    std::fs::remove_file(segment_path(dir.path(), 1)).unwrap();
    let mut st = FsStorage::open(dir.path(), cfg).unwrap();
    let err = recover(&mut st, KernelConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::CheckpointCorrupt { .. }), "{err}");
}

mod fuzz {
    use super::*;
    use macp_storage_fs::SimFs;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Arbitrary damage to segments and checkpoint: recovery returns a
        /// report or an error, never panics, and whatever it recovers is
        /// consistent (every live session has a readable, gapless history).
        #[test]
        fn arbitrary_damage_never_panics(
            seed in 0u64..1000,
            edits in proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u8>()), 1..8),
        ) {
            let records = common::workload(seed, 40);
            let fs = SimFs::new();
            let cfg = FsConfig { segment_bytes: 900, ..FsConfig::default() };
            {
                let mut st = FsStorage::open_with(fs.clone(), "/d", cfg.clone()).unwrap();
                recover(&mut st, KernelConfig::default()).unwrap();
                st.append(&records[..25]).unwrap();
                st.checkpoint(&replay(&records[..25]).snapshot()).unwrap();
                st.append(&records[25..]).unwrap();
                st.sync().unwrap();
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
            let mut st = FsStorage::open_with(fs, "/d", cfg).unwrap();
            if let Ok(rec) = recover(&mut st, KernelConfig::default()) {
                for m in rec.kernel.all_sessions() {
                    let h = st.history(&m.session_id, 0).unwrap();
                    prop_assert!(h.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
                }
                // The log is still appendable.
                prop_assert!(st.sync().is_ok());
            }
        }
    }
}
