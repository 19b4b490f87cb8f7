//! DRF-style rates: `N/period`, where only the first letter of the period
//! counts (`s`, `m`, `h`, `d`), with an optional multiplier (`100/15m`).

use std::fmt;

use crate::time::{
    micros_to_nanos, seconds_to_micros, seconds_to_nanos, MICROS_PER_SECOND, SECONDS_PER_DAY,
    SECONDS_PER_HOUR, SECONDS_PER_MINUTE, SECONDS_PER_YEAR,
};

/// The longest window a rate may span; it catches typos like `1/9999d`.
/// [`MAX_CAPACITY_SECONDS`] bounds what a burst may add on top.
pub const MAX_WINDOW_SECONDS: u64 = 366 * SECONDS_PER_DAY;

/// The longest capacity (burst x emission interval) a limit may have: 50
/// years of 365 days. A TAT runs up to `now + capacity`, and both stores
/// must compute it exactly with a wall clock up to 2200: the local store in
/// u64 nanoseconds (overflows after 2554), Redis in Lua doubles over
/// microseconds (exact below 2^53 µs, 2255).
pub const MAX_CAPACITY_SECONDS: u64 = 50 * SECONDS_PER_YEAR;
pub const MAX_CAPACITY_NANOS: u64 = seconds_to_nanos(MAX_CAPACITY_SECONDS);

/// The largest request count a rate may name.
pub const MAX_COUNT: u64 = 1_000_000_000;

/// The fastest rate: one request per microsecond, the algorithm's resolution.
pub const MAX_PER_SECOND: u64 = MICROS_PER_SECOND;

/// A parsed rate: `count` requests per `window_seconds`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub window_seconds: u64,
}

/// Why a rate string was refused. The message quotes the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateError {
    MissingSlash(String),
    BadCount(String),
    BadPeriod(String),
    WindowTooLong(String),
    TooFast(String),
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateError::MissingSlash(s) => write!(
                f,
                "invalid rate \"{s}\": expected N/period, e.g. \"1/s\", \"100/min\", \"1000/day\" or \"100/15m\""
            ),
            RateError::BadCount(s) => write!(
                f,
                "invalid rate \"{s}\": the count before '/' must be a whole number from 1 to {MAX_COUNT}"
            ),
            RateError::BadPeriod(s) => write!(
                f,
                "invalid rate \"{s}\": the period must be an optional multiplier and a unit starting with s, m, h or d (\"sec\", \"min\", \"15m\", \"hour\", \"day\")"
            ),
            RateError::WindowTooLong(s) => write!(
                f,
                "invalid rate \"{s}\": the window is longer than {} days",
                MAX_WINDOW_SECONDS / SECONDS_PER_DAY
            ),
            RateError::TooFast(s) => write!(
                f,
                "invalid rate \"{s}\": more than {MAX_PER_SECOND} requests per second"
            ),
        }
    }
}

impl std::error::Error for RateError {}

impl Rate {
    /// Parses DRF's syntax. Like DRF, `100/min` and `100/month` both mean
    /// per minute: only the unit's first letter counts.
    pub fn parse(text: &str) -> Result<Rate, RateError> {
        let trimmed = text.trim();
        let (count_text, period_text) = trimmed
            .split_once('/')
            .ok_or_else(|| RateError::MissingSlash(text.to_string()))?;
        let count = parse_digits(count_text)
            .filter(|c| (1..=MAX_COUNT).contains(c))
            .ok_or_else(|| RateError::BadCount(text.to_string()))?;

        let unit_start = period_text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| RateError::BadPeriod(text.to_string()))?;
        let (multiplier_text, unit) = period_text.split_at(unit_start);
        let multiplier = if multiplier_text.is_empty() {
            1
        } else {
            parse_digits(multiplier_text)
                .filter(|m| *m >= 1)
                .ok_or_else(|| RateError::BadPeriod(text.to_string()))?
        };
        if !unit.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(RateError::BadPeriod(text.to_string()));
        }
        let unit_seconds = match unit.as_bytes().first() {
            Some(b's') => 1,
            Some(b'm') => SECONDS_PER_MINUTE,
            Some(b'h') => SECONDS_PER_HOUR,
            Some(b'd') => SECONDS_PER_DAY,
            _ => return Err(RateError::BadPeriod(text.to_string())),
        };
        let window_seconds = multiplier
            .checked_mul(unit_seconds)
            .filter(|w| *w <= MAX_WINDOW_SECONDS)
            .ok_or_else(|| RateError::WindowTooLong(text.to_string()))?;
        if count > window_seconds.saturating_mul(MAX_PER_SECOND) {
            return Err(RateError::TooFast(text.to_string()));
        }
        Ok(Rate {
            count,
            window_seconds,
        })
    }

    /// The window in nanoseconds (at most 366 days, so it fits easily).
    pub fn window_nanos(&self) -> u64 {
        seconds_to_nanos(self.window_seconds)
    }

    /// GCRA's emission interval `T = window / count`, rounded up to a whole
    /// microsecond: the long-run rate never exceeds the configured one, and
    /// Redis (whose Lua numbers are doubles, exact to 2^53) works in the very
    /// same microseconds, so local and global mode decide identically.
    pub fn interval_nanos(&self) -> u64 {
        let window = seconds_to_micros(self.window_seconds);
        micros_to_nanos(window.div_ceil(self.count.max(1)))
    }
}

