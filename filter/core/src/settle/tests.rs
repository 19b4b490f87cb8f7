//! Settlement: the configuration, what a response says, the arithmetic on
//! both kinds of limit, which limits a request reserved, and a local store
//! settling a token budget.

use super::body::BodyScan;
use super::*;
use crate::calendar::PeriodKind;
use crate::config::Config;
use crate::gcra::{decide, peek, Clock};
use crate::pipeline::{start, Start};
use crate::testing::{limit, policy, quota_limit, Headers, MemStore, S};

const BUDGET: &str = r#"{
  "limits": ["1000/s"],
  "rules": [
    {"name": "plain", "match": {"path": "/plain"}, "limits": ["5/min"]},
    {"name": "chat", "match": {"path_prefix": "/v1"},
     "limits": [{"quota": "1000/day", "reset": "calendar", "name": "tokens"}, {"rate": "3000/h", "name": "tokens-h"}],
     "cost": {"header": "x-estimate", "default": 300, "min": 50, "max": 1000},
     "settle": {"header": "x-usage-tokens"}}
  ]
}"#;

fn settle_config(settle: &str) -> Result<Policy, crate::ConfigError> {
    let json = format!(
        r#"{{"limits": ["1/s"], "rules": [{{"name": "r", "match": {{"path": "/x"}}, "limits": ["9/s"], "settle": {settle}}}]}}"#
    );
    Config::from_json(json.as_bytes()).and_then(Policy::compile)
}

