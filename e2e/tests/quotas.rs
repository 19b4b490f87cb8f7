//! Calendar quotas (issue 13) through the real Envoy, in local mode (two
//! workers, the wall clock placing the day) and in global mode (Redis's
//! clock, the deny cache): a key spends a daily quota of 3 next to an
//! hourly rate, and the 429 says when the quota is whole again.
//!
//! The quota's `utc_offset` puts its local midnight about 12 hours away,
//! so nothing resets while a test runs. The reset time is known to the
//! second from the test's own clock (the same machine's): every `t` and
//! `Retry-After` must lie between the seconds to midnight before and after
//! the request, rounded up as the filter rounds.

use std::time::{SystemTime, UNIX_EPOCH};

use e2e::http::{Conn, Response};
use e2e::topology::{GlobalEnvoy, OneEnvoy};

const DAY: u64 = 86_400;

/// Now, Unix nanoseconds, from the test's own wall clock.
fn wall_nanos() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_nanos()).unwrap()
}

/// A UTC offset (minutes) whose local time is about noon now, and the Unix
/// second of its next local midnight.
fn offset_at_noon() -> (i64, u64) {
    let now = wall_nanos() / 1_000_000_000;
    let minute_of_day = i64::try_from(now % DAY / 60).unwrap();
    let mut offset = (720 - minute_of_day).rem_euclid(1440);
    if offset > 720 {
        offset -= 1440;
    }
    let local = i64::try_from(now).unwrap() + offset * 60;
    let midnight = (local.div_euclid(86_400) + 1) * 86_400 - offset * 60;
    (offset, u64::try_from(midnight).unwrap())
}

fn utc_offset(minutes: i64) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    format!("{sign}{:02}:{:02}", minutes.abs() / 60, minutes.abs() % 60)
}

fn config(offset: i64, store: &str) -> String {
    format!(
        r#"{{"limits": ["100/hour", {{"quota": "3/day", "reset": "calendar", "utc_offset": "{}", "name": "daily"}}]{store}}}"#,
        utc_offset(offset)
    )
}

/// One request of `key` on a fresh connection.
fn get(addr: &str, key: &str) -> Response {
    Conn::connect(addr)
        .unwrap()
        .request(
            "GET",
            b"/",
            &[("x-api-key", key.as_bytes()), ("Connection", b"close")],
        )
        .unwrap()
}

/// [`get`], and the seconds to the quota's `midnight` after and before it
/// (rounded up, as the filter does).
fn send(addr: &str, key: &str, midnight: u64) -> (Response, u64, u64) {
    let to_midnight = || (midnight * 1_000_000_000 - wall_nanos()).div_ceil(1_000_000_000);
    let most = to_midnight();
    let r = get(addr, key);
    (r, to_midnight(), most)
}

