//! Wording shared by error messages and logs: a count with its noun in the
//! right number ("1 participant", "2 participants", "0 records"), so no
//! message reads "1 participants still to vote".

use std::fmt;

/// `n` and a regular English noun, singular for exactly one and plural
/// (`noun` + "s") otherwise. Formats in place, without allocating.
#[derive(Clone, Copy, Debug)]
pub struct Count<'a>(pub u64, pub &'a str);

impl Count<'_> {
    /// Any integer count (lengths, tallies); negative counts read as 0.
    pub fn of(n: impl TryInto<u64>, noun: &str) -> Count<'_> {
        Count(n.try_into().unwrap_or(0), noun)
    }
}

impl fmt::Display for Count<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Count(n, noun) = *self;
        if n == 1 {
            write!(f, "1 {noun}")
        } else {
            write!(f, "{n} {noun}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Count;

    #[test]
    fn one_is_singular_everything_else_plural() {
        assert_eq!(Count(1, "participant").to_string(), "1 participant");
        assert_eq!(Count(0, "record").to_string(), "0 records");
        assert_eq!(Count(2, "approval").to_string(), "2 approvals");
        assert_eq!(Count::of(-3i64, "session").to_string(), "0 sessions");
        assert_eq!(Count::of(1usize, "byte").to_string(), "1 byte");
    }
}
