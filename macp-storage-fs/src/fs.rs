//! The filesystem backend: one segmented write-ahead log for all sessions.
//!
//! See the crate docs for the directory layout and the failure model. In
//! short: [`Storage::append`] encodes frames into a buffer, [`Storage::sync`]
//! writes the buffer and issues one `fdatasync` for everything appended since
//! the previous sync (group commit), and [`Storage::load`] scans the log once,
//! truncating a crash-torn tail and reporting any other damage.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use macp_wire::storage::Record;
use prost::Message as _;

use crate::error::StorageError;
use crate::frame::{self, FrameError, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::storage::{Damage, DamageKind, LoadEvent, LoadSummary, LogPos, Storage, TornTail};
use crate::vfs::{RealFs, Vfs, VfsFile};

/// Name of the format marker file.
pub const FORMAT_FILE: &str = "FORMAT";
/// Name of the lock file.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the checkpoint file.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Name of the directory holding the segments.
pub const WAL_DIR: &str = "wal";
/// The data-directory format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_TAG: &str = "macp-rs-data";
const CHECKPOINT_MAGIC: &[u8; 8] = b"MACPCKP1";
const CHECKPOINT_HEADER_LEN: usize = 40;
/// Frames longer than this are not believed when reading, whatever the
/// append limit is now: a sanity bound on a length that already passed
/// its header checksum.
const MAX_FRAME_READ: u32 = 1 << 30;

/// Tuning of the filesystem backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// A segment is closed and a new one started once the next frame would
    /// take it past this size. Bigger segments mean fewer files; recovery
    /// reads a segment whole, so this also sizes its read buffer. A record
    /// larger than this still gets written, alone in its segment.
    pub segment_bytes: u64,
    /// Largest encoded record [`Storage::append`] accepts (the kernel's
    /// payload limit keeps real records far below it). Reading is not bound
    /// by it, so lowering it never turns existing records into damage.
    pub max_record_bytes: u32,
    /// Encoded frames are buffered in memory until a sync; past this many
    /// bytes they are written early (not synced) to bound memory.
    pub write_buffer_bytes: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig { segment_bytes: 64 << 20, max_record_bytes: 64 << 20, write_buffer_bytes: 4 << 20 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Unloaded,
    Ready,
    Poisoned,
}

/// Where one session record sits, for history reads.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seq: u64,
    segment: u64,
    offset: u64,
}

/// The filesystem write-ahead log. Generic over the file system so tests
/// can run it on [`crate::SimFs`]; the default is the real one.
pub struct FsStorage<V: Vfs = RealFs> {
    vfs: V,
    dir: PathBuf,
    wal: PathBuf,
    cfg: FsConfig,
    _lock: V::Lock,
    phase: Phase,
    segments: BTreeMap<u64, V::File>,
    /// The segment appends go to (0 before load).
    active: u64,
    /// Bytes of the active segment already handed to the file.
    written: u64,
    /// Encoded bytes for the active segment after `written`.
    pending: Vec<u8>,
    /// Position after the last appended record.
    end: LogPos,
    durable: LogPos,
    /// A segment was created since the WAL directory was last synced.
    dir_dirty: bool,
    index: Index,
}

/// Session id → where each of its records sits, in log order.
type Index = HashMap<Box<str>, Vec<Loc>>;

impl<V: Vfs> std::fmt::Debug for FsStorage<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsStorage")
            .field("dir", &self.dir)
            .field("phase", &self.phase)
            .field("end", &self.end)
            .field("durable", &self.durable)
            .field("segments", &self.segments.len())
            .finish()
    }
}

/// A checkpoint's covered position and snapshot, `None` when there is no
/// checkpoint, or why the file is unreadable.
type CheckpointRead = Result<Option<(LogPos, Vec<u8>)>, String>;

