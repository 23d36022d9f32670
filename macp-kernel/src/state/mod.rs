//! The evolving half of the kernel: what it knows, and the one door through
//! which that changes.
//!
//! [`State`] holds the open and suspended sessions, the registries, the timer
//! index and the per-initiator quotas. Its fields are private: everything
//! outside this module reads through accessors, and the only way to change a
//! session is [`State::apply`] with a storage [`Record`] — the same call live
//! admission makes after building a record and recovery makes after reading
//! one back. That is what keeps live processing and replay from drifting
//! apart: there is no second code path that mutates a session.
//!
//! Two changes are not records, because they are not facts of the history:
//! [`State::quarantine`] (recovery found damaged history) and
//! [`State::mode_timer_fired`] (a guard against a mode that keeps reporting a
//! deadline that already fired).

mod apply;
pub(crate) mod ended;
mod snapshot;
mod timers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use macp_wire::storage::{Record, SessionSummary};
use macp_wire::v1::SessionState;

pub use self::apply::Prepared;
use self::ended::{summarize, Ended, EndedCache, EndedSessions};
pub use self::snapshot::SnapshotError;
use self::timers::Timers;
use crate::error::KResult;
use crate::io::Broadcast;
use crate::mode::ModeRegistry;
use crate::policy::PolicyRegistry;
use crate::session::{BindingCache, Session};

/// What applying one record asks observers to hear.
pub(crate) type Broadcasts = Vec<Broadcast>;

/// What applying one record did.
#[derive(Debug)]
pub(crate) struct Applied {
    /// The session's state afterwards (`Open` for registry records).
    pub state: SessionState,
    /// The session's summary, when this record ended it: it has left the
    /// working set and storage must keep the summary.
    pub ended: Option<SessionSummary>,
}

/// Everything the kernel knows. See the module docs.
#[derive(Debug)]
pub(crate) struct State {
    /// The runtime's own agent id: envelopes it sent are runtime-emitted.
    runtime_id: Arc<str>,
    /// Boxed: a B-tree node holds 11 values inline, and a session is a few
    /// hundred bytes, so unboxed nodes waste a third of their space. The key
    /// is the session's own id (`Session::id`), shared rather than copied.
    sessions: BTreeMap<Arc<str>, Box<Session>>,
    modes: ModeRegistry,
    policies: PolicyRegistry,
    timers: Timers,
    /// Live (OPEN or SUSPENDED) sessions per initiator, for `max_open_sessions`.
    /// Keys are the sessions' own `initiator` names, shared.
    live_by_initiator: BTreeMap<Arc<str>, u32>,
    /// Sequence number of the last registry record.
    registry_seq: u64,
    /// Sessions that recovery could not rebuild (storage corruption left a
    /// gap in their history). They are refused, never silently restarted.
    quarantined: BTreeSet<String>,
    /// Recently ended sessions (not part of the state proper: never in a
    /// snapshot, and no answer depends on what it holds).
    ended: EndedCache,
    /// How many settled entries `ended` keeps.
    ended_keep: usize,
    /// Empty between inputs; see [`State::take_broadcast_buffer`].
    broadcast_buffer: Broadcasts,
    /// Shared mode bindings for new and restored sessions (not part of the
    /// state proper: sharing changes no answer).
    bindings: BindingCache,
}

impl State {
    /// An empty state with the built-in modes and `policy.default`.
    pub fn new(runtime_id: &str, ended_keep: usize) -> Self {
        State {
            ended: EndedCache::default(),
            ended_keep,
            broadcast_buffer: Vec::new(),
            bindings: BindingCache::default(),
            runtime_id: runtime_id.into(),
            sessions: BTreeMap::new(),
            modes: ModeRegistry::with_builtins(),
            policies: PolicyRegistry::default(),
            timers: Timers::default(),
            live_by_initiator: BTreeMap::new(),
            registry_seq: 0,
            quarantined: BTreeSet::new(),
        }
    }

    /// An empty state over a given mode registry, for replaying one
    /// session's records outside the working set (WhatIfReplay): the
    /// session's mode may be an extension the live registry holds.
    pub fn for_replay(runtime_id: &str, modes: ModeRegistry) -> Self {
        State { modes, ..State::new(runtime_id, 1) }
    }

    /// An initiator's name for a new session: the `Arc` its other live
    /// sessions already share when it has any (an agent of a fleet opens
    /// many sessions), a new one otherwise.
    fn shared_initiator(&self, who: &str) -> Arc<str> {
        match self.live_by_initiator.get_key_value(who) {
            Some((name, _)) => name.clone(),
            None => who.into(),
        }
    }

    // ----- reads -----------------------------------------------------------

