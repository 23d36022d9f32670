//! The file-system calls the storage makes, behind a trait.
//!
//! [`RealFs`] is the operating system. [`SimFs`] is an in-memory file
//! system that remembers which bytes and directory entries were synced, can
//! fail any chosen operation, and can produce the image a power cut would
//! leave: a file's growth since its last sync survives as a random prefix
//! (none, all, or torn anywhere), each in-place overwrite since then lands
//! or not (or torn at a 512-byte sector boundary) — writes into space
//! reserved with [`VfsFile::allocate`] are such overwrites, each on its
//! own, whatever their order — and unsynced renames,
//! creations and removals are either kept or lost. The crash tests — and a
//! simulator that wants disk faults — run the real storage code on it, the
//! write-ahead log and the embedded index database alike (the index reaches
//! its file through the same trait, see `index.rs`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// An open file: positioned reads and writes, truncation, syncs.
///
/// `Send + Sync + 'static` because readers on other threads read segments
/// through shared handles, and the index database owns its file.
pub trait VfsFile: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; short files are an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Truncates or extends to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves the file's blocks up to `len` bytes (`fallocate` mode 0):
    /// afterwards the file is at least `len` bytes long, the bytes past its
    /// old size read as zeros, and writes below `len` no longer grow it. A
    /// longer file is left as it is. Like a size change by `set_len`, the
    /// new size is durable once a later `sync_data`/`sync_all` returns.
    /// [`io::ErrorKind::Unsupported`] when the file system cannot do it;
    /// callers then simply go without (the default).
    fn allocate(&self, len: u64) -> io::Result<()> {
        let _ = len;
        Err(io::ErrorKind::Unsupported.into())
    }
    /// `fdatasync`: the data (and the size) durable, not other metadata.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`.
    fn sync_all(&self) -> io::Result<()>;
}

/// The directory-level calls. `Clone + Send + Sync + 'static` because
/// readers on other threads open segments on demand, and loading reads
/// segments on a helper thread while the caller's thread replays.
pub trait Vfs: Clone + Send + Sync + 'static {
    /// Its open files.
    type File: VfsFile;
    /// Held while the data directory is owned; released on drop.
    type Lock: Send;
    /// `mkdir -p`.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries in a directory (empty if it does not exist).
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Whether a file exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Opens read-write, creating the file if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Self::File>;
    /// Atomic rename (replaces `to`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive advisory lock on `path` (creating it);
    /// `Ok(None)` when someone else holds it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<Self::Lock>>;
}

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

