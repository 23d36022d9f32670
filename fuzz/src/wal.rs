//! The `wal_recover` target: `macp-storage-fs`'s segment and frame
//! decoding and its crash recovery, on a data directory the fuzzer damages.
//!
//! A real data directory is built once on the storage crate's simulated file
//! system: every record of the [`crate::base`] kernel and of every
//! conformance vector's run, appended in small synced batches across many
//! small segments, with a checkpoint half way. Each input copies that
//! directory, damages it (bytes overwritten inside a segment, a segment
//! replaced or cut, the checkpoint replaced), and recovers from it.
//!
//! Recovery may refuse to start (a checkpoint that cannot be trusted), but
//! it must never panic, and when it does start:
//! * the kernel it returns checkpoint-round-trips and every quarantined
//!   session of the report is quarantined in the kernel;
//! * recovering the same directory again gives the same kernel (recovery is
//!   idempotent: truncating a torn tail changes nothing it had recovered);
//! * the storage accepts new records, and recovering after them gives the
//!   kernel that produced them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use macp_kernel::macp_wire::storage::Record;
use macp_kernel::{Effect, Identity, Input, Kernel};
use macp_storage_fs::{recover, FsConfig, FsStorage, SimFs, Storage, WAL_DIR};

use crate::base;

/// Where the data directory lives on the simulated file system.
const DIR: &str = "/macp-data";

/// The undamaged data directory and what it holds.
pub struct WalBase {
    image: SimFs,
    segments: Vec<PathBuf>,
    checkpoint: PathBuf,
    /// Records in the log.
    pub records: usize,
}

fn cfg() -> FsConfig {
    FsConfig { segment_bytes: 2048, ..FsConfig::default() }
}

/// Every record of the base kernel and of each vector's run, in one history.
pub fn history() -> Vec<Record> {
    let b = base::base();
    let mut records = b.records.clone();
    let mut k = base::kernel();
    let mut now = b.now_ms;
    for s in &b.sessions {
        for env in &s.steps {
            now += 1;
            let input =
                Input::Envelope { request: 1, identity: Identity::new(env.sender.clone()), envelope: env.clone() };
            records.extend(k.handle(now, input).into_iter().filter_map(|e| match e {
                Effect::Persist(r) => Some(r),
                _ => None,
            }));
        }
    }
    records
}

/// The undamaged directory, built on first use.
pub fn wal_base() -> &'static WalBase {
    static BASE: OnceLock<WalBase> = OnceLock::new();
    BASE.get_or_init(|| {
        let fs = SimFs::new();
        let mut storage = FsStorage::open_with(fs.clone(), DIR, cfg()).expect("a fresh directory opens");
        let rebuilt = recover(&mut storage, base::config()).expect("an empty directory recovers");
        let mut kernel = rebuilt.kernel;
        let records = history();
        for (i, batch) in records.chunks(5).enumerate() {
            storage.append(batch).expect("append");
            storage.sync().expect("sync");
            for r in batch {
                kernel.apply_record(r).expect("the history replays");
            }
            if i == records.len() / 10 {
                storage.checkpoint(&kernel.snapshot()).expect("checkpoint");
            }
        }
        drop(storage);
        let wal = Path::new(DIR).join(WAL_DIR);
        let segments: Vec<PathBuf> = fs.paths().into_iter().filter(|p| p.starts_with(&wal)).collect();
        assert!(segments.len() > 3, "the base log spans several segments");
        WalBase {
            image: fs,
            segments,
            checkpoint: Path::new(DIR).join(macp_storage_fs::CHECKPOINT_FILE),
            records: records.len(),
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
    match mode % 4 {
        // Overwrite bytes inside a segment (bit rot, a misdirected write).
        0 => {
            let mut bytes = fs.read_file(seg).unwrap_or_default();
            let at = offset % (bytes.len() + 1);
            let end = (at + payload.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&payload[..end - at]);
            bytes.extend_from_slice(&payload[end - at..]);
            fs.write_file_durable(seg, bytes);
        }
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
        _ => fs.write_file_durable(&b.checkpoint, rest.to_vec()),
    }
    check_recovery(&fs);
}

fn open_and_recover(fs: &SimFs) -> Option<(FsStorage<SimFs>, Kernel, macp_storage_fs::RecoveryReport)> {
    let mut storage = FsStorage::open_with(fs.clone(), DIR, cfg()).ok()?;
    let r = recover(&mut storage, base::config()).ok()?;
    Some((storage, r.kernel, r.report))
}

fn check_recovery(fs: &SimFs) {
    let Some((storage, mut kernel, report)) = open_and_recover(fs) else { return };
    let snap = kernel.snapshot();
    let restored = Kernel::restore(base::config(), &snap).expect("a recovered kernel's checkpoint restores");
    assert!(restored.snapshot() == snap, "a recovered kernel does not checkpoint-round-trip");
    for sid in report.quarantined.keys() {
        assert!(kernel.quarantined().contains(sid), "report quarantines {sid} but the kernel does not");
    }
    drop(storage);

    let (mut storage, again, _) = open_and_recover(fs).expect("a directory that recovered once recovers again");
    assert!(again.snapshot() == snap, "recovering the same directory twice gave different kernels: {report}");

    // The recovered storage takes new records, and they recover too.
    let now = base::base().now_ms + 86_400_000;
    let records: Vec<Record> = kernel
        .handle(now, Input::Tick)
        .into_iter()
        .filter_map(|e| match e {
            Effect::Persist(r) => Some(r),
            _ => None,
        })
        .collect();
    if storage.append(&records).and_then(|_| storage.sync()).is_err() {
        // The damaged directory may refuse writes (e.g. a segment it cannot
        // extend); refusing is allowed, losing is not, and nothing was
        // acknowledged.
        return;
    }
    drop(storage);
    let (_, third, _) = open_and_recover(fs).expect("a directory that took new records recovers");
    assert!(third.snapshot() == kernel.snapshot(), "records appended after recovery were not recovered");
}
