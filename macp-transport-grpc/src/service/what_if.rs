//! WhatIfReplay (RFC-MACP-0012 §8.1): a session's accepted history replayed
//! under a candidate policy, as `macp_kernel::what_if::replay` computes it.
//!
//! The driver only decides who may ask and where the history ends (the
//! passive-subscribe rule: initiator, declared participant or observer;
//! SESSION_NOT_FOUND or FORBIDDEN otherwise) and hands out a storage reader
//! with the mode registry. Reading the records and both replays then run on
//! a blocking thread, never on the driver: a long history costs its caller,
//! not everyone's Sends. History comes from storage, not from the kernel,
//! because a session that ended has left the kernel's working set.
//!
//! Read-only by construction: the replay works on copies in a private state,
//! and nothing here submits an input, so nothing is persisted, registered or
//! broadcast.

use macp_kernel::ErrorCode;
use macp_wire::v1::{WhatIfReplayRequest, WhatIfReplayResponse};
use tonic::{Request, Response, Status};

use super::Runtime;
use crate::driver::HistoryAccess;
use crate::limits::Budget;
use crate::status::{error_status, status};

pub(super) async fn what_if_replay(
    rt: &Runtime,
    req: Request<WhatIfReplayRequest>,
) -> Result<Response<WhatIfReplayResponse>, Status> {
    let identity = rt.identity(&req).await?;
    // A replay reads and re-evaluates a whole session: it spends from the
    // same budget as a message.
    let forwarded = Runtime::forwarded(&req);
    if !rt.within_limit(&identity.sender, Budget::Message, forwarded) {
        return Err(error_status(
            ErrorCode::RateLimited,
            format!("{} exceeded its per-minute message limit", identity.sender),
        ));
    }
    let WhatIfReplayRequest { session_id, candidate } = req.into_inner();
    if let Some(peer) = rt.router.peer(&session_id, forwarded) {
        let req = peer.request(WhatIfReplayRequest { session_id, candidate }, &identity);
        return peer.client.clone().what_if_replay(req).await;
    }
    let candidate = candidate.ok_or_else(|| {
        error_status(ErrorCode::InvalidPolicyDefinition, "candidate is required: the PolicyDescriptor to replay under")
    })?;
    let HistoryAccess { upto, history, modes, .. } = super::history::access(rt, identity, &session_id).await?;
    let runtime_id = rt.kernel_config.runtime_id.clone();
    let records = super::history::read_records(history, session_id, 0, upto).await.map_err(status)?;
    let replayed = tokio::task::spawn_blocking(move || {
        macp_kernel::what_if::replay(&records, upto, &candidate, &modes, &runtime_id)
    })
    .await
    .map_err(|e| error_status(ErrorCode::InternalError, format!("the replay task failed: {e}")))?;
    replayed.map(Response::new).map_err(status)
}
