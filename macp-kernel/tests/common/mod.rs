//! Shared builders for kernel tests: a harness that drives one kernel with a
//! manual clock and builds envelopes for the default session of DIGEST §9
//! (initiator `I`, participants `[I, A, B]`, ttl 60 000, `1.0.0`, `cfg-1`).
#![allow(dead_code)]

use macp_kernel::macp_wire::v1::{Ack, CommitmentPayload, Envelope, SessionStartPayload, SessionState};
use macp_kernel::macp_wire::Message;
use macp_kernel::{Effect, Identity, Input, Kernel, KernelConfig, Reply};

pub const T0: i64 = 1_700_000_000_000;
pub const DECISION: &str = "macp.mode.decision.v1";

/// A kernel plus a clock and a request counter.
pub struct H {
    pub k: Kernel,
    pub now: i64,
    next_req: u64,
    counter: u64,
    /// Every effect ever produced, in order.
    pub log: Vec<Effect>,
}

impl H {
    pub fn new() -> Self {
        Self::with(KernelConfig::default())
    }

    pub fn with(cfg: KernelConfig) -> Self {
        H { k: Kernel::new(cfg), now: T0, next_req: 0, counter: 0, log: Vec::new() }
    }

    /// A fresh strict-format session id (deterministic UUIDv4 shape).
    pub fn sid(&mut self) -> String {
        self.counter += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.counter)
    }

    /// A fresh message id.
    pub fn mid(&mut self) -> String {
        self.counter += 1;
        format!("m{}", self.counter)
    }

    pub fn run(&mut self, input: Input) -> Vec<Effect> {
        let e = self.k.handle(self.now, input);
        self.log.extend(e.iter().cloned());
        e
    }

    /// Sends an envelope as `who` (full grants) and returns the Ack.
    pub fn send_as(&mut self, identity: Identity, envelope: Envelope) -> Ack {
        self.next_req += 1;
        let request = self.next_req;
        let (sid, mid) = (envelope.session_id.clone(), envelope.message_id.clone());
        let effects = self.run(Input::Envelope { request, identity, envelope });
        Ack { session_id: sid, message_id: mid, ..ack_of(&effects, request) }
    }

    pub fn send(&mut self, who: &str, envelope: Envelope) -> Ack {
        self.send_as(Identity::new(who), envelope)
    }

    pub fn control(&mut self, who: &str, op: macp_kernel::ControlOp, sid: &str) -> Ack {
        self.next_req += 1;
        let request = self.next_req;
        let effects = self.run(Input::Control {
            request,
            identity: Identity::new(who),
            op,
            session_id: sid.to_string(),
            reason: "test".into(),
        });
        ack_of(&effects, request)
    }

    pub fn tick(&mut self) -> Vec<Effect> {
        self.run(Input::Tick)
    }

    /// Starts the default decision session; returns its id.
    pub fn start_default(&mut self) -> String {
        let sid = self.sid();
        let env = start_env(&sid, DECISION, "I", &default_start());
        let ack = self.send("I", env);
        assert!(ack.ok, "default start rejected: {:?}", ack.error);
        sid
    }

    /// Sends a session message of the default session's mode.
    pub fn msg(&mut self, who: &str, sid: &str, message_type: &str, payload: Vec<u8>) -> Ack {
        let mid = self.mid();
        self.send(who, env(sid, DECISION, message_type, &mid, who, payload))
    }

    pub fn state(&self, sid: &str) -> SessionState {
        self.k.session_state(sid).expect("session")
    }
}

/// The reply to `request`, as the wire `Ack` a client would see (ids left
/// empty: tests know which request they sent).
pub fn ack_of(effects: &[Effect], request: u64) -> Ack {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { request: r, reply } if *r == request => Some(to_ack(reply)),
            _ => None,
        })
        .expect("a reply for the request")
}