fn segment_name(n: u64) -> String {
    format!("{n:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n > 0)
}

fn read_all<V: Vfs>(vfs: &V, path: &Path, into: &mut Vec<u8>) -> Result<(), StorageError> {
    let f = vfs.open(path, false).map_err(|e| StorageError::io("open", path, e))?;
    let len = f.size().map_err(|e| StorageError::io("stat", path, e))?;
    let len =
        usize::try_from(len).map_err(|_| StorageError::io("read", path, std::io::ErrorKind::FileTooLarge.into()))?;
    into.clear();
    into.resize(len, 0);
    f.read_exact_at(into, 0).map_err(|e| StorageError::io("read", path, e))
}

/// Writes `bytes` to `dir/name` atomically and durably: temporary file,
/// fsync, rename, directory fsync.
fn write_atomic<V: Vfs>(vfs: &V, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let f = vfs.open(&tmp, true).map_err(|e| StorageError::io("create", &tmp, e))?;
    f.set_len(0).map_err(|e| StorageError::io("truncate", &tmp, e))?;
    f.write_all_at(bytes, 0).map_err(|e| StorageError::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| StorageError::io("fsync", &tmp, e))?;
    vfs.rename(&tmp, &dst).map_err(|e| StorageError::io("rename", &tmp, e))?;
    vfs.sync_dir(dir).map_err(|e| StorageError::io("fsync", dir, e))
}

fn checkpoint_bytes(pos: LogPos, snapshot: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(CHECKPOINT_HEADER_LEN + snapshot.len());
    b.extend_from_slice(CHECKPOINT_MAGIC);
    b.extend_from_slice(&pos.segment.to_le_bytes());
    b.extend_from_slice(&pos.offset.to_le_bytes());
    b.extend_from_slice(&(snapshot.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(snapshot).to_le_bytes());
    let hc = crc32c::crc32c(&b);
    b.extend_from_slice(&hc.to_le_bytes());
    b.extend_from_slice(snapshot);
    b
}

/// Parses a checkpoint file: the covered position and the snapshot range.
fn parse_checkpoint(b: &[u8]) -> Result<(LogPos, std::ops::Range<usize>), String> {
    let h = b.get(..CHECKPOINT_HEADER_LEN).ok_or("shorter than its header")?;
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let u32_at = |i: usize| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&h[i..i + 4]);
        u32::from_le_bytes(a)
    };
    if &h[..8] != CHECKPOINT_MAGIC {
        return Err("bad magic".into());
    }
    if crc32c::crc32c(&h[..36]) != u32_at(36) {
        return Err("header checksum mismatch".into());
    }
    let len = u64_at(24);
    if len != (b.len() - CHECKPOINT_HEADER_LEN) as u64 {
        return Err(format!("snapshot length {len} does not match the file"));
    }
    let body = &b[CHECKPOINT_HEADER_LEN..];
    if crc32c::crc32c(body) != u32_at(32) {
        return Err("snapshot checksum mismatch".into());
    }
    Ok((LogPos::new(u64_at(8), u64_at(16)), CHECKPOINT_HEADER_LEN..b.len()))
}

