//! The one error type of the storage layer.
//!
//! Errors fall in three groups. Opening errors (lock held, unknown format,
//! not a data directory, unreadable checkpoint) mean the runtime must not
//! start: starting anyway would risk serving an empty or foreign state.
//! Write and sync errors poison the backend (fail-stop): nothing more is
//! acknowledged until the driver recovers from storage again. Read errors
//! (a damaged record, a history that retention removed) fail that read only.

use std::io;
use std::path::PathBuf;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed; `op` and `path` say which, so an
    /// operator can act (disk full, permissions, failing device).
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation that failed (`write`, `fdatasync`, `rename`, ...).
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed, so what is on disk is unknown; the
    /// backend refuses further work until the driver recovers from storage.
    #[error(
        "storage is poisoned by an earlier write or sync failure; recover from storage (restart) before continuing"
    )]
    Poisoned,
    /// Another process (or another handle in this one) owns the storage;
    /// two writers on one log would interleave and corrupt it.
    #[error("data directory {0} is locked by another macp-rs process")]
    Locked(PathBuf),
    /// The storage was written by a newer macp-rs whose format this build
    /// cannot read; refusing is safer than misreading it.
    #[error("storage format {found} is newer than this runtime understands ({supported}); upgrade macp-rs")]
    NewerFormat {
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The directory holds files but no valid format marker: it is not ours,
    /// or its marker was destroyed. Never initialise over it.
    #[error("{path} is not a macp-rs data directory: {reason}")]
    NotADataDir {
        /// The directory.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The checkpoint cannot be read and the log no longer reaches back far
    /// enough to rebuild the state without it.
    #[error("checkpoint {path} is unreadable ({reason}) and the log before it was retired; restore from backup")]
    CheckpointCorrupt {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A record exceeds the configured limit; the kernel already accepted
    /// it, so this poisons the backend like a failed write.
    #[error("record of {len} bytes exceeds the storage limit of {max} bytes")]
    RecordTooLarge {
        /// Encoded size.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Stored data that was readable before no longer reads back; reported
    /// with its place so the operator can inspect it.
    #[error("stored data at {place} is damaged: {reason}")]
    Damaged {
        /// Where (`segment 3 offset 4096`, `index entry <session>`, ...).
        place: String,
        /// What failed.
        reason: String,
    },
    /// The embedded index database failed (see the source for why).
    #[error("index {op}: {source}")]
    Index {
        /// What was being done.
        op: &'static str,
        /// The database's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The storage this reader belongs to was closed (dropped, usually to
    /// recover after a failure); its index may now belong to a new owner of
    /// the data directory, so the read is refused rather than risked.
    #[error("the storage behind this reader was closed; read through the reader of the storage that replaced it")]
    Closed,
    /// A cluster node's lease on a shard was taken over by another node or
    /// lapsed: the database refused the write (the fencing epoch is checked
    /// in the same transaction), so nothing of it was stored. The shard is
    /// served elsewhere now; the node drops it, and its callers retry.
    #[error(
        "shard {shard}: this node's lease (epoch {epoch}) was taken over or lapsed; the database refused the write and nothing of it was stored"
    )]
    Fenced {
        /// The shard.
        shard: u32,
        /// The epoch the write was made under.
        epoch: i64,
    },
    /// Loading stopped because the process is shutting down.
    #[error("loading was cancelled (the runtime is shutting down)")]
    Cancelled,
    /// The call is not valid in the backend's current phase (appending
    /// before the log was loaded, loading twice).
    #[error("storage used out of order: {0}")]
    Misuse(&'static str),
}

impl StorageError {
    /// Wraps an I/O error with the operation and path, for messages an
    /// operator can act on.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io { op, path: path.into(), source }
    }

    /// Wraps an index database error.
    pub fn index(op: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StorageError::Index { op, source: Box::new(source) }
    }
}
