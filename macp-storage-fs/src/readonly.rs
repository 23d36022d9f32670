//! Opening a data directory without ever writing to it: for tools
//! (`macp-admin`) that inspect, verify or export a directory, possibly
//! while nobody else may touch it.
//!
//! [`ReadOnlyFs`] is a [`Vfs`] whose files are opened `O_RDONLY`; whatever
//! the storage code would write (truncating a torn tail, handing back the
//! summaries of sessions that ended in the replayed tail, redb's own
//! bookkeeping when it opens the index) lands in memory, page by page, and
//! is dropped with it. So the real [`FsStorage`] and the real recovery run
//! over the directory unchanged — no second decoder of the format — and
//! the directory is bit-for-bit what it was.
//!
//! **Locking.** [`ReadOnlyFs`] takes the `LOCK` file *shared*
//! (`flock(LOCK_SH)`): a running server holds it exclusively, so opening
//! fails with [`StorageError::Locked`] while one runs, and a server that
//! starts while a tool holds it shared refuses to start (its exclusive lock
//! fails) rather than write under a reader. Several tools may read at once.
//! A directory without a `LOCK` file (a copy made without it) is read
//! unlocked: a server creates the file when it opens the directory, so none
//! is running on it at that moment.
//!
//! [`FsStorage::scan_log`] reads every frame of every segment — what load
//! never does, since it reads only the tail after the checkpoint — and
//! [`FsStorage::checkpoint_info`] and [`FsStorage::segment_files`] describe
//! the directory, for `macp-admin inspect` and `verify`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use macp_storage::{Damage, DamageKind, LogPos, Record, StorageError};

use crate::checkpoint;
use crate::scan::{self, Found};
use crate::storage::{FsConfig, FsStorage, CHECKPOINT_FILE, FORMAT_FILE};
use crate::vfs::{Vfs, VfsFile};

const PAGE: u64 = 4096;

/// The real file system, read-only, with writes kept in memory (see the
/// module docs).
#[derive(Clone, Debug, Default)]
pub struct ReadOnlyFs {
    overlay: Arc<Mutex<Overlay>>,
}

#[derive(Debug, Default)]
struct Overlay {
    /// Files opened (and so possibly written) through this file system;
    /// `None`: removed here.
    files: BTreeMap<PathBuf, Option<Arc<CowFile>>>,
    dirs: BTreeSet<PathBuf>,
}

/// A file as this file system sees it: the real file's bytes below
/// `base_len`, overlaid with the pages written here.
#[derive(Debug)]
struct CowFile {
    /// The real file, opened per read so that reading a long history does
    /// not keep one descriptor per segment; `None` for a file created here.
    base: Option<PathBuf>,
    state: Mutex<CowState>,
}

#[derive(Debug)]
struct CowState {
    len: u64,
    /// Bytes of the real file still visible (a truncation hides the rest).
    base_len: u64,
    pages: BTreeMap<u64, Vec<u8>>,
}

impl CowFile {
    fn state(&self) -> MutexGuard<'_, CowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills `buf` with the bytes at `offset`, all below the length.
    fn read_in(&self, st: &CowState, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        // The real file's bytes first, then the pages written on top.
        let from_base = end.min(st.base_len);
        if let (Some(path), true) = (&self.base, from_base > offset) {
            let n = (from_base - offset) as usize;
            FileExt::read_exact_at(&File::open(path)?, &mut buf[..n], offset)?;
        }
        for (&p, page) in st.pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let (ps, pe) = (p * PAGE, p * PAGE + PAGE);
            let (s, e) = (ps.max(offset), pe.min(end));
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&page[(s - ps) as usize..(e - ps) as usize]);
        }
        Ok(())
    }
}

/// An open file of [`ReadOnlyFs`].
#[derive(Clone, Debug)]
pub struct ReadOnlyFile(Arc<CowFile>);

