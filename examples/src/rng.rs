//! A small deterministic pseudo-random generator (SplitMix64).
//!
//! The fuzz client needs reproducible randomness: a failing run prints its
//! seed, and rerunning with `--seed` replays exactly the same envelopes.
//! SplitMix64 is a few lines, has good statistical quality for test-data
//! generation, and keeps the examples free of a `rand` version to track.
//! It is not cryptographic, and nothing here needs it to be.

/// SplitMix64 state.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator that yields the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A seed from the clock and the process id, for runs that do not ask
    /// for a specific one (the seed is printed so the run can be replayed).
    pub fn seed_from_time() -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        mix(t ^ (u64::from(std::process::id()) << 32))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `0..n` (`n > 0`); the tiny modulo bias is irrelevant here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// Between `lo` and `hi` (inclusive) random bytes.
    pub fn bytes_between(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let len = lo + self.below((hi - lo + 1) as u64) as usize;
        self.bytes(len)
    }

    /// A string of `lo..=hi` characters drawn from `alphabet`.
    pub fn string_between(&mut self, lo: usize, hi: usize, alphabet: &[u8]) -> String {
        let len = lo + self.below((hi - lo + 1) as u64) as usize;
        self.string(len, alphabet)
    }

    /// A random string of `len` characters drawn from `alphabet`.
    pub fn string(&mut self, len: usize, alphabet: &[u8]) -> String {
        (0..len).map(|_| *self.pick(alphabet) as char).collect()
    }
}

/// The SplitMix64 finaliser: a bijective scramble of 64 bits.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(
            (0..16).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..16).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        assert_eq!(Rng::new(1).bytes(13).len(), 13);
        assert!(Rng::new(3).below(5) < 5);
    }
}
