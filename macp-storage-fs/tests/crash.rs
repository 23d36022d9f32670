//! Crash consistency: the real storage code (log, checkpoint and redb
//! index) runs on a simulated file system that fails — and "loses power" —
//! at every write and sync boundary in turn, with retention, checkpoints,
//! compaction (carry-forward) and segment retirement in the mix. After each
//! crash the image keeps the synced bytes plus a random part of the rest
//! (`SimFs::crash_image`), and recovery through the pipeline must give back:
//!
//! * a prefix of what was appended that includes everything acknowledged
//!   (0 synced records lost), with a clean report (no damage after a power
//!   cut);
//! * every ended session within retention, with its whole history (0 ended
//!   sessions lost);
//! * no session whose deletion was made durable (by a checkpoint or a
//!   durable index commit in `maintain`) — replaying the tail never
//!   resurrects one;
//! * every open session's whole history.
//!
//! A third image per crash point also crashes during the recovery itself
//! before recovering again.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{prefix_snapshots, recover_from, workload_with_summaries, Gen, Workload};
use macp_kernel::ControlOp;
use macp_storage::{summary_id, Record, Retention, Storage, StorageError, StorageRead};
use macp_storage_fs::{FsConfig, FsStorage, SimFs, SplitMix};

const DIR: &str = "/data";
const RETENTION: Retention = Retention::For(Duration::from_secs(5));

fn cfg() -> FsConfig {
    // Tiny segments and budgets so workloads roll, retire and carry a lot.
    FsConfig {
        segment_bytes: 700,
        max_record_bytes: 1 << 20,
        write_buffer_bytes: 600,
        retention: RETENTION,
        index_cache_bytes: 1 << 20,
        maintain_sessions: 3,
        carry_bytes: 400,
        // Deterministic: the crash matrix compares a dry run's operation
        // count with each crashed run's.
        maintain_time_budget: Duration::MAX,
    }
}

/// What the driver does after each batch.
#[derive(Clone, Copy, Debug)]
enum After {
    Nothing,
    Sync,
    Checkpoint,
    Maintain,
}

struct Plan {
    w: Workload,
    batches: Vec<(usize, After)>,
    cfg: FsConfig,
}

fn plan(seed: u64) -> Plan {
    let mut rng = SplitMix::new(seed ^ 0xabcdef);
    let n = 30 + rng.below(40) as usize;
    let w = workload_with_summaries(seed, n);
    let mut batches = Vec::new();
    let mut left = n;
    while left > 0 {
        let size = (1 + rng.below(5) as usize).min(left);
        left -= size;
        let after = match rng.below(10) {
            0 => After::Nothing,
            1..=2 => After::Checkpoint,
            3..=5 => After::Maintain,
            _ => After::Sync,
        };
        batches.push((size, after));
    }
    Plan { w, batches, cfg: cfg() }
}

/// What the driver saw before it stopped.
#[derive(Default)]
struct Outcome {
    /// Records handed to `append` (a failing append may still land them).
    appended: usize,
    /// Records covered by a successful sync or checkpoint.
    acked: usize,
    failed: bool,
    /// Sessions found deleted at a point that made deletions durable.
    durably_deleted: BTreeSet<String>,
    /// The latest `now` given to `maintain`.
    max_now: i64,
    /// File-system operations before the storage was dropped (a fault
    /// after that hits only the index's clean close, which no call sees).
    ops_in_calls: u64,
    carried: u64,
    retired: u64,
}

/// Records every ended (acknowledged) session that is gone now.
fn note_deleted(st: &FsStorage<SimFs>, w: &Workload, acked: usize, out: &mut Outcome) {
    let r = st.reader();
    for s in w.ended_before(acked) {
        let sid = summary_id(s);
        if r.ended(sid).expect("read").is_none() {
            out.durably_deleted.insert(sid.to_string());
        }
    }
}

