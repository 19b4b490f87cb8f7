//! Policies (issue 12) through the real Envoy: what a request costs (from a
//! header, or fixed), plans and the key registry, the per-rule and
//! per-limit counters, and the quota headers when several limits apply.
//!
//! Every rate is per hour: nothing refills while a test runs, so each count
//! is exact however slow the machine is.

use std::collections::HashMap;

use e2e::http::{Conn, Response};
use e2e::metrics;
use e2e::topology::{Mode, OneEnvoy, Replicas};
use sha2::{Digest, Sha256};

/// One request on a fresh connection, with `x-api-key: key`.
fn send(addr: &str, method: &str, target: &str, key: &str, headers: &[(&str, &str)]) -> Response {
    let mut all: Vec<(&str, &[u8])> = vec![("x-api-key", key.as_bytes()), ("Connection", b"close")];
    all.extend(headers.iter().map(|(n, v)| (*n, v.as_bytes())));
    Conn::connect(addr)
        .unwrap()
        .request(method, target.as_bytes(), &all)
        .unwrap()
}

fn get(addr: &str, target: &str, key: &str) -> Response {
    send(addr, "GET", target, key, &[])
}

/// A Structured Fields list of strings with integer parameters (RFC 9651),
/// parsed by `sfv`: each member's name and parameters, in order.
fn sf_members(value: &str) -> Vec<(String, HashMap<String, i64>)> {
    let list: sfv::List = sfv::Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{value:?} is not a Structured Fields list: {e}"));
    list.into_iter()
        .map(|entry| {
            let sfv::ListEntry::Item(item) = entry else {
                panic!("{value:?}: an inner list")
            };
            let name = item
                .bare_item
                .as_string()
                .unwrap_or_else(|| panic!("{value:?}: a member that is not a string"))
                .as_str()
                .to_string();
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .as_integer()
                        .unwrap_or_else(|| panic!("{value:?}: {k:?} is not an integer"));
                    (k.as_str().to_string(), v.into())
                })
                .collect();
            (name, params)
        })
        .collect()
}

/// The `RateLimit` header's members, checked to be one Structured Fields
/// list whose names are those of `RateLimit-Policy`, in the same order.
fn quota(r: &Response) -> Vec<(String, HashMap<String, i64>)> {
    assert_eq!(r.header_all("ratelimit").len(), 1, "{r:?}");
    assert_eq!(r.header_all("ratelimit-policy").len(), 1, "{r:?}");
    let policy = sf_members(r.header("ratelimit-policy").unwrap());
    let state = sf_members(r.header("ratelimit").unwrap());
    let names = |m: &[(String, HashMap<String, i64>)]| -> Vec<String> {
        m.iter().map(|(n, _)| n.clone()).collect()
    };
    assert_eq!(names(&policy), names(&state), "{r:?}");
    state
}

/// What `RateLimit` says remains of limit `name`.
fn remaining(r: &Response, name: &str) -> i64 {
    quota(r)
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no limit {name:?} in {r:?}"))
        .1["r"]
}

/// The limit a 429 names.
fn denying_limit(r: &Response) -> String {
    assert_eq!(r.status, 429, "{r:?}");
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    body["limit"].as_str().unwrap_or_default().to_string()
}

