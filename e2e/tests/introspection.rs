//! A key's usage for its client (issue 13): `GET /.well-known/ratelimit`
//! with a key is answered by the filter itself, with that key's quota
//! headers and a JSON body per limit, and spends nothing: the requests that
//! follow are admitted exactly as if it had never been asked. Without a key
//! it is the usual 401. Local mode (two workers, shared data) and global
//! mode (Redis, asked with a count of 0).

use e2e::http::{Conn, Response};
use e2e::topology::{GlobalEnvoy, OneEnvoy};

const PATH: &[u8] = b"/.well-known/ratelimit";

fn config(store: &str) -> String {
    format!(
        r#"{{"limits": ["3/min"],
            "rules": [{{"name": "orders", "match": {{"path": "/orders"}}, "limits": ["2/min"]}}],
            "introspection": {{"path": "/.well-known/ratelimit"}}{store}}}"#
    )
}

/// One request on a fresh connection, with `key` if given.
fn get(addr: &str, path: &[u8], key: Option<&str>) -> Response {
    let mut headers: Vec<(&str, &[u8])> = vec![("Connection", b"close")];
    if let Some(key) = key {
        headers.push(("x-api-key", key.as_bytes()));
    }
    Conn::connect(addr)
        .unwrap()
        .request("GET", path, &headers)
        .unwrap()
}

/// The introspection answer for `key`: 200, both limits in the headers,
/// and a body that agrees with them. Returns what is left of each.
fn introspect(addr: &str, key: &str) -> (u64, u64) {
    let r = get(addr, PATH, Some(key));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""3/min";q=3;w=60, "orders:2/min";q=2;w=60"#),
        "{r:?}"
    );
    let body: serde_json::Value = serde_json::from_str(&r.body_str()).unwrap();
    let limits = body["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 2, "{body}");
    for (limit, (name, quota)) in limits.iter().zip([("3/min", 3), ("orders:2/min", 2)]) {
        assert_eq!(limit["name"], name, "{body}");
        assert_eq!(limit["quota"], quota, "{body}");
        assert_eq!(limit["window"], 60, "{body}");
        assert_eq!(limit["remaining"], r.ratelimit_remaining(name), "{body}");
        assert!(limit["reset"].as_u64().unwrap() <= 60, "{body}");
    }
    (
        r.ratelimit_remaining("3/min"),
        r.ratelimit_remaining("orders:2/min"),
    )
}

/// The same story in both modes.
fn answers_the_callers_quota_and_spends_nothing(addr: &str) {
    // No key: the usual 401, from the filter.
    let r = get(addr, PATH, None);
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.body_str().contains("API key"), "{r:?}");
    // A fresh key: full buckets, however often it asks.
    for _ in 0..3 {
        assert_eq!(introspect(addr, "fresh"), (3, 2));
    }
    // One order spent: the answer says so, and asking again spends nothing.
    let r = get(addr, b"/orders", Some("k"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.ratelimit_remaining("3/min"), 2);
    for _ in 0..5 {
        assert_eq!(introspect(addr, "k"), (2, 1));
    }
    // The next requests are admitted exactly as without the questions.
    let r = get(addr, b"/orders", Some("k"));
    assert_eq!(
        (r.status, r.ratelimit_remaining("orders:2/min")),
        (200, 0),
        "{r:?}"
    );
    assert_eq!(get(addr, b"/orders", Some("k")).status, 429);
    let r = get(addr, b"/", Some("k"));
    assert_eq!(
        (r.status, r.ratelimit_remaining("3/min")),
        (200, 0),
        "{r:?}"
    );
    assert_eq!(get(addr, b"/", Some("k")).status, 429);
    assert_eq!(introspect(addr, "k"), (0, 0));
}

#[test]
fn introspection_answers_the_callers_quota_in_local_mode() {
    let local = OneEnvoy::local(&config(""), 2);
    answers_the_callers_quota_and_spends_nothing(&local.addr());
    assert_eq!(local.metric_at_least("introspections", 10), 10);
    assert_eq!(local.metric_at_least("allowed", 3), 3);
    assert_eq!(local.metric("throttled"), 2);
}

#[test]
fn introspection_answers_the_callers_quota_in_global_mode() {
    let store = r#", "store": {"webdis": {"timeout_ms": 5000}}"#;
    let global = GlobalEnvoy::start(Some(&config(store)), 2);
    let addr = global.addr();
    // Asking about a fresh key writes nothing to Redis.
    assert_eq!(introspect(&addr, "unseen"), (3, 2));
    assert!(global.backend.redis.keys().is_empty());
    answers_the_callers_quota_and_spends_nothing(&addr);
    assert_eq!(global.backend.redis.keys().len(), 1);
    assert_eq!(global.metric_at_least("introspections", 11), 11);
    assert_eq!(global.metric_at_least("allowed", 3), 3);
    assert_eq!(global.metric("store_errors"), 0);
}
