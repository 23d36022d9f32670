//! The kernel: one owner, `&mut self`, inputs in, effects out.
//!
//! [`Kernel`] is a thin facade over the two halves of the crate: admission
//! ([`crate::admit`]), which decides what an input makes happen and builds
//! it as records, and the state ([`crate::state`]), which applies records —
//! live and in recovery through the same function. Queries
//! ([`crate::query`]) read the state and change nothing.

use std::collections::BTreeSet;

use macp_wire::storage::Record;
use macp_wire::v1::{Envelope, SessionMetadata};

use crate::config::KernelConfig;
use crate::error::KResult;
use crate::io::{Broadcast, Effect, Identity, Input};
use crate::mode::ModeRegistry;
use crate::policy::PolicyRegistry;
use crate::query::{Answer, Query};
use crate::session::Session;
use crate::state::{SnapshotError, State};

/// The deterministic MACP session kernel.
#[derive(Debug)]
pub struct Kernel {
    config: KernelConfig,
    state: State,
}

impl Kernel {
    /// A kernel with the built-in modes and `policy.default`.
    pub fn new(config: KernelConfig) -> Self {
        let state = State::new(&config.runtime_id);
        Kernel { config, state }
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
        crate::admit::handle(&self.config, &mut self.state, now_ms, input, out)
    }

    /// When the driver must call again with [`Input::Tick`] (TTL expiry,
    /// suspension caps, mode timers), if ever.
    pub fn next_deadline(&self) -> Option<i64> {
        self.state.next_deadline()
    }

    /// Ambient envelopes (Signal, Progress), admitted as [`Kernel::handle`]
    /// does, but as a pure function of the configuration, the identity and
    /// the envelope. They touch no session and are never persisted, so a
    /// transport may run this on the request's own task and broadcast the
    /// returned envelope (authenticated sender filled in) itself, instead of
    /// queueing ambient traffic behind session traffic.
    pub fn admit_ambient(config: &KernelConfig, identity: &Identity, envelope: Envelope) -> KResult<Envelope> {
        crate::admit::admit_ambient(config, identity, envelope)
    }

    // ----- recovery ----------------------------------------------------------

    /// Applies one record read back from storage, through the same code that
    /// accepted it. An `Err` leaves the kernel unchanged and means the log
    /// disagrees with the rules it was written under. Returns no broadcasts:
    /// nobody is listening to history being rebuilt.
    pub fn apply_record(&mut self, record: &Record) -> KResult<Vec<Broadcast>> {
        self.state.apply(record, false)
    }

    /// Takes a session out of service after storage corruption: its state is
    /// dropped and every later message or SessionStart for its id gets
    /// INTERNAL_ERROR, so the damaged history is never extended or replaced.
    /// Called by recovery, which also reports the session to the operator.
    pub fn quarantine_session(&mut self, session_id: &str) {
        self.state.quarantine(session_id)
    }

    /// Sessions taken out of service by [`Kernel::quarantine_session`].
    pub fn quarantined(&self) -> &BTreeSet<String> {
        self.state.quarantined()
    }

    /// The whole state as deterministic bytes (checkpoints). Two kernels
    /// with equal snapshots are in the same state, which is how replay
    /// equivalence is tested.
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.snapshot()
    }

    /// Rebuilds a kernel from [`Kernel::snapshot`] bytes.
    pub fn restore(config: KernelConfig, bytes: &[u8]) -> Result<Kernel, SnapshotError> {
        let state = State::restore(&config.runtime_id, bytes)?;
        Ok(Kernel { config, state })
    }

    // ----- reads ---------------------------------------------------------------

    /// Answers a read-only question (GetSession, ListSessions, registries…)
    /// with the read-access rule applied.
    pub fn answer(&self, query: &Query) -> Answer {
        crate::query::answer(&self.state, query)
    }

    /// A session, if the kernel holds it (tests, recovery checks, the
    /// simulator's oracle).
    pub fn session(&self, session_id: &str) -> Option<&Session> {
        self.state.session(session_id)
    }

    /// GetSession with its access rule: initiator, declared participant or
    /// observer. Errors carry SESSION_NOT_FOUND or FORBIDDEN.
    pub fn get_session(&self, identity: &Identity, session_id: &str) -> KResult<SessionMetadata> {
        crate::query::get_session(&self.state, identity, session_id)
    }

    /// Number of sessions held (any state).
    pub fn session_count(&self) -> usize {
        self.state.session_count()
    }

    /// Every held session's metadata in id order.
    pub fn all_sessions(&self) -> impl Iterator<Item = SessionMetadata> + '_ {
        self.state.sessions_after(None).map(Session::metadata)
    }

    /// The mode registry (ListModes, ListExtModes, Initialize).
    pub fn modes(&self) -> &ModeRegistry {
        self.state.modes()
    }

    /// The policy registry (GetPolicy, ListPolicies, WatchPolicies).
    pub fn policies(&self) -> &PolicyRegistry {
        self.state.policies()
    }

    /// The mode state projection of a session (conformance, debugging).
    pub fn mode_projection(&self, session_id: &str) -> Option<serde_json::Value> {
        self.state.session(session_id).map(|s| s.mode_state.project())
    }

    /// The resolving Commitment's payload bytes, once resolved.
    pub fn resolution(&self, session_id: &str) -> Option<&[u8]> {
        self.state.session(session_id).and_then(|s| s.resolution.as_deref())
    }
}
