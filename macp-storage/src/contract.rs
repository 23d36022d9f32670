//! The storage contract: what every backend (memory, files, PostgreSQL)
//! promises the commit pipeline.
//!
//! A backend keeps three things:
//! * **the log**: every record the kernel accepted, appended in batches and
//!   made durable with one sync per batch (group commit);
//! * **the checkpoint**: the kernel's open state (open and suspended
//!   sessions, registries) covering every record appended before it, so a
//!   restart replays only the records after it;
//! * **ended sessions**: a [`SessionSummary`] per ended session within
//!   retention, and that session's records, readable by id long after the
//!   session left the kernel's memory.
//!
//! The writing side ([`Storage`]) belongs to the one task that owns the
//! kernel. The reading side ([`StorageRead`]) is shared with every task that
//! serves reads (passive subscribers, GetSession of an ended session), so
//! reads never queue behind the kernel.

use std::fmt;
use std::sync::Arc;

use macp_wire::storage::{Record, SessionSummary};

use crate::error::StorageError;

/// A place in a backend's log: `segment` and byte `offset` for the file
/// backend, `(0, record number)` for the memory backend. Positions only
/// grow; they appear in damage reports so an operator can find the bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPos {
    /// Segment number (1-based for the file backend).
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

/// What kind of damage loading found; tells the operator whether bytes were
/// bad, missing, or unreadable as a record.
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
    /// How many bytes were skipped (0 when unknown or not applicable; a
    /// segment count for [`DamageKind::MissingSegment`]).
    pub len: u64,
    /// What is wrong.
    pub kind: DamageKind,
    /// The session a damaged frame most likely belonged to, salvaged from
    /// its payload; recovery quarantines it if the session exists.
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
    /// The latest checkpoint (the kernel's open state); comes first if
    /// present.
    Checkpoint {
        /// The open state as [`Storage::checkpoint`] received it.
        open_state: &'a [u8],
    },
    /// A record appended after the checkpoint, to replay through the kernel.
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
    /// Set when a crash had cut the log mid-write.
    pub torn_tail: Option<TornTail>,
    /// Where the next append goes.
    pub end: LogPos,
}

/// What one [`Storage::maintain`] call did: for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Ended sessions deleted because their retention passed.
    pub expired_sessions: u64,
    /// Ended sessions deleted early because a size cap was reached (the
    /// memory backend's history limit).
    pub evicted_sessions: u64,
    /// Log segments deleted.
    pub retired_segments: u64,
    /// Records of long-open sessions copied forward out of old segments so
    /// those segments can be retired.
    pub carried_records: u64,
    /// Bytes the backend holds after the call (log plus index, or memory).
    pub bytes: u64,
    /// Log segment files after the call, for a backend that has segments
    /// (`None` for one that has not, such as memory).
    pub segments: Option<u64>,
    /// True when the call stopped at its work bound with work left: call
    /// again soon.
    pub more: bool,
    /// Sessions that ended before this time (kernel clock) are past
    /// retention: storage deletes them as its work bound allows, and
    /// nothing in front of storage (the kernel's ended-session cache) may
    /// answer for them any longer. `None`: retention is forever.
    pub retention_cutoff_ms: Option<i64>,
}

