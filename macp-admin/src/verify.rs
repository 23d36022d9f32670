//! `verify`: is this data directory whole?
//!
//! 1. **Every checksum.** Every frame of every segment is read and its
//!    header and payload checksums checked, and every payload decoded as a
//!    record ([`FsStorage::scan_log`]): load reads only the tail after the
//!    checkpoint, so this is the only pass that reads all of history.
//! 2. **A full replay compared with the checkpoint.** When the log still
//!    starts at segment 1 (nothing retired), every record is applied to a
//!    fresh kernel with `Kernel::apply_record`, the code recovery replays
//!    with; at the checkpoint's position the kernel's snapshot must equal
//!    the checkpoint's open state, byte for byte (snapshots are
//!    deterministic: equal snapshots, equal states).
//! 3. **The server's own recovery** (`macp_pipeline::recover`, checkpoint
//!    plus tail) over the read-only directory must be clean, and its state
//!    must equal the full replay's at the end of the log.
//! 4. **The ended-session index**: every ended session's summary reads, and
//!    its history reads back (checksums, session and sequence of each
//!    frame) with as many records as the summary says.
//!
//! A torn tail (a crash cut the last write, never acknowledged; recovery
//! truncates it) is reported but is not damage.

use std::ops::ControlFlow;
use std::path::Path;

use macp_kernel::text::Count;
use macp_kernel::{Kernel, KernelConfig};
use macp_pipeline::RecoveryError;
use macp_storage::{LogPos, StorageError};
use macp_storage_fs::{FsConfig, FsStorage, LogItem, WAL_DIR};
use serde_json::{json, Value};

use crate::data::Data;
use crate::{progress, AdminError, Outcome};

/// One problem found.
struct Problem {
    /// Segment file (`wal/NNN.seg`), or the file or place concerned.
    file: String,
    offset: Option<u64>,
    what: String,
}

fn seg_file(segment: u64) -> String {
    format!("{WAL_DIR}/{segment:020}.seg")
}

/// `verify`.
pub fn verify(dir: &Path, as_json: bool) -> Result<Outcome, AdminError> {
    let mut problems: Vec<Problem> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // Opening takes the shared lock, held until `storage` is dropped; the
    // scan runs before recovery so that it sees the files as they are.
    let storage = FsStorage::open_read_only(dir, FsConfig::default())?;
    let segments = storage.segment_files()?;
    let checkpoint = match storage.checkpoint_info() {
        Ok(c) => c,
        Err(StorageError::CheckpointCorrupt { reason, .. }) => {
            problems.push(Problem { file: "checkpoint".into(), offset: None, what: format!("unreadable: {reason}") });
            None
        }
        Err(e) => return Err(e.into()),
    };
    let from_start = segments.first().is_none_or(|s| s.number == 1);
    let mut full = from_start.then(|| Kernel::new(KernelConfig::default()));
    if !from_start {
        notes.push(format!(
            "segments before {} were retired: the full replay is not possible, the checkpoint and tail are checked",
            segments.first().map_or(String::new(), |s| s.name.clone())
        ));
    }
    let expected = match &checkpoint {
        Some(c) => match Kernel::restore(KernelConfig::default(), &c.open_state) {
            Ok(k) => Some((c.pos, k.snapshot())),
            Err(e) => {
                problems.push(Problem {
                    file: "checkpoint".into(),
                    offset: None,
                    what: format!("does not restore: {e}"),
                });
                None
            }
        },
        None => None,
    };
    let mut compared = false;
    let mut records = 0u64;
    let mut torn = None;
    let total: u64 = segments.iter().map(|s| s.bytes).sum();
    let bar = progress::bar(total, "verify", true);
    let mut compare_at = |pos: Option<LogPos>, full: &Option<Kernel>, problems: &mut Vec<Problem>| {
        let (Some((at, want)), Some(k), false) = (&expected, full, compared) else { return };
        if pos.is_some_and(|p| p < *at) {
            return;
        }
        compared = true;
        if k.snapshot() != *want {
            problems.push(Problem {
                file: "checkpoint".into(),
                offset: None,
                what: format!("the full replay of the log up to {at} disagrees with the checkpoint's open state"),
            });
        }
    };
    storage.scan_log(&mut |item| {
        match item {
            LogItem::Record { pos, record } => {
                records += 1;
                compare_at(Some(pos), &full, &mut problems);
                if let Some(k) = full.as_mut() {
                    if let Err(e) = k.apply_record(&record) {
                        problems.push(Problem {
                            file: seg_file(pos.segment),
                            offset: Some(pos.offset),
                            what: format!(
                                "record {}#{} does not replay through the kernel: {e}",
                                record.session_id, record.seq
                            ),
                        });
                    }
                }
            }
            LogItem::Carried { .. } => {}
            LogItem::Damage(d) => problems.push(Problem {
                file: seg_file(d.segment),
                offset: Some(d.offset),
                what: format!(
                    "{:?} ({} bytes){}",
                    d.kind,
                    d.len,
                    d.session_hint.map(|s| format!(", session {s}")).unwrap_or_default()
                ),
            }),
            LogItem::TornTail { pos, bytes } => torn = Some((pos, bytes)),
            LogItem::SegmentEnd { bytes, .. } => bar.inc(bytes),
        }
        ControlFlow::Continue(())
    })?;
    compare_at(None, &full, &mut problems);
    bar.finish_and_clear();
    if let Some((pos, bytes)) = torn {
        notes.push(format!(
            "torn tail: {} offset {} ({bytes} bytes) — a crash cut the last write; recovery truncates it",
            seg_file(pos.segment),
            pos.offset
        ));
    }
    drop(storage);

    // The server's recovery over the same (read-only) directory. One that
    // fails is damage (the server would not start), except when the disk
    // itself could not be read.
    let ended = match Data::open(dir) {
        Ok(data) => check_recovered(&data, &full, &mut problems)?,
        Err(AdminError::Recovery(e))
            if !matches!(e, RecoveryError::Storage(StorageError::Io { .. } | StorageError::Locked(_))) =>
        {
            let what = format!("recovery fails, so the server would not start: {e}");
            problems.push(Problem { file: "-".into(), offset: None, what });
            0
        }
        Err(e) => return Err(e),
    };

    let healthy = problems.is_empty();
    if as_json {
        let ps: Vec<Value> =
            problems.iter().map(|p| json!({"file": p.file, "offset": p.offset, "problem": p.what})).collect();
        let v = json!({
            "healthy": healthy,
            "segments": segments.len(),
            "bytes": total,
            "records": records,
            "ended_sessions_checked": ended,
            "checkpoint_compared": compared,
            "problems": ps,
            "notes": notes,
        });
        println!("{v}");
    } else {
        println!(
            "{}, {}, {}, {} checked; checkpoint {}",
            Count::of(segments.len(), "segment"),
            Count::of(total, "byte"),
            Count::of(records, "record"),
            Count::of(ended, "ended session"),
            if compared { "compared with a full replay" } else { "not compared" }
        );
        for n in &notes {
            println!("note: {n}");
        }
        for p in &problems {
            match p.offset {
                Some(o) => println!("DAMAGE {} offset {o}: {}", p.file, p.what),
                None => println!("DAMAGE {}: {}", p.file, p.what),
            }
        }
        println!("{}", if healthy { "healthy" } else { "DAMAGED" });
    }
    Ok(if healthy { Outcome::Ok } else { Outcome::Failed })
}

