//! GCRA, the generic cell rate algorithm: a token bucket whose whole state is
//! one number per limit, the theoretical arrival time (TAT).
//!
//! For a limit of `count` requests per `window` with burst `b`, the emission
//! interval is `T = window / count`. A request at `now` is admitted when
//! `max(TAT, now) - now <= (b - 1) * T`, and then `TAT = max(TAT, now) + T`.
//! A denied request changes nothing. Several limits on one key are decided
//! together: the request is admitted only if every limit admits it, and only
//! then do all their TATs move. Time is always passed in.
//!
//! A request may cost more than one (`cost`, per limit): it is admitted when
//! `max(TAT, now) - now + cost * T <= b * T`, and then moves the TAT by
//! `cost * T`. For `cost = 1` that is the rule above. A cost above the burst
//! can never fit; the policy answers such a request before it gets here.
//!
//! A limit may also be a calendar quota (`quota`): `N` per day, week or
//! month, decided in the same step, its state one number like a TAT.

use std::fmt;

use crate::calendar::Period;
use crate::per_limit::PerLimit;
use crate::quota::{self, Reading};
use crate::rate::Rate;
use crate::time::NANOS_PER_MICRO;

/// The longest limit name (configuration checks it).
pub const MAX_NAME_LENGTH: usize = 64;

/// A limit's name, held inline so that a [`Limit`] is `Copy` and a
/// request's limits are gathered without allocating.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitName {
    bytes: [u8; MAX_NAME_LENGTH],
    len: u8,
}

impl LimitName {
    /// `None` for a name longer than [`MAX_NAME_LENGTH`].
    pub fn new(name: &str) -> Option<LimitName> {
        let mut bytes = [0; MAX_NAME_LENGTH];
        bytes
            .get_mut(..name.len())?
            .copy_from_slice(name.as_bytes());
        Some(LimitName {
            bytes,
            len: u8::try_from(name.len()).ok()?,
        })
    }

    pub fn as_str(&self) -> &str {
        let bytes = self.bytes.get(..usize::from(self.len)).unwrap_or(&[]);
        std::str::from_utf8(bytes).unwrap_or_default()
    }
}

impl Default for LimitName {
    fn default() -> LimitName {
        LimitName {
            bytes: [0; MAX_NAME_LENGTH],
            len: 0,
        }
    }
}

impl fmt::Debug for LimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for LimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for LimitName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// One compiled limit, and what the request at hand costs under it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limit {
    /// The policy name shown in the `RateLimit` headers.
    pub name: LimitName,
    /// The limit's identity in a stored state: a hash of its name, so a
    /// key's debt under this limit survives other limits being added or
    /// removed (see [`crate::state`]).
    pub id: u64,
    pub rate: Rate,
    pub burst: u64,
    /// `T`, the emission interval.
    pub interval_nanos: u64,
    /// `b * T`: how far ahead of `now` the TAT may run after an admission.
    pub capacity_nanos: u64,
    /// What the request being decided costs under this limit (1 unless a
    /// rule charges more); at most `burst` for a request that can fit.
    pub cost: u64,
    /// The limit's place in the policy's table of limits (its counters).
    pub index: u16,
    /// A calendar quota's period; `None` for a rate. A quota admits up to
    /// `burst` (its count) per period; its `interval_nanos` is 1 µs, a unit.
    pub period: Option<Period>,
}

impl Limit {
    /// Builds a limit costing 1 per request; `None` when `burst * T`
    /// overflows or the name is too long (config validation reports both
    /// before this is ever reached).
    pub fn new(name: &str, rate: Rate, burst: u64) -> Option<Limit> {
        let interval_nanos = rate.interval_nanos();
        let capacity_nanos = interval_nanos.checked_mul(burst)?;
        if burst == 0 || interval_nanos == 0 {
            return None;
        }
        Some(Limit {
            id: limit_id(name),
            name: LimitName::new(name)?,
            rate,
            burst,
            interval_nanos,
            capacity_nanos,
            cost: 1,
            index: 0,
            period: None,
        })
    }

