//! Decision receipt RPCs (RFC-MACP-0013 §13): GetDecisionReceipt and
//! GetReceiptKeys.
//!
//! A receipt is never stored: it is issued on every call from the session's
//! stored history by `macp_receipt::issue`, a pure function of the history
//! and the signing key, so it is byte-identical on every call and after a
//! restart, and sessions long gone from the kernel's memory get one too.
//! The kernel only decides who may read the session (the GetSession rule)
//! and how far its history reaches; the records come from storage.

use macp_kernel::{ErrorCode, KernelError};
use macp_wire::v1::*;
use tonic::{Request, Response, Status};

use super::history::{access, read_records};
use super::Runtime;
use crate::status::status;

pub(super) async fn get_decision_receipt(
    rt: &Runtime,
    req: Request<GetDecisionReceiptRequest>,
) -> Result<Response<GetDecisionReceiptResponse>, Status> {
    let identity = rt.identity(&req).await?;
    let forwarded = Runtime::forwarded(&req);
    let session_id = req.into_inner().session_id;
    if let Some(peer) = rt.router.peer(&session_id, forwarded) {
        let req = peer.request(GetDecisionReceiptRequest { session_id }, &identity);
        return peer.client.clone().get_decision_receipt(req).await;
    }
    let view = access(rt, identity, &session_id).await?;
    if view.live {
        return Err(status(KernelError::new(
            ErrorCode::ReceiptUnavailable,
            format!("session {session_id} has not resolved yet; its receipt is issued once a Commitment resolves it"),
        )));
    }
    let records = read_records(view.history, session_id, 0, view.upto).await.map_err(status)?;
    let receipt_json = macp_receipt::issue(&records, &rt.kernel_config.runtime_id, rt.receipts.signer())
        .map_err(|e| status(e.into()))?;
    Ok(Response::new(GetDecisionReceiptResponse { receipt_json }))
}

pub(super) async fn get_receipt_keys(
    rt: &Runtime,
    req: Request<GetReceiptKeysRequest>,
) -> Result<Response<GetReceiptKeysResponse>, Status> {
    rt.identity(&req).await?;
    Ok(Response::new(GetReceiptKeysResponse { jwks_json: rt.receipts.jwks_json() }))
}
