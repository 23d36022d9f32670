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
mod snapshot;
mod timers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use macp_wire::storage::Record;

pub use self::apply::Prepared;
pub use self::snapshot::SnapshotError;
use self::timers::Timers;
use crate::error::KResult;
use crate::io::Broadcast;
use crate::mode::ModeRegistry;
use crate::policy::PolicyRegistry;
use crate::session::Session;

/// What applying one record asks observers to hear.
pub(crate) type Applied = Vec<Broadcast>;

/// Everything the kernel knows. See the module docs.
#[derive(Debug)]
pub(crate) struct State {
    /// The runtime's own agent id: envelopes it sent are runtime-emitted.
    runtime_id: Arc<str>,
    /// Boxed: a B-tree node holds 11 values inline, and a session is a few
    /// hundred bytes, so unboxed nodes waste a third of their space.
    sessions: BTreeMap<String, Box<Session>>,
    modes: ModeRegistry,
    policies: PolicyRegistry,
    timers: Timers,
    /// Live (OPEN or SUSPENDED) sessions per initiator, for `max_open_sessions`.
    live_by_initiator: BTreeMap<String, u32>,
    /// Sequence number of the last registry record.
    registry_seq: u64,
    /// Sessions that recovery could not rebuild (storage corruption left a
    /// gap in their history). They are refused, never silently restarted.
    quarantined: BTreeSet<String>,
}

impl State {
    /// An empty state with the built-in modes and `policy.default`.
    pub fn new(runtime_id: &str) -> Self {
        State {
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
        self.quarantined.insert(session_id.to_string());
    }

    /// Records that the mode timers of `session_id` due at `now` were
    /// serviced: a mode that still reports them is not asked again until a
    /// later deadline, which would otherwise spin the driver.
    pub fn mode_timer_fired(&mut self, session_id: &str, now: i64) {
        if let Some(s) = self.sessions.get_mut(session_id) {
            if s.mode_state.next_deadline().is_some_and(|d| d <= now) {
                s.mode_timer_floor = now;
            }
            self.timers.reindex(s);
        }
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
    pub fn apply(&mut self, record: &Record, emit: bool) -> KResult<Applied> {
        self.apply_with(record, emit, None)
    }
}
