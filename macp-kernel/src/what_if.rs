//! WhatIfReplay (RFC-MACP-0012 §8.1): how would a recorded session have gone
//! under another policy?
//!
//! [`replay`] is a pure function of a session's stored records, a candidate
//! policy and the mode registry: it rebuilds the session twice, each time in
//! a fresh, private [`State`] that nothing else can see, once under the policy
//! the session is bound to and once under the candidate, and compares the
//! two entry by entry. It takes no kernel and no storage, so it cannot
//! persist, register or broadcast anything: the read-only promise of the RPC
//! is kept by construction, and a driver may run it on any thread.
//!
//! Each replay goes through [`State::apply`], the one function that live
//! admission and recovery use to change a session, so mode rules, commitment
//! authority and policy evaluation are exactly the ones that decided the
//! recorded session. What a replay changes in a record before applying it:
//!
//! * the policy frozen in the SessionStart record, for the candidate run;
//! * sequence numbers, renumbered after the session's current one, because a
//!   candidate that refuses an entry leaves a gap the stored numbering would
//!   otherwise report as corruption.
//!
//! The candidate is bound under the recorded policy's id. A Commitment that
//! echoes `policy_version` names the policy its session was bound to; had
//! the session been bound to the candidate, it would have echoed that one.
//! Keeping the id makes the echo check agree in both runs, so a divergence
//! always comes from the governance rules, never from the name.

use macp_wire::storage::{record::Fact, Record, SessionStarted};
use macp_wire::v1::{
    what_if_entry_outcome::Kind, PolicyDescriptor, SessionState, WhatIfDenial, WhatIfEntry, WhatIfEntryOutcome,
    WhatIfOutcome, WhatIfReplayResponse,
};

use crate::error::{ErrorCode, KResult, KernelError};
use crate::mode::ModeRegistry;
use crate::policy::{PolicyRegistry, DEFAULT_POLICY_ID};
use crate::record::history_envelope;
use crate::state::State;

/// Replays `history` — every stored record of one session, in order,
/// expected to end at sequence number `last_seq` — under the policy the
/// session is bound to and under `candidate`, and reports both outcomes, the
/// first entry they handled differently, every POLICY_DENIED of the
/// candidate, and one [`WhatIfEntry`] per history entry (SessionStart,
/// accepted messages, control envelopes; index 0 is the SessionStart).
///
/// `runtime_id` is the runtime's own agent id, which marks runtime-emitted
/// envelopes exactly as live admission did.
///
/// Errors: INVALID_POLICY_DEFINITION when the candidate fails RegisterPolicy
/// admission ([`PolicyRegistry::admit_candidate`]) or targets another mode;
/// HISTORY_UNAVAILABLE when `history` is not the whole session (retention
/// or size limits removed records). Neither argument is modified.
pub fn replay(
    history: &[Record],
    last_seq: u64,
    candidate: &PolicyDescriptor,
    modes: &ModeRegistry,
    runtime_id: &str,
) -> KResult<WhatIfReplayResponse> {
    PolicyRegistry::admit_candidate(candidate, modes)?;
    let started = complete_start(history, last_seq)?;
    check_candidate_mode(candidate, started, modes)?;
    let bound_id = started.policy.as_ref().map(|p| p.policy_id.clone()).unwrap_or_default();
    let renamed = PolicyDescriptor { policy_id: bound_id.clone(), ..candidate.clone() };
    let recorded = run(history, None, modes, runtime_id);
    let proposed = run(history, Some(&renamed), modes, runtime_id);
    let entries: Vec<WhatIfEntry> = history
        .iter()
        .filter_map(history_envelope)
        .zip(recorded.outcomes.into_iter().zip(proposed.outcomes))
        .enumerate()
        .map(|(i, (env, (r, c)))| WhatIfEntry {
            history_index: i as u64,
            message_id: env.message_id.clone(),
            message_type: env.message_type.clone(),
            recorded: Some(r),
            candidate: Some(c),
        })
        .collect();
    let first_divergence = entries.iter().find(|e| e.recorded != e.candidate).map(|e| e.history_index);
    Ok(WhatIfReplayResponse {
        candidate_policy_id: candidate.policy_id.clone(),
        recorded_policy_id: if bound_id.is_empty() { DEFAULT_POLICY_ID.to_string() } else { bound_id },
        recorded: Some(recorded.outcome),
        candidate: Some(proposed.outcome),
        first_divergence,
        denials: proposed.denials,
        entries,
    })
}

