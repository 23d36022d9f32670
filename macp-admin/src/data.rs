//! The data commands: `inspect`, `sessions`, `history`, `export`.
//!
//! Each opens the data directory or the database read-only and recovers it
//! exactly as the server does (see the crate docs), then reads sessions and
//! histories through the storage contract: open sessions from the
//! recovered kernel, ended ones from the storage's index, records through
//! [`macp_storage::StorageRead::history`]. So the output is the same
//! whichever backend the server ran on.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use macp_kernel::KernelConfig;
use macp_pipeline::{recover, Pipeline, RecoverOptions, RecoveryReport};
use macp_storage::{summary_id, Storage, StorageRead};
use macp_storage_fs::{FsConfig, FsStorage, ReadOnlyFs, FORMAT_FILE, INDEX_FILE};
use macp_storage_pg::{PgInfo, PgStorage};
use macp_wire::v1::SessionMetadata;
use serde_json::{json, Value};

use crate::source::{open_db, Source};
use crate::{json as j, progress, AdminError};

/// The storage a [`Data`] was recovered from, opened read-only.
pub enum Store {
    /// A data directory.
    Fs(FsStorage<ReadOnlyFs>),
    /// A database, in one snapshot.
    Pg(PgStorage),
}

/// A data directory or database opened read-only and recovered.
pub struct Data {
    pub store: Store,
    pub pipeline: Pipeline<(), ()>,
    pub report: RecoveryReport,
}

/// Ended sessions are listed from the index this many at a time.
const PAGE: usize = 1000;

/// One session as listed.
pub struct Listed {
    pub metadata: SessionMetadata,
    pub ended_at: Option<i64>,
    pub last_seq: Option<u64>,
}

impl Data {
    /// Opens `source` read-only (refusing a directory a server holds; a
    /// database is read in a snapshot beside its server) and recovers it
    /// through the kernel, as the server would.
    pub fn open(source: &Source) -> Result<Data, AdminError> {
        match source {
            Source::Dir(dir) => Self::recover(Store::Fs(FsStorage::open_read_only(dir, FsConfig::default())?)),
            Source::Db(url) => Self::recover(Store::Pg(open_db(url)?)),
        }
    }

    /// Recovers the opened `store` through the kernel, as the server would.
    pub fn recover(mut store: Store) -> Result<Data, AdminError> {
        let storage: &mut dyn Storage = match &mut store {
            Store::Fs(s) => s,
            Store::Pg(s) => s,
        };
        let (pipeline, report) = recover(KernelConfig::default(), storage, RecoverOptions::default())?;
        Ok(Data { store, pipeline, report })
    }

    pub fn reader(&self) -> &Arc<dyn StorageRead> {
        self.pipeline.reader()
    }

    /// Every session, open and ended, in session-id order.
    pub fn sessions(&self) -> Result<Vec<Listed>, AdminError> {
        let mut all: BTreeMap<String, Listed> = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.reader().list_ended(after.as_deref(), PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(summary_id(last).to_string());
            let full = page.len() < PAGE;
            for s in page {
                let Some(m) = s.metadata else { continue };
                let listed = Listed { ended_at: Some(s.ended_at_unix_ms), last_seq: Some(s.last_seq), metadata: m };
                all.insert(listed.metadata.session_id.clone(), listed);
            }
            if full {
                break;
            }
        }
        let kernel = self.pipeline.kernel();
        for m in kernel.all_sessions() {
            let last_seq = kernel.session(&m.session_id).map(|s| s.seq);
            all.insert(m.session_id.clone(), Listed { metadata: m, ended_at: None, last_seq });
        }
        Ok(all.into_values().collect())
    }

    /// A session's accepted history, in order.
    pub fn history(&self, session_id: &str) -> Result<Vec<macp_storage::Record>, AdminError> {
        Ok(self.reader().history(session_id, 0, u64::MAX)?)
    }
}

fn out() -> BufWriter<io::StdoutLock<'static>> {
    BufWriter::new(io::stdout().lock())
}

