//! [`FsStorage`]: the write-ahead log, the checkpoint, the open map and
//! the ended-session index behind one [`Storage`].
//!
//! See the crate docs for the layout and the rules; this file is the
//! mechanics. Everything a reader may see lives in [`Shared`] (the open
//! map, the ended sessions not yet in the index, the durable position, the
//! index itself); the writer publishes into it after each sync, so readers
//! only ever see durable records.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use macp_storage::{
    summary_id, Damage, DamageKind, LoadEvent, LoadSummary, LogPos, Maintenance, Record, Retention, SessionSummary,
    Storage, StorageError, StorageRead, TornTail, WriteOpenState,
};
use prost::Message as _;
use redb::Durability;

use crate::checkpoint;
use crate::frame::{self, FrameKind, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::index::{EndedEntry, Index, SegDeltas};
use crate::locs::{Loc, OpenMap};
use crate::reader::FsReader;
use crate::scan::{self, Chunk, Found, ReadPlan, SegmentEnd, CHANNEL_DEPTH, MAX_FRAME_READ};
use crate::vfs::{RealFs, Vfs, VfsFile};

/// Name of the format marker file.
pub const FORMAT_FILE: &str = "FORMAT";
/// Name of the lock file.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the checkpoint file.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Name of the ended-session index (a redb database).
pub const INDEX_FILE: &str = "index.redb";
/// Name of the directory holding the segments.
pub const WAL_DIR: &str = "wal";
/// The data-directory format this build writes. Format 1 (no index, a
/// checkpoint holding every session) is migrated on open.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_TAG: &str = "macp-rs-data";

/// Segments retired per [`Storage::maintain`] call at most (deleting a
/// large file takes the file system a few milliseconds).
const RETIRE_PER_CALL: usize = 2;
/// A durable index commit once this many batches of non-durable index work
/// (writes and deletions) piled up since the last one (or sooner, once
/// deletions emptied segments that could then be retired).
const DURABLE_EVERY_BATCHES: u64 = 4;
/// Compaction carries the open records out of an old segment only when
/// they fill at most this share (percent) of it, so every byte copied frees
/// at least as many: write amplification stays bounded. A segment mostly
/// full of open records stays until they end.
const CARRY_MAX_LIVE_PERCENT: u64 = 50;
/// Segment read handles kept open for readers.
const OPEN_FILES: usize = 64;

/// Tuning of the file backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// A segment is closed and a new one started once the next frame would
    /// take it past this size. Segments are the unit of retirement: smaller
    /// ones free disk sooner, bigger ones mean fewer files. A record larger
    /// than this still gets written, alone in its segment.
    pub segment_bytes: u64,
    /// Largest encoded record [`Storage::append`] accepts (the kernel's
    /// payload limit keeps real records far below it). Reading is not bound
    /// by it, so lowering it never turns existing records into damage.
    pub max_record_bytes: u32,
    /// Encoded frames are buffered in memory until a sync; past this many
    /// bytes they are written early (not synced) to bound memory.
    pub write_buffer_bytes: usize,
    /// How long an ended session stays readable (`forever` never deletes).
    pub retention: Retention,
    /// Page cache of the ended-session index, in bytes: the index's memory
    /// is this, whatever the number of ended sessions.
    pub index_cache_bytes: usize,
    /// Ended sessions indexed, and ended sessions deleted, per
    /// [`Storage::maintain`] call at most.
    pub maintain_sessions: usize,
    /// Bytes of open sessions' records carried forward per
    /// [`Storage::maintain`] call at most.
    pub carry_bytes: u64,
    /// A [`Storage::maintain`] call starts no further stage after this long
    /// (the rest waits for the next call), so upkeep never holds the commit
    /// path for long. Tests on the simulated file system set it to
    /// `Duration::MAX`: a wall-clock budget would make the operations a call
    /// performs, and so the crash points a test enumerates, depend on how
    /// busy the machine is.
    pub maintain_time_budget: Duration,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            segment_bytes: 64 << 20,
            max_record_bytes: 64 << 20,
            write_buffer_bytes: 4 << 20,
            retention: Retention::Forever,
            index_cache_bytes: 32 << 20,
            maintain_sessions: 512,
            carry_bytes: 1 << 20,
            maintain_time_budget: Duration::from_millis(10),
        }
    }
}

/// What the backend holds in memory: every count here follows open
/// sessions (or segments on disk), never sessions ever ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Sessions in the open map.
    pub open_sessions: usize,
    /// Record locations in the open map.
    pub open_records: usize,
    /// Ended sessions waiting to be written to the index.
    pub pending_ended: usize,
    /// Segment files of the log.
    pub segments: usize,
    /// Segments with a per-segment count of indexed sessions.
    pub indexed_segments: usize,
    /// Segments pinned by the latest checkpoint's open sessions.
    pub pinned_segments: usize,
    /// Records queued for compaction.
    pub carry_queue: usize,
    /// Segment files held open for reads.
    pub open_files: usize,
    /// Durable index commits since open (checkpoints and `maintain`):
    /// each one makes every earlier deletion outlive a power cut.
    pub durable_index_commits: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Unloaded,
    Ready,
    Poisoned,
}

/// What readers see; changed by the writer after each sync.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Sessions that have not ended, with their records' locations.
    pub open: OpenMap,
    /// Ended sessions not yet written to the index.
    pub pending: BTreeMap<Box<str>, Arc<EndedEntry>>,
    /// Everything before this position is durable.
    pub durable: LogPos,
}

/// Segment read handles, most recently used last.
struct FileCache<F> {
    files: Vec<(u64, Arc<F>)>,
}

/// The state the writer shares with readers.
pub(crate) struct Shared<V: Vfs> {
    pub vfs: V,
    pub wal: PathBuf,
    pub view: RwLock<View>,
    /// `None` once the storage was dropped: a reader left behind must not
    /// use an index a new owner of the directory may be writing.
    pub index: RwLock<Option<Index>>,
    files: Mutex<FileCache<V::File>>,
}

impl<V: Vfs> Shared<V> {
    pub fn segment_path(&self, n: u64) -> PathBuf {
        self.wal.join(scan::segment_name(n))
    }