#[test]
fn settle_takes_exactly_one_source_and_names_the_field_it_refuses() {
    let ok = settle_config(r#"{"json": "usage.total_tokens", "max_body_bytes": 4096}"#).unwrap();
    assert_eq!(
        ok.rules[0].settle,
        Some(Source::Json {
            path: vec!["usage".into(), "total_tokens".into()],
            max_body_bytes: 4096
        })
    );
    let header = settle_config(r#"{"header": "X-Usage-Tokens"}"#).unwrap();
    assert_eq!(
        header.rules[0].settle,
        Some(Source::Header("x-usage-tokens".into()))
    );
    for (bad, field) in [
        (r#"{}"#, "rules[0].settle"),
        (r#"{"header": "a", "trailer": "b"}"#, "rules[0].settle"),
        (r#"{"header": "a b"}"#, "rules[0].settle.header"),
        (r#"{"trailer": ""}"#, "rules[0].settle.trailer"),
        (r#"{"json": "a..b"}"#, "rules[0].settle.json"),
        (r#"{"json": "a.b.c.d.e.f.g.h.i"}"#, "rules[0].settle.json"),
        (
            r#"{"json": "a", "max_body_bytes": 0}"#,
            "rules[0].settle.max_body_bytes",
        ),
        (
            r#"{"json": "a", "max_body_bytes": 2000000}"#,
            "rules[0].settle.max_body_bytes",
        ),
        (
            r#"{"header": "a", "max_body_bytes": 10}"#,
            "rules[0].settle.max_body_bytes",
        ),
    ] {
        let error = settle_config(bad).unwrap_err();
        assert_eq!(error.field, field, "{bad}: {error}");
    }
    assert!(settle_config(r#"{"header": "a", "extra": 1}"#).is_err());
    let min = |min: u64| {
        let json = format!(
            r#"{{"limits": ["1/s"], "rules": [{{"name": "r", "match": {{"path": "/x"}}, "limits": ["900/s"],
                "cost": {{"header": "x-e", "default": 10, "min": {min}, "max": 100}}}}]}}"#
        );
        Config::from_json(json.as_bytes()).and_then(Policy::compile)
    };
    assert!(min(10).is_ok());
    assert_eq!(min(0).unwrap_err().field, "rules[0].cost.min");
    assert_eq!(min(11).unwrap_err().field, "rules[0].cost.min");
}

#[test]
fn a_value_is_plain_digits_from_zero_to_the_largest_cost() {
    assert_eq!(parse_value(b"300"), Observed::Value(300));
    assert_eq!(parse_value(b" 0 "), Observed::Value(0));
    assert_eq!(parse_value(b"1000000000"), Observed::Value(MAX_COST));
    for bad in [
        &b""[..],
        b"-1",
        b"+3",
        b"3.0",
        b"1e3",
        b"abc",
        b"1000000001",
        b"99999999999",
        b"3 4",
    ] {
        assert_eq!(parse_value(bad), Observed::Malformed, "{bad:?}");
    }
}

#[test]
fn a_header_given_twice_is_malformed_and_an_absent_one_missing() {
    let map = crate::header_map::serialize(&[
        (b":status", b"200"),
        (b"x-usage-tokens", b"300"),
        (b"x-twice", b"1"),
        (b"x-twice", b"2"),
    ]);
    let headers = crate::header_map::HeaderMap::parse(&map);
    let observe = |name| observe_header(headers.as_ref(), name);
    assert_eq!(observe("x-usage-tokens"), Observed::Value(300));
    assert_eq!(observe("x-twice"), Observed::Malformed);
    assert_eq!(observe("x-other"), Observed::Missing);
    let unreadable = crate::header_map::HeaderMap::parse(b"\xff");
    assert_eq!(
        observe_header(unreadable.as_ref(), "x-usage-tokens"),
        Observed::Missing
    );
}

#[test]
fn the_outcome_is_the_difference_and_only_a_value_moves_the_store() {
    assert_eq!(Outcome::of(300, Observed::Value(300)), Outcome::Exact);
    assert_eq!(Outcome::of(300, Observed::Value(120)), Outcome::Refund(180));
    assert_eq!(Outcome::of(300, Observed::Value(0)), Outcome::Refund(300));
    assert_eq!(Outcome::of(300, Observed::Value(450)), Outcome::Charge(150));
    assert_eq!(Outcome::of(300, Observed::Missing).adjust(), None);
    assert_eq!(Outcome::of(300, Observed::Malformed).adjust(), None);
    assert_eq!(Outcome::Aborted.adjust(), None);
    assert_eq!(Outcome::Refund(4).adjust(), Some(Adjust::Refund(4)));
    let names: std::collections::HashSet<_> = Outcome::NAMES.iter().collect();
    assert_eq!(names.len(), Outcome::NAMES.len());
}

#[test]
fn a_rate_gets_back_what_was_unused_but_never_more_than_a_full_bucket() {
    let l = limit(10, 10, 10); // T = 1 s, capacity 10 s
    let now = 1_000 * S;
    let clock = Clock::wall(now);
    // 6 reserved: TAT now + 6 s; 4 of them unused.
    let tat = now + 6 * S;
    assert_eq!(apply(Adjust::Refund(4), &l, tat, clock), now + 2 * S);
    assert_eq!(apply(Adjust::Refund(40), &l, tat, clock), now);
    // Nothing owed: nothing to give back.
    assert_eq!(apply(Adjust::Refund(4), &l, now - S, clock), now - S);
    assert_eq!(apply(Adjust::Refund(4), &l, 0, clock), 0);
    // A charge is debt, past the capacity too.
    assert_eq!(apply(Adjust::Charge(7), &l, tat, clock), now + 13 * S);
    assert_eq!(apply(Adjust::Charge(2), &l, 0, clock), now + 2 * S);
    let far = apply(
        Adjust::Charge(MAX_COST),
        &limit(1, 86_400 * 366, 1),
        tat,
        clock,
    );
    assert_eq!(far, now + MAX_DEBT_NANOS);
    // The debt throttles: a request waits until it drains below the tolerance.
    let mut tats = [now + 13 * S];
    let d = decide(&[l], &mut tats, now);
    assert!(!d.allowed);
    assert_eq!(d.retry_after_nanos, 4 * S);
}

#[test]
fn a_quota_settles_in_its_current_period() {
    let q = quota_limit("tokens", 1000, PeriodKind::Day, 0);
    let day = 86_400 * S;
    let now = 20_000 * day + 3_600 * S;
    let clock = Clock::wall(now);
    let mut tats = [0];
    let reserve = |tats: &mut [u64; 1], cost: u64| decide(&[q.costing(cost)], tats, clock).allowed;
    assert!(reserve(&mut tats, 300));
    tats[0] = apply(Adjust::Refund(100), &q, tats[0], clock);
    assert_eq!(peek(&[q], &tats, clock).states()[0].remaining, 800);
    tats[0] = apply(Adjust::Charge(850), &q, tats[0], clock);
    let state = peek(&[q], &tats, clock).states()[0];
    assert_eq!(state.remaining, 0);
    assert!(!reserve(&mut tats, 1));
    // Refunds never go below nothing used.
    tats[0] = apply(Adjust::Refund(5_000), &q, tats[0], clock);
    assert_eq!(peek(&[q], &tats, clock).states()[0].remaining, 1000);
    // A refund that lands in the next period has nothing to give back; a
    // charge lands in the period it reaches.
    assert!(reserve(&mut tats, 400));
    let tomorrow = Clock::wall(now + day);
    let after = apply(Adjust::Refund(400), &q, tats[0], tomorrow);
    assert_eq!(peek(&[q], &[after], tomorrow).states()[0].remaining, 1000);
    let charged = apply(Adjust::Charge(30), &q, tats[0], tomorrow);
    assert_eq!(peek(&[q], &[charged], tomorrow).states()[0].remaining, 970);
    // No wall clock: a quota cannot be placed, and is left as it is.
    let unplaced = Clock::local(now, None);
    assert_eq!(apply(Adjust::Charge(30), &q, tats[0], unplaced), tats[0]);
}

#[test]
fn a_request_reserves_on_its_settling_rules_limits_only() {
    let p = policy(BUDGET);
    let applied = |path: &str, extra: &[(&str, &[u8])]| {
        let mut pairs: Vec<(&str, &[u8])> = vec![(":path", path.as_bytes()), ("x-api-key", b"k")];
        pairs.extend_from_slice(extra);
        match start(&p, &Headers::of(&pairs).map()) {
            Start::Decide { applied, .. } => applied,
            other => panic!("{other:?}"),
        }
    };
    assert!(reserved(&p, &applied("/plain", &[])).is_empty());
    let chat = reserved(&p, &applied("/v1/chat", &[]));
    assert_eq!(chat.len(), 1);
    assert_eq!(chat[0].estimate, 300);
    assert_eq!(chat[0].rule, 1);
    let limits = chat[0].limits(&p);
    let names: Vec<_> = limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["tokens", "tokens-h"]);
    assert!(limits.iter().all(|l| l.cost == 1));
    assert_eq!(
        chat[0].source(&p),
        Some(&Source::Header("x-usage-tokens".into()))
    );
    let estimated = reserved(&p, &applied("/v1/chat", &[("x-estimate", b"800")]));
    assert_eq!(estimated[0].estimate, 800);
    // A client cannot reserve less than `min`, whatever it sends.
    let low = reserved(&p, &applied("/v1/chat", &[("x-estimate", b"1")]));
    assert_eq!(low[0].estimate, 50);
}

#[test]
fn the_deny_cache_never_decides_on_a_settled_rules_limits() {
    // A refund lowers them, on any replica: a cached denial of them could
    // outlive the room a refund made (until the quota's period ends).
    let p = policy(BUDGET);
    let applied = |path: &str| {
        let headers = Headers::of(&[(":path", path.as_bytes()), ("x-api-key", b"k")]);
        match start(&p, &headers.map()) {
            Start::Decide { applied, .. } => applied,
            other => panic!("{other:?}"),
        }
    };
    let names = |a: &crate::applied::Applied| -> Vec<String> {
        p.limits(a)
            .iter()
            .map(|l| l.name.as_str().to_string())
            .collect()
    };
    let chat = applied("/v1/chat");
    assert_eq!(names(&chat), ["1000/s", "tokens", "tokens-h"]);
    assert_eq!(names(&p.cacheable(&chat)), ["1000/s"]);
    let plain = applied("/plain");
    assert_eq!(p.cacheable(&plain), plain);
}

#[test]
fn a_local_store_settles_a_token_budget_exactly() {
    // 1,000 tokens a day, 300-token responses: settled, the fourth request
    // would pass the budget and is denied, whatever was estimated.
    let p = policy(BUDGET);
    let table = p.slot_table().unwrap();
    let now = 20_000 * 86_400 * S;
    let clock = Clock::local(now, Some(now));
    for estimate in ["300", "500", "100"] {
        let mut store = MemStore::default();
        let mut admitted = 0;
        let mut used = 0;
        for _ in 0..6 {
            let headers = Headers::of(&[
                (":path", b"/v1/chat"),
                ("x-api-key", b"k"),
                ("x-estimate", estimate.as_bytes()),
            ]);
            let Start::Decide { hash, applied, .. } = start(&p, &headers.map()) else {
                panic!()
            };
            let limits = p.limits(&applied);
            let outcome = table
                .decide(&mut store, hash, limits.as_slice(), clock)
                .unwrap();
            let crate::slots::Outcome::Decided { decision, .. } = outcome else {
                panic!("{outcome:?}")
            };
            if !decision.allowed {
                continue;
            }
            admitted += 1;
            used += 300;
            for r in reserved(&p, &applied) {
                let outcome = Outcome::of(r.estimate, Observed::Value(300));
                if let Some(adjust) = outcome.adjust() {
                    table
                        .rewrite(
                            &mut store,
                            hash,
                            r.limits(&p).as_slice(),
                            clock,
                            |l, v, c| apply(adjust, l, v, c),
                        )
                        .unwrap();
                }
            }
        }
        // A reservation of 500 on 600 settled does not fit: 2 admitted.
        // Of 100, the fourth fits at 900 + 100 and settles to 1,200: debt.
        let want = match estimate {
            "300" => 3,
            "500" => 2,
            _ => 4,
        };
        assert_eq!(admitted, want, "estimate {estimate}");
        assert_eq!(used, 300 * want);
    }
}

#[test]
fn a_json_body_is_read_at_its_end_and_bounded() {
    let path: Vec<String> = vec!["usage".into(), "total_tokens".into()];
    let mut scan = BodyScan::new(Some(b"application/json"), 1024);
    scan.feed(br#"{"id": "x", "usage": {"prompt": 10, "#, &path);
    scan.feed(br#""total_tokens": 300}}"#, &path);
    assert_eq!(scan.finish(&path), Observed::Value(300));
    let read = |body: &[u8], max: usize| {
        let mut scan = BodyScan::new(None, max);
        scan.feed(body, &path);
        scan.finish(&path)
    };
    assert_eq!(read(br#"{"usage": {}}"#, 1024), Observed::Missing);
    assert_eq!(read(b"<html>502</html>", 1024), Observed::Missing);
    assert_eq!(
        read(br#"{"usage": {"total_tokens": -3}}"#, 1024),
        Observed::Malformed
    );
    assert_eq!(
        read(br#"{"usage": {"total_tokens": 2.5}}"#, 1024),
        Observed::Malformed
    );
    assert_eq!(
        read(br#"{"usage": {"total_tokens": null}}"#, 1024),
        Observed::Malformed
    );
    assert_eq!(
        read(br#"{"usage": {"total_tokens": 300}}"#, 10),
        Observed::Malformed
    );
    assert_eq!(read(b"", 1024), Observed::Missing);
}

#[test]
fn an_event_stream_is_read_by_line_and_its_last_usage_wins() {
    let path: Vec<String> = vec!["usage".into(), "total_tokens".into()];
    let stream = concat!(
        "data: {\"delta\": \"he\"}\n\n",
        "data: {\"usage\": {\"total_tokens\": 12}}\n\n",
        "event: x\r\ndata: {\"delta\": \"llo\", \"total_tokens\": 1}\r\n\r\n",
        "data: {\"usage\": {\"total_tokens\": 42}}\n\n",
        "data: [DONE]\n\n"
    );
    // Split at every byte boundary: the answer never depends on chunking.
    for cut in 0..stream.len() {
        let mut scan = BodyScan::new(Some(b"text/event-stream; charset=utf-8"), 256);
        let (a, b) = stream.as_bytes().split_at(cut);
        scan.feed(a, &path);
        scan.feed(b, &path);
        assert_eq!(scan.finish(&path), Observed::Value(42), "cut at {cut}");
    }
    // A line past the bound is skipped, not misread; the stream goes on.
    let mut scan = BodyScan::new(Some(b"text/event-stream"), 64);
    let long = format!(
        "data: {{\"usage\": {{\"total_tokens\": 7}}, \"pad\": \"{}\"}}\n",
        "x".repeat(100)
    );
    scan.feed(long.as_bytes(), &path);
    assert_eq!(
        BodyScan::new(Some(b"text/event-stream"), 64).finish(&path),
        Observed::Missing
    );
    scan.feed(b"data: {\"usage\": {\"total_tokens\": 9}}", &path);
    assert_eq!(scan.finish(&path), Observed::Value(9));
    // The last event without a final newline still counts; none at all is missing.
    let mut none = BodyScan::new(Some(b"text/event-stream"), 64);
    none.feed(b"data: {\"delta\": 1}\n\n", &path);
    assert_eq!(none.finish(&path), Observed::Missing);
}

#[test]
fn a_settle_call_names_each_entry_and_its_answer_is_checked() {
    let entries = [
        redis::Entry {
            redis_key: "rl:a".into(),
            adjust: Adjust::Refund(4),
            limits: [limit(3, 60, 3)].into_iter().collect(),
        },
        redis::Entry {
            redis_key: "rl:b".into(),
            adjust: Adjust::Charge(2),
            limits: [limit(3, 60, 3)].into_iter().collect(),
        },
    ];
    assert_eq!(
        redis::path(9, &entries),
        "/FCALL/apikey_ratelimit_settle/2/rl%3Aa/rl%3Ab/9/0/4/1/3%2F60s/20000000/60000000/1/2/1/3%2F60s/20000000/60000000"
    );
    assert!(redis::check(Some(200), br#"{"FCALL":[9,1000]}"#, 9).is_ok());
    assert!(redis::check(Some(200), br#"{"FCALL":[8,1000]}"#, 9).is_err());
    assert!(redis::check(Some(503), b"", 9).is_err());
    assert!(crate::webdis::LIBRARY.contains(&format!(
        "redis.register_function('{}', settle)",
        redis::FUNCTION
    )));
}

#[test]
fn settlements_go_in_calls_bounded_by_keys_and_path_bytes() {
    let entry = |k: usize| redis::Entry {
        redis_key: format!("apikey_ratelimit:api:{k:064}"),
        adjust: Adjust::Charge(1),
        limits: [limit(3, 60, 3)].into_iter().collect(),
    };
    let gather = |max_keys, max_bytes| {
        let mut call = redis::Gather::new(max_keys, max_bytes);
        let mut taken = 0;
        while taken < 10 {
            let next = entry(taken);
            if !call.fits(&next.redis_key, next.limits.as_slice()) {
                break;
            }
            call.push(next);
            taken += 1;
        }
        (taken, redis::path(1, call.entries()).len())
    };
    assert_eq!(gather(4, 100_000).0, 4);
    assert_eq!(gather(64, 100_000).0, 10);
    let (small, bytes) = gather(64, 900);
    assert!(small > 1 && small < 10, "{small}");
    assert!(bytes <= 900, "{bytes}");
    // One entry always goes, however small the bound.
    assert_eq!(gather(64, 1).0, 1);
}

#[test]
fn a_calls_refunds_of_one_key_merge_into_one_entry_that_leaves_the_same_state() {
    let l = limit(10, 10, 10);
    let limits: crate::per_limit::PerLimit<_> = [l].into_iter().collect();
    let mut call = redis::Gather::new(64, 100_000);
    let entry = |key: &str, adjust| redis::Entry {
        redis_key: key.into(),
        adjust,
        limits,
    };
    call.push(entry("a", Adjust::Refund(2)));
    assert!(call.merge("a", Adjust::Refund(3), limits.as_slice()));
    assert!(!call.merge("a", Adjust::Charge(1), limits.as_slice()));
    call.push(entry("a", Adjust::Charge(1)));
    assert!(call.merge("a", Adjust::Charge(4), limits.as_slice()));
    assert!(!call.merge("b", Adjust::Refund(1), limits.as_slice()));
    let other: crate::per_limit::PerLimit<_> = [limit(3, 60, 3)].into_iter().collect();
    assert!(!call.merge("a", Adjust::Refund(1), other.as_slice()));
    let adjusts: Vec<_> = call.entries().iter().map(|e| e.adjust).collect();
    assert_eq!(adjusts, [Adjust::Refund(5), Adjust::Charge(5)]);
    // Merged or one at a time, the same state, caps and floors included.
    let now = 1_000 * S;
    let q = quota_limit("tokens", 1000, PeriodKind::Day, 0);
    for (limit, value) in [(l, now + 6 * S), (l, now + 2 * S), (q, 0), (l, 0)] {
        let clock = Clock::wall(now);
        let start = apply(Adjust::Charge(300), &limit, value, clock);
        for (a, b) in [(2, 3), (200, 900), (0, 7)] {
            let one_by_one = apply(
                Adjust::Refund(b),
                &limit,
                apply(Adjust::Refund(a), &limit, start, clock),
                clock,
            );
            assert_eq!(
                one_by_one,
                apply(Adjust::Refund(a + b), &limit, start, clock)
            );
            let charged = apply(
                Adjust::Charge(b),
                &limit,
                apply(Adjust::Charge(a), &limit, start, clock),
                clock,
            );
            assert_eq!(charged, apply(Adjust::Charge(a + b), &limit, start, clock));
        }
    }
}
