//! Admission of envelopes: SessionStart, session-scoped messages, and the
//! ambient Signal and Progress.

use std::sync::Arc;

use macp_wire::storage::{record::Fact, Record, SessionStarted};
use macp_wire::v1::{Envelope, SessionState};

use super::{timers, Tx};
use crate::config::KernelConfig;
use crate::error::{ErrorCode, KResult, KernelError};
use crate::io::{Accepted, Broadcast, Identity};
use crate::state::ended::{ended_not_open, summary_has_message, summary_state};
use crate::state::Prepared;
use crate::validate;

/// Whether an envelope of this type is ambient (Signal, Progress): outside
/// any session's history, never persisted, only broadcast.
pub(crate) fn is_ambient(message_type: &str) -> bool {
    matches!(message_type, "Signal" | "Progress")
}

/// Admits one envelope. Ambient envelopes are answered and broadcast without
/// touching any session.
pub(super) fn admit(
    config: &KernelConfig,
    tx: &mut Tx<'_>,
    now: i64,
    identity: &Identity,
    env: Envelope,
) -> KResult<Accepted> {
    if is_ambient(&env.message_type) {
        let env = admit_ambient(config, identity, env)?;
        tx.broadcast(Broadcast::Signal { envelope: Arc::new(env) });
        return Ok(Accepted { state: SessionState::Open, duplicate: false });
    }
    let mut env = env;
    admit_common(config, identity, &mut env)?;
    if tx.state().is_quarantined(&env.session_id) {
        return Err(KernelError::new(
            ErrorCode::InternalError,
            format!(
                "session {} is quarantined: its stored history is damaged (see the recovery report)",
                env.session_id
            ),
        ));
    }
    if env.message_type == "SessionStart" {
        admit_start(config, tx, now, identity, env)
    } else {
        admit_session_message(config, tx, now, env)
    }
}

/// Ambient envelopes (Signal, Progress), as a pure function of the
/// configuration, the identity and the envelope: they touch no session and
/// are never persisted. Returns the canonical envelope (authenticated sender
/// filled in) to broadcast.
pub(crate) fn admit_ambient(config: &KernelConfig, identity: &Identity, mut env: Envelope) -> KResult<Envelope> {
    admit_common(config, identity, &mut env)?;
    validate::ambient_payload(&env)?;
    Ok(env)
}

/// Checks every envelope passes before its type matters: shape, sender
/// identity, reserved ids, and grants.
fn admit_common(config: &KernelConfig, identity: &Identity, env: &mut Envelope) -> KResult<()> {
    validate::envelope_shape(env, config)?;
    if env.sender.is_empty() {
        env.sender = identity.sender.clone();
    } else if env.sender != identity.sender {
        return Err(KernelError::new(
            ErrorCode::Unauthenticated,
            "envelope sender does not match the authenticated identity",
        ));
    }
    if identity.sender == config.runtime_id {
        return Err(KernelError::forbidden(format!(
            "'{}' is the runtime's own identity; no client may act as it",
            config.runtime_id
        )));
    }
    if env.message_id.starts_with(&config.runtime_id) && env.message_id[config.runtime_id.len()..].starts_with(':') {
        return Err(KernelError::invalid(format!(
            "message ids starting with '{}:' are reserved for runtime-emitted messages",
            config.runtime_id
        )));
    }
    if env.message_type == "SessionStart" && !identity.grants.can_start_sessions {
        return Err(KernelError::forbidden(format!("{} may not start sessions", identity.sender)));
    }
    if !env.mode.is_empty() && !identity.grants.allows_mode(&env.mode) {
        return Err(KernelError::forbidden(format!("{} may not use mode {}", identity.sender, env.mode)));
    }
    Ok(())
}