/// Whether a rate's period reads as a month (`"1000/month"`, `"5/mo"`):
/// DRF, and this filter, take it as a minute, which is rarely what was
/// meant; the policy warns.
pub fn reads_as_month(text: &str) -> bool {
    text.split_once('/').is_some_and(|(_, period)| {
        period
            .trim()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .starts_with("mo")
    })
}

fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u64, window_seconds: u64) -> Rate {
        Rate {
            count,
            window_seconds,
        }
    }

    #[test]
    fn drf_examples_parse_with_first_letter_of_period() {
        assert_eq!(Rate::parse("1/s"), Ok(rate(1, 1)));
        assert_eq!(Rate::parse("10/sec"), Ok(rate(10, 1)));
        assert_eq!(Rate::parse("100/min"), Ok(rate(100, 60)));
        assert_eq!(Rate::parse("1000/hour"), Ok(rate(1000, 3600)));
        assert_eq!(Rate::parse("5000/day"), Ok(rate(5000, 86_400)));
        assert_eq!(Rate::parse("5/minute"), Ok(rate(5, 60)));
        // DRF's quirk, kept on purpose: "month" is a minute.
        assert_eq!(Rate::parse("5/month"), Ok(rate(5, 60)));
        assert!(reads_as_month("5/month") && reads_as_month("5/2months"));
        assert!(!reads_as_month("5/min") && !reads_as_month("5/m") && !reads_as_month("5/minute"));
    }

    #[test]
    fn multiplier_scales_the_period() {
        assert_eq!(Rate::parse("100/15m"), Ok(rate(100, 900)));
        assert_eq!(Rate::parse("100/15min"), Ok(rate(100, 900)));
        assert_eq!(Rate::parse("3/2h"), Ok(rate(3, 7200)));
        assert_eq!(Rate::parse(" 7/30s "), Ok(rate(7, 30)));
    }

    #[test]
    fn bad_rates_are_refused_with_the_text_quoted() {
        for bad in [
            "", "1", "s", "/s", "0/s", "-1/s", "1.5/s", "x/s", "1/", "1/x", "1/S", "1/Sec",
        ] {
            let err = Rate::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("\"{bad}\"")), "{err}");
        }
        assert!(matches!(Rate::parse("1/0m"), Err(RateError::BadPeriod(_))));
        assert!(matches!(Rate::parse("1/15"), Err(RateError::BadPeriod(_))));
        assert!(matches!(
            Rate::parse("1/367d"),
            Err(RateError::WindowTooLong(_))
        ));
        assert!(matches!(
            Rate::parse("1/99999999999999999999d"),
            Err(RateError::BadPeriod(_))
        ));
        assert!(matches!(
            Rate::parse("1000000001/s"),
            Err(RateError::BadCount(_))
        ));
    }

    #[test]
    fn interval_rounds_up_to_microseconds_so_the_rate_is_never_exceeded() {
        assert_eq!(rate(1, 1).interval_nanos(), 1_000_000_000);
        assert_eq!(rate(3, 1).interval_nanos(), 333_334_000);
        assert_eq!(rate(1_000_000, 1).interval_nanos(), 1_000);
        assert!(matches!(
            Rate::parse("1000001/s"),
            Err(RateError::TooFast(_))
        ));
        assert!(Rate::parse("1000001/2s").is_ok());
        assert_eq!(rate(1000, 86_400).interval_nanos(), 86_400_000_000);
        assert!(rate(3, 1).interval_nanos() * 3 >= rate(3, 1).window_nanos());
    }
}