fn detail(message: &str) -> String {
    serde_json::json!({ "detail": message }).to_string()
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A plan limit of 1000 for every key, and three rules: `llm` charges what
/// `x-cost` says (1 to 50), `big` allows costs its limit can never hold,
/// `batch` costs 5 a request.
const COST_RULES: &str = r#"
  "limits": ["1000/hour"],
  "rules": [
    {"name": "llm", "match": {"path_prefix": "/v1"}, "limits": ["100/hour"],
     "cost": {"header": "x-cost", "default": 1, "max": 50}},
    {"name": "big", "match": {"path_prefix": "/big"}, "limits": ["100/hour"],
     "cost": {"header": "x-cost", "default": 1, "max": 500}},
    {"name": "batch", "match": {"path": "/batch"}, "limits": ["20/hour"], "cost": 5}
  ]"#;

/// Costs the filter refuses: not one whole number from 1.
const MALFORMED_COSTS: [&str; 9] = ["abc", "0", "-1", "1.5", "+1", "1 0", "0x10", "1e3", ""];

/// The header-cost scenario on one key, through `addr` (one Envoy, or a
/// front proxy over replicas); returns how many 400s it was answered.
fn header_cost_scenario(addr: &str, key: &str) -> u64 {
    let malformed = detail(
        "Invalid request cost: the x-cost header must be one whole number from 1 (rule llm).",
    );
    let mut bad_requests = 0;
    let mut expect_400 = |r: Response, body: &str, what: &str| {
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
        assert_eq!(r.body_str(), body, "{what}");
        assert_eq!(r.header("ratelimit"), None, "{what}: {r:?}");
        bad_requests += 1;
    };
    for cost in MALFORMED_COSTS {
        let r = send(addr, "GET", "/v1/chat", key, &[("x-cost", cost)]);
        expect_400(r, &malformed, &format!("x-cost {cost:?}"));
    }
    let r = send(
        addr,
        "GET",
        "/v1/chat",
        key,
        &[("x-cost", "10"), ("x-cost", "10")],
    );
    expect_400(r, &malformed, "x-cost given twice");
    let r = send(addr, "GET", "/v1/chat", key, &[("x-cost", "51")]);
    expect_400(
        r,
        &detail("Invalid request cost: 51 is above the most one request may cost, 50 (header x-cost, rule llm)."),
        "x-cost 51",
    );
    let r = send(addr, "GET", "/big", key, &[("x-cost", "200")]);
    expect_400(
        r,
        &detail("Request cost 200 can never be admitted: limit big:100/hour admits at most 100 at once."),
        "x-cost 200 on /big",
    );

    // None of those consumed anything: the first real request finds both
    // its limits whole. Ten at 10 fill the 100.
    for i in 1..=10 {
        let r = send(addr, "GET", "/v1/chat", key, &[("x-cost", "10")]);
        assert_eq!(r.status, 200, "request {i} at cost 10: {r:?}");
        assert_eq!(remaining(&r, "llm:100/hour"), 100 - 10 * i, "{r:?}");
        assert_eq!(remaining(&r, "1000/hour"), 1000 - i, "{r:?}");
    }
    let r = send(addr, "GET", "/v1/chat", key, &[("x-cost", "10")]);
    assert_eq!(denying_limit(&r), "llm:100/hour", "{r:?}");
    assert_eq!(remaining(&r, "llm:100/hour"), 0, "{r:?}");
    // The denied request took nothing from the plan's limit either.
    assert_eq!(remaining(&r, "1000/hour"), 990, "{r:?}");
    // A cost of 1 (the default, no header) does not fit either.
    assert_eq!(denying_limit(&get(addr, "/v1/chat", key)), "llm:100/hour");
    // A bad cost is still a 400 on a spent key: refused before counting.
    let r = send(addr, "GET", "/v1/chat", key, &[("x-cost", "abc")]);
    expect_400(r, &malformed, "x-cost abc on a spent key");
    // Only /v1 is spent: the key's other requests go on.
    let r = get(addr, "/", key);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(quota(&r).len(), 1, "only the plan's limit applies: {r:?}");
    assert_eq!(remaining(&r, "1000/hour"), 989, "{r:?}");
    bad_requests
}

#[test]
fn a_header_cost_admits_exactly_what_fits_and_a_bad_cost_consumes_nothing() {
    let local = OneEnvoy::local(&format!("{{{COST_RULES}}}"), 2);
    let addr = local.addr();
    let bad_requests = header_cost_scenario(&addr, "cost-key");

    // Absent header: the default cost, 1.
    let r = get(&addr, "/v1/chat", "other-key");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(remaining(&r, "llm:100/hour"), 99, "{r:?}");

    // Leading and trailing spaces are not part of an HTTP field value:
    // Envoy strips them, and " 10 " is 10.
    let r = send(
        &addr,
        "GET",
        "/v1/chat",
        "spaced-key",
        &[("x-cost", " 10 ")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(remaining(&r, "llm:100/hour"), 90, "{r:?}");

    assert_eq!(
        local.metric_at_least("bad_request", bad_requests),
        bad_requests
    );
    let counters = metrics::counters(
        &local.envoy,
        &[
            "allowed",
            "throttled",
            "rule.llm.requests",
            "rule.llm.throttled",
            "limit.llm_100_hour.throttled",
            "rule.big.requests",
            "limit.big_100_hour.throttled",
        ],
    );
    // Admitted: 10 at cost 10, 1 on /, then "other-key" and "spaced-key".
    // A 400 is no request of a rule: its cost could not be charged.
    assert_eq!(
        counters,
        [13, 2, 12 + 2, 2, 2, 0, 0].map(Some),
        "allowed, throttled, rule llm (requests, throttled), limit llm, rule big, limit big"
    );
}

#[test]
fn a_fixed_cost_of_5_on_a_20_limit_admits_exactly_4() {
    let local = OneEnvoy::local(&format!("{{{COST_RULES}}}"), 1);
    let addr = local.addr();
    for i in 1..=4 {
        let r = send(&addr, "POST", "/batch", "batcher", &[]);
        assert_eq!(r.status, 200, "batch {i}: {r:?}");
        assert_eq!(remaining(&r, "batch:20/hour"), 20 - 5 * i, "{r:?}");
        assert_eq!(remaining(&r, "1000/hour"), 1000 - i, "{r:?}");
    }
    let r = send(&addr, "POST", "/batch", "batcher", &[]);
    assert_eq!(denying_limit(&r), "batch:20/hour", "{r:?}");
    // The same path written otherwise is the same path (the filter
    // normalizes it before matching): no way around the rule.
    for target in [
        "//batch",
        "/batch/",
        "/x/../batch",
        "/%62atch",
        "/./batch?x=1",
        "/batch%2f",
    ] {
        let r = send(&addr, "POST", target, "batcher", &[]);
        assert_eq!(denying_limit(&r), "batch:20/hour", "{target}: {r:?}");
    }
    // A path under /batch is not /batch: the exact rule does not apply.
    let r = get(&addr, "/batch/1", "batcher");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(quota(&r).len(), 1, "{r:?}");
}

#[test]
fn a_header_cost_over_two_replicas_with_redis_counts_once() {
    // A generous timeout keeps this about counting (a timed-out call falls
    // to the failure mode, which the fault tests cover).
    let config = format!(r#"{{{COST_RULES}, "store": {{"webdis": {{"timeout_ms": 5000}}}}}}"#);
    let replicas = Replicas::start(Mode::Global, 2, 1, Some(&config));
    let addr = replicas.addr();
    let bad_requests = header_cost_scenario(&addr, "global-cost-key");
    // Both replicas took part in the count.
    let per_replica = replicas.requests_per_replica();
    assert!(per_replica.iter().all(|n| *n >= 5), "{per_replica:?}");
    let sum = |event: &str| {
        replicas
            .replicas
            .iter()
            .map(|r| metrics::metric(r, event))
            .sum::<u64>()
    };
    assert_eq!(sum("bad_request"), bad_requests);
    assert_eq!(sum("store_errors"), 0);
    assert_eq!(sum("allowed"), 11);
    assert_eq!(sum("throttled"), 2);
    assert_eq!(sum("rule.llm.requests"), 12);
    assert_eq!(sum("rule.llm.throttled"), 2);
    assert_eq!(sum("limit.llm_100_hour.throttled"), 2);
}

/// Plans `free` (3) and `pro` (10), each with one plain and one `sha256:`
/// key; `rest` adds to the configuration.
fn plans_config(rest: &str) -> String {
    format!(
        r#"{{"plans": {{"free": ["3/hour"], "pro": ["10/hour"]}},
            "keys": {{"free": ["free-plain", "sha256:{}"],
                      "pro": ["pro-plain", "sha256:{}"]}},
            {rest}}}"#,
        sha256_hex("free-hashed"),
        sha256_hex("pro-hashed"),
    )
}

/// `n` requests of `key` to `/` are admitted, each saying `policy`, and the
/// next is denied by the limit of that name.
fn admits_exactly(addr: &str, key: &str, n: i64, limit: &str) {
    let policy = format!("\"{limit}\";q={n};w=3600");
    for i in 1..=n {
        let r = get(addr, "/", key);
        assert_eq!(r.status, 200, "{key}, request {i}: {r:?}");
        assert_eq!(r.header("ratelimit-policy"), Some(policy.as_str()), "{key}");
        assert_eq!(remaining(&r, limit), n - i, "{key}");
    }
    let r = get(addr, "/", key);
    assert_eq!(denying_limit(&r), limit, "{key}: {r:?}");
    assert_eq!(r.header("ratelimit-policy"), Some(policy.as_str()), "{key}");
}

#[test]
fn registered_keys_get_their_plans_limit_and_unknown_keys_are_refused() {
    let local = OneEnvoy::local(
        &plans_config(
            r#""unknown_keys": "reject",
               "rules": [{"name": "free-search", "match": {"path_prefix": "/search", "plans": ["free"]},
                          "limits": ["1/hour"]}]"#,
        ),
        2,
    );
    let addr = local.addr();
    admits_exactly(&addr, "free-hashed", 3, "3/hour");
    admits_exactly(&addr, "pro-plain", 10, "10/hour");
    admits_exactly(&addr, "pro-hashed", 10, "10/hour");

    // A rule for plan free applies to free keys only.
    let r = get(&addr, "/search", "free-plain");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"3/hour\";q=3;w=3600, \"free-search:1/hour\";q=1;w=3600")
    );
    let r = get(&addr, "/search", "free-plain");
    assert_eq!(denying_limit(&r), "free-search:1/hour", "{r:?}");
    assert_eq!(
        remaining(&r, "3/hour"),
        2,
        "the 429 consumed nothing: {r:?}"
    );
    for _ in 0..2 {
        let r = get(&addr, "/search", "pro-hashed");
        assert_eq!(denying_limit(&r), "10/hour", "only pro's limit: {r:?}");
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"10/hour\";q=10;w=3600")
        );
    }
    assert_eq!(get(&addr, "/", "free-plain").status, 200);
    assert_eq!(get(&addr, "/", "free-plain").status, 200);
    assert_eq!(denying_limit(&get(&addr, "/", "free-plain")), "3/hour");

    // Unregistered keys, and a registered digest sent as if it were a key.
    let digest_as_key = format!("sha256:{}", sha256_hex("pro-hashed"));
    let unknown = [
        "stranger",
        "FREE-PLAIN",
        digest_as_key.as_str(),
        &sha256_hex("pro-hashed"),
    ];
    for key in unknown {
        let r = get(&addr, "/", key);
        assert_eq!(r.status, 401, "{key}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("www-authenticate"), Some("ApiKey"));
        assert_eq!(r.header("ratelimit"), None);
        assert_eq!(
            r.body_str(),
            detail("Invalid API key: this key is not registered.")
        );
    }
    assert_eq!(
        local.metric_at_least("unknown_key", unknown.len() as u64),
        unknown.len() as u64
    );
    assert_eq!(local.metric("missing_key"), 0);
}

