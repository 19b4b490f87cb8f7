//! Plans read from Redis (`store.webdis.plans_from_redis`): an operator
//! moves a key to another plan with one `HSET` of the plans hash, and the
//! key's next request is decided, and answered, on that plan, with no
//! reload; `HDEL` puts it back on the configuration's plan. Real Envoy,
//! webdis and Redis, with the shipped webdis ACL and Redis users (the
//! filter's user only calls the function; the admin writes the hash).

use std::process::Command;

use e2e::http::{self, Response};
use e2e::topology::GlobalEnvoy;
use ratelimit_core::batch::wire_plans::plans_key;
use ratelimit_core::webdis::redis_key;

const PREFIX: &str = "apikey_ratelimit:api:";

/// Hour windows: no token comes back while the test runs, however slow.
const CONFIG: &str = r#"{
    "plans": {"free": [{"rate": "3/h", "name": "free"}],
              "pro": [{"rate": "10/h", "name": "pro"}]},
    "keys": {"free": ["key-moving", "key-unknown", "key-throttled"]},
    "default_plan": "free",
    "store": {"webdis": {"timeout_ms": 1000, "plans_from_redis": true}}}"#;

const FREE: &str = "\"free\";q=3;w=3600";
const PRO: &str = "\"pro\";q=10;w=3600";

fn get(global: &GlobalEnvoy, key: &str) -> Response {
    http::get(&global.addr(), &format!("/?api_key={key}")).unwrap()
}

/// `(status, RateLimit-Policy)` of `n` requests of `key`.
fn requests(global: &GlobalEnvoy, key: &str, n: usize) -> Vec<(u16, String)> {
    (0..n)
        .map(|_| {
            let r = get(global, key);
            let policy = r.header("ratelimit-policy").unwrap_or_default().to_string();
            (r.status, policy)
        })
        .collect()
}

fn expect(statuses: &[(u16, &str)]) -> Vec<(u16, String)> {
    statuses.iter().map(|(s, p)| (*s, p.to_string())).collect()
}

/// The key's field in the plans hash, computed as the README's one-liner
/// does it (`printf %s "$API_KEY" | sha256sum | cut -c1-64`).
fn field(key: &str) -> String {
    let out = Command::new("bash")
        .args(["-c", r#"printf %s "$API_KEY" | sha256sum | cut -c1-64"#])
        .env("API_KEY", key)
        .output()
        .unwrap();
    let field = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // The same as the filter's Redis key, less its prefix.
    let filters = redis_key(PREFIX, None, key.as_bytes());
    assert_eq!(filters.strip_prefix(PREFIX), Some(field.as_str()));
    field
}

#[test]
fn moving_a_key_to_another_plan_in_redis_changes_its_limits_on_the_next_request() {
    let global = GlobalEnvoy::start(Some(CONFIG), 2);
    let redis = &global.backend.redis;
    let plans = plans_key(PREFIX);
    assert_eq!(plans, "apikey_ratelimit:api:plans");
    let moving = field("key-moving");

    // On the configuration's plan, free: 3 an hour.
    assert_eq!(requests(&global, "key-moving", 1), expect(&[(200, FREE)]));

    // Moved to pro in Redis: the very next request is on pro, which admits
    // exactly its own 10 (pro's bucket is its own), then denies.
    assert_eq!(redis.cli(&["HSET", &plans, &moving, "pro"]).trim(), "1");
    let mut want = vec![(200, PRO); 10];
    want.push((429, PRO));
    assert_eq!(requests(&global, "key-moving", 11), expect(&want));

    // Back on free: the one request it spent there still counts.
    assert_eq!(redis.cli(&["HDEL", &plans, &moving]).trim(), "1");
    assert_eq!(
        requests(&global, "key-moving", 3),
        expect(&[(200, FREE), (200, FREE), (429, FREE)])
    );
    assert_eq!(global.metric("backend_unknown_plans"), 0);

    // A throttled key moved to a plan with room gets in on its next
    // request: the deny cache never holds a key on its plan's limits.
    assert_eq!(
        requests(&global, "key-throttled", 4),
        expect(&[(200, FREE), (200, FREE), (200, FREE), (429, FREE)])
    );
    redis.cli(&["HSET", &plans, &field("key-throttled"), "pro"]);
    assert_eq!(requests(&global, "key-throttled", 1), expect(&[(200, PRO)]));

    // A plan the configuration does not know: the configuration's plan
    // applies, and it is counted.
    redis.cli(&["HSET", &plans, &field("key-unknown"), "gold"]);
    assert_eq!(requests(&global, "key-unknown", 1), expect(&[(200, FREE)]));
    assert_eq!(global.metric_at_least("backend_unknown_plans", 1), 1);

    // The filter wrote no plan: the hash holds what the operator put there.
    let mut held: Vec<String> = redis
        .cli(&["HVALS", &plans])
        .lines()
        .map(str::to_string)
        .collect();
    held.sort();
    assert_eq!(held, ["gold", "pro"]);
}
