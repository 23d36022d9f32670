//! The storage contract every backend implements.
//!
//! It is deliberately small — append, sync, checkpoint, load, history — so an
//! in-memory backend (tests, the simulator, `MACP_MEMORY_ONLY=1`), the
//! filesystem write-ahead log and a future networked log all fit it, and so
//! recovery ([`crate::recover`]) is written once for all of them.

use std::fmt;

use macp_wire::storage::Record;

use crate::error::StorageError;

/// A place in the log: `segment` and byte `offset` for the filesystem
/// backend, `(0, record count)` for the memory backend.
///
/// Positions only grow, so a driver compares the ticket returned by
/// [`Storage::append`] with the position returned by [`Storage::sync`] to
/// know which replies it may release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPos {
    /// Segment number (1-based for the filesystem backend).
    pub segment: u64,
    /// Byte offset inside the segment (or record index in memory).
    pub offset: u64,
}

impl LogPos {
    /// A position from its parts.
    pub const fn new(segment: u64, offset: u64) -> Self {
        LogPos { segment, offset }
    }
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {} offset {}", self.segment, self.offset)
    }
}

/// What kind of damage recovery found; tells the operator whether bytes
/// were bad, missing, or unreadable as a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// Bytes that are not a valid frame (bad magic, header checksum, length
    /// or a frame cut short) in a place where a torn tail is impossible.
    BadFrame,
    /// A frame whose header is intact but whose payload checksum fails.
    BadChecksum,
    /// A frame whose checksum holds but whose payload is not a record.
    Undecodable(String),
    /// Segment files are missing from the middle of the log: `segment` is
    /// the first missing one and `len` counts them.
    MissingSegment,
    /// A segment file does not start with a valid segment header.
    BadSegmentHeader,
    /// The log ends before the position the checkpoint says it covers.
    ShortOfCheckpoint,
    /// The checkpoint is unreadable; the whole log is replayed instead.
    CheckpointUnreadable(String),
}

/// One damaged place in the log, reported with segment and offset
/// (DECISIONS 16) so an operator can find and inspect it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Segment number of the damaged bytes.
    pub segment: u64,
    /// Byte offset where the damage starts.
    pub offset: u64,
    /// How many bytes were skipped (0 when unknown or not applicable;
    /// a segment count for [`DamageKind::MissingSegment`]).
    pub len: u64,
    /// What is wrong.
    pub kind: DamageKind,
    /// The session a damaged frame most likely belonged to, salvaged from
    /// its payload when only the payload checksum failed; recovery
    /// quarantines it if the session exists.
    pub session_hint: Option<String>,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {} offset {} ({} bytes): {:?}", self.segment, self.offset, self.len, self.kind)?;
        if let Some(s) = &self.session_hint {
            write!(f, " (session {s})")?;
        }
        Ok(())
    }
}

/// The end of the log was cut mid-write by a crash and has been truncated.
/// Those bytes were never synced, so no reply covered them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment.
    pub segment: u64,
    /// Where the valid log now ends.
    pub offset: u64,
    /// How many bytes were dropped.
    pub dropped_bytes: u64,
}

/// What a backend hands to recovery, in log order.
// Records dominate the stream and are moved, not boxed: one allocation
// fewer per replayed record.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LoadEvent<'a> {
    /// The latest checkpoint (a kernel snapshot); comes first if present.
    Checkpoint {
        /// Everything before this position is inside the snapshot.
        pos: LogPos,
        /// [`macp_kernel::Kernel::snapshot`] bytes.
        snapshot: &'a [u8],
    },
    /// A session record the checkpoint already covers. Only its identity is
    /// passed, so recovery can check the session's history is gapless
    /// without decoding it.
    Covered {
        /// Where it is.
        pos: LogPos,
        /// Its session (empty for registry records).
        session_id: &'a str,
        /// Its sequence number.
        seq: u64,
    },
    /// A record after the checkpoint, to replay through the kernel.
    Record {
        /// Where it is.
        pos: LogPos,
        /// The record.
        record: Record,
    },
    /// Damaged bytes; loading continues after them where framing allows.
    Damage(Damage),
}

/// What loading found besides the events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Set when a crash had cut the last segment mid-write.
    pub torn_tail: Option<TornTail>,
    /// Where the next append goes (also the durable position).
    pub end: LogPos,
}

/// A durable, ordered log of kernel records with checkpoints.
///
/// A driver uses it like this:
/// 1. [`Storage::load`] once, through [`crate::recover`], to rebuild the kernel.
/// 2. For each batch of inputs: [`Storage::append`] every `Effect::Persist`
///    record (remembering the returned ticket per reply), then one
///    [`Storage::sync`]; release a reply only when its ticket is `<=` the
///    returned durable position. The batch grows by itself under load
///    because the driver drains its queue before syncing, and a lone client
///    waits for exactly one sync.
/// 3. Now and then [`Storage::checkpoint`] with `kernel.snapshot()`, so the
///    next recovery replays only the tail.
///
/// Failures are fail-stop: after any error from `append`, `sync` or
/// `checkpoint` the backend is poisoned and the driver must drop the kernel
/// and recover again (or exit), because the kernel has already applied
/// records that may not be on disk.
pub trait Storage {
    /// Reads the checkpoint and every record back, in log order, and makes
    /// the backend ready to append. Called once, before any append.
    fn load(
        &mut self,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError>;

    /// Queues records for the log and returns the position just after the
    /// last of them: the ticket a reply waits for. Nothing is durable yet.
    fn append(&mut self, records: &[Record]) -> Result<LogPos, StorageError>;

    /// Makes everything appended so far durable with one sync and returns
    /// the durable position. Costs nothing when nothing is pending.
    fn sync(&mut self) -> Result<LogPos, StorageError>;

    /// The position up to which records are known durable.
    fn durable(&self) -> LogPos;

    /// Syncs the log, then durably stores `snapshot` as the state covering
    /// every record appended so far. `snapshot` must be the kernel's
    /// snapshot after exactly those records. Returns the covered position.
    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<LogPos, StorageError>;

    /// The durable records of one session with `seq > after_seq`, in order:
    /// replay for passive subscribers (`after_sequence` is exclusive).
    fn history(&self, session_id: &str, after_seq: u64) -> Result<Vec<Record>, StorageError>;
}
