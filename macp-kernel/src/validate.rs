//! Pure structural checks: envelope shape, session ids, SessionStart and
//! Commitment payloads. Nothing here looks at session state.

use macp_wire::v1::{CommitmentPayload, Envelope, SessionStartPayload};
use prost::Message as _;

use crate::config::{KernelConfig, SessionIdPolicy, MAX_TTL_MS, PROTOCOL_VERSION};
use crate::error::{ErrorCode, KResult, KernelError};

/// Message types only the runtime may emit (DIGEST §1.1, row 47).
pub const RUNTIME_ONLY_TYPES: [&str; 3] = ["SessionCancel", "SessionSuspend", "SessionResume"];

/// Envelope checks that need no session: version, required fields, ambient
/// shape, payload size (DIGEST §1.1 steps 1–5).
pub fn envelope_shape(env: &Envelope, cfg: &KernelConfig) -> KResult<()> {
    if env.macp_version != PROTOCOL_VERSION {
        return Err(KernelError::new(
            ErrorCode::UnsupportedProtocolVersion,
            format!("macp_version '{}' is not supported; this runtime speaks '{PROTOCOL_VERSION}'", env.macp_version),
        ));
    }
    if env.message_type.is_empty() {
        return Err(KernelError::invalid("message_type must not be empty"));
    }
    if env.message_id.is_empty() {
        return Err(KernelError::invalid("message_id must not be empty"));
    }
    match env.message_type.as_str() {
        "Signal" => {
            if !env.session_id.is_empty() || !env.mode.is_empty() {
                return Err(KernelError::invalid(
                    "a Signal is ambient: session_id and mode must be empty (use correlation_session_id, or passive subscribe to follow a session)",
                ));
            }
        }
        "Progress" => {
            if env.session_id.is_empty() != env.mode.is_empty() {
                return Err(KernelError::invalid(
                    "a Progress is either ambient (no session_id, no mode) or session-scoped (both set)",
                ));
            }
        }
        _ => {
            if env.session_id.is_empty() {
                return Err(KernelError::invalid(format!("{} needs a session_id", env.message_type)));
            }
            if env.mode.is_empty() {
                return Err(KernelError::invalid(format!("{} needs a mode", env.message_type)));
            }
        }
    }
    if env.payload.len() > cfg.max_payload_bytes {
        return Err(KernelError::new(
            ErrorCode::PayloadTooLarge,
            format!("payload is {} bytes; the limit is {}", env.payload.len(), cfg.max_payload_bytes),
        ));
    }
    Ok(())
}

/// Session id format (DECISIONS 10).
pub fn session_id(id: &str, policy: SessionIdPolicy) -> KResult<()> {
    let ok = match policy {
        SessionIdPolicy::Strict => is_strict_uuid(id) || (id.len() >= 22 && !looks_like_uuid(id) && is_base64url(id)),
        SessionIdPolicy::Lax => !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| (0x21..=0x7e).contains(&b)),
    };
    if ok {
        Ok(())
    } else {
        let rule = match policy {
            SessionIdPolicy::Strict => {
                "a lowercase hyphenated UUID v4/v7, or at least 22 base64url characters [A-Za-z0-9_-]"
            }
            SessionIdPolicy::Lax => "1 to 128 printable ASCII characters",
        };
        Err(KernelError::new(ErrorCode::InvalidSessionId, format!("session_id '{}' must be {rule}", truncate(id))))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

fn is_base64url(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// 36 chars with hyphens where a UUID has them: then it must be a canonical
/// one, not a lookalike that slips through the base64url rule.
fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-')
}

fn is_strict_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 36 {
        return false;
    }
    for (i, &c) in b.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        };
        if !ok {
            return false;
        }
    }
    let version = b[14];
    let variant = b[19];
    matches!(version, b'4' | b'7') && matches!(variant, b'8' | b'9' | b'a' | b'b')
}

/// A decoded, structurally valid SessionStart payload.
pub struct StartFields {
    /// The decoded payload.
    pub payload: SessionStartPayload,
}