    pub fn view(&self) -> Result<RwLockReadGuard<'_, View>, StorageError> {
        self.view.read().map_err(|_| StorageError::Poisoned)
    }

    fn view_mut(&self) -> Result<RwLockWriteGuard<'_, View>, StorageError> {
        self.view.write().map_err(|_| StorageError::Poisoned)
    }

    /// Runs `f` on the open index.
    pub fn with_index<T>(&self, f: impl FnOnce(&Index) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let g = self.index.read().map_err(|_| StorageError::Poisoned)?;
        f(g.as_ref().ok_or(StorageError::Closed)?)
    }

    /// A read handle on segment `n`.
    pub fn file(&self, n: u64) -> io::Result<Arc<V::File>> {
        {
            let mut c = self.files.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = c.files.iter().position(|(s, _)| *s == n) {
                let e = c.files.remove(i);
                let f = e.1.clone();
                c.files.push(e);
                return Ok(f);
            }
        }
        let f = Arc::new(self.vfs.open(&self.segment_path(n), false)?);
        let mut c = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if c.files.len() >= OPEN_FILES {
            c.files.remove(0);
        }
        c.files.push((n, f.clone()));
        Ok(f)
    }

    fn forget_file(&self, n: u64) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).files.retain(|(s, _)| *s != n);
    }

    fn open_files(&self) -> usize {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).files.len()
    }

    /// Reads and verifies the frame at `loc`: its payload.
    pub fn read_frame(&self, loc: &Loc) -> Result<Vec<u8>, StorageError> {
        let place = format!("segment {} offset {}", loc.segment, loc.offset);
        let damaged = |reason: String| StorageError::Damaged { place: place.clone(), reason };
        let file = match self.file(loc.segment) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(damaged("the segment file is missing (deleted outside macp-rs, or lost)".into()))
            }
            Err(e) => return Err(StorageError::io("open", self.segment_path(loc.segment), e)),
        };
        let mut buf = vec![0u8; FRAME_HEADER_LEN + loc.len as usize];
        match file.read_exact_at(&mut buf, loc.offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(damaged("the segment ends before the record".into()))
            }
            Err(e) => return Err(StorageError::io("read", self.segment_path(loc.segment), e)),
        }
        let verdict = match frame::read_frame(&buf, 0, loc.segment, loc.offset, MAX_FRAME_READ) {
            Ok((_, _, end)) if end == buf.len() => Ok(()),
            Ok(_) => Err("the frame's length differs from the index"),
            Err((frame::FrameError::BadPayload, _)) => Err("payload checksum mismatch"),
            Err(_) => Err("frame header does not verify"),
        };
        verdict.map_err(|why| damaged(why.into()))?;
        buf.drain(..FRAME_HEADER_LEN);
        Ok(buf)
    }

    /// Reads record `loc` of `session_id`, checking it is that record.
    pub fn read_record(&self, session_id: &str, loc: &Loc) -> Result<Record, StorageError> {
        let payload = self.read_frame(loc)?;
        let damaged = |reason: String| StorageError::Damaged {
            place: format!("segment {} offset {}", loc.segment, loc.offset),
            reason,
        };
        let r = Record::decode(payload.as_slice()).map_err(|e| damaged(format!("record does not decode: {e}")))?;
        if r.session_id != session_id || r.seq != loc.seq {
            return Err(damaged(format!(
                "expected record {} of session {session_id}, found record {} of session '{}'",
                loc.seq, r.seq, r.session_id
            )));
        }
        Ok(r)
    }
}

/// The file backend. Generic over the file system so tests and the
/// simulator run it on [`crate::SimFs`]; the default is the real one.
pub struct FsStorage<V: Vfs = RealFs> {
    shared: Arc<Shared<V>>,
    dir: PathBuf,
    cfg: FsConfig,
    lock: Option<V::Lock>,
    phase: Phase,
    /// The directory's format: 1 until a migrated directory's first
    /// checkpoint is written.
    format: u32,
    // --- the log writer ---
    /// Segment → its size in bytes, `None` until needed (older segments
    /// are not even opened at load). The active segment is in it too.
    segments: BTreeMap<u64, Option<u64>>,
    active: u64,
    active_file: Option<Arc<V::File>>,
    /// Bytes of the active segment already handed to the file.
    written: u64,
    /// The active segment's file may extend past the log's end: its space
    /// was reserved with `allocate` (or an attempt failed midway). Sealing
    /// cuts it back to the log's end.
    reserved: bool,
    /// `allocate` is not supported by the file system: never tried again.
    no_allocate: bool,
    /// A write went to the active segment since its last sync.
    unsynced_write: bool,
    /// Encoded frames after `written`.
    buf: Vec<u8>,
    /// Position after the last appended frame.
    end: LogPos,
    /// Position up to which everything is synced.
    durable: LogPos,
    /// A segment was created or deleted since the WAL directory was synced.
    dir_dirty: bool,
    /// Record index → location, for the batch being appended (reused).
    placed: Vec<(usize, Loc)>,
    /// Summaries appended since the last sync (id, end time, encoding),
    /// with the log end then.
    staged: Vec<(Box<str>, i64, Vec<u8>, LogPos)>,
    // --- checkpoint and maintenance ---
    /// Where the latest checkpoint's coverage ends.
    covered: Option<LogPos>,
    /// Segments holding records of sessions open at the latest checkpoint:
    /// a restart reads their locations from it, so they stay until the next
    /// checkpoint no longer names them.
    pinned: BTreeSet<u64>,
    /// Segment → indexed (ended) sessions with records in it; mirrors the
    /// index's `segment_sessions` table.
    seg_sessions: BTreeMap<u64, u64>,
    /// Open records to carry forward, from `carrying`.
    carry: VecDeque<(Box<str>, Loc)>,
    /// Segments whose records could not be read for carrying (reported
    /// once; left in place).
    uncarriable: BTreeSet<u64>,
    /// Sessions written to or deleted from the index by non-durable
    /// commits since the last durable one: a durable commit writes their
    /// pages, so this bounds its cost.
    dirty_sessions: u64,
    /// Segments that lost indexed sessions in those non-durable commits: a
    /// power cut could bring the sessions back, so the segments wait for
    /// the next durable commit before they may be retired.
    dirty_segments: BTreeSet<u64>,
    /// Segments retired since the index last recorded it (its
    /// `retired_segments` counter is bumped at the next durable commit).
    retired_unrecorded: u64,
    /// The next `maintain` call starts with a durable index commit.
    durable_due: bool,
    /// Durable index commits since open.
    durable_commits: u64,
}