/// The writing side of storage. See the module docs for what it keeps.
///
/// A driver uses it like this (the commit pipeline does it for you):
/// 1. [`Storage::load`] once, replaying what it yields through the kernel;
///    sessions that end during the replay are handed back with
///    [`Storage::append`] (no records, only their summaries).
/// 2. For each batch: [`Storage::append`] the records the kernel emitted and
///    the summaries of the sessions that ended, then one [`Storage::sync`].
///    No reply may be released before that sync returns.
/// 3. Now and then [`Storage::checkpoint`] with the kernel's open state,
///    and [`Storage::maintain`] for retention and compaction.
///
/// Failures of `append`, `sync` and `checkpoint` are fail-stop: the kernel
/// has already applied records that may not be durable, so the backend is
/// poisoned and the driver must rebuild the kernel from storage (or exit).
pub trait Storage: Send {
    /// Reads the checkpoint and every record after it, in log order, and
    /// makes the backend ready to append. Called once, before any append.
    /// Ended sessions need no replay: they are read through
    /// [`StorageRead`]. Returns [`StorageError::Cancelled`] if `cancelled`
    /// turns true while loading.
    fn load(
        &mut self,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError>;

    /// Queues records for the log, and the summaries of sessions whose
    /// terminal record is among them or was appended earlier (recovery hands
    /// back the sessions that ended while it replayed; storing a summary
    /// twice is harmless). Nothing is durable yet.
    fn append(&mut self, records: &[Record], ended: &[SessionSummary]) -> Result<(), StorageError>;

    /// Makes everything appended so far durable with one sync. Costs
    /// nothing when nothing is pending.
    fn sync(&mut self) -> Result<(), StorageError>;

    /// Syncs, then durably stores `open_state` (the kernel's open state
    /// after exactly the records appended so far) as the point the next
    /// [`Storage::load`] starts from.
    fn checkpoint(&mut self, open_state: &[u8]) -> Result<(), StorageError>;

    /// [`Storage::checkpoint`] with the open state written on demand by
    /// `write_open_state` (the same bytes), so a store that puts it in a
    /// file can stream it there instead of receiving one buffer of the whole
    /// state: at 100,000 open sessions that buffer and the file image built
    /// from it were ~70 MB, which the allocator kept resident afterwards
    /// (issue 15). The default collects the bytes and calls
    /// [`Storage::checkpoint`]; an error of `write_open_state` is returned
    /// as [`StorageError::Io`] and nothing is stored.
    fn checkpoint_streamed(&mut self, write_open_state: &mut WriteOpenState<'_>) -> Result<(), StorageError> {
        let mut open_state = Vec::new();
        write_open_state(&mut open_state).map_err(|e| StorageError::io("serialize open state", "", e))?;
        self.checkpoint(&open_state)
    }

    /// Background upkeep with a bounded amount of work per call: deleting
    /// ended sessions past retention, moving long-open sessions out of old
    /// log segments, retiring segments. `now_ms` is the kernel clock.
    fn maintain(&mut self, now_ms: i64) -> Result<Maintenance, StorageError>;

    /// A reader for other tasks.
    fn reader(&self) -> Arc<dyn StorageRead>;

    /// Whether [`Storage::checkpoint`] needs the open state's bytes. A
    /// store that will never be loaded again (the memory-only server's:
    /// nothing outlives the process) answers false, and the pipeline then
    /// checkpoints with an empty open state instead of serializing every
    /// open session — the checkpoint still marks which ended sessions
    /// retention may delete.
    fn needs_open_state(&self) -> bool {
        true
    }

    /// Whether `sync` (and so a commit) waits on a device or a server (a
    /// file's `fdatasync`, a database round trip). An async caller then
    /// runs it where waiting does not hold up its other tasks; a store
    /// that only copies into memory answers false and is called inline.
    fn sync_waits(&self) -> bool {
        true
    }
}

/// Writes the kernel's open state into the given writer
/// ([`Storage::checkpoint_streamed`]).
pub type WriteOpenState<'a> = dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()> + 'a;

/// The reading side of storage, shared with every task that serves reads.
pub trait StorageRead: Send + Sync {
    /// The durable records of one session with `after < seq <= upto`, in
    /// order: history for passive subscribers (`after_sequence` is
    /// exclusive). Records that retention deleted are simply absent; the
    /// caller compares with what it expected.
    fn history(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Record>, StorageError>;

    /// An ended session within retention, if any.
    fn ended(&self, session_id: &str) -> Result<Option<SessionSummary>, StorageError>;

    /// [`StorageRead::ended`] of several sessions at once, in the order
    /// given. The commit pipeline asks this for a whole batch's new
    /// session ids before running the batch, so a backend whose every read
    /// is a network round trip (PostgreSQL) pays one per batch rather than
    /// one per SessionStart. The default asks one at a time.
    fn ended_many(&self, session_ids: &[&str]) -> Result<Vec<Option<SessionSummary>>, StorageError> {
        session_ids.iter().map(|id| self.ended(id)).collect()
    }

    /// Up to `limit` ended sessions in session-id order, starting after
    /// `after` (ListSessions pages).
    fn list_ended(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionSummary>, StorageError>;
}

/// The id of the session a summary describes.
pub fn summary_id(s: &SessionSummary) -> &str {
    s.metadata.as_ref().map_or("", |m| m.session_id.as_str())
}