/// `name`'s `r` and `t` in the `RateLimit` header.
fn member(r: &Response, name: &str) -> (u64, u64) {
    let header = r.header("ratelimit").unwrap_or_else(|| panic!("{r:?}"));
    let member = header
        .split(", ")
        .find(|m| m.starts_with(&format!("\"{name}\";")))
        .unwrap_or_else(|| panic!("no {name} in {header}"));
    let param = |p: &str| -> u64 {
        member
            .split(';')
            .find_map(|kv| kv.strip_prefix(&format!("{p}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    (param("r"), param("t"))
}

const POLICY: &str = r#""100/hour";q=100;w=3600, "daily";q=3;w=86400"#;

/// Three requests admitted, counting the quota down; the fourth denied by
/// it until midnight, having consumed nothing of the hourly rate. A denial
/// from the deny cache (global mode) may say up to `late` seconds more: the
/// cache keeps the period's end rounded down to 2^30 ns and adds the call's
/// round trip, so that it is never early.
fn spend_the_quota(addr: &str, key: &str, midnight: u64, late: u64) {
    for left in [2, 1, 0] {
        let (r, least, most) = send(addr, key, midnight);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit-policy"), Some(POLICY), "{r:?}");
        let (remaining, t) = member(&r, "daily");
        assert_eq!(remaining, left, "{r:?}");
        assert!(
            (least..=most).contains(&t),
            "t={t}, midnight in {least}..={most} s"
        );
    }
    let (r, least, most) = send(addr, key, midnight);
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("ratelimit-policy"), Some(POLICY), "{r:?}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (least..=most + late).contains(&retry),
        "Retry-After {retry}, midnight in {least}..={most} s"
    );
    assert!(retry > 3600, "the boundary is hours away: {retry}");
    let (remaining, t) = member(&r, "daily");
    assert_eq!(remaining, 0, "{r:?}");
    assert!(t <= retry && (least..=most + late).contains(&t), "{r:?}");
    if late == 0 {
        assert_eq!(t, retry, "{r:?}");
    }
    assert_eq!(
        member(&r, "100/hour").0,
        97,
        "the 429 consumed nothing: {r:?}"
    );
    assert_eq!(
        r.body_str(),
        format!(
            r#"{{"detail":"Request was throttled. Expected available in {retry} seconds.","limit":"daily"}}"#
        )
    );
}

#[test]
fn a_spent_daily_quota_is_denied_until_local_midnight_in_local_mode() {
    let (offset, midnight) = offset_at_noon();
    let local = OneEnvoy::local(&config(offset, ""), 2);
    let addr = local.addr();
    spend_the_quota(&addr, "local-key", midnight, 0);
    // Another key has its own quota; the spent one stays spent.
    assert_eq!(send(&addr, "other-key", midnight).0.status, 200);
    assert_eq!(send(&addr, "local-key", midnight).0.status, 429);
    assert_eq!(local.metric_at_least("limit.daily.throttled", 2), 2);
    assert_eq!(local.metric_at_least("allowed", 4), 4);
}

#[test]
fn a_spent_daily_quota_is_denied_until_local_midnight_in_global_mode() {
    let (offset, midnight) = offset_at_noon();
    let store = r#", "store": {"webdis": {"timeout_ms": 5000}}"#;
    let global = GlobalEnvoy::start(Some(&config(offset, store)), 2);
    let addr = global.addr();
    // Redis's answer to the third request leaves nothing: the deny cache
    // learns it, and answers the fourth.
    spend_the_quota(&addr, "global-key", midnight, 2);
    // Redis holds the quota as its period's end plus the units used.
    let redis = &global.backend.redis;
    let keys: Vec<String> = redis.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let held = redis.cli(&["HGET", &keys[0], "quota#daily"]);
    assert_eq!(held.trim(), (midnight * 1_000_000 + 3).to_string());
    // The next denials come from the deny cache too, with no call to Redis.
    for _ in 0..2 {
        let (r, least, most) = send(&addr, "global-key", midnight);
        assert_eq!(r.status, 429, "{r:?}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(
            (least..=most + 2).contains(&retry),
            "Retry-After {retry}, midnight in {least}..={most} s"
        );
        assert!(r.body_str().contains(r#""limit":"daily""#), "{r:?}");
    }
    assert_eq!(global.metric_at_least("backend_cache_hits", 3), 3);
    assert_eq!(global.metric_at_least("backend_batched_requests", 3), 3);
    assert_eq!(global.metric("store_errors"), 0);
}

#[test]
fn a_drf_month_rate_loads_with_a_warning_pointing_to_the_quota_form() {
    let local = OneEnvoy::local(r#"{"limits": ["1000/month"]}"#, 1);
    let log = local.envoy.proc().log();
    assert!(
        log.contains(r#"limits[0]: "1000/month" is 1000 per minute, as in DRF"#)
            && log.contains(r#"{"quota": "1000/month", "reset": "calendar"}"#),
        "{log}"
    );
    let r = get(&local.addr(), "k");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some(r#""1000/month";q=1000;w=60"#)
    );
}
