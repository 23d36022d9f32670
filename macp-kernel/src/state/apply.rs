//! Applying records: the single place where kernel state changes.
//!
//! Live processing builds a record and applies it here; recovery applies the
//! records read back from storage here too. Every check a record must pass
//! that depends only on the record and the state (sequence continuity,
//! session state, mode rules, policy) runs in both cases, so a record that
//! would not apply again is detected as corruption instead of being trusted.

use std::sync::Arc;

use macp_wire::storage::{record::Fact, Record, SessionStarted};
use macp_wire::v1::{session_lifecycle_event::EventType, Envelope, SessionStartPayload, SessionState};
use prost::Message as _;

use super::{Applied, Broadcasts, State};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::io::Broadcast;
use crate::mode::{Message, SessionView};
use crate::policy::BoundPolicy;
use crate::session::{Rare, SeenIds, Session};
use crate::validate;

/// What live admission of a SessionStart already worked out, handed to
/// [`State::apply_with`] so the payload is not decoded twice and the
/// policy not looked up twice. Recovery has none and derives both from the
/// record.
pub struct Prepared {
    /// The decoded, validated SessionStartPayload.
    pub payload: SessionStartPayload,
    /// The resolved registry policy (equal to the record's descriptor).
    pub policy: Arc<BoundPolicy>,
}

fn corrupt(msg: impl Into<String>) -> KernelError {
    KernelError::new(ErrorCode::InternalError, msg)
}

impl State {
    /// Applies one record. Live processing and recovery both come through
    /// here; an `Err` leaves the state unchanged. During recovery an `Err`
    /// means the log disagrees with the rules it was written under.
    /// `broadcasts`, when given, receives what observers should hear
    /// (recovery gives none: nobody is listening to history being rebuilt,
    /// and building them would double replay cost); a caller's buffer, so
    /// an envelope allocates no list of its own. `prepared` carries what
    /// live admission of a SessionStart already worked out; it is ignored
    /// for any other record.
    pub fn apply_with(
        &mut self,
        record: &Record,
        broadcasts: Option<&mut Broadcasts>,
        prepared: Option<Prepared>,
    ) -> KResult<Applied> {
        let mut none = Vec::new();
        let emit = broadcasts.is_some();
        let out = broadcasts.unwrap_or(&mut none);
        let fact = record.fact.as_ref().ok_or_else(|| corrupt("record has no fact"))?;
        let at = record.at_unix_ms;
        if record.session_id.is_empty() {
            self.apply_registry(record.seq, at, fact, out)?;
            return Ok(Applied { state: SessionState::Open, ended: None });
        }
        let sid = record.session_id.as_str();
        let state = match fact {
            Fact::Started(st) => {
                self.apply_started(record, st, emit, prepared, out)?;
                SessionState::Open
            }
            // The hot path: one session lookup for checks, state and timer.
            Fact::Accepted(env) => self.apply_accepted(sid, record.seq, at, env, emit, out)?,
            Fact::Expired(_) | Fact::Cancelled(_) | Fact::Suspended(_) | Fact::Resumed(_) => {
                let s = self.sessions.get(sid).ok_or_else(|| self.missing(sid))?;
                if record.seq != s.seq + 1 {
                    return Err(corrupt(format!("session {sid}: record seq {} does not follow {}", record.seq, s.seq)));
                }
                match fact {
                    Fact::Cancelled(env) => {
                        self.apply_control(record.seq, at, env, SessionState::Cancelled, emit, out)?
                    }
                    Fact::Suspended(env) => {
                        self.apply_control(record.seq, at, env, SessionState::Suspended, emit, out)?
                    }
                    Fact::Resumed(env) => self.apply_control(record.seq, at, env, SessionState::Open, emit, out)?,
                    _ => self.apply_expired(sid, at, emit, out)?,
                };
                match self.sessions.get_mut(sid) {
                    Some(s) => {
                        self.timers.reindex(s);
                        s.state
                    }
                    None => SessionState::Unspecified,
                }
            }
            _ => return Err(corrupt(format!("session {sid}: registry fact on a session record"))),
        };
        // A session that reached a terminal state leaves the working set.
        let ended = match state {
            SessionState::Resolved | SessionState::Expired | SessionState::Cancelled => Some(self.end_session(sid, at)),
            _ => None,
        };
        Ok(Applied { state, ended })
    }

