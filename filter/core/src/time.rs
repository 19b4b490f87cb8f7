//! Time units, in one place. The filter's clocks count nanoseconds; the
//! algorithm's resolution is the microsecond, the unit Redis computes in
//! (emission intervals are whole microseconds, so both stores decide
//! alike); rates, windows and the headers speak whole seconds.

pub const NANOS_PER_MICRO: u64 = 1_000;
pub const MICROS_PER_SECOND: u64 = 1_000_000;
pub const NANOS_PER_SECOND: u64 = NANOS_PER_MICRO * MICROS_PER_SECOND;
pub const NANOS_PER_MILLI: u64 = NANOS_PER_SECOND / 1_000;

pub const SECONDS_PER_MINUTE: u64 = 60;
pub const SECONDS_PER_HOUR: u64 = 60 * SECONDS_PER_MINUTE;
pub const SECONDS_PER_DAY: u64 = 24 * SECONDS_PER_HOUR;
/// A year of 365 days, the unit of the longest capacity.
pub const SECONDS_PER_YEAR: u64 = 365 * SECONDS_PER_DAY;

/// Whole seconds, rounded up: a client waiting this long is never early.
pub const fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SECOND)
}

/// Seconds as nanoseconds, saturating.
pub const fn seconds_to_nanos(seconds: u64) -> u64 {
    seconds.saturating_mul(NANOS_PER_SECOND)
}

/// Seconds as microseconds, saturating.
pub const fn seconds_to_micros(seconds: u64) -> u64 {
    seconds.saturating_mul(MICROS_PER_SECOND)
}

/// Microseconds (what Redis answers) as nanoseconds, saturating.
pub const fn micros_to_nanos(micros: u64) -> u64 {
    micros.saturating_mul(NANOS_PER_MICRO)
}

/// Nanoseconds as whole microseconds, rounded down (exact for the
/// algorithm's intervals, which are whole microseconds).
pub const fn nanos_to_micros(nanos: u64) -> u64 {
    nanos / NANOS_PER_MICRO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_as_documented_and_saturate() {
        assert_eq!(ceil_seconds(0), 0);
        assert_eq!(ceil_seconds(1), 1);
        assert_eq!(ceil_seconds(NANOS_PER_SECOND), 1);
        assert_eq!(ceil_seconds(NANOS_PER_SECOND + 1), 2);
        assert_eq!(micros_to_nanos(1_500), 1_500_000);
        assert_eq!(nanos_to_micros(1_999), 1);
        assert_eq!(seconds_to_micros(86_400), 86_400_000_000);
        assert_eq!(seconds_to_nanos(2), 2_000_000_000);
        assert_eq!(micros_to_nanos(u64::MAX), u64::MAX);
        assert_eq!(seconds_to_nanos(u64::MAX), u64::MAX);
        assert_eq!(SECONDS_PER_DAY, 86_400);
    }
}
