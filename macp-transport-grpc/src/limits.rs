//! Per-sender rate limits (SessionStart per minute, other messages per
//! minute), using `governor`'s GCRA limiter rather than a hand-rolled window:
//! it is lock-free, well tested, and its keyed store can be pruned.
//!
//! Rate limits are operational, not protocol state: they live in the adapter
//! and never reach the kernel, so replay is unaffected by them.

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota};

/// Which budget a message draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// SessionStart envelopes.
    SessionStart,
    /// Everything else (mode messages, Signals, Progress, control RPCs).
    Message,
}

/// The two per-sender limiters.
///
/// Every distinct sender of the last seconds has an entry — 100,000 of them
/// when as many sessions are opened by distinct initiators (issue 15) — so
/// an entry is kept small: its key is a 64-bit keyed hash of the sender id
/// (SipHash with this process's random keys), not the id. That is 16 bytes
/// per entry with no heap allocation, where a copied id of 47 bytes cost
/// about 100 (measured: 8–11 MiB of RSS at 100,000 senders, and the freed
/// ids left holes among the kernel's long-lived allocations after pruning).
/// Two senders share a budget only if their hashes collide: about one pair
/// in 2^64, and not one a client can aim for without the process's keys.
pub struct RateLimits {
    starts: Option<DefaultKeyedRateLimiter<u64>>,
    messages: Option<DefaultKeyedRateLimiter<u64>>,
    keys: RandomState,
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
        RateLimits { starts: mk(starts_per_minute), messages: mk(messages_per_minute), keys: RandomState::new() }
    }

    /// Takes one unit from `sender`'s budget; false when exhausted.
    pub fn check(&self, sender: &str, budget: Budget) -> bool {
        let limiter = match budget {
            Budget::SessionStart => &self.starts,
            Budget::Message => &self.messages,
        };
        match limiter {
            None => true,
            Some(l) => l.check_key(&self.keys.hash_one(sender)).is_ok(),
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

    /// Long sender ids that share a long prefix have budgets of their own
    /// (the key hashes the whole id).
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
