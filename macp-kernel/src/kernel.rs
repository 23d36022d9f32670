//! The kernel: one owner, `&mut self`, inputs in, effects out.
//!
//! Every accepted fact is first built as a storage [`Record`] and then
//! applied through [`Kernel::apply_record`] — the same function recovery
//! uses — so live processing and replay cannot drift apart. Checks that
//! depend on things outside the record (grants, duplicates, quotas, the
//! clock's skew) run before the record is built and are never replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use macp_wire::storage::{record::Fact, Record, SessionExpired, SessionStarted};
use macp_wire::v1::{
    Ack, Envelope, MacpError, ModeDescriptor, PolicyDescriptor, SessionCancelPayload, SessionMetadata,
    SessionResumePayload, SessionState, SessionSuspendPayload,
};
use prost::Message as _;

use crate::apply::Prepared;
use crate::config::{KernelConfig, PROTOCOL_VERSION};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::io::{Broadcast, ControlOp, Effect, Identity, Input, Reply, RequestId};
use crate::mode::ModeRegistry;
use crate::policy::PolicyRegistry;
use crate::session::Session;
use crate::validate;

/// The deterministic MACP session kernel.
#[derive(Debug)]
pub struct Kernel {
    pub(crate) config: KernelConfig,
    /// Boxed: a B-tree node holds 11 values inline, and a session is a few
    /// hundred bytes, so unboxed nodes waste a third of their space.
    pub(crate) sessions: BTreeMap<String, Box<Session>>,
    pub(crate) modes: ModeRegistry,
    pub(crate) policies: PolicyRegistry,
    /// (due time, session id) for every session with a pending timer.
    pub(crate) timers: BTreeSet<(i64, String)>,
    /// Live (OPEN or SUSPENDED) sessions per initiator, for `max_open_sessions`.
    pub(crate) live_by_initiator: BTreeMap<String, u32>,
    /// Sequence number of the last registry record.
    pub(crate) registry_seq: u64,
    /// Sessions that recovery could not rebuild (storage corruption left a
    /// gap in their history). They are refused, never silently restarted.
    pub(crate) quarantined: BTreeSet<String>,
}

/// What a successful [`Kernel::apply_record`] asks observers to hear.
pub(crate) type Applied = Vec<Broadcast>;

impl Kernel {
    /// A kernel with the built-in modes and `policy.default`.
    pub fn new(config: KernelConfig) -> Self {
        Kernel {
            config,
            sessions: BTreeMap::new(),
            modes: ModeRegistry::with_builtins(),
            policies: PolicyRegistry::default(),
            timers: BTreeSet::new(),
            live_by_initiator: BTreeMap::new(),
            registry_seq: 0,
            quarantined: BTreeSet::new(),
        }
    }

    /// Takes a session out of service after storage corruption: its state is
    /// dropped and every later message or SessionStart for its id gets
    /// INTERNAL_ERROR, so the damaged history is never extended or replaced.
    /// Called by recovery, which also reports the session to the operator.
    pub fn quarantine_session(&mut self, session_id: &str) {
        if let Some(s) = self.sessions.remove(session_id) {
            if let Some(t) = s.timer_at {
                self.timers.remove(&(t, session_id.to_string()));
            }
            if s.is_live() {
                if let Some(n) = self.live_by_initiator.get_mut(&s.initiator) {
                    *n = n.saturating_sub(1);
                }
                self.live_by_initiator.retain(|_, n| *n > 0);
            }
        }
        self.quarantined.insert(session_id.to_string());
    }

    /// Sessions taken out of service by [`Kernel::quarantine_session`].
    pub fn quarantined(&self) -> &BTreeSet<String> {
        &self.quarantined
    }

    fn check_quarantine(&self, session_id: &str) -> KResult<()> {
        if self.quarantined.contains(session_id) {
            return Err(KernelError::new(
                ErrorCode::InternalError,
                format!("session {session_id} is quarantined: its stored history is damaged (see the recovery report)"),
            ));
        }
        Ok(())
    }

    /// The configuration the kernel was built with.
    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// Processes one input and returns its effects in driver order.
    pub fn handle(&mut self, now_ms: i64, input: Input) -> Vec<Effect> {
        let mut out = Vec::with_capacity(4);
        self.handle_into(now_ms, input, &mut out);
        out
    }

