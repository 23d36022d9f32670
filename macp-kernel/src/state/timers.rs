//! The timer index: every session with pending work for a tick (TTL expiry,
//! suspension cap, a mode deadline), ordered by due time, so the driver can
//! ask for the earliest one in O(log n) and a tick visits only due sessions.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::session::Session;

/// `(due time, session id)` for every session with a pending timer; the id
/// is the session's own `Arc`, not a copy of the string.
#[derive(Debug, Default)]
pub(crate) struct Timers(BTreeSet<(i64, Arc<str>)>);

impl Timers {
    /// The earliest due time.
    pub fn first(&self) -> Option<i64> {
        self.0.first().map(|(t, _)| *t)
    }

    /// Sessions due at `now`, earliest first.
    pub fn due(&self, now: i64) -> Vec<String> {
        self.0.iter().take_while(|(t, _)| *t <= now).map(|(_, s)| s.to_string()).collect()
    }

    /// Moves `s` to the right place after a change. A session carries the
    /// due time it is indexed under, so the common case (an accepted message
    /// moves no deadline) costs one comparison.
    pub fn reindex(&mut self, s: &mut Session) {
        let next = s.next_timer();
        if next == s.timer_at {
            return;
        }
        if let Some(old) = s.timer_at.take() {
            self.0.remove(&(old, s.id.clone()));
        }
        if let Some(t) = next {
            s.timer_at = Some(t);
            self.0.insert((t, s.id.clone()));
        }
    }

    /// Forgets a session that leaves the kernel.
    pub fn remove(&mut self, s: &Session) {
        if let Some(t) = s.timer_at {
            self.0.remove(&(t, s.id.clone()));
        }
    }
}
