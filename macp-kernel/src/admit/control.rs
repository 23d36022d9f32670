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
use crate::state::ended::{ended_not_open, summary_state};

pub(super) fn admit(
    config: &KernelConfig,
    tx: &mut Tx<'_>,
    now: i64,
    identity: &Identity,
    op: ControlOp,
    sid: &str,
    reason: String,
) -> KResult<Accepted> {
    let who = identity.sender.as_str();
    let Some(s) = tx.state().session(sid) else {
        return control_ended(config, tx, who, op, sid);
    };
    if who == config.runtime_id {
        return Err(KernelError::forbidden("no client may act as the runtime's own identity"));
    }
    let delegated = !s.initiator_only_commitment && s.policy.authority.permits(who, &s.initiator, &s.participants);
    if who != &*s.initiator && !delegated {
        return Err(no_authority(op, sid));
    }
    let max_suspend_ms = s.max_suspend_ms;
    if timers::expire_if_due(tx, now, sid) {
        // It expired just now and left the working set.
        return match op {
            ControlOp::Resume => Err(KernelError::new(
                ErrorCode::SessionNotOpen,
                format!("session {sid} exceeded its suspension cap of {max_suspend_ms} ms and expired"),
            )),
            _ => control_ended(config, tx, who, op, sid),
        };
    }
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
            if s.state != SessionState::Suspended {
                return Err(s.not_open());
            }
            let banked = s.deadline_ms.saturating_sub(s.suspended_at_ms().unwrap_or(now));
            let p = SessionResumePayload { reason, resumed_by: who.to_string(), banked_ms: banked };
            ("SessionResume", p.encode_to_vec(), Fact::Resumed)
        }
    };
    let seq = s.seq + 1;
    let env = Envelope {
        macp_version: PROTOCOL_VERSION.to_string(),
        mode: s.binding.mode.to_string(),
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

fn no_authority(op: ControlOp, sid: &str) -> KernelError {
    KernelError::forbidden(format!(
        "only the initiator (or a policy-delegated role) may {} session {sid}",
        match op {
            ControlOp::Cancel => "cancel",
            ControlOp::Suspend => "suspend",
            ControlOp::Resume => "resume",
        }
    ))
}

/// A control request for a session that has ended and left the working
/// set: the same authority check, answered from its summary. Cancelling an
/// ended session is idempotent; suspending or resuming it is refused.
fn control_ended(config: &KernelConfig, tx: &mut Tx<'_>, who: &str, op: ControlOp, sid: &str) -> KResult<Accepted> {
    let Some(e) = tx.ended(sid)? else {
        return Err(KernelError::new(ErrorCode::SessionNotFound, format!("session {sid} does not exist")));
    };
    if who == config.runtime_id {
        return Err(KernelError::forbidden("no client may act as the runtime's own identity"));
    }
    let initiator = e.metadata.as_ref().map_or("", |m| m.initiator.as_str());
    if who != initiator && e.controllers.binary_search_by(|c| c.as_str().cmp(who)).is_err() {
        return Err(no_authority(op, sid));
    }
    match op {
        ControlOp::Cancel => Ok(Accepted { state: summary_state(e), duplicate: false }),
        ControlOp::Suspend | ControlOp::Resume => Err(ended_not_open(e)),
    }
}
