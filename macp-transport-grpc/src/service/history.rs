//! Reading a session's accepted history from storage, for passive
//! subscribe replay, WhatIfReplay and decision receipts: access decided by
//! the driver, records read off the async threads (the file backend reads
//! segments), and complete or not at all.

use std::sync::Arc;

use macp_kernel::{ErrorCode, Identity, KernelError};
use macp_storage::{Record, StorageRead};
use tokio::sync::oneshot;
use tonic::Status;

use super::Runtime;
use crate::driver::{Command, HistoryAccess};
use crate::status::status;

/// Asks the driver whether `identity` may read `session_id` (the GetSession
/// rule) and where its stored history ends; errors are wire statuses.
pub(super) async fn access(rt: &Runtime, identity: Identity, session_id: &str) -> Result<HistoryAccess, Status> {
    let (reply, rx) = oneshot::channel();
    let ask = Command::History { identity, session_id: session_id.to_string(), reply };
    rt.router.session(session_id)?.send(ask).await.map_err(|_| rt.gone())?;
    rx.await.map_err(|_| rt.gone())?.map_err(status)
}

/// The records of `session_id` with `after < seq <= upto`. Every sequence
/// number in the range must come back: records that retention deleted in
/// between make the history incomplete, which is HISTORY_UNAVAILABLE, never
/// a silent gap.
pub(super) async fn read_records(
    reader: Arc<dyn StorageRead>,
    session_id: String,
    after: u64,
    upto: u64,
) -> Result<Vec<Record>, KernelError> {
    if after >= upto {
        return Ok(Vec::new());
    }
    let sid = session_id.clone();
    let records = tokio::task::spawn_blocking(move || reader.history(&sid, after, upto))
        .await
        .map_err(|e| KernelError::new(ErrorCode::InternalError, format!("history read failed: {e}")))?
        .map_err(|e| {
            KernelError::new(ErrorCode::InternalError, format!("reading session {session_id}'s history failed: {e}"))
        })?;
    let complete = records.len() as u64 == upto - after && records.iter().zip(after + 1..).all(|(r, seq)| r.seq == seq);
    if !complete {
        return Err(KernelError::new(
            ErrorCode::HistoryUnavailable,
            format!(
                "session {session_id}'s history after sequence {after} is no longer complete (deleted past its retention or the memory history limit)"
            ),
        ));
    }
    Ok(records)
}
