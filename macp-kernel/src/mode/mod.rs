//! The mode plug-in point.
//!
//! A mode is a pure state machine: the kernel hands it each session-scoped
//! envelope that passed the core checks, and the mode either accepts it
//! (mutating its state) or rejects it with a registry error code, leaving its
//! state untouched. The kernel owns everything modes share (dedup, TTL,
//! lifecycle, Commitment payload checks, commitment authority); a mode owns
//! who may send what, its phases, and when a Commitment is eligible.
//!
//! Adding a mode is one file implementing [`Mode`] and [`ModeState`], plus
//! one line in [`builtin_modes`].

use std::fmt::Debug;

use macp_wire::v1::{CommitmentPayload, ModeDescriptor};

use crate::error::{KResult, KernelError};
use crate::policy::{BoundPolicy, InvalidRules};

mod decision;
mod handoff;
mod multi_round;
mod passthrough;
mod proposal;
mod quorum;
mod registry;
mod task;
pub mod util;

pub(crate) use decision::rules_equivalent as decision_rules_equivalent;
pub use registry::{ModeEntry, ModeRegistry, MULTI_ROUND_ALIAS};

/// Read-only facts about the session a mode decides within.
#[derive(Clone, Copy, Debug)]
pub struct SessionView<'a> {
    /// The session id.
    pub session_id: &'a str,
    /// The canonical mode id the session is bound to.
    pub mode: &'a str,
    /// Sender of the SessionStart.
    pub initiator: &'a str,
    /// Declared participants, in SessionStart order.
    pub participants: &'a [String],
    /// Bound mode version.
    pub mode_version: &'a str,
    /// Bound configuration version.
    pub configuration_version: &'a str,
    /// The policy resolved at SessionStart, frozen for the session.
    pub policy: &'a BoundPolicy,
}

impl SessionView<'_> {
    /// Whether `who` is a declared participant.
    pub fn is_participant(&self, who: &str) -> bool {
        self.participants.iter().any(|p| p == who)
    }
}

/// One message a mode is asked to accept.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The session.
    pub session: SessionView<'a>,
    /// Authenticated sender (the runtime's id for runtime-emitted messages).
    pub sender: &'a str,
    /// Envelope `message_type`.
    pub message_type: &'a str,
    /// Envelope `message_id`.
    pub message_id: &'a str,
    /// Raw payload bytes (protobuf of the mode's payload type).
    pub payload: &'a [u8],
    /// Runtime acceptance time (never the client's timestamp).
    pub accepted_at_ms: i64,
    /// True when the runtime itself emits this message (e.g. an implicit
    /// handoff accept); clients can never set this.
    pub runtime_emitted: bool,
}

/// A message the runtime emits on a mode's behalf when one of its timers
/// fires; the kernel records it and feeds it back through [`ModeState::accept`]
/// with `runtime_emitted = true`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeMessage {
    /// Envelope `message_type`.
    pub message_type: String,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// Distinguishes it from every other message of the session.
    pub message_id: String,
}

/// What a mode is, independent of any session.
pub trait Mode: Send + Sync + Debug {
    /// The descriptor served by ListModes / ListExtModes.
    fn descriptor(&self) -> ModeDescriptor;

    /// Admission: checks a policy's `rules` JSON against this mode's current
    /// rule schema at RegisterPolicy time (closed objects, value domains,
    /// floors), so a bad policy never reaches a session. Never called for a
    /// stored descriptor, which is evaluated as it was admitted. Modes
    /// without a rule schema accept any JSON object (RFC-MACP-0012 §4.6).
    fn validate_rules(&self, _rules: &serde_json::Value, _schema_version: u32) -> Result<(), InvalidRules> {
        Ok(())
    }

    /// Mode-specific SessionStart checks (participant rules) and the initial
    /// state. `policy` is the bound policy; modes read thresholds from it.
    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>>;

    /// Rebuilds a state from [`ModeState::snapshot`] bytes (checkpoints).
    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String>;

    /// True when only the initiator may commit, whatever the policy says
    /// (multi_round and dynamically registered extensions).
    fn initiator_only_commitment(&self) -> bool {
        false
    }
}

/// The per-session state of a mode.
pub trait ModeState: Send + Debug {
    /// Accepts a non-Commitment message or rejects it. On `Err` the state
    /// must be exactly as before the call.
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()>;

    /// Decides whether the session may resolve with `commitment` (mode
    /// eligibility first, INVALID_ENVELOPE; then the bound policy,
    /// POLICY_DENIED) and, if so, moves to the committed phase. The kernel has
    /// already checked the sender's authority and the payload's common fields.
    /// On `Err` the state must be exactly as before the call.
    fn commit(&mut self, msg: &Message<'_>, commitment: &CommitmentPayload) -> KResult<()>;

    /// The earliest time at which [`ModeState::on_timer`] has work, if any.
    fn next_deadline(&self) -> Option<i64> {
        None
    }

    /// Messages the runtime must emit because a timer is due at `now`.
    /// Does not change state: each message is recorded, then accepted.
    fn on_timer(&self, _session: SessionView<'_>, _now_ms: i64) -> Vec<RuntimeMessage> {
        Vec::new()
    }

    /// Deterministic bytes of the whole state (checkpoints, replay checks).
    fn snapshot(&self) -> Vec<u8>;

    /// A JSON projection for conformance checks and debugging, with the
    /// field names the spec's vectors use (`phase`, `proposals`, `votes`, …).
    fn project(&self) -> serde_json::Value;
}

/// The modes compiled into the runtime: the five standards-track modes and
/// the built-in `ext.multi_round.v1` extension.
pub fn builtin_modes() -> Vec<(std::sync::Arc<dyn Mode>, bool)> {
    // (mode, standards_track)
    vec![
        (std::sync::Arc::new(decision::DecisionMode), true),
        (std::sync::Arc::new(proposal::ProposalMode), true),
        (std::sync::Arc::new(task::TaskMode), true),
        (std::sync::Arc::new(handoff::HandoffMode), true),
        (std::sync::Arc::new(quorum::QuorumMode), true),
        (std::sync::Arc::new(multi_round::MultiRoundMode), false),
    ]
}

/// Helper for modes: reject a message type the mode does not define.
pub fn unknown_message_type(mode: &str, message_type: &str) -> KernelError {
    KernelError::invalid(format!("message type '{message_type}' is not defined by mode {mode}"))
}
