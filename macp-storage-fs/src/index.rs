//! The ended-session index: an embedded redb database in `index.redb`.
//!
//! Why redb: finding an ended session by id, listing them in id order and
//! deleting them in end-time order is a B-tree problem, and redb is a
//! well-kept, dependency-free, crash-safe B-tree store with copy-on-write
//! pages and checksummed commits. Writing our own would mean writing (and
//! crash-testing) a second storage engine beside the log. redb reaches its
//! file through [`VfsBackend`], our [`Vfs`], so the index runs on the
//! simulated file system with fault injection and power cuts like the log.
//!
//! Tables:
//! * `ended`: session id → entry (end time, end position, the session's
//!   record locations, its `SessionSummary` protobuf);
//! * `by_end`: (end time, session id) → end position: retention deletes in
//!   this order and needs no scan;
//! * `segment_sessions`: segment → how many indexed sessions have records
//!   in it: a segment with none left (and no open session in it) can be
//!   retired without looking at any session;
//! * `meta`: counters (`retired_segments`: once non-zero the log no longer
//!   starts at segment 1, so a lost checkpoint cannot be rebuilt by a full
//!   replay).
//!
//! Every write transaction records redb's allocator state
//! (`set_quick_repair(true)`), so reopening after a crash loads it instead
//! of walking the whole file: opening stays O(1) in the number of ended
//! sessions (`index_open_after_a_power_cut_reads_a_bounded_amount`).
//! Commits from `maintain` are non-durable (`Durability::None`, no fsync);
//! `checkpoint` and segment retirement make them durable
//! (`Durability::Immediate`) before anything depends on them.
//!
//! redb may panic on a file that was damaged outside its own writes; every
//! call into it is wrapped so such a panic becomes a typed error instead of
//! taking the process down (no panic reachable from data on disk).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use macp_storage::{LogPos, SessionSummary, StorageError};
use prost::Message as _;
use redb::{Builder, Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};

use crate::locs::{decode_locs, encode_locs, get_varint, put_varint, Loc};
use crate::vfs::{Vfs, VfsFile};

const ENDED: TableDefinition<&str, &[u8]> = TableDefinition::new("ended");
const BY_END: TableDefinition<(i64, &str), (u64, u64)> = TableDefinition::new("by_end");
const SEGMENTS: TableDefinition<u64, u64> = TableDefinition::new("segment_sessions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_RETIRED: &str = "retired_segments";
const ENTRY_VERSION: u8 = 1;

/// redb's file, reached through a [`VfsFile`].
pub(crate) struct VfsBackend<F> {
    file: F,
    size: Arc<AtomicU64>,
}

impl<F> fmt::Debug for VfsBackend<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfsBackend").field("size", &self.size.load(Ordering::Relaxed)).finish()
    }
}

impl<F: VfsFile> StorageBackend for VfsBackend<F> {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.file.size()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.file.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.file.set_len(len)?;
        self.size.store(len, Ordering::Relaxed);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.file.write_all_at(data, offset)?;
        self.size.fetch_max(offset.saturating_add(data.len() as u64), Ordering::Relaxed);
        Ok(())
    }
}

/// An ended session on its way into the index.
#[derive(Clone, Debug)]
pub(crate) struct EndedEntry {
    /// What the kernel answers from, encoded once at append (the index
    /// stores these bytes; a reader decodes them).
    pub summary: Vec<u8>,
    /// When it ended (retention counts from here).
    pub ended_at: i64,
    /// Its records, or `None` when storage did not know them (a summary
    /// stored a second time): the index keeps what it has.
    pub locs: Option<Vec<Loc>>,
    /// Its terminal record's position: deletable once a checkpoint lies
    /// after it.
    pub end: LogPos,
}

/// What an index write changed per segment (sessions added or removed),
/// mirrored in memory by the writer after the commit.
pub(crate) type SegDeltas = BTreeMap<u64, i64>;

/// The open index database.
pub(crate) struct Index {
    /// Always `Some` until the index is dropped: [`Drop`] takes it out to
    /// close it under the panic guard.
    db: Option<Database>,
    size: Arc<AtomicU64>,
}

/// Closing the database runs redb code that reads its file (a damaged file
/// can make it panic, as any other call into redb can), so the close runs
/// under the same guard and its error, having nowhere to go, is dropped: the
/// call that wrote the index has already reported whether it was durable.
/// While the thread is already unwinding, a second panic would abort the
/// process, so the database is then leaked instead of closed (its pages stay
/// as the last commit left them, which is what the next open recovers from).
impl Drop for Index {
    fn drop(&mut self) {
        let Some(db) = self.db.take() else { return };
        if std::thread::panicking() {
            std::mem::forget(db);
        } else {
            let _ = guarded("close", move || db.close().map_err(ix("close")));
        }
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index").field("bytes", &self.bytes()).finish()
    }
}

