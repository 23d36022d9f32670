//! The kernel: one owner, `&mut self`, inputs in, effects out.
//!
//! [`Kernel`] is a thin facade over the two halves of the crate: admission
//! ([`crate::admit`]), which decides what an input makes happen and builds
//! it as records, and the state ([`crate::state`]), which applies records —
//! live and in recovery through the same function. Queries
//! ([`crate::query`]) read the state and change nothing.

use std::collections::BTreeSet;

use macp_wire::storage::{Record, SessionSummary};
use macp_wire::v1::{Envelope, SessionMetadata, SessionState};

use crate::config::KernelConfig;
use crate::error::KResult;
use crate::io::{Effect, Identity, Input};
use crate::mode::ModeRegistry;
use crate::policy::PolicyRegistry;
use crate::query::{Answer, Query};
use crate::session::Session;
use crate::state::ended::{Ended, EndedSessions, NoEnded};
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
        let state = State::new(&config.runtime_id, config.ended_cache);
        Kernel { config, state }
    }

    /// The configuration the kernel was built with.
    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// Processes one input and returns its effects in driver order. Ended
    /// sessions the kernel no longer holds are unknown to it here; a driver
    /// with storage uses [`Kernel::handle_with`].
    pub fn handle(&mut self, now_ms: i64, input: Input) -> Vec<Effect> {
        // Room for a resolving message's effects (Persist, Ended, Reply and two
        // broadcasts), so the common cases never grow the vector.
        let mut out = Vec::with_capacity(5);
        self.handle_with(now_ms, input, &NoEnded, &mut out);
        out
    }

    /// Processes one input, appending its effects to a caller-owned buffer
    /// (a driver processing a batch allocates once). Ended sessions that
    /// left the working set are looked up in `storage`.
    pub fn handle_with(&mut self, now_ms: i64, input: Input, storage: &dyn EndedSessions, out: &mut Vec<Effect>) {
        crate::admit::handle(&self.config, &mut self.state, storage, now_ms, input, out)
    }

    /// Retention passed for every session that ended before `cutoff_ms`:
    /// the ended-session cache forgets them, so the kernel answers for
    /// them exactly as storage does (not found). The pipeline calls it
    /// after each storage upkeep.
    pub fn forget_ended_before(&mut self, cutoff_ms: i64) {
        self.state.forget_ended_before(cutoff_ms)
    }

    /// Tells the kernel that every session that ended so far is in storage
    /// (its summary was persisted): the ended-session cache may shrink back
    /// to [`KernelConfig::ended_cache`] entries. Until then it keeps every
    /// session that ended, so a lookup never misses one storage has not
    /// seen yet.
    pub fn settle_ended(&mut self) {
        self.state.settle_ended()
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
    /// disagrees with the rules it was written under. Builds no broadcasts
    /// (nobody is listening to history being rebuilt); returns the session's
    /// summary when the record ended it, for storage to keep.
    pub fn apply_record(&mut self, record: &Record) -> KResult<Option<SessionSummary>> {
        self.state.apply(record, None).map(|a| a.ended)
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

    /// Writes the bytes of [`Kernel::snapshot`] into `out` as they are
    /// produced, without holding them all: a checkpoint streams them into
    /// its file (at 100,000 open sessions the buffer is ~31 MB, which the
    /// allocator kept resident after it was freed).
    pub fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.state.write_snapshot(out)
    }

    /// Rebuilds a kernel from [`Kernel::snapshot`] bytes.
    pub fn restore(config: KernelConfig, bytes: &[u8]) -> Result<Kernel, SnapshotError> {
        let state = State::restore(&config.runtime_id, config.ended_cache, bytes)?;
        Ok(Kernel { config, state })
    }

    // ----- reads ---------------------------------------------------------------

    /// Answers a read-only question (GetSession, ListSessions, registries…)
    /// with the read-access rule applied; ended sessions are read from
    /// `storage`.
    pub fn answer(&self, query: &Query, storage: &dyn EndedSessions) -> Answer {
        crate::query::answer(&self.state, storage, query)
    }

    /// A session, if the kernel holds it (tests, recovery checks, the
    /// simulator's oracle).
    pub fn session(&self, session_id: &str) -> Option<&Session> {
        self.state.session(session_id)
    }

    /// GetSession with its access rule: initiator, declared participant or
    /// observer. Errors carry SESSION_NOT_FOUND or FORBIDDEN. Ended sessions
    /// are found only while cached; a driver with storage uses
    /// [`Kernel::answer`].
    pub fn get_session(&self, identity: &Identity, session_id: &str) -> KResult<SessionMetadata> {
        crate::query::get_session(&self.state, &NoEnded, identity, session_id)
    }

    /// Number of sessions held: open and suspended ones.
    pub fn session_count(&self) -> usize {
        self.state.session_count()
    }

    /// The lifecycle state of a session the kernel holds or still caches
    /// after it ended.
    pub fn session_state(&self, session_id: &str) -> Option<SessionState> {
        match self.state.session(session_id) {
            Some(s) => Some(s.state),
            None => self.state.cached_ended(session_id).map(|e| crate::state::ended::summary_state(e.summary())),
        }
    }

    /// A recently ended session the kernel still caches (its summary, and
    /// the whole session while it lingers).
    pub fn ended_session(&self, session_id: &str) -> Option<&Ended> {
        self.state.cached_ended(session_id)
    }

    /// Number of ended sessions in the cache: bounded by
    /// [`KernelConfig::ended_cache`] once settled, whatever the number of
    /// sessions that ever ended.
    pub fn cached_ended_count(&self) -> usize {
        self.state.cached_ended_count()
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

    /// A session held, or lingering whole in the ended cache.
    fn session_or_lingering(&self, session_id: &str) -> Option<&Session> {
        self.state.session(session_id).or_else(|| self.state.cached_ended(session_id)?.session.as_deref())
    }

    /// The mode state projection of a session (conformance, debugging),
    /// while the kernel holds it or it lingers after ending.
    pub fn mode_projection(&self, session_id: &str) -> Option<serde_json::Value> {
        self.session_or_lingering(session_id).map(|s| s.mode_state.project())
    }

    /// The resolving Commitment's payload bytes, while the session lingers
    /// after resolving (storage keeps the Commitment in its history).
    pub fn resolution(&self, session_id: &str) -> Option<&[u8]> {
        self.session_or_lingering(session_id).and_then(|s| s.rare().resolution.as_deref())
    }
}