#[test]
fn a_default_plan_takes_unregistered_keys_and_overrides_still_apply() {
    let local = OneEnvoy::local(
        &plans_config(
            r#""default_plan": "free",
               "overrides": [{"key": "vip", "limits": ["5/hour"]},
                             {"key": "internal", "limits": []}]"#,
        ),
        1,
    );
    let addr = local.addr();
    admits_exactly(&addr, "stranger", 3, "3/hour");
    admits_exactly(&addr, "another-stranger", 3, "3/hour");
    admits_exactly(&addr, "free-plain", 3, "3/hour");
    admits_exactly(&addr, "pro-hashed", 10, "10/hour");
    admits_exactly(&addr, "vip", 5, "5/hour");
    for _ in 0..12 {
        let r = get(&addr, "/", "internal");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit"), None, "an unlimited key: {r:?}");
    }
    assert_eq!(local.metric("unknown_key"), 0);
}

#[test]
fn counters_and_429s_name_the_rule_and_the_limit_never_the_key() {
    let local = OneEnvoy::local(
        r#"{"limits": ["100/hour"],
            "rules": [
              {"name": "create-order", "match": {"methods": ["POST"], "path": "/orders"},
               "limits": ["2/hour"]},
              {"name": "order", "match": {"path_template": "/orders/{id}"},
               "limits": [{"rate": "3/hour", "name": "order-reads"}]}
            ]}"#,
        2,
    );
    let addr = local.addr();
    let key = "s3cret-key-4711";
    let mut statuses = Vec::new();
    let mut denials = Vec::new();
    let mut record = |r: Response| {
        statuses.push(r.status);
        if r.status == 429 {
            let body = r.body_str();
            assert!(!body.contains(key), "the key in a 429 body: {body}");
            for (name, value) in &r.headers {
                let value = String::from_utf8_lossy(value);
                assert!(!value.contains(key), "the key in header {name}: {value}");
            }
            denials.push(denying_limit(&r));
        }
    };
    for _ in 0..4 {
        record(send(&addr, "POST", "/orders", key, &[]));
    }
    for _ in 0..2 {
        record(get(&addr, "/orders", key)); // a GET: no rule
    }
    for target in [
        "/orders/7",
        "/orders/7",
        "/orders/8",
        "/orders/9",
        "/orders/7",
    ] {
        record(get(&addr, target, key));
    }
    record(send(&addr, "POST", "/orders", "another-key", &[]));
    assert_eq!(
        statuses,
        [200, 200, 429, 429, 200, 200, 200, 200, 200, 429, 429, 200]
    );
    assert_eq!(
        denials,
        [
            "create-order:2/hour",
            "create-order:2/hour",
            "order-reads",
            "order-reads"
        ]
    );
    let names = [
        "allowed",
        "throttled",
        "rule.create_order.requests",
        "rule.create_order.throttled",
        "rule.order.requests",
        "rule.order.throttled",
        "limit.create_order_2_hour.throttled",
        "limit.order_reads.throttled",
        "limit.100_hour.throttled",
    ];
    assert_eq!(local.metric_at_least("allowed", 8), 8);
    let counters = metrics::counters(&local.envoy, &names);
    let got: Vec<(&str, Option<u64>)> = names.into_iter().zip(counters).collect();
    let expected: Vec<(&str, Option<u64>)> = names
        .into_iter()
        .zip([8, 4, 5, 2, 5, 2, 2, 2, 0].map(Some))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn quota_headers_stay_structured_fields_when_five_limits_apply() {
    let local = OneEnvoy::local(
        r#"{"plans": {"pro": ["10/hour", {"rate": "1000/day", "name": "daily"}]},
            "default_plan": "pro",
            "rules": [
              {"name": "writes", "match": {"methods": ["POST", "PUT"]}, "limits": ["5/hour"]},
              {"name": "v1", "match": {"path_prefix": "/v1"},
               "limits": ["20/hour", {"rate": "50/day", "name": "v1-daily"}]}
            ]}"#,
        1,
    );
    let addr = local.addr();
    // (name, q, w) in the order the headers list them: the plan's, then
    // each matching rule's in rule order.
    let all = [
        ("10/hour", 10, 3600),
        ("daily", 1000, 86400),
        ("writes:5/hour", 5, 3600),
        ("v1:20/hour", 20, 3600),
        ("v1-daily", 50, 86400),
    ];
    let check = |r: &Response, applied: &[usize], used: &[i64]| {
        let policy = sf_members(r.header("ratelimit-policy").unwrap());
        let state = quota(r);
        assert_eq!(policy.len(), applied.len(), "{r:?}");
        for ((&i, (name, params)), (_, st)) in applied.iter().zip(&policy).zip(&state) {
            let (want, q, w) = all[i];
            assert_eq!(name, want, "{r:?}");
            assert_eq!((params["q"], params["w"]), (q, w), "{r:?}");
            assert_eq!(st["r"], q - used[i], "{name}: {r:?}");
            assert!((0..=w).contains(&st["t"]), "{name}: {r:?}");
        }
    };
    let mut used = [0i64; 5];
    for i in 0..5 {
        let r = send(&addr, "POST", "/v1/items", "k", &[]);
        assert_eq!(r.status, 200, "post {i}: {r:?}");
        for u in &mut used {
            *u += 1;
        }
        check(&r, &[0, 1, 2, 3, 4], &used);
    }
    let r = send(&addr, "PUT", "/v1/items", "k", &[]);
    assert_eq!(denying_limit(&r), "writes:5/hour");
    check(&r, &[0, 1, 2, 3, 4], &used);
    let r = get(&addr, "/v1/items", "k");
    assert_eq!(r.status, 200, "{r:?}");
    for i in [0, 1, 3, 4] {
        used[i] += 1;
    }
    check(&r, &[0, 1, 3, 4], &used);
    let r = get(&addr, "/", "k");
    assert_eq!(r.status, 200, "{r:?}");
    used[0] += 1;
    used[1] += 1;
    check(&r, &[0, 1], &used);
}