fn ix<E: std::error::Error + Send + Sync + 'static>(op: &'static str) -> impl FnOnce(E) -> StorageError {
    move |e| StorageError::index(op, e)
}

/// Runs a call into redb, turning a panic (a file damaged outside redb's
/// own writes) into an error.
fn guarded<T>(op: &'static str, f: impl FnOnce() -> Result<T, StorageError>) -> Result<T, StorageError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(StorageError::Damaged {
                place: "the ended-session index (index.redb)".into(),
                reason: format!(
                    "{op} failed inside the index database ({what}); restore the data directory from backup"
                ),
            })
        }
    }
}

fn damaged_entry(sid: &str, reason: impl Into<String>) -> StorageError {
    StorageError::Damaged { place: format!("index entry of session {sid}"), reason: reason.into() }
}

fn encode_entry(ended_at: i64, end: LogPos, locs: &[Loc], summary: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + locs.len() * 8 + summary.len());
    b.push(ENTRY_VERSION);
    b.extend_from_slice(&ended_at.to_le_bytes());
    put_varint(&mut b, end.segment);
    put_varint(&mut b, end.offset);
    encode_locs(&mut b, locs);
    b.extend_from_slice(summary);
    b
}

/// Decodes a summary stored for `sid`.
pub(crate) fn decode_summary(sid: &str, bytes: &[u8]) -> Result<SessionSummary, StorageError> {
    SessionSummary::decode(bytes).map_err(|why| damaged_entry(sid, why.to_string()))
}

/// A decoded entry: end time, end position, locations, summary bytes.
struct RawEntry<'a> {
    ended_at: i64,
    end: LogPos,
    locs: Vec<Loc>,
    summary: &'a [u8],
}

fn decode_entry(b: &[u8]) -> Result<RawEntry<'_>, String> {
    if b.first() != Some(&ENTRY_VERSION) {
        return Err(format!("unknown entry version {:?}", b.first()));
    }
    let at: [u8; 8] = b.get(1..9).and_then(|s| s.try_into().ok()).ok_or("entry cut short")?;
    let mut i = 9;
    let segment = get_varint(b, &mut i).ok_or("end position")?;
    let offset = get_varint(b, &mut i).ok_or("end position")?;
    let locs = decode_locs(b, &mut i)?;
    Ok(RawEntry { ended_at: i64::from_le_bytes(at), end: LogPos::new(segment, offset), locs, summary: &b[i..] })
}

fn distinct_segments(locs: &[Loc]) -> Vec<u64> {
    let mut s: Vec<u64> = locs.iter().map(|l| l.segment).collect();
    s.sort_unstable();
    s.dedup();
    s
}

fn apply_deltas(table: &mut redb::Table<'_, u64, u64>, deltas: &SegDeltas) -> Result<(), StorageError> {
    for (&seg, &d) in deltas {
        if d == 0 {
            continue;
        }
        let now = table.get(seg).map_err(ix("read segment count"))?.map_or(0, |g| g.value());
        let next = now.saturating_add_signed(d);
        if next == 0 {
            table.remove(seg).map_err(ix("write segment count"))?;
        } else {
            table.insert(seg, next).map_err(ix("write segment count"))?;
        }
    }
    Ok(())
}

impl Index {
    /// Opens the index at `path`. A missing index is created only when
    /// `may_create` (a directory that never had a checkpoint of this
    /// format): created under a temporary name and renamed once redb has
    /// made it durable, so a crash mid-creation never leaves a half-made
    /// database that would refuse to open.
    pub fn open<V: Vfs>(vfs: &V, path: &Path, cache_bytes: usize, may_create: bool) -> Result<Index, StorageError> {
        if !vfs.exists(path).map_err(|e| StorageError::io("stat", path, e))? {
            if !may_create {
                return Err(StorageError::Damaged {
                    place: path.display().to_string(),
                    reason: "the ended-session index is missing but a checkpoint exists (ended sessions would be \
                             lost); restore the data directory from backup"
                        .into(),
                });
            }
            Self::create(vfs, path, cache_bytes)?;
        }
        let file = vfs.open(path, false).map_err(|e| StorageError::io("open", path, e))?;
        Self::open_file(file, path, cache_bytes)
    }

