//! The tutorial's table with 6 replicas: the same 100 requests over 10 s at
//! `1/s`, through a front Envoy balancing round-robin over 6 Envoy replicas.
//!
//! With local counters each replica counts alone, like Django's 6 processes
//! each with its own cache: far more than 10 get through. With Redis
//! counters (global mode) all replicas share one count: exactly 10.
//! Why exactly, with no tolerance: see `e2e::tutorial`.

use std::sync::Mutex;

use e2e::topology::{Mode, Replicas};
use e2e::tutorial;

/// Seven Envoys each: one test at a time, so the exact one's requests are
/// not slowed by the other's Envoys on a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn six_replicas_with_local_counters_admit_far_more_than_ten() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let replicas = Replicas::start(Mode::Local, 6, 1, None);
    // "Far more than 10" needs no exact timing.
    let table = tutorial::run_unchecked(&replicas.addr());
    eprintln!("6 replicas, local counters: {table}");
    // Round-robin gives each replica ~17 requests ~0.6 s apart: each admits
    // about one per second of its own, 6 times the limit in all.
    assert!(table.count(200) >= 40, "{table}");
    assert_eq!(table.count(200) + table.count(429), 100, "{table}");
    let per_replica = replicas.requests_per_replica();
    assert!(per_replica.iter().all(|n| *n >= 10), "{per_replica:?}");
}

#[test]
fn six_replicas_with_redis_counters_admit_exactly_ten() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let replicas = Replicas::start(Mode::Global, 6, 1, None);
    let table = tutorial::run(&replicas.addr());
    eprintln!("6 replicas, Redis counters: {table}");
    assert_eq!((table.count(200), table.count(429)), (10, 90), "{table}");
    let per_replica = replicas.requests_per_replica();
    assert!(per_replica.iter().all(|n| *n >= 10), "{per_replica:?}");
    assert_eq!(replicas.metric("store_errors"), 0);
    let calls = replicas.metric("backend_calls");
    let hits = replicas.metric("backend_cache_hits");
    eprintln!("backend calls: {calls}, denied from the local cache: {hits}");
}