impl VfsFile for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    #[cfg(target_os = "linux")]
    fn allocate(&self, len: u64) -> io::Result<()> {
        use rustix::io::Errno;
        match rustix::fs::fallocate(self, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // Not this file system (EOPNOTSUPP), or not this kernel.
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => Err(io::ErrorKind::Unsupported.into()),
            Err(e) => Err(e.into()),
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
}

impl Vfs for RealFs {
    type File = File;
    type Lock = File;

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let rd = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
        out.sort();
        Ok(out)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<File>> {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

// ----- the simulated file system -----------------------------------------

#[derive(Clone, Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// `(offset, len)` of every write since the last sync, in order.
    dirty: Vec<(usize, usize)>,
    /// The length last set with `set_len` (or reached by `allocate`) since
    /// the last sync, if any.
    resized: Option<usize>,
    /// That length came from `allocate`: writes into the space it added
    /// are overwrites of reserved blocks, not growth (see `crashed_bytes`).
    allocated: bool,
}

#[derive(Debug, Default)]
struct SimState {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    locks: BTreeMap<PathBuf, u64>,
    next_lock: u64,
    ops: u64,
    data_syncs: u64,
    dir_syncs: u64,
    bytes_read: u64,
    fail_at: Option<u64>,
    failed: bool,
    /// `allocate` answers `Unsupported`, as on a file system without
    /// `fallocate`.
    no_allocate: bool,
}

/// An in-memory file system that tracks durability and injects faults.
///
/// Every mutating call (create, write, truncate, sync, rename, remove) is a
/// numbered operation. [`SimFs::fail_at`] makes operation `n` fail, and
/// every mutating call after it too, as a dying disk or a power cut would;
/// [`SimFs::crash_image`] then gives the state a reboot would find.
#[derive(Clone, Debug, Default)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

/// An open [`SimFs`] file.
#[derive(Debug)]
pub struct SimFile {
    fs: SimFs,
    ino: usize,
}

/// The advisory lock of a [`SimFs`] path; released on drop.
#[derive(Debug)]
pub struct SimLock {
    fs: SimFs,
    path: PathBuf,
    id: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = self.fs.lock();
        if st.locks.get(&self.path) == Some(&self.id) {
            st.locks.remove(&self.path);
        }
    }
}

fn injected() -> io::Error {
    io::Error::other("injected fault")
}

/// A small deterministic generator (splitmix64), so crash images are
/// reproducible from a seed.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

impl SimFs {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock only happens in a failing test; the
        // state is still the best information there is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes mutating operation number `n` (0-based, counted from now on
    /// since creation) fail, and every mutating operation after it.
    pub fn fail_at(&self, n: u64) {
        self.lock().fail_at = Some(n);
    }

    /// Mutating operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// `(file syncs, directory syncs)` performed so far, to check that group
    /// commit really issues one sync per batch.
    pub fn sync_counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.data_syncs, st.dir_syncs)
    }

    /// Bytes read through all files so far: tests check that opening a
    /// data directory reads a bounded amount, not the whole history.
    pub fn bytes_read(&self) -> u64 {
        self.lock().bytes_read
    }

    /// Makes `allocate` unsupported (`false`), as on a file system without
    /// `fallocate`, or supported again (the default). Crash images keep
    /// the setting.
    pub fn set_allocate_supported(&self, supported: bool) {
        self.lock().no_allocate = !supported;
    }

    /// Whether an injected fault has fired.
    pub fn has_failed(&self) -> bool {
        self.lock().failed
    }

    /// Clears the injected fault, as if the process restarted on the same
    /// (not crashed) machine: unsynced data stays readable.
    pub fn heal(&self) {
        let mut st = self.lock();
        st.fail_at = None;
        st.failed = false;
    }

    /// The file system a power cut at this moment could leave behind.
    ///
    /// Each file keeps its synced bytes plus a random prefix of its growth
    /// by writes since (none, all, or torn anywhere); a length set with
    /// `set_len` or reached by `allocate` since the last sync survives whole
    /// or not at all; each overwrite since the last sync — and so each
    /// write into space `allocate` reserved, whatever the order they were
    /// made in — lands whole, not at all, or torn at a sector boundary.
    /// Each
    /// directory entry changed since its directory was last synced comes
    /// back old or new.
    pub fn crash_image(&self, seed: u64) -> SimFs {
        let st = self.lock();
        let mut rng = SplitMix::new(seed);
        let mut out = SimState { no_allocate: st.no_allocate, ..SimState::default() };
        let mut paths: Vec<&PathBuf> = st.names.keys().chain(st.durable_names.keys()).collect();
        paths.sort();
        paths.dedup();
        let mut mapped: BTreeMap<usize, usize> = BTreeMap::new();
        for path in paths {
            let now = st.names.get(path).copied();
            let then = st.durable_names.get(path).copied();
            let pick = if now == then || rng.below(2) == 0 { now } else { then };
            let Some(ino) = pick else { continue };
            let new_ino = *mapped.entry(ino).or_insert_with(|| {
                let node = &st.inodes[ino];
                let data = crashed_bytes(node, &mut rng);
                out.inodes.push(Inode {
                    data: data.clone(),
                    durable: data,
                    dirty: Vec::new(),
                    resized: None,
                    allocated: false,
                });
                out.inodes.len() - 1
            });
            out.names.insert(path.clone(), new_ino);
        }
        out.durable_names = out.names.clone();
        SimFs { state: Arc::new(Mutex::new(out)) }
    }

    /// The current (readable) contents of a file, for tests that damage it.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.lock();
        st.names.get(path).map(|&i| st.inodes[i].data.clone())
    }

    /// Replaces a file's contents as durable bytes (simulated bit rot).
    pub fn write_file_durable(&self, path: &Path, data: Vec<u8>) {
        let mut st = self.lock();
        if let Some(&i) = st.names.get(path) {
            st.inodes[i] =
                Inode { data: data.clone(), durable: data, dirty: Vec::new(), resized: None, allocated: false };
        }
    }

    /// Every file path, sorted.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock().names.keys().cloned().collect()
    }

    /// Counts a mutating operation; `Err` once the injected fault fired.
    fn op(&self) -> io::Result<()> {
        self.op_torn().map_err(|_| injected())
    }

    /// Like [`SimFs::op`], but says when this very operation is the one
    /// that fails (`Err(Some(seed))`), so a write can be left half done.
    fn op_torn(&self) -> Result<(), Option<u64>> {
        let mut st = self.lock();
        if st.failed {
            return Err(None);
        }
        let n = st.ops;
        st.ops += 1;
        if st.fail_at == Some(n) {
            st.failed = true;
            return Err(Some(n));
        }
        Ok(())
    }
}

