//! # macp-storage-fs
//!
//! The file backend of macp-rs: [`FsStorage`] implements the storage
//! contract of `macp-storage` ([`macp_storage::Storage`] to write,
//! [`macp_storage::StorageRead`] to read) with a segmented, group-committed
//! write-ahead log of our own and an index of ended sessions in an embedded
//! [redb](https://docs.rs/redb) database. It knows records and summaries,
//! never the kernel: replaying records is `macp-pipeline`'s recovery.
//!
//! ```no_run
//! use macp_storage::Storage as _;
//! use macp_storage_fs::{FsConfig, FsStorage};
//! # fn main() -> Result<(), macp_storage::StorageError> {
//! let cfg = FsConfig { retention: "30d".parse().expect("a retention"), ..FsConfig::default() };
//! let mut storage = FsStorage::open("/var/lib/macp", cfg)?;
//! // macp_pipeline::recover(kernel_config, &mut storage, options) loads it,
//! // then the pipeline appends, syncs, checkpoints; now and then:
//! let done = storage.maintain(1_700_000_000_000)?;
//! # let _ = done; Ok(()) }
//! ```
//!
//! ## What is ours, what is redb's, and why
//!
//! - **The log is ours.** Every accepted record goes into one append-only
//!   log shared by all sessions, and one `fdatasync` makes a whole batch
//!   durable (group commit): appending to a file and syncing it once per
//!   batch is the fastest way to make a batch durable, and nothing a B-tree
//!   store does on its commit path (page copies, two syncs per durable
//!   commit) can beat it. A file per session would cost several syncs and a
//!   rename per message.
//! - **The ended-session index is redb's.** Finding an ended session by id,
//!   listing them in id order and deleting them in end-time order is a
//!   B-tree problem; redb is a well-kept, dependency-free, crash-safe
//!   B-tree store (copy-on-write pages, checksummed commits), and it reaches
//!   its file through our [`Vfs`], so it runs on [`SimFs`] with fault
//!   injection and power cuts in tests and the simulator. Index writes are
//!   off the hot path: `maintain` writes them without a sync, `checkpoint`
//!   makes them durable.
//!
//! ## Data directory layout (format 2)
//!
//! ```text
//! <dir>/FORMAT       "macp-rs-data 2\n". A newer version is refused
//!                    (StorageError::NewerFormat); format 1 is migrated (below);
//!                    a directory with files but no marker is refused as not ours.
//! <dir>/LOCK         advisory exclusive lock, held while open; read-only
//!                    tools ([`FsStorage::open_read_only`]) take it shared.
//! <dir>/checkpoint   the open state (opaque bytes from the kernel), the open
//!                    sessions' record locations, and the log position both
//!                    cover. Written as checkpoint.tmp, fsynced, renamed, and
//!                    the directory fsynced, so it is always whole.
//! <dir>/index.redb   ended sessions: id → summary + record locations + end
//!                    position; (end time, id) for retention; segment → number
//!                    of ended sessions with records in it.
//! <dir>/wal/NNNNNNNNNNNNNNNNNNNN.seg
//!                    log segments, 20-digit number from 1, in order; retired
//!                    segments leave gaps below the checkpoint's segment.
//! ```
//!
//! A segment starts with a 16-byte header (`"MACPSEG1"`, segment number u64
//! LE) followed by frames. A frame is a 4-byte kind (`"MREC"`: a record;
//! `"MCPY"`: a copy compaction carried forward), payload length (u32 LE),
//! CRC32C of the payload, and a CRC32C of those 12 bytes *plus the frame's
//! own segment number and offset*, then the payload: the protobuf encoding
//! of a `macp_rs.storage.v1.Record`. Binding the header checksum to the
//! position means a frame is valid only where it was written, so
//! resynchronising after damage can never accept a frame embedded in a
//! client's payload. A segment is closed once the next frame would pass
//! [`FsConfig::segment_bytes`].
//!
//! ## Preallocated segments
//!
//! A new segment's file is given its full size up front
//! ([`FsConfig::segment_bytes`], with `fallocate` mode 0 through
//! [`VfsFile::allocate`]: the blocks are allocated and read as zeros), and
//! so is the active segment again when a restart continues in it. Appends
//! then write inside the file instead of growing it, so a group commit's
//! `fdatasync` no longer has to commit a size change as well: on this
//! project's ext4 machine a 300-byte append plus `fdatasync` took 155–190
//! µs into a growing file and 126–130 µs into a preallocated one.
//!
//! On disk, the **active** (last) segment of a directory in use is
//! therefore `segment_bytes` long: header, frames, then zeros. The log's
//! logical end is the end of the last valid frame, never the file size;
//! every reader goes by the frames (load, [`FsStorage::scan_log`], reads
//! by location). Zeros after the last frame of the last segment are its
//! reserved space, not damage and not a torn tail; non-zero bytes there
//! (a write a crash cut, possibly followed by zeros) are a torn tail as
//! before, reported with the length up to the last non-zero byte. When the
//! segment is **sealed** (the next one starts), its file is cut back to its
//! last frame before the sync that seals it, so sealed segments are byte
//! for byte what they were without preallocation. A restart cuts the last
//! segment at its logical end (torn bytes and zeros alike) and reserves it
//! again when appends continue there; read-only tools see the same
//! directory, and their cuts stay in memory.
//!
//! Writes into reserved space are overwrites of allocated blocks, which a
//! power cut may keep or lose one by one, in any order; appends growing a
//! file survive as a prefix. So that a crash can still only tear the end of
//! the log, never leave zeros *between* frames, at most one write lands in
//! the active segment between two syncs: a batch larger than
//! [`FsConfig::write_buffer_bytes`] syncs each buffer-full before writing
//! the next. Where `fallocate` is not supported (`EOPNOTSUPP`, or another
//! platform than Linux) segments grow as they are written, as before; a
//! failed reservation never fails a write.
//!
//! ## What is in memory, and what a restart reads
//!
//! Memory follows open sessions, never sessions ever: the open map (session
//! → its records' locations, for open sessions only), the ended sessions
//! appended since `maintain` last wrote the index (bounded by the end rate
//! between two calls), one size per segment file, and redb's page cache
//! ([`FsConfig::index_cache_bytes`]). When a session ends its locations
//! leave memory for the index. [`FsStorage::stats`] shows the counts.
//!
//! A restart reads the checkpoint (open state + open locations, both
//! following open sessions), opens the index (redb records its allocator
//! state with every commit, so even after a crash this is O(1), not a scan),
//! and reads the log **after** the checkpoint position only. Ended sessions
//! are not read at all until someone asks for one. Segments are read and
//! decoded on a helper thread while the caller's thread replays; `cancelled`
//! is polled every 1,024 records.
//!
//! ## Durability and group commit
//!
//! [`macp_storage::Storage::append`] encodes frames into a buffer and
//! notes the sessions that ended; `sync` writes the buffer and calls
//! `fdatasync` once (plus a directory fsync after a new segment), then
//! publishes: the new records, and the ended sessions moved from the open
//! map into the pending index batch, become visible to readers. Before a
//! new segment is created the previous one is synced, so only the last
//! segment can ever end torn. `checkpoint` syncs, writes every pending
//! ended session to the index with a durable commit, and only then writes
//! the checkpoint file: a session that ended before a checkpoint is always
//! durably indexed. Sessions that end in the tail after a crash are
//! replayed by recovery, which hands their summaries back; storing a
//! summary twice replaces it.
//!
//! ## Retention and compaction
//!
//! [`FsConfig::retention`] (`forever` by default: nothing is ever deleted,
//! and the disk grows with history). Each `maintain(now)` call does a
//! bounded amount of work and pays for at most one expensive step:
//! 1. a durable index commit, when [`FsConfig::maintain_sessions`] × 4
//!    sessions of non-durable index work piled up, or when deletions just
//!    emptied a segment (alone in its call: it writes out what the
//!    non-durable commits left in redb's cache, so doing it regularly keeps
//!    each one — and the one in `checkpoint` — small);
//! 2. otherwise: writes up to `maintain_sessions` pending ended sessions to
//!    the index and deletes up to as many sessions past retention, oldest
//!    first (both non-durable, no sync) — only sessions whose terminal
//!    record lies before the latest checkpoint, so replaying the tail can
//!    never bring a deleted session back;
//! 3. retires up to two segments wholly before the checkpoint's segment
//!    that no open session uses (now, or in the latest checkpoint's
//!    locations, which a restart would read) and that no indexed session
//!    has records in — *durably* so: a segment emptied by deletions a power
//!    cut could undo waits for the next durable commit, so no index entry
//!    can outlive its records. Deleting the file needs no directory sync: a
//!    file a power cut brings back is retired again;
//! 4. once nothing expired is left, compaction: an old segment kept only by
//!    a few open records (a session suspended for days) gets those records
//!    carried forward into the active segment as `MCPY` frames (loading
//!    never replays them, it only moves the session's locations), at most
//!    [`FsConfig::carry_bytes`] per call and one fdatasync, and only when
//!    open records fill at most half the segment, so copying never costs
//!    more than it frees. The segment is retired after the next checkpoint.
//!
//! [`macp_storage::Maintenance`] says what was done and whether more is
//! waiting. A power cut may bring back sessions deleted since the last
//! durable index commit (the next `maintain` deletes them again); it never
//! brings back records whose segment was retired, and never a session whose
//! deletion a checkpoint or a durable commit covered
//! ([`FsStats::durable_index_commits`] counts them).
//!
//! ## Failures (DECISIONS 16)
//!
//! - A damaged tail of the **last** segment (bytes after which no valid
//!   frame follows) is a crash mid-write: truncated and reported as
//!   [`macp_storage::TornTail`]. It was never synced, so no reply covered it.
//!   Zeros alone after the last frame are the segment's preallocated space:
//!   cut the same way, reported as nothing.
//! - Any other damage in the tail — a bad frame followed by valid ones, a
//!   missing segment, a log shorter than the checkpoint — is reported as
//!   [`macp_storage::Damage`] with segment and offset (recovery quarantines
//!   the sessions it names). Damage in history before the checkpoint is not
//!   looked for at load (that would read history); a history read that
//!   meets it fails with [`StorageError::Damaged`] naming segment and
//!   offset.
//! - An unreadable checkpoint is reported as damage and the whole log
//!   replayed (a missing one replays it too), if no segment was ever
//!   retired; otherwise loading fails ([`StorageError::CheckpointCorrupt`]),
//!   and a missing index next to a checkpoint fails opening. The runtime
//!   never silently starts empty.
//! - Fail-stop: the kernel applies a record before it is persisted, so
//!   once a write or sync fails (log, checkpoint, index or a retirement)
//!   the backend is **poisoned**: every later call returns
//!   [`StorageError::Poisoned`] and the driver must recover from disk
//!   again. A record unreadable for compaction fails that `maintain` call
//!   only. A reader left behind after the storage was dropped gets
//!   [`StorageError::Closed`].
//! - redb may panic on a file damaged outside its own writes; every call
//!   into it is guarded, so that becomes [`StorageError::Damaged`].
//!
//! ## Format 1 directories
//!
//! Format 1 had no index and checkpointed every session, in a kernel
//! snapshot format this build no longer restores; its log was never
//! retired. Opening one migrates it: the old checkpoint is ignored, the
//! whole log replays from segment 1, recovery hands back every ended
//! session's summary, and the first checkpoint writes format 2 after the
//! new checkpoint file. A crash before that leaves format 1, and the next
//! open migrates again; nothing is deleted until then.
//!
//! ## Choices made beyond the first design, and why
//!
//! - Per segment the index keeps the **number** of indexed sessions with
//!   records in it, not their latest end time: a count says exactly when a
//!   segment is free (zero), whatever order sessions are deleted in.
//! - Retirement makes no commit of its own: a segment becomes retirable
//!   once the deletions that emptied it are durable, and `maintain` makes
//!   the index durable every few batches in a call of its own. A durable
//!   commit writes out everything the non-durable ones left behind; done
//!   at retirement time it cost 160 ms after 150,000 deletions.
//! - Compaction copies only from segments at most half full of open
//!   records, so write amplification stays below 1:1; a segment mostly
//!   made of a long session's records stays until the session ends.
//! - Readers see a pending ended session from the sync that made it
//!   durable on, not from the append, so nothing a power cut could take
//!   back is ever shown.
//! - Segment files are opened on demand through a small handle cache, not
//!   held open: the number of files grows with history under `forever`.
//! - The index file is created under a temporary name and renamed once
//!   whole; a missing index next to a format-2 checkpoint is damage, never
//!   recreated empty (that would silently lose every ended session).
//!
//! ## Platform
//!
//! Unix (positioned reads and writes, `flock`-style locks).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod checkpoint;
mod frame;
mod index;
mod locs;
mod reader;
mod readonly;
mod scan;
mod storage;
mod vfs;

pub use readonly::{CheckpointInfo, LogItem, ReadOnlyFile, ReadOnlyFs, SegmentFile};
pub use storage::{
    FsConfig, FsStats, FsStorage, CHECKPOINT_FILE, FORMAT_FILE, FORMAT_VERSION, INDEX_FILE, LOCK_FILE, WAL_DIR,
};
pub use vfs::{RealFs, SimFile, SimFs, SimLock, SplitMix, Vfs, VfsFile};
