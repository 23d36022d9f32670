//! `verify`: is this data directory (or database) whole?
//!
//! 1. **Every checksum.** Every frame of every segment is read and its
//!    header and payload checksums checked, and every payload decoded as a
//!    record ([`FsStorage::scan_log`]): load reads only the tail after the
//!    checkpoint, so this is the only pass that reads all of history. In a
//!    database, every row of the log is decoded ([`macp_storage_pg::PgStorage::scan_log`]);
//!    PostgreSQL keeps its own checksums of the pages.
//! 2. **A full replay compared with the checkpoint.** When the log still
//!    starts at its beginning (no segment retired; in a database, no row
//!    deleted by retention, so its positions run from 1 without a gap),
//!    every record is applied to a fresh kernel with
//!    `Kernel::apply_record`, the code recovery replays with; at the
//!    checkpoint's position the kernel's snapshot must equal the
//!    checkpoint's open state, byte for byte (snapshots are deterministic:
//!    equal snapshots, equal states).
//! 3. **The server's own recovery** (`macp_pipeline::recover`, checkpoint
//!    plus tail) over the read-only directory or snapshot must be clean,
//!    and its state must equal the full replay's at the end of the log.
//! 4. **The ended-session index**: every ended session's summary reads, and
//!    its history reads back (checksums, session and sequence of each
//!    frame or row) with as many records as the summary says. In a
//!    database, also every session the full replay saw end has its
//!    summary: there, recovery's copy of one is not kept.
//!
//! A database is read in one snapshot ([`macp_storage_pg::PgStorage::open_read_only`]), so
//! the four checks see the same rows while its server goes on writing.
//!
//! A torn tail (a crash cut the last write, never acknowledged; recovery
//! truncates it) is reported but is not damage.

use std::ops::ControlFlow;
use std::path::Path;

use macp_kernel::text::Count;
use macp_kernel::{Kernel, KernelConfig};
use macp_pipeline::RecoveryError;
use macp_storage::{LoadEvent, LogPos, Record, StorageError};
use macp_storage_fs::{FsConfig, FsStorage, LogItem, WAL_DIR};
use macp_storage_pg::{PgInfo, PgUrl};
use serde_json::{json, Map, Value};

use crate::data::{Data, Store};
use crate::source::{open_db, Source};
use crate::{progress, AdminError, Outcome};

/// One problem found.
struct Problem {
    /// Segment file (`wal/NNN.seg`) or table (`macp_records`), or the
    /// file or place concerned.
    file: String,
    /// Byte offset in the segment, or log position in the table.
    offset: Option<u64>,
    what: String,
}

impl Problem {
    fn at(file: impl Into<String>, offset: Option<u64>, what: String) -> Problem {
        Problem { file: file.into(), offset, what }
    }
}

/// How a backend names the places of its log in the report.
struct Places {
    /// The segment file, or the table, of a log position, and the offset
    /// or position within it.
    log: fn(LogPos) -> (String, u64),
    /// A log position in prose.
    name: fn(LogPos) -> String,
    /// What the number after the file is (`offset`, `position`): in the
    /// text and as the key in JSON.
    unit: &'static str,
    /// The checkpoint (file or table).
    checkpoint: &'static str,
    /// The index of ended sessions (file or table).
    index: &'static str,
}

const FILES: Places = Places {
    log: |pos| (format!("{WAL_DIR}/{:020}.seg", pos.segment), pos.offset),
    name: |pos| pos.to_string(),
    unit: "offset",
    checkpoint: "checkpoint",
    index: macp_storage_fs::INDEX_FILE,
};

const TABLES: Places = Places {
    log: |pos| ("macp_records".to_string(), pos.offset),
    name: |pos| format!("log position {}", pos.offset),
    unit: "position",
    checkpoint: "macp_checkpoint",
    index: "macp_ended",
};

impl Places {
    fn problem(&self, pos: LogPos, what: String) -> Problem {
        let (file, offset) = (self.log)(pos);
        Problem::at(file, Some(offset), what)
    }
}

/// What every check found, and the report's figures.
struct Findings {
    places: &'static Places,
    problems: Vec<Problem>,
    notes: Vec<String>,
    records: u64,
    compared: bool,
    ended_checked: u64,
}

impl Findings {
    fn new(places: &'static Places) -> Findings {
        Findings { places, problems: Vec::new(), notes: Vec::new(), records: 0, compared: false, ended_checked: 0 }
    }
}