impl FsStorage<RealFs> {
    /// Opens (creating if absent or empty) the data directory `dir` on the
    /// real file system and takes its lock. Call [`Storage::load`] (through
    /// [`crate::recover`]) before appending.
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
        if names.iter().any(|n| n == FORMAT_FILE) {
            let mut buf = Vec::new();
            read_all(&vfs, &dir.join(FORMAT_FILE), &mut buf)?;
            check_format(&dir, &buf)?;
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
            let marker = format!("{FORMAT_TAG} {FORMAT_VERSION}\n");
            write_atomic(&vfs, &dir, FORMAT_FILE, marker.as_bytes())?;
        }
        if !vfs.exists(&wal).map_err(|e| StorageError::io("stat", &wal, e))? {
            vfs.create_dir_all(&wal).map_err(|e| StorageError::io("mkdir", &wal, e))?;
            vfs.sync_dir(&dir).map_err(|e| StorageError::io("fsync", &dir, e))?;
        }
        Ok(FsStorage {
            vfs,
            dir,
            wal,
            cfg,
            _lock: lock,
            phase: Phase::Unloaded,
            segments: BTreeMap::new(),
            active: 0,
            written: 0,
            pending: Vec::new(),
            end: LogPos::default(),
            durable: LogPos::default(),
            dir_dirty: false,
            index: HashMap::new(),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of segment files in the log (for monitoring and tests).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Whether an earlier failure poisoned the backend (see the crate docs).
    pub fn is_poisoned(&self) -> bool {
        self.phase == Phase::Poisoned
    }

    fn segment_path(&self, n: u64) -> PathBuf {
        self.wal.join(segment_name(n))
    }

    fn ready(&self) -> Result<(), StorageError> {
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Poisoned => Err(StorageError::Poisoned),
            Phase::Unloaded => Err(StorageError::Misuse("load the log (recover) before using it")),
        }
    }

    /// Fail-stop: after any failed write the backend refuses all work.
    fn poisoned<T>(&mut self, e: StorageError) -> Result<T, StorageError> {
        self.phase = Phase::Poisoned;
        Err(e)
    }

    fn active_file(&self) -> Result<&V::File, StorageError> {
        self.segments.get(&self.active).ok_or(StorageError::Misuse("no active segment"))
    }

    /// Hands buffered frames to the file (no sync).
    fn flush(&mut self) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.active_file().and_then(|f| {
            f.write_all_at(&self.pending, self.written)
                .map_err(|e| StorageError::io("write", self.segment_path(self.active), e))
        });
        match r {
            Ok(()) => {
                self.written += self.pending.len() as u64;
                self.pending.clear();
                Ok(())
            }
            Err(e) => self.poisoned(e),
        }
    }

    fn sync_wal_dir(&mut self) -> Result<(), StorageError> {
        if self.dir_dirty {
            if let Err(e) = self.vfs.sync_dir(&self.wal) {
                let e = StorageError::io("fsync", &self.wal, e);
                return self.poisoned(e);
            }
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), StorageError> {
        let r = self
            .active_file()
            .and_then(|f| f.sync_data().map_err(|e| StorageError::io("fdatasync", self.segment_path(self.active), e)));
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.poisoned(e),
        }
    }

    /// Starts segment `n` (header buffered). The previous segment is made
    /// durable first, and its directory entry too, so a crash can never
    /// leave a later segment without every byte of the earlier ones: only
    /// the last segment can ever have a torn tail.
    fn start_segment(&mut self, n: u64) -> Result<(), StorageError> {
        if self.active != 0 {
            self.flush()?;
            self.sync_active()?;
        }
        self.sync_wal_dir()?;
        let path = self.segment_path(n);
        let file = match self.vfs.open(&path, true) {
            Ok(f) => f,
            Err(e) => return self.poisoned(StorageError::io("create", &path, e)),
        };
        self.segments.insert(n, file);
        self.dir_dirty = true;
        self.active = n;
        self.written = 0;
        self.pending.clear();
        self.pending.extend_from_slice(&frame::segment_header(n));
        self.end = LogPos::new(n, SEGMENT_HEADER_LEN);
        Ok(())
    }

    /// Reads the checkpoint file: `Ok(None)` if there is none, `Err(reason)`
    /// if it is unreadable; the outer error is an I/O failure.
    fn read_checkpoint(&self) -> Result<CheckpointRead, StorageError> {
        let path = self.dir.join(CHECKPOINT_FILE);
        if !self.vfs.exists(&path).map_err(|e| StorageError::io("stat", &path, e))? {
            return Ok(Ok(None));
        }
        let mut buf = Vec::new();
        read_all(&self.vfs, &path, &mut buf)?;
        Ok(match parse_checkpoint(&buf) {
            Ok((pos, range)) => {
                buf.truncate(range.end);
                buf.drain(..range.start);
                Ok(Some((pos, buf)))
            }
            Err(why) => Err(why),
        })
    }