    /// A calendar quota of `count` per `period` (at most
    /// [`crate::rate::MAX_COUNT`], which a state's packing relies on). Its
    /// identity in a state is its name's under a `quota#` prefix, as its
    /// field in Redis: a rate and a quota never read each other's state.
    pub fn quota(name: &str, count: u64, period: Period) -> Option<Limit> {
        if !(1..=crate::rate::MAX_COUNT).contains(&count) {
            return None;
        }
        Some(Limit {
            id: limit_id(&format!("{}{name}", quota::FIELD_PREFIX)),
            name: LimitName::new(name)?,
            rate: Rate {
                count,
                window_seconds: period.kind.longest_seconds(),
            },
            burst: count,
            interval_nanos: NANOS_PER_MICRO,
            capacity_nanos: count.checked_mul(NANOS_PER_MICRO)?,
            cost: 1,
            index: 0,
            period: Some(period),
        })
    }

    /// The same limit, charging `cost` for the request at hand.
    pub fn costing(self, cost: u64) -> Limit {
        Limit { cost, ..self }
    }

    /// `cost * T`: how far an admitted request moves the TAT.
    pub fn step_nanos(&self) -> u64 {
        self.interval_nanos.saturating_mul(self.cost)
    }

    /// `b * T - cost * T`: how far the TAT may run ahead of `now` for the
    /// request to be admitted (`(b - 1) * T` at cost 1).
    pub fn tolerance_nanos(&self) -> u64 {
        self.capacity_nanos.saturating_sub(self.step_nanos())
    }

    /// Whether a request of this cost can ever be admitted.
    pub fn fits_at_all(&self) -> bool {
        self.cost <= self.burst
    }

    /// Requests that fit right now with this TAT (a rate).
    fn remaining(&self, tat: u64, now: u64) -> u64 {
        let debt = tat.saturating_sub(now);
        self.capacity_nanos
            .saturating_sub(debt)
            .checked_div(self.interval_nanos)
            .unwrap_or(0)
    }
}

/// The identity of the limit named `name` in stored states. Stable across
/// releases and processes (a fixed, unseeded hash: names are configuration,
/// not client input). Never 0, which marks an unused entry.
pub fn limit_id(name: &str) -> u64 {
    crate::hash::name_hash(name.as_bytes()).max(1)
}

/// What one limit says about the request, after the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitState {
    /// Requests that would still be admitted now (for a quota, its count
    /// less what was used in the current period).
    pub remaining: u64,
    /// Nanoseconds until the bucket is full again (the TAT is reached); for
    /// a quota, until its period ends.
    pub reset_nanos: u64,
    /// The limit's window: a rate's, or the current period's length.
    pub window_seconds: u64,
}

/// The clocks a decision is made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// The stored TATs' clock, in nanoseconds: Redis `TIME` in global mode,
    /// Envoy's monotonic clock in local mode and in the deny cache.
    pub now: u64,
    /// The wall clock (Unix nanoseconds) read together with `now`: where a
    /// quota's calendar periods fall. Needed only when a quota is decided.
    pub wall: Option<u64>,
    /// Quotas' periods are the stored ones, lower bounds (the deny cache,
    /// which knows Redis's periods only through its answers).
    pub stored_periods: bool,
}

impl Clock {
    /// Stored TATs and calendar both on the wall clock: Redis's `TIME`.
    pub fn wall(now: u64) -> Clock {
        Clock {
            now,
            wall: Some(now),
            stored_periods: false,
        }
    }

    /// Local mode: TATs on the monotonic clock `now`, calendar periods on
    /// the wall clock (`None` when the policy has no quota).
    pub fn local(now: u64, wall: Option<u64>) -> Clock {
        Clock {
            now,
            wall,
            stored_periods: false,
        }
    }

