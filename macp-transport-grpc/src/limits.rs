//! Per-sender rate limits (SessionStart per minute, other messages per
//! minute), using `governor`'s GCRA limiter rather than a hand-rolled window:
//! it is lock-free, well tested, and its keyed store can be pruned.
//!
//! Rate limits are operational, not protocol state: they live in the adapter
//! and never reach the kernel, so replay is unaffected by them.

use std::num::NonZeroU32;

use compact_str::CompactString;
use governor::{DefaultKeyedRateLimiter, Quota};

/// Which budget a message draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// SessionStart envelopes.
    SessionStart,
    /// Everything else (mode messages, Signals, Progress, control RPCs).
    Message,
}

/// The two per-sender limiters. Keys are sender ids stored inline up to 24
/// bytes (no heap allocation per sender for most): every distinct sender
/// of the last seconds has an entry, 100,000 of them when as many sessions
/// are opened by distinct initiators (issue 15).
pub struct RateLimits {
    starts: Option<DefaultKeyedRateLimiter<CompactString>>,
    messages: Option<DefaultKeyedRateLimiter<CompactString>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Limits per minute; 0 disables a limit.
    pub fn new(starts_per_minute: u32, messages_per_minute: u32) -> Self {
        let mk = |n: u32| NonZeroU32::new(n).map(|n| DefaultKeyedRateLimiter::keyed(Quota::per_minute(n)));
        RateLimits { starts: mk(starts_per_minute), messages: mk(messages_per_minute) }
    }

    /// Takes one unit from `sender`'s budget; false when exhausted.
    pub fn check(&self, sender: &str, budget: Budget) -> bool {
        let limiter = match budget {
            Budget::SessionStart => &self.starts,
            Budget::Message => &self.messages,
        };
        match limiter {
            None => true,
            Some(l) => l.check_key(&CompactString::from(sender)).is_ok(),
        }
    }

    /// Forgets senders whose budgets are full again (bounded memory).
    pub fn prune(&self) {
        for l in [&self.starts, &self.messages].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_plus_first_is_refused() {
        let l = RateLimits::new(3, 0);
        for _ in 0..3 {
            assert!(l.check("a", Budget::SessionStart));
        }
        assert!(!l.check("a", Budget::SessionStart));
        assert!(l.check("b", Budget::SessionStart), "budgets are per sender");
        assert!(l.check("a", Budget::Message), "0 disables the message limit");
    }

    /// Sender ids longer than the inline 24 bytes are whole keys too: two
    /// that share a long prefix have budgets of their own.
    #[test]
    fn long_sender_ids_have_budgets_of_their_own() {
        let l = RateLimits::new(1, 0);
        let a = "agent://a-rather-long-common-prefix/one";
        let b = "agent://a-rather-long-common-prefix/two";
        assert!(l.check(a, Budget::SessionStart));
        assert!(!l.check(a, Budget::SessionStart));
        assert!(l.check(b, Budget::SessionStart));
        assert!(!l.check(b, Budget::SessionStart));
    }
}