impl VfsFile for ReadOnlyFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.state().len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.0.state();
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > st.len) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.0.read_in(&st, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.0.state();
        let end = offset.checked_add(buf.len() as u64).ok_or(io::ErrorKind::InvalidInput)?;
        let mut p = offset / PAGE;
        while p * PAGE < end {
            let ps = p * PAGE;
            if !st.pages.contains_key(&p) {
                let mut page = vec![0u8; PAGE as usize];
                let have = st.len.min(ps + PAGE).saturating_sub(ps) as usize;
                self.0.read_in(&st, &mut page[..have], ps)?;
                st.pages.insert(p, page);
            }
            let (s, e) = (ps.max(offset), (ps + PAGE).min(end));
            if let Some(page) = st.pages.get_mut(&p) {
                page[(s - ps) as usize..(e - ps) as usize]
                    .copy_from_slice(&buf[(s - offset) as usize..(e - offset) as usize]);
            }
            p += 1;
        }
        st.len = st.len.max(end);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.0.state();
        st.base_len = st.base_len.min(len);
        st.pages.retain(|&p, _| p * PAGE < len);
        if let Some(page) = st.pages.get_mut(&(len / PAGE)) {
            page[(len % PAGE) as usize..].fill(0);
        }
        st.len = len;
        Ok(())
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        // Zeros past the old length: nothing of the real file shows there
        // (base_len never exceeds len) and pages are zero past it.
        let mut st = self.0.state();
        st.len = st.len.max(len);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }
}