    fn read_record_at(&self, loc: Loc, buf: &mut Vec<u8>) -> Result<Record, StorageError> {
        let damaged = |reason: String| StorageError::Damaged { segment: loc.segment, offset: loc.offset, reason };
        let file = self.segments.get(&loc.segment).ok_or_else(|| damaged("segment is gone".into()))?;
        let path = || self.segment_path(loc.segment);
        let mut head = [0u8; FRAME_HEADER_LEN];
        file.read_exact_at(&mut head, loc.offset).map_err(|e| StorageError::io("read", path(), e))?;
        let h = frame::parse_header(&head, 0, loc.segment, loc.offset, MAX_FRAME_READ)
            .ok_or_else(|| damaged("frame header does not verify".into()))?;
        buf.clear();
        buf.resize(h.len as usize, 0);
        file.read_exact_at(buf, loc.offset + FRAME_HEADER_LEN as u64)
            .map_err(|e| StorageError::io("read", path(), e))?;
        if crc32c::crc32c(buf) != h.crc {
            return Err(damaged("payload checksum mismatch".into()));
        }
        Record::decode(buf.as_slice()).map_err(|e| damaged(e.to_string()))
    }
}

/// Where a segment's valid data ends, as the reader found it.
struct SegmentEnd {
    segment: u64,
    valid_end: u64,
    torn: Option<u64>,
    file_len: u64,
}

/// The replaying side of [`Storage::load`]: hands the checkpoint, then
/// every finding, to the visitor in log order.
fn replay_findings(
    checkpoint: Option<(LogPos, Vec<u8>)>,
    rx: &Receiver<Result<Chunk, StorageError>>,
    ends: &mut Vec<SegmentEnd>,
    visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    if let Some((pos, snapshot)) = checkpoint {
        visit(LoadEvent::Checkpoint { pos, snapshot: &snapshot })?;
    }
    for chunk in rx.iter() {
        let chunk = chunk?;
        for f in chunk.found {
            match f {
                Found::Frame { pos, sid, seq, record } => {
                    let session_id = chunk.bytes.get(sid).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default();
                    match record {
                        None => visit(LoadEvent::Covered { pos, session_id, seq })?,
                        Some(Ok(record)) => visit(LoadEvent::Record { pos, record: *record })?,
                        // Its identity is readable even if the rest is not:
                        // name the session so recovery quarantines it.
                        Some(Err(why)) => {
                            let hint = (!session_id.is_empty()).then(|| session_id.to_string());
                            visit(undecodable(pos, 0, why, hint))?
                        }
                    }
                }
                Found::NotARecord { pos, len } => {
                    visit(undecodable(pos, len, "payload is not a protobuf record".into(), None))?
                }
                Found::Damage(d) => visit(LoadEvent::Damage(d))?,
                Found::End { segment, valid_end, torn, file_len } => {
                    ends.push(SegmentEnd { segment, valid_end, torn, file_len })
                }
            }
        }
    }
    Ok(())
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

/// One thing the reader found, in log order.
enum Found {
    /// A frame whose checksums hold. `record` is decoded only for frames
    /// after the checkpoint (`Some(Err)` if that failed). Boxed so covered
    /// frames stay small and the reader can run far ahead during the
    /// checkpoint restore.
    Frame { pos: LogPos, sid: Range<usize>, seq: u64, record: Option<Result<Box<Record>, String>> },
    /// A frame whose checksums hold but whose payload is not a record.
    NotARecord { pos: LogPos, len: u64 },
    /// Damaged bytes.
    Damage(Damage),
    /// A segment was fully scanned.
    End { segment: u64, valid_end: u64, torn: Option<u64>, file_len: u64 },
}

/// A batch of findings over one segment's bytes.
struct Chunk {
    bytes: Arc<Vec<u8>>,
    found: Vec<Found>,
}

/// Findings per chunk.
const CHUNK_ITEMS: usize = 8192;
/// Chunks the reader may run ahead of the replay: enough to scan a large
/// covered prefix while the caller restores the checkpoint, while bounding
/// the decoded records in flight (at most 256k).
const CHANNEL_DEPTH: usize = 32;

/// What the reader thread works from.
struct ReadPlan<'a, V> {
    vfs: &'a V,
    wal: &'a Path,
    segments: &'a [u64],
    checkpoint: Option<LogPos>,
}

