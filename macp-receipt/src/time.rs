//! RFC 3339 timestamps for `issued_at`, from recorded kernel times.
//!
//! Written here rather than pulled from a date crate: only one direction
//! (milliseconds since the epoch to a UTC string) is needed, and it must be
//! exactly reproducible, since it is part of the signed body.

/// `ms` (milliseconds since 1970-01-01T00:00:00Z) as
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, or `None` outside years 0000–9999, which
/// RFC 3339 cannot write.
pub(crate) fn rfc3339_utc_ms(ms: i64) -> Option<String> {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&year) {
        return None;
    }
    let sod = secs.rem_euclid(86_400);
    Some(format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", sod / 3600, sod % 3600 / 60, sod % 60))
}

/// The proleptic Gregorian date of a day count since 1970-01-01: split into
/// 400-year eras of 146 097 days, with years counted from March so the leap
/// day falls at the end of a year.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339_utc_ms(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(-1).unwrap(), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc_ms(951_782_400_000).unwrap(), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(1_700_000_000_123).unwrap(), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_utc_ms(4_107_542_399_999).unwrap(), "2100-02-28T23:59:59.999Z");
        assert_eq!(rfc3339_utc_ms(4_107_542_400_000).unwrap(), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(253_402_300_799_999).unwrap(), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc_ms(253_402_300_800_000), None);
        assert_eq!(rfc3339_utc_ms(i64::MIN), None);
        assert_eq!(rfc3339_utc_ms(i64::MAX), None);
    }

    /// Day by day over four centuries, the date advances like a calendar.
    #[test]
    fn consecutive_days_are_consecutive_dates() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut prev = civil_from_days(-719_468); // 0000-03-01
        assert_eq!(prev, (0, 3, 1));
        for d in -719_467..(-719_467 + 146_097) {
            let (y, m, day) = civil_from_days(d);
            let len = match prev.1 {
                2 if leap(prev.0) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let expected = if prev.2 < len {
                (prev.0, prev.1, prev.2 + 1)
            } else if prev.1 < 12 {
                (prev.0, prev.1 + 1, 1)
            } else {
                (prev.0 + 1, 1, 1)
            };
            assert_eq!((y, m, day), expected, "day {d}");
            prev = (y, m, day);
        }
    }
}