/// The driver: appends batches with their summaries, syncs, checkpoints,
/// maintains. Stops at the first error, as a fail-stop driver must.
fn drive(fs: &SimFs, p: &Plan, snaps: &[Vec<u8>]) -> Outcome {
    let mut out = Outcome::default();
    let Ok(mut st) = FsStorage::open_with(fs.clone(), DIR, p.cfg.clone()) else {
        out.failed = true;
        return out;
    };
    if recover_from(&mut st).is_err() {
        out.failed = true;
        return out;
    }
    for &(size, after) in &p.batches {
        let (a, b) = (out.appended, out.appended + size);
        out.appended = b;
        if st.append(&p.w.records[a..b], &p.w.ended_in(a, b)).is_err() {
            out.failed = true;
            break;
        }
        let r = match after {
            After::Nothing => continue,
            After::Sync => st.sync(),
            After::Checkpoint => st.checkpoint(&snaps[b]),
            After::Maintain => st.sync().and_then(|()| {
                out.acked = b;
                let now = p.w.times[b - 1];
                out.max_now = out.max_now.max(now);
                let durable_before = st.stats().durable_index_commits;
                st.maintain(now).map(|m| {
                    if std::env::var_os("CRASH_DEBUG").is_some() {
                        eprintln!("maintain at {now} (record {b}): {m:?} {:?}", st.stats());
                    }
                    out.carried += m.carried_records;
                    out.retired += m.retired_segments;
                    // A call that made the index durable did so before
                    // deleting anything else.
                    if st.stats().durable_index_commits > durable_before {
                        note_deleted(&st, &p.w, b, &mut out);
                    }
                })
            }),
        };
        match r {
            Ok(()) => {
                out.acked = b;
                if matches!(after, After::Checkpoint) {
                    note_deleted(&st, &p.w, b, &mut out);
                }
            }
            Err(_) => {
                out.failed = true;
                // Fail-stop: nothing more is accepted or acknowledged.
                assert!(matches!(st.append(&p.w.records[a..b], &[]), Err(StorageError::Poisoned)));
                assert!(matches!(st.sync(), Err(StorageError::Poisoned)));
                break;
            }
        }
    }
    out.ops_in_calls = fs.ops();
    out
}

/// How many records the recovered storage holds: a prefix in
/// `[acked, appended]` whose open state is the recovered one. Ended
/// sessions leave no trace in the open state, so several prefixes may
/// share it; the stored histories tell them apart.
fn recovered_prefix(r: &dyn StorageRead, p: &Plan, out: &Outcome, snap: &[u8], snaps: &[Vec<u8>], what: &str) -> usize {
    let candidates: Vec<usize> = (out.acked..=out.appended).filter(|&m| snaps[m] == snap).collect();
    if candidates.len() == 1 {
        return candidates[0];
    }
    let mut sids: Vec<&str> =
        p.w.records[..out.appended].iter().map(|x| x.session_id.as_str()).filter(|s| !s.is_empty()).collect();
    sids.sort_unstable();
    sids.dedup();
    let stored: Vec<(&str, Vec<Record>)> =
        sids.iter().map(|sid| (*sid, r.history(sid, 0, u64::MAX).expect("history"))).collect();
    let fits: Vec<usize> = candidates
        .into_iter()
        .filter(|&m| {
            stored.iter().all(|(sid, h)| {
                *h == p.w.history(sid, m)
                    || (h.is_empty() && out.durably_deleted.contains(*sid))
                    || (h.is_empty()
                        && p.w
                            .ended_before(m)
                            .any(|s| summary_id(s) == *sid && RETENTION.expired(s.ended_at_unix_ms, out.max_now)))
            })
        })
        .collect();
    assert_eq!(
        fits.len(),
        1,
        "{what}: the recovered storage is not exactly one prefix in [{}, {}] of the appended records: {fits:?}",
        out.acked,
        out.appended
    );
    fits[0]
}

