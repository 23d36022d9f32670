//! Crash consistency: the real storage code runs on a simulated file system
//! that fails (and "loses power") at every write and sync boundary in turn.
//! After each crash the image keeps the synced bytes plus a random, possibly
//! torn, prefix of the unsynced ones, and recovery must give back exactly a
//! prefix of what was appended that includes everything acknowledged. A
//! third image per crash point also crashes during the recovery (torn-tail
//! truncation, segment creation) before recovering again.

mod common;

use std::path::Path;

use common::{prefix_snapshots, workload};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::KernelConfig;
use macp_storage_fs::{recover, FsConfig, FsStorage, LogPos, SimFs, SplitMix, Storage, StorageError};

const DIR: &str = "/data";

fn cfg() -> FsConfig {
    // Tiny segments so workloads roll over many of them.
    FsConfig { segment_bytes: 700, max_record_bytes: 1 << 20, write_buffer_bytes: 600 }
}

/// What the driver does after each batch.
#[derive(Clone, Copy, Debug)]
enum After {
    Nothing,
    Sync,
    Checkpoint,
}

struct Plan {
    records: Vec<Record>,
    batches: Vec<(usize, After)>,
}

fn plan(seed: u64) -> Plan {
    let mut rng = SplitMix::new(seed ^ 0xabcdef);
    let n = 8 + rng.below(28) as usize;
    let records = workload(seed, n);
    let mut batches = Vec::new();
    let mut left = n;
    while left > 0 {
        let size = (1 + rng.below(5) as usize).min(left);
        left -= size;
        let after = match rng.below(10) {
            0..=1 => After::Nothing,
            2 => After::Checkpoint,
            _ => After::Sync,
        };
        batches.push((size, after));
    }
    Plan { records, batches }
}

/// The driver: appends batches, syncs, checkpoints, and counts how many
/// records were acknowledged (covered by a returned durable position).
/// Stops at the first error, as a fail-stop driver must.
struct Outcome {
    appended: usize,
    acked: usize,
    failed: bool,
}

fn drive(fs: &SimFs, p: &Plan, snaps: &[Vec<u8>]) -> Outcome {
    let mut out = Outcome { appended: 0, acked: 0, failed: false };
    let mut st = match FsStorage::open_with(fs.clone(), DIR, cfg()) {
        Ok(s) => s,
        Err(_) => {
            out.failed = true;
            return out;
        }
    };
    if recover(&mut st, KernelConfig::default()).is_err() {
        out.failed = true;
        return out;
    }
    let mut tickets: Vec<LogPos> = Vec::new();
    for &(size, after) in &p.batches {
        let batch = &p.records[out.appended..out.appended + size];
        // Records handed to a failing append may still reach the disk (they
        // were appended, just never acknowledged), so they count.
        out.appended += size;
        match st.append(batch) {
            Ok(t) => tickets.extend(std::iter::repeat_n(t, size)),
            Err(_) => {
                out.failed = true;
                break;
            }
        }
        let durable = match after {
            After::Nothing => continue,
            After::Sync => st.sync(),
            After::Checkpoint => st.checkpoint(&snaps[out.appended]),
        };
        match durable {
            Ok(d) => {
                out.acked = tickets.iter().take_while(|t| **t <= d).count();
                assert_eq!(st.durable(), d);
            }
            Err(_) => {
                out.failed = true;
                // Fail-stop: nothing more is accepted or acknowledged.
                assert!(matches!(st.append(batch), Err(StorageError::Poisoned)));
                assert!(matches!(st.sync(), Err(StorageError::Poisoned)));
                break;
            }
        }
    }
    out
}

/// Recovers from `fs` and checks the result against the reference replay.
/// Returns how many records came back and whether a torn tail was cut.
fn check_recovery(fs: SimFs, p: &Plan, snaps: &[Vec<u8>], out: &Outcome, what: &str) -> (usize, bool) {
    let mut st = FsStorage::open_with(fs, DIR, cfg()).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let rec = recover(&mut st, KernelConfig::default()).unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    assert!(rec.report.is_clean(), "{what}: unexpected damage: {}", rec.report);
    let snap = rec.kernel.snapshot();
    let m = (out.acked..=out.appended).find(|&m| snaps[m] == snap).unwrap_or_else(|| {
        panic!("{what}: recovered state is no prefix in [{}, {}] of the appended records", out.acked, out.appended)
    });
    // History for passive subscribers matches the recovered prefix.
    let mut sids: Vec<&str> = p.records[..m].iter().map(|r| r.session_id.as_str()).filter(|s| !s.is_empty()).collect();
    sids.sort_unstable();
    sids.dedup();
    for sid in sids {
        let want: Vec<&Record> = p.records[..m].iter().filter(|r| r.session_id == sid).collect();
        let got = st.history(sid, 0).expect("history");
        assert_eq!(got.iter().collect::<Vec<_>>(), want, "{what}: history of {sid}");
        let tail = st.history(sid, 1).expect("history");
        assert_eq!(tail.len(), want.len() - 1, "{what}: after_sequence is exclusive");
    }
    // The log stays appendable after truncating a torn tail: append the rest,
    // and a clean restart sees everything.
    st.append(&p.records[m..]).expect("append after recovery");
    st.sync().expect("sync after recovery");
    drop(st);
    (m, rec.report.torn_tail.is_some())
}