    /// Like [`Kernel::handle`], appending to a caller-owned buffer so a
    /// driver processing a batch allocates once.
    pub fn handle_into(&mut self, now_ms: i64, input: Input, out: &mut Vec<Effect>) {
        match input {
            Input::Envelope { request, identity, envelope } => {
                self.on_envelope(now_ms, request, &identity, envelope, out)
            }
            Input::Control { request, identity, op, session_id, reason } => {
                self.on_control(now_ms, request, &identity, op, session_id, reason, out)
            }
            Input::RegisterPolicy { request, identity, descriptor } => {
                let r = self.on_register_policy(now_ms, &identity, descriptor, out);
                self.finish_registry(request, r, out)
            }
            Input::UnregisterPolicy { request, identity, policy_id } => {
                let r = self.on_unregister_policy(now_ms, &identity, policy_id, out);
                self.finish_registry(request, r, out)
            }
            Input::RegisterExtMode { request, identity, descriptor } => {
                let r = self.on_register_mode(now_ms, &identity, descriptor, out);
                self.finish_registry(request, r, out)
            }
            Input::UnregisterExtMode { request, identity, mode } => {
                let r = self.on_unregister_mode(now_ms, &identity, mode, out);
                self.finish_registry(request, r, out)
            }
            Input::PromoteMode { request, identity, mode, promoted_mode_name } => {
                let r = self.on_promote_mode(now_ms, &identity, mode, promoted_mode_name, out);
                self.finish_registry(request, r, out)
            }
            Input::Tick => self.on_tick(now_ms, out),
        }
    }

    /// When the driver must call again with [`Input::Tick`] (TTL expiry,
    /// suspension caps, mode timers), if ever.
    pub fn next_deadline(&self) -> Option<i64> {
        self.timers.first().map(|(t, _)| *t)
    }

    // ----- envelopes -------------------------------------------------------

    fn on_envelope(&mut self, now: i64, request: RequestId, identity: &Identity, env: Envelope, out: &mut Vec<Effect>) {
        if is_ambient(&env.message_type) {
            let (ack, accepted) = Kernel::admit_ambient(now, &self.config, identity, env);
            out.push(Effect::Reply { request, reply: Reply::Ack(ack) });
            if let Some(envelope) = accepted {
                out.push(Effect::Broadcast(Broadcast::Signal { envelope: Arc::new(envelope) }));
            }
            return;
        }
        let mut broadcasts = Vec::new();
        // The envelope moves into the record; the Ack keeps its own ids.
        let message_id = env.message_id.clone();
        let session_id = env.session_id.clone();
        let result = self.admit_envelope(now, identity, env, out, &mut broadcasts);
        let ack = match result {
            Ok((state, duplicate)) => Ack {
                ok: true,
                duplicate,
                message_id,
                session_id,
                accepted_at_unix_ms: now,
                session_state: state as i32,
                error: None,
            },
            Err(e) => error_ack(now, &session_id, &message_id, e),
        };
        out.push(Effect::Reply { request, reply: Reply::Ack(ack) });
        out.extend(broadcasts.into_iter().map(Effect::Broadcast));
    }

    /// Runs every check and, on success, persists and applies the record.
    /// Returns the state to report and whether it was a duplicate.
    fn admit_envelope(
        &mut self,
        now: i64,
        identity: &Identity,
        mut env: Envelope,
        out: &mut Vec<Effect>,
        broadcasts: &mut Vec<Broadcast>,
    ) -> KResult<(SessionState, bool)> {
        Self::admit_common(&self.config, identity, &mut env)?;
        self.check_quarantine(&env.session_id)?;
        if env.message_type == "SessionStart" {
            self.admit_start(now, identity, env, out, broadcasts)
        } else {
            self.admit_session_message(now, env, out, broadcasts)
        }
    }

