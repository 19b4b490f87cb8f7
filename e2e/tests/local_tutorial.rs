//! The tutorial's load test against the shipped local-mode config: 100
//! requests for `?api_key=1234`, paced over 10 s, at `1/s`.
//!
//! Django's per-process cache let 35 through with 6 gunicorn workers; the
//! filter counts in Envoy shared data, so 6 Envoy workers still admit 10.
//!
//! Why exactly 10, with no tolerance: see `e2e::tutorial`.

use std::sync::Mutex;

use e2e::topology::OneEnvoy;
use e2e::tutorial;

/// Both need every request back within its slot: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn one_worker_admits_ten_of_a_hundred_paced_over_ten_seconds() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let local = OneEnvoy::local_shipped(1);
    let table = tutorial::run(&local.addr());
    assert_eq!((table.count(200), table.count(429)), (10, 90), "{table}");
    assert_eq!(local.metric_at_least("allowed", 10), 10);
    assert_eq!(local.metric_at_least("throttled", 90), 90);
}

#[test]
fn six_workers_admit_exactly_the_limit() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let local = OneEnvoy::local_shipped(6);
    let table = tutorial::run(&local.addr());
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