/// SessionStart payload checks (DIGEST §2.1, rows 18–21), in the latest
/// runtime's order: decode, participants, versions, ttl, suspension cap.
///
/// An empty roster is structurally valid (RFC-MACP-0012 §4.1: MACP does not
/// require a non-empty `participants` list; the spec's
/// `decision_zero_participants` vector starts such a session). Whether a
/// mode can do anything with it is the mode's call at start.
pub fn start_payload(env: &Envelope, cfg: &KernelConfig) -> KResult<StartFields> {
    if env.payload.is_empty() {
        return Err(KernelError::invalid("SessionStart needs a SessionStartPayload; the payload is empty"));
    }
    let p = SessionStartPayload::decode(env.payload.as_slice())
        .map_err(|e| KernelError::invalid(format!("SessionStart payload does not decode: {e}")))?;
    if p.participants.len() > cfg.max_participants {
        return Err(KernelError::invalid(format!(
            "SessionStart declares {}; the limit is {}",
            crate::text::Count::of(p.participants.len(), "participant"),
            cfg.max_participants
        )));
    }
    // A handful of participants is the rule: compare them pairwise without
    // allocating; long lists go through a set.
    const PAIRWISE: usize = 16;
    let mut seen = std::collections::BTreeSet::new();
    for (i, who) in p.participants.iter().enumerate() {
        let t = who.trim();
        if t.is_empty() {
            return Err(KernelError::invalid("participants must not contain an empty id"));
        }
        let repeated = if p.participants.len() <= PAIRWISE {
            p.participants[..i].iter().any(|earlier| earlier.trim() == t)
        } else {
            !seen.insert(t)
        };
        if repeated {
            return Err(KernelError::invalid(format!("participant '{t}' is listed twice")));
        }
    }
    if p.mode_version.trim().is_empty() {
        return Err(KernelError::invalid("SessionStart needs a non-empty mode_version"));
    }
    if p.configuration_version.trim().is_empty() {
        return Err(KernelError::invalid("SessionStart needs a non-empty configuration_version"));
    }
    if !(1..=MAX_TTL_MS).contains(&p.ttl_ms) {
        return Err(KernelError::invalid(format!("ttl_ms must be in 1..={MAX_TTL_MS}; got {}", p.ttl_ms)));
    }
    if p.max_suspend_ms < 0 {
        return Err(KernelError::invalid("max_suspend_ms must not be negative (0 means the runtime default)"));
    }
    Ok(StartFields { payload: p })
}

/// Whether an action names a positive or a negative outcome, by suffix.
fn action_polarity(action: &str) -> Option<bool> {
    const POSITIVE: [&str; 4] = ["selected", "accepted", "completed", "approved"];
    const NEGATIVE: [&str; 3] = ["rejected", "failed", "declined"];
    let last = action.rsplit(['.', '_', '-']).next().unwrap_or(action);
    if POSITIVE.contains(&last) {
        Some(true)
    } else if NEGATIVE.contains(&last) {
        Some(false)
    } else {
        None
    }
}