    /// The error for a record naming a session the state does not hold.
    fn missing(&self, sid: &str) -> KernelError {
        match self.ended.get(sid) {
            Some(e) => super::ended::ended_not_open(e.summary()),
            None => KernelError::new(ErrorCode::SessionNotFound, format!("session {sid} does not exist")),
        }
    }

    fn apply_started(
        &mut self,
        record: &Record,
        st: &SessionStarted,
        emit: bool,
        prepared: Option<Prepared>,
        out: &mut Broadcasts,
    ) -> KResult<()> {
        let env = st.envelope.as_ref().ok_or_else(|| corrupt("SessionStarted without envelope"))?;
        if record.seq != 1 || env.session_id != record.session_id {
            return Err(corrupt(format!("session {}: SessionStart must be record 1", record.session_id)));
        }
        // Only a held session makes this record impossible. An id the
        // ended-session cache still knows may start again: admission
        // accepted it because retention had passed for the old session
        // (storage forgot it), and replay must accept the same record.
        if self.sessions.contains_key(record.session_id.as_str()) {
            return Err(KernelError::new(
                ErrorCode::SessionAlreadyExists,
                format!("session {} already exists", record.session_id),
            ));
        }
        let (p, policy) = match prepared {
            Some(Prepared { payload, policy }) => (payload, policy),
            None => {
                let p = SessionStartPayload::decode(env.payload.as_slice())
                    .map_err(|e| KernelError::invalid(format!("SessionStart payload does not decode: {e}")))?;
                let policy = match &st.policy {
                    Some(d) => self.policies.bind(d)?,
                    None => self.policies.bind(&Default::default())?,
                };
                (p, policy)
            }
        };
        let mode = self.modes.resolve(&st.canonical_mode).map(|(_, e)| e.mode.clone()).ok_or_else(|| {
            KernelError::new(ErrorCode::ModeNotSupported, format!("mode '{}' is not registered", st.canonical_mode))
        })?;
        let view = SessionView {
            session_id: &env.session_id,
            mode: &st.canonical_mode,
            initiator: &env.sender,
            participants: &p.participants,
            mode_version: &p.mode_version,
            configuration_version: &p.configuration_version,
            policy: &policy,
        };
        let mode_state = mode.start(view)?;
        let id: Arc<str> = env.session_id.as_str().into();
        let mut session = Session {
            id: id.clone(),
            binding: self.bindings.get(&st.canonical_mode, &p.mode_version, &p.configuration_version),
            policy,
            initiator: self.shared_initiator(&env.sender),
            participants: p.participants.into_boxed_slice(),
            rare: Rare::of_start(p.context_id, p.extensions.into_keys().collect()),
            started_at_ms: record.at_unix_ms,
            deadline_ms: st.deadline_unix_ms,
            max_suspend_ms: st.max_suspend_ms,
            state: SessionState::Open,
            seq: 1,
            seen: SeenIds::default(),
            activity: Vec::new(),
            initiator_only_commitment: mode.initiator_only_commitment(),
            mode_state,
            timer_at: None,
        };
        session.touch(&env.sender, &env.message_id, record.at_unix_ms);
        *self.live_by_initiator.entry(session.initiator.clone()).or_default() += 1;
        let metadata = emit.then(|| session.metadata());
        self.timers.reindex(&mut session);
        self.ended.forget(&record.session_id);
        self.sessions.insert(id, Box::new(session));
        let Some(metadata) = metadata else { return Ok(()) };
        out.push(Broadcast::SessionEnvelope { seq: 1, envelope: Arc::new(env.clone()) });
        out.push(Broadcast::Lifecycle {
            event: EventType::Created,
            session: Box::new(metadata),
            previous: SessionState::Unspecified,
            observed_at_unix_ms: record.at_unix_ms,
        });
        Ok(())
    }

