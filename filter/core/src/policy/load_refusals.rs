//! Values that parse but would break at run time are refused when the
//! configuration loads, naming the field (issue 8, item 7).

use sha2::{Digest, Sha256};

use crate::gcra;
use crate::policy::Policy;
use crate::time::{nanos_to_micros, seconds_to_micros, seconds_to_nanos};

/// 2200-01-01T00:00:00Z: the latest wall clock both stores must compute at.
const YEAR_2200_SECONDS: u64 = 7_258_118_400;

fn refusal(json: &str) -> String {
    match Policy::from_json(json.as_bytes()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => {
            assert!(e.to_string().contains(&e.field), "{e}");
            e.field
        }
    }
}

fn limit(rate: &str, burst: u64) -> String {
    format!(r#"{{"limits": [{{"rate": "{rate}", "burst": {burst}}}]}}"#)
}

#[test]
fn a_capacity_beyond_what_both_stores_compute_exactly_is_refused_naming_the_burst() {
    // Accepted before, and its TAT saturated: 2,000 of 2,000 admitted.
    assert_eq!(refusal(&limit("1/366d", 583)), "limits[0].burst");
    assert_eq!(refusal(&limit("1/366d", 51)), "limits[0].burst");
    assert_eq!(refusal(&limit("1/d", 18_251)), "limits[0].burst");
    assert_eq!(
        refusal(
            r#"{"limits": ["1/s"], "overrides": [{"key": "k", "limits": ["1/s", {"rate": "1/d", "burst": 99999}]}]}"#
        ),
        "overrides[0].limits[1].burst"
    );
    assert!(Policy::from_json(limit("1/366d", 49).as_bytes()).is_ok());
    assert!(Policy::from_json(limit("1/d", 18_250).as_bytes()).is_ok());
    assert!(Policy::from_json(limit("1000000000/366d", 1_000_000_000).as_bytes()).is_ok());
}

#[test]
fn accepted_capacities_admit_exactly_their_burst_in_both_stores_until_2200() {
    let cases = [
        ("1/366d", 1),
        ("1/366d", 49),
        ("1/366d", 50),
        ("1/366d", 583),
        ("1/d", 18_250),
        ("1/d", 18_262),
        ("1/s", 1_000_000_000),
        ("1000000000/366d", 1_000_000_000),
    ];
    let mut accepted = 0;
    for (rate, burst) in cases {
        let json = limit(rate, burst);
        let Ok(policy) = Policy::from_json(json.as_bytes()) else {
            continue;
        };
        accepted += 1;
        let limits = &crate::testing::default_limits(&policy);
        // Local store: u64 nanoseconds, on a wall clock up to 2200 or a
        // monotonic clock near zero.
        for now in [seconds_to_nanos(YEAR_2200_SECONDS), 1] {
            let mut tats = [0];
            let admitted = (0..2_000)
                .filter(|_| gcra::decide(limits, &mut tats, now).allowed)
                .count();
            assert_eq!(admitted as u64, burst.min(2_000), "{json} at {now}");
        }
        // Redis: Lua doubles over microseconds of `TIME`, exact below 2^53.
        let l = &limits[0];
        let furthest_us = seconds_to_micros(YEAR_2200_SECONDS)
            + nanos_to_micros(l.capacity_nanos + l.interval_nanos);
        assert!(furthest_us < 1 << 53, "{json}: {furthest_us} µs");
    }
    assert!(accepted >= 4, "the largest accepted capacities are covered");
}

#[test]
fn query_parameter_names_that_can_never_match_are_refused() {
    for name in [
        "",
        "api_key=",
        "=",
        "a&b",
        "a#b",
        "a;b",
        ";",
        "api%5Fkey",
        "api+key",
        "%41",
    ] {
        let json = format!(r#"{{"limits": ["1/s"], "key_sources": [{{"query": "{name}"}}]}}"#);
        assert_eq!(refusal(&json), "key_sources[0].query", "{name:?}");
    }
    // Names as the application reads them, decoded, are fine.
    for name in ["api_key", "api key", "clé", "100%", "a.b-c~d"] {
        let json = format!(r#"{{"limits": ["1/s"], "key_sources": [{{"query": "{name}"}}]}}"#);
        assert!(Policy::from_json(json.as_bytes()).is_ok(), "{name:?}");
    }
}

#[test]
fn the_same_key_as_plain_text_and_as_sha256_is_refused() {
    let digest: String = Sha256::digest(b"gold")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let both = |first: &str, second: &str| {
        format!(
            r#"{{"limits": ["1/s"], "overrides": [
                {{"key": "{first}", "limits": ["10/s"]}},
                {{"key": "other", "limits": ["5/s"]}},
                {{"key": "{second}", "limits": ["100/s"]}}]}}"#
        )
    };
    let hashed = format!("sha256:{digest}");
    assert_eq!(refusal(&both("gold", &hashed)), "overrides[2].key");
    assert_eq!(refusal(&both(&hashed, "gold")), "overrides[2].key");
    assert_eq!(
        refusal(&both(
            &hashed,
            &hashed.to_uppercase().replace("SHA256:", "sha256:")
        )),
        "overrides[2].key"
    );
    assert!(Policy::from_json(both("gold", "silver").as_bytes()).is_ok());
}
