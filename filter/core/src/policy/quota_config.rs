//! Calendar quotas in the configuration (issue 13): how they are written,
//! what the load refuses (naming the field), the warning for DRF's
//! `"1000/month"`, and a quota and rates decided and reported together
//! through the pipeline.

use crate::calendar::{days_from_civil, Period, PeriodKind, Weekday};
use crate::gcra::Limit;
use crate::pipeline::{finish, start, write_response_headers, Action, Start};
use crate::policy::Policy;
use crate::testing::{policy, Headers, MemStore, S};

fn refusal(json: &str) -> (String, String) {
    match Policy::from_json(json.as_bytes()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => (e.field, e.message),
    }
}

fn limits(json: &str) -> Vec<Limit> {
    policy(json).instances
}

#[test]
fn a_quota_is_written_with_its_calendar_and_used_wherever_limits_are() {
    let p = policy(
        r#"{"limits": [{"quota": "10000/month", "reset": "calendar", "utc_offset": "+02:00", "name": "monthly"}],
            "plans": {"team": [{"quota": "500/week", "reset": "calendar", "week_starts": "sunday"}, "10/s"]},
            "rules": [{"name": "llm", "match": {"path_prefix": "/v1"},
                       "limits": [{"quota": "100/day", "reset": "calendar", "utc_offset": "-05:30"}]}],
            "overrides": [{"key": "vip", "limits": [{"quota": "1/day", "reset": "calendar"}]}]}"#,
    );
    let quotas: Vec<(&str, u64, Period)> = p
        .instances
        .iter()
        .filter_map(|l| l.period.map(|period| (l.name.as_str(), l.burst, period)))
        .collect();
    let period = |kind, offset_minutes, week_start| Period {
        kind,
        offset_minutes,
        week_start: Weekday(week_start),
    };
    assert_eq!(
        quotas,
        [
            ("monthly", 10_000, period(PeriodKind::Month, 120, 0)),
            ("500/week", 500, period(PeriodKind::Week, 0, 6)),
            ("llm:100/day", 100, period(PeriodKind::Day, -330, 0)),
            ("1/day", 1, period(PeriodKind::Day, 0, 0)),
        ]
    );
    assert!(p.has_quotas());
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert!(!policy(r#"{"limits": ["1/s"]}"#).has_quotas());
    // A rate and a quota of one name are two limits, never one state.
    let both = limits(
        r#"{"limits": ["1/s"], "overrides": [{"key": "a", "limits": [{"rate": "3/d", "name": "x"}]},
            {"key": "b", "limits": [{"quota": "3/day", "reset": "calendar", "name": "x"}]}]}"#,
    );
    assert_ne!(both[1].id, both[2].id);
}