    fn apply_accepted(
        &mut self,
        sid: &str,
        seq: u64,
        at: i64,
        env: &Envelope,
        emit: bool,
        out: &mut Broadcasts,
    ) -> KResult<SessionState> {
        let Some(s) = self.sessions.get_mut(sid) else {
            return Err(self.missing(sid));
        };
        if seq != s.seq + 1 {
            return Err(corrupt(format!("session {sid}: record seq {seq} does not follow {}", s.seq)));
        }
        if env.session_id != sid {
            return Err(corrupt(format!("session {sid}: record carries an envelope of session {}", env.session_id)));
        }
        if s.state != SessionState::Open {
            return Err(s.not_open());
        }
        if at > s.deadline_ms {
            return Err(KernelError::new(ErrorCode::SessionNotOpen, format!("session {} is past its TTL", s.id)));
        }
        if s.seen.contains(&env.message_id) {
            return Err(corrupt(format!("session {}: message {} accepted twice", s.id, env.message_id)));
        }
        let runtime_emitted = env.sender == *self.runtime_id;
        let Session { id, binding, initiator, participants, policy, mode_state, initiator_only_commitment, .. } =
            &mut **s;
        let view = SessionView {
            session_id: id,
            mode: &binding.mode,
            initiator,
            participants,
            mode_version: &binding.mode_version,
            configuration_version: &binding.configuration_version,
            policy,
        };
        let msg = Message {
            session: view,
            sender: &env.sender,
            message_type: &env.message_type,
            message_id: &env.message_id,
            payload: &env.payload,
            accepted_at_ms: at,
            runtime_emitted,
        };
        let resolved = if env.message_type == "Commitment" {
            let permitted = if *initiator_only_commitment {
                *env.sender == **initiator
            } else {
                policy.authority.permits(&env.sender, initiator, participants)
            };
            if !permitted {
                return Err(KernelError::forbidden(format!(
                    "{} does not hold commitment authority in session {}",
                    env.sender, id
                )));
            }
            let c = validate::commitment_fields(
                &env.payload,
                &binding.mode_version,
                &binding.configuration_version,
                policy.id(),
            )?;
            mode_state.commit(&msg, &c)?;
            true
        } else {
            mode_state.accept(&msg)?;
            false
        };
        s.seq = seq;
        if runtime_emitted {
            // Dedup slot only: the runtime is not a participant, so it gets
            // no activity entry.
            s.seen.insert(&env.message_id);
        } else {
            s.touch(&env.sender, &env.message_id, at);
        }
        if emit {
            out.push(Broadcast::SessionEnvelope { seq, envelope: Arc::new(env.clone()) });
        }
        if !resolved {
            self.timers.reindex(s);
            return Ok(SessionState::Open);
        }
        s.state = SessionState::Resolved;
        s.rare_mut().resolution = Some(env.payload.as_slice().into());
        self.timers.reindex(s);
        let initiator = s.initiator.clone();
        let metadata = emit.then(|| s.metadata());
        self.release_live(&initiator);
        if let Some(metadata) = metadata {
            out.push(Broadcast::Lifecycle {
                event: EventType::Resolved,
                session: Box::new(metadata),
                previous: SessionState::Open,
                observed_at_unix_ms: at,
            });
        }
        Ok(SessionState::Resolved)
    }

    fn apply_expired(&mut self, sid: &str, at: i64, emit: bool, out: &mut Broadcasts) -> KResult<()> {
        let s = self.sessions.get_mut(sid).ok_or_else(|| corrupt("expiry for a missing session"))?;
        let due = match s.state {
            SessionState::Open => at > s.deadline_ms,
            SessionState::Suspended => s.suspend_cap_deadline().is_some_and(|d| at > d),
            _ => false,
        };
        if !due {
            return Err(corrupt(format!("session {sid}: expiry at {at} before its deadline or from a terminal state")));
        }
        s.bank_suspension(at);
        let previous = s.state;
        s.seq += 1;
        s.state = SessionState::Expired;
        let initiator = s.initiator.clone();
        let metadata = emit.then(|| s.metadata());
        self.release_live(&initiator);
        if let Some(m) = metadata {
            out.push(Broadcast::Lifecycle {
                event: EventType::Expired,
                session: Box::new(m),
                previous,
                observed_at_unix_ms: at,
            });
        }
        Ok(())
    }

