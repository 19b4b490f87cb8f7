//! Calendar periods of quotas: the day, week or month that contains a
//! moment, in a fixed UTC offset. Pure arithmetic on Unix seconds, with
//! Howard Hinnant's `days_from_civil` / `civil_from_days` (proleptic
//! Gregorian calendar: months of 28 to 31 days, leap years every 4 years
//! but not every 100 unless every 400). `gcra.lua` does the very same in
//! Lua; the differential test holds the two to each other.
//!
//! An offset is fixed (`+02:00`), never a time zone with daylight saving:
//! every day is 86,400 seconds, so consecutive period ends are at least a
//! day apart, which the quota representation relies on (`quota`).

use std::fmt;

use crate::time::{NANOS_PER_SECOND, SECONDS_PER_DAY};

/// The largest offset from UTC, either way: 14 hours (Kiribati's +14:00).
pub const MAX_OFFSET_MINUTES: i16 = 14 * 60;

/// What a quota counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeriodKind {
    Day,
    Week,
    Month,
}

impl PeriodKind {
    /// The unit as written in a quota (`1000/day`).
    pub fn unit(self) -> &'static str {
        match self {
            PeriodKind::Day => "day",
            PeriodKind::Week => "week",
            PeriodKind::Month => "month",
        }
    }

    /// Its number on the wire to Redis (`batch::wire`).
    pub fn code(self) -> u64 {
        match self {
            PeriodKind::Day => 0,
            PeriodKind::Week => 1,
            PeriodKind::Month => 2,
        }
    }

    /// The longest such period, in seconds.
    pub fn longest_seconds(self) -> u64 {
        match self {
            PeriodKind::Day => SECONDS_PER_DAY,
            PeriodKind::Week => 7 * SECONDS_PER_DAY,
            PeriodKind::Month => 31 * SECONDS_PER_DAY,
        }
    }
}

/// A day of the week, Monday first (ISO 8601): 0 is Monday, 6 Sunday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Weekday(pub u8);

impl Weekday {
    pub const MONDAY: Weekday = Weekday(0);
    pub const NAMES: [&'static str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];

    pub fn parse(name: &str) -> Option<Weekday> {
        let index = Weekday::NAMES.iter().position(|n| *n == name)?;
        u8::try_from(index).ok().map(Weekday)
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Weekday::NAMES.get(usize::from(self.0)).unwrap_or(&"?");
        f.write_str(name)
    }
}

/// A calendar period: its kind, the UTC offset its days begin in, and
/// (weeks only) the day a week begins on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    pub kind: PeriodKind,
    /// Minutes east of UTC, within ±[`MAX_OFFSET_MINUTES`].
    pub offset_minutes: i16,
    pub week_start: Weekday,
}

/// A period's first moment and the first moment of the next, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: i64,
    pub end: i64,
}

impl Bounds {
    pub fn seconds(&self) -> u64 {
        u64::try_from(self.end.saturating_sub(self.start)).unwrap_or(0)
    }
}

impl Period {
    fn offset_seconds(&self) -> i64 {
        i64::from(self.offset_minutes) * 60
    }

    /// The period containing Unix second `now`: `start <= now < end`.
    pub fn bounds(&self, now: i64) -> Bounds {
        let day_seconds = SECONDS_PER_DAY as i64;
        let offset = self.offset_seconds();
        let day = now.saturating_add(offset).div_euclid(day_seconds);
        let (first, next) = match self.kind {
            PeriodKind::Day => (day, day + 1),
            PeriodKind::Week => {
                // 1970-01-01 was a Thursday: day 0 is weekday 3.
                let weekday = (day + 3).rem_euclid(7);
                let first = day - (weekday - i64::from(self.week_start.0)).rem_euclid(7);
                (first, first + 7)
            }
            PeriodKind::Month => {
                let (year, month, _) = civil_from_days(day);
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                (
                    days_from_civil(year, month, 1),
                    days_from_civil(next_year, next_month, 1),
                )
            }
        };
        Bounds {
            start: first * day_seconds - offset,
            end: next * day_seconds - offset,
        }
    }

