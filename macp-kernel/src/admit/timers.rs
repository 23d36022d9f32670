//! Time: TTL and suspension-cap expiry, and the runtime-emitted messages
//! modes ask for when their deadlines pass (handoff implicit accept).
//!
//! A tick visits only sessions whose indexed timer is due. Expiry and mode
//! timers are also checked when a message arrives for a session, so an
//! outcome never depends on when the driver happened to tick.

use macp_wire::storage::{record::Fact, Record, SessionExpired};
use macp_wire::v1::{Envelope, SessionState};

use super::Tx;
use crate::config::{KernelConfig, PROTOCOL_VERSION};

/// Services every timer due at `now`.
pub(super) fn tick(config: &KernelConfig, tx: &mut Tx<'_>, now: i64) {
    for sid in tx.state().due(now) {
        if expire_if_due(tx, now, &sid) {
            continue;
        }
        fire_mode_timers(config, tx, now, &sid);
    }
}

/// Expires the session if its TTL (OPEN) or suspension cap (SUSPENDED) has
/// passed at `now`. Returns whether it expired now.
pub(super) fn expire_if_due(tx: &mut Tx<'_>, now: i64, sid: &str) -> bool {
    let Some(s) = tx.state().session(sid) else { return false };
    let reason = match s.state {
        SessionState::Open if now > s.deadline_ms => "ttl",
        SessionState::Suspended if s.suspend_cap_deadline().is_some_and(|d| now > d) => "suspend_cap",
        _ => return false,
    };
    let record = Record {
        session_id: sid.to_string(),
        seq: s.seq + 1,
        at_unix_ms: now,
        fact: Some(Fact::Expired(SessionExpired { reason: reason.to_string() })),
    };
    tx.commit(record).is_ok()
}

/// Records the messages an OPEN session's mode emits for deadlines due at
/// `now`.
pub(super) fn fire_mode_timers(config: &KernelConfig, tx: &mut Tx<'_>, now: i64, sid: &str) {
    let Some(s) = tx.state().session(sid) else { return };
    if s.state != SessionState::Open {
        return;
    }
    let due = s.mode_state.next_deadline().is_some_and(|d| d <= now);
    let messages = if due { s.mode_state.on_timer(s.view(), now) } else { Vec::new() };
    for m in messages {
        let Some(s) = tx.state().session(sid) else { break };
        if s.seen.contains(&m.message_id) || s.state != SessionState::Open {
            continue;
        }
        let env = Envelope {
            macp_version: PROTOCOL_VERSION.to_string(),
            mode: s.binding.mode.to_string(),
            message_type: m.message_type,
            message_id: m.message_id,
            session_id: sid.to_string(),
            sender: config.runtime_id.clone(),
            timestamp_unix_ms: now,
            payload: m.payload,
        };
        let record =
            Record { session_id: sid.to_string(), seq: s.seq + 1, at_unix_ms: now, fact: Some(Fact::Accepted(env)) };
        // A mode that proposes a message it then refuses is a mode bug;
        // dropping it keeps the kernel live and the history consistent.
        let _ = tx.commit(record);
    }
    tx.mode_timer_fired(sid, now);
}