    fn apply_control(
        &mut self,
        seq: u64,
        at: i64,
        env: &Envelope,
        to: SessionState,
        emit: bool,
        out: &mut Broadcasts,
    ) -> KResult<()> {
        let s = self
            .sessions
            .get_mut(env.session_id.as_str())
            .ok_or_else(|| corrupt("control record for a missing session"))?;
        let event = match to {
            SessionState::Cancelled => {
                if !s.is_live() {
                    return Err(s.not_open());
                }
                s.bank_suspension(at);
                EventType::Cancelled
            }
            SessionState::Suspended => {
                if s.state != SessionState::Open || at > s.deadline_ms {
                    return Err(s.not_open());
                }
                s.rare_mut().suspended_at_ms = Some(at);
                EventType::Suspended
            }
            _ => {
                let since = match (s.state, s.suspended_at_ms()) {
                    (SessionState::Suspended, Some(since)) => since,
                    _ => return Err(s.not_open()),
                };
                let paused = at.saturating_sub(since);
                if s.rare().suspended_total_ms.saturating_add(paused) > s.max_suspend_ms {
                    return Err(s.not_open());
                }
                s.deadline_ms = s.deadline_ms.saturating_add(paused);
                let r = s.rare_mut();
                r.suspended_total_ms += paused;
                r.suspended_at_ms = None;
                EventType::Resumed
            }
        };
        let previous = s.state;
        s.seq = seq;
        s.state = to;
        let initiator = s.initiator.clone();
        let metadata = emit.then(|| s.metadata());
        if to == SessionState::Cancelled {
            self.release_live(&initiator);
        }
        let Some(metadata) = metadata else { return Ok(()) };
        out.push(Broadcast::SessionEnvelope { seq, envelope: Arc::new(env.clone()) });
        out.push(Broadcast::Lifecycle { event, session: Box::new(metadata), previous, observed_at_unix_ms: at });
        Ok(())
    }

    fn apply_registry(&mut self, seq: u64, at: i64, fact: &Fact, out: &mut Broadcasts) -> KResult<()> {
        if seq != self.registry_seq + 1 {
            return Err(corrupt(format!("registry record seq {seq} does not follow {}", self.registry_seq)));
        }
        let b = match fact {
            Fact::PolicyRegistered(d) => {
                // Admission (the current rule schemas) ran before the record
                // was built; a recorded registration is held only to what
                // evaluation needs, so a later schema tightening never stops
                // it from replaying (RFC-MACP-0012 §8 item 4).
                self.policies.check_stored(d)?;
                let mut d = d.clone();
                d.registered_at_unix_ms = at;
                self.policies.insert(d)?;
                Broadcast::PoliciesChanged
            }
            Fact::PolicyUnregistered(id) => {
                self.policies.check_unregister(id).map_err(KernelError::invalid)?;
                self.policies.remove(id);
                Broadcast::PoliciesChanged
            }
            Fact::ExtModeRegistered(d) => {
                self.modes.check_register(d).map_err(KernelError::invalid)?;
                self.modes.register(d.clone());
                Broadcast::ModesChanged
            }
            Fact::ExtModeUnregistered(m) => {
                self.modes.check_unregister(m).map_err(KernelError::invalid)?;
                self.modes.unregister(m);
                Broadcast::ModesChanged
            }
            Fact::ModePromoted(p) => {
                let target = self.modes.check_promote(&p.mode, &p.promoted_mode_name).map_err(KernelError::invalid)?;
                self.modes.promote(&p.mode, &target);
                Broadcast::ModesChanged
            }
            _ => return Err(corrupt("session fact on a registry record")),
        };
        self.registry_seq = seq;
        out.push(b);
        Ok(())
    }
}
