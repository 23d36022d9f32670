//! Ended sessions: the kernel's working set holds open and suspended
//! sessions only. When a session ends it leaves the session map at once and
//! is reduced to a [`SessionSummary`] — everything the protocol promises
//! about an ended session, without its mode state — which storage keeps
//! for as long as retention says.
//!
//! The kernel remembers recently ended sessions in [`EndedCache`], a
//! bounded cache: every session that ended since the driver last settled
//! (their summaries may not be in storage yet) plus up to a configured
//! number of older ones, so a burst of follow-ups to a fresh resolution
//! (the duplicate of the last message, a GetSession) needs no storage
//! read. Its size is fixed: memory never grows with the number of ended
//! sessions. Everything else comes from storage through [`EndedSessions`].
//!
//! Every answer about an ended session is computed from its summary alone,
//! whether the summary came from the cache or from storage, so answers do
//! not depend on what the cache happens to hold.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};

use macp_wire::storage::SessionSummary;
use macp_wire::v1::SessionState;

use crate::error::{ErrorCode, KResult, KernelError};
use crate::session::Session;

/// Where the kernel finds ended sessions it no longer holds: storage, in a
/// running server. A kernel driven without storage uses [`NoEnded`] and
/// knows only its cache.
pub trait EndedSessions {
    /// The summary of an ended session within retention, if any.
    fn get(&self, session_id: &str) -> KResult<Option<SessionSummary>>;

    /// Up to `limit` ended sessions in id order after `after`.
    fn list(&self, after: Option<&str>, limit: usize) -> KResult<Vec<SessionSummary>>;
}

/// No storage behind the kernel: only the ended-session cache is known.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEnded;

impl EndedSessions for NoEnded {
    fn get(&self, _session_id: &str) -> KResult<Option<SessionSummary>> {
        Ok(None)
    }

    fn list(&self, _after: Option<&str>, _limit: usize) -> KResult<Vec<SessionSummary>> {
        Ok(Vec::new())
    }
}

/// A recently ended session.
#[derive(Debug)]
pub struct Ended {
    /// What every answer about it is computed from ([`Ended::summary`]):
    /// set when it was read back from storage, else worked out from
    /// `session` on first use (most ended sessions are never asked about,
    /// and the driver already got its own copy with `Effect::Ended`).
    summary: OnceLock<SessionSummary>,
    /// When it ended.
    ended_at_unix_ms: i64,
    /// The whole session as it ended, while it lingers (debugging and
    /// conformance checks read its mode state); `None` when the summary was
    /// read back from storage.
    pub session: Option<Box<Session>>,
}

impl Ended {
    /// A session that just ended at `at`, as the kernel held it.
    pub fn of_session(session: Box<Session>, at: i64) -> Self {
        Ended { summary: OnceLock::new(), ended_at_unix_ms: at, session: Some(session) }
    }

    /// An ended session known only by its summary (read from storage).
    pub fn of_summary(summary: SessionSummary) -> Self {
        Ended { ended_at_unix_ms: summary.ended_at_unix_ms, summary: OnceLock::from(summary), session: None }
    }

    /// What every answer about it is computed from: the summary storage
    /// keeps (the same [`summarize`] gave the driver when it ended).
    pub fn summary(&self) -> &SessionSummary {
        self.summary.get_or_init(|| match &self.session {
            Some(s) => summarize(s, self.ended_at_unix_ms),
            None => SessionSummary::default(),
        })
    }

    /// When it ended.
    pub fn ended_at_unix_ms(&self) -> i64 {
        self.ended_at_unix_ms
    }
}

/// The bounded cache of recently ended sessions. See the module docs.
#[derive(Debug, Default)]
pub struct EndedCache {
    /// Keyed by the session's own id, shared with `order`. Boxed: an entry is
    /// a few hundred bytes, and a B-tree insertion shifts a node's values.
    entries: BTreeMap<Arc<str>, Box<Ended>>,
    /// Insertion order, oldest first.
    order: VecDeque<Arc<str>>,
    /// Entries at the back of `order` that ended since the last settle.
    unsettled: usize,
}

impl EndedCache {
    /// An ended session, if cached.
    pub fn get(&self, id: &str) -> Option<&Ended> {
        self.entries.get(id).map(|e| &**e)
    }

    /// Adds a session that just ended; it stays until the next settle at
    /// least.
    pub fn insert_ended(&mut self, id: Arc<str>, ended: Ended) {
        if self.entries.insert(id.clone(), Box::new(ended)).is_none() {
            self.order.push_back(id);
            self.unsettled += 1;
        }
    }

    /// Remembers a summary read back from storage, until the next settle
    /// at least (the input that asked for it is still using it).
    pub fn insert_loaded(&mut self, summary: SessionSummary) {
        let id: Arc<str> = summary_session_id(&summary).into();
        if self.entries.contains_key(&id) {
            return;
        }
        self.entries.insert(id.clone(), Box::new(Ended::of_summary(summary)));
        // Loaded entries go in front of the unsettled ones, which must
        // outlive the next settle.
        let at = self.order.len() - self.unsettled;
        self.order.insert(at, id);
    }

