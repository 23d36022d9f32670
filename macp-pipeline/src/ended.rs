//! The kernel's view of ended sessions, read from storage.

use std::collections::HashMap;

use macp_kernel::{EndedSessions, ErrorCode, KResult, KernelError};
use macp_storage::{SessionSummary, StorageError, StorageRead};

/// A storage reader as the kernel's [`EndedSessions`]: a failed read
/// becomes INTERNAL_ERROR for the one request that needed it (reads do not
/// poison storage). Lookups the pipeline made ahead for the batch
/// (`Pipeline::prefetch_ended`) are answered from those.
pub(crate) struct StorageEnded<'a> {
    reader: &'a dyn StorageRead,
    prefetched: Option<&'a HashMap<String, Option<SessionSummary>>>,
}

impl<'a> StorageEnded<'a> {
    /// Every lookup read from storage.
    pub(crate) fn direct(reader: &'a dyn StorageRead) -> Self {
        StorageEnded { reader, prefetched: None }
    }

    /// Lookups in `prefetched` answered from it, the others from storage.
    pub(crate) fn with_prefetched(
        reader: &'a dyn StorageRead,
        prefetched: &'a HashMap<String, Option<SessionSummary>>,
    ) -> Self {
        StorageEnded { reader, prefetched: Some(prefetched) }
    }
}

fn read_failed(e: StorageError) -> KernelError {
    KernelError::new(ErrorCode::InternalError, format!("reading an ended session from storage failed: {e}"))
}

impl EndedSessions for StorageEnded<'_> {
    fn get(&self, session_id: &str) -> KResult<Option<SessionSummary>> {
        if let Some(found) = self.prefetched.and_then(|p| p.get(session_id)) {
            return Ok(found.clone());
        }
        self.reader.ended(session_id).map_err(read_failed)
    }

    fn list(&self, after: Option<&str>, limit: usize) -> KResult<Vec<SessionSummary>> {
        self.reader.list_ended(after, limit).map_err(read_failed)
    }
}
