//! Cost settled from the response (issue 13): a rule reserves an estimate
//! when the request arrives, and the upstream's usage (a header, a trailer,
//! a JSON field, the last event of a stream) settles the difference. The
//! upstream's `/metered` endpoint reports what it is told to.
//!
//! A key has 1,000 tokens a day. With 300-token answers and an estimate of
//! 300, concurrent clients get exactly 3 in, on 6 workers of one Envoy and
//! on 3 replicas sharing Redis. Estimates above and below the real cost are
//! refunded and charged exactly, and a response that never says (an
//! aborted client, no value, a malformed one) keeps its reservation.

use std::thread;
use std::time::{Duration, Instant};

use e2e::http::{Conn, Response};
use e2e::topology::{GlobalEnvoy, Mode, OneEnvoy, Replicas};

const INTROSPECTION: &[u8] = b"/.well-known/ratelimit";

fn config(source: &str, store: &str) -> String {
    format!(
        r#"{{"limits": ["1000/s"],
            "rules": [{{"name": "chat", "match": {{"path_prefix": "/metered"}},
              "limits": [{{"quota": "1000/day", "reset": "calendar", "name": "tokens"}}],
              "cost": {{"header": "x-estimate-tokens", "default": 300, "max": 1000}},
              "settle": {source}}}],
            "introspection": {{"path": "/.well-known/ratelimit"}}{store}}}"#
    )
}

const HEADER: &str = r#"{"header": "x-usage-tokens"}"#;

/// One request on a fresh connection.
fn send(addr: &str, key: &str, target: &str, estimate: Option<u64>) -> Response {
    let estimate = estimate.map(|e| e.to_string());
    let mut headers: Vec<(&str, &[u8])> =
        vec![("Connection", b"close"), ("x-api-key", key.as_bytes())];
    if let Some(e) = &estimate {
        headers.push(("x-estimate-tokens", e.as_bytes()));
    }
    Conn::connect(addr)
        .unwrap()
        .request("GET", target.as_bytes(), &headers)
        .unwrap()
}

