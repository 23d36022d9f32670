//! The `wal_recover` target: `macp-storage-fs`'s segment and frame
//! decoding, its ended-session index and its crash recovery (through the
//! pipeline's `recover`), on a data directory the fuzzer damages.
//!
//! A real data directory is built once on the storage crate's simulated file
//! system: every record of the [`crate::base`] kernel and of every
//! conformance vector's run, with the summaries of the sessions they end,
//! appended in small synced batches across many small segments, with a
//! checkpoint a tenth of the way and the index written by `maintain`. Each
//! input copies that directory, damages it (bytes overwritten inside a
//! segment, a segment replaced or cut, the checkpoint replaced, bytes of the
//! index overwritten), and recovers from it.
//!
//! Recovery may refuse to start (a checkpoint or index that cannot be
//! trusted), but it must never panic, and when it does start:
//! * the kernel it returns checkpoint-round-trips and every quarantined
//!   session of the report is quarantined in the kernel;
//! * recovering the same directory again gives the same kernel (recovery is
//!   idempotent: truncating a torn tail changes nothing it had recovered);
//! * reads of ended sessions return a summary, nothing, or a typed error;
//! * the storage accepts new records, and recovering after them gives the
//!   kernel that produced them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use macp_kernel::macp_wire::storage::{Record, SessionSummary};
use macp_kernel::{Effect, Identity, Input, Kernel};
use macp_pipeline::{recover, Pipeline, RecoverOptions, RecoveryReport};
use macp_storage::{summary_id, Storage};
use macp_storage_fs::{FsConfig, FsStorage, SimFs, CHECKPOINT_FILE, INDEX_FILE, WAL_DIR};

use crate::base;

/// Lets panics raised inside redb unwind to the storage crate instead of
/// aborting: `macp-storage-fs` runs every call into redb under
/// `catch_unwind` and turns a panic (redb does not checksum its pages, and
/// some damaged files make it panic) into a `Damaged` error, which is what
/// the server does too. libFuzzer's panic hook aborts on every panic, caught
/// or not, so this target installs a hook that lets panics located in redb's
/// source pass; any other panic still aborts (a crash), and a redb panic
/// that escaped the guard aborts too when it unwinds out of the target.
pub fn contain_index_panics() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_redb = info.location().is_some_and(|l| l.file().contains("/redb-"));
        if !in_redb {
            abort(info);
        }
    }));
}

/// Where the data directory lives on the simulated file system.
const DIR: &str = "/macp-data";

/// The undamaged data directory and what it holds.
pub struct WalBase {
    image: SimFs,
    segments: Vec<PathBuf>,
    checkpoint: PathBuf,
    index: PathBuf,
    /// Records in the log.
    pub records: usize,
    /// Ids of the sessions that ended.
    pub ended: Vec<String>,
}

fn cfg() -> FsConfig {
    FsConfig {
        segment_bytes: 2048,
        index_cache_bytes: 1 << 20,
        maintain_time_budget: std::time::Duration::MAX,
        ..FsConfig::default()
    }
}

/// Every record of the base kernel and of each vector's run, in one
/// history, and the summaries of the sessions that ended (after how many
/// records).
pub fn history() -> (Vec<Record>, Vec<(usize, SessionSummary)>) {
    let b = base::base();
    let mut records = b.records.clone();
    let mut ended = Vec::new();
    let mut k = base::kernel();
    let mut now = b.now_ms;
    for s in &b.sessions {
        for env in &s.steps {
            now += 1;
            let input =
                Input::Envelope { request: 1, identity: Identity::new(env.sender.clone()), envelope: env.clone() };
            for e in k.handle(now, input) {
                match e {
                    Effect::Persist(r) => records.push(r),
                    Effect::Ended(summary) => ended.push((records.len(), *summary)),
                    _ => {}
                }
            }
            k.settle_ended();
        }
    }
    (records, ended)
}

/// The undamaged directory, built on first use.
pub fn wal_base() -> &'static WalBase {
    static BASE: OnceLock<WalBase> = OnceLock::new();
    BASE.get_or_init(|| {
        let fs = SimFs::new();
        let mut storage = FsStorage::open_with(fs.clone(), DIR, cfg()).expect("a fresh directory opens");
        let _: (Pipeline<(), ()>, _) =
            recover(base::config(), &mut storage, RecoverOptions::default()).expect("an empty directory recovers");
        let mut kernel = Kernel::new(base::config());
        let (records, ended) = history();
        for (i, batch) in records.chunks(5).enumerate() {
            let (a, b) = (i * 5, i * 5 + batch.len());
            let summaries: Vec<SessionSummary> =
                ended.iter().filter(|(at, _)| *at > a && *at <= b).map(|(_, s)| s.clone()).collect();
            storage.append(batch, &summaries).expect("append");
            storage.sync().expect("sync");
            for r in batch {
                kernel.apply_record(r).expect("the history replays");
            }
            kernel.settle_ended();
            if i == records.len() / 50 {
                storage.checkpoint(&kernel.snapshot()).expect("checkpoint");
            }
            storage.maintain(0).expect("maintain");
        }
        drop(storage);
        let wal = Path::new(DIR).join(WAL_DIR);
        let segments: Vec<PathBuf> = fs.paths().into_iter().filter(|p| p.starts_with(&wal)).collect();
        assert!(segments.len() > 3, "the base log spans several segments");
        WalBase {
            image: fs,
            segments,
            checkpoint: Path::new(DIR).join(CHECKPOINT_FILE),
            index: Path::new(DIR).join(INDEX_FILE),
            records: records.len(),
            ended: ended.iter().map(|(_, s)| summary_id(s).to_string()).collect(),
        }
    })
}