fn reopen_all(fs: SimFs, snaps: &[Vec<u8>], what: &str) {
    let mut st = FsStorage::open_with(fs, DIR, cfg()).expect("reopen");
    let rec = recover(&mut st, KernelConfig::default()).expect("recover");
    assert!(rec.report.is_clean(), "{what}: {}", rec.report);
    assert_eq!(&rec.kernel.snapshot(), snaps.last().expect("snapshots"), "{what}: full log after continuing");
}

#[test]
fn crash_at_every_write_and_sync_boundary() {
    let seeds = 36u64;
    let mut cases = 0u64;
    let mut lost_unacked = 0u64;
    let mut torn_tails = 0u64;
    for seed in 0..seeds {
        let p = plan(seed);
        let snaps = prefix_snapshots(&p.records);
        // A dry run counts the operations; then crash at each of them.
        let dry = SimFs::new();
        let full = drive(&dry, &p, &snaps);
        assert!(!full.failed);
        let total = dry.ops();
        for crash_at in 0..=total {
            let fs = SimFs::new();
            fs.fail_at(crash_at);
            let out = drive(&fs, &p, &snaps);
            assert_eq!(out.failed, crash_at < total, "seed {seed} crash {crash_at}");
            for variant in 0..3u64 {
                let mut image = fs.crash_image(seed.wrapping_mul(1_000_003) ^ (crash_at << 8) ^ variant);
                if variant == 2 {
                    // Crash again, during recovery itself (while it truncates
                    // the torn tail or starts a segment), then recover.
                    image.fail_at((seed ^ crash_at) % 6);
                    if let Ok(mut st) = FsStorage::open_with(image.clone(), DIR, cfg()) {
                        let _ = recover(&mut st, KernelConfig::default());
                    }
                    image = image.crash_image(seed ^ crash_at ^ 0x5eed);
                }
                let what = format!("seed {seed} crash at op {crash_at}/{total} image {variant}");
                let (m, torn) = check_recovery(image.clone(), &p, &snaps, &out, &what);
                torn_tails += u64::from(torn);
                if m < out.appended {
                    lost_unacked += 1;
                }
                reopen_all(image, &snaps, &what);
                cases += 1;
            }
        }
    }
    eprintln!("crash cases: {cases} ({lost_unacked} lost unacknowledged records, {torn_tails} torn tails truncated)");
    assert!(cases >= 1000, "only {cases} crash cases");
    assert!(lost_unacked > 0, "the crash model never dropped anything: it is not testing");
    assert!(torn_tails > 0, "the crash model never tore a frame: it is not testing");
}

#[test]
fn failed_write_or_sync_without_power_loss() {
    // The process sees an I/O error, gives up (fail-stop) and restarts on
    // the same machine: unsynced bytes may or may not be there.
    let mut cases = 0;
    for seed in 100..112u64 {
        let p = plan(seed);
        let snaps = prefix_snapshots(&p.records);
        let dry = SimFs::new();
        drive(&dry, &p, &snaps);
        let total = dry.ops();
        for fail_at in 0..total {
            let fs = SimFs::new();
            fs.fail_at(fail_at);
            let out = drive(&fs, &p, &snaps);
            assert!(out.failed);
            fs.heal();
            let what = format!("seed {seed} failure at op {fail_at}");
            check_recovery(fs.clone(), &p, &snaps, &out, &what);
            reopen_all(fs, &snaps, &what);
            cases += 1;
        }
    }
    assert!(cases > 100);
}

#[test]
fn sim_paths_are_the_documented_layout() {
    let fs = SimFs::new();
    let p = plan(7);
    let snaps = prefix_snapshots(&p.records);
    drive(&fs, &p, &snaps);
    let paths = fs.paths();
    assert!(paths.contains(&Path::new(DIR).join("FORMAT")));
    assert!(paths.iter().any(|p| p.starts_with(Path::new(DIR).join("wal")) && p.extension() == Some("seg".as_ref())));
}
