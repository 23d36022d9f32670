//! # macp-storage
//!
//! The one storage contract of macp-rs ([`Storage`] to write, [`StorageRead`]
//! to read), the in-memory backend that `MACP_MEMORY_ONLY=1` runs on
//! ([`MemoryStorage`]), and the test suite every backend must pass
//! ([`suite`], feature `suite`).
//!
//! Storage depends on the wire types only, never on the kernel: it stores
//! records and summaries and hands them back. Replaying records through the
//! kernel is the commit pipeline's job (`macp-pipeline`), so one recovery
//! serves every backend.
//!
//! Backends: [`MemoryStorage`] here; the group-committed write-ahead log
//! with its index of ended sessions in `macp-storage-fs`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod contract;
mod error;
mod memory;
mod packed;
mod retention;
pub mod session_key;
#[cfg(any(test, feature = "suite"))]
pub mod suite;

pub use contract::{
    summary_id, Damage, DamageKind, LoadEvent, LoadSummary, LogPos, Maintenance, Storage, StorageRead, TornTail,
    WriteOpenState,
};
pub use error::StorageError;
pub use macp_wire::storage::{Record, SessionSummary};
pub use memory::{MemoryConfig, MemoryStorage};
pub use retention::{BadRetention, Retention};