/// Sessions counted by (open or ended, mode, state).
type Counts = BTreeMap<(&'static str, String, String), u64>;

fn counts(data: &Data) -> Result<Counts, AdminError> {
    let mut counts = Counts::new();
    for s in data.sessions()? {
        let kind = if s.ended_at.is_some() { "ended" } else { "open" };
        *counts.entry((kind, s.metadata.mode.clone(), j::state_name(s.metadata.state))).or_default() += 1;
    }
    Ok(counts)
}

fn counts_json(counts: &Counts) -> Vec<Value> {
    counts.iter().map(|((k, m, s), n)| json!({"group": k, "mode": m, "state": s, "count": n})).collect()
}

/// The recovery line and the table of session counts.
fn write_counts(o: &mut impl Write, data: &Data, counts: &Counts) -> io::Result<()> {
    writeln!(o, "recovery     {}", data.report)?;
    writeln!(o)?;
    writeln!(o, "{:<6} {:<32} {:<10} {:>8}", "GROUP", "MODE", "STATE", "COUNT")?;
    for ((k, m, s), n) in counts {
        writeln!(o, "{k:<6} {m:<32} {s:<10} {n:>8}")?;
    }
    Ok(())
}

/// `inspect`.
pub fn inspect(source: &Source, as_json: bool) -> Result<(), AdminError> {
    let data = Data::open(source)?;
    match &data.store {
        Store::Fs(storage) => inspect_dir(storage, &data, as_json),
        Store::Pg(storage) => inspect_db(source, &storage.info()?, &data, as_json),
    }
}

fn inspect_dir(storage: &FsStorage<ReadOnlyFs>, data: &Data, as_json: bool) -> Result<(), AdminError> {
    let dir = storage.dir();
    let format = std::fs::read_to_string(dir.join(FORMAT_FILE)).unwrap_or_default().trim().to_string();
    let segments = storage.segment_files()?;
    let seg_bytes: u64 = segments.iter().map(|s| s.bytes).sum();
    let checkpoint = match storage.checkpoint_info() {
        Ok(Some(c)) => json!({"present": true, "segment": c.pos.segment, "offset": c.pos.offset, "bytes": c.bytes}),
        Ok(None) => json!({"present": false}),
        Err(e) => json!({"present": true, "unreadable": e.to_string()}),
    };
    let index_bytes = std::fs::metadata(dir.join(INDEX_FILE)).map(|m| m.len()).unwrap_or(0);
    let ckpt_bytes = checkpoint.get("bytes").and_then(Value::as_u64).unwrap_or(0);
    let counts = counts(data)?;
    let total = seg_bytes + index_bytes + ckpt_bytes;
    let mut o = out();
    if as_json {
        let v = json!({
            "data_dir": dir.display().to_string(),
            "format": format,
            "segments": {"count": segments.len(), "bytes": seg_bytes,
                         "first": segments.first().map(|s| &s.name), "last": segments.last().map(|s| &s.name)},
            "checkpoint": checkpoint,
            "index_bytes": index_bytes,
            "total_bytes": total,
            "recovery": data.report.to_string(),
            "clean": data.report.is_clean(),
            "sessions": counts_json(&counts),
        });
        writeln!(o, "{v}")?;
    } else {
        writeln!(o, "data dir     {}", dir.display())?;
        writeln!(o, "format       {format}")?;
        writeln!(o, "segments     {} ({} bytes)", segments.len(), seg_bytes)?;
        match (checkpoint.get("segment"), checkpoint.get("unreadable")) {
            (Some(seg), _) => writeln!(
                o,
                "checkpoint   segment {} offset {} ({} bytes)",
                seg,
                checkpoint.get("offset").unwrap_or(&Value::Null),
                ckpt_bytes
            )?,
            (None, Some(why)) => writeln!(o, "checkpoint   UNREADABLE: {why}")?,
            (None, None) => writeln!(o, "checkpoint   none")?,
        }
        writeln!(o, "index        {index_bytes} bytes")?;
        writeln!(o, "total        {total} bytes")?;
        write_counts(&mut o, data, &counts)?;
    }
    o.flush()?;
    Ok(())
}

/// `inspect` of a database: what its tables hold, as of the snapshot the
/// sessions were read in.
fn inspect_db(source: &Source, info: &PgInfo, data: &Data, as_json: bool) -> Result<(), AdminError> {
    let counts = counts(data)?;
    let mut o = out();
    if as_json {
        let checkpoint = match &info.checkpoint {
            Some(c) => {
                json!({"present": true, "covers": c.covers, "bytes": c.bytes, "taken_at_unix_ms": c.taken_at_unix_ms})
            }
            None => json!({"present": false}),
        };
        let v = json!({
            "database": source.to_string(),
            "schema_version": info.schema_version,
            "log": {"records": info.records, "first_position": info.first_pos, "last_position": info.last_pos},
            "checkpoint": checkpoint,
            "ended_sessions": info.ended_sessions,
            "total_bytes": info.bytes,
            "recovery": data.report.to_string(),
            "clean": data.report.is_clean(),
            "sessions": counts_json(&counts),
        });
        writeln!(o, "{v}")?;
    } else {
        writeln!(o, "database     {source}")?;
        writeln!(o, "schema       version {}", info.schema_version)?;
        match (info.first_pos, info.last_pos) {
            (Some(first), Some(last)) => {
                writeln!(o, "log          {} records, positions {first} to {last}", info.records)?
            }
            _ => writeln!(o, "log          empty")?,
        }
        match &info.checkpoint {
            Some(c) => writeln!(
                o,
                "checkpoint   covers the log before position {} ({} bytes of open state, taken at {} ms)",
                c.covers, c.bytes, c.taken_at_unix_ms
            )?,
            None => writeln!(o, "checkpoint   none")?,
        }
        writeln!(o, "ended        {} sessions kept", info.ended_sessions)?;
        writeln!(o, "total        {} bytes (tables and indexes)", info.bytes)?;
        write_counts(&mut o, data, &counts)?;
    }
    o.flush()?;
    Ok(())
}

/// `sessions`.
pub fn sessions(source: &Source, state: Option<&str>, mode: Option<&str>, as_json: bool) -> Result<(), AdminError> {
    let data = Data::open(source)?;
    let state = state.map(|s| s.trim_start_matches("SESSION_STATE_").to_ascii_lowercase());
    let mut o = out();
    for s in data.sessions()? {
        let st = j::state_name(s.metadata.state);
        if state.as_deref().is_some_and(|want| want != st) || mode.is_some_and(|m| m != s.metadata.mode) {
            continue;
        }
        if as_json {
            writeln!(o, "{}", j::session(&s.metadata, s.ended_at, s.last_seq))?;
        } else {
            let ended = s.ended_at.map_or_else(|| "-".to_string(), |t| t.to_string());
            writeln!(
                o,
                "{} {} {} started={} ended={}",
                s.metadata.session_id, s.metadata.mode, st, s.metadata.started_at_unix_ms, ended
            )?;
        }
    }
    o.flush()?;
    Ok(())
}

/// `history`.
pub fn history(source: &Source, session_id: &str) -> Result<(), AdminError> {
    let data = Data::open(source)?;
    let records = data.history(session_id)?;
    if records.is_empty() {
        return Err(AdminError::Usage(format!("session {session_id} is not in {source}")));
    }
    let mut o = out();
    for r in &records {
        writeln!(o, "{}", j::record(r))?;
    }
    o.flush()?;
    Ok(())
}

/// `export`.
pub fn export(source: &Source, to: &Path) -> Result<(), AdminError> {
    let data = Data::open(source)?;
    let sessions = data.sessions()?;
    let mut o: Box<dyn Write> =
        if to == Path::new("-") { Box::new(out()) } else { Box::new(BufWriter::new(File::create(to)?)) };
    let bar = progress::bar(sessions.len() as u64, "export", false);
    for s in &sessions {
        for r in data.history(&s.metadata.session_id)? {
            writeln!(o, "{}", j::record(&r))?;
        }
        bar.inc(1);
    }
    o.flush()?;
    bar.finish_and_clear();
    Ok(())
}
