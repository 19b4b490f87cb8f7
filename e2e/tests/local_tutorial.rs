//! The tutorial's load test against the shipped local-mode config: 100
//! requests for `?api_key=1234`, paced over 10 s, at `1/s`.
//!
//! Django's per-process cache let 35 through with 6 gunicorn workers; the
//! filter counts in Envoy shared data, so 6 Envoy workers still admit 10.
//!
//! Why exactly 10, with no tolerance: request `i` is sent at `t0 + i*100 ms`
//! (an absolute schedule, no drift). At `1/s` with no burst, the next
//! admission is the first request that reaches the filter at or after the
//! previous admission + 1 s. If every request reaches the filter less than
//! 100 ms after its slot, an admission can slip by at most one slot, so the
//! tenth admission comes at slot 99 at the latest: at least 10. And never
//! more: first and last arrivals are 9.9 s ± < 0.1 s apart, which holds at
//! most 10 admissions 1 s apart. The test measures each request's lateness
//! (send delay + round trip, an upper bound on the arrival delay) and fails
//! with that explanation if any exceeded 100 ms, rather than blame the filter.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::http;
use e2e::load::{self, StatusTable};
use e2e::local::Local;

const REQUESTS: usize = 100;
const SLOT: Duration = Duration::from_millis(100);

/// Runs the paced load and returns the status table, checking lateness.
fn tutorial_run(local: &Local) -> StatusTable {
    let addr = local.addr();
    let lateness = Mutex::new(Vec::with_capacity(REQUESTS));
    let t0 = Instant::now();
    let statuses = load::paced(REQUESTS, SLOT, |i| {
        let status = load::status(http::get(&addr, "/?api_key=1234"));
        let late = Instant::now().saturating_duration_since(t0 + SLOT * i as u32);
        lateness.lock().unwrap().push(late);
        status
    });
    let worst = lateness.into_inner().unwrap().into_iter().max().unwrap();
    assert!(
        worst < SLOT,
        "a request finished {worst:?} after its slot: the machine was too slow for the \
         exactness argument (needs < {SLOT:?}); statuses were {}",
        StatusTable::new(&statuses)
    );
    StatusTable::new(&statuses)
}

#[test]
fn one_worker_admits_ten_of_a_hundred_paced_over_ten_seconds() {
    let local = Local::start_shipped(1);
    let table = tutorial_run(&local);
    assert_eq!((table.count(200), table.count(429)), (10, 90), "{table}");
    assert_eq!(local.metric_at_least("allowed", 10), 10);
    assert_eq!(local.metric_at_least("throttled", 90), 90);
}

#[test]
fn six_workers_admit_exactly_the_limit() {
    let local = Local::start_shipped(6);
    let table = tutorial_run(&local);
    assert_eq!((table.count(200), table.count(429)), (10, 90), "{table}");
    assert_eq!(local.metric_at_least("allowed", 10), 10);
    assert_eq!(local.metric_at_least("throttled", 90), 90);
    // Each request came on its own connection; the kernel spread them over
    // the workers, so the count really was shared between them.
    let per_worker = local.connections_per_worker();
    let busy = per_worker.iter().filter(|c| **c > 0).count();
    assert_eq!(per_worker.len(), 6, "{per_worker:?}");
    assert!(busy >= 4, "connections per worker: {per_worker:?}");
}
