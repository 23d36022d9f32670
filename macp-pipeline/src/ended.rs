//! The kernel's view of ended sessions, read from storage.

use macp_kernel::{EndedSessions, ErrorCode, KResult, KernelError};
use macp_storage::{SessionSummary, StorageError, StorageRead};

/// A storage reader as the kernel's [`EndedSessions`]: a failed read
/// becomes INTERNAL_ERROR for the one request that needed it (reads do not
/// poison storage).
pub(crate) struct StorageEnded<'a>(pub &'a dyn StorageRead);

fn read_failed(e: StorageError) -> KernelError {
    KernelError::new(ErrorCode::InternalError, format!("reading an ended session from storage failed: {e}"))
}

impl EndedSessions for StorageEnded<'_> {
    fn get(&self, session_id: &str) -> KResult<Option<SessionSummary>> {
        self.0.ended(session_id).map_err(read_failed)
    }

    fn list(&self, after: Option<&str>, limit: usize) -> KResult<Vec<SessionSummary>> {
        self.0.list_ended(after, limit).map_err(read_failed)
    }
}