/// The SessionStart of a history that holds every record from 1 to
/// `last_seq` of one session; HISTORY_UNAVAILABLE otherwise.
fn complete_start(history: &[Record], last_seq: u64) -> KResult<&SessionStarted> {
    let unavailable = |why: String| {
        KernelError::new(
            ErrorCode::HistoryUnavailable,
            format!("the session's accepted history is no longer complete ({why}); it cannot be replayed"),
        )
    };
    let Some(first) = history.first() else { return Err(unavailable("no record is stored".into())) };
    if history.len() as u64 != last_seq {
        return Err(unavailable(format!("{} of its {} stored", history.len(), crate::text::Count(last_seq, "record"))));
    }
    if let Some((i, r)) =
        history.iter().enumerate().find(|(i, r)| r.seq != *i as u64 + 1 || r.session_id != first.session_id)
    {
        return Err(unavailable(format!("record {} is numbered {}", i + 1, r.seq)));
    }
    match &first.fact {
        Some(Fact::Started(st)) => Ok(st),
        _ => Err(unavailable("its first record is not the SessionStart".into())),
    }
}

/// The candidate must govern the session's mode: that mode (or an alias of
/// it), or `*`.
fn check_candidate_mode(candidate: &PolicyDescriptor, started: &SessionStarted, modes: &ModeRegistry) -> KResult<()> {
    let session_mode = started.canonical_mode.as_str();
    let same = candidate.mode == "*"
        || candidate.mode == session_mode
        || modes.resolve(&candidate.mode).is_some_and(|(id, _)| id == session_mode);
    if same {
        Ok(())
    } else {
        Err(KernelError::invalid_policy(format!(
            "the candidate policy targets mode {}, but the session is a {session_mode} session; use that mode or '*'",
            candidate.mode
        )))
    }
}

/// One replay's view of the history.
#[derive(Default)]
struct Run {
    /// One outcome per history entry.
    outcomes: Vec<WhatIfEntryOutcome>,
    /// Where the replay ended.
    outcome: WhatIfOutcome,
    /// Every POLICY_DENIED, in history order.
    denials: Vec<WhatIfDenial>,
}

fn entry_outcome(kind: Kind, state: SessionState) -> WhatIfEntryOutcome {
    WhatIfEntryOutcome { kind: kind as i32, state: state as i32, error_code: String::new(), details: Vec::new() }
}

/// Replays `history` in a fresh state, binding `policy` instead of the
/// recorded one when given.
fn run(history: &[Record], policy: Option<&PolicyDescriptor>, modes: &ModeRegistry, runtime_id: &str) -> Run {
    let mut state = State::for_replay(runtime_id, modes.clone());
    let mut out = Run::default();
    // UNSPECIFIED until a SessionStart applies: there is no session.
    let mut current = SessionState::Unspecified;
    for stored in history {
        let mut record = stored.clone();
        let is_start = matches!(record.fact, Some(Fact::Started(_)));
        if let (Some(Fact::Started(st)), Some(p)) = (&mut record.fact, policy) {
            st.policy = Some(p.clone());
        }
        let entry = history_envelope(stored);
        let index = out.outcomes.len() as u64;
        if !is_start && current == SessionState::Unspecified {
            if entry.is_some() {
                out.outcomes.push(entry_outcome(Kind::NoSession, SessionState::Unspecified));
            }
            continue;
        }
        if let Some(s) = state.session(&record.session_id) {
            record.seq = s.seq + 1;
        }
        let outcome = match state.apply(&record, None) {
            Ok(applied) => {
                let was = std::mem::replace(&mut current, applied.state);
                if let Some(env) = entry.filter(|_| was != applied.state && applied.state == SessionState::Resolved) {
                    out.outcome.resolution = env.payload.clone();
                    out.outcome.resolved_by_history_index = index;
                    out.outcome.resolved_by_message_id = env.message_id.clone();
                    out.outcome.resolved_by_message_type = env.message_type.clone();
                }
                entry_outcome(Kind::Applied, applied.state)
            }
            Err(e) if e.code == ErrorCode::SessionNotOpen && !is_start => entry_outcome(Kind::NotOpen, current),
            Err(e) => {
                if let Some(env) = entry.filter(|_| e.code == ErrorCode::PolicyDenied) {
                    out.denials.push(WhatIfDenial {
                        history_index: index,
                        message_id: env.message_id.clone(),
                        details: e.details.clone(),
                    });
                }
                WhatIfEntryOutcome {
                    error_code: e.code.as_str().to_string(),
                    details: e.details,
                    ..entry_outcome(Kind::Refused, current)
                }
            }
        };
        if entry.is_some() {
            out.outcomes.push(outcome);
        }
    }
    out.outcome.state = current as i32;
    out
}
