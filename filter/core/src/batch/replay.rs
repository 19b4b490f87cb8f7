//! Each request's own decision, from what the function answered for its key.
//!
//! The function says how many of a key's requests it admitted and each
//! limit's debt before them; `gcra::decide`, run once per request at Redis's
//! clock from that state, gives each its decision, `Retry-After` and quota
//! headers: the same as those requests reaching Redis back to back. It must
//! also admit exactly as many as the function did, or the two disagree (an
//! older library, a changed limit) and the answer is not trusted.

use crate::batch::wire::EntryReply;
use crate::gcra::{self, Decision, Limit};
use crate::per_limit::PerLimit;
use crate::quota;
use crate::time::micros_to_nanos;
use crate::webdis::{parse_error, BackendError};

/// The decisions of one key's requests, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub decisions: Vec<Decision>,
}

impl Replayed {
    /// The key's state after its requests, as a decision would report it
    /// (per limit: what is left, and how long until it is whole again):
    /// what the deny cache may learn.
    pub fn last(&self) -> Option<&Decision> {
        self.decisions.last()
    }
}

/// The TATs the function's debts stand for, at `now_us`.
fn tats_of(limits: &[Limit], now_us: u64, entry: &EntryReply) -> PerLimit<u64> {
    let now = micros_to_nanos(now_us);
    entry
        .debts_us
        .iter()
        .zip(limits)
        .map(|(debt, limit)| {
            let tat = micros_to_nanos(now_us.saturating_add(*debt));
            match &limit.period {
                Some(period) => quota::from_redis(period, tat, now),
                None => tat,
            }
        })
        .collect()
}

/// Replays `count` requests under `limits` from the state in `entry` (a
/// quota's debt is its Redis value less `now`: see `quota`).
pub fn replay(
    limits: &[Limit],
    now_us: u64,
    entry: &EntryReply,
    count: usize,
) -> Result<Replayed, BackendError> {
    if entry.debts_us.len() != limits.len() {
        return Err(parse_error(format!(
            "the function answered {} debts for {} limits",
            entry.debts_us.len(),
            limits.len()
        )));
    }
    let now = micros_to_nanos(now_us);
    let mut tats = tats_of(limits, now_us, entry);
    let decisions: Vec<Decision> = (0..count)
        .map(|_| gcra::decide(limits, tats.as_mut_slice(), now))
        .collect();
    let admitted = decisions.iter().filter(|d| d.allowed).count();
    if u64::try_from(admitted).ok() != Some(entry.admitted) {
        return Err(parse_error(format!(
            "the function admitted {} of {count} request(s) where the filter's GCRA admits \
             {admitted}; is an older library loaded?",
            entry.admitted
        )));
    }
    Ok(Replayed { decisions })
}

/// A key's state as the function answered it for a count of 0 (nothing
/// admitted, nothing written), read at Redis's clock without spending.
pub fn peek(limits: &[Limit], now_us: u64, entry: &EntryReply) -> Result<Decision, BackendError> {
    let replayed = replay(limits, now_us, entry, 0)?;
    debug_assert!(replayed.decisions.is_empty());
    let now = micros_to_nanos(now_us);
    Ok(gcra::peek(
        limits,
        tats_of(limits, now_us, entry).as_slice(),
        now,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::limit;
    use crate::time::NANOS_PER_MICRO;
    use crate::webdis::FailureClass;
    use proptest::prelude::*;

    fn entry(admitted: u64, debts_us: &[u64]) -> EntryReply {
        EntryReply {
            admitted,
            debts_us: debts_us.iter().copied().collect(),
        }
    }

    #[test]
    fn each_request_gets_its_own_decision_and_headers() {
        // 3 per 10 s with burst 3, 1 already spent: 2 fit, then 2 wait.
        let limits = [limit(3, 10, 3)];
        let now_us = 1_000_000_000;
        // T is 10/3 s rounded up to a whole microsecond.
        let t = limits[0].interval_nanos / NANOS_PER_MICRO;
        assert_eq!(t, 3_333_334);
        let replayed = replay(&limits, now_us, &entry(2, &[t]), 4).unwrap();
        let seen: Vec<(bool, u64, u64)> = replayed
            .decisions
            .iter()
            .map(|d| (d.allowed, d.retry_after_nanos, d.states()[0].remaining))
            .collect();
        let t_ns = t * NANOS_PER_MICRO;
        assert_eq!(
            seen,
            [
                (true, 0, 1),
                (true, 0, 0),
                (false, t_ns, 0),
                (false, t_ns, 0)
            ]
        );
        let last = replayed.last().unwrap();
        assert!(!last.allowed);
        assert_eq!(last.states()[0].reset_nanos, 3 * t_ns);
    }

    #[test]
    fn a_disagreement_with_the_function_is_not_trusted() {
        let limits = [limit(1, 1, 1)];
        for (admitted, debts) in [(1, &[1_000_000u64][..]), (0, &[0][..]), (1, &[0, 0][..])] {
            let error = replay(&limits, 5, &entry(admitted, debts), 1).unwrap_err();
            assert_eq!(error.class, FailureClass::Parse, "{admitted} {debts:?}");
        }
    }

    proptest! {
        /// A batch decides as the same requests one by one at the same clock.
        #[test]
        fn batched_decisions_equal_sequential_ones(
            specs in prop::collection::vec((1u64..20, 1u64..5, 1u64..10), 1..4),
            debts in prop::collection::vec(0u64..30_000_000, 4),
            count in 1usize..40,
        ) {
            let limits: Vec<Limit> = specs.iter().map(|(c, w, b)| limit(*c, *w, *b)).collect();
            let now_us = 1_764_000_000_000_000u64;
            let now = now_us * NANOS_PER_MICRO;
            let debts: Vec<u64> = debts.into_iter().take(limits.len()).collect();
            let mut tats: Vec<u64> = debts.iter().map(|d| (now_us + d) * NANOS_PER_MICRO).collect();
            let sequential: Vec<Decision> =
                (0..count).map(|_| gcra::decide(&limits, &mut tats, now)).collect();
            let admitted = sequential.iter().filter(|d| d.allowed).count() as u64;
            let replayed = replay(&limits, now_us, &entry(admitted, &debts), count).unwrap();
            prop_assert_eq!(&replayed.decisions, &sequential);
            let after: Vec<u64> = tats.iter().map(|t| t - now).collect();
            let resets: Vec<u64> = replayed.last().unwrap().states().iter().map(|s| s.reset_nanos).collect();
            prop_assert_eq!(resets, after);
        }
    }

    /// `gcra.lua`'s count of requests that fit, computed in doubles as Lua
    /// does: a rounded division, settled with exact products.
    fn lua_fits(room: f64, t: f64) -> f64 {
        if room < 0.0 {
            return 0.0;
        }
        let mut fits = (room / t).floor() + 1.0;
        if (fits - 1.0) * t > room {
            fits -= 1.0;
        }
        if fits * t <= room {
            fits += 1.0;
        }
        fits
    }

    proptest! {
        /// Exact for every room and interval the filter can send (capacities
        /// stay below 2^53 microseconds).
        #[test]
        fn the_function_counts_what_fits_exactly_in_doubles(
            room in 0u64..(1u64 << 52),
            t in 1u64..(1u64 << 40),
        ) {
            let exact = room / t + 1;
            prop_assert_eq!(lua_fits(room as f64, t as f64), exact as f64);
        }
    }
}
