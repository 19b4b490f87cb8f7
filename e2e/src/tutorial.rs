//! The tutorial's load test: 100 requests for `?api_key=1234`, paced over
//! 10 s, one connection each (so they spread over workers and replicas).
//!
//! Why a `1/s` limit admits exactly 10, with no tolerance: request `i` is
//! sent at `t0 + i*100 ms` (an absolute schedule, no drift). At `1/s` with
//! no burst, the next admission is the first request that reaches the
//! limiter at or after the previous admission + 1 s. If every request
//! reaches it less than 100 ms after its slot, an admission can slip by at
//! most one slot, so the tenth admission comes at slot 99 at the latest: at
//! least 10. And never more: first and last arrivals are 9.9 s ± < 0.1 s
//! apart, which holds at most 10 admissions 1 s apart. [`run`] measures each
//! request's lateness (send delay + round trip, an upper bound on the
//! arrival delay) and panics with that explanation if any exceeded 100 ms,
//! rather than blame the filter.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::http;
use crate::load::{self, StatusTable};

pub const REQUESTS: usize = 100;
pub const SLOT: Duration = Duration::from_millis(100);

/// Runs the paced load against `addr` and returns the status table; panics
/// (blaming the machine, not the filter) if a request was too late for the
/// exactness argument above.
pub fn run(addr: &str) -> StatusTable {
    let (table, worst) = paced(addr);
    assert!(
        worst < SLOT,
        "a request finished {worst:?} after its slot: the machine was too slow for the \
         exactness argument (needs < {SLOT:?}); statuses were {table}"
    );
    table
}

/// The same schedule without the exactness precondition, for checks that need
/// no exact timing ("far more than 10").
pub fn run_unchecked(addr: &str) -> StatusTable {
    paced(addr).0
}

/// The statuses, and the worst lateness of a request.
fn paced(addr: &str) -> (StatusTable, Duration) {
    let lateness = Mutex::new(Vec::with_capacity(REQUESTS));
    let t0 = Instant::now();
    let statuses = load::paced(REQUESTS, SLOT, |i| {
        let status = load::status(http::get(addr, "/?api_key=1234"));
        let slot = t0 + SLOT * u32::try_from(i).unwrap_or(u32::MAX);
        let late = Instant::now().saturating_duration_since(slot);
        lateness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(late);
        status
    });
    let worst = lateness
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .max()
        .unwrap_or_default();
    (StatusTable::new(&statuses), worst)
}