/// Recovers from `fs` and checks it against the reference. Returns how
/// many records came back and whether a torn tail was cut.
fn check_recovery(fs: SimFs, p: &Plan, snaps: &[Vec<u8>], out: &Outcome, what: &str) -> (usize, bool) {
    let mut st = FsStorage::open_with(fs, DIR, p.cfg.clone()).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let (pipe, report) = recover_from(&mut st).unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    assert!(report.is_clean(), "{what}: unexpected damage: {report}");
    let snap = pipe.kernel().snapshot();
    let r = st.reader();
    let m = recovered_prefix(&*r, p, out, &snap, snaps, what);
    for s in p.w.ended_before(m) {
        let sid = summary_id(s);
        let got = r.ended(sid).expect("ended");
        let history = r.history(sid, 0, u64::MAX).expect("history");
        if out.durably_deleted.contains(sid) {
            assert_eq!(got, None, "{what}: deleted session {sid} came back");
            assert!(history.is_empty(), "{what}: deleted session {sid}'s records came back");
        } else if !RETENTION.expired(s.ended_at_unix_ms, out.max_now) {
            assert_eq!(got.as_ref(), Some(s), "{what}: ended session {sid} within retention was lost");
            assert_eq!(history, p.w.history(sid, m), "{what}: history of ended session {sid}");
        } else if got.is_some() {
            // Past retention and not durably deleted: either way, but whole.
            assert_eq!(got.as_ref(), Some(s), "{what}: summary of {sid}");
            assert_eq!(history, p.w.history(sid, m), "{what}: history of expired session {sid}");
        }
    }
    for meta in pipe.kernel().all_sessions() {
        let sid = meta.session_id;
        assert_eq!(r.history(&sid, 0, u64::MAX).expect("history"), p.w.history(&sid, m), "{what}: history of {sid}");
    }
    // The log stays appendable after truncating a torn tail.
    let n = p.w.records.len();
    st.append(&p.w.records[m..], &p.w.ended_in(m, n)).expect("append after recovery");
    st.sync().expect("sync after recovery");
    st.maintain(out.max_now).expect("maintain after recovery");
    drop(st);
    (m, report.torn_tail.is_some())
}

fn reopen_all(fs: SimFs, p: &Plan, snaps: &[Vec<u8>], what: &str) {
    let mut st = FsStorage::open_with(fs, DIR, p.cfg.clone()).expect("reopen");
    let (pipe, report) = recover_from(&mut st).expect("recover");
    assert!(report.is_clean(), "{what}: {report}");
    assert_eq!(&pipe.kernel().snapshot(), snaps.last().expect("snapshots"), "{what}: full log after continuing");
    let n = p.w.records.len();
    let r = st.reader();
    for s in p.w.ended_before(n) {
        if let Some(got) = r.ended(summary_id(s)).expect("ended") {
            assert_eq!(&got, s);
        }
    }
}

/// What a crash matrix exercised.
#[derive(Default, Debug)]
struct Matrix {
    cases: u64,
    lost_unacked: u64,
    torn_tails: u64,
    carried: u64,
    retired: u64,
    deleted: usize,
}

/// Crashes every plan at every file-system operation (three images each)
/// and checks each recovery.
fn crash_matrix(plans: &[(u64, Plan)]) -> Matrix {
    let mut x = Matrix::default();
    for (seed, p) in plans {
        let seed = *seed;
        let snaps = prefix_snapshots(&p.w.records);
        // A dry run counts the operations; then crash at each of them.
        let dry = SimFs::new();
        let full = drive(&dry, p, &snaps);
        assert!(!full.failed, "seed {seed}: the dry run failed");
        x.carried += full.carried;
        x.retired += full.retired;
        x.deleted += full.durably_deleted.len();
        let total = dry.ops();
        for crash_at in 0..=total {
            let fs = SimFs::new();
            fs.fail_at(crash_at);
            let out = drive(&fs, p, &snaps);
            assert_eq!(out.failed, crash_at < full.ops_in_calls, "seed {seed} crash {crash_at}");
            for variant in 0..3u64 {
                let mut image = fs.crash_image(seed.wrapping_mul(1_000_003) ^ (crash_at << 8) ^ variant);
                if variant == 2 {
                    // Crash again, during recovery itself (while it
                    // truncates the torn tail, starts a segment, hands
                    // summaries back), then recover.
                    image.fail_at((seed ^ crash_at) % 12);
                    if let Ok(mut st) = FsStorage::open_with(image.clone(), DIR, p.cfg.clone()) {
                        let _ = recover_from(&mut st);
                    }
                    image = image.crash_image(seed ^ crash_at ^ 0x5eed);
                }
                let what = format!("seed {seed} crash at op {crash_at}/{total} image {variant}");
                let (m, torn) = check_recovery(image.clone(), p, &snaps, &out, &what);
                x.torn_tails += u64::from(torn);
                x.lost_unacked += u64::from(m < out.appended);
                reopen_all(image, p, &snaps, &what);
                x.cases += 1;
            }
        }
    }
    eprintln!("{x:?}");
    x
}

