//! The starting kernel of the kernel targets: one started session per
//! conformance vector, plus a few sessions the vectors do not cover (a
//! handoff with implicit accepts, a quorum with a threshold policy, a
//! dynamically registered extension mode).
//!
//! Why: an envelope mutated from a vector's step keeps its session id, so it
//! reaches a live session of the right mode and is judged by the mode's
//! rules, which is where the interesting code is. Building the kernel once
//! and restoring it from its snapshot for every input keeps each run
//! independent at a cost of microseconds.

use std::path::PathBuf;
use std::sync::OnceLock;

use macp_kernel::macp_wire::conformance::{self, Vector};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::v1::{Envelope, ModeDescriptor, PolicyDescriptor, SessionStartPayload};
use macp_kernel::{Effect, Identity, Input, Kernel, KernelConfig, Reply};
use prost::Message as _;

/// The kernel clock at which the base sessions start.
pub const T0: i64 = 1_700_000_000_000;

/// The identity that registers policies and modes in the base kernel.
pub const ADMIN: &str = "agent://fuzz-admin";

/// The extension mode the base registers (a passthrough mode).
pub const EXT_MODE: &str = "ext.fuzz.notes.v1";

/// One started session of the base kernel.
#[derive(Clone, Debug)]
pub struct BaseSession {
    /// Where it comes from: a vector file name, or `extra:<what>`.
    pub origin: String,
    /// Its session id.
    pub session_id: String,
    /// Its mode, as sent in its SessionStart.
    pub mode: String,
    /// Its initiator.
    pub initiator: String,
    /// Its declared participants.
    pub participants: Vec<String>,
    /// The SessionStart envelope that opened it.
    pub start: Envelope,
    /// The vector's scripted messages as envelopes for this session (empty
    /// for the extra sessions): the seed corpus of the envelope target.
    pub steps: Vec<Envelope>,
}

/// The base kernel, built once per process.
#[derive(Debug)]
pub struct Base {
    /// [`Kernel::snapshot`] of the base kernel.
    pub snapshot: Vec<u8>,
    /// The records that built it, in order.
    pub records: Vec<Record>,
    /// Its sessions.
    pub sessions: Vec<BaseSession>,
    /// Every agent name that appears in the vectors and the extra sessions.
    pub agents: Vec<String>,
    /// The kernel clock after the base was built: where runs start.
    pub now_ms: i64,
}

/// The kernel configuration every target uses: the defaults (strict session
/// ids, 1 MiB payloads).
pub fn config() -> KernelConfig {
    KernelConfig::default()
}

/// The base, built on first use.
pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(build)
}

/// A fresh kernel in the base state.
pub fn kernel() -> Kernel {
    Kernel::restore(config(), &base().snapshot).expect("the base snapshot restores")
}

/// The conformance vectors directory of this checkout.
pub fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors")
}

/// Every conformance vector, by file name. Panics on a broken vector file:
/// the kernel's own tests would be failing too.
pub fn vectors() -> Vec<(String, Vector)> {
    conformance::load_dir(&vectors_dir())
        .expect("the conformance vectors directory lists")
        .into_iter()
        .map(|f| (f.name.clone(), f.vector.unwrap_or_else(|e| panic!("{}: {e}", f.name))))
        .collect()
}

/// The deterministic session id of base session `n`.
pub fn session_id(n: u64) -> String {
    conformance::uuid_v4_shape(0xf022, n)
}

struct Builder {
    kernel: Kernel,
    now: i64,
    request: u64,
    records: Vec<Record>,
}

impl Builder {
    fn run(&mut self, input: Input) -> Reply {
        self.request += 1;
        let effects = self.kernel.handle(self.now, input);
        self.now += 1;
        let mut reply = None;
        for e in effects {
            match e {
                Effect::Persist(r) => self.records.push(r),
                Effect::Reply { reply: r, .. } => reply = Some(r),
                Effect::Broadcast(_) | Effect::Ended(_) => {}
            }
        }
        reply.expect("every request gets a reply")
    }

    fn register_policy(&mut self, d: PolicyDescriptor) {
        let request = self.request;
        match self.run(Input::RegisterPolicy { request, identity: Identity::new(ADMIN), descriptor: d.clone() }) {
            Reply::Registry(Ok(_)) => {}
            other => panic!("base policy {} refused: {other:?}", d.policy_id),
        }
    }

    fn start(&mut self, env: &Envelope) {
        let request = self.request;
        let identity = Identity::new(env.sender.clone());
        match self.run(Input::Envelope { request, identity, envelope: env.clone() }) {
            Reply::Session { result: Ok(_), .. } => {}
            other => panic!("base session {} refused: {other:?}", env.session_id),
        }
    }
}

