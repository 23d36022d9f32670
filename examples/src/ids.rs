//! Session and message identifiers.
//!
//! The runtime's strict id policy wants a lowercase hyphenated UUID v4 (or
//! v7, or a ≥22-char base64url token). Rather than add the `uuid` crate for
//! one function, ids are made here: 122 bits from SplitMix64 over a
//! per-process seed (clock and pid) and a counter, with the v4 version and
//! variant bits set. That gives ids unique within a process by construction
//! (the scramble is a bijection of the counter) and, with overwhelming
//! probability, across processes — which is all a client needs, because the
//! runtime itself refuses a second SessionStart for an existing id. They are
//! not secret and not meant to be: use a CSPRNG-backed UUID where ids must be
//! unguessable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::rng::{mix, Rng};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn process_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(Rng::seed_from_time)
}

fn next() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A fresh session id shaped as a lowercase UUID v4.
pub fn session_id() -> String {
    let n = next();
    let seed = process_seed();
    let hi = mix(seed ^ n);
    let lo = mix(hi ^ seed.rotate_left(17) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    uuid_v4(hi, lo)
}

/// Formats 128 bits as a UUID, forcing version 4 and the RFC 4122 variant.
pub fn uuid_v4(hi: u64, lo: u64) -> String {
    let hi = (hi & !0xf000) | 0x4000; // version nibble
    let lo = (lo & !(0xc << 60)) | (0x8 << 60); // variant 10xx
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// A fresh message id. Message ids only need to be unique within their
/// session (they key deduplication), so a process-wide counter suffices;
/// the seed prefix keeps two processes sending into one session apart.
pub fn message_id() -> String {
    format!("m-{:08x}-{}", process_seed() as u32, next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_v4_shaped_and_distinct() {
        let a = session_id();
        let b = session_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "4", "{id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
            assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        assert_eq!(uuid_v4(0, 0), "00000000-0000-4000-8000-000000000000");
    }
}