    /// Everything that ended so far is in storage: keep at most `keep`
    /// entries, dropping the oldest.
    pub fn settle(&mut self, keep: usize) {
        self.unsettled = 0;
        self.trim(keep);
    }

    fn trim(&mut self, keep: usize) {
        while self.order.len() > keep.max(self.unsettled) {
            let Some(id) = self.order.pop_front() else { break };
            self.entries.remove(&id);
        }
    }

    /// Drops every session that ended before `cutoff_ms` (retention passed:
    /// storage no longer answers for them, so the cache must not either).
    pub fn forget_ended_before(&mut self, cutoff_ms: i64) {
        let first_unsettled = self.order.len() - self.unsettled;
        let entries = &mut self.entries;
        let (mut index, mut unsettled) = (0, 0);
        self.order.retain(|id| {
            let keep = entries.get(id).is_some_and(|e| e.ended_at_unix_ms() >= cutoff_ms);
            if !keep {
                entries.remove(id);
            } else if index >= first_unsettled {
                unsettled += 1;
            }
            index += 1;
            keep
        });
        self.unsettled = unsettled;
    }

    /// Drops a session from the cache (quarantine).
    pub fn forget(&mut self, id: &str) {
        if self.entries.remove(id).is_some() {
            if let Some(i) = self.order.iter().position(|x| **x == *id) {
                if i >= self.order.len() - self.unsettled {
                    self.unsettled -= 1;
                }
                self.order.remove(i);
            }
        }
    }

    /// Number of cached sessions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The session id a summary describes.
pub fn summary_session_id(s: &SessionSummary) -> &str {
    s.metadata.as_ref().map_or("", |m| m.session_id.as_str())
}

/// The terminal state recorded in a summary.
pub fn summary_state(s: &SessionSummary) -> SessionState {
    s.metadata.as_ref().and_then(|m| SessionState::try_from(m.state).ok()).unwrap_or(SessionState::Unspecified)
}

/// SESSION_NOT_OPEN for an ended session.
pub fn ended_not_open(s: &SessionSummary) -> KernelError {
    KernelError::new(
        ErrorCode::SessionNotOpen,
        format!(
            "session {} is {}",
            summary_session_id(s),
            summary_state(s).as_str_name().trim_start_matches("SESSION_STATE_")
        ),
    )
}

/// Whether an ended session accepted `message_id`.
pub fn summary_has_message(s: &SessionSummary, message_id: &str) -> bool {
    s.message_ids.binary_search_by(|m| m.as_str().cmp(message_id)).is_ok()
}

/// The summary of a session that just reached a terminal state.
pub fn summarize(s: &Session, ended_at: i64) -> SessionSummary {
    let mut controllers: Vec<String> = if s.initiator_only_commitment {
        Vec::new()
    } else {
        use crate::policy::CommitmentAuthority;
        match &s.policy.authority {
            CommitmentAuthority::InitiatorOnly => Vec::new(),
            CommitmentAuthority::AnyParticipant => s.participants.to_vec(),
            CommitmentAuthority::DesignatedRole(roles) => roles.clone(),
        }
    };
    controllers.retain(|c| **c != *s.initiator);
    controllers.sort();
    controllers.dedup();
    SessionSummary {
        metadata: Some(s.metadata()),
        last_seq: s.seq,
        ended_at_unix_ms: ended_at,
        message_ids: s.seen.iter().map(String::from).collect(),
        controllers,
    }
}

#[cfg(test)]
mod tests {
    use macp_wire::v1::SessionMetadata;

    use super::*;

    fn summary(id: &str, ended_at: i64) -> SessionSummary {
        SessionSummary {
            metadata: Some(SessionMetadata { session_id: id.into(), ..Default::default() }),
            ended_at_unix_ms: ended_at,
            ..Default::default()
        }
    }

    fn ended(id: &str, at: i64) -> Ended {
        Ended::of_summary(summary(id, at))
    }

    #[test]
    fn retention_forgets_old_entries_and_keeps_the_unsettled_count() {
        let mut c = EndedCache::default();
        c.insert_ended("a".into(), ended("a", 10));
        c.insert_ended("b".into(), ended("b", 20));
        c.settle(10);
        c.insert_ended("c".into(), ended("c", 5));
        c.insert_ended("d".into(), ended("d", 30));
        c.insert_loaded(summary("e", 1));
        c.forget_ended_before(15);
        assert!(c.get("a").is_none() && c.get("c").is_none() && c.get("e").is_none());
        assert!(c.get("b").is_some() && c.get("d").is_some());
        // `d` is still unsettled (storage may not have it yet): trimming
        // keeps it and drops the settled `b`.
        c.trim(0);
        assert!(c.get("b").is_none() && c.get("d").is_some());
        c.settle(0);
        assert_eq!(c.len(), 0, "a settled cache of size 0 is empty");
    }
}
