//! Exact status codes, bodies and headers, through the real Envoy and the
//! real upstream, for every kind of answer the filter gives.

use e2e::http::{self, Conn, Response};
use e2e::topology::OneEnvoy;

fn get(local: &OneEnvoy, target: &str) -> Response {
    http::get(&local.addr(), target).unwrap()
}

fn json_header(r: &Response) {
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
}

#[test]
fn allowed_and_throttled_responses_carry_exact_quota_headers() {
    let local = OneEnvoy::local(r#"{"limits": ["5/min"]}"#, 2);
    // 5/min: one every 12 s, 5 at once. Each `t` is the whole seconds until
    // the quota is full again; `r` what may still be sent.
    let expected_ratelimit = [
        "\"5/min\";r=4;t=12",
        "\"5/min\";r=3;t=24",
        "\"5/min\";r=2;t=36",
        "\"5/min\";r=1;t=48",
        "\"5/min\";r=0;t=60",
    ];
    for expected in expected_ratelimit {
        let r = get(&local, "/?api_key=1234");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body_str(), "\"ok\"");
        json_header(&r);
        assert_eq!(r.header("ratelimit-policy"), Some("\"5/min\";q=5;w=60"));
        assert_eq!(r.header("ratelimit"), Some(expected));
        assert_eq!(r.header("retry-after"), None);
        assert_eq!(r.header("x-ratelimit-limit"), None);
    }
    let r = get(&local, "/?api_key=1234");
    assert_eq!(r.status, 429);
    assert_eq!(r.reason, "Too Many Requests");
    json_header(&r);
    assert_eq!(
        r.body_str(),
        r#"{"detail":"Request was throttled. Expected available in 12 seconds.","limit":"5/min"}"#
    );
    assert_eq!(r.header("retry-after"), Some("12"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"5/min\";q=5;w=60"));
    assert_eq!(r.header("ratelimit"), Some("\"5/min\";r=0;t=60"));
    // The quota headers appear once, not again on the way out.
    assert_eq!(r.header_all("ratelimit").len(), 1);
}

#[test]
fn one_per_second_says_one_second_in_the_singular() {
    let local = OneEnvoy::local_shipped(1);
    assert_eq!(get(&local, "/?api_key=1234").status, 200);
    let r = get(&local, "/?api_key=1234");
    assert_eq!(r.status, 429);
    assert_eq!(
        r.body_str(),
        r#"{"detail":"Request was throttled. Expected available in 1 second.","limit":"1/s"}"#
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("ratelimit"), Some("\"1/s\";r=0;t=1"));
}

#[test]
fn several_limits_and_legacy_headers() {
    let local = OneEnvoy::local(
        r#"{"limits": ["2/min", {"rate": "100/day", "name": "daily"}],
            "response_headers": {"ratelimit": false, "x_ratelimit": true}}"#,
        1,
    );
    let r = get(&local, "/?api_key=k");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit"), None);
    assert_eq!(r.header("ratelimit-policy"), None);
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("30"));
    assert_eq!(get(&local, "/?api_key=k").status, 200);
    let r = get(&local, "/?api_key=k");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("60"));
}

#[test]
fn missing_key_gets_401_naming_where_the_key_goes() {
    let local = OneEnvoy::local_shipped(1);
    for target in ["/", "/?api_key=", "/?other=1"] {
        let r = get(&local, target);
        assert_eq!(r.status, 401, "{target}");
        json_header(&r);
        assert_eq!(r.header("www-authenticate"), Some("ApiKey"));
        assert_eq!(
            r.body_str(),
            r#"{"detail":"Authentication credentials were not provided. Send an API key in the query parameter 'api_key' or the header 'x-api-key'."}"#
        );
    }
    assert_eq!(local.metric_at_least("missing_key", 3), 3);
}