fn build() -> Base {
    let mut b = Builder { kernel: Kernel::new(config()), now: T0, request: 0, records: Vec::new() };
    let mut sessions = Vec::new();
    let mut agents = std::collections::BTreeSet::new();
    let mut n = 0;
    for (name, v) in vectors() {
        if let Some(p) = &v.policy {
            b.register_policy(conformance::policy_descriptor(p).expect("vector policy"));
        }
        n += 1;
        let sid = session_id(n);
        let start = conformance::start_envelope(&v, &sid, &format!("{sid}-start"), b.now);
        b.start(&start);
        let steps = v
            .messages
            .iter()
            .enumerate()
            .map(|(i, s)| conformance::step_envelope(&v, s, &sid, &format!("{sid}-m{i}"), 0).expect("vector step"))
            .collect();
        agents.extend(v.participants.iter().cloned());
        agents.extend(v.messages.iter().map(|m| m.sender.clone()));
        sessions.push(BaseSession {
            origin: name,
            session_id: sid,
            mode: v.mode.clone(),
            initiator: v.initiator.clone(),
            participants: v.participants.clone(),
            start,
            steps,
        });
    }

    // Extras: timers (implicit handoff accept), a threshold policy, and an
    // extension mode, none of which the vectors reach.
    b.register_policy(policy(
        "policy.fuzz.handoff-implicit",
        "macp.mode.handoff.v1",
        1,
        r#"{"acceptance":{"implicit_accept_timeout_ms":50}}"#,
    ));
    b.register_policy(policy(
        "policy.fuzz.quorum-two",
        "macp.mode.quorum.v1",
        1,
        r#"{"threshold":{"type":"n_of_m","value":2}}"#,
    ));
    b.register_policy(policy("policy.fuzz.any", "*", 1, r#"{"commitment":{"authority":"any_participant"}}"#));
    let request = b.request;
    let ext = ModeDescriptor {
        mode: EXT_MODE.into(),
        mode_version: "1.0.0".into(),
        message_types: vec!["SessionStart".into(), "Note".into(), "Commitment".into()],
        terminal_message_types: vec!["Commitment".into()],
        ..Default::default()
    };
    match b.run(Input::RegisterExtMode { request, identity: Identity::new(ADMIN), descriptor: ext }) {
        Reply::Registry(Ok(_)) => {}
        other => panic!("base extension mode refused: {other:?}"),
    }
    let extras: [(&str, &str, &str); 4] = [
        ("extra:handoff-implicit", "macp.mode.handoff.v1", "policy.fuzz.handoff-implicit"),
        ("extra:quorum-threshold", "macp.mode.quorum.v1", "policy.fuzz.quorum-two"),
        ("extra:decision-any", "macp.mode.decision.v1", "policy.fuzz.any"),
        ("extra:extension", EXT_MODE, ""),
    ];
    let participants: Vec<String> = ["agent://i", "agent://a", "agent://b", "agent://c"].map(String::from).to_vec();
    for (origin, mode, policy_version) in extras {
        n += 1;
        let sid = session_id(n);
        let payload = SessionStartPayload {
            intent: "fuzz".into(),
            participants: participants.clone(),
            mode_version: "1.0.0".into(),
            configuration_version: "cfg-1".into(),
            policy_version: policy_version.into(),
            ttl_ms: 60_000,
            ..Default::default()
        };
        let start = Envelope {
            macp_version: "1.0".into(),
            mode: mode.into(),
            message_type: "SessionStart".into(),
            message_id: format!("{sid}-start"),
            session_id: sid.clone(),
            sender: "agent://i".into(),
            timestamp_unix_ms: b.now,
            payload: payload.encode_to_vec(),
        };
        b.start(&start);
        agents.extend(participants.iter().cloned());
        sessions.push(BaseSession {
            origin: origin.into(),
            session_id: sid,
            mode: mode.into(),
            initiator: "agent://i".into(),
            participants: participants.clone(),
            start,
            steps: Vec::new(),
        });
    }
    Base {
        snapshot: b.kernel.snapshot(),
        records: b.records,
        sessions,
        agents: agents.into_iter().collect(),
        now_ms: b.now,
    }
}

fn policy(id: &str, mode: &str, schema_version: u32, rules: &str) -> PolicyDescriptor {
    PolicyDescriptor {
        policy_id: id.into(),
        mode: mode.into(),
        description: "fuzz base policy".into(),
        rules: rules.into(),
        schema_version,
        registered_at_unix_ms: 0,
    }
}
