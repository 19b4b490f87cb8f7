//! Concurrency across instances: several keys hammered at once through a
//! front proxy over 6 replicas × 2 workers. Each decision is one atomic Lua
//! call in Redis, so each key's admitted count is exactly its burst.

use e2e::http::Conn;
use e2e::load;
use e2e::topology::{Mode, Replicas};

const KEYS: usize = 4;
const PER_KEY: usize = 100;
const BURST: usize = 20;

#[test]
fn concurrent_burst_over_six_replicas_admits_each_keys_limit_exactly() {
    // 1/hour: nothing refills during the burst. A generous timeout keeps
    // this test about counting: a timed-out call would fall to the failure
    // mode, which the fault tests cover.
    let replicas = Replicas::start(
        Mode::Global,
        6,
        2,
        Some(&format!(
            r#"{{"limits": [{{"rate": "1/hour", "burst": {BURST}}}],
                "store": {{"webdis": {{"timeout_ms": 5000}}}}}}"#
        )),
    );
    let addr = replicas.addr();
    let statuses = load::concurrent_prepared(
        KEYS * PER_KEY,
        |_| Conn::connect(&addr).unwrap(),
        |i, mut conn| {
            let status = load::status(conn.get(&format!("/?api_key=hot-{}", i % KEYS)));
            // The key rides along in the result, to count per key.
            status * 10 + (i % KEYS) as u16
        },
    );
    for key in 0..KEYS as u16 {
        let admitted = statuses.iter().filter(|s| **s == 2000 + key).count();
        let throttled = statuses.iter().filter(|s| **s == 4290 + key).count();
        assert_eq!(
            (admitted, throttled),
            (BURST, PER_KEY - BURST),
            "key hot-{key}"
        );
    }
    assert_eq!(replicas.metric("store_errors"), 0);
    let per_replica = replicas.requests_per_replica();
    assert!(per_replica.iter().all(|n| *n > 0), "{per_replica:?}");
    eprintln!(
        "requests per replica {per_replica:?}; backend calls {}, local cache denials {}",
        replicas.metric("backend_calls"),
        replicas.metric("backend_cache_hits")
    );
}