impl<V: Vfs> std::fmt::Debug for FsStorage<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsStorage")
            .field("dir", &self.dir)
            .field("phase", &self.phase)
            .field("format", &self.format)
            .field("end", &self.end)
            .field("durable", &self.durable)
            .field("covered", &self.covered)
            .field("segments", &self.segments.len())
            .finish()
    }
}

fn read_all<V: Vfs>(vfs: &V, path: &Path, into: &mut Vec<u8>) -> Result<(), StorageError> {
    let f = vfs.open(path, false).map_err(|e| StorageError::io("open", path, e))?;
    let len = f.size().map_err(|e| StorageError::io("stat", path, e))?;
    let len = usize::try_from(len).map_err(|_| StorageError::io("read", path, io::ErrorKind::FileTooLarge.into()))?;
    into.clear();
    into.resize(len, 0);
    f.read_exact_at(into, 0).map_err(|e| StorageError::io("read", path, e))
}

/// Writes `bytes` to `dir/name` atomically and durably: temporary file,
/// fsync, rename, directory fsync.
fn write_atomic<V: Vfs>(vfs: &V, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    write_atomic_with(vfs, dir, name, |f| f.write_all_at(bytes, 0))
}

/// [`write_atomic`] with the contents written by `fill` into the empty
/// temporary file (positioned writes, in any order).
fn write_atomic_with<V: Vfs>(
    vfs: &V,
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&V::File) -> io::Result<()>,
) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let f = vfs.open(&tmp, true).map_err(|e| StorageError::io("create", &tmp, e))?;
    f.set_len(0).map_err(|e| StorageError::io("truncate", &tmp, e))?;
    fill(&f).map_err(|e| StorageError::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| StorageError::io("fsync", &tmp, e))?;
    vfs.rename(&tmp, &dst).map_err(|e| StorageError::io("rename", &tmp, e))?;
    vfs.sync_dir(dir).map_err(|e| StorageError::io("fsync", dir, e))
}

/// The format version in a marker file.
fn check_format(dir: &Path, bytes: &[u8]) -> Result<u32, StorageError> {
    let bad = |reason: String| StorageError::NotADataDir { path: dir.to_path_buf(), reason };
    let text = std::str::from_utf8(bytes).map_err(|_| bad(format!("{FORMAT_FILE} is not text")))?;
    let mut parts = text.split_whitespace();
    if parts.next() != Some(FORMAT_TAG) {
        return Err(bad(format!("{FORMAT_FILE} does not start with '{FORMAT_TAG}'")));
    }
    let version: u32 =
        parts.next().and_then(|v| v.parse().ok()).ok_or_else(|| bad(format!("{FORMAT_FILE} has no version number")))?;
    if version > FORMAT_VERSION {
        return Err(StorageError::NewerFormat { found: version, supported: FORMAT_VERSION });
    }
    if version == 0 {
        return Err(bad(format!("{FORMAT_FILE} version 0 is not valid")));
    }
    Ok(version)
}

fn marker(version: u32) -> String {
    format!("{FORMAT_TAG} {version}\n")
}

fn undecodable(pos: LogPos, len: u64, why: String, session_hint: Option<String>) -> LoadEvent<'static> {
    LoadEvent::Damage(Damage {
        segment: pos.segment,
        offset: pos.offset,
        len,
        kind: DamageKind::Undecodable(why),
        session_hint,
    })
}

/// The replaying side of [`Storage::load`]: hands every record to the
/// visitor in log order and builds the open map on the way.
fn replay_tail(
    rx: &Receiver<Result<Chunk, StorageError>>,
    open: &mut OpenMap,
    ends: &mut Vec<SegmentEnd>,
    cancelled: &dyn Fn() -> bool,
    visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let mut n = 0u64;
    for chunk in rx.iter() {
        let chunk = chunk?;
        let sid_at = |r: std::ops::Range<usize>| chunk.bytes.get(r).and_then(|b| std::str::from_utf8(b).ok());
        for f in chunk.found {
            n += 1;
            if n.is_multiple_of(1024) && cancelled() {
                return Err(StorageError::Cancelled);
            }
            match f {
                Found::Record { pos, len, sid, record } => match record {
                    Ok(record) => {
                        if !record.session_id.is_empty() {
                            let loc = Loc { seq: record.seq, segment: pos.segment, offset: pos.offset, len };
                            open.push(&record.session_id, loc);
                        }
                        visit(LoadEvent::Record { pos, record: *record })?;
                    }
                    // Its identity is readable even if the rest is not:
                    // name the session so recovery quarantines it.
                    Err(why) => {
                        let hint = sid_at(sid).filter(|s| !s.is_empty()).map(str::to_string);
                        visit(undecodable(pos, 0, why, hint))?
                    }
                },
                Found::Carried { pos, len, sid, seq } => {
                    if let Some(s) = sid_at(sid) {
                        open.relocate(s, Loc { seq, segment: pos.segment, offset: pos.offset, len });
                    }
                }
                Found::NotARecord { pos, len } => {
                    visit(undecodable(pos, len, "payload is not a protobuf record".into(), None))?
                }
                Found::Damage(d) => visit(LoadEvent::Damage(d))?,
                Found::End(e) => ends.push(e),
            }
        }
    }
    Ok(())
}

impl FsStorage<RealFs> {
    /// Opens (creating if absent or empty) the data directory `dir` on the
    /// real file system and takes its lock. Recover from it (which calls
    /// [`Storage::load`]) before appending.
    pub fn open(dir: impl AsRef<Path>, cfg: FsConfig) -> Result<Self, StorageError> {
        Self::open_with(RealFs, dir, cfg)
    }
}

