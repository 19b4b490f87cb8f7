//! The "denied until" cache keeps a flood on a throttled key off Redis.
//!
//! Every Redis answer gives, per limit, the time until the bucket is full;
//! from the time the call was sent, that is a lower bound of the key's state
//! on the local clock, so whenever it already denies, Redis would too. A
//! flood on a throttled key is then answered by the instance itself, and the
//! backend sees about one call per admitted request, plus the requests that
//! race each refill: those already in flight when a token comes back, and
//! those landing in the sub-millisecond gap between the local lower bound
//! and Redis's own clock. What it does not see is the flood itself.
//! (Each decision is one call: the function is loaded before Redis opens
//! its port, so there is no fallback call.)

use std::time::{Duration, Instant};

use e2e::http::Conn;
use e2e::topology::GlobalEnvoy;

/// Floods one key from `clients` keep-alive connections for `duration`.
fn flood(addr: &str, clients: usize, duration: Duration) -> (u64, u64) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(move || {
                    let mut conn = Conn::connect(addr).unwrap();
                    let (mut ok, mut throttled) = (0u64, 0u64);
                    let end = Instant::now() + duration;
                    while Instant::now() < end {
                        match conn.get("/?api_key=flooded").unwrap().status {
                            200 => ok += 1,
                            429 => throttled += 1,
                            other => panic!("status {other}"),
                        }
                    }
                    (ok, throttled)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    })
}

#[test]
fn a_flood_on_a_throttled_key_stays_off_redis() {
    // 10 at once, then one every 6 s: the 2 s flood stays in one window.
    let global = GlobalEnvoy::start(
        Some(r#"{"limits": ["10/min"], "store": {"webdis": {}}}"#),
        2,
    );
    let (admitted, throttled) = flood(&global.addr(), 4, Duration::from_secs(2));
    let total = admitted + throttled;
    let batched = global.metric_at_least("backend_batched_requests", admitted);
    let calls = global.metric("backend_calls");
    let hits = global.metric("backend_cache_hits");
    eprintln!(
        "one window: {total} requests, {admitted} admitted, {calls} backend calls ({:.4} per request) \
         carrying {batched}, {hits} denied locally",
        calls as f64 / total as f64
    );
    assert_eq!(admitted, 10);
    assert!(
        total > 1_000,
        "the flood was too small to mean anything: {total}"
    );
    // Admitted + one per window per worker: once a call has said the key
    // is spent, the requests that waited for it are denied from the cache.
    assert!(
        calls <= admitted + 2,
        "{calls} calls for {admitted} admitted"
    );
    // Every request was decided either locally or by Redis, exactly once.
    assert_eq!(hits + batched, total, "{hits} + {batched} vs {total}");
}

#[test]
fn a_flood_across_many_windows_costs_about_one_call_per_admission() {
    // One every 250 ms: 3 s of flood spans 12 refills.
    let global = GlobalEnvoy::start(
        Some(r#"{"limits": [{"rate": "4/s", "burst": 1}], "store": {"webdis": {}}}"#),
        2,
    );
    let (admitted, throttled) = flood(&global.addr(), 4, Duration::from_secs(3));
    let total = admitted + throttled;
    global.metric_at_least("backend_batched_requests", admitted);
    let calls = global.metric("backend_calls");
    eprintln!(
        "12 windows: {total} requests, {admitted} admitted, {calls} backend calls ({:.4} per request)",
        calls as f64 / total as f64
    );
    assert!((12..=13).contains(&admitted), "{admitted}");
    // Per refill and worker: the call that admits, and one landing in the
    // gap between the cache's lower bound and Redis's clock.
    assert!(
        calls <= admitted + 2 * 2 * 13,
        "{calls} calls for {admitted} admitted"
    );
    // What matters: the flood itself never reaches Redis.
    assert!(calls * 100 < total, "{calls} calls for {total} requests");
}
