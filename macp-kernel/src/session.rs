//! One session's state as the kernel keeps it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use macp_wire::v1::{ParticipantActivity, SessionMetadata, SessionState};

use crate::mode::{ModeState, SessionView};
use crate::policy::BoundPolicy;

/// A participant's accepted-message activity (SessionMetadata field 10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Acceptance time of the sender's latest accepted message.
    pub last_message_at_unix_ms: i64,
    /// How many of its messages were accepted.
    pub message_count: u32,
}

/// A session.
#[derive(Debug)]
pub struct Session {
    /// Session id.
    pub id: String,
    /// Canonical mode id (aliases resolved).
    pub mode: String,
    /// Bound mode version.
    pub mode_version: String,
    /// Bound configuration version.
    pub configuration_version: String,
    /// The frozen policy, shared with the registry entry it was bound from.
    pub policy: Arc<BoundPolicy>,
    /// Sender of the SessionStart.
    pub initiator: String,
    /// Declared participants, as given.
    pub participants: Vec<String>,
    /// Opaque context reference, verbatim.
    pub context_id: String,
    /// Extension keys of the SessionStart, sorted.
    pub extension_keys: Vec<String>,
    /// Acceptance time of the SessionStart.
    pub started_at_ms: i64,
    /// Current absolute TTL deadline (moves on resume).
    pub deadline_ms: i64,
    /// Resolved suspension cap.
    pub max_suspend_ms: i64,
    /// Lifecycle state.
    pub state: SessionState,
    /// When the current suspension began.
    pub suspended_at_ms: Option<i64>,
    /// Suspended time already banked by earlier suspensions.
    pub suspended_total_ms: i64,
    /// Sequence number of the last record (1-based; SessionStart is 1).
    pub seq: u64,
    /// Accepted message ids (dedup).
    pub seen: BTreeSet<String>,
    /// Activity per sender.
    pub activity: BTreeMap<String, Activity>,
    /// Payload bytes of the resolving Commitment.
    pub resolution: Option<Vec<u8>>,
    /// Only the initiator may commit (mode-fixed authority).
    pub initiator_only_commitment: bool,
    /// The mode's state.
    pub mode_state: Box<dyn ModeState>,
    /// The due time under which the session is indexed in the timer set.
    pub timer_at: Option<i64>,
    /// Mode deadlines at or before this time are ignored: they fired and the
    /// mode still reports them (a mode bug), and re-firing would spin the
    /// driver. Not part of the state proper (never persisted).
    pub mode_timer_floor: i64,
}

impl Session {
    /// The view handed to modes.
    pub fn view(&self) -> SessionView<'_> {
        SessionView {
            session_id: &self.id,
            mode: &self.mode,
            initiator: &self.initiator,
            participants: &self.participants,
            mode_version: &self.mode_version,
            configuration_version: &self.configuration_version,
            policy: &self.policy,
        }
    }

    /// Whether the session can never change again.
    pub fn is_terminal(&self) -> bool {
        matches!(self.state, SessionState::Resolved | SessionState::Expired | SessionState::Cancelled)
    }

    /// Counts toward `max_open_sessions` (OPEN or SUSPENDED).
    pub fn is_live(&self) -> bool {
        matches!(self.state, SessionState::Open | SessionState::Suspended)
    }

    /// Whether `who` may read the session (GetSession, passive subscribe):
    /// the initiator or a declared participant; observers are decided by the
    /// caller from the identity's grants.
    pub fn can_read(&self, who: &str) -> bool {
        who == self.initiator || self.participants.iter().any(|p| p == who)
    }

    /// When a suspended session passes its suspension cap.
    pub fn suspend_cap_deadline(&self) -> Option<i64> {
        self.suspended_at_ms.map(|at| at.saturating_add(self.max_suspend_ms.saturating_sub(self.suspended_total_ms)))
    }

    /// The earliest time at which a tick has work for this session.
    /// Expiry is strict (`now > deadline`), hence the `+ 1`.
    pub fn next_timer(&self) -> Option<i64> {
        match self.state {
            SessionState::Open => {
                let ttl = self.deadline_ms.saturating_add(1);
                Some(match self.mode_state.next_deadline().filter(|m| *m > self.mode_timer_floor) {
                    Some(m) => m.min(ttl),
                    None => ttl,
                })
            }
            SessionState::Suspended => self.suspend_cap_deadline().map(|d| d.saturating_add(1)),
            _ => None,
        }
    }

    /// SessionMetadata as the wire reports it.
    pub fn metadata(&self) -> SessionMetadata {
        SessionMetadata {
            session_id: self.id.clone(),
            mode: self.mode.clone(),
            state: self.state as i32,
            started_at_unix_ms: self.started_at_ms,
            expires_at_unix_ms: self.deadline_ms,
            mode_version: self.mode_version.clone(),
            configuration_version: self.configuration_version.clone(),
            policy_version: self.policy.id().to_string(),
            participants: self.participants.clone(),
            participant_activity: self
                .activity
                .iter()
                .map(|(who, a)| ParticipantActivity {
                    participant_id: who.clone(),
                    last_message_at_unix_ms: a.last_message_at_unix_ms,
                    message_count: a.message_count,
                })
                .collect(),
            initiator: self.initiator.clone(),
            context_id: self.context_id.clone(),
            extension_keys: self.extension_keys.clone(),
        }
    }

    /// Records an accepted message from `sender`.
    pub fn touch(&mut self, sender: &str, message_id: &str, at: i64) {
        self.seen.insert(message_id.to_string());
        // Look up before inserting: the sender is almost always known, and
        // `entry` would allocate the key every time.
        let a = match self.activity.get_mut(sender) {
            Some(a) => a,
            None => self.activity.entry(sender.to_string()).or_default(),
        };
        a.last_message_at_unix_ms = at;
        a.message_count = a.message_count.saturating_add(1);
    }
}
