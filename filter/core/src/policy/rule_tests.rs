//! Rules, cost and plans, end to end through the pipeline and the local
//! store (issue 12): which limits apply, that one step decides them all,
//! and what the load refuses.

use crate::config::ConfigError;
use crate::pipeline::{finish, start, Action, Event, Start, StoreFailure};
use crate::policy::Policy;
use crate::testing::{policy, Headers, MemStore, S};

const RULES: &str = r#"{
  "limits": ["12/min"],
  "rules": [
    {"name": "create-order", "match": {"methods": ["POST"], "path": "/orders"}, "limits": ["4/min"]},
    {"name": "eu", "match": {"hosts": ["eu.example.test"]}, "limits": ["6/min"]},
    {"name": "order", "match": {"path_template": "/orders/{id}"}, "limits": ["5/min"]},
    {"name": "llm", "match": {"path_prefix": "/v1"}, "limits": [{"rate": "100/min", "name": "tokens"}],
     "cost": {"header": "x-cost", "default": 1, "max": 50}},
    {"name": "big", "match": {"path": "/big"}, "limits": ["100/min"],
     "cost": {"header": "x-cost", "default": 1, "max": 500}},
    {"name": "batch", "match": {"path": "/batch"}, "limits": ["20/min"], "cost": 5}
  ]
}"#;