#[test]
fn malformed_quotas_are_refused_naming_the_field() {
    let one = |object: &str| format!(r#"{{"limits": [{object}]}}"#);
    let cases = [
        (
            r#"{"quota": "10/day"}"#,
            "limits[0]",
            "\"reset\": \"calendar\"",
        ),
        (
            r#"{"quota": "10/day", "reset": "rolling"}"#,
            "limits[0].reset",
            "unknown variant",
        ),
        (
            r#"{"quota": "10/year", "reset": "calendar"}"#,
            "limits[0].quota",
            "N/day, N/week or N/month",
        ),
        (
            r#"{"quota": "0/day", "reset": "calendar"}"#,
            "limits[0].quota",
            "from 1 to 1000000000",
        ),
        (
            r#"{"quota": "1000000001/day", "reset": "calendar"}"#,
            "limits[0].quota",
            "invalid quota",
        ),
        (
            r#"{"quota": "10/days", "reset": "calendar"}"#,
            "limits[0].quota",
            "invalid quota",
        ),
        (
            r#"{"quota": "10/2day", "reset": "calendar"}"#,
            "limits[0].quota",
            "invalid quota",
        ),
        (
            r#"{"quota": "10/day", "reset": "calendar", "utc_offset": "+15:00"}"#,
            "limits[0].utc_offset",
            "-14:00 to +14:00",
        ),
        (
            r#"{"quota": "10/day", "reset": "calendar", "utc_offset": "UTC"}"#,
            "limits[0].utc_offset",
            "+HH:MM",
        ),
        (
            r#"{"quota": "10/week", "reset": "calendar", "week_starts": "funday"}"#,
            "limits[0].week_starts",
            "monday",
        ),
        (
            r#"{"quota": "10/month", "reset": "calendar", "week_starts": "monday"}"#,
            "limits[0]",
            "weekly",
        ),
        (
            r#"{"quota": "10/day", "reset": "calendar", "burst": 5}"#,
            "limits[0]",
            "no \"burst\"",
        ),
        (
            r#"{"quota": "10/day", "rate": "10/d", "reset": "calendar"}"#,
            "limits[0]",
            "exactly one",
        ),
        (
            r#"{"rate": "10/d", "reset": "calendar"}"#,
            "limits[0]",
            "not to a rate",
        ),
        (
            r#"{"rate": "10/d", "utc_offset": "+01:00"}"#,
            "limits[0]",
            "not to a rate",
        ),
        (r#"{"name": "x"}"#, "limits[0]", "exactly one"),
        (
            r#"{"quota": "10/day", "reset": "calendar", "period": "day"}"#,
            "limits[0].period",
            "unknown field",
        ),
    ];
    for (object, field, message) in cases {
        let (at, why) = refusal(&one(object));
        assert_eq!(at, field, "{object}: {why}");
        assert!(why.contains(message), "{object}: {why}");
    }
    // A fixed cost a quota can never hold is refused at load, as for a rate.
    let (at, why) = refusal(
        r#"{"limits": ["1/s"], "rules": [{"name": "big", "match": {"path": "/big"}, "cost": 5,
            "limits": [{"quota": "3/day", "reset": "calendar"}]}]}"#,
    );
    assert_eq!(at, "rules[0].cost");
    assert!(why.contains("a quota of 3"), "{why}");
    // A cost from a header above the quota is a 400 saying so.
    let p = policy(
        r#"{"limits": ["1/s"], "rules": [{"name": "llm", "match": {"path": "/v1"},
            "cost": {"header": "x-cost", "default": 1, "max": 50},
            "limits": [{"quota": "20/day", "reset": "calendar", "name": "tokens"}]}]}"#,
    );
    let headers = Headers::of(&[(":path", b"/v1"), ("x-api-key", b"k"), ("x-cost", b"21")]);
    match start(&p, &headers.map()) {
        Start::Done(Action::Respond(reply), _) => {
            assert_eq!(reply.status, 400);
            assert_eq!(
                reply.body,
                r#"{"detail":"Request cost 21 can never be admitted: quota tokens is 20 per day."}"#
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_drf_month_rate_is_kept_per_minute_with_a_warning_pointing_to_the_quota() {
    let p = policy(
        r#"{"limits": ["1000/month", {"rate": "5/mo", "name": "m"}, "10/min"],
            "rules": [{"name": "r", "match": {"path": "/r"}, "limits": ["7/months"]}]}"#,
    );
    let per_minute: Vec<u64> = p.instances.iter().map(|l| l.rate.window_seconds).collect();
    assert_eq!(per_minute, [60, 60, 60, 60]);
    assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
    assert_eq!(
        p.warnings[0],
        r#"limits[0]: "1000/month" is 1000 per minute, as in DRF (only the first letter of the period counts); for 1000 per calendar month write {"quota": "1000/month", "reset": "calendar"}"#
    );
    assert!(p.warnings[1].starts_with("limits[1]: \"5/mo\""));
    assert!(p.warnings[2].starts_with("rules[0].limits[0]: \"7/months\""));
}

/// One request of key `k` through the pipeline and a local store at
/// `now` (the wall clock); its status and quota headers.
fn send(p: &Policy, store: &mut MemStore, path: &str, now: u64) -> (u32, String, String) {
    let headers = Headers::of(&[(":path", path.as_bytes()), ("x-api-key", b"k")]);
    let Start::Decide {
        hash,
        applied,
        events,
        ..
    } = start(p, &headers.map())
    else {
        panic!("not decided");
    };
    let limits = p.limits(&applied);
    let outcome = p
        .slot_table()
        .unwrap()
        .decide(store, hash, limits.as_slice(), now)
        .map_err(|()| crate::pipeline::StoreFailure::Host);
    let header = |all: &[(&str, String)], name: &str| {
        all.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    match finish(p, &applied, events, outcome).0 {
        Action::Continue(Some(quota)) => {
            let mut all = Vec::new();
            write_response_headers(p, &quota, &mut String::new(), |n, v| {
                all.push((n, v.to_string()))
            });
            (
                200,
                header(&all, "ratelimit-policy"),
                header(&all, "ratelimit"),
            )
        }
        Action::Respond(reply) => {
            assert_eq!(
                header(&reply.headers, "retry-after"),
                header(&reply.headers, "ratelimit")
                    .rsplit("t=")
                    .next()
                    .unwrap_or_default(),
                "{reply:?}"
            );
            (
                reply.status,
                header(&reply.headers, "ratelimit-policy"),
                header(&reply.headers, "ratelimit"),
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_monthly_quota_and_a_rate_are_decided_together_and_reported_with_the_periods_length() {
    let p = policy(
        r#"{"limits": ["100/hour", {"quota": "2/month", "reset": "calendar", "name": "monthly"}]}"#,
    );
    let mut store = MemStore::default();
    // 2100-02-27 12:00 UTC: February 2100 has 28 days; March begins in 36 h.
    let day = i64::try_from(86_400 * S).unwrap();
    let now = u64::try_from(days_from_civil(2100, 2, 27) * day).unwrap() + 12 * 3600 * S;
    let policy_header = r#""100/hour";q=100;w=3600, "monthly";q=2;w=2419200"#;
    let reset = 36 * 3600;
    assert_eq!(
        send(&p, &mut store, "/", now),
        (
            200,
            policy_header.to_string(),
            format!(r#""100/hour";r=99;t=36, "monthly";r=1;t={reset}"#)
        )
    );
    assert_eq!(send(&p, &mut store, "/", now).0, 200);
    // The third is denied by the quota until March; the hourly rate keeps
    // what the denial did not take, and Retry-After is the quota's `t`.
    assert_eq!(
        send(&p, &mut store, "/", now + S),
        (
            429,
            policy_header.to_string(),
            format!(r#""100/hour";r=98;t=71, "monthly";r=0;t={}"#, reset - 1)
        )
    );
    let march = now + reset * S;
    let (status, policy_header, state) = send(&p, &mut store, "/", march);
    assert_eq!(status, 200);
    // March: 31 days.
    assert!(
        policy_header.ends_with(r#""monthly";q=2;w=2678400"#),
        "{policy_header}"
    );
    assert!(
        state.ends_with(&format!(r#""monthly";r=1;t={}"#, 31 * 86_400)),
        "{state}"
    );
}