    /// The deny cache: lower bounds on the monotonic clock `now`; `wall`
    /// only names a quota's period length in the headers.
    pub fn cached(now: u64, wall: Option<u64>) -> Clock {
        Clock {
            now,
            wall,
            stored_periods: true,
        }
    }
}

/// A bare time is the wall clock, for TATs and calendar alike (Redis's
/// `TIME`, and tests).
impl From<u64> for Clock {
    fn from(now: u64) -> Clock {
        Clock::wall(now)
    }
}

/// The verdict on one request across all of a key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Zero when allowed; else the exact wait until every limit admits.
    pub retry_after_nanos: u64,
    /// Bit `i` set: limit `i` denied the request.
    pub denied_by: u32,
    /// Of those, the one with the longest wait.
    binding: u8,
    states: PerLimit<LimitState>,
}

impl Decision {
    /// A decision for a request that no limit applies to.
    pub fn unlimited() -> Decision {
        Decision {
            allowed: true,
            retry_after_nanos: 0,
            denied_by: 0,
            binding: 0,
            states: PerLimit::new(),
        }
    }

    /// A denial with a known wait and no per-limit detail, used when the
    /// store could not decide (for example CAS retries ran out).
    pub fn denied_for(retry_after_nanos: u64) -> Decision {
        Decision {
            allowed: false,
            retry_after_nanos,
            ..Decision::unlimited()
        }
    }

    /// One state per limit, in the order the limits were given.
    pub fn states(&self) -> &[LimitState] {
        self.states.as_slice()
    }

    /// The limit that denied with the longest wait: the one a 429 names.
    pub fn binding(&self) -> Option<usize> {
        (self.denied_by != 0).then_some(usize::from(self.binding))
    }
}

/// Decides one request at `clock` against `limits`, updating `tats` in
/// place when it is admitted. `tats` holds one TAT per limit (0 for a fresh
/// key); extra limits beyond [`crate::per_limit::MAX_LIMITS`] or missing
/// TATs are never indexed. A bare `u64` is the wall clock ([`Clock::wall`]).
pub fn decide(limits: &[Limit], tats: &mut [u64], clock: impl Into<Clock>) -> Decision {
    let clock = clock.into();
    if limits.iter().all(|l| l.period.is_none()) {
        return decide_reading(limits, tats, clock.now, |_| Reading::default());
    }
    // Quotas' readings, made once (calendar arithmetic) and used twice.
    let readings: PerLimit<Reading> = limits
        .iter()
        .zip(tats.iter())
        .map(|(limit, tat)| match &limit.period {
            Some(period) => quota::read(period, *tat, clock),
            None => Reading::default(),
        })
        .collect();
    decide_reading(limits, tats, clock.now, |i| {
        readings.as_slice().get(i).copied().unwrap_or_default()
    })
}

/// What a key's state says now, spending nothing: each limit's remaining
/// and reset as a request of cost 0 sees them (`tats` is left as it is).
/// The decision admits unless a limit is past its capacity.
pub fn peek(limits: &[Limit], tats: &[u64], clock: impl Into<Clock>) -> Decision {
    let free: PerLimit<Limit> = limits.iter().map(|l| l.costing(0)).collect();
    let mut copy: PerLimit<u64> = tats.iter().copied().collect();
    decide(free.as_slice(), copy.as_mut_slice(), clock)
}