/// The reader thread: reads, checks and decodes every segment in order,
/// sending findings to the replaying thread and building the history
/// index on the way. Runs concurrently with the checkpoint restore and the
/// kernel replay, which dominate recovery time.
fn read_segments<V: Vfs>(plan: ReadPlan<'_, V>, tx: SyncSender<Result<Chunk, StorageError>>) -> Index {
    let mut index: Index = HashMap::new();
    let mut expected = 1u64;
    let last = plan.segments.last().copied();
    for &n in plan.segments {
        let mut found = Vec::new();
        if n > expected {
            found.push(Found::Damage(Damage {
                segment: expected,
                offset: 0,
                len: n - expected,
                kind: DamageKind::MissingSegment,
                session_hint: None,
            }));
        }
        expected = n.saturating_add(1);
        let path = plan.wal.join(segment_name(n));
        let mut buf = Vec::new();
        if let Err(e) = read_all(plan.vfs, &path, &mut buf) {
            let _ = tx.send(Err(e));
            return index;
        }
        let bytes = Arc::new(buf);
        let mut sink = |f: Found| -> bool {
            found.push(f);
            if found.len() >= CHUNK_ITEMS {
                let chunk = Chunk { bytes: bytes.clone(), found: std::mem::take(&mut found) };
                return tx.send(Ok(chunk)).is_ok();
            }
            true
        };
        if !scan_segment(&plan, n, &bytes, Some(n) == last, &mut index, &mut sink) {
            return index;
        }
        if tx.send(Ok(Chunk { bytes: bytes.clone(), found })).is_err() {
            return index;
        }
    }
    index
}

/// Scans one segment into findings. Returns `false` if the receiver is gone.
fn scan_segment<V: Vfs>(
    plan: &ReadPlan<'_, V>,
    n: u64,
    bytes: &[u8],
    is_last: bool,
    index: &mut Index,
    sink: &mut dyn FnMut(Found) -> bool,
) -> bool {
    let max = MAX_FRAME_READ;
    let file_len = bytes.len() as u64;
    let mut at = if frame::segment_header_ok(bytes, n) {
        SEGMENT_HEADER_LEN as usize
    } else {
        match frame::find_next_header(bytes, 0, n, 0, max) {
            None if is_last => return sink(Found::End { segment: n, valid_end: 0, torn: Some(0), file_len }),
            next => {
                let to = next.unwrap_or(bytes.len());
                let d = Damage {
                    segment: n,
                    offset: 0,
                    len: to as u64,
                    kind: DamageKind::BadSegmentHeader,
                    session_hint: None,
                };
                if !sink(Found::Damage(d)) {
                    return false;
                }
                to
            }
        }
    };
    let mut valid_end = at as u64;
    while at < bytes.len() {
        let off = at as u64;
        let pos = LogPos::new(n, off);
        match frame::read_frame(bytes, at, n, off, max) {
            Ok((payload, next)) => {
                let f = match frame::peek_identity(payload) {
                    None => Found::NotARecord { pos, len: (next - at) as u64 },
                    Some((range, seq)) => {
                        let sid = std::str::from_utf8(&payload[range.clone()]).unwrap_or_default();
                        if !sid.is_empty() {
                            let loc = Loc { seq, segment: n, offset: off };
                            match index.get_mut(sid) {
                                Some(v) => v.push(loc),
                                None => {
                                    index.insert(sid.into(), vec![loc]);
                                }
                            }
                        }
                        let covered = plan.checkpoint.is_some_and(|c| pos < c);
                        let record =
                            (!covered).then(|| Record::decode(payload).map(Box::new).map_err(|e| e.to_string()));
                        // The id is passed as a range of `bytes`, so the
                        // replaying thread borrows it instead of copying it.
                        let base = at + FRAME_HEADER_LEN;
                        Found::Frame { pos, sid: base + range.start..base + range.end, seq, record }
                    }
                };
                if !sink(f) {
                    return false;
                }
                at = next;
                valid_end = next as u64;
            }
            Err((kind, header)) => {
                let next = frame::find_next_header(bytes, at + 1, n, 0, max);
                if next.is_none() && is_last {
                    return sink(Found::End { segment: n, valid_end, torn: Some(off), file_len });
                }
                let to = next.unwrap_or(bytes.len());
                let (kind, hint) = match (kind, header) {
                    (FrameError::BadPayload, Some(h)) => {
                        let start = at + FRAME_HEADER_LEN;
                        let end = start.saturating_add(h.len as usize).min(bytes.len());
                        (DamageKind::BadChecksum, bytes.get(start..end).and_then(frame::salvage_session))
                    }
                    // The header is gone but the payload may be whole:
                    // a session record starts with its session id.
                    _ => {
                        let hint = bytes.get(at + FRAME_HEADER_LEN..to).and_then(frame::salvage_session);
                        (DamageKind::BadFrame, hint)
                    }
                };
                let d = Damage { segment: n, offset: off, len: (to - at) as u64, kind, session_hint: hint };
                if !sink(Found::Damage(d)) {
                    return false;
                }
                at = to;
            }
        }
    }
    sink(Found::End { segment: n, valid_end, torn: None, file_len })
}