/// Commitment payload checks every mode shares (DIGEST §2.6, rows 71–73).
pub fn commitment_fields(
    payload: &[u8],
    mode_version: &str,
    configuration_version: &str,
    policy_id: &str,
) -> KResult<CommitmentPayload> {
    let c = CommitmentPayload::decode(payload)
        .map_err(|e| KernelError::invalid(format!("Commitment payload does not decode: {e}")))?;
    for (name, v) in [
        ("commitment_id", &c.commitment_id),
        ("action", &c.action),
        ("authority_scope", &c.authority_scope),
        ("reason", &c.reason),
    ] {
        if v.trim().is_empty() {
            return Err(KernelError::invalid(format!("Commitment needs a non-empty {name}")));
        }
    }
    if c.mode_version != mode_version {
        return Err(KernelError::invalid(format!(
            "Commitment mode_version '{}' differs from the session's bound '{mode_version}'",
            c.mode_version
        )));
    }
    if c.configuration_version != configuration_version {
        return Err(KernelError::invalid(format!(
            "Commitment configuration_version '{}' differs from the session's bound '{configuration_version}'",
            c.configuration_version
        )));
    }
    if !c.policy_version.is_empty() && c.policy_version != policy_id {
        return Err(KernelError::invalid(format!(
            "Commitment policy_version '{}' differs from the session's bound '{policy_id}'",
            c.policy_version
        )));
    }
    if let Some(s) = &c.supersedes {
        if s.session_id.trim().is_empty() || s.commitment_hash.trim().is_empty() {
            return Err(KernelError::invalid("Commitment supersedes needs both session_id and commitment_hash"));
        }
        if !crate::commitment_hash::is_well_formed(&s.commitment_hash) {
            return Err(KernelError::invalid(format!(
                "Commitment supersedes.commitment_hash '{}' is not a canonical commitment hash: it must be \
                 'sha256:' followed by 64 lowercase hex digits (RFC-MACP-0013), as computed over the superseded \
                 Commitment",
                s.commitment_hash.chars().take(80).collect::<String>()
            )));
        }
    }
    if let Some(positive) = action_polarity(&c.action) {
        if positive != c.outcome_positive {
            return Err(KernelError::invalid(format!(
                "Commitment action '{}' is a {} outcome but outcome_positive is {}",
                c.action,
                if positive { "positive" } else { "negative" },
                c.outcome_positive
            )));
        }
    }
    Ok(c)
}

/// Payload checks of the ambient types: an empty payload is allowed; a
/// Signal's must decode and name a signal_type, a Progress's must decode.
pub fn ambient_payload(env: &Envelope) -> KResult<()> {
    if env.payload.is_empty() {
        return Ok(());
    }
    match env.message_type.as_str() {
        "Signal" => {
            let s = macp_wire::v1::SignalPayload::decode(env.payload.as_slice())
                .map_err(|e| KernelError::invalid(format!("Signal payload does not decode: {e}")))?;
            if s.signal_type.trim().is_empty() {
                return Err(KernelError::invalid("Signal payload needs a non-empty signal_type"));
            }
            Ok(())
        }
        "Progress" => {
            macp_wire::v1::ProgressPayload::decode(env.payload.as_slice())
                .map_err(|e| KernelError::invalid(format!("Progress payload does not decode: {e}")))?;
            Ok(())
        }
        other => Err(KernelError::invalid(format!("{other} is not an ambient message type"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_ids() {
        let p = SessionIdPolicy::Strict;
        assert!(session_id("0b8f9a7e-1c2d-4e3f-8a9b-0c1d2e3f4a5b", p).is_ok());
        assert!(session_id("0190f3b2-7c4d-7e3f-9a9b-0c1d2e3f4a5b", p).is_ok());
        assert!(session_id("01J9ZQ8X3K4M5N6P7Q8R9S0T1V", p).is_ok()); // ULID, 26 chars
        assert!(session_id("0B8F9A7E-1C2D-4E3F-8A9B-0C1D2E3F4A5B", p).is_err()); // uppercase UUID
        assert!(session_id("0b8f9a7e-1c2d-1e3f-8a9b-0c1d2e3f4a5b", p).is_err()); // v1
        assert!(session_id("s1", p).is_err());
        assert!(session_id("short_token_123", p).is_err());
        assert!(session_id("has space in it and is long", p).is_err());
        assert!(session_id("s1", SessionIdPolicy::Lax).is_ok());
        assert!(session_id("", SessionIdPolicy::Lax).is_err());
        assert!(session_id(&"x".repeat(129), SessionIdPolicy::Lax).is_err());
    }

    #[test]
    fn polarity() {
        assert_eq!(action_polarity("decision.selected"), Some(true));
        assert_eq!(action_polarity("task.failed"), Some(false));
        assert_eq!(action_polarity("multi_round.converged"), None);
    }
}
