//! Concurrency: many requests for one key at the same instant, spread over
//! six workers, race on one shared-data slot. The CAS loop must admit
//! exactly the burst, never one more (the Istio ecosystem's reverted Wasm
//! limiter under-counted here without bound).

use e2e::http::Conn;
use e2e::load::{self, StatusTable};
use e2e::topology::OneEnvoy;

#[test]
fn concurrent_burst_across_six_workers_admits_exactly_the_burst() {
    // 1/hour: nothing refills during the burst, so exactly `burst` fit.
    let local = OneEnvoy::local(r#"{"limits": [{"rate": "1/hour", "burst": 50}]}"#, 6);
    let addr = local.addr();
    let statuses = load::concurrent_prepared(
        300,
        |_| Conn::connect(&addr).unwrap(),
        |_, mut conn| load::status(conn.get("/?api_key=burst")),
    );
    let table = StatusTable::new(&statuses);
    assert_eq!((table.count(200), table.count(429)), (50, 250), "{table}");
    assert_eq!(local.metric_at_least("allowed", 50), 50);
    assert_eq!(local.metric_at_least("throttled", 250), 250);
    assert_eq!(local.metric("cas_retries_exhausted"), 0);
    eprintln!(
        "requests that met a CAS conflict and retried: {}",
        local.metric("cas_conflicts")
    );
    let per_worker = local.connections_per_worker();
    assert!(
        per_worker.iter().filter(|c| **c > 0).count() >= 4,
        "the burst should reach most workers: {per_worker:?}"
    );
}

#[test]
fn several_hot_keys_at_once_each_get_exactly_their_burst() {
    let local = OneEnvoy::local(r#"{"limits": [{"rate": "1/hour", "burst": 20}]}"#, 6);
    let addr = local.addr();
    let statuses = load::concurrent_prepared(
        240,
        |_| Conn::connect(&addr).unwrap(),
        |i, mut conn| {
            let status = load::status(conn.get(&format!("/?api_key=hot-{}", i % 4)));
            // Encode the key in the result so admissions can be counted per key.
            status * 10 + (i % 4) as u16
        },
    );
    for key in 0..4u16 {
        let admitted = statuses.iter().filter(|s| **s == 2000 + key).count();
        let throttled = statuses.iter().filter(|s| **s == 4290 + key).count();
        assert_eq!((admitted, throttled), (20, 40), "key hot-{key}");
    }
}
