//! Envelope and payload builders.
//!
//! A session's SessionStart fixes `mode_version` and `configuration_version`,
//! and every Commitment must repeat them; keeping both as constants here is
//! what stops an example from drifting out of step with itself.

use macp_wire::v1::{CommitmentPayload, Envelope, SessionStartPayload};
use macp_wire::Message;

use crate::ids;

/// The protocol version every envelope carries.
pub const MACP_VERSION: &str = "1.0";
/// The only version of every built-in mode.
pub const MODE_VERSION: &str = "1.0.0";
/// The configuration version the examples declare (any non-empty label).
pub const CONFIGURATION_VERSION: &str = "examples-1";
/// Session time-to-live: long enough for a person to follow along, far
/// below the 24 h cap.
pub const TTL_MS: i64 = 300_000;

/// An envelope from `sender` with a fresh message id. The timestamp stays 0,
/// so the runtime counts the TTL from acceptance and client clocks do not
/// matter.
pub fn envelope(session_id: &str, mode: &str, message_type: &str, sender: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        macp_version: MACP_VERSION.into(),
        mode: mode.into(),
        message_type: message_type.into(),
        message_id: ids::message_id(),
        session_id: session_id.into(),
        sender: sender.into(),
        timestamp_unix_ms: 0,
        payload,
    }
}

/// A SessionStart payload for `participants` with the examples' versions
/// and TTL and the default policy.
pub fn start_payload(intent: &str, participants: &[&str]) -> SessionStartPayload {
    SessionStartPayload {
        intent: intent.into(),
        participants: participants.iter().map(|p| p.to_string()).collect(),
        mode_version: MODE_VERSION.into(),
        configuration_version: CONFIGURATION_VERSION.into(),
        ttl_ms: TTL_MS,
        ..Default::default()
    }
}

/// A Commitment payload. `positive` must agree with the action's suffix
/// (`…selected/accepted/completed/approved/converged` are positive), which
/// the runtime checks.
pub fn commitment(action: &str, positive: bool, reason: &str) -> CommitmentPayload {
    CommitmentPayload {
        commitment_id: format!("c-{}", ids::message_id()),
        action: action.into(),
        authority_scope: "examples".into(),
        reason: reason.into(),
        mode_version: MODE_VERSION.into(),
        policy_version: String::new(),
        configuration_version: CONFIGURATION_VERSION.into(),
        outcome_positive: positive,
        supersedes: None,
    }
}

/// An ambient Signal envelope (no session, no mode).
pub fn signal(sender: &str, signal_type: &str, data: Vec<u8>) -> Envelope {
    let p = macp_wire::v1::SignalPayload { signal_type: signal_type.into(), data, ..Default::default() };
    envelope("", "", "Signal", sender, p.encode_to_vec())
}