/// Check 2: every record through a fresh kernel, compared with the
/// checkpoint once the replay reaches the checkpoint's position.
struct FullReplay {
    /// `None` once the full replay is not possible.
    kernel: Option<Kernel>,
    /// The checkpoint's position and its open state as a kernel snapshot.
    expected: Option<(LogPos, Vec<u8>)>,
    /// Sessions a record ended, with that record's position.
    ended: Vec<(String, LogPos)>,
}

impl FullReplay {
    fn new(possible: bool) -> FullReplay {
        FullReplay { kernel: possible.then(|| Kernel::new(KernelConfig::default())), expected: None, ended: Vec::new() }
    }

    /// The checkpoint at `pos`, to compare with; one that does not
    /// restore is damage.
    fn expect(&mut self, pos: LogPos, open_state: &[u8], f: &mut Findings) {
        match Kernel::restore(KernelConfig::default(), open_state) {
            Ok(k) => self.expected = Some((pos, k.snapshot())),
            Err(e) => f.problems.push(Problem::at(f.places.checkpoint, None, format!("does not restore: {e}"))),
        }
    }

    /// Compares with the checkpoint before the first record at or after
    /// its position (`None`: the end of the log), once.
    fn compare_at(&mut self, pos: Option<LogPos>, f: &mut Findings) {
        let (Some((at, want)), Some(k), false) = (&self.expected, &self.kernel, f.compared) else { return };
        if pos.is_some_and(|p| p < *at) {
            return;
        }
        f.compared = true;
        if k.snapshot() != *want {
            let what = format!(
                "the full replay of the log up to {} disagrees with the checkpoint's open state",
                (f.places.name)(*at)
            );
            f.problems.push(Problem::at(f.places.checkpoint, None, what));
        }
    }

    fn record(&mut self, pos: LogPos, record: &Record, f: &mut Findings) {
        f.records += 1;
        self.compare_at(Some(pos), f);
        let Some(k) = self.kernel.as_mut() else { return };
        match k.apply_record(record) {
            Ok(Some(_)) => self.ended.push((record.session_id.clone(), pos)),
            Ok(None) => {}
            Err(e) => {
                let what =
                    format!("record {}#{} does not replay through the kernel: {e}", record.session_id, record.seq);
                f.problems.push(f.places.problem(pos, what));
            }
        }
    }
}

/// `verify`.
pub fn verify(source: &Source, as_json: bool) -> Result<Outcome, AdminError> {
    match source {
        Source::Dir(dir) => verify_dir(dir, as_json),
        Source::Db(url) => verify_db(source, url, as_json),
    }
}

fn verify_dir(dir: &Path, as_json: bool) -> Result<Outcome, AdminError> {
    let mut f = Findings::new(&FILES);
    // Opening takes the shared lock, held until `storage` is dropped; the
    // scan runs before recovery so that it sees the files as they are.
    let storage = FsStorage::open_read_only(dir, FsConfig::default())?;
    let segments = storage.segment_files()?;
    let checkpoint = match storage.checkpoint_info() {
        Ok(c) => c,
        Err(StorageError::CheckpointCorrupt { reason, .. }) => {
            f.problems.push(Problem::at("checkpoint", None, format!("unreadable: {reason}")));
            None
        }
        Err(e) => return Err(e.into()),
    };
    let from_start = segments.first().is_none_or(|s| s.number == 1);
    let mut full = FullReplay::new(from_start);
    if !from_start {
        f.notes.push(format!(
            "segments before {} were retired: the full replay is not possible, the checkpoint and tail are checked",
            segments.first().map_or(String::new(), |s| s.name.clone())
        ));
    }
    if let Some(c) = &checkpoint {
        full.expect(c.pos, &c.open_state, &mut f);
    }
    let mut torn = None;
    let total: u64 = segments.iter().map(|s| s.bytes).sum();
    let bar = progress::bar(total, "verify", true);
    storage.scan_log(&mut |item| {
        match item {
            LogItem::Record { pos, record } => full.record(pos, &record, &mut f),
            LogItem::Carried { .. } => {}
            LogItem::Damage(d) => f.problems.push(FILES.problem(
                LogPos::new(d.segment, d.offset),
                format!(
                    "{:?} ({} bytes){}",
                    d.kind,
                    d.len,
                    d.session_hint.map(|s| format!(", session {s}")).unwrap_or_default()
                ),
            )),
            LogItem::TornTail { pos, bytes } => torn = Some((pos, bytes)),
            LogItem::SegmentEnd { bytes, .. } => bar.inc(bytes),
        }
        ControlFlow::Continue(())
    })?;
    full.compare_at(None, &mut f);
    bar.finish_and_clear();
    if let Some((pos, bytes)) = torn {
        let (file, offset) = (FILES.log)(pos);
        f.notes.push(format!(
            "torn tail: {file} offset {offset} ({bytes} bytes) — a crash cut the last write; recovery truncates it"
        ));
    }
    drop(storage);

    // The server's recovery over the same (read-only) directory.
    if let Some(data) = recovered(Data::open(&Source::Dir(dir.to_path_buf())), &mut f)? {
        check_recovered(&data, &full, &mut f);
    }

    let summary = format!(
        "{}, {}, {}, {} checked",
        Count::of(segments.len(), "segment"),
        Count::of(total, "byte"),
        Count::of(f.records, "record"),
        Count::of(f.ended_checked, "ended session"),
    );
    let mut figures = Map::new();
    figures.insert("segments".into(), json!(segments.len()));
    figures.insert("bytes".into(), json!(total));
    Ok(report(&f, summary, figures, as_json))
}

