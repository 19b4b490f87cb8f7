//! Keys are counted apart, overrides apply, and a key counts the same
//! whether it comes in the query string or in the header.

use e2e::http::{self, Response};
use e2e::topology::OneEnvoy;
use sha2::{Digest, Sha256};

fn get(local: &OneEnvoy, target: &str) -> Response {
    http::get(&local.addr(), target).unwrap()
}

fn statuses(local: &OneEnvoy, target: &str, n: usize) -> Vec<u16> {
    (0..n).map(|_| get(local, target).status).collect()
}

#[test]
fn many_keys_are_independent_and_overrides_apply() {
    let hashed: String = Sha256::digest(b"hashed-key")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let local = OneEnvoy::local(
        &format!(
            r#"{{"limits": ["3/hour"],
                "overrides": [
                  {{"key": "gold", "limits": ["10/hour"]}},
                  {{"key": "sha256:{hashed}", "limits": ["5/hour"]}},
                  {{"key": "internal", "limits": []}}
                ]}}"#
        ),
        2,
    );

    // 50 keys, four rounds: each key's fourth request is its first 429,
    // whatever the others did in between.
    for round in 0..4 {
        for key in 0..50 {
            let status = get(&local, &format!("/?api_key=user-{key}")).status;
            let expected = if round < 3 { 200 } else { 429 };
            assert_eq!(status, expected, "user-{key}, round {round}");
        }
    }

    let gold = statuses(&local, "/?api_key=gold", 12);
    assert_eq!(gold, [vec![200; 10], vec![429; 2]].concat());
    let hashed = statuses(&local, "/?api_key=hashed-key", 7);
    assert_eq!(hashed, [vec![200; 5], vec![429; 2]].concat());

    // An unlimited key: never throttled, no quota headers.
    for _ in 0..20 {
        let r = get(&local, "/?api_key=internal");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit"), None);
    }
    assert_eq!(local.metric_at_least("allowed", 150 + 10 + 5 + 20), 185);
    assert_eq!(local.metric("throttled"), 50 + 2 + 2);
}

#[test]
fn a_key_counts_the_same_from_the_query_or_the_header() {
    let local = OneEnvoy::local(r#"{"limits": ["3/hour"]}"#, 2);
    let addr = local.addr();
    let mut seen = Vec::new();
    for i in 0..4 {
        let r = if i % 2 == 0 {
            http::get(&addr, "/?api_key=shared").unwrap()
        } else {
            http::get_with(&addr, "/", &[("x-api-key", "shared")]).unwrap()
        };
        seen.push(r.status);
    }
    assert_eq!(seen, vec![200, 200, 200, 429]);
    // Percent-encoding and '+' decode to the same key, as in Django.
    let local = OneEnvoy::local(r#"{"limits": ["1/hour"]}"#, 1);
    assert_eq!(get(&local, "/?api_key=a+b%2Fc").status, 200);
    assert_eq!(get(&local, "/?api_key=a%20b/c").status, 429);
    assert_eq!(get(&local, "/?api%5Fkey=a+b/c").status, 429);
}