/// Tokens left for `key`, as the filter's introspection path says.
fn tokens_left(addr: &str, key: &str) -> u64 {
    let r = Conn::connect(addr)
        .unwrap()
        .request(
            "GET",
            INTROSPECTION,
            &[("Connection", b"close"), ("x-api-key", key.as_bytes())],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.ratelimit_remaining("tokens")
}

/// Waits (at most 5 s) until `key` has `want` tokens left: global mode
/// settles after the response, from the root context. Returns what it saw.
fn settles_to(addr: &str, key: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = tokens_left(addr, key);
        if left == want || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `n` concurrent requests of `key` estimated at `estimate`, each answered
/// 300: how many were admitted (the others must be 429s).
fn wave(addr: &str, key: &str, n: usize, estimate: u64) -> usize {
    let statuses: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| s.spawn(|| send(addr, key, "/metered?tokens=300", Some(estimate)).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    statuses.iter().filter(|s| **s == 200).count()
}

/// 30 concurrent requests of one key, each estimated and reported at 300:
/// exactly 3 admitted (1,000 / 300). Then another key in waves of 30
/// estimated at 400, each wave's refunds settled before the next: 2
/// reservations fit at once (800), refunds (in the same wave, or before
/// the next) make room for a third (600 + 400), never a fourth (900 +
/// 400): exactly the 3 that the settled total allows, where lost refunds
/// would admit 2.
fn concurrent_budget_admits_exactly_three(addr: &str, key: &str) {
    assert_eq!(wave(addr, key, 30, 300), 3);
    assert_eq!(settles_to(addr, key, 100), 100);
    let waves = format!("{key}-waves");
    let mut admitted = 0;
    for round in 0..4 {
        admitted += wave(addr, &waves, 30, 400);
        let left = 1000 - 300 * admitted as u64;
        assert_eq!(settles_to(addr, &waves, left), left, "round {round}");
    }
    assert_eq!(admitted, 3);
}

/// One key, one request at a time: each estimate reserved, then settled to
/// the 300 reported. Returns nothing; asserts each step's tokens left.
fn estimates_are_refunded_and_charged(addr: &str, key: &str) {
    // (estimate, status, tokens left once settled)
    let steps = [
        (500, 200, 700), // 500 reserved, 200 refunded
        (500, 200, 400), // 300 + 500 fits
        (500, 429, 400), // 600 + 500 does not: denied, nothing spent
        (400, 200, 100), // 600 + 400 fits exactly
        (100, 200, 0),   // 900 + 100 fits, settles to 1,200: 200 of debt
        (1, 429, 0),     // spent until tomorrow
    ];
    for (i, (estimate, status, left)) in steps.into_iter().enumerate() {
        let r = send(addr, key, "/metered?tokens=300", Some(estimate));
        assert_eq!(r.status, status, "step {i}: {r:?}");
        if status == 429 {
            assert!(r.body_str().contains("\"limit\":\"tokens\""), "{r:?}");
        }
        assert_eq!(settles_to(addr, key, left), left, "step {i}");
    }
}

/// The same, with the usage in a JSON body and in the last event of a
/// stream; a refund of everything (0 reported) too.
fn body_sources_settle(addr: &str, key: &str) {
    let r = send(addr, key, "/metered?tokens=120&via=json", Some(300));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(settles_to(addr, key, 880), 880);
    let r = send(addr, key, "/metered?tokens=80&via=sse", Some(300));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body_str().contains("[DONE]"), "{r:?}");
    assert_eq!(settles_to(addr, key, 800), 800);
    let r = send(addr, key, "/metered?tokens=0&via=json", Some(300));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(settles_to(addr, key, 800), 800);
}

/// No value (none sent, a malformed one, an error without it, a client that
/// left before the response): each keeps its 300.
fn no_value_keeps_the_reservation(addr: &str, key: &str, metric: impl Fn(&str) -> u64) {
    let r = send(addr, key, "/metered", None);
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(addr, key, "/metered?tokens=abc", None);
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(addr, key, "/metered?status=502", None);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(tokens_left(addr, key), 100);
    // A client that hangs up while the upstream takes its time.
    let mut conn = Conn::connect(addr).unwrap();
    conn.write_raw(
        format!(
            "GET /metered?tokens=0&delay_ms=1500 HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\nx-estimate-tokens: 100\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    conn.stream().shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric("settle_aborted") < 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric("settle_aborted"), 1);
    assert_eq!(metric("settle_missing"), 2);
    assert_eq!(metric("settle_malformed"), 1);
    assert_eq!(tokens_left(addr, key), 0);
}

fn metric_eventually(read: impl Fn() -> u64, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = read();
        if got == want || Instant::now() > deadline {
            return got;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_token_budget_is_settled_exactly_across_six_workers() {
    let envoy = OneEnvoy::local(&config(HEADER, ""), 6);
    let addr = envoy.addr();
    concurrent_budget_admits_exactly_three(&addr, "concurrent");
    estimates_are_refunded_and_charged(&addr, "sequential");
    no_value_keeps_the_reservation(&addr, "unreported", |m| envoy.metric(m));
    assert_eq!(metric_eventually(|| envoy.metric("settle_exact"), 3), 3);
    assert_eq!(envoy.metric("settle_refunded"), 3 + 3);
    assert_eq!(envoy.metric("settle_charged"), 1);
    assert_eq!(envoy.metric("settle_failed"), 0);
}

#[test]
fn json_bodies_and_event_streams_settle_in_local_mode() {
    let source = r#"{"json": "usage.total_tokens", "max_body_bytes": 4096}"#;
    let envoy = OneEnvoy::local(&config(source, ""), 2);
    body_sources_settle(&envoy.addr(), "body");
    assert_eq!(envoy.metric("settle_refunded"), 3);
}

#[test]
fn a_token_budget_is_settled_exactly_across_three_replicas() {
    let store = r#", "store": {"webdis": {"cluster": "webdis", "timeout_ms": 1000}}"#;
    let replicas = Replicas::start(Mode::Global, 3, 2, Some(&config(HEADER, store)));
    let addr = replicas.addr();
    concurrent_budget_admits_exactly_three(&addr, "concurrent");
    estimates_are_refunded_and_charged(&addr, "sequential");
    no_value_keeps_the_reservation(&addr, "unreported", |m| replicas.metric(m));
    assert_eq!(metric_eventually(|| replicas.metric("settle_exact"), 3), 3);
    assert_eq!(replicas.metric("settle_refunded"), 3 + 3);
    assert_eq!(replicas.metric("settle_charged"), 1);
    assert_eq!(replicas.metric("settle_failed"), 0);
    assert!(replicas.metric("settle_calls") >= 1);
}

/// Each response is read whole and its connection closed before the
/// settlement is looked for: the request's context is gone by then, and
/// the root context's call still lands.
#[test]
fn json_bodies_and_event_streams_settle_in_global_mode_after_the_request_is_gone() {
    let store = r#", "store": {"webdis": {"cluster": "webdis", "timeout_ms": 1000}}"#;
    let source = r#"{"json": "usage.total_tokens"}"#;
    let envoy = GlobalEnvoy::start(Some(&config(source, store)), 2);
    body_sources_settle(&envoy.addr(), "body");
    assert_eq!(envoy.metric("settle_refunded"), 3);
    assert!(envoy.metric("settle_calls") >= 3);
    assert_eq!(envoy.metric("settle_failed"), 0);
}

/// A trailer is read when the upstream sends one (hyper, over HTTP/1.1,
/// only to a client that sent `TE: trailers`); a response that ends
/// without it keeps the reservation.
#[test]
fn a_trailer_settles_and_a_response_without_it_keeps_the_reservation() {
    let envoy = OneEnvoy::local(&config(r#"{"trailer": "x-usage-tokens"}"#, ""), 2);
    let addr = envoy.addr();
    let r = Conn::connect(&addr)
        .unwrap()
        .request(
            "GET",
            b"/metered?tokens=50&via=trailer",
            &[
                ("Connection", b"close"),
                ("TE", b"trailers"),
                ("x-api-key", b"trailer"),
            ],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.trailer("x-usage-tokens"), Some("50"), "{r:?}");
    assert_eq!(tokens_left(&addr, "trailer"), 950);
    let r = send(&addr, "trailer", "/metered?tokens=50&via=trailer", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.trailer("x-usage-tokens"), None, "{r:?}");
    assert_eq!(tokens_left(&addr, "trailer"), 650);
    assert_eq!(envoy.metric("settle_refunded"), 1);
    assert_eq!(envoy.metric("settle_missing"), 1);
}

/// A refund on one replica is seen by another at once. Replica B learns
/// that the key is spent (its request is denied while A's request holds the
/// whole budget), then A's response refunds most of it: B admits the next
/// request. B's deny cache never decides on a settled rule's limits, which a
/// refund lowers (its cached denial would otherwise hold until midnight).
#[test]
fn a_refund_on_one_replica_is_seen_by_another_at_once() {
    let store = r#", "store": {"webdis": {"cluster": "webdis", "timeout_ms": 1000}}"#;
    let replicas = Replicas::start(Mode::Global, 2, 1, Some(&config(HEADER, store)));
    let (a, b) = (replicas.replicas[0].addr(), replicas.replicas[1].addr());
    let slow = thread::scope(|s| {
        let slow = s.spawn(|| send(&a, "k", "/metered?tokens=100&delay_ms=1500", Some(1000)));
        thread::sleep(Duration::from_millis(500));
        for _ in 0..3 {
            let r = send(&b, "k", "/metered?tokens=100", Some(100));
            assert_eq!(r.status, 429, "the budget is reserved on A: {r:?}");
        }
        slow.join().unwrap()
    });
    assert_eq!(slow.status, 200, "{slow:?}");
    assert_eq!(settles_to(&a, "k", 900), 900);
    let r = send(&b, "k", "/metered?tokens=100", Some(100));
    assert_eq!(r.status, 200, "B still denies after A's refund: {r:?}");
    assert_eq!(tokens_left(&b, "k"), 800);
}

/// Settlements whose call fails are counted one by one, merged or not:
/// three refunds of one key reach the root together (often one entry of
/// one call) while webdis is gone, and `settle_failed` says 3.
#[test]
fn settlements_lost_with_webdis_are_each_counted() {
    let store = r#", "store": {"webdis": {"cluster": "webdis", "timeout_ms": 1000}}"#;
    let envoy = GlobalEnvoy::start(Some(&config(HEADER, store)), 1);
    let addr = envoy.addr();
    let statuses: Vec<u16> = thread::scope(|s| {
        let slow: Vec<_> = (0..3)
            .map(|_| s.spawn(|| send(&addr, "k", "/metered?tokens=100&delay_ms=1000", None).status))
            .collect();
        thread::sleep(Duration::from_millis(400));
        envoy.backend.webdis.proc().kill();
        slow.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, [200, 200, 200]);
    assert_eq!(metric_eventually(|| envoy.metric("settle_failed"), 3), 3);
    assert_eq!(envoy.metric("settle_refunded"), 3);
}