impl ReadOnlyFs {
    /// A fresh view of the real file system with nothing written yet.
    pub fn new() -> Self {
        ReadOnlyFs::default()
    }

    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Vfs for ReadOnlyFs {
    type File = ReadOnlyFile;
    /// The shared lock, or nothing when the directory has no `LOCK` file.
    type Lock = Option<File>;

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.overlay().dirs.insert(path.to_path_buf());
        Ok(())
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names: BTreeSet<String> = match fs::read_dir(path) {
            Ok(rd) => rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect::<Result<_, _>>()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        for (p, f) in &self.overlay().files {
            if p.parent() != Some(path) {
                continue;
            }
            let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
            if f.is_some() {
                names.insert(name);
            } else {
                names.remove(&name);
            }
        }
        Ok(names.into_iter().collect())
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        let o = self.overlay();
        if let Some(f) = o.files.get(path) {
            return Ok(f.is_some());
        }
        if o.dirs.contains(path) {
            return Ok(true);
        }
        path.try_exists()
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<ReadOnlyFile> {
        let mut o = self.overlay();
        if let Some(f) = o.files.get(path) {
            return match f {
                Some(f) => Ok(ReadOnlyFile(f.clone())),
                None if create => {
                    let f = Arc::new(CowFile { base: None, state: Mutex::new(empty()) });
                    o.files.insert(path.to_path_buf(), Some(f.clone()));
                    Ok(ReadOnlyFile(f))
                }
                None => Err(io::ErrorKind::NotFound.into()),
            };
        }
        let f = match File::open(path) {
            Ok(real) => {
                let len = real.metadata()?.len();
                let state = CowState { len, base_len: len, pages: BTreeMap::new() };
                CowFile { base: Some(path.to_path_buf()), state: Mutex::new(state) }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                CowFile { base: None, state: Mutex::new(empty()) }
            }
            Err(e) => return Err(e),
        };
        let f = Arc::new(f);
        o.files.insert(path.to_path_buf(), Some(f.clone()));
        Ok(ReadOnlyFile(f))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let f = self.open(from, false)?;
        let mut o = self.overlay();
        o.files.insert(from.to_path_buf(), None);
        o.files.insert(to.to_path_buf(), Some(f.0));
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.open(path, false)?;
        self.overlay().files.insert(path.to_path_buf(), None);
        Ok(())
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Option<File>>> {
        let f = match OpenOptions::new().read(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(None)),
            Err(e) => return Err(e),
        };
        match f.try_lock_shared() {
            Ok(()) => Ok(Some(Some(f))),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

fn empty() -> CowState {
    CowState { len: 0, base_len: 0, pages: BTreeMap::new() }
}

/// One segment file of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    /// Its number (1-based, ascending in the log).
    pub number: u64,
    /// Its file name inside `wal/`.
    pub name: String,
    /// Its file's size in bytes: for the last segment of a directory in
    /// use, the size preallocated for it ([`FsConfig::segment_bytes`]), not
    /// the log's logical end (see the crate docs); sealed segments end
    /// with their last frame.
    pub bytes: u64,
}

/// The checkpoint file as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The log position it covers: every record before it is inside it.
    pub pos: LogPos,
    /// The file's size in bytes.
    pub bytes: u64,
    /// The kernel's open state it holds.
    pub open_state: Vec<u8>,
}

/// One thing [`FsStorage::scan_log`] found, in log order.
#[derive(Debug)]
pub enum LogItem {
    /// A record frame whose checksums hold and whose payload decodes.
    Record {
        /// Where its frame starts.
        pos: LogPos,
        /// The record.
        record: Box<Record>,
    },
    /// A record carried forward by compaction (`MCPY`): a copy of one
    /// already in the log, which replay skips.
    Carried {
        /// Where its frame starts.
        pos: LogPos,
    },
    /// Damaged bytes (checksum, framing, undecodable payload, missing
    /// segment).
    Damage(Damage),
    /// A crash cut the last segment mid-write here (not damage: never
    /// acknowledged; recovery truncates it). Zeros alone after the last
    /// frame are not one: they are the active segment's preallocated space.
    TornTail {
        /// Where the torn bytes start.
        pos: LogPos,
        /// How many bytes are torn (up to the last non-zero one; the
        /// reservation's zeros after it are not counted).
        bytes: u64,
    },
    /// A segment was read to its end.
    SegmentEnd {
        /// The segment.
        segment: u64,
        /// Its file's size in bytes (for the active segment of a directory
        /// in use, the preallocated size, past the log's logical end).
        bytes: u64,
    },
}

impl FsStorage<ReadOnlyFs> {
    /// Opens the data directory `dir` read-only (see the module docs): the
    /// directory must exist and carry a format marker, and no server may
    /// hold it ([`StorageError::Locked`]). Recover from it as usual; nothing
    /// reaches the disk.
    pub fn open_read_only(dir: impl AsRef<Path>, cfg: FsConfig) -> Result<Self, StorageError> {
        let dir = dir.as_ref();
        match dir.join(FORMAT_FILE).try_exists() {
            Ok(true) => {}
            Ok(false) => {
                let reason = if dir.is_dir() { "it has no FORMAT marker" } else { "it does not exist" };
                return Err(StorageError::NotADataDir { path: dir.to_path_buf(), reason: reason.into() });
            }
            Err(e) => return Err(StorageError::io("stat", dir.join(FORMAT_FILE), e)),
        }
        Self::open_with(ReadOnlyFs::new(), dir, cfg)
    }
}

impl<V: Vfs> FsStorage<V> {
    /// The segment files of the log, ascending.
    pub fn segment_files(&self) -> Result<Vec<SegmentFile>, StorageError> {
        let wal = &self.shared().wal;
        let vfs = &self.shared().vfs;
        let mut out = Vec::new();
        for name in vfs.list_dir(wal).map_err(|e| StorageError::io("list", wal, e))? {
            let Some(number) = scan::parse_segment_name(&name) else { continue };
            let path = wal.join(&name);
            let f = vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
            let bytes = f.size().map_err(|e| StorageError::io("stat", &path, e))?;
            out.push(SegmentFile { number, name, bytes });
        }
        out.sort_by_key(|s| s.number);
        Ok(out)
    }

    /// The checkpoint, if there is one. An unreadable one is
    /// [`StorageError::CheckpointCorrupt`] with the reason.
    pub fn checkpoint_info(&self) -> Result<Option<CheckpointInfo>, StorageError> {
        let path = self.dir().join(CHECKPOINT_FILE);
        let vfs = &self.shared().vfs;
        if !vfs.exists(&path).map_err(|e| StorageError::io("stat", &path, e))? {
            return Ok(None);
        }
        let f = vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
        let len = f.size().map_err(|e| StorageError::io("stat", &path, e))?;
        let n =
            usize::try_from(len).map_err(|_| StorageError::io("read", &path, io::ErrorKind::FileTooLarge.into()))?;
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, 0).map_err(|e| StorageError::io("read", &path, e))?;
        let parsed = checkpoint::parse(&buf).map_err(|reason| StorageError::CheckpointCorrupt { path, reason })?;
        let open_state = buf.get(parsed.open_state).map(<[u8]>::to_vec).unwrap_or_default();
        Ok(Some(CheckpointInfo { pos: parsed.pos, bytes: len, open_state }))
    }

    /// Reads every frame of every segment, checking every checksum, and
    /// hands what it finds to `visit` in log order (a gap between segment
    /// numbers is reported as [`DamageKind::MissingSegment`] only above the
    /// first segment: segments below it were retired). Only the last
    /// segment can end torn. Stops early when `visit` breaks. Reads one
    /// segment into memory at a time.
    pub fn scan_log(&self, visit: &mut dyn FnMut(LogItem) -> ControlFlow<()>) -> Result<(), StorageError> {
        let segments = self.segment_files()?;
        let wal = &self.shared().wal;
        let vfs = &self.shared().vfs;
        let last = segments.last().map(|s| s.number);
        let mut expected: Option<u64> = None;
        for s in &segments {
            if let Some(e) = expected.filter(|&e| s.number > e) {
                let d = Damage {
                    segment: e,
                    offset: 0,
                    len: s.number - e,
                    kind: DamageKind::MissingSegment,
                    session_hint: None,
                };
                if visit(LogItem::Damage(d)).is_break() {
                    return Ok(());
                }
            }
            expected = Some(s.number.saturating_add(1));
            let path = wal.join(&s.name);
            let f = vfs.open(&path, false).map_err(|e| StorageError::io("open", &path, e))?;
            let len = f.size().map_err(|e| StorageError::io("stat", &path, e))?;
            let n = usize::try_from(len)
                .map_err(|_| StorageError::io("read", &path, io::ErrorKind::FileTooLarge.into()))?;
            let mut bytes = vec![0u8; n];
            f.read_exact_at(&mut bytes, 0).map_err(|e| StorageError::io("read", &path, e))?;
            let mut stopped = false;
            let mut sink = |found: Found| -> bool {
                let item = match found {
                    Found::Record { pos, len, sid, record } => match record {
                        Ok(record) => LogItem::Record { pos, record },
                        Err(why) => LogItem::Damage(Damage {
                            segment: pos.segment,
                            offset: pos.offset,
                            len: u64::from(len),
                            kind: DamageKind::Undecodable(why),
                            session_hint: bytes.get(sid).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string),
                        }),
                    },
                    Found::Carried { pos, .. } => LogItem::Carried { pos },
                    Found::NotARecord { pos, len } => LogItem::Damage(Damage {
                        segment: pos.segment,
                        offset: pos.offset,
                        len,
                        kind: DamageKind::Undecodable("the frame's payload is not a record".into()),
                        session_hint: None,
                    }),
                    Found::Damage(d) => LogItem::Damage(d),
                    Found::End(end) => {
                        // Zeros alone after the last frame are the active
                        // segment's preallocated space, not a torn write.
                        if let Some(torn) = end.torn.filter(|&t| end.data_end > t) {
                            let item =
                                LogItem::TornTail { pos: LogPos::new(end.segment, torn), bytes: end.data_end - torn };
                            if visit(item).is_break() {
                                stopped = true;
                                return false;
                            }
                        }
                        LogItem::SegmentEnd { segment: end.segment, bytes: end.file_len }
                    }
                };
                stopped = visit(item).is_break();
                !stopped
            };
            scan::scan_segment(s.number, &bytes, 0, Some(s.number) == last, &mut sink);
            if stopped {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(fs: &ReadOnlyFs, path: &Path) -> ReadOnlyFile {
        fs.open(path, false).expect("open")
    }

    #[test]
    fn writes_stay_in_memory_and_reads_see_them() {
        let dir = std::env::temp_dir().join(format!("macp-ro-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let original: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        fs::write(&path, &original).unwrap();
        let ro = ReadOnlyFs::new();
        let f = file(&ro, &path);
        f.write_all_at(b"hello", 4094).unwrap();
        f.write_all_at(b"tail", 10_000).unwrap();
        let again = file(&ro, &path);
        assert_eq!(again.size().unwrap(), 10_004);
        let mut buf = vec![0u8; 10];
        again.read_exact_at(&mut buf, 4090).unwrap();
        assert_eq!(
            &buf,
            &[
                original[4090],
                original[4091],
                original[4092],
                original[4093],
                b'h',
                b'e',
                b'l',
                b'l',
                b'o',
                original[4099]
            ]
        );
        f.set_len(4096).unwrap();
        f.set_len(4100).unwrap();
        let mut buf = vec![0u8; 4];
        again.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0; 4], "truncated bytes do not come back from the real file");
        assert!(again.read_exact_at(&mut buf, 4098).is_err());
        ro.rename(&path, &dir.join("g")).unwrap();
        assert_eq!(ro.list_dir(&dir).unwrap(), vec!["g".to_string()]);
        assert_eq!(fs::read(&path).unwrap(), original, "the real file is untouched");
        assert!(!dir.join("g").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