/// [`decide`], given each limit's quota [`Reading`] by index (a default
/// one for a rate); inlined, so that rates alone pay nothing for quotas.
#[inline(always)]
fn decide_reading(
    limits: &[Limit],
    tats: &mut [u64],
    now: u64,
    reading: impl Fn(usize) -> Reading,
) -> Decision {
    let mut decision = Decision::unlimited();
    for (i, (limit, tat)) in limits.iter().zip(tats.iter()).enumerate() {
        let wait = match limit.period {
            Some(_) => {
                let reading = reading(i);
                let fits =
                    !reading.unplaced && reading.used.saturating_add(limit.cost) <= limit.burst;
                (!fits).then(|| reading.end.saturating_sub(now).max(1))
            }
            None => {
                let start = (*tat).max(now);
                let tolerance = limit.tolerance_nanos();
                let debt = start.saturating_sub(now);
                (debt > tolerance || !limit.fits_at_all()).then(|| debt.saturating_sub(tolerance))
            }
        };
        if let Some(wait) = wait {
            if decision.allowed || wait > decision.retry_after_nanos {
                decision.binding = u8::try_from(i).unwrap_or(u8::MAX);
            }
            decision.allowed = false;
            decision.retry_after_nanos = decision.retry_after_nanos.max(wait);
            decision.denied_by |= 1u32
                .checked_shl(u32::try_from(i).unwrap_or(u32::MAX))
                .unwrap_or(0);
        }
    }
    if decision.allowed {
        for (i, (limit, tat)) in limits.iter().zip(tats.iter_mut()).enumerate() {
            *tat = match limit.period {
                Some(_) => {
                    let reading = reading(i);
                    quota::pack(
                        reading.store_end,
                        reading.used.saturating_add(limit.cost),
                        true,
                    )
                }
                None => (*tat).max(now).saturating_add(limit.step_nanos()),
            };
        }
    }
    decision.states = limits
        .iter()
        .zip(tats.iter())
        .enumerate()
        .map(|(i, (limit, tat))| match limit.period {
            Some(_) => {
                let reading = reading(i);
                let used = match decision.allowed {
                    true => reading.used.saturating_add(limit.cost),
                    false => reading.used,
                };
                LimitState {
                    remaining: limit.burst.saturating_sub(used),
                    reset_nanos: reading.end.saturating_sub(now),
                    window_seconds: reading.window_seconds,
                }
            }
            None => LimitState {
                remaining: limit.remaining(*tat, now),
                reset_nanos: tat.saturating_sub(now),
                window_seconds: limit.rate.window_seconds,
            },
        })
        .collect();
    decision
}

