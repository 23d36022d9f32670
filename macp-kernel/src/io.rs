//! What goes into the kernel and what comes out.
//!
//! The kernel never performs I/O: a driver (the gRPC server, the simulator, a
//! test, recovery) turns the world into [`Input`]s and carries out the
//! [`Effect`]s in order. Keeping both as plain data is what lets the same
//! kernel run under tokio, under a deterministic simulator and under a fuzzer.

use std::collections::BTreeSet;
use std::sync::Arc;

use macp_wire::storage::{Record, SessionSummary};
use macp_wire::v1::{
    session_lifecycle_event::EventType, Envelope, ModeDescriptor, PolicyDescriptor, SessionMetadata, SessionState,
};

use crate::error::KernelError;

/// Correlates a reply with the request that caused it. Chosen by the driver;
/// the kernel only echoes it.
pub type RequestId = u64;

/// What an authenticated identity may do. Authentication itself is the
/// adapter's job; decisions that depend on session state use these grants
/// inside the kernel, so they are deterministic and replay-free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grants {
    /// May send SessionStart (else FORBIDDEN).
    pub can_start_sessions: bool,
    /// Modes this identity may use; `None` allows every mode.
    pub allowed_modes: Option<BTreeSet<String>>,
    /// At most this many OPEN or SUSPENDED sessions initiated by the identity
    /// (else RATE_LIMITED); `None` is unlimited.
    pub max_open_sessions: Option<u32>,
    /// May register, unregister and promote modes and policies.
    pub can_manage_mode_registry: bool,
    /// May read and subscribe to any session without being a participant.
    pub is_observer: bool,
}

impl Grants {
    /// Everything allowed: dev identities and tests.
    pub fn full() -> Self {
        Grants {
            can_start_sessions: true,
            allowed_modes: None,
            max_open_sessions: None,
            can_manage_mode_registry: true,
            is_observer: false,
        }
    }

    /// Whether `mode` is inside `allowed_modes`.
    pub fn allows_mode(&self, mode: &str) -> bool {
        self.allowed_modes.as_ref().is_none_or(|m| m.contains(mode))
    }
}

impl Default for Grants {
    fn default() -> Self {
        Self::full()
    }
}

/// An authenticated caller: the sender name every envelope is attributed to,
/// and its grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The authenticated sender (envelope `sender` must equal it or be empty).
    pub sender: String,
    /// What it may do.
    pub grants: Grants,
}

impl Identity {
    /// An identity with full grants.
    pub fn new(sender: impl Into<String>) -> Self {
        Identity { sender: sender.into(), grants: Grants::full() }
    }
}

/// A session control-plane operation (CancelSession, SuspendSession,
/// ResumeSession RPCs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlOp {
    /// OPEN or SUSPENDED → CANCELLED.
    Cancel,
    /// OPEN → SUSPENDED, TTL banked.
    Suspend,
    /// SUSPENDED → OPEN, deadline moved by the suspended time.
    Resume,
}

/// One thing that happened outside the kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// An envelope from `Send` or a StreamSession frame.
    Envelope {
        /// Echoed in the reply.
        request: RequestId,
        /// Who sent it.
        identity: Identity,
        /// What was sent.
        envelope: Envelope,
    },
    /// CancelSession / SuspendSession / ResumeSession.
    Control {
        /// Echoed in the reply.
        request: RequestId,
        /// Who asked.
        identity: Identity,
        /// Which operation.
        op: ControlOp,
        /// Target session.
        session_id: String,
        /// Free-text reason, recorded.
        reason: String,
    },
    /// RegisterPolicy.
    RegisterPolicy {
        /// Echoed in the reply.
        request: RequestId,
        /// Who asked (needs `can_manage_mode_registry`).
        identity: Identity,
        /// The policy.
        descriptor: PolicyDescriptor,
    },
    /// UnregisterPolicy.
    UnregisterPolicy {
        /// Echoed in the reply.
        request: RequestId,
        /// Who asked.
        identity: Identity,
        /// Which policy.
        policy_id: String,
    },
    /// RegisterExtMode.
    RegisterExtMode {
        /// Echoed in the reply.
        request: RequestId,
        /// Who asked.
        identity: Identity,
        /// The extension's descriptor.
        descriptor: ModeDescriptor,
    },
    /// UnregisterExtMode.
    UnregisterExtMode {
        /// Echoed in the reply.
        request: RequestId,
        /// Who asked.
        identity: Identity,
        /// Which mode.
        mode: String,
    },
    /// PromoteMode.
    PromoteMode {
        /// Echoed in the reply.
        request: RequestId,
        /// Who asked.
        identity: Identity,
        /// Which extension.
        mode: String,
        /// Optional new name; empty keeps the name.
        promoted_mode_name: String,
    },
    /// Time passed: expire sessions and fire mode timers due at `now`.
    Tick,
}