#[test]
fn crash_at_every_write_and_sync_boundary() {
    let plans: Vec<(u64, Plan)> = (0..12).map(|seed| (seed, plan(seed))).collect();
    let x = crash_matrix(&plans);
    assert!(x.cases >= 1000, "only {} crash cases", x.cases);
    assert!(x.lost_unacked > 0, "the crash model never dropped anything: it is not testing");
    assert!(x.torn_tails > 0, "the crash model never tore a frame: it is not testing");
    assert!(x.retired > 0 && x.deleted > 0, "retirement and retention must be in the mix");
}

/// A session that stays open (suspended) while short ones come, end and
/// expire around it: compaction carries its records out of every old
/// segment, and the segments retire behind it. Power cuts at every step.
fn long_lived_plan(seed: u64) -> Plan {
    let mut g = Gen::new(seed);
    let long = g.start(3_600_000);
    g.note(&long, "I", 60);
    g.control(&long, ControlOp::Suspend);
    for i in 0..24 {
        let s = g.start(60_000);
        g.note(&s, "A", 30);
        g.commit(&s);
        g.advance(3_000 + 500 * (i % 3));
    }
    g.control(&long, ControlOp::Resume);
    g.note(&long, "A", 20);
    let w = g.workload();
    let cycle = [After::Sync, After::Checkpoint, After::Maintain, After::Maintain];
    let mut batches = Vec::new();
    let mut left = w.records.len();
    let mut i = seed as usize;
    while left > 0 {
        let size = 3.min(left);
        left -= size;
        batches.push((size, cycle[i % cycle.len()]));
        i += 1;
    }
    // Segments big enough that the open session's records fill less than
    // half of one (compaction's threshold), small enough to roll often.
    Plan { w, batches, cfg: FsConfig { segment_bytes: 4000, ..cfg() } }
}

#[test]
fn crash_during_compaction_and_retirement() {
    let plans: Vec<(u64, Plan)> = (0..2).map(|seed| (seed, long_lived_plan(seed))).collect();
    let x = crash_matrix(&plans);
    assert!(x.carried > 0, "the long-lived session's records must be carried forward: {x:?}");
    assert!(x.retired > 0 && x.deleted > 0, "{x:?}");
}

#[test]
fn failed_write_or_sync_without_power_loss() {
    // The process sees an I/O error, gives up (fail-stop) and restarts on
    // the same machine: unsynced bytes may or may not be there.
    let mut cases = 0;
    for seed in 100..106u64 {
        let p = plan(seed);
        let snaps = prefix_snapshots(&p.w.records);
        let dry = SimFs::new();
        let total = drive(&dry, &p, &snaps).ops_in_calls;
        for fail_at in 0..total {
            let fs = SimFs::new();
            fs.fail_at(fail_at);
            let out = drive(&fs, &p, &snaps);
            assert!(out.failed);
            fs.heal();
            let what = format!("seed {seed} failure at op {fail_at}");
            check_recovery(fs.clone(), &p, &snaps, &out, &what);
            reopen_all(fs, &p, &snaps, &what);
            cases += 1;
        }
    }
    assert!(cases > 100);
}

#[test]
fn sim_paths_are_the_documented_layout() {
    let fs = SimFs::new();
    let p = plan(7);
    let snaps = prefix_snapshots(&p.w.records);
    drive(&fs, &p, &snaps);
    let paths = fs.paths();
    assert!(paths.contains(&Path::new(DIR).join("FORMAT")));
    assert!(paths.contains(&Path::new(DIR).join("index.redb")));
    assert!(paths.iter().any(|p| p.starts_with(Path::new(DIR).join("wal")) && p.extension() == Some("seg".as_ref())));
}