fn crashed_bytes(node: &Inode, rng: &mut SplitMix) -> Vec<u8> {
    let (dl, nl) = (node.durable.len(), node.data.len());
    let prefix = |rng: &mut SplitMix, extra: usize| -> usize {
        let extra = extra as u64;
        (match rng.below(3) {
            0 => 0,
            1 => extra,
            _ => rng.below(extra + 1),
        }) as usize
    };
    // The length, and where growth by appending writes starts. A length
    // set with set_len is metadata: it survives whole or not at all.
    // Growth by writes survives as a prefix (torn anywhere), never with
    // holes: the file system orders data before the size that exposes it.
    let (len, grown_from) = match node.resized {
        None if nl >= dl => (dl + prefix(rng, nl - dl), dl),
        None => (if rng.below(2) == 0 { dl } else { nl }, dl),
        Some(_) if rng.below(2) == 0 => (dl, dl),
        Some(l) if nl > l => (l + prefix(rng, nl - l), l.max(dl)),
        // Reserved by allocate and kept: the reserved space reads as zeros
        // but where writes landed, each write on its own (below).
        Some(_) if node.allocated => (nl, nl.max(dl)),
        Some(_) => (nl, dl),
    };
    let grown_from = grown_from.min(len);
    let mut out = node.durable.clone();
    out.resize(len, 0);
    if grown_from < len {
        out[grown_from..len].copy_from_slice(&node.data[grown_from..len]);
    }
    // Overwrites below that (synced bytes, or a region set_len made):
    // each lands whole, not at all, or as a sector-aligned prefix (a
    // sector write is atomic).
    let inplace = grown_from.min(nl);
    for &(off, n) in &node.dirty {
        if off >= inplace {
            continue;
        }
        let end = off.saturating_add(n).min(inplace);
        let keep = match rng.below(3) {
            0 => 0,
            1 => end - off,
            _ => {
                let sectors = (end - off).div_ceil(512) as u64;
                ((rng.below(sectors + 1) as usize) * 512).min(end - off)
            }
        };
        out[off..off + keep].copy_from_slice(&node.data[off..off + keep]);
    }
    out
}

fn parent_of(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new(""))
}

impl VfsFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.fs.lock().inodes[self.ino].data.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut st = self.fs.lock();
        st.bytes_read += buf.len() as u64;
        let data = &st.inodes[self.ino].data;
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (buf, result) = match self.fs.op_torn() {
            Ok(()) => (buf, Ok(())),
            Err(None) => return Err(injected()),
            // The failing write itself lands partly, as a torn write would.
            Err(Some(n)) => {
                let keep = SplitMix::new(n).below(buf.len() as u64 + 1) as usize;
                (&buf[..keep], Err(injected()))
            }
        };
        let mut st = self.fs.lock();
        let node = &mut st.inodes[self.ino];
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start.checked_add(buf.len()).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[start..end].copy_from_slice(buf);
        node.dirty.push((start, buf.len()));
        result
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fs.op()?;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut st = self.fs.lock();
        let node = &mut st.inodes[self.ino];
        node.data.resize(len, 0);
        node.resized = Some(len);
        node.allocated = false;
        Ok(())
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.fs.lock().no_allocate {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.fs.op()?;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut st = self.fs.lock();
        let node = &mut st.inodes[self.ino];
        // A size change, as set_len's: durable with the next sync, until
        // then a power cut keeps it whole or not at all. Writes into the
        // reserved space are overwrites from here on (see crash_image).
        if len > node.data.len() {
            node.data.resize(len, 0);
            node.resized = Some(len);
            node.allocated = true;
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.fs.op()?;
        let mut st = self.fs.lock();
        st.data_syncs += 1;
        let node = &mut st.inodes[self.ino];
        node.durable = node.data.clone();
        node.dirty.clear();
        node.resized = None;
        node.allocated = false;
        Ok(())
    }
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
}

impl Vfs for SimFs {
    type File = SimFile;
    type Lock = SimLock;

    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        // Directories are implicit in the simulated namespace.
        Ok(())
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        let mut out: Vec<String> = Vec::new();
        for p in st.names.keys() {
            if let Ok(rest) = p.strip_prefix(path) {
                if let Some(first) = rest.components().next() {
                    let name = first.as_os_str().to_string_lossy().into_owned();
                    if out.last() != Some(&name) && !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.lock().names.contains_key(path))
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<SimFile> {
        let existing = self.lock().names.get(path).copied();
        let ino = match existing {
            Some(i) => i,
            None if create => {
                self.op()?;
                let mut st = self.lock();
                st.inodes.push(Inode::default());
                let i = st.inodes.len() - 1;
                st.names.insert(path.to_path_buf(), i);
                i
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        Ok(SimFile { fs: self.clone(), ino })
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op()?;
        let mut st = self.lock();
        let ino = st.names.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        st.names.insert(to.to_path_buf(), ino);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.op()?;
        let mut st = self.lock();
        st.names.remove(path).map(|_| ()).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.op()?;
        let mut st = self.lock();
        let st = &mut *st;
        st.dir_syncs += 1;
        st.durable_names.retain(|p, _| parent_of(p) != dir);
        for (p, &i) in &st.names {
            if parent_of(p) == dir {
                st.durable_names.insert(p.clone(), i);
            }
        }
        Ok(())
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<SimLock>> {
        let mut st = self.lock();
        if st.locks.contains_key(path) {
            return Ok(None);
        }
        st.next_lock += 1;
        let id = st.next_lock;
        st.locks.insert(path.to_path_buf(), id);
        drop(st);
        Ok(Some(SimLock { fs: self.clone(), path: path.to_path_buf(), id }))
    }
}