/// One request through the pipeline and a local store: its status, the
/// names of the limits that applied, and the 429 or 400 body.
fn send(
    p: &Policy,
    store: &mut MemStore,
    method: &str,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (u32, Vec<String>, String) {
    let mut pairs: Vec<(&str, &[u8])> = vec![
        (":method", method.as_bytes()),
        (":authority", host.as_bytes()),
        (":path", path.as_bytes()),
        ("x-api-key", b"k1"),
    ];
    pairs.extend(extra.iter().map(|(n, v)| (*n, v.as_bytes())));
    let headers = Headers::of(&pairs);
    let (action, names) = match start(p, &headers.map()) {
        Start::Done(action, _) => (action, Vec::new()),
        Start::Decide {
            hash,
            applied,
            events,
            ..
        } => {
            let limits = p.limits(&applied);
            let names = limits.iter().map(|l| l.name.as_str().to_string()).collect();
            let outcome = p
                .slot_table()
                .unwrap()
                .decide(store, hash, limits.as_slice(), 1_000 * S)
                .map_err(|()| StoreFailure::Host);
            (finish(p, &applied, events, outcome).0, names)
        }
        other => panic!("{other:?}"),
    };
    match action {
        Action::Continue(_) => (200, names, String::new()),
        Action::Respond(reply) => (reply.status, names, reply.body),
    }
}

fn status(p: &Policy, store: &mut MemStore, method: &str, host: &str, path: &str) -> u32 {
    send(p, store, method, host, path, &[]).0
}

#[test]
fn every_matching_rule_adds_its_limits_after_the_plans() {
    let p = policy(RULES);
    let mut store = MemStore::default();
    let (_, names, _) = send(&p, &mut store, "GET", "eu.example.test", "/orders/42", &[]);
    assert_eq!(names, ["12/min", "eu:6/min", "order:5/min"]);
    let (_, names, _) = send(&p, &mut store, "POST", "api.test", "/orders", &[]);
    assert_eq!(names, ["12/min", "create-order:4/min"]);
    let (_, names, _) = send(&p, &mut store, "GET", "api.test", "/orders", &[]);
    assert_eq!(names, ["12/min"], "GET /orders matches no rule");
}

#[test]
fn each_route_admits_its_own_limit_and_the_key_wide_one_caps_the_sum() {
    let p = policy(RULES);
    let mut store = MemStore::default();
    let admitted = |store: &mut MemStore, method, host, path, n| {
        (0..n)
            .filter(|_| status(&p, store, method, host, path) == 200)
            .count()
    };
    assert_eq!(admitted(&mut store, "POST", "api.test", "/orders", 10), 4);
    // create-order's denials consumed nothing: the order route has its 5.
    assert_eq!(admitted(&mut store, "GET", "api.test", "/orders/7", 10), 5);
    // 9 of the key-wide 12 are spent: 3 more anywhere, then nothing.
    assert_eq!(admitted(&mut store, "GET", "api.test", "/x", 10), 3);
    let (code, _, body) = send(&p, &mut store, "GET", "api.test", "/y", &[]);
    assert_eq!(code, 429);
    assert!(body.contains(r#""limit":"12/min""#), "{body}");
    let (code, _, body) = send(&p, &mut store, "POST", "api.test", "/orders", &[]);
    assert_eq!(code, 429);
    // Both deny; create-order waits longer (15 s a request against 5 s).
    assert!(body.contains(r#""limit":"create-order:4/min""#), "{body}");
}

#[test]
fn requests_shaped_differently_still_meet_their_route() {
    let p = policy(RULES);
    let mut store = MemStore::default();
    for path in [
        "/orders/",
        "//orders",
        "/./orders",
        "/x/../orders",
        "/%6Frders",
        "/orders?a=1",
    ] {
        let (_, names, _) = send(&p, &mut store, "POST", "api.test", path, &[]);
        assert!(
            names.contains(&"create-order:4/min".to_string()),
            "{path}: {names:?}"
        );
    }
    for method in ["post", "Post"] {
        let (_, names, _) = send(&p, &mut store, method, "api.test", "/orders", &[]);
        assert!(
            names.contains(&"create-order:4/min".to_string()),
            "{method}: {names:?}"
        );
    }
    for host in [
        "EU.Example.Test",
        "eu.example.test:8443",
        "eu.example.test.",
    ] {
        let (_, names, _) = send(&p, &mut store, "GET", host, "/", &[]);
        assert!(names.contains(&"eu:6/min".to_string()), "{host}: {names:?}");
    }
    let (code, _, _) = send(&p, &mut store, "GET", "api.test", "/orders%zz", &[]);
    assert_eq!(
        code, 400,
        "a path that cannot be read cannot dodge path rules"
    );
}

#[test]
fn a_cost_from_a_header_is_charged_and_a_bad_one_consumes_nothing() {
    let p = policy(RULES);
    let mut store = MemStore::default();
    for bad in ["abc", "0", "-1", "1.5", " 10", "51"] {
        let (code, _, body) = send(&p, &mut store, "GET", "h", "/v1/chat", &[("x-cost", bad)]);
        assert_eq!(code, 400, "{bad:?}: {body}");
    }
    let repeated = [("x-cost", "1"), ("x-cost", "1")];
    assert_eq!(
        send(&p, &mut store, "GET", "h", "/v1/chat", &repeated).0,
        400
    );
    let (code, _, body) = send(&p, &mut store, "GET", "h", "/big", &[("x-cost", "200")]);
    assert_eq!(code, 400);
    assert!(body.contains("can never be admitted"), "{body}");
    assert!(store.writes == 0, "a 400 consumed nothing");
    let admitted = (0..20)
        .filter(|_| send(&p, &mut store, "GET", "h", "/v1/chat", &[("x-cost", "10")]).0 == 200)
        .count();
    // 100 tokens at 10 a request; the key-wide 12/min counts requests.
    assert_eq!(admitted, 10);
    let (code, _, body) = send(&p, &mut store, "GET", "h", "/v1/x", &[("x-cost", "1")]);
    assert_eq!(code, 429);
    assert!(body.contains(r#""limit":"tokens""#), "{body}");
}

#[test]
fn a_fixed_cost_admits_the_burst_over_the_cost() {
    let p = policy(RULES);
    let mut store = MemStore::default();
    let admitted = (0..10)
        .filter(|_| status(&p, &mut store, "POST", "h", "/batch") == 200)
        .count();
    assert_eq!(admitted, 4);
}

#[test]
fn plans_registry_and_unknown_keys() {
    let digest = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"; // "1234"
    let json = format!(
        r#"{{"plans": {{"free": ["3/min"], "pro": ["10/min"]}},
            "keys": {{"pro": ["sha256:{digest}"], "free": ["f1"]}},
            "unknown_keys": "reject",
            "rules": [{{"name": "free-only", "match": {{"plans": ["free"]}}, "limits": ["2/min"]}}]}}"#
    );
    let p = policy(&json);
    let names = |key: &str| -> Result<Vec<String>, u32> {
        let headers = Headers::path(&format!("/?api_key={key}"));
        match start(&p, &headers.map()) {
            Start::Decide { applied, .. } => Ok(p
                .limits(&applied)
                .iter()
                .map(|l| l.name.as_str().to_string())
                .collect()),
            Start::Done(Action::Respond(reply), events) => {
                assert!(events.contains(Event::UnknownKey));
                assert!(reply.body.contains("not registered"), "{}", reply.body);
                Err(reply.status)
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(names("1234"), Ok(vec!["10/min".to_string()]));
    assert_eq!(
        names("f1"),
        Ok(vec!["3/min".into(), "free-only:2/min".into()])
    );
    assert_eq!(names("nobody"), Err(401));

    let p = policy(
        r#"{"plans": {"free": ["3/min"]}, "default_plan": "free", "keys": {"free": ["a"]},
            "overrides": [{"key": "gold", "limits": ["100/min"]}]}"#,
    );
    let first = |key: &str| {
        let headers = Headers::path(&format!("/?api_key={key}"));
        match start(&p, &headers.map()) {
            Start::Decide { applied, .. } => p.limits(&applied).as_slice()[0].rate.count,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((first("a"), first("stranger"), first("gold")), (3, 3, 100));
}

fn refused(json: &str) -> ConfigError {
    Policy::from_json(json.as_bytes()).unwrap_err()
}

#[test]
fn bad_rules_plans_and_registries_are_refused_naming_the_field() {
    let rule = |r: &str| format!(r#"{{"limits": ["1/s"], "rules": [{r}]}}"#);
    let cases = [
        (
            rule(r#"{"name": "a", "match": {}, "limits": ["1/s"]}"#),
            "rules[0].match",
        ),
        (
            rule(r#"{"name": "a", "match": {"path": "/a"}, "limits": ["1/s"], "x": 1}"#),
            "rules[0].x",
        ),
        (
            rule(r#"{"name": "a b", "match": {"path": "/a"}, "limits": ["1/s"]}"#),
            "rules[0].name",
        ),
        (
            rule(
                r#"{"name": "a", "match": {"path": "/a"}, "limits": ["1/s"]}, {"name": "a", "match": {"path": "/b"}, "limits": ["1/s"]}"#,
            ),
            "rules[1].name",
        ),
        (
            rule(
                r#"{"name": "a", "match": {"path": "/a", "path_prefix": "/b"}, "limits": ["1/s"]}"#,
            ),
            "rules[0].match.path_prefix",
        ),
        (
            rule(
                r#"{"name": "a", "match": {"path_template": "/orders/{id}.json"}, "limits": ["1/s"]}"#,
            ),
            "rules[0].match.path_template",
        ),
        (
            rule(r#"{"name": "a", "match": {"path": "orders"}, "limits": ["1/s"]}"#),
            "rules[0].match.path",
        ),
        (
            rule(r#"{"name": "a", "match": {"methods": []}, "limits": ["1/s"]}"#),
            "rules[0].match.methods",
        ),
        (
            rule(r#"{"name": "a", "match": {"hosts": ["a:80"]}, "limits": ["1/s"]}"#),
            "rules[0].match.hosts[0]",
        ),
        (
            rule(r#"{"name": "a", "match": {"headers": [{"name": "x"}]}, "limits": ["1/s"]}"#),
            "rules[0].match.headers[0]",
        ),
        (
            rule(r#"{"name": "a", "match": {"plans": ["gold"]}, "limits": ["1/s"]}"#),
            "rules[0].match.plans[0]",
        ),
        (
            rule(r#"{"name": "a", "match": {"path": "/a"}, "limits": []}"#),
            "rules[0].limits",
        ),
        (
            rule(r#"{"name": "a", "match": {"path": "/a"}, "limits": ["1/s"], "cost": 2}"#),
            "rules[0].cost",
        ),
        (
            rule(r#"{"name": "a", "match": {"path": "/a"}, "limits": ["5/s"], "cost": 0}"#),
            "rules[0].cost",
        ),
        (
            rule(
                r#"{"name": "a", "match": {"path": "/a"}, "limits": ["5/s"], "cost": {"header": "x", "default": 3, "max": 2}}"#,
            ),
            "rules[0].cost.max",
        ),
        (
            rule(
                r#"{"name": "a", "match": {"path": "/a"}, "limits": [{"rate": "5/s", "name": "1/s"}]}"#,
            ),
            "rules[0].limits",
        ),
        (r#"{"plans": {"free": ["1/s"]}}"#.to_string(), "limits"),
        (
            r#"{"limits": ["1/s"], "plans": {"default": ["1/s"]}}"#.to_string(),
            "plans.default",
        ),
        (
            r#"{"limits": ["1/s"], "keys": {"gold": ["a"]}}"#.to_string(),
            "keys.gold",
        ),
        (
            r#"{"limits": ["1/s"], "plans": {"p": ["2/s"]}, "keys": {"p": ["a", "a"]}}"#
                .to_string(),
            "keys.p[1]",
        ),
        (
            r#"{"limits": ["1/s"], "unknown_keys": "reject"}"#.to_string(),
            "unknown_keys",
        ),
        (
            r#"{"limits": ["1/s"], "default_plan": "gold"}"#.to_string(),
            "default_plan",
        ),
    ];
    for (json, field) in cases {
        let e = refused(&json);
        assert_eq!(e.field, field, "{json}: {e}");
    }
    // A key on one plan can meet at most 16 limits.
    let many: Vec<String> = (0..9)
        .map(|i| {
            format!(r#"{{"name": "r{i}", "match": {{"path": "/{i}"}}, "limits": ["1/s", "2/s"]}}"#)
        })
        .collect();
    let e = refused(&format!(
        r#"{{"limits": ["1/s"], "rules": [{}]}}"#,
        many.join(",")
    ));
    assert_eq!(e.field, "rules", "{e}");
    assert!(e.message.contains("at most 16"), "{e}");
}