/// What an accepted envelope or control operation did to its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The session's state afterwards (OPEN for ambient envelopes).
    pub state: SessionState,
    /// The message id was already accepted: acknowledged, nothing recorded.
    pub duplicate: bool,
}

/// The answer to one request. Errors stay typed all the way to the
/// transport, which turns them into an `Ack` or a gRPC status in one place.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// For envelopes (Send, StreamSession frames) and control operations.
    Session {
        /// The kernel clock when the request was decided.
        at_unix_ms: i64,
        /// What happened, or why not.
        result: Result<Accepted, KernelError>,
    },
    /// For registry mutations: `Ok(final mode or policy id)` or an error.
    Registry(Result<String, KernelError>),
}

impl Reply {
    /// The error, if the request was refused.
    pub fn error(&self) -> Option<&KernelError> {
        match self {
            Reply::Session { result: Err(e), .. } | Reply::Registry(Err(e)) => Some(e),
            _ => None,
        }
    }
}

/// Something observers should hear about, released after the reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Broadcast {
    /// An envelope entered a session's accepted history at `seq`.
    SessionEnvelope {
        /// Its 1-based position in the session's history.
        seq: u64,
        /// The accepted (canonical) envelope; its `session_id` says which
        /// session's subscribers hear it.
        envelope: Arc<Envelope>,
    },
    /// A session changed state (WatchSessions).
    Lifecycle {
        /// What happened.
        event: EventType,
        /// The session after the change.
        session: Box<SessionMetadata>,
        /// Its state just before the change (`Unspecified` for `Created`):
        /// what a gauge of sessions by state needs to move one session from
        /// one state to another without keeping a per-session entry (a
        /// session cancelled or expired while suspended leaves `Suspended`).
        previous: SessionState,
        /// When, on the kernel clock.
        observed_at_unix_ms: i64,
    },
    /// An ambient Signal or a Progress report (WatchSignals).
    Signal {
        /// The envelope with the authenticated sender filled in.
        envelope: Arc<Envelope>,
    },
    /// The policy registry changed (WatchPolicies).
    PoliciesChanged,
    /// The mode registry changed (WatchModeRegistry).
    ModesChanged,
}

/// An instruction to the driver. Within one `handle` call effects come in the
/// order they must be honoured: every `Persist` must be durable before any
/// `Reply` after it is released, and broadcasts follow replies.
// Records dominate the effects and are moved straight into storage; boxing
// them would add an allocation per accepted message to save a few bytes on
// the rarer variants.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Append this record to durable storage.
    Persist(Record),
    /// The record just before ended its session: the session has left the
    /// kernel's working set, and storage must keep this summary (with the
    /// session's records) so the session stays answerable until retention
    /// passes. Persisted with the records of the same batch.
    Ended(Box<SessionSummary>),
    /// Answer a request.
    Reply {
        /// The request being answered.
        request: RequestId,
        /// The answer.
        reply: Reply,
    },
    /// Tell observers.
    Broadcast(Broadcast),
}