    /// A session, if the kernel holds it.
    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id).map(|s| &**s)
    }

    /// Every held session in id order, starting after `after` when given.
    pub fn sessions_after<'a>(&'a self, after: Option<&str>) -> Box<dyn Iterator<Item = &'a Session> + 'a> {
        match after {
            None => Box::new(self.sessions.values().map(|s| &**s)),
            Some(a) => Box::new(
                self.sessions
                    .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(_, s)| &**s),
            ),
        }
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A recently ended session, if the cache holds it.
    pub fn cached_ended(&self, id: &str) -> Option<&Ended> {
        self.ended.get(id)
    }

    /// Number of ended sessions cached.
    pub fn cached_ended_count(&self) -> usize {
        self.ended.len()
    }

    /// The mode registry.
    pub fn modes(&self) -> &ModeRegistry {
        &self.modes
    }

    /// The policy registry.
    pub fn policies(&self) -> &PolicyRegistry {
        &self.policies
    }

    /// Live sessions initiated by `who`.
    pub fn live_count(&self, who: &str) -> u32 {
        self.live_by_initiator.get(who).copied().unwrap_or(0)
    }

    /// Sequence number of the last registry record.
    pub fn registry_seq(&self) -> u64 {
        self.registry_seq
    }

    /// Whether recovery took `id` out of service.
    pub fn is_quarantined(&self, id: &str) -> bool {
        self.quarantined.contains(id)
    }

    /// Sessions taken out of service by recovery.
    pub fn quarantined(&self) -> &BTreeSet<String> {
        &self.quarantined
    }

    /// The earliest pending timer of any session.
    pub fn next_deadline(&self) -> Option<i64> {
        self.timers.first()
    }

    /// Sessions whose timer is due at `now`, earliest first.
    pub fn due(&self, now: i64) -> Vec<String> {
        self.timers.due(now)
    }

    // ----- changes that are not records --------------------------------------

    /// Takes a session out of service after storage corruption: its state is
    /// dropped and every later message or SessionStart for its id gets
    /// INTERNAL_ERROR, so the damaged history is never extended or replaced.
    pub fn quarantine(&mut self, session_id: &str) {
        if let Some(s) = self.sessions.remove(session_id) {
            self.timers.remove(&s);
            if s.is_live() {
                self.release_live(&s.initiator);
            }
        }
        self.ended.forget(session_id);
        self.quarantined.insert(session_id.to_string());
    }

    /// Records that the mode timers of `session_id` due at `now` were
    /// serviced: a mode that still reports them is not asked again until a
    /// later deadline, which would otherwise spin the driver.
    pub fn mode_timer_fired(&mut self, session_id: &str, now: i64) {
        if let Some(s) = self.sessions.get_mut(session_id) {
            if s.mode_state.next_deadline().is_some_and(|d| d <= now) {
                s.rare_mut().mode_timer_floor = now;
            }
            self.timers.reindex(s);
        }
    }

    /// The summary of an ended session: from the cache, else from
    /// `storage` (remembered in the cache). `Ok(None)`: no such ended
    /// session.
    pub fn ended_summary(&mut self, id: &str, storage: &dyn EndedSessions) -> KResult<Option<&SessionSummary>> {
        if self.ended.get(id).is_none() {
            match storage.get(id)? {
                Some(summary) => self.ended.insert_loaded(summary),
                None => return Ok(None),
            }
        }
        Ok(self.ended.get(id).map(Ended::summary))
    }

    /// The summary of an ended session without remembering it (queries).
    pub fn peek_ended(&self, id: &str, storage: &dyn EndedSessions) -> KResult<Option<SessionSummary>> {
        match self.ended.get(id) {
            Some(e) => Ok(Some(e.summary().clone())),
            None => storage.get(id),
        }
    }

    /// Everything that ended so far has been handed to storage: the cache
    /// may drop all but its most recent entries.
    pub fn settle_ended(&mut self) {
        self.ended.settle(self.ended_keep);
    }

    /// Retention passed for sessions that ended before `cutoff_ms`: the
    /// cache forgets them.
    pub fn forget_ended_before(&mut self, cutoff_ms: i64) {
        self.ended.forget_ended_before(cutoff_ms);
    }

    /// Moves a session that reached a terminal state out of the working
    /// set; returns its summary.
    fn end_session(&mut self, sid: &str, at: i64) -> SessionSummary {
        let Some(session) = self.sessions.remove(sid) else {
            // Only called right after a record applied to `sid`.
            return SessionSummary::default();
        };
        self.timers.remove(&session);
        let summary = summarize(&session, at);
        self.ended.insert_ended(session.id.clone(), Ended::of_session(session, at));
        summary
    }

    fn release_live(&mut self, initiator: &str) {
        if let Some(n) = self.live_by_initiator.get_mut(initiator) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live_by_initiator.remove(initiator);
            }
        }
    }

    /// Applies one record; see [`State::apply_with`].
    pub fn apply(&mut self, record: &Record, broadcasts: Option<&mut Broadcasts>) -> KResult<Applied> {
        self.apply_with(record, broadcasts, None)
    }

    /// The broadcast buffer kept between inputs (empty), so that admitting
    /// an envelope allocates none; give it back with
    /// [`State::return_broadcast_buffer`].
    pub fn take_broadcast_buffer(&mut self) -> Broadcasts {
        std::mem::take(&mut self.broadcast_buffer)
    }

    /// Keeps `buffer` (emptied) for the next input.
    pub fn return_broadcast_buffer(&mut self, mut buffer: Broadcasts) {
        buffer.clear();
        self.broadcast_buffer = buffer;
    }
}
