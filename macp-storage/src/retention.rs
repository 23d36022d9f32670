//! How long an ended session's history stays readable.
//!
//! The accepted history is our users' audit trail, so the default is
//! [`Retention::Forever`]: deleting it must be the operator's choice
//! (`MACP_HISTORY_RETENTION=7d`). Retention counts from the moment a
//! session ended; open sessions are never deleted.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A retention period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Retention {
    /// Keep every ended session's history.
    #[default]
    Forever,
    /// Delete an ended session this long after it ended.
    For(Duration),
}

impl Retention {
    /// From the reference runtime's `MACP_SESSION_DISK_RETENTION_SECS`
    /// (seconds, 0 meaning forever), so configurations carry over.
    pub fn from_secs(secs: u64) -> Self {
        if secs == 0 {
            Retention::Forever
        } else {
            Retention::For(Duration::from_secs(secs))
        }
    }

    /// Whether a session that ended at `ended_at_ms` is past retention at
    /// `now_ms`.
    pub fn expired(&self, ended_at_ms: i64, now_ms: i64) -> bool {
        match self {
            Retention::Forever => false,
            Retention::For(d) => {
                let d = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                ended_at_ms.saturating_add(d) < now_ms
            }
        }
    }

    /// The latest end time that is past retention at `now_ms` (sessions that
    /// ended strictly before it are deleted), or `None` for forever.
    pub fn cutoff(&self, now_ms: i64) -> Option<i64> {
        match self {
            Retention::Forever => None,
            Retention::For(d) => Some(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        }
    }
}

/// Why a retention setting does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a retention period: use 'forever' or a number with a unit, such as 30s, 10m, 12h or 7d")]
pub struct BadRetention(pub String);

impl FromStr for Retention {
    type Err = BadRetention;

    /// `forever`, or a positive whole number followed by `s`, `m`, `h` or
    /// `d` (`30s`, `10m`, `12h`, `7d`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("forever") {
            return Ok(Retention::Forever);
        }
        let bad = || BadRetention(s.to_string());
        let unit = t.chars().last().ok_or_else(bad)?;
        let secs_per = match unit {
            's' => 1u64,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        n.checked_mul(secs_per).map(|secs| Retention::For(Duration::from_secs(secs))).ok_or_else(bad)
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::Forever => f.write_str("forever"),
            Retention::For(d) => {
                let s = d.as_secs();
                if s % 86_400 == 0 {
                    write!(f, "{}d", s / 86_400)
                } else if s % 3600 == 0 {
                    write!(f, "{}h", s / 3600)
                } else if s % 60 == 0 {
                    write!(f, "{}m", s / 60)
                } else {
                    write!(f, "{s}s")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("forever".parse(), Ok(Retention::Forever));
        assert_eq!("30s".parse(), Ok(Retention::For(Duration::from_secs(30))));
        assert_eq!("10m".parse(), Ok(Retention::For(Duration::from_secs(600))));
        assert_eq!("12h".parse(), Ok(Retention::For(Duration::from_secs(43_200))));
        assert_eq!("7d".parse(), Ok(Retention::For(Duration::from_secs(604_800))));
        for bad in ["", "7", "0s", "-1d", "1w", "d", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<Retention>().is_err(), "{bad:?} parsed");
        }
        for r in ["forever", "30s", "10m", "12h", "7d", "90s"] {
            assert_eq!(r.parse::<Retention>().unwrap().to_string(), r);
        }
    }

    #[test]
    fn counts_from_the_end_of_a_session() {
        let r = Retention::For(Duration::from_secs(10));
        assert!(!r.expired(1_000, 11_000));
        assert!(r.expired(1_000, 11_001));
        assert!(!Retention::Forever.expired(0, i64::MAX));
        assert_eq!(Retention::from_secs(0), Retention::Forever);
        assert_eq!(r.cutoff(11_001), Some(1_001));
    }
}
