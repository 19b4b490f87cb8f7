//! Calendar quotas (`{"quota": "10000/month", "reset": "calendar"}`): N
//! units per day, week or month, whole again at the calendar boundary.
//!
//! A quota is a fixed-window counter, but its state is still one number
//! per key, filed like a rate's TAT, so one CAS (one function call in
//! Redis) decides it with the rates, and what a key's state promises of a
//! TAT holds: a quota's value is *its period's end plus what was used in
//! it*. It then
//! lies in the future while anything is used (never idle, never forgotten
//! before the reset), a later period's value is larger (TATs only grow),
//! and the used count of an older period reads as 0.
//!
//! - In Redis (`gcra.lua`), on Redis `TIME`: `end + used` microseconds,
//!   with `end` exact; used = value − end(now) when that is not negative.
//! - In Rust the clock of the stored value may not be the calendar's: the
//!   local store keeps Envoy's monotonic clock (`docs/design.md#the-clock`)
//!   and the deny cache lower bounds on it. So the end is rounded to a
//!   multiple of 2^30 ns (~1.07 s) and the used count (at most 10^9 < 2^30)
//!   fills the low 30 bits: `packed = rounded end | used`. Two ends of one
//!   period, projected onto the monotonic clock at different moments, may
//!   differ by a few microseconds (or by a wall-clock step); ends of
//!   different periods differ by a day at least, so "the same period" is
//!   "ends less than 12 hours apart", and the boundary itself is decided by
//!   the wall clock, to the nanosecond.

use crate::calendar::Period;
use crate::gcra::{Clock, Limit};
use crate::time::{NANOS_PER_MICRO, NANOS_PER_SECOND};

/// A quota's field in Redis, and its identity in a state, is its name
/// after this prefix (`#` is in no limit name): never a rate's.
pub const FIELD_PREFIX: &str = "quota#";

const USED_BITS: u32 = 30;
const USED_MASK: u64 = (1 << USED_BITS) - 1;
/// The granularity of a stored period end (2^30 ns, about 1.07 s).
pub const END_UNIT: u64 = 1 << USED_BITS;
/// Stored and current period ends closer than this are one period.
const SAME_PERIOD_NANOS: u64 = 12 * 3600 * NANOS_PER_SECOND;

/// The stored value for a period ending at `end` with `used` spent; the
/// end is rounded up (a store: never idle before the reset) or down (the
/// deny cache: a lower bound).
pub fn pack(end: u64, used: u64, round_up: bool) -> u64 {
    let end = if round_up {
        end.saturating_add(USED_MASK) & !USED_MASK
    } else {
        end & !USED_MASK
    };
    end | used.min(USED_MASK)
}

/// `(rounded end, used)` of a stored value (0 is a fresh state: nothing used).
pub fn unpack(value: u64) -> (u64, u64) {
    (value & !USED_MASK, value & USED_MASK)
}

/// Redis's value of a quota (`end + used` µs, here in ns) at Redis's `now`
/// (ns), as the Rust side stores it.
pub fn from_redis(period: &Period, value: u64, now: u64) -> u64 {
    let (end, _) = period.end_nanos(now);
    let used = value.saturating_sub(end) / NANOS_PER_MICRO;
    pack(end, used, true)
}

/// What a quota's stored value means at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Used in the current period.
    pub used: u64,
    /// When the current period ends, on the store's clock (`Clock::now`);
    /// for a cached value an upper bound, for waits that are never early.
    pub end: u64,
    /// The end to store after an admission.
    pub store_end: u64,
    /// The current period's length.
    pub window_seconds: u64,
    /// No wall clock to place the period: nothing can be admitted.
    pub unplaced: bool,
}

/// Reads a quota's stored `value` at `clock`.
pub fn read(period: &Period, value: u64, clock: Clock) -> Reading {
    let (stored_end, stored_used) = unpack(value);
    let now = clock.now;
    let window_seconds = clock.wall.map_or(period.kind.longest_seconds(), |wall| {
        period.end_nanos(wall).1
    });
    if clock.stored_periods {
        // The deny cache: a lower bound of the period's end and of what
        // was used in it; past that end, nothing is known to be used.
        let live = now < stored_end;
        return Reading {
            used: if live { stored_used } else { 0 },
            end: if live {
                stored_end.saturating_add(END_UNIT)
            } else {
                now
            },
            store_end: stored_end,
            window_seconds,
            unplaced: false,
        };
    }
    let Some(wall) = clock.wall else {
        return Reading {
            end: now.saturating_add(NANOS_PER_SECOND),
            unplaced: true,
            window_seconds,
            ..Reading::default()
        };
    };
    // The period's end projected onto the store's clock.
    let (wall_end, _) = period.end_nanos(wall);
    let end = now.saturating_add(wall_end.saturating_sub(wall));
    // A stored end later than this one (a wall clock stepped back) is kept:
    // the period is the same, and its used count stays.
    let same = stored_end.saturating_add(SAME_PERIOD_NANOS) > end;
    Reading {
        used: if same { stored_used } else { 0 },
        end,
        store_end: if same { stored_end.max(end) } else { end },
        window_seconds,
        unplaced: false,
    }
}

/// Until when a stored quota denies a request of `limit`'s cost: its
/// period's end once too little is left, else never (0).
pub fn throttled_until(limit: &Limit, value: u64) -> u64 {
    let (end, used) = unpack(value);
    if used.saturating_add(limit.cost) > limit.burst {
        end
    } else {
        0
    }
}

#[cfg(test)]
mod tests;