    fn create<V: Vfs>(vfs: &V, path: &Path, cache_bytes: usize) -> Result<(), StorageError> {
        let tmp = path.with_extension("redb.tmp");
        if vfs.exists(&tmp).map_err(|e| StorageError::io("stat", &tmp, e))? {
            vfs.remove_file(&tmp).map_err(|e| StorageError::io("remove", &tmp, e))?;
        }
        let file = vfs.open(&tmp, true).map_err(|e| StorageError::io("create", &tmp, e))?;
        let index = Self::open_file(file, &tmp, cache_bytes)?;
        // Closing makes everything durable.
        drop(index);
        vfs.rename(&tmp, path).map_err(|e| StorageError::io("rename", &tmp, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        vfs.sync_dir(dir).map_err(|e| StorageError::io("fsync", dir, e))
    }

    fn open_file<F: VfsFile>(file: F, path: &Path, cache_bytes: usize) -> Result<Index, StorageError> {
        let size = Arc::new(AtomicU64::new(file.size().map_err(|e| StorageError::io("stat", path, e))?));
        let backend = VfsBackend { file, size: size.clone() };
        guarded("open", || {
            let db = Builder::new().set_cache_size(cache_bytes).create_with_backend(backend).map_err(ix("open"))?;
            let index = Index { db: Some(db), size };
            // Create the tables once, so readers never meet a missing one.
            let fresh = {
                let r = index.db().begin_read().map_err(ix("read"))?;
                r.open_table(META).is_err()
            };
            if fresh {
                let txn = index.begin(Durability::Immediate)?;
                txn.open_table(ENDED).map_err(ix("create table"))?;
                txn.open_table(BY_END).map_err(ix("create table"))?;
                txn.open_table(SEGMENTS).map_err(ix("create table"))?;
                txn.open_table(META).map_err(ix("create table"))?;
                txn.commit().map_err(ix("commit"))?;
            }
            Ok(index)
        })
    }

    fn db(&self) -> &Database {
        self.db.as_ref().expect("the index database is present until the index is dropped")
    }

    /// Bytes of the index file.
    pub fn bytes(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn begin(&self, durability: Durability) -> Result<redb::WriteTransaction, StorageError> {
        let mut txn = self.db().begin_write().map_err(ix("begin write"))?;
        txn.set_durability(durability).map_err(ix("set durability"))?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    /// The stored entry of `sid`: its summary and locations.
    pub fn get(&self, sid: &str) -> Result<Option<(SessionSummary, Vec<Loc>)>, StorageError> {
        guarded("get", || {
            let r = self.db().begin_read().map_err(ix("read"))?;
            let t = r.open_table(ENDED).map_err(ix("open table"))?;
            let Some(g) = t.get(sid).map_err(ix("get"))? else { return Ok(None) };
            let e = decode_entry(g.value()).map_err(|why| damaged_entry(sid, why))?;
            Ok(Some((decode_summary(sid, e.summary)?, e.locs)))
        })
    }

    /// Up to `limit` summaries in id order after `after`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionSummary>, StorageError> {
        guarded("list", || {
            let r = self.db().begin_read().map_err(ix("read"))?;
            let t = r.open_table(ENDED).map_err(ix("open table"))?;
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            let mut out = Vec::new();
            for item in t.range::<&str>((lower, Bound::Unbounded)).map_err(ix("range"))? {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item.map_err(ix("range"))?;
                let e = decode_entry(v.value()).map_err(|why| damaged_entry(k.value(), why))?;
                out.push(decode_summary(k.value(), e.summary)?);
            }
            Ok(out)
        })
    }

    /// Stores entries (replacing any stored before for the same session)
    /// in one transaction. Returns the per-segment session deltas.
    pub fn write(
        &self,
        entries: &[(Box<str>, Arc<EndedEntry>)],
        durability: Durability,
    ) -> Result<SegDeltas, StorageError> {
        guarded("write", || {
            let txn = self.begin(durability)?;
            let mut deltas = SegDeltas::new();
            {
                let mut ended = txn.open_table(ENDED).map_err(ix("open table"))?;
                let mut by_end = txn.open_table(BY_END).map_err(ix("open table"))?;
                for (sid, e) in entries {
                    let sid: &str = sid;
                    let old = ended.get(sid).map_err(ix("get"))?.map(|g| g.value().to_vec());
                    let old = match &old {
                        Some(b) => Some(decode_entry(b).map_err(|why| damaged_entry(sid, why))?),
                        None => None,
                    };
                    let (locs, end) = match (&e.locs, &old) {
                        (Some(l), _) => (l.clone(), e.end),
                        (None, Some(o)) => (o.locs.clone(), o.end),
                        (None, None) => (Vec::new(), e.end),
                    };
                    if let Some(o) = &old {
                        by_end.remove((o.ended_at, sid)).map_err(ix("remove"))?;
                        for s in distinct_segments(&o.locs) {
                            *deltas.entry(s).or_default() -= 1;
                        }
                    }
                    let at = e.ended_at;
                    ended.insert(sid, encode_entry(at, end, &locs, &e.summary).as_slice()).map_err(ix("insert"))?;
                    by_end.insert((at, sid), (end.segment, end.offset)).map_err(ix("insert"))?;
                    for s in distinct_segments(&locs) {
                        *deltas.entry(s).or_default() += 1;
                    }
                }
                let mut segs = txn.open_table(SEGMENTS).map_err(ix("open table"))?;
                apply_deltas(&mut segs, &deltas)?;
            }
            txn.commit().map_err(ix("commit"))?;
            Ok(deltas)
        })
    }

    /// Deletes up to `limit` sessions that ended before `cutoff` and whose
    /// terminal record lies before `covered` (the latest checkpoint), oldest
    /// first, in one non-durable transaction. Returns how many went, whether
    /// more may be waiting, and the per-segment deltas.
    pub fn delete_expired(
        &self,
        cutoff: i64,
        covered: LogPos,
        limit: usize,
    ) -> Result<(u64, bool, SegDeltas), StorageError> {
        guarded("delete", || {
            let txn = self.begin(Durability::None)?;
            let mut deltas = SegDeltas::new();
            let mut victims: Vec<(i64, String)> = Vec::new();
            let mut more = false;
            {
                let mut by_end = txn.open_table(BY_END).map_err(ix("open table"))?;
                for item in by_end.range::<(i64, &str)>(..(cutoff, "")).map_err(ix("range"))? {
                    let (k, v) = item.map_err(ix("range"))?;
                    let (seg, off) = v.value();
                    if LogPos::new(seg, off) >= covered {
                        // Ended after the latest checkpoint: replaying the
                        // tail could bring it back, so it waits for the next
                        // checkpoint (and so do those after it in time).
                        break;
                    }
                    if victims.len() == limit {
                        more = true;
                        break;
                    }
                    let (at, sid) = k.value();
                    victims.push((at, sid.to_string()));
                }
                let mut ended = txn.open_table(ENDED).map_err(ix("open table"))?;
                for (at, sid) in &victims {
                    by_end.remove((*at, sid.as_str())).map_err(ix("remove"))?;
                    let old = ended.remove(sid.as_str()).map_err(ix("remove"))?.map(|g| g.value().to_vec());
                    if let Some(b) = old {
                        let e = decode_entry(&b).map_err(|why| damaged_entry(sid, why))?;
                        for s in distinct_segments(&e.locs) {
                            *deltas.entry(s).or_default() -= 1;
                        }
                    }
                }
                let mut segs = txn.open_table(SEGMENTS).map_err(ix("open table"))?;
                apply_deltas(&mut segs, &deltas)?;
            }
            txn.commit().map_err(ix("commit"))?;
            Ok((victims.len() as u64, more, deltas))
        })
    }

    /// Makes every commit so far durable, counting `retired` more retired
    /// segments (0 for a plain durability point).
    pub fn make_durable(&self, retired: u64) -> Result<(), StorageError> {
        guarded("commit", || {
            let txn = self.begin(Durability::Immediate)?;
            if retired > 0 {
                let mut meta = txn.open_table(META).map_err(ix("open table"))?;
                let n = meta.get(META_RETIRED).map_err(ix("get"))?.map_or(0, |g| g.value());
                meta.insert(META_RETIRED, n.saturating_add(retired)).map_err(ix("insert"))?;
            }
            txn.commit().map_err(ix("commit"))
        })
    }

    /// Segments ever retired.
    pub fn retired_segments(&self) -> Result<u64, StorageError> {
        guarded("read", || {
            let r = self.db().begin_read().map_err(ix("read"))?;
            let t = r.open_table(META).map_err(ix("open table"))?;
            Ok(t.get(META_RETIRED).map_err(ix("get"))?.map_or(0, |g| g.value()))
        })
    }

    /// Segment → indexed sessions with records in it (read once at load:
    /// one row per segment, not per session).
    pub fn segment_counts(&self) -> Result<BTreeMap<u64, u64>, StorageError> {
        guarded("read", || {
            let r = self.db().begin_read().map_err(ix("read"))?;
            let t = r.open_table(SEGMENTS).map_err(ix("open table"))?;
            let mut out = BTreeMap::new();
            for item in t.iter().map_err(ix("range"))? {
                let (k, v) = item.map_err(ix("range"))?;
                out.insert(k.value(), v.value());
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_entries_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_entry(&bytes);
        }
    }

    #[test]
    fn entries_roundtrip() {
        let s = SessionSummary { last_seq: 3, ended_at_unix_ms: -5, ..Default::default() };
        let locs = vec![Loc { seq: 1, segment: 4, offset: 16, len: 9 }];
        let b = encode_entry(-5, LogPos::new(4, 16), &locs, &s.encode_to_vec());
        let e = decode_entry(&b).expect("decodes");
        assert_eq!((e.ended_at, e.end, &e.locs), (-5, LogPos::new(4, 16), &locs));
        assert_eq!(SessionSummary::decode(e.summary).expect("summary"), s);
    }
}