impl<V: Vfs> FsStorage<V> {
    /// [`FsStorage::open`] on a chosen file system.
    pub fn open_with(vfs: V, dir: impl AsRef<Path>, cfg: FsConfig) -> Result<Self, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        let wal = dir.join(WAL_DIR);
        vfs.create_dir_all(&dir).map_err(|e| StorageError::io("mkdir", &dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = vfs
            .try_lock(&lock_path)
            .map_err(|e| StorageError::io("lock", &lock_path, e))?
            .ok_or_else(|| StorageError::Locked(dir.clone()))?;
        let names = vfs.list_dir(&dir).map_err(|e| StorageError::io("list", &dir, e))?;
        let format = if names.iter().any(|n| n == FORMAT_FILE) {
            let mut buf = Vec::new();
            read_all(&vfs, &dir.join(FORMAT_FILE), &mut buf)?;
            check_format(&dir, &buf)?
        } else {
            let foreign: Vec<&String> =
                names.iter().filter(|n| *n != LOCK_FILE && *n != &format!("{FORMAT_FILE}.tmp")).collect();
            if !foreign.is_empty() {
                return Err(StorageError::NotADataDir {
                    path: dir,
                    reason: format!("no {FORMAT_FILE} marker but it contains {foreign:?}"),
                });
            }
            // The marker goes first: a crash before it leaves nothing but
            // the lock and a temporary file, which the next open accepts.
            write_atomic(&vfs, &dir, FORMAT_FILE, marker(FORMAT_VERSION).as_bytes())?;
            FORMAT_VERSION
        };
        if !vfs.exists(&wal).map_err(|e| StorageError::io("stat", &wal, e))? {
            vfs.create_dir_all(&wal).map_err(|e| StorageError::io("mkdir", &wal, e))?;
            vfs.sync_dir(&dir).map_err(|e| StorageError::io("fsync", &dir, e))?;
        }
        // A format-2 checkpoint names no ended session the index lacks: once
        // one exists, a missing index is damage, not something to recreate.
        let may_create = format < FORMAT_VERSION
            || !vfs.exists(&dir.join(CHECKPOINT_FILE)).map_err(|e| StorageError::io("stat", &dir, e))?;
        let index = Index::open(&vfs, &dir.join(INDEX_FILE), cfg.index_cache_bytes, may_create)?;
        let shared = Arc::new(Shared {
            vfs,
            wal,
            view: RwLock::new(View::default()),
            index: RwLock::new(Some(index)),
            files: Mutex::new(FileCache { files: Vec::new() }),
        });
        Ok(FsStorage {
            shared,
            dir,
            cfg,
            lock: Some(lock),
            phase: Phase::Unloaded,
            format,
            segments: BTreeMap::new(),
            active: 0,
            active_file: None,
            written: 0,
            reserved: false,
            no_allocate: false,
            unsynced_write: false,
            buf: Vec::new(),
            end: LogPos::default(),
            durable: LogPos::default(),
            dir_dirty: false,
            placed: Vec::new(),
            staged: Vec::new(),
            covered: None,
            pinned: BTreeSet::new(),
            seg_sessions: BTreeMap::new(),
            carry: VecDeque::new(),
            uncarriable: BTreeSet::new(),
            dirty_sessions: 0,
            dirty_segments: BTreeSet::new(),
            retired_unrecorded: 0,
            durable_due: false,
            durable_commits: 0,
        })
    }

    /// The state shared with readers (the read-only tools in `readonly.rs`).
    pub(crate) fn shared(&self) -> &Shared<V> {
        &self.shared
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file system it runs on (tests take crash images of it).
    pub fn vfs(&self) -> &V {
        &self.shared.vfs
    }

    /// The data-directory format on disk: 1 while a migrated directory
    /// waits for its first checkpoint, then [`FORMAT_VERSION`].
    pub fn format(&self) -> u32 {
        self.format
    }

    /// Number of segment files in the log (for monitoring and tests).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Whether an earlier failure poisoned the backend (see the crate docs).
    pub fn is_poisoned(&self) -> bool {
        self.phase == Phase::Poisoned
    }

    /// What the backend holds in memory (see [`FsStats`]).
    pub fn stats(&self) -> FsStats {
        let (open_sessions, open_records, pending_ended) = match self.shared.view() {
            Ok(v) => (v.open.sessions(), v.open.locations(), v.pending.len()),
            Err(_) => (0, 0, 0),
        };
        FsStats {
            open_sessions,
            open_records,
            pending_ended,
            segments: self.segments.len(),
            indexed_segments: self.seg_sessions.len(),
            pinned_segments: self.pinned.len(),
            carry_queue: self.carry.len(),
            open_files: self.shared.open_files(),
            durable_index_commits: self.durable_commits,
        }
    }

    fn ready(&self) -> Result<(), StorageError> {
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Poisoned => Err(StorageError::Poisoned),
            Phase::Unloaded => Err(StorageError::Misuse("load the storage (recover) before using it")),
        }
    }

    /// Fail-stop: after any failed write the backend refuses all work.
    fn poisoned<T>(&mut self, e: StorageError) -> Result<T, StorageError> {
        self.phase = Phase::Poisoned;
        Err(e)
    }

    fn active_file(&self) -> Result<&V::File, StorageError> {
        self.active_file.as_deref().ok_or(StorageError::Misuse("no active segment"))
    }

    /// Hands buffered frames to the file (no sync).
    ///
    /// Into reserved space at most one write lands between two syncs: a
    /// write there is an overwrite of allocated blocks, which a power cut
    /// can keep or lose independently of the writes around it, so a second
    /// one could survive without the first and leave zeros *between*
    /// frames, which recovery could not tell from damage. A batch bigger
    /// than [`FsConfig::write_buffer_bytes`] therefore syncs once per
    /// buffer-full; a single write is torn at most at its end, as an
    /// append is.
    fn flush(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.reserved && self.unsynced_write {
            self.sync_active()?;
        }
        let r = self.active_file().and_then(|f| {
            f.write_all_at(&self.buf, self.written)
                .map_err(|e| StorageError::io("write", self.shared.segment_path(self.active), e))
        });
        match r {
            Ok(()) => {
                self.written += self.buf.len() as u64;
                self.buf.clear();
                self.unsynced_write = true;
                Ok(())
            }
            Err(e) => self.poisoned(e),
        }
    }

    fn sync_wal_dir(&mut self) -> Result<(), StorageError> {
        if self.dir_dirty {
            if let Err(e) = self.shared.vfs.sync_dir(&self.shared.wal) {
                let e = StorageError::io("fsync", &self.shared.wal, e);
                return self.poisoned(e);
            }
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), StorageError> {
        let r = self.active_file().and_then(|f| {
            f.sync_data().map_err(|e| StorageError::io("fdatasync", self.shared.segment_path(self.active), e))
        });
        match r {
            Ok(()) => {
                self.unsynced_write = false;
                Ok(())
            }
            Err(e) => self.poisoned(e),
        }
    }

    /// Reserves the active segment's full size ([`FsConfig::segment_bytes`])
    /// so appends no longer grow the file, and a group commit's fdatasync
    /// does not also commit a size change (see the crate docs). Best
    /// effort: a file system without `fallocate` goes without from then
    /// on, and no space left for the whole reservation leaves the appends
    /// to grow the file as before (they may still fit). Any other failure
    /// is an I/O error like a write's: fail-stop.
    fn reserve_active(&mut self) -> Result<(), StorageError> {
        if self.no_allocate {
            return Ok(());
        }
        let Some(f) = self.active_file.as_deref() else { return Ok(()) };
        match f.allocate(self.cfg.segment_bytes) {
            Ok(()) => self.reserved = true,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => self.no_allocate = true,
            // It may have reserved part of the space before failing.
            Err(e) if e.kind() == io::ErrorKind::StorageFull => self.reserved = true,
            Err(e) => {
                self.reserved = true;
                let e = StorageError::io("fallocate", self.shared.segment_path(self.active), e);
                return self.poisoned(e);
            }
        }
        Ok(())
    }

    /// Starts segment `n` (header buffered). The previous segment is made
    /// durable first, and its directory entry too, so a crash can never
    /// leave a later segment without every byte of the earlier ones: only
    /// the last segment can ever have a torn tail. Sealing cuts the
    /// previous segment's reservation back to its last frame within the
    /// same sync, so a sealed segment ends with its last frame, byte for
    /// byte what it was before segments were preallocated.
    fn start_segment(&mut self, n: u64) -> Result<(), StorageError> {
        if self.active != 0 {
            self.flush()?;
            if self.reserved {
                let end = self.end.offset;
                let r = self.active_file().and_then(|f| {
                    f.set_len(end).map_err(|e| StorageError::io("truncate", self.shared.segment_path(self.active), e))
                });
                if let Err(e) = r {
                    return self.poisoned(e);
                }
            }
            self.sync_active()?;
            self.segments.insert(self.active, Some(self.end.offset));
        }
        self.sync_wal_dir()?;
        let path = self.shared.segment_path(n);
        let file = match self.shared.vfs.open(&path, true) {
            Ok(f) => f,
            Err(e) => return self.poisoned(StorageError::io("create", &path, e)),
        };
        self.active_file = Some(Arc::new(file));
        self.segments.insert(n, None);
        self.dir_dirty = true;
        self.active = n;
        self.written = 0;
        self.reserved = false;
        self.unsynced_write = false;
        self.reserve_active()?;
        self.buf.clear();
        self.buf.extend_from_slice(&frame::segment_header(n));
        self.end = LogPos::new(n, SEGMENT_HEADER_LEN);
        Ok(())
    }

    /// Buffers one frame holding `payload` (written by `write`), rolling to
    /// a new segment first if it would not fit; returns its location.
    fn push_frame(
        &mut self,
        kind: FrameKind,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(u64, u64), StorageError> {
        let frame_len = (FRAME_HEADER_LEN + len) as u64;
        if self.end.offset + frame_len > self.cfg.segment_bytes && self.end.offset > SEGMENT_HEADER_LEN {
            self.start_segment(self.active + 1)?;
        }
        let offset = self.end.offset;
        let start = self.buf.len();
        self.buf.resize(start + FRAME_HEADER_LEN, 0);
        write(&mut self.buf);
        frame::seal_frame(&mut self.buf[start..], self.active, offset, kind);
        self.end.offset += frame_len;
        if self.buf.len() >= self.cfg.write_buffer_bytes {
            self.flush()?;
        }
        Ok((self.active, offset))
    }

    /// Makes everything written durable and shows it to readers: moves the
    /// sessions that ended from the open map to the pending index batch.
    fn publish(&mut self) -> Result<(), StorageError> {
        let mut view = self.shared.view_mut()?;
        view.durable = self.durable;
        for (key, ended_at, summary, end_then) in self.staged.drain(..) {
            let sid: &str = &key;
            let (locs, end) = match view.open.take(sid) {
                Some(l) => {
                    let end = l.iter().map(Loc::pos).max().unwrap_or(end_then);
                    (Some(l), end)
                }
                // Stored a second time: keep the locations known already.
                None => match view.pending.get(sid) {
                    Some(p) => (p.locs.clone(), p.end),
                    None => (None, end_then),
                },
            };
            view.pending.insert(key, Arc::new(EndedEntry { summary, ended_at, locs, end }));
        }
        Ok(())
    }

    fn read_checkpoint(&self, buf: &mut Vec<u8>) -> Result<Result<Option<checkpoint::Parsed>, String>, StorageError> {
        let path = self.dir.join(CHECKPOINT_FILE);
        if !self.shared.vfs.exists(&path).map_err(|e| StorageError::io("stat", &path, e))? {
            return Ok(Ok(None));
        }
        read_all(&self.shared.vfs, &path, buf)?;
        Ok(checkpoint::parse(buf).map(Some))
    }

    fn apply_deltas(&mut self, deltas: &SegDeltas, durable: bool) {
        for (&seg, &d) in deltas {
            if d < 0 && !durable {
                self.dirty_segments.insert(seg);
            }
            let e = self.seg_sessions.entry(seg).or_default();
            *e = e.saturating_add_signed(d);
            if *e == 0 {
                self.seg_sessions.remove(&seg);
            }
        }
    }

    /// Writes up to `limit` pending ended sessions to the index with
    /// `durability`. Returns how many.
    fn index_pending(&mut self, limit: usize, durability: Durability) -> Result<usize, StorageError> {
        let batch: Vec<(Box<str>, Arc<EndedEntry>)> =
            self.shared.view()?.pending.iter().take(limit).map(|(k, v)| (k.clone(), v.clone())).collect();
        if batch.is_empty() {
            return Ok(0);
        }
        let durable = matches!(durability, Durability::Immediate);
        if durable && self.retired_unrecorded > 0 {
            // The same commit is the durable point for the counter.
            self.make_durable()?;
        }
        let deltas = self.shared.with_index(|ix| ix.write(&batch, durability))?;
        self.apply_deltas(&deltas, durable);
        if durable {
            self.made_durable();
        } else {
            self.dirty_sessions += batch.len() as u64;
        }
        let mut view = self.shared.view_mut()?;
        for (k, e) in &batch {
            if view.pending.get(k).is_some_and(|p| Arc::ptr_eq(p, e)) {
                view.pending.remove(k);
            }
        }
        Ok(batch.len())
    }

    fn segment_size(&mut self, n: u64) -> Result<u64, StorageError> {
        if n == self.active {
            return Ok(self.end.offset);
        }
        if let Some(Some(s)) = self.segments.get(&n) {
            return Ok(*s);
        }
        let path = self.shared.segment_path(n);
        let size = self.shared.file(n).and_then(|f| f.size()).map_err(|e| StorageError::io("stat", &path, e))?;
        self.segments.insert(n, Some(size));
        Ok(size)
    }

    fn checkpoint_inner(&mut self, write_open_state: &mut WriteOpenState<'_>) -> Result<(), StorageError> {
        // Every session that ended before this point goes into the index
        // durably first: once the checkpoint exists, the log before it is
        // never replayed again.
        let pending = self.shared.view()?.pending.len();
        if pending > 0 {
            self.index_pending(pending, Durability::Immediate)?;
        } else if self.dirty_sessions > 0 || self.retired_unrecorded > 0 {
            self.make_durable()?;
        }
        // The open state streams into the file behind the header's place;
        // the locations follow it, and the header, which needs both
        // sections' lengths and checksums, comes last.
        let (locs, pinned) = {
            let view = self.shared.view()?;
            (checkpoint::locations(&view.open), view.open.used_segments().map(|(s, _)| s).collect())
        };
        let end = self.end;
        write_atomic_with(&self.shared.vfs, &self.dir, CHECKPOINT_FILE, |f| {
            let mut w = checkpoint::SectionWriter::new(f, checkpoint::HEADER_LEN as u64);
            write_open_state(&mut w)?;
            let (state, at) = w.finish()?;
            f.write_all_at(&locs, at)?;
            f.write_all_at(&checkpoint::header(end, state, checkpoint::Section::of(&locs)), 0)
        })?;
        self.covered = Some(self.end);
        self.pinned = pinned;
        if self.format < FORMAT_VERSION {
            // A migrated directory is format 2 from here on; a crash before
            // this line leaves format 1, whose next open migrates again.
            write_atomic(&self.shared.vfs, &self.dir, FORMAT_FILE, marker(FORMAT_VERSION).as_bytes())?;
            self.format = FORMAT_VERSION;
        }
        Ok(())
    }

    /// A durable index commit: everything written so far outlives a power
    /// cut, and so does the count of retired segments.
    fn make_durable(&mut self) -> Result<(), StorageError> {
        let retired = self.retired_unrecorded;
        self.shared.with_index(|ix| ix.make_durable(retired))?;
        self.made_durable();
        Ok(())
    }

    fn made_durable(&mut self) {
        self.durable_commits += 1;
        self.durable_due = false;
        self.dirty_sessions = 0;
        self.dirty_segments.clear();
        self.retired_unrecorded = 0;
    }

    /// Whether segment `s` may go: wholly before the checkpoint's segment,
    /// used by no open session (now, or in the checkpoint a restart reads),
    /// and holding records of no indexed session — durably so: a segment
    /// emptied by deletions a power cut could undo waits for the next
    /// durable commit, so no index entry can ever outlive its records.
    fn retirable(&self, view: &View, covered: LogPos, s: u64) -> bool {
        s < covered.segment
            && !self.pinned.contains(&s)
            && view.open.segment_use(s).refs == 0
            && !self.seg_sessions.contains_key(&s)
            && !self.dirty_segments.contains(&s)
    }

    /// Deletes up to [`RETIRE_PER_CALL`] segment files nothing needs. No
    /// directory sync: a retired file a power cut brings back is retired
    /// again, and the next new segment's directory sync makes it final.
    fn retire(&mut self, covered: LogPos, m: &mut Maintenance) -> Result<(), StorageError> {
        let candidates: Vec<u64> = {
            let view = self.shared.view()?;
            if !view.pending.is_empty() {
                // Their records' segments are not counted yet.
                return Ok(());
            }
            self.segments
                .keys()
                .copied()
                .take_while(|&s| s < covered.segment)
                .filter(|&s| self.retirable(&view, covered, s))
                .take(RETIRE_PER_CALL + 1)
                .collect()
        };
        m.more |= candidates.len() > RETIRE_PER_CALL;
        for s in candidates.into_iter().take(RETIRE_PER_CALL) {
            self.shared.forget_file(s);
            let path = self.shared.segment_path(s);
            match self.shared.vfs.remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("remove", path, e)),
            }
            self.segments.remove(&s);
            self.retired_unrecorded += 1;
            m.retired_segments += 1;
        }
        Ok(())
    }

    /// Carries open records out of an old segment that only they keep.
    fn carry_forward(&mut self, covered: LogPos, m: &mut Maintenance) -> Result<(), StorageError> {
        if self.carry.is_empty() {
            let candidates: Vec<(u64, u64)> = {
                let view = self.shared.view()?;
                if !view.pending.is_empty() {
                    return Ok(());
                }
                view.open
                    .used_segments()
                    .take_while(|(s, _)| *s < covered.segment)
                    .filter(|(s, _)| !self.seg_sessions.contains_key(s) && !self.uncarriable.contains(s))
                    .map(|(s, u)| (s, u.bytes))
                    .collect()
            };
            let mut chosen = None;
            for (s, live) in candidates {
                if live.saturating_mul(100) <= self.segment_size(s)?.saturating_mul(CARRY_MAX_LIVE_PERCENT) {
                    chosen = Some(s);
                    break;
                }
            }
            let Some(s) = chosen else { return Ok(()) };
            self.carry = self.shared.view()?.open.records_in(s).into();
        }
        let mut moved: Vec<(Box<str>, Loc, Loc)> = Vec::new();
        let mut bytes = 0u64;
        while bytes < self.cfg.carry_bytes {
            let Some((sid, old)) = self.carry.pop_front() else { break };
            let current = self.shared.view()?.open.get(&sid).and_then(|v| v.iter().find(|l| l.seq == old.seq).copied());
            if current != Some(old) {
                continue;
            }
            let payload = match self.shared.read_frame(&old) {
                Ok(p) => p,
                Err(e) => {
                    // Leave the segment alone; the read error is the
                    // operator's to see, not a reason to stop the writer.
                    self.uncarriable.insert(old.segment);
                    self.carry.clear();
                    return Err(e);
                }
            };
            let (segment, offset) =
                self.push_frame(FrameKind::Carried, payload.len(), |b| b.extend_from_slice(&payload))?;
            let new = Loc { seq: old.seq, segment, offset, len: old.len };
            bytes += new.frame_len();
            moved.push((sid, old, new));
        }
        m.more |= !self.carry.is_empty();
        if moved.is_empty() {
            return Ok(());
        }
        // The copies must be durable before readers (and the next
        // checkpoint) are pointed at them.
        self.sync()?;
        let mut view = self.shared.view_mut()?;
        for (sid, old, new) in moved {
            let still = view.open.get(&sid).is_some_and(|v| v.contains(&old));
            if still && view.open.relocate(&sid, new) {
                m.carried_records += 1;
            }
        }
        Ok(())
    }

    /// One bounded step of upkeep. A call pays for at most one expensive
    /// thing — a durable index commit, deleting segment files, or carrying
    /// records forward (one fdatasync) — besides one batch of index writes
    /// and one batch of deletions (non-durable, no sync).
    fn maintain_inner(&mut self, now_ms: i64, m: &mut Maintenance) -> Result<(), StorageError> {
        let started = Instant::now();
        let limit = self.cfg.maintain_sessions.max(1);
        // Non-durable index work piles up until a durable commit writes it
        // out; doing that regularly, in a call of its own, keeps each one
        // (here or in a checkpoint) small, and lets emptied segments go.
        if self.durable_due || self.dirty_sessions >= DURABLE_EVERY_BATCHES * limit as u64 {
            self.make_durable()?;
            m.more = true;
            return Ok(());
        }
        let indexed = self.index_pending(limit, Durability::None)?;
        m.more |= indexed == limit && !self.shared.view()?.pending.is_empty();
        // A migrating directory replays from segment 1 until its first
        // checkpoint: nothing may be deleted before that.
        let (Some(cutoff), Some(covered)) = (self.cfg.retention.cutoff(now_ms), self.covered) else { return Ok(()) };
        if self.format < FORMAT_VERSION {
            return Ok(());
        }
        let (n, more, deltas) = self.shared.with_index(|ix| ix.delete_expired(cutoff, covered, limit))?;
        self.apply_deltas(&deltas, false);
        self.dirty_sessions += n;
        m.expired_sessions += n;
        let emptied = {
            let view = self.shared.view()?;
            self.dirty_segments.iter().any(|&s| {
                s < covered.segment
                    && !self.pinned.contains(&s)
                    && view.open.segment_use(s).refs == 0
                    && !self.seg_sessions.contains_key(&s)
            })
        };
        if emptied {
            // Segments just emptied become retirable after a durable
            // commit: make it the next call's work.
            self.durable_due = true;
            m.more = true;
            return Ok(());
        }
        self.retire(covered, m)?;
        if more || m.retired_segments > 0 || started.elapsed() > self.cfg.maintain_time_budget {
            // Compaction waits until the expired sessions are gone (it
            // copies only from segments no indexed session uses).
            m.more = true;
            return Ok(());
        }
        self.carry_forward(covered, m)
    }

    fn bytes(&self) -> u64 {
        let log: u64 = self
            .segments
            .iter()
            .map(|(&n, s)| if n == self.active { self.end.offset } else { s.unwrap_or(self.cfg.segment_bytes) })
            .sum();
        log + self.shared.with_index(|ix| Ok(ix.bytes())).unwrap_or(0)
    }
}

impl<V: Vfs> Drop for FsStorage<V> {
    fn drop(&mut self) {
        // Close the index before the lock goes: a reader left behind must
        // never touch it once another opener may own the directory.
        if let Ok(mut g) = self.shared.index.write() {
            g.take();
        }
        self.lock.take();
    }
}

impl<V: Vfs> Storage for FsStorage<V> {
    fn load(
        &mut self,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        if self.phase != Phase::Unloaded {
            return Err(StorageError::Misuse("load called twice"));
        }
        if cancelled() {
            return Err(StorageError::Cancelled);
        }
        let wal = self.shared.wal.clone();
        let names = self.shared.vfs.list_dir(&wal).map_err(|e| StorageError::io("list", &wal, e))?;
        let mut segs: Vec<u64> = names.iter().filter_map(|n| scan::parse_segment_name(n)).collect();
        segs.sort_unstable();

        // Format 1 is migrated: its checkpoint holds a kernel snapshot this
        // build no longer restores, and its log was never retired, so the
        // whole log replays and recovery hands back every ended session.
        let mut ck_bytes = Vec::new();
        let ck = if self.format < FORMAT_VERSION {
            None
        } else {
            // Only a log never retired can replace a lost checkpoint by a
            // full replay: the index counts retirements (durably from the
            // next durable commit on), and a log not starting at segment 1
            // has lost its start either way. A gap alone replays, reported
            // as a missing segment.
            let whole_log = segs.first().is_none_or(|&f| f == 1);
            match self.read_checkpoint(&mut ck_bytes)? {
                Ok(p) => {
                    let retired = self.shared.with_index(|ix| ix.retired_segments())?;
                    if p.is_none() && (retired > 0 || !whole_log) {
                        return Err(StorageError::CheckpointCorrupt {
                            path: self.dir.join(CHECKPOINT_FILE),
                            reason: "the file is missing".into(),
                        });
                    }
                    p
                }
                Err(reason) => {
                    // Without the checkpoint the whole log must replay,
                    // which works only while none of it was retired.
                    let retired = self.shared.with_index(|ix| ix.retired_segments())?;
                    if retired > 0 || !whole_log {
                        return Err(StorageError::CheckpointCorrupt { path: self.dir.join(CHECKPOINT_FILE), reason });
                    }
                    visit(LoadEvent::Damage(Damage {
                        segment: 0,
                        offset: 0,
                        len: 0,
                        kind: DamageKind::CheckpointUnreadable(reason),
                        session_hint: None,
                    }))?;
                    None
                }
            }
        };
        let start = ck.as_ref().map_or(LogPos::new(1, 0), |p| p.pos);
        let covered = ck.as_ref().map(|p| p.pos);
        let mut open = OpenMap::default();
        if let Some(p) = ck {
            visit(LoadEvent::Checkpoint { open_state: &ck_bytes[p.open_state.clone()] })?;
            open = p.open;
        }
        drop(ck_bytes);
        let pinned: BTreeSet<u64> = open.used_segments().map(|(s, _)| s).collect();
        if cancelled() {
            return Err(StorageError::Cancelled);
        }

        let tail: Vec<u64> = segs.iter().copied().filter(|&n| n >= start.segment).collect();
        let mut ends = Vec::new();
        let plan = ReadPlan { vfs: &self.shared.vfs, wal: &wal, segments: &tail, start };
        std::thread::scope(|scope| {
            let (tx, rx) = sync_channel(CHANNEL_DEPTH);
            scope.spawn(move || scan::read_segments(plan, tx));
            let r = replay_tail(&rx, &mut open, &mut ends, cancelled, visit);
            drop(rx);
            r
        })?;

        let mut summary = LoadSummary::default();
        let mut tail_end = LogPos::default();
        for n in &segs {
            self.segments.insert(*n, None);
        }
        for end in &ends {
            let path = self.shared.segment_path(end.segment);
            let mut size = end.file_len;
            // The last segment is cut at its logical end: a torn write, and
            // the zeros of its reservation (reserved again below when
            // appends continue in it). Only non-zero bytes are a torn tail:
            // zeros alone are the reservation, or writes that never landed.
            if let Some(cut) = end.torn {
                if end.file_len > cut {
                    let file = self.shared.vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
                    file.set_len(cut).map_err(|e| StorageError::io("truncate", &path, e))?;
                    file.sync_data().map_err(|e| StorageError::io("fdatasync", &path, e))?;
                    size = cut;
                }
                if end.data_end > cut {
                    let dropped = end.data_end - cut;
                    summary.torn_tail = Some(TornTail { segment: end.segment, offset: cut, dropped_bytes: dropped });
                }
            }
            self.segments.insert(end.segment, Some(size));
            tail_end = LogPos::new(end.segment, end.valid_end);
        }
        if let Some(c) = covered {
            if tail_end < c && !ends.iter().any(|e| e.segment == c.segment && e.file_len < c.offset) {
                visit(LoadEvent::Damage(Damage {
                    segment: c.segment,
                    offset: c.offset,
                    len: 0,
                    kind: DamageKind::ShortOfCheckpoint,
                    session_hint: None,
                }))?;
            }
        }

        // Appends continue at the end of the last segment, unless that is
        // before the checkpoint (the log lost its end) or the segment lost
        // its header: then a fresh segment starts after both.
        let last = segs.last().copied();
        let mut fresh_header = false;
        match last {
            Some(n)
                if tail_end.segment == n
                    && tail_end.offset >= SEGMENT_HEADER_LEN
                    && covered.is_none_or(|c| tail_end >= c) =>
            {
                let path = self.shared.segment_path(n);
                let file = self.shared.vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
                self.active_file = Some(Arc::new(file));
                self.active = n;
                self.written = tail_end.offset;
                self.end = tail_end;
                self.reserve_active()?;
            }
            Some(n)
                if tail_end.segment == n
                    && tail_end.offset < SEGMENT_HEADER_LEN
                    && covered.is_none_or(|c| c.segment < n) =>
            {
                // The last segment lost even its header in the crash: rewrite it.
                let path = self.shared.segment_path(n);
                let file = self.shared.vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
                self.active_file = Some(Arc::new(file));
                self.active = n;
                self.written = 0;
                self.reserve_active()?;
                self.buf.extend_from_slice(&frame::segment_header(n));
                self.end = LogPos::new(n, SEGMENT_HEADER_LEN);
                fresh_header = true;
            }
            _ => {
                let next = last.unwrap_or(0).max(covered.map_or(0, |c| c.segment)) + 1;
                self.start_segment(next)?;
                fresh_header = true;
            }
        }
        self.covered = covered;
        self.pinned = pinned;
        self.seg_sessions = self.shared.with_index(|ix| ix.segment_counts())?;
        {
            let mut view = self.shared.view_mut()?;
            view.open = open;
            view.pending.clear();
        }
        self.phase = Phase::Ready;
        if fresh_header {
            // A new or rewritten segment header: make it durable now so the
            // log is well-formed before anything is appended.
            self.flush()?;
            self.sync_active()?;
            self.sync_wal_dir()?;
        }
        self.durable = self.end;
        self.publish()?;
        summary.end = self.end;
        Ok(summary)
    }