/// Whether a stored state is equivalent to a fresh one: every bucket is full.
pub fn is_idle(tats: impl IntoIterator<Item = u64>, now: u64) -> bool {
    tats.into_iter().all(|tat| tat <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{limit, S};
    use proptest::prelude::*;

    #[test]
    fn one_per_second_admits_once_per_second_like_drf() {
        let limits = [limit(1, 1, 1)];
        let mut tats = [0];
        let t0 = 1_000 * S;
        assert!(decide(&limits, &mut tats, t0).allowed);
        let denied = decide(&limits, &mut tats, t0 + S / 10);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_nanos, S - S / 10);
        assert!(!decide(&limits, &mut tats, t0 + S - 1).allowed);
        assert!(decide(&limits, &mut tats, t0 + S).allowed);
    }

    #[test]
    fn tutorial_schedule_admits_ten_of_a_hundred() {
        let limits = [limit(1, 1, 1)];
        let mut tats = [0];
        let t0 = 5 * S;
        let admitted = (0..100)
            .filter(|i| decide(&limits, &mut tats, t0 + i * S / 10).allowed)
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn burst_is_admitted_at_once_then_the_rate_applies() {
        let limits = [limit(10, 60, 10)];
        let mut tats = [0];
        let now = 100 * S;
        for i in 0..10 {
            let d = decide(&limits, &mut tats, now);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.states()[0].remaining, 9 - i);
        }
        let d = decide(&limits, &mut tats, now);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, 6 * S);
        assert_eq!(d.states()[0].remaining, 0);
        assert_eq!(d.states()[0].reset_nanos, 60 * S);
        assert!(decide(&limits, &mut tats, now + 6 * S).allowed);
    }

    #[test]
    fn all_limits_must_pass_and_retry_after_is_the_largest_wait() {
        let limits = [limit(10, 1, 10), limit(12, 60, 12)];
        let mut tats = [0, 0];
        let now = 50 * S;
        let admitted = (0..20)
            .filter(|_| decide(&limits, &mut tats, now).allowed)
            .count();
        assert_eq!(admitted, 10);
        // One second later the per-second limit has refilled; the per-minute
        // one (2 left) lets two more through, then waits 5 s per request.
        let later = now + S;
        assert!(decide(&limits, &mut tats, later).allowed);
        assert!(decide(&limits, &mut tats, later).allowed);
        let d = decide(&limits, &mut tats, later);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_nanos, 4 * S);
    }

    #[test]
    fn a_denied_request_consumes_nothing_from_any_limit() {
        let limits = [limit(100, 1, 100), limit(1, 60, 1)];
        let mut tats = [0, 0];
        let now = 10 * S;
        assert!(decide(&limits, &mut tats, now).allowed);
        let before = tats;
        for _ in 0..50 {
            assert!(!decide(&limits, &mut tats, now).allowed);
        }
        assert_eq!(tats, before);
    }

    #[test]
    fn empty_limits_always_admit() {
        let d = decide(&[], &mut [], 0);
        assert!(d.allowed);
        assert!(d.states().is_empty());
    }

    #[test]
    fn idle_means_every_bucket_is_full() {
        assert!(is_idle([0, 5], 5));
        assert!(!is_idle([0, 6], 5));
        assert!(is_idle([], 5));
    }

    fn arb_limit() -> impl Strategy<Value = Limit> {
        (1u64..20, prop::sample::select(vec![1u64, 2, 60]), 1u64..8)
            .prop_map(|(count, window, burst)| limit(count, window, burst))
    }

    /// Request times `gaps` apart, from 1000 s on.
    fn schedule(gaps: Vec<u64>) -> impl Iterator<Item = u64> {
        gaps.into_iter().scan(1_000 * S, |now, gap| {
            *now += gap;
            Some(*now)
        })
    }

    proptest! {
        /// In any span of length `L`, a limit admits at most `b + L/T`
        /// requests (`b` at once, then one per interval).
        #[test]
        fn never_more_than_the_limit_in_any_window(
            lim in arb_limit(),
            gaps in prop::collection::vec(0u64..400_000_000, 1..300),
        ) {
            let limits = [lim];
            let mut tats = [0];
            let mut admitted = Vec::new();
            for now in schedule(gaps) {
                if decide(&limits, &mut tats, now).allowed {
                    admitted.push(now);
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let span = end - start;
                    let bound = lim.burst + span / lim.interval_nanos;
                    prop_assert!((j - i + 1) as u64 <= bound);
                }
            }
        }

        /// `Retry-After` is exact: one nanosecond early is still denied,
        /// on time is admitted.
        #[test]
        fn retry_after_is_exact(
            lims in prop::collection::vec(arb_limit(), 1..4),
            gaps in prop::collection::vec(0u64..300_000_000, 1..100),
        ) {
            let mut tats = vec![0; lims.len()];
            for now in schedule(gaps) {
                let d = decide(&lims, &mut tats, now);
                if !d.allowed {
                    let wait = d.retry_after_nanos;
                    prop_assert!(wait > 0);
                    let mut early = tats.clone();
                    prop_assert!(!decide(&lims, &mut early, now + wait - 1).allowed);
                    let mut on_time = tats.clone();
                    prop_assert!(decide(&lims, &mut on_time, now + wait).allowed);
                }
            }
        }

        /// TATs never move backwards, whatever the order of decisions.
        #[test]
        fn tats_are_monotone(
            lims in prop::collection::vec(arb_limit(), 1..4),
            gaps in prop::collection::vec(0u64..300_000_000, 1..100),
        ) {
            let mut tats = vec![0; lims.len()];
            for now in schedule(gaps) {
                let before = tats.clone();
                let d = decide(&lims, &mut tats, now);
                for (b, a) in before.iter().zip(&tats) {
                    prop_assert!(a >= b);
                }
                for (state, tat) in d.states().iter().zip(&tats) {
                    prop_assert_eq!(state.reset_nanos, tat.saturating_sub(now));
                }
            }
        }
    }
}