    /// Ambient envelopes (Signal, Progress): admitted and answered as
    /// [`Kernel::handle`] does, but as a pure function of the configuration,
    /// the identity and the envelope. They touch no session and are never
    /// persisted, so a transport may run this on the request's own task and
    /// broadcast the returned envelope itself, instead of queueing ambient
    /// traffic behind session traffic. Returns the Ack and, if accepted, the
    /// canonical envelope (authenticated sender filled in) to broadcast.
    pub fn admit_ambient(
        now_ms: i64,
        config: &KernelConfig,
        identity: &Identity,
        mut env: Envelope,
    ) -> (Ack, Option<Envelope>) {
        let checked = Self::admit_common(config, identity, &mut env).and_then(|()| validate::ambient_payload(&env));
        match checked {
            Ok(()) => {
                let ack = Ack {
                    ok: true,
                    duplicate: false,
                    message_id: env.message_id.clone(),
                    session_id: env.session_id.clone(),
                    accepted_at_unix_ms: now_ms,
                    session_state: SessionState::Open as i32,
                    error: None,
                };
                (ack, Some(env))
            }
            Err(e) => (error_ack(now_ms, &env.session_id, &env.message_id, e), None),
        }
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
        if env.message_id.starts_with(&config.runtime_id) && env.message_id[config.runtime_id.len()..].starts_with(':')
        {
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
        &mut self,
        now: i64,
        identity: &Identity,
        env: Envelope,
        out: &mut Vec<Effect>,
        broadcasts: &mut Vec<Broadcast>,
    ) -> KResult<(SessionState, bool)> {
        validate::session_id(&env.session_id, self.config.session_id_policy)?;
        if let Some(s) = self.sessions.get(&env.session_id) {
            if s.seen.contains(&env.message_id) {
                return Ok((s.state, true));
            }
            return Err(KernelError::new(
                ErrorCode::SessionAlreadyExists,
                format!("session {} already exists; start a new session with a new session_id", env.session_id),
            ));
        }
        let (canonical, entry) = self.modes.resolve(&env.mode).ok_or_else(|| {
            KernelError::new(ErrorCode::ModeNotSupported, format!("mode '{}' is not registered", env.mode))
        })?;
        let canonical = canonical.to_string();
        let descriptor_version = entry.descriptor.mode_version.clone();
        let fields = validate::start_payload(&env, &self.config)?;
        let p = &fields.payload;
        if p.mode_version != descriptor_version {
            return Err(KernelError::new(
                ErrorCode::ModeNotSupported,
                format!("mode {} supports version '{descriptor_version}', not '{}'", canonical, p.mode_version),
            ));
        }
        if env.timestamp_unix_ms != 0 && (env.timestamp_unix_ms - now).abs() > self.config.max_start_skew_ms {
            return Err(KernelError::invalid(format!(
                "SessionStart timestamp_unix_ms is {} ms away from the runtime clock (limit {} ms); fix the client clock or send 0",
                (env.timestamp_unix_ms - now).abs(),
                self.config.max_start_skew_ms
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
        let policy = self.policies.resolve(&p.policy_version, &canonical)?;
        if let Some(max) = identity.grants.max_open_sessions {
            let live = self.live_by_initiator.get(&identity.sender).copied().unwrap_or(0);
            if live >= max {
                return Err(KernelError::new(
                    ErrorCode::RateLimited,
                    format!("{} already has {live} open sessions (limit {max})", identity.sender),
                ));
            }
        }
        let max_suspend_ms = if p.max_suspend_ms == 0 { self.config.default_max_suspend_ms } else { p.max_suspend_ms };
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
        let applied = self.apply_start_record(&record, true, Some(prepared))?;
        out.push(Effect::Persist(record));
        broadcasts.extend(applied);
        Ok((SessionState::Open, false))
    }

    fn admit_session_message(
        &mut self,
        now: i64,
        env: Envelope,
        out: &mut Vec<Effect>,
        broadcasts: &mut Vec<Broadcast>,
    ) -> KResult<(SessionState, bool)> {
        let s = self.sessions.get(&env.session_id).ok_or_else(|| {
            KernelError::new(ErrorCode::SessionNotFound, format!("session {} does not exist", env.session_id))
        })?;
        if s.seen.contains(&env.message_id) {
            return Ok((s.state, true));
        }
        let bound = self.modes.resolve(&env.mode).map(|(c, _)| c).unwrap_or(env.mode.as_str());
        if bound != s.mode {
            return Err(KernelError::invalid(format!(
                "session {} is bound to mode {}, not {}",
                env.session_id, s.mode, env.mode
            )));
        }
        if validate::RUNTIME_ONLY_TYPES.contains(&env.message_type.as_str()) {
            return Err(KernelError::forbidden(format!(
                "{} is emitted only by the runtime; use the {}Session RPC",
                env.message_type,
                env.message_type.trim_start_matches("Session")
            )));
        }
        // One lookup serves the common case; expiry and due mode timers
        // (rare) look the session up again after they changed it.
        let expiry_due = match s.state {
            SessionState::Open => now > s.deadline_ms,
            SessionState::Suspended => s.suspend_cap_deadline().is_some_and(|d| now > d),
            _ => false,
        };
        let timer_due = s.mode_state.next_deadline().is_some_and(|d| d <= now);
        let mut s = s;
        if expiry_due || timer_due {
            if self.expire_if_due(now, &env.session_id, out, broadcasts) {
                return Err(KernelError::new(
                    ErrorCode::SessionNotOpen,
                    format!("session {} expired before this message arrived", env.session_id),
                ));
            }
            // Timers that fell due before this message (e.g. an implicit
            // handoff accept) enter the history first, as if the tick had
            // come in time.
            if timer_due {
                self.fire_mode_timers(now, &env.session_id, out, broadcasts);
            }
            s = &self.sessions[&env.session_id];
        }
        if s.state != SessionState::Open {
            return Err(not_open(s));
        }
        let seq = s.seq + 1;
        let session_id = env.session_id.clone();
        let record = Record { session_id, seq, at_unix_ms: now, fact: Some(Fact::Accepted(env)) };
        let state = self.commit_record(record, out, broadcasts)?;
        Ok((state, false))
    }

    /// Applies a freshly built record and, if it applies, emits it for
    /// persistence. The record is persisted only when it applied, so a
    /// rejected message leaves neither state nor log behind. Returns the
    /// session's state afterwards (`Open` for registry records).
    pub(crate) fn commit_record(
        &mut self,
        record: Record,
        out: &mut Vec<Effect>,
        broadcasts: &mut Vec<Broadcast>,
    ) -> KResult<SessionState> {
        let applied = self.apply(&record, true)?;
        let state = self.sessions.get(&record.session_id).map_or(SessionState::Open, |s| s.state);
        out.push(Effect::Persist(record));
        broadcasts.extend(applied);
        Ok(state)
    }

    /// Expires the session if its TTL (OPEN) or suspension cap (SUSPENDED)
    /// has passed at `now`. Returns whether it expired now.
    fn expire_if_due(&mut self, now: i64, sid: &str, out: &mut Vec<Effect>, broadcasts: &mut Vec<Broadcast>) -> bool {
        let Some(s) = self.sessions.get(sid) else { return false };
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
        self.commit_record(record, out, broadcasts).is_ok()
    }

    // ----- control plane ---------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn on_control(
        &mut self,
        now: i64,
        request: RequestId,
        identity: &Identity,
        op: ControlOp,
        session_id: String,
        reason: String,
        out: &mut Vec<Effect>,
    ) {
        let mut broadcasts = Vec::new();
        let result = self.admit_control(now, identity, op, &session_id, reason, out, &mut broadcasts);
        let ack = match result {
            Ok(state) => Ack {
                ok: true,
                duplicate: false,
                message_id: String::new(),
                session_id: session_id.clone(),
                accepted_at_unix_ms: now,
                session_state: state as i32,
                error: None,
            },
            Err(e) => error_ack(now, &session_id, "", e),
        };
        out.push(Effect::Reply { request, reply: Reply::Ack(ack) });
        out.extend(broadcasts.into_iter().map(Effect::Broadcast));
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_control(
        &mut self,
        now: i64,
        identity: &Identity,
        op: ControlOp,
        sid: &str,
        reason: String,
        out: &mut Vec<Effect>,
        broadcasts: &mut Vec<Broadcast>,
    ) -> KResult<SessionState> {
        let s = self
            .sessions
            .get(sid)
            .ok_or_else(|| KernelError::new(ErrorCode::SessionNotFound, format!("session {sid} does not exist")))?;
        let who = identity.sender.as_str();
        if who == self.config.runtime_id {
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
        let expired_now = self.expire_if_due(now, sid, out, broadcasts);
        let s = &self.sessions[sid];
        let (message_type, payload, fact): (&str, Vec<u8>, fn(Envelope) -> Fact) = match op {
            ControlOp::Cancel => {
                if s.is_terminal() {
                    return Ok(s.state);
                }
                let p = SessionCancelPayload { reason, cancelled_by: who.to_string() };
                ("SessionCancel", p.encode_to_vec(), Fact::Cancelled)
            }
            ControlOp::Suspend => {
                if s.state != SessionState::Open {
                    return Err(not_open(s));
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
                    return Err(not_open(s));
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
            message_id: format!("{}:{message_type}:{seq}", self.config.runtime_id),
            session_id: sid.to_string(),
            sender: who.to_string(),
            timestamp_unix_ms: now,
            payload,
        };
        let record = Record { session_id: sid.to_string(), seq, at_unix_ms: now, fact: Some(fact(env)) };
        self.commit_record(record, out, broadcasts)?;
        Ok(self.sessions[sid].state)
    }

    // ----- registries ------------------------------------------------------

    fn require_registry_admin(identity: &Identity) -> KResult<()> {
        if identity.grants.can_manage_mode_registry {
            Ok(())
        } else {
            Err(KernelError::forbidden(format!("{} may not change the mode or policy registry", identity.sender)))
        }
    }

    fn registry_record(&self, now: i64, fact: Fact) -> Record {
        Record { session_id: String::new(), seq: self.registry_seq + 1, at_unix_ms: now, fact: Some(fact) }
    }

    fn on_register_policy(
        &mut self,
        now: i64,
        identity: &Identity,
        mut d: PolicyDescriptor,
        out: &mut Vec<Effect>,
    ) -> KResult<(String, Applied)> {
        Self::require_registry_admin(identity)?;
        self.policies.admit(&d, &self.modes)?;
        d.registered_at_unix_ms = now;
        let id = d.policy_id.clone();
        let record = self.registry_record(now, Fact::PolicyRegistered(d));
        let mut b = Vec::new();
        self.commit_record(record, out, &mut b)?;
        Ok((id, b))
    }

    fn on_unregister_policy(
        &mut self,
        now: i64,
        identity: &Identity,
        id: String,
        out: &mut Vec<Effect>,
    ) -> KResult<(String, Applied)> {
        Self::require_registry_admin(identity)?;
        let record = self.registry_record(now, Fact::PolicyUnregistered(id.clone()));
        let mut b = Vec::new();
        self.commit_record(record, out, &mut b)?;
        Ok((id, b))
    }

    fn on_register_mode(
        &mut self,
        now: i64,
        identity: &Identity,
        d: ModeDescriptor,
        out: &mut Vec<Effect>,
    ) -> KResult<(String, Applied)> {
        Self::require_registry_admin(identity)?;
        let id = d.mode.clone();
        let record = self.registry_record(now, Fact::ExtModeRegistered(d));
        let mut b = Vec::new();
        self.commit_record(record, out, &mut b)?;
        Ok((id, b))
    }

    fn on_unregister_mode(
        &mut self,
        now: i64,
        identity: &Identity,
        mode: String,
        out: &mut Vec<Effect>,
    ) -> KResult<(String, Applied)> {
        Self::require_registry_admin(identity)?;
        let record = self.registry_record(now, Fact::ExtModeUnregistered(mode.clone()));
        let mut b = Vec::new();
        self.commit_record(record, out, &mut b)?;
        Ok((mode, b))
    }

    fn on_promote_mode(
        &mut self,
        now: i64,
        identity: &Identity,
        mode: String,
        new_name: String,
        out: &mut Vec<Effect>,
    ) -> KResult<(String, Applied)> {
        Self::require_registry_admin(identity)?;
        let target = self.modes.check_promote(&mode, &new_name).map_err(KernelError::invalid)?;
        let record = self.registry_record(
            now,
            Fact::ModePromoted(macp_wire::storage::ModePromoted { mode, promoted_mode_name: new_name }),
        );
        let mut b = Vec::new();
        self.commit_record(record, out, &mut b)?;
        Ok((target, b))
    }

    fn finish_registry(&mut self, request: RequestId, r: KResult<(String, Applied)>, out: &mut Vec<Effect>) {
        match r {
            Ok((id, broadcasts)) => {
                out.push(Effect::Reply { request, reply: Reply::Registry(Ok(id)) });
                out.extend(broadcasts.into_iter().map(Effect::Broadcast));
            }
            Err(e) => out.push(Effect::Reply { request, reply: Reply::Registry(Err(e)) }),
        }
    }

    // ----- time ------------------------------------------------------------

    fn on_tick(&mut self, now: i64, out: &mut Vec<Effect>) {
        let due: Vec<String> = self.timers.iter().take_while(|(t, _)| *t <= now).map(|(_, s)| s.clone()).collect();
        let mut broadcasts = Vec::new();
        for sid in due {
            if self.expire_if_due(now, &sid, out, &mut broadcasts) {
                continue;
            }
            self.fire_mode_timers(now, &sid, out, &mut broadcasts);
        }
        out.extend(broadcasts.into_iter().map(Effect::Broadcast));
    }

    fn fire_mode_timers(&mut self, now: i64, sid: &str, out: &mut Vec<Effect>, broadcasts: &mut Vec<Broadcast>) {
        let Some(s) = self.sessions.get(sid) else { return };
        if s.state != SessionState::Open {
            return;
        }
        let due = s.mode_state.next_deadline().is_some_and(|d| d <= now);
        let messages = if due { s.mode_state.on_timer(s.view(), now) } else { Vec::new() };
        for m in messages {
            let s = &self.sessions[sid];
            if s.seen.contains(&m.message_id) || s.state != SessionState::Open {
                continue;
            }
            let env = Envelope {
                macp_version: PROTOCOL_VERSION.to_string(),
                mode: s.mode.clone(),
                message_type: m.message_type,
                message_id: m.message_id,
                session_id: sid.to_string(),
                sender: self.config.runtime_id.clone(),
                timestamp_unix_ms: now,
                payload: m.payload,
            };
            let record = Record {
                session_id: sid.to_string(),
                seq: s.seq + 1,
                at_unix_ms: now,
                fact: Some(Fact::Accepted(env)),
            };
            // A mode that proposes a message it then refuses is a mode bug;
            // dropping it keeps the kernel live and the history consistent.
            let _ = self.commit_record(record, out, broadcasts);
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            if s.mode_state.next_deadline().is_some_and(|d| d <= now) {
                s.mode_timer_floor = now;
            }
        }
        self.refresh_timer(sid);
    }

    /// Re-indexes a session's timer after any change.
    pub(crate) fn refresh_timer(&mut self, sid: &str) {
        if let Some(s) = self.sessions.get_mut(sid) {
            reindex_timer(&mut self.timers, s);
        }
    }

    // ----- queries (read-only) ---------------------------------------------

    /// A session, if it exists.
    pub fn session(&self, session_id: &str) -> Option<&Session> {
        self.sessions.get(session_id).map(|s| &**s)
    }

    /// GetSession with its access rule: initiator, declared participant or
    /// observer. Errors carry SESSION_NOT_FOUND or FORBIDDEN.
    pub fn get_session(&self, identity: &Identity, session_id: &str) -> KResult<SessionMetadata> {
        let s = self.sessions.get(session_id).ok_or_else(|| {
            KernelError::new(ErrorCode::SessionNotFound, format!("session {session_id} does not exist"))
        })?;
        if !s.can_read(&identity.sender) && !identity.grants.is_observer {
            return Err(KernelError::forbidden(format!(
                "{} is neither a participant nor an observer of session {session_id}",
                identity.sender
            )));
        }
        Ok(s.metadata())
    }

    /// Number of sessions held (any state).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// ListSessions, paged in session-id order, limited to sessions the
    /// caller may read (initiator, participant, or any for observers), so a
    /// listing never reveals other tenants' sessions. `page_token` is the opaque
    /// token of the previous page (empty for the first); a malformed token
    /// is INVALID_REQUEST (the adapter maps it to INVALID_ARGUMENT).
    pub fn list_sessions(
        &self,
        identity: &Identity,
        page_size: i32,
        page_token: &str,
    ) -> KResult<(Vec<SessionMetadata>, String)> {
        const DEFAULT: usize = 100;
        const MAX: usize = 1000;
        let size = if page_size <= 0 { DEFAULT } else { (page_size as usize).min(MAX) };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_token(page_token).ok_or_else(|| {
                KernelError::new(
                    ErrorCode::InvalidRequest,
                    "page_token is not a token this runtime issued; start again with an empty page_token",
                )
            })?)
        };
        let iter: Box<dyn Iterator<Item = (&String, &Session)>> = match &after {
            None => Box::new(self.sessions.iter().map(|(k, s)| (k, &**s))),
            Some(a) => Box::new(
                self.sessions
                    .range::<String, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(k, s)| (k, &**s)),
            ),
        };
        let page: Vec<&Session> = iter
            .map(|(_, s)| s)
            .filter(|s| identity.grants.is_observer || s.can_read(&identity.sender))
            .take(size + 1)
            .collect();
        let more = page.len() > size;
        let items: Vec<SessionMetadata> = page.iter().take(size).map(|s| s.metadata()).collect();
        let next = if more {
            encode_token(&items.last().map(|m| m.session_id.clone()).unwrap_or_default())
        } else {
            String::new()
        };
        Ok((items, next))
    }

    /// Every session's metadata in id order (WatchSessions initial sync).
    pub fn all_sessions(&self) -> impl Iterator<Item = SessionMetadata> + '_ {
        self.sessions.values().map(|s| s.metadata())
    }

    /// The mode registry (ListModes, ListExtModes, Initialize).
    pub fn modes(&self) -> &ModeRegistry {
        &self.modes
    }

    /// The policy registry (GetPolicy, ListPolicies, WatchPolicies).
    pub fn policies(&self) -> &PolicyRegistry {
        &self.policies
    }

    /// The mode state projection of a session (conformance, debugging).
    pub fn mode_projection(&self, session_id: &str) -> Option<serde_json::Value> {
        self.sessions.get(session_id).map(|s| s.mode_state.project())
    }

    /// The resolving Commitment's payload bytes, once resolved.
    pub fn resolution(&self, session_id: &str) -> Option<&[u8]> {
        self.sessions.get(session_id).and_then(|s| s.resolution.as_deref())
    }
}

fn encode_token(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(t: &str) -> Option<String> {
    if t.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..t.len()).step_by(2).map(|i| t.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}

/// SESSION_NOT_OPEN with the state in the message.
/// Moves `s` to the right place in the timer index after a change; a free
/// function so callers already holding `&mut Session` need no second lookup.
pub(crate) fn reindex_timer(timers: &mut BTreeSet<(i64, String)>, s: &mut Session) {
    let next = s.next_timer();
    if next == s.timer_at {
        return; // the common case: an accepted message moves no deadline
    }
    if let Some(old) = s.timer_at.take() {
        timers.remove(&(old, s.id.clone()));
    }
    if let Some(t) = next {
        s.timer_at = Some(t);
        timers.insert((t, s.id.clone()));
    }
}

/// Whether an envelope of this type is ambient (Signal, Progress): outside
/// any session's history, never persisted, only broadcast.
pub fn is_ambient(message_type: &str) -> bool {
    matches!(message_type, "Signal" | "Progress")
}

pub(crate) fn not_open(s: &Session) -> KernelError {
    KernelError::new(
        ErrorCode::SessionNotOpen,
        format!("session {} is {}", s.id, s.state.as_str_name().trim_start_matches("SESSION_STATE_")),
    )
}

/// The Ack for a rejection: `ok=false`, state UNSPECIFIED, error filled.
pub fn error_ack(now: i64, session_id: &str, message_id: &str, e: KernelError) -> Ack {
    Ack {
        ok: false,
        duplicate: false,
        message_id: message_id.to_string(),
        session_id: session_id.to_string(),
        accepted_at_unix_ms: now,
        session_state: SessionState::Unspecified as i32,
        error: Some(MacpError {
            code: e.code.as_str().to_string(),
            message: e.message,
            session_id: session_id.to_string(),
            message_id: message_id.to_string(),
            details: e.details,
        }),
    }
}