    fn append(&mut self, records: &[Record], ended: &[SessionSummary]) -> Result<(), StorageError> {
        self.ready()?;
        let mut placed = std::mem::take(&mut self.placed);
        placed.clear();
        for (i, r) in records.iter().enumerate() {
            let len = r.encoded_len();
            if len > self.cfg.max_record_bytes as usize {
                let max = self.cfg.max_record_bytes as usize;
                return self.poisoned(StorageError::RecordTooLarge { len, max });
            }
            // Encoding into a Vec cannot fail: it grows as needed.
            let (segment, offset) = self.push_frame(FrameKind::Record, len, |b| {
                let _ = r.encode(b);
            })?;
            if !r.session_id.is_empty() {
                placed.push((i, Loc { seq: r.seq, segment, offset, len: len as u32 }));
            }
        }
        if !placed.is_empty() {
            let mut view = self.shared.view_mut()?;
            for (i, loc) in &placed {
                view.open.push(&records[*i].session_id, *loc);
            }
        }
        self.placed = placed;
        for s in ended {
            let sid = summary_id(s);
            if !sid.is_empty() {
                self.staged.push((sid.into(), s.ended_at_unix_ms, s.encode_to_vec(), self.end));
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.ready()?;
        if self.end != self.durable || !self.buf.is_empty() {
            self.flush()?;
            self.sync_active()?;
            self.sync_wal_dir()?;
            self.durable = self.end;
        } else if self.staged.is_empty() {
            return Ok(());
        }
        let r = self.publish();
        r.or_else(|e| self.poisoned(e))
    }

    fn checkpoint(&mut self, open_state: &[u8]) -> Result<(), StorageError> {
        self.checkpoint_streamed(&mut |out| out.write_all(open_state))
    }

    fn checkpoint_streamed(&mut self, write_open_state: &mut WriteOpenState<'_>) -> Result<(), StorageError> {
        self.sync()?;
        let r = self.checkpoint_inner(write_open_state);
        r.or_else(|e| self.poisoned(e))
    }

    fn maintain(&mut self, now_ms: i64) -> Result<Maintenance, StorageError> {
        self.ready()?;
        let mut m = Maintenance::default();
        match self.maintain_inner(now_ms, &mut m) {
            Ok(()) => {}
            // A record that cannot be read for compaction fails this call
            // only; anything else may have left the disk in an unknown
            // state (fail-stop).
            Err(e @ StorageError::Damaged { .. }) => return Err(e),
            Err(e) => return self.poisoned(e),
        }
        m.bytes = self.bytes();
        m.segments = Some(self.segments.len() as u64);
        m.retention_cutoff_ms = self.cfg.retention.cutoff(now_ms);
        Ok(m)
    }

    fn reader(&self) -> Arc<dyn StorageRead> {
        Arc::new(FsReader::new(self.shared.clone()))
    }
}
