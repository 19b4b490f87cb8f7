//! Hostile keys change nothing in Redis beyond their own hashed keys.
//!
//! webdis splits its URL on `/`, percent-decodes each argument, takes a
//! `.ext` on the last one as an output format, `+` as a space and a leading
//! number as a database. Keys built to abuse any of that, or to smuggle
//! Lua, go through the filter; afterwards Redis holds exactly one key per
//! distinct API key, named by its SHA-256 under the plugin's prefix, and a
//! canary written beforehand is untouched. Checked with `redis-cli`.

use e2e::http::{self, Conn};
use e2e::topology::GlobalEnvoy;
use ratelimit_core::webdis::redis_key;

/// The default prefix of the shipped plugin, named `api`.
const PREFIX: &str = "apikey_ratelimit:api:";

fn encode(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn hostile_keys_touch_nothing_in_redis_but_their_own_hashed_keys() {
    let global = GlobalEnvoy::start(
        Some(r#"{"limits": ["5/min"], "max_key_length": 4096, "store": {"webdis": {}}}"#),
        2,
    );
    let redis = &global.backend.redis;
    // The canary sits under the filter's own prefix, where a confused call
    // would most likely land.
    assert_eq!(
        redis
            .cli(&["SET", "apikey_ratelimit:api:canary", "alive"])
            .trim(),
        "OK"
    );

    let big = "A".repeat(4096);
    let hostile: Vec<String> = vec![
        "a/b".into(),
        "../../FLUSHALL".into(),
        "%2F".into(),
        "%2FFLUSHALL%2F".into(),
        "key+with+plus".into(),
        "x.json".into(),
        "payload.raw".into(),
        "7".into(),
        "15/FLUSHALL".into(),
        "line\r\nFLUSHALL\r\n".into(),
        "*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\ny\r\n".into(),
        "redis.call('FLUSHALL')".into(),
        "\"); redis.call('SET','pwned','1') --".into(),
        "?type=text/plain".into(),
        "EVAL/return 1/0".into(),
        big.clone(),
    ];
    let addr = global.addr();
    for key in &hostile {
        let r = http::get(&addr, &format!("/?api_key={}", encode(key))).unwrap();
        assert_eq!(r.status, 200, "{key:?}: {r:?}");
    }
    // The same keys through the header, where a header can carry them.
    for key in hostile.iter().filter(|k| !k.contains('\r')) {
        let r = Conn::connect(&addr)
            .unwrap()
            .request("GET", b"/", &[("x-api-key", key.as_bytes())])
            .unwrap();
        assert_eq!(r.status, 200, "{key:?} in the header: {r:?}");
    }
    assert_eq!(global.metric("store_errors"), 0);

    let mut expected: Vec<String> = hostile
        .iter()
        .map(|k| redis_key(PREFIX, None, k.as_bytes()))
        .collect();
    expected.push("apikey_ratelimit:api:canary".into());
    expected.sort();
    assert_eq!(redis.keys(), expected);
    assert_eq!(
        redis.cli(&["GET", "apikey_ratelimit:api:canary"]).trim(),
        "alive"
    );
    // Each key counted its two requests (query + header) where it had both.
    let state = redis.cli(&["HGETALL", &redis_key(PREFIX, None, b"a/b")]);
    assert_eq!(
        state.lines().collect::<Vec<_>>().first(),
        Some(&"5/min"),
        "one TAT for one limit, under its name: {state:?}"
    );
    assert_eq!(state.lines().count(), 2, "{state:?}");
    // No plain key in the log either.
    let log = global.envoy.proc().log();
    assert!(!log.contains("FLUSHALL") && !log.contains(&big[..64]));
}
