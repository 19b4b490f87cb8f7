//! Log lines that could repeat on every request (a backend down, shadow
//! mode letting denials through) are written at most once per cause every
//! [`LOG_EVERY_NANOS`]: the first occurrence is visible, a flood is not.

use std::cell::Cell;

/// The shortest gap between two lines of one cause.
pub const LOG_EVERY_NANOS: u64 = 10 * ratelimit_core::time::NANOS_PER_SECOND;

/// The last time each of `N` causes was logged (0: never).
pub struct LogLimit<const N: usize> {
    last: [Cell<u64>; N],
}

impl<const N: usize> Default for LogLimit<N> {
    fn default() -> Self {
        LogLimit {
            last: std::array::from_fn(|_| Cell::new(0)),
        }
    }
}

impl<const N: usize> LogLimit<N> {
    /// Whether cause `index` may be logged at `now`; if so, it is recorded.
    pub fn allow(&self, index: usize, now: u64) -> bool {
        let Some(last) = self.last.get(index) else {
            return false;
        };
        if last.get() != 0 && now.saturating_sub(last.get()) < LOG_EVERY_NANOS {
            return false;
        }
        last.set(now.max(1));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_logged_at_most_once_per_period() {
        let limit = LogLimit::<2>::default();
        assert!(limit.allow(0, 5));
        assert!(!limit.allow(0, 5 + LOG_EVERY_NANOS - 1));
        assert!(limit.allow(1, 6));
        assert!(limit.allow(0, 5 + LOG_EVERY_NANOS));
        assert!(!limit.allow(2, 0));
    }
}