/// A typed session reply as an `Ack`.
pub fn to_ack(reply: &Reply) -> Ack {
    match reply {
        Reply::Session { at_unix_ms, result: Ok(a) } => Ack {
            ok: true,
            duplicate: a.duplicate,
            accepted_at_unix_ms: *at_unix_ms,
            session_state: a.state as i32,
            ..Default::default()
        },
        Reply::Session { at_unix_ms, result: Err(e) } => Ack {
            ok: false,
            accepted_at_unix_ms: *at_unix_ms,
            error: Some(macp_kernel::macp_wire::v1::MacpError {
                code: e.code.as_str().to_string(),
                message: e.message.clone(),
                details: e.details.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Reply::Registry(r) => panic!("expected a session reply, got a registry reply {r:?}"),
    }
}

pub fn code(ack: &Ack) -> &str {
    ack.error.as_ref().map(|e| e.code.as_str()).unwrap_or("")
}

pub fn default_start() -> SessionStartPayload {
    SessionStartPayload {
        intent: "test".into(),
        participants: vec!["I".into(), "A".into(), "B".into()],
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        policy_version: String::new(),
        ttl_ms: 60_000,
        ..Default::default()
    }
}

pub fn env(sid: &str, mode: &str, message_type: &str, mid: &str, sender: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        macp_version: "1.0".into(),
        mode: mode.into(),
        message_type: message_type.into(),
        message_id: mid.into(),
        session_id: sid.into(),
        sender: sender.into(),
        timestamp_unix_ms: 0,
        payload,
    }
}

pub fn start_env(sid: &str, mode: &str, sender: &str, p: &SessionStartPayload) -> Envelope {
    // Timestamp 0: the deadline is counted from acceptance time.
    env(sid, mode, "SessionStart", &format!("start-{sid}"), sender, p.encode_to_vec())
}

pub fn commitment(action: &str, positive: bool) -> CommitmentPayload {
    CommitmentPayload {
        commitment_id: "c1".into(),
        action: action.into(),
        authority_scope: "test".into(),
        reason: "because".into(),
        mode_version: "1.0.0".into(),
        policy_version: String::new(),
        configuration_version: "cfg-1".into(),
        outcome_positive: positive,
        supersedes: None,
    }
}

// ----- additions for the mode tests (decision, proposal, …) -----------------

pub const PROPOSAL: &str = "macp.mode.proposal.v1";

/// A SessionStart payload with the default versions and ttl, for any
/// participant list and policy.
pub fn start_payload(participants: &[&str], policy_version: &str) -> SessionStartPayload {
    SessionStartPayload {
        participants: participants.iter().map(|p| p.to_string()).collect(),
        policy_version: policy_version.into(),
        ..default_start()
    }
}

impl H {
    /// Starts a session of `mode` and returns its id with the Ack (not
    /// asserted, so tests can check rejections).
    pub fn start_session(&mut self, mode: &str, initiator: &str, participants: &[&str], policy: &str) -> (String, Ack) {
        let sid = self.sid();
        let ack = self.send(initiator, start_env(&sid, mode, initiator, &start_payload(participants, policy)));
        (sid, ack)
    }

    /// Like [`H::start_session`], asserting success.
    pub fn start_ok(&mut self, mode: &str, initiator: &str, participants: &[&str], policy: &str) -> String {
        let (sid, ack) = self.start_session(mode, initiator, participants, policy);
        assert!(ack.ok, "start rejected: {:?}", ack.error);
        sid
    }

    /// Sends a session message of `mode` with a fresh message id.
    pub fn msg_in(&mut self, mode: &str, who: &str, sid: &str, message_type: &str, payload: Vec<u8>) -> Ack {
        let mid = self.mid();
        self.send(who, env(sid, mode, message_type, &mid, who, payload))
    }

    /// Sends a Commitment of `mode`.
    pub fn commit_in(&mut self, mode: &str, who: &str, sid: &str, c: &CommitmentPayload) -> Ack {
        self.msg_in(mode, who, sid, "Commitment", c.encode_to_vec())
    }

    /// RegisterPolicy as an admin; `rules` is JSON text.
    pub fn register_policy(
        &mut self,
        id: &str,
        mode: &str,
        schema_version: u32,
        rules: &str,
    ) -> Result<String, macp_kernel::KernelError> {
        self.register_policy_descriptor(macp_kernel::macp_wire::v1::PolicyDescriptor {
            policy_id: id.into(),
            mode: mode.into(),
            description: "test policy".into(),
            rules: rules.into(),
            schema_version,
            registered_at_unix_ms: 0,
        })
    }

    /// RegisterPolicy of a whole descriptor as an admin.
    pub fn register_policy_descriptor(
        &mut self,
        descriptor: macp_kernel::macp_wire::v1::PolicyDescriptor,
    ) -> Result<String, macp_kernel::KernelError> {
        self.next_req += 1;
        let request = self.next_req;
        let effects = self.run(Input::RegisterPolicy { request, identity: Identity::new("admin"), descriptor });
        registry_reply(&effects, request)
    }

    /// Applies a policy registration as if it had been recorded by an
    /// earlier runtime whose admission rules were looser (the replay path):
    /// the descriptor bypasses today's RegisterPolicy admission, exactly like
    /// a registration read back from an old log. The record joins the log,
    /// so [`H::assert_replay_matches`] replays it too.
    pub fn register_stored(
        &mut self,
        id: &str,
        mode: &str,
        schema_version: u32,
        rules: &str,
    ) -> Result<(), macp_kernel::KernelError> {
        use macp_kernel::macp_wire::storage::{record::Fact, Record};
        let seq = self.records().iter().filter(|r| r.session_id.is_empty()).count() as u64 + 1;
        let record = Record {
            session_id: String::new(),
            seq,
            at_unix_ms: self.now,
            fact: Some(Fact::PolicyRegistered(macp_kernel::macp_wire::v1::PolicyDescriptor {
                policy_id: id.into(),
                mode: mode.into(),
                description: String::new(),
                rules: rules.into(),
                schema_version,
                registered_at_unix_ms: self.now,
            })),
        };
        self.k.apply_record(&record)?;
        self.log.push(Effect::Persist(record));
        Ok(())
    }

    /// UnregisterPolicy as an admin.
    pub fn unregister_policy(&mut self, id: &str) -> Result<String, macp_kernel::KernelError> {
        self.next_req += 1;
        let request = self.next_req;
        let effects =
            self.run(Input::UnregisterPolicy { request, identity: Identity::new("admin"), policy_id: id.into() });
        registry_reply(&effects, request)
    }

    /// Every record the kernel asked to persist, in order.
    pub fn records(&self) -> Vec<macp_kernel::macp_wire::storage::Record> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Effect::Persist(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// The mode projection of a session.
    pub fn projection(&self, sid: &str) -> serde_json::Value {
        self.k.mode_projection(sid).expect("session")
    }
}

pub fn registry_reply(effects: &[Effect], request: u64) -> Result<String, macp_kernel::KernelError> {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { request: r, reply: Reply::Registry(res) } if *r == request => Some(res.clone()),
            _ => None,
        })
        .expect("a registry reply for the request")
}

/// Asserts that `expected` is a subset of `actual` (objects: every key of
/// `expected` present and matching; arrays: same length, element-wise
/// subsets; anything else: equal), the way the
/// conformance vectors compare `expected_mode_state`.
pub fn assert_subset(actual: &serde_json::Value, expected: &serde_json::Value) {
    fn walk(a: &serde_json::Value, e: &serde_json::Value, path: &str) {
        match (a, e) {
            (serde_json::Value::Object(a), serde_json::Value::Object(e)) => {
                for (k, ev) in e {
                    let av = a.get(k).unwrap_or_else(|| panic!("{path}.{k} is missing"));
                    walk(av, ev, &format!("{path}.{k}"));
                }
            }
            (serde_json::Value::Array(a), serde_json::Value::Array(e)) => {
                assert_eq!(a.len(), e.len(), "length mismatch at {path}");
                for (i, (av, ev)) in a.iter().zip(e).enumerate() {
                    walk(av, ev, &format!("{path}[{i}]"));
                }
            }
            _ => assert_eq!(a, e, "mismatch at {path}"),
        }
    }
    walk(actual, expected, "$")
}

// ----- helpers for the non-decision modes (task, handoff, quorum, multi_round)

impl H {
    /// Sends a SessionStart for `mode` from `initiator` with `participants`
    /// and `policy_version`; returns the new session id and the Ack.
    pub fn try_start(
        &mut self,
        mode: &str,
        initiator: &str,
        participants: &[&str],
        policy_version: &str,
    ) -> (String, Ack) {
        let sid = self.sid();
        let mut p = default_start();
        p.participants = participants.iter().map(|s| s.to_string()).collect();
        p.policy_version = policy_version.to_string();
        let mut e = start_env(&sid, mode, initiator, &p);
        e.timestamp_unix_ms = self.now;
        let ack = self.send(initiator, e);
        (sid, ack)
    }

    /// Like [`H::try_start`] but asserts the start was accepted.
    pub fn start_mode(&mut self, mode: &str, initiator: &str, participants: &[&str], policy_version: &str) -> String {
        let (sid, ack) = self.try_start(mode, initiator, participants, policy_version);
        assert!(ack.ok, "start of {mode} rejected: {:?}", ack.error);
        sid
    }

    /// Sends a session message of `mode` as `who` with a fresh message id.
    pub fn send_mode(&mut self, who: &str, sid: &str, mode: &str, message_type: &str, payload: Vec<u8>) -> Ack {
        self.msg_in(mode, who, sid, message_type, payload)
    }

    /// Sends a Commitment with `action`/`outcome_positive` as `who`.
    pub fn commit_mode(&mut self, who: &str, sid: &str, mode: &str, action: &str, positive: bool) -> Ack {
        let mut c = commitment(action, positive);
        c.commitment_id = self.mid();
        self.send_mode(who, sid, mode, "Commitment", c.encode_to_vec())
    }

    /// Registers a policy for `mode` with `rules` (schema version 1).
    pub fn register_rules(
        &mut self,
        policy_id: &str,
        mode: &str,
        rules: serde_json::Value,
    ) -> Result<String, macp_kernel::KernelError> {
        self.register_policy(policy_id, mode, 1, &rules.to_string())
    }

    /// Replays every persisted record into a fresh default kernel, and
    /// restores a checkpoint of the live one, and checks that both reach
    /// byte-for-byte the same snapshot and the same timers.
    pub fn assert_replay_matches(&self) {
        let mut fresh = Kernel::new(KernelConfig::default());
        for r in self.records() {
            if let Err(e) = fresh.apply_record(&r) {
                panic!("replay of record {r:?} failed: {e}");
            }
        }
        let live = self.k.snapshot();
        assert!(fresh.snapshot() == live, "replayed kernel differs from the live one");
        assert_eq!(fresh.next_deadline(), self.k.next_deadline(), "replayed kernel has other timers");
        // A checkpoint of the live kernel restores to the same state too
        // (exercises every mode's snapshot/restore pair).
        let restored = Kernel::restore(KernelConfig::default(), &live).expect("checkpoint restores");
        assert!(restored.snapshot() == live, "restored checkpoint differs from the live kernel");
        assert_eq!(restored.next_deadline(), self.k.next_deadline(), "restored kernel has other timers");
    }
}

impl H {
    /// [`H::send_mode`] that also checks the rejection contract: a rejected
    /// message leaves the whole kernel byte-for-byte unchanged, except for
    /// SESSION_NOT_OPEN, which may be the message that noticed TTL expiry.
    pub fn send_mode_checked(&mut self, who: &str, sid: &str, mode: &str, message_type: &str, payload: Vec<u8>) -> Ack {
        let before = self.k.snapshot();
        let ack = self.send_mode(who, sid, mode, message_type, payload);
        if !ack.ok && code(&ack) != "SESSION_NOT_OPEN" {
            assert!(
                self.k.snapshot() == before,
                "rejected {message_type} from {who} changed the kernel: {:?}",
                ack.error
            );
        }
        ack
    }

    /// [`H::commit_mode`] with the same rejection check as
    /// [`H::send_mode_checked`].
    pub fn commit_mode_checked(&mut self, who: &str, sid: &str, mode: &str, action: &str, positive: bool) -> Ack {
        let before = self.k.snapshot();
        let ack = self.commit_mode(who, sid, mode, action, positive);
        if !ack.ok && code(&ack) != "SESSION_NOT_OPEN" {
            assert!(self.k.snapshot() == before, "rejected Commitment from {who} changed the kernel: {:?}", ack.error);
        }
        ack
    }
}