#[test]
fn missing_key_policies_allow_and_anonymous() {
    let local = OneEnvoy::local(r#"{"limits": ["1/hour"], "missing_key": "allow"}"#, 1);
    for _ in 0..3 {
        let r = get(&local, "/");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit"), None);
    }
    let local = OneEnvoy::local(
        r#"{"limits": ["1/hour"], "missing_key": "anonymous", "anonymous_limits": ["2/hour"]}"#,
        1,
    );
    let statuses: Vec<u16> = (0..3).map(|_| get(&local, "/").status).collect();
    assert_eq!(statuses, vec![200, 200, 429]);
    // A real key is not in the anonymous bucket.
    assert_eq!(get(&local, "/?api_key=k").status, 200);
}

#[test]
fn bad_keys_get_400_saying_what_is_wrong() {
    let local = OneEnvoy::local_shipped(1);
    let addr = local.addr();
    let long = format!("/?api_key={}", "k".repeat(257));
    let cases: Vec<(Response, &str)> = vec![
        (
            get(&local, "/?api_key=a&api_key=b"),
            "the query parameter 'api_key' is given more than once",
        ),
        (
            get(&local, "/?api_key=%zz"),
            "the query parameter 'api_key' is not valid percent-encoding",
        ),
        (
            get(&local, "/?api_key=%FF%FE"),
            "the query parameter 'api_key' is not valid UTF-8",
        ),
        (
            get(&local, &long),
            "the query parameter 'api_key' is longer than 256 bytes",
        ),
        (
            Conn::connect(&addr)
                .unwrap()
                .request("GET", b"/", &[("x-api-key", b"a"), ("x-api-key", b"b")])
                .unwrap(),
            "the header 'x-api-key' is given more than once",
        ),
        (
            Conn::connect(&addr)
                .unwrap()
                .request("GET", b"/", &[("x-api-key", b"\xff\xfekey")])
                .unwrap(),
            "the header 'x-api-key' is not valid UTF-8",
        ),
    ];
    for (r, why) in &cases {
        assert_eq!(r.status, 400, "{why}: {r:?}");
        json_header(r);
        assert_eq!(
            r.body_str(),
            format!(r#"{{"detail":"Invalid API key: {why}."}}"#)
        );
    }
    assert_eq!(local.metric_at_least("invalid_key", 6), 6);
    // A key of exactly the cap is fine.
    let max = format!("/?api_key={}", "k".repeat(256));
    assert_eq!(get(&local, &max).status, 200);
}

#[test]
fn shadow_mode_reports_but_never_denies() {
    let local = OneEnvoy::local(r#"{"limits": ["1/hour"], "shadow_mode": true}"#, 2);
    let first = get(&local, "/?api_key=k");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("ratelimit"), Some("\"1/hour\";r=0;t=3600"));
    for _ in 0..4 {
        let r = get(&local, "/?api_key=k");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body_str(), "\"ok\"");
        // The headers tell what enforcement would have said.
        assert_eq!(r.header("ratelimit"), Some("\"1/hour\";r=0;t=3600"));
        assert_eq!(r.header("retry-after"), None);
    }
    assert_eq!(local.metric_at_least("shadow_throttled", 4), 4);
    assert_eq!(local.metric("allowed"), 1);
    assert_eq!(local.metric("throttled"), 0);
}

#[test]
fn shadow_mode_lets_missing_and_bad_keys_through_counted_and_logged_once() {
    let local = OneEnvoy::local(
        r#"{"limits": ["1/hour"], "shadow_mode": true, "failure_mode": "deny"}"#,
        2,
    );
    for _ in 0..5 {
        for target in ["/", "/?api_key=%zz", "/?api_key=a&api_key=b"] {
            let r = get(&local, target);
            assert_eq!(
                (r.status, r.body_str().as_ref()),
                (200, "\"ok\""),
                "{target}: {r:?}"
            );
        }
    }
    assert_eq!(local.metric_at_least("shadow_missing_key", 5), 5);
    assert_eq!(local.metric_at_least("shadow_invalid_key", 10), 10);
    assert_eq!(local.metric("missing_key"), 5);
    assert_eq!(local.metric("invalid_key"), 10);
    // One line per cause per worker in 10 s, not one per request.
    let log = local.envoy.proc().log();
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    let missing = lines("shadow mode let through a request without an API key");
    let invalid = lines("shadow mode let through a request with an invalid API key");
    assert!((1..=2).contains(&missing), "{missing} lines:\n{log}");
    assert!((1..=2).contains(&invalid), "{invalid} lines:\n{log}");
}

#[test]
fn metrics_are_in_stats_and_prometheus() {
    let local = OneEnvoy::local_shipped(1);
    get(&local, "/?api_key=m");
    get(&local, "/?api_key=m");
    get(&local, "/");
    assert_eq!(local.metric_at_least("allowed", 1), 1);
    let prometheus = local.envoy.prometheus_text().unwrap();
    for event in [
        "allowed",
        "throttled",
        "shadow_throttled",
        "missing_key",
        "invalid_key",
        "cas_retries_exhausted",
        "cas_conflicts",
        "slot_evictions",
        "store_errors",
    ] {
        let stat = format!("wasmcustom.apikey_ratelimit.api.{event}");
        assert!(
            local.envoy.counter(&stat).is_some(),
            "{stat} missing from /stats"
        );
        let prom = format!("apikey_ratelimit_api_{event}");
        assert!(
            prometheus.contains(&prom),
            "{prom} missing from /stats/prometheus"
        );
    }
    assert!(
        prometheus.contains("apikey_ratelimit_api_throttled{} 1"),
        "{prometheus}"
    );
}