/// Checks 3 and 4 of the module docs on the recovered directory; returns
/// how many ended sessions were read back.
fn check_recovered(data: &Data, full: &Option<Kernel>, problems: &mut Vec<Problem>) -> Result<u64, AdminError> {
    let report = &data.report;
    for d in &report.damage {
        problems.push(Problem {
            file: seg_file(d.segment),
            offset: Some(d.offset),
            what: format!("recovery: {:?} ({} bytes)", d.kind, d.len),
        });
    }
    for r in &report.rejected {
        problems.push(Problem {
            file: seg_file(r.pos.segment),
            offset: Some(r.pos.offset),
            what: format!("recovery: record {}#{} rejected: {}", r.session_id, r.seq, r.reason),
        });
    }
    for (s, why) in &report.quarantined {
        problems.push(Problem {
            file: "-".into(),
            offset: None,
            what: format!("recovery quarantines session {s}: {why}"),
        });
    }
    if let (Some(k), true) = (full, problems.is_empty()) {
        if k.snapshot() != data.pipeline.kernel().snapshot() {
            problems.push(Problem {
                file: "checkpoint".into(),
                offset: None,
                what: "recovery (checkpoint + tail) and the full replay of the log end in different states".into(),
            });
        }
    }

    // The index of ended sessions.
    let mut ended = 0u64;
    let sessions = match data.sessions() {
        Ok(s) => s,
        Err(e) => {
            let what = format!("ended sessions do not list: {e}");
            problems.push(Problem { file: macp_storage_fs::INDEX_FILE.into(), offset: None, what });
            Vec::new()
        }
    };
    for s in sessions {
        let Some(last_seq) = s.last_seq.filter(|_| s.ended_at.is_some()) else { continue };
        ended += 1;
        let sid = &s.metadata.session_id;
        match data.history(sid) {
            Ok(h) if h.len() as u64 == last_seq => {}
            Ok(h) => problems.push(Problem {
                file: macp_storage_fs::INDEX_FILE.into(),
                offset: None,
                what: format!("ended session {sid}: {} of its {last_seq} records are readable", h.len()),
            }),
            Err(e) => problems.push(Problem {
                file: macp_storage_fs::INDEX_FILE.into(),
                offset: None,
                what: format!("ended session {sid}: history does not read: {e}"),
            }),
        }
    }
    Ok(ended)
}