/// `verify` of a database: the four checks in one snapshot.
fn verify_db(source: &Source, url: &PgUrl, as_json: bool) -> Result<Outcome, AdminError> {
    let mut f = Findings::new(&TABLES);
    let storage = open_db(url)?;
    let info = storage.info()?;
    let checkpoint_at = info.checkpoint.as_ref().map(|c| LogPos::new(0, c.covers));
    let mut full = FullReplay::new(true);
    // Positions run from 1, one per record, until retention deletes rows:
    // past a gap, the full replay is not possible.
    let mut next = 1u64;
    let bar = progress::bar(info.records, "verify", false);
    storage.scan_log(&mut |ev| {
        let pos = match &ev {
            LoadEvent::Checkpoint { open_state } => {
                if let Some(at) = checkpoint_at {
                    full.expect(at, open_state, &mut f);
                }
                return Ok(());
            }
            LoadEvent::Record { pos, .. } => *pos,
            LoadEvent::Damage(d) => LogPos::new(0, d.offset),
        };
        if pos.offset != next && full.kernel.take().is_some() {
            f.notes.push(gap_note(next, pos.offset));
        }
        next = pos.offset.saturating_add(1);
        match ev {
            LoadEvent::Record { pos, record } => full.record(pos, &record, &mut f),
            LoadEvent::Damage(d) => {
                let what = format!(
                    "the row does not decode as a record ({} bytes{}): {:?}",
                    d.len,
                    d.session_hint.map(|s| format!(", session {s}")).unwrap_or_default(),
                    d.kind
                );
                f.problems.push(TABLES.problem(pos, what));
            }
            LoadEvent::Checkpoint { .. } => {}
        }
        bar.inc(1);
        Ok(())
    })?;
    // Rows deleted at the end of the log: the checkpoint covers more than
    // the log holds.
    if let Some(at) = checkpoint_at.filter(|at| at.offset > next && full.kernel.is_some()) {
        full.kernel = None;
        f.notes.push(gap_note(next, at.offset));
    }
    full.compare_at(None, &mut f);
    bar.finish_and_clear();

    // The server's recovery over the same snapshot.
    if let Some(data) = recovered(Data::recover(Store::Pg(storage)), &mut f)? {
        check_recovered(&data, &full, &mut f);
        if full.kernel.is_some() {
            check_summaries(&data, &full, &mut f);
        }
    }

    let summary = format!(
        "schema version {}, {}{}, {}, {} checked",
        info.schema_version,
        Count::of(f.records, "record"),
        positions(&info),
        Count::of(info.bytes, "byte"),
        Count::of(f.ended_checked, "ended session"),
    );
    let mut figures = Map::new();
    figures.insert("database".into(), json!(source.to_string()));
    figures.insert("schema_version".into(), json!(info.schema_version));
    figures.insert("bytes".into(), json!(info.bytes));
    Ok(report(&f, summary, figures, as_json))
}

fn gap_note(from: u64, to: u64) -> String {
    format!(
        "log positions {from} to {} were deleted (retention): the full replay is not possible, the checkpoint and \
         the records after it are checked",
        to.saturating_sub(1)
    )
}

fn positions(info: &PgInfo) -> String {
    match (info.first_pos, info.last_pos) {
        (Some(first), Some(last)) => format!(" (positions {first} to {last})"),
        _ => String::new(),
    }
}

