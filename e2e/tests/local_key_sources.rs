//! A request must not carry one key for the limiter and another for the
//! application (issue 8, item 1): a key in two sources, or a key parameter
//! that a `;`-splitting framework would read differently, is a 400.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use e2e::http::{self, Response};
use e2e::topology::OneEnvoy;

fn invalid(r: &Response, why: &str) {
    assert_eq!(r.status, 400, "{why}: {r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(
        r.body_str(),
        format!(r#"{{"detail":"Invalid API key: {why}."}}"#)
    );
}

#[test]
fn a_fresh_query_key_beside_the_real_header_never_gets_through() {
    let local = OneEnvoy::local(r#"{"limits": ["1/min"]}"#, 2);
    let addr = local.addr();
    let real = [("x-api-key", "real")];
    assert_eq!(http::get_with(&addr, "/", &real).unwrap().status, 200);
    assert_eq!(http::get_with(&addr, "/", &real).unwrap().status, 429);

    // The bypass: the app reads the header, the limiter would count the query.
    let random = RandomState::new();
    for i in 0..100u64 {
        let target = format!("/?api_key={:016x}", random.hash_one(i));
        let r = http::get_with(&addr, &target, &real).unwrap();
        invalid(
            &r,
            "the query parameter 'api_key' and the header 'x-api-key' hold different keys; send the key in one place only",
        );
    }
    assert_eq!(local.metric_at_least("invalid_key", 100), 100);
    assert_eq!(local.metric("allowed"), 1);

    // The same key in both places is that key, and it is still throttled.
    let r = http::get_with(&addr, "/?api_key=real", &real).unwrap();
    assert_eq!(r.status, 429, "{r:?}");
}

#[test]
fn a_key_parameter_beside_a_semicolon_is_refused_as_ambiguous() {
    let local = OneEnvoy::local(r#"{"limits": ["1/min"]}"#, 1);
    let addr = local.addr();
    assert_eq!(http::get(&addr, "/?api_key=real").unwrap().status, 200);
    assert_eq!(http::get(&addr, "/?api_key=real").unwrap().status, 429);
    // Older Python and Django read `real` in each of these; the limiter
    // would have counted another key, or none.
    for target in [
        "/?api_key=real;r1",
        "/?x=1;api_key=real",
        "/?api_key=a;api_key=real",
        "/?a=b&c=d;api%5Fkey=real",
    ] {
        invalid(
            &http::get(&addr, target).unwrap(),
            "the query parameter 'api_key' is next to a ';', which some servers read as a separator (separate parameters with '&', encode ';' as %3B)",
        );
    }
    // An encoded ';' separates nothing.
    assert_eq!(http::get(&addr, "/?api_key=a%3Bb").unwrap().status, 200);
}