fn admit_start(
    config: &KernelConfig,
    tx: &mut Tx<'_>,
    now: i64,
    identity: &Identity,
    env: Envelope,
) -> KResult<Accepted> {
    validate::session_id(&env.session_id, config.session_id_policy)?;
    let existing = match tx.state().session(&env.session_id) {
        Some(s) => Some((s.state, s.seen.contains(&env.message_id))),
        None => tx.ended(&env.session_id)?.map(|e| (summary_state(e), summary_has_message(e, &env.message_id))),
    };
    if let Some((state, duplicate)) = existing {
        if duplicate {
            return Ok(Accepted { state, duplicate: true });
        }
        return Err(KernelError::new(
            ErrorCode::SessionAlreadyExists,
            format!("session {} already exists; start a new session with a new session_id", env.session_id),
        ));
    }
    let state = tx.state();
    let (canonical, entry) = state.modes().resolve(&env.mode).ok_or_else(|| {
        KernelError::new(ErrorCode::ModeNotSupported, format!("mode '{}' is not registered", env.mode))
    })?;
    let canonical = canonical.to_string();
    let descriptor_version = entry.descriptor.mode_version.clone();
    let fields = validate::start_payload(&env, config)?;
    let p = &fields.payload;
    if p.mode_version != descriptor_version {
        return Err(KernelError::new(
            ErrorCode::ModeNotSupported,
            format!("mode {} supports version '{descriptor_version}', not '{}'", canonical, p.mode_version),
        ));
    }
    if env.timestamp_unix_ms != 0 && (env.timestamp_unix_ms - now).abs() > config.max_start_skew_ms {
        return Err(KernelError::invalid(format!(
            "SessionStart timestamp_unix_ms is {} ms away from the runtime clock (limit {} ms); fix the client clock or send 0",
            (env.timestamp_unix_ms - now).abs(),
            config.max_start_skew_ms
        )));
    }
    let base = if env.timestamp_unix_ms != 0 { env.timestamp_unix_ms } else { now };
    let deadline = base.saturating_add(p.ttl_ms);
    if deadline < now {
        return Err(KernelError::invalid(format!(
            "SessionStart timestamp_unix_ms + ttl_ms is already {} ms in the past",
            now - deadline
        )));
    }
    let policy = state.policies().resolve(&p.policy_version, &canonical)?;
    if let Some(max) = identity.grants.max_open_sessions {
        let live = state.live_count(&identity.sender);
        if live >= max {
            return Err(KernelError::new(
                ErrorCode::RateLimited,
                format!("{} already has {live} open sessions (limit {max})", identity.sender),
            ));
        }
    }
    let max_suspend_ms = if p.max_suspend_ms == 0 { config.default_max_suspend_ms } else { p.max_suspend_ms };
    let record = Record {
        session_id: env.session_id.clone(),
        seq: 1,
        at_unix_ms: now,
        fact: Some(Fact::Started(SessionStarted {
            envelope: Some(env),
            policy: Some(policy.descriptor.clone()),
            max_suspend_ms,
            deadline_unix_ms: deadline,
            canonical_mode: canonical,
        })),
    };
    let prepared = Prepared { payload: fields.payload, policy };
    let state = tx.commit_with(record, Some(prepared))?;
    Ok(Accepted { state, duplicate: false })
}

/// A message for a session that has ended and left the working set: the
/// same checks, in the same order, as for a held session, answered from its
/// summary.
fn admit_to_ended(tx: &mut Tx<'_>, env: &Envelope) -> KResult<Accepted> {
    let Some(e) = tx.ended(&env.session_id)? else {
        return Err(KernelError::new(ErrorCode::SessionNotFound, format!("session {} does not exist", env.session_id)));
    };
    let state = summary_state(e);
    if summary_has_message(e, &env.message_id) {
        return Ok(Accepted { state, duplicate: true });
    }
    let not_open = ended_not_open(e);
    let mode = e.metadata.as_ref().map(|m| m.mode.clone()).unwrap_or_default();
    check_bound_mode(tx, env, &mode)?;
    check_not_runtime_only(env)?;
    Err(not_open)
}

fn check_bound_mode(tx: &Tx<'_>, env: &Envelope, session_mode: &str) -> KResult<()> {
    if !tx.state().modes().binds_to(&env.mode, session_mode) {
        return Err(KernelError::invalid(format!(
            "session {} is bound to mode {session_mode}, not {}",
            env.session_id, env.mode
        )));
    }
    Ok(())
}

fn check_not_runtime_only(env: &Envelope) -> KResult<()> {
    if validate::RUNTIME_ONLY_TYPES.contains(&env.message_type.as_str()) {
        return Err(KernelError::forbidden(format!(
            "{} is emitted only by the runtime; use the {}Session RPC",
            env.message_type,
            env.message_type.trim_start_matches("Session")
        )));
    }
    Ok(())
}

fn admit_session_message(config: &KernelConfig, tx: &mut Tx<'_>, now: i64, env: Envelope) -> KResult<Accepted> {
    let Some(s) = tx.state().session(&env.session_id) else {
        return admit_to_ended(tx, &env);
    };
    if s.seen.contains(&env.message_id) {
        return Ok(Accepted { state: s.state, duplicate: true });
    }
    check_bound_mode(tx, &env, &s.binding.mode)?;
    check_not_runtime_only(&env)?;
    // One lookup serves the common case; expiry and due mode timers (rare)
    // look the session up again after they changed it.
    let expiry_due = match s.state {
        SessionState::Open => now > s.deadline_ms,
        SessionState::Suspended => s.suspend_cap_deadline().is_some_and(|d| now > d),
        _ => false,
    };
    let timer_due = s.mode_state.next_deadline().is_some_and(|d| d <= now);
    let (state, seq) = if expiry_due || timer_due {
        if timers::expire_if_due(tx, now, &env.session_id) {
            return Err(KernelError::new(
                ErrorCode::SessionNotOpen,
                format!("session {} expired before this message arrived", env.session_id),
            ));
        }
        // Timers that fell due before this message (e.g. an implicit handoff
        // accept) enter the history first, as if the tick had come in time.
        if timer_due {
            timers::fire_mode_timers(config, tx, now, &env.session_id);
        }
        match tx.state().session(&env.session_id) {
            Some(s) if s.state == SessionState::Open => (s.state, s.seq),
            Some(s) => return Err(s.not_open()),
            // A due timer ended the session (a mode that resolves on a
            // timer): answer as for any ended session.
            None => return admit_to_ended(tx, &env),
        }
    } else {
        if s.state != SessionState::Open {
            return Err(s.not_open());
        }
        (s.state, s.seq)
    };
    debug_assert_eq!(state, SessionState::Open);
    let record =
        Record { session_id: env.session_id.clone(), seq: seq + 1, at_unix_ms: now, fact: Some(Fact::Accepted(env)) };
    let state = tx.commit(record)?;
    Ok(Accepted { state, duplicate: false })
}
