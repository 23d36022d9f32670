//! Admission of the control plane: CancelSession, SuspendSession and
//! ResumeSession. Each accepted operation is recorded as a runtime-emitted
//! envelope (SessionCancel, SessionSuspend, SessionResume) in the session's
//! history, so observers and replay see it like any other message.

use macp_wire::storage::{record::Fact, Record};
use macp_wire::v1::{Envelope, SessionCancelPayload, SessionResumePayload, SessionState, SessionSuspendPayload};
use prost::Message as _;

use super::{timers, Tx};
use crate::config::{KernelConfig, PROTOCOL_VERSION};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::io::{Accepted, ControlOp, Identity};

pub(super) fn admit(
    config: &KernelConfig,
    tx: &mut Tx<'_>,
    now: i64,
    identity: &Identity,
    op: ControlOp,
    sid: &str,
    reason: String,
) -> KResult<Accepted> {
    let s = tx
        .state()
        .session(sid)
        .ok_or_else(|| KernelError::new(ErrorCode::SessionNotFound, format!("session {sid} does not exist")))?;
    let who = identity.sender.as_str();
    if who == config.runtime_id {
        return Err(KernelError::forbidden("no client may act as the runtime's own identity"));
    }
    let delegated = !s.initiator_only_commitment && s.policy.authority.permits(who, &s.initiator, &s.participants);
    if who != s.initiator && !delegated {
        return Err(KernelError::forbidden(format!(
            "only the initiator (or a policy-delegated role) may {} session {sid}",
            match op {
                ControlOp::Cancel => "cancel",
                ControlOp::Suspend => "suspend",
                ControlOp::Resume => "resume",
            }
        )));
    }
    let expired_now = timers::expire_if_due(tx, now, sid);
    let Some(s) = tx.state().session(sid) else {
        return Err(KernelError::new(ErrorCode::SessionNotFound, format!("session {sid} does not exist")));
    };
    let (message_type, payload, fact): (&str, Vec<u8>, fn(Envelope) -> Fact) = match op {
        ControlOp::Cancel => {
            if s.is_terminal() {
                return Ok(Accepted { state: s.state, duplicate: false });
            }
            let p = SessionCancelPayload { reason, cancelled_by: who.to_string() };
            ("SessionCancel", p.encode_to_vec(), Fact::Cancelled)
        }
        ControlOp::Suspend => {
            if s.state != SessionState::Open {
                return Err(s.not_open());
            }
            let p = SessionSuspendPayload { reason, suspended_by: who.to_string() };
            ("SessionSuspend", p.encode_to_vec(), Fact::Suspended)
        }
        ControlOp::Resume => {
            if expired_now {
                return Err(KernelError::new(
                    ErrorCode::SessionNotOpen,
                    format!("session {sid} exceeded its suspension cap of {} ms and expired", s.max_suspend_ms),
                ));
            }
            if s.state != SessionState::Suspended {
                return Err(s.not_open());
            }
            let banked = s.deadline_ms.saturating_sub(s.suspended_at_ms.unwrap_or(now));
            let p = SessionResumePayload { reason, resumed_by: who.to_string(), banked_ms: banked };
            ("SessionResume", p.encode_to_vec(), Fact::Resumed)
        }
    };
    let seq = s.seq + 1;
    let env = Envelope {
        macp_version: PROTOCOL_VERSION.to_string(),
        mode: s.mode.clone(),
        message_type: message_type.to_string(),
        message_id: format!("{}:{message_type}:{seq}", config.runtime_id),
        session_id: sid.to_string(),
        sender: who.to_string(),
        timestamp_unix_ms: now,
        payload,
    };
    let record = Record { session_id: sid.to_string(), seq, at_unix_ms: now, fact: Some(fact(env)) };
    let state = tx.commit(record)?;
    Ok(Accepted { state, duplicate: false })
}