/// The outcome of recovery: the recovered data, or `None` when recovery
/// failed on the data, which is damage (the server would not start); an
/// error when the storage itself could not be read.
fn recovered(opened: Result<Data, AdminError>, f: &mut Findings) -> Result<Option<Data>, AdminError> {
    match opened {
        Ok(data) => Ok(Some(data)),
        Err(AdminError::Recovery(e))
            if !matches!(e, RecoveryError::Storage(StorageError::Io { .. } | StorageError::Locked(_))) =>
        {
            let what = format!("recovery fails, so the server would not start: {e}");
            f.problems.push(Problem::at("-", None, what));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Checks 3 and 4 of the module docs on the recovered data.
fn check_recovered(data: &Data, full: &FullReplay, f: &mut Findings) {
    let places = f.places;
    let report = &data.report;
    for d in &report.damage {
        let what = format!("recovery: {:?} ({} bytes)", d.kind, d.len);
        f.problems.push(places.problem(LogPos::new(d.segment, d.offset), what));
    }
    for r in &report.rejected {
        let what = format!("recovery: record {}#{} rejected: {}", r.session_id, r.seq, r.reason);
        f.problems.push(places.problem(r.pos, what));
    }
    for (s, why) in &report.quarantined {
        f.problems.push(Problem::at("-", None, format!("recovery quarantines session {s}: {why}")));
    }
    if let (Some(k), true) = (&full.kernel, f.problems.is_empty()) {
        if k.snapshot() != data.pipeline.kernel().snapshot() {
            let what = "recovery (checkpoint + tail) and the full replay of the log end in different states".into();
            f.problems.push(Problem::at(places.checkpoint, None, what));
        }
    }

    // The index of ended sessions.
    let sessions = match data.sessions() {
        Ok(s) => s,
        Err(e) => {
            f.problems.push(Problem::at(places.index, None, format!("ended sessions do not list: {e}")));
            Vec::new()
        }
    };
    for s in sessions {
        let Some(last_seq) = s.last_seq.filter(|_| s.ended_at.is_some()) else { continue };
        f.ended_checked += 1;
        let sid = &s.metadata.session_id;
        let what = match data.history(sid) {
            Ok(h) if h.len() as u64 == last_seq => continue,
            Ok(h) => format!("ended session {sid}: {} of its {last_seq} records are readable", h.len()),
            Err(e) => format!("ended session {sid}: history does not read: {e}"),
        };
        f.problems.push(Problem::at(places.index, None, what));
    }
}

/// Check 4's addition for a database: every session the full replay saw
/// end has its summary (the read-only snapshot drops the copies recovery
/// hands back, so a missing one would otherwise go unseen).
fn check_summaries(data: &Data, full: &FullReplay, f: &mut Findings) {
    for (sid, pos) in &full.ended {
        let what = match data.reader().ended(sid) {
            Ok(Some(_)) => continue,
            Ok(None) => format!("session {sid} ended at log position {} but has no summary", pos.offset),
            Err(e) => format!("ended session {sid}: summary does not read: {e}"),
        };
        f.problems.push(Problem::at(f.places.index, None, what));
    }
}

/// Prints the report: `summary` and the checkpoint line, notes, problems,
/// the verdict; or one JSON object with `figures` besides the common
/// fields.
fn report(f: &Findings, summary: String, figures: Map<String, Value>, as_json: bool) -> Outcome {
    let healthy = f.problems.is_empty();
    let unit = f.places.unit;
    if as_json {
        let problems: Vec<Value> = f
            .problems
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("file".into(), json!(p.file));
                m.insert(unit.into(), json!(p.offset));
                m.insert("problem".into(), json!(p.what));
                Value::Object(m)
            })
            .collect();
        let mut v = figures;
        v.insert("healthy".into(), json!(healthy));
        v.insert("records".into(), json!(f.records));
        v.insert("ended_sessions_checked".into(), json!(f.ended_checked));
        v.insert("checkpoint_compared".into(), json!(f.compared));
        v.insert("problems".into(), Value::Array(problems));
        v.insert("notes".into(), json!(f.notes));
        println!("{}", Value::Object(v));
    } else {
        let compared = if f.compared { "compared with a full replay" } else { "not compared" };
        println!("{summary}; checkpoint {compared}");
        for n in &f.notes {
            println!("note: {n}");
        }
        for p in &f.problems {
            match p.offset {
                Some(o) => println!("DAMAGE {} {unit} {o}: {}", p.file, p.what),
                None => println!("DAMAGE {}: {}", p.file, p.what),
            }
        }
        println!("{}", if healthy { "healthy" } else { "DAMAGED" });
    }
    if healthy {
        Outcome::Ok
    } else {
        Outcome::Failed
    }
}
