//! # macp-storage-fs
//!
//! Durable storage for macp-rs: one segmented, group-committed write-ahead
//! log shared by all sessions, checkpoints of the kernel state, and crash
//! recovery that rebuilds the kernel through [`macp_kernel::Kernel::apply_record`].
//!
//! Why a shared log: a file per session costs several `fdatasync`s and a
//! rename per message and hundreds of thousands of files to reopen. Here
//! every record accepted since the last sync goes out with **one**
//! `fdatasync`, and a restart reads one checkpoint plus the log tail.
//!
//! ## Using it
//!
//! ```no_run
//! use macp_storage_fs::{recover, FsConfig, FsStorage, Storage};
//! # fn main() -> Result<(), macp_storage_fs::StorageError> {
//! let mut storage = FsStorage::open("/var/lib/macp", FsConfig::default())?;
//! let recovered = recover(&mut storage, Default::default())?;
//! if !recovered.report.is_clean() {
//!     eprintln!("storage damage: {}", recovered.report);
//! }
//! let mut kernel = recovered.kernel;
//! // Driver loop: drain queued inputs; append every Effect::Persist record
//! // and remember the returned ticket per reply; then one sync; release
//! // each reply whose ticket <= the durable position the sync returned.
//! # let records = Vec::new();
//! let ticket = storage.append(&records)?;
//! let durable = storage.sync()?;
//! assert!(ticket <= durable);
//! // Now and then: storage.checkpoint(&kernel.snapshot())?;
//! # let _ = &mut kernel;
//! # Ok(()) }
//! ```
//!
//! [`Storage`] is the contract; [`FsStorage`] is the filesystem backend and
//! [`MemoryStorage`] the in-memory one (tests, the simulator,
//! `MACP_MEMORY_ONLY=1`). [`recover`] works on either.
//!
//! ## Data directory layout (format 1)
//!
//! ```text
//! <dir>/FORMAT          "macp-rs-data 1\n": format marker. A newer version is
//!                       refused with StorageError::NewerFormat; a directory
//!                       with files but no marker is refused as not ours.
//! <dir>/LOCK            advisory exclusive lock (flock) held while open, so
//!                       two processes never write one log.
//! <dir>/checkpoint      latest kernel snapshot + the log position it covers.
//!                       Written as checkpoint.tmp, fsynced, renamed, and the
//!                       directory fsynced, so it is always whole.
//! <dir>/wal/NNNNNNNNNNNNNNNNNNNN.seg
//!                       log segments, 20-digit number from 1, in order.
//! ```
//!
//! A segment starts with a 16-byte header (`"MACPSEG1"`, segment number u64
//! LE) followed by frames. A frame is `"MREC"`, payload length (u32 LE),
//! CRC32C of the payload, and a CRC32C of those 12 bytes *plus the frame's
//! own segment number and offset*, then the payload: the protobuf encoding
//! of a `macp_rs.storage.v1.Record`, which carries the session id and its
//! sequence number. Binding the header checksum to the position means a frame
//! is valid only where it was written, so resynchronising after damage can
//! never accept a frame embedded in a client's payload. A segment is closed
//! once the next frame would pass [`FsConfig::segment_bytes`].
//!
//! The checkpoint file is `"MACPCKP1"`, covered position (segment u64,
//! offset u64), snapshot length u64, snapshot CRC32C u32, header CRC32C u32,
//! then the [`macp_kernel::Kernel::snapshot`] bytes.
//!
//! ## Durability and group commit
//!
//! [`Storage::append`] only encodes frames into a buffer and returns a
//! ticket (the [`LogPos`] after the last record). [`Storage::sync`] writes
//! the buffer and calls `fdatasync` once (plus a directory fsync after a new
//! segment was created), then returns the durable position. A driver that
//! drains its whole input queue before syncing gets batches that grow with
//! load, while a lone client pays exactly one sync and no timer. Before a new
//! segment is created the previous one is synced (and the directory, if a
//! segment was created since), so only the last segment can ever end torn.
//!
//! ## Recovery and faults (DECISIONS 16)
//!
//! [`recover`] restores the checkpoint and replays the records after it
//! through the kernel. Records the checkpoint covers are read only far
//! enough to check that every session's stored history is gapless, and to
//! build an in-memory index session → (segment, offset) so
//! [`Storage::history`] reads bytes on demand for passive subscribers
//! (about 24 bytes of memory per record, no record kept in memory).
//! Segments are read, checksummed and decoded on a helper thread while the
//! caller's thread restores the checkpoint and applies records, with a
//! bounded hand-over so memory stays bounded.
//!
//! - A damaged tail of the **last** segment (bytes after which no valid frame
//!   follows) is a crash mid-write: it is truncated and reported as
//!   [`TornTail`]. It was never synced, so no reply covered it.
//! - Any other damage — a bad frame followed by valid ones, a bad frame in an
//!   earlier segment, a missing segment, a log shorter than the checkpoint —
//!   is reported as [`Damage`] with segment and offset. Framing resumes at
//!   the next valid frame. Sessions whose history then has a gap, whose
//!   records do not apply, whose history stops short of their checkpointed
//!   state, or whose damaged frame names them, are quarantined with
//!   [`macp_kernel::Kernel::quarantine_session`] and listed in the
//!   [`RecoveryReport`]. Every other session recovers.
//! - An unreadable checkpoint is reported and the whole log replayed; if the
//!   log no longer starts at segment 1 that is impossible, and opening fails
//!   ([`StorageError::CheckpointCorrupt`]). Recovery never silently starts
//!   empty.
//!
//! ## Fail-stop, not rollback
//!
//! The kernel applies a record before emitting it for persistence, so once
//! a write or sync fails the kernel is already ahead of the disk and cannot
//! be rolled back. Any failure of `append`, `sync` or `checkpoint` therefore
//! **poisons** the backend: that call and every later one return an error
//! ([`StorageError::Poisoned`]), no reply waiting on it may be released, and
//! the driver must drop the kernel and the backend and recover from disk
//! again (or exit). After a failed `fdatasync` the page cache cannot be
//! trusted either (the kernel may have dropped the dirty pages), which is
//! another reason to re-read rather than retry.
//!
//! ## Retention
//!
//! Segments are never deleted: passive subscribers may ask for any
//! session's history, terminal sessions included, and the kernel keeps every
//! session, so every record is needed by some possible reader. Checkpoints
//! make restarts replay only the tail; the covered part of the log is still
//! scanned for the history index (checksums and two protobuf fields per
//! record), which is cheap but grows with the log. There is no compaction and
//! no retirement yet; both need a retention rule (the kernel forgetting
//! sessions, or an archive format for their history) that does not exist.
//!
//! ## Platform
//!
//! Unix only (positioned reads and writes, `flock`-style locks).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod error;
mod frame;
mod fs;
mod memory;
mod recover;
mod storage;
mod vfs;

pub use error::StorageError;
pub use fs::{FsConfig, FsStorage, CHECKPOINT_FILE, FORMAT_FILE, FORMAT_VERSION, LOCK_FILE, WAL_DIR};
pub use memory::MemoryStorage;
pub use recover::{recover, Recovered, RecoveryReport, Rejected};
pub use storage::{Damage, DamageKind, LoadEvent, LoadSummary, LogPos, Storage, TornTail};
pub use vfs::{RealFs, SimFile, SimFs, SimLock, SplitMix, Vfs, VfsFile};