/// Runs one input: `mode:u8` then the mode's bytes.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let b = wal_base();
    // A deep copy: everything in the base image is synced, so a "power cut"
    // image of it is identical and shares nothing with it.
    let fs = b.image.crash_image(0);
    let byte = |i: usize| rest.get(i).copied().unwrap_or(0);
    let seg = &b.segments[usize::from(byte(0)) % b.segments.len()];
    let offset = usize::from(u16::from_le_bytes([byte(1), byte(2)]));
    let payload = rest.get(3..).unwrap_or(&[]);
    let overwrite = |path: &Path, at: usize| {
        let mut bytes = fs.read_file(path).unwrap_or_default();
        let at = at % (bytes.len() + 1);
        let end = (at + payload.len()).min(bytes.len());
        bytes[at..end].copy_from_slice(&payload[..end - at]);
        bytes.extend_from_slice(&payload[end - at..]);
        fs.write_file_durable(path, bytes);
    };
    match mode % 5 {
        // Overwrite bytes inside a segment (bit rot, a misdirected write).
        0 => overwrite(seg, offset),
        // Replace a segment's content.
        1 => fs.write_file_durable(seg, payload.to_vec()),
        // Cut a segment short and append bytes.
        2 => {
            let mut bytes = fs.read_file(seg).unwrap_or_default();
            bytes.truncate(offset % (bytes.len() + 1));
            bytes.extend_from_slice(payload);
            fs.write_file_durable(seg, bytes);
        }
        // Replace the checkpoint.
        3 => fs.write_file_durable(&b.checkpoint, rest.to_vec()),
        // Overwrite bytes of the index (a page anywhere in the file).
        _ => overwrite(&b.index, usize::from(byte(0)) << 12 | offset % 4096),
    }
    check_recovery(&fs);
}

type Recovered = (FsStorage<SimFs>, Kernel, RecoveryReport);

fn open_and_recover(fs: &SimFs) -> Option<Recovered> {
    let mut storage = FsStorage::open_with(fs.clone(), DIR, cfg()).ok()?;
    let (pipe, report): (Pipeline<(), ()>, _) =
        recover(base::config(), &mut storage, RecoverOptions::default()).ok()?;
    let kernel = Kernel::restore(base::config(), &pipe.kernel().snapshot()).ok()?;
    Some((storage, kernel, report))
}

fn check_recovery(fs: &SimFs) {
    let Some((storage, mut kernel, report)) = open_and_recover(fs) else { return };
    let snap = kernel.snapshot();
    let restored = Kernel::restore(base::config(), &snap).expect("a recovered kernel's checkpoint restores");
    assert!(restored.snapshot() == snap, "a recovered kernel does not checkpoint-round-trip");
    for sid in report.quarantined.keys() {
        assert!(kernel.quarantined().contains(sid), "report quarantines {sid} but the kernel does not");
    }
    // Reads of ended sessions never panic: a summary, nothing, or an error.
    let reader = storage.reader();
    for sid in wal_base().ended.iter().take(16) {
        let _ = reader.ended(sid);
        let _ = reader.history(sid, 0, u64::MAX);
    }
    let _ = reader.list_ended(None, 64);
    drop(reader);
    drop(storage);

    let (mut storage, again, _) = open_and_recover(fs).expect("a directory that recovered once recovers again");
    assert!(again.snapshot() == snap, "recovering the same directory twice gave different kernels: {report}");

    // The recovered storage takes new records, and they recover too.
    let now = base::base().now_ms + 86_400_000;
    let mut records = Vec::new();
    let mut ended = Vec::new();
    for e in kernel.handle(now, Input::Tick) {
        match e {
            Effect::Persist(r) => records.push(r),
            Effect::Ended(s) => ended.push(*s),
            _ => {}
        }
    }
    if storage.append(&records, &ended).and_then(|()| storage.sync()).is_err() {
        // The damaged directory may refuse writes (e.g. a segment it cannot
        // extend); refusing is allowed, losing is not, and nothing was
        // acknowledged.
        return;
    }
    drop(storage);
    let (_, third, _) = open_and_recover(fs).expect("a directory that took new records recovers");
    assert!(third.snapshot() == kernel.snapshot(), "records appended after recovery were not recovered");
}