fn check_format(dir: &Path, bytes: &[u8]) -> Result<(), StorageError> {
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
    Ok(())
}

impl<V: Vfs> Storage for FsStorage<V> {
    fn load(
        &mut self,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        if self.phase != Phase::Unloaded {
            return Err(StorageError::Misuse("load called twice"));
        }
        let names = self.vfs.list_dir(&self.wal).map_err(|e| StorageError::io("list", &self.wal, e))?;
        let mut segs: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        segs.sort_unstable();

        let ck_data = match self.read_checkpoint()? {
            Ok(found) => found,
            Err(reason) => {
                // Without a checkpoint the whole log must replay, which only
                // works while it still starts at segment 1.
                if segs.first().is_some_and(|&f| f != 1) {
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
        };
        let ck_pos = ck_data.as_ref().map(|(pos, _)| *pos);

        let mut summary = LoadSummary::default();
        let mut tail = LogPos::default();
        let mut ends = Vec::new();
        let plan = ReadPlan { vfs: &self.vfs, wal: &self.wal, segments: &segs, checkpoint: ck_pos };
        let (replayed, index) = std::thread::scope(|scope| {
            let (tx, rx) = sync_channel(CHANNEL_DEPTH);
            let reader = scope.spawn(move || read_segments(plan, tx));
            let replayed = replay_findings(ck_data, &rx, &mut ends, visit);
            drop(rx);
            let index = match reader.join() {
                Ok(index) => index,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            (replayed, index)
        });
        replayed?;
        self.index = index;
        let last = segs.last().copied();
        for end in ends {
            let path = self.segment_path(end.segment);
            let file = self.vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
            if let Some(cut) = end.torn {
                let dropped = end.file_len - cut;
                if dropped > 0 {
                    file.set_len(cut).map_err(|e| StorageError::io("truncate", &path, e))?;
                    file.sync_data().map_err(|e| StorageError::io("fdatasync", &path, e))?;
                    summary.torn_tail = Some(TornTail { segment: end.segment, offset: cut, dropped_bytes: dropped });
                }
            }
            self.segments.insert(end.segment, file);
            tail = LogPos::new(end.segment, end.valid_end);
        }
        let ck = ck_pos;
        if let Some(c) = ck {
            if tail < c {
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
        match last {
            Some(n) if tail.offset >= SEGMENT_HEADER_LEN && ck.is_none_or(|c| tail >= c) => {
                self.active = n;
                self.written = tail.offset;
                self.end = tail;
            }
            Some(n) if tail.offset < SEGMENT_HEADER_LEN && ck.is_none_or(|c| c.segment < n) => {
                // The last segment lost even its header in the crash: rewrite it.
                self.active = n;
                self.written = 0;
                self.pending.extend_from_slice(&frame::segment_header(n));
                self.end = LogPos::new(n, SEGMENT_HEADER_LEN);
            }
            _ => {
                let next = last.unwrap_or(0).max(ck.map_or(0, |c| c.segment)) + 1;
                self.start_segment(next)?;
            }
        }
        self.phase = Phase::Ready;
        if !self.pending.is_empty() {
            // A new or rewritten segment header: make it durable now so the
            // log is well-formed before anything is appended.
            self.durable = LogPos::default();
            self.sync()?;
        }
        self.durable = self.end;
        summary.end = self.end;
        Ok(summary)
    }

    fn append(&mut self, records: &[Record]) -> Result<LogPos, StorageError> {
        self.ready()?;
        for r in records {
            let len = r.encoded_len();
            if len > self.cfg.max_record_bytes as usize {
                let max = self.cfg.max_record_bytes as usize;
                return self.poisoned(StorageError::RecordTooLarge { len, max });
            }
            let frame_len = (FRAME_HEADER_LEN + len) as u64;
            if self.end.offset + frame_len > self.cfg.segment_bytes && self.end.offset > SEGMENT_HEADER_LEN {
                self.start_segment(self.active + 1)?;
            }
            let offset = self.end.offset;
            let start = self.pending.len();
            self.pending.resize(start + FRAME_HEADER_LEN, 0);
            // Encoding into a Vec cannot fail: it grows as needed.
            let _ = r.encode(&mut self.pending);
            frame::seal_frame(&mut self.pending[start..], self.active, offset);
            if !r.session_id.is_empty() {
                let loc = Loc { seq: r.seq, segment: self.active, offset };
                match self.index.get_mut(r.session_id.as_str()) {
                    Some(v) => v.push(loc),
                    None => {
                        self.index.insert(r.session_id.as_str().into(), vec![loc]);
                    }
                }
            }
            self.end.offset += frame_len;
            if self.pending.len() >= self.cfg.write_buffer_bytes {
                self.flush()?;
            }
        }
        Ok(self.end)
    }

    fn sync(&mut self) -> Result<LogPos, StorageError> {
        self.ready()?;
        if self.end == self.durable && self.pending.is_empty() {
            return Ok(self.durable);
        }
        self.flush()?;
        self.sync_active()?;
        self.sync_wal_dir()?;
        self.durable = self.end;
        Ok(self.durable)
    }

    fn durable(&self) -> LogPos {
        self.durable
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<LogPos, StorageError> {
        let pos = self.sync()?;
        let bytes = checkpoint_bytes(pos, snapshot);
        match write_atomic(&self.vfs, &self.dir, CHECKPOINT_FILE, &bytes) {
            Ok(()) => Ok(pos),
            Err(e) => self.poisoned(e),
        }
    }

    fn history(&self, session_id: &str, after_seq: u64) -> Result<Vec<Record>, StorageError> {
        self.ready()?;
        let Some(locs) = self.index.get(session_id) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for &loc in locs {
            if loc.seq <= after_seq || LogPos::new(loc.segment, loc.offset) >= self.durable {
                continue;
            }
            out.push(self.read_record_at(loc, &mut buf)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip_and_reject_junk() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.seg"), None);
        assert_eq!(parse_segment_name(&segment_name(0)), None);
    }

    #[test]
    fn checkpoint_file_roundtrip_and_damage() {
        let b = checkpoint_bytes(LogPos::new(3, 99), b"snap");
        let (pos, r) = parse_checkpoint(&b).expect("valid");
        assert_eq!(pos, LogPos::new(3, 99));
        assert_eq!(&b[r], b"snap");
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(parse_checkpoint(&d).is_err(), "flip at {i} undetected");
        }
        assert!(parse_checkpoint(&b[..b.len() - 1]).is_err());
        assert!(parse_checkpoint(&[]).is_err());
    }
}