    /// When the period containing `now_nanos` (Unix nanoseconds) ends, in
    /// Unix nanoseconds, and its length in seconds.
    pub fn end_nanos(&self, now_nanos: u64) -> (u64, u64) {
        let now = i64::try_from(now_nanos / NANOS_PER_SECOND).unwrap_or(i64::MAX);
        let bounds = self.bounds(now);
        let end = u64::try_from(bounds.end).unwrap_or(0);
        (end.saturating_mul(NANOS_PER_SECOND), bounds.seconds())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's
/// `days_from_civil`); `month` 1 to 12, `day` 1 to 31.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let shifted = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day since 1970-01-01: `(year, month, day)` (Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted + 2) / 5 + 1;
    let month = if shifted < 10 {
        shifted + 3
    } else {
        shifted - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// `+HH:MM` or `-HH:MM` as minutes east of UTC, within ±14:00.
pub fn parse_offset(text: &str) -> Option<i16> {
    let bytes = text.as_bytes();
    let [sign, h1, h2, b':', m1, m2] = bytes else {
        return None;
    };
    let digit = |b: &u8| b.is_ascii_digit().then(|| i16::from(*b - b'0'));
    let hours = digit(h1)? * 10 + digit(h2)?;
    let minutes = digit(m1)? * 10 + digit(m2)?;
    if minutes >= 60 {
        return None;
    }
    let total = hours * 60 + minutes;
    let signed = match sign {
        b'+' => total,
        b'-' => -total,
        _ => return None,
    };
    (-MAX_OFFSET_MINUTES..=MAX_OFFSET_MINUTES)
        .contains(&signed)
        .then_some(signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = SECONDS_PER_DAY as i64;

    fn period(kind: PeriodKind, offset_minutes: i16) -> Period {
        Period {
            kind,
            offset_minutes,
            week_start: Weekday::MONDAY,
        }
    }

    /// Unix seconds of a UTC date at midnight, from `date -u -d ... +%s`.
    const MARCH_1_2000: i64 = 951_868_800;
    const FEB_29_2000: i64 = 951_782_400;
    const MARCH_1_2100: i64 = 4_107_542_400;
    const FEB_29_2024: i64 = 1_709_164_800;
    const MARCH_1_2023: i64 = 1_677_628_800;
    const MARCH_1_2400: i64 = 13_574_649_600;

    #[test]
    fn known_dates_convert_both_ways() {
        for (seconds, date) in [
            (0, (1970, 1, 1)),
            (MARCH_1_2000, (2000, 3, 1)),
            (FEB_29_2000, (2000, 2, 29)),
            (MARCH_1_2100, (2100, 3, 1)),
            (FEB_29_2024, (2024, 2, 29)),
            (MARCH_1_2023, (2023, 3, 1)),
            (MARCH_1_2400, (2400, 3, 1)),
            (-DAY, (1969, 12, 31)),
        ] {
            let days = seconds / DAY;
            assert_eq!(civil_from_days(days), date, "{seconds}");
            assert_eq!(days_from_civil(date.0, date.1, date.2), days, "{date:?}");
        }
    }

    /// Days in a month by the textbook rule, independent of Hinnant's.
    fn month_length(year: i64, month: u32) -> i64 {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn every_month_from_1970_to_2200_has_its_length_in_both_directions() {
        let mut day = 0;
        for year in 1970..2200 {
            for month in 1..=12 {
                assert_eq!(days_from_civil(year, month, 1), day, "{year}-{month}");
                let length = month_length(year, month);
                assert_eq!(
                    civil_from_days(day + length - 1),
                    (year, month, u32::try_from(length).unwrap())
                );
                let bounds = period(PeriodKind::Month, 0).bounds(day * DAY + 12 * 3600);
                assert_eq!(bounds.seconds(), u64::try_from(length * DAY).unwrap());
                day += length;
            }
        }
    }

    #[test]
    fn month_ends_of_28_29_30_and_31_days_and_the_century_leap_rules() {
        let month = period(PeriodKind::Month, 0);
        // February 2000 (a leap year: divisible by 400) has 29 days.
        let feb_2000 = month.bounds(FEB_29_2000 + 10);
        assert_eq!(feb_2000.end, MARCH_1_2000);
        assert_eq!(feb_2000.seconds(), 29 * 86_400);
        // February 2100 (divisible by 100, not by 400) has 28.
        let feb_2100 = month.bounds(MARCH_1_2100 - 1);
        assert_eq!(feb_2100.end, MARCH_1_2100);
        assert_eq!(feb_2100.seconds(), 28 * 86_400);
        assert_eq!(month.bounds(MARCH_1_2023 - 1).seconds(), 28 * 86_400);
        assert_eq!(month.bounds(FEB_29_2024).seconds(), 29 * 86_400);
        // March 2000: 31 days; April 2000: 30.
        assert_eq!(month.bounds(MARCH_1_2000).seconds(), 31 * 86_400);
        let april = month.bounds(MARCH_1_2000 + 31 * DAY);
        assert_eq!(april.start, MARCH_1_2000 + 31 * DAY);
        assert_eq!(april.seconds(), 30 * 86_400);
        // December rolls over into January.
        let december = month.bounds(days_from_civil(2099, 12, 31) * DAY);
        assert_eq!(december.end, days_from_civil(2100, 1, 1) * DAY);
    }

    #[test]
    fn the_boundary_is_exact_to_the_nanosecond() {
        let day = period(PeriodKind::Day, 0);
        let end = u64::try_from(MARCH_1_2100).unwrap() * NANOS_PER_SECOND;
        assert_eq!(day.end_nanos(end - 1), (end, 86_400));
        assert_eq!(
            day.end_nanos(end),
            (end + 86_400 * NANOS_PER_SECOND, 86_400)
        );
        let month = period(PeriodKind::Month, 0);
        assert_eq!(month.end_nanos(end - 1).0, end);
        assert_eq!(
            month.end_nanos(end).0,
            u64::try_from(days_from_civil(2100, 4, 1) * DAY).unwrap() * NANOS_PER_SECOND
        );
    }

    #[test]
    fn offsets_move_the_boundary_to_local_midnight() {
        // +02:00: March begins at 22:00 UTC on the last day of February.
        let plus_two = period(PeriodKind::Month, 120);
        let end = MARCH_1_2000 - 2 * 3600;
        assert_eq!(plus_two.bounds(end - 1).end, end);
        assert_eq!(plus_two.bounds(end).start, end);
        // -05:30: a day begins at 05:30 UTC.
        let minus = period(PeriodKind::Day, -330);
        let start = MARCH_1_2000 + 5 * 3600 + 1800;
        assert_eq!(minus.bounds(start).start, start);
        assert_eq!(minus.bounds(start - 1).end, start);
        // ±14:00 put one UTC instant in three different local days.
        let instant = MARCH_1_2000 + 12 * 3600;
        let start = |offset| period(PeriodKind::Day, offset).bounds(instant).start;
        assert_eq!(start(840), MARCH_1_2000 + DAY - 14 * 3600, "March 2");
        assert_eq!(start(0), MARCH_1_2000, "March 1");
        assert_eq!(start(-840), MARCH_1_2000 - DAY + 14 * 3600, "February 29");
    }

    #[test]
    fn weeks_begin_on_the_configured_day() {
        // 2000-03-01 was a Wednesday.
        let monday = period(PeriodKind::Week, 0);
        let week = monday.bounds(MARCH_1_2000);
        assert_eq!(week.start, MARCH_1_2000 - 2 * DAY);
        assert_eq!(week.seconds(), 7 * 86_400);
        let wednesday = Period {
            week_start: Weekday(2),
            ..monday
        };
        assert_eq!(wednesday.bounds(MARCH_1_2000).start, MARCH_1_2000);
        assert_eq!(wednesday.bounds(MARCH_1_2000 - 1).end, MARCH_1_2000);
        let sunday = Period {
            week_start: Weekday::parse("sunday").unwrap(),
            ..monday
        };
        assert_eq!(sunday.bounds(MARCH_1_2000).start, MARCH_1_2000 - 3 * DAY);
        // 1970-01-05 was the first Monday of the epoch.
        assert_eq!(monday.bounds(345_600).start, 345_600);
        assert_eq!(monday.bounds(345_599).start, 345_600 - 7 * DAY);
    }

    #[test]
    fn offsets_parse_strictly_within_fourteen_hours() {
        assert_eq!(parse_offset("+00:00"), Some(0));
        assert_eq!(parse_offset("-00:00"), Some(0));
        assert_eq!(parse_offset("+02:00"), Some(120));
        assert_eq!(parse_offset("-05:30"), Some(-330));
        assert_eq!(parse_offset("+14:00"), Some(840));
        assert_eq!(parse_offset("-14:00"), Some(-840));
        for bad in [
            "", "Z", "UTC", "+2:00", "02:00", "+02", "+0200", "+14:01", "-15:00", "+01:60",
            "+a1:00", " +01:00", "+01:00 ",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad:?}");
        }
    }

    fn arb_period() -> impl Strategy<Value = Period> {
        (
            prop::sample::select(vec![PeriodKind::Day, PeriodKind::Week, PeriodKind::Month]),
            -MAX_OFFSET_MINUTES..=MAX_OFFSET_MINUTES,
            0u8..7,
        )
            .prop_map(|(kind, offset_minutes, week_start)| Period {
                kind,
                offset_minutes,
                week_start: Weekday(week_start),
            })
    }

    proptest! {
        /// Every moment from 1970 to 2200 lies in exactly one period, which
        /// starts and ends at local midnight (on the week's first day, on
        /// the 1st) and is as long as its kind says.
        #[test]
        fn periods_tile_time_at_local_midnights(
            p in arb_period(),
            now in 0i64..7_258_118_400,
        ) {
            let b = p.bounds(now);
            prop_assert!(b.start <= now && now < b.end);
            prop_assert_eq!(p.bounds(b.end).start, b.end);
            prop_assert_eq!(p.bounds(b.start).start, b.start);
            prop_assert_eq!(p.bounds(b.start - 1).end, b.start);
            let local = b.start + i64::from(p.offset_minutes) * 60;
            prop_assert_eq!(local.rem_euclid(DAY), 0);
            let (_, _, day) = civil_from_days(local.div_euclid(DAY));
            match p.kind {
                PeriodKind::Day => prop_assert_eq!(b.seconds(), 86_400),
                PeriodKind::Week => {
                    prop_assert_eq!(b.seconds(), 7 * 86_400);
                    prop_assert_eq!((local.div_euclid(DAY) + 3).rem_euclid(7), i64::from(p.week_start.0));
                }
                PeriodKind::Month => {
                    prop_assert_eq!(day, 1);
                    prop_assert!((28 * 86_400..=31 * 86_400).contains(&b.seconds()));
                }
            }
        }

        #[test]
        fn civil_dates_round_trip(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
