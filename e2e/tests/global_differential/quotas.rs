//! Calendar quotas in a real Redis against the filter's Rust side.
//!
//! Redis's clock cannot be moved, so the boundaries come to it: every
//! scenario's daily and weekly quotas take the UTC offset (and the week's
//! first day) that puts a local midnight at the next whole UTC minute, a
//! few seconds after the test starts, and the random calls run until Redis
//! is past it. Other quotas take random offsets, kinds and week starts (a
//! monthly one ends at the end of *some* month), and each set charges its
//! limits random costs. The model is the one of `apikey_ratelimit_batch`:
//! `gcra::decide` per request at Redis's clock, and Redis must hold what
//! the model holds, quotas as `quota#<name>` = period end + units used.
//!
//! The month arithmetic itself (28 to 31 days, leap years, centuries) is
//! compared apart: this test's own Redis loads the shipped library with one
//! more function, which answers the library's own `period_end` for any
//! moment, against `calendar.rs` for every month end from 1970 to 2200.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::backend::{Redis, RedisWebdis};
use e2e::http;
use ratelimit_core::batch::replay::replay;
use ratelimit_core::batch::wire::{self, Entry};
use ratelimit_core::calendar::{days_from_civil, Period, PeriodKind, Weekday};
use ratelimit_core::gcra::{Decision, Limit};
use ratelimit_core::webdis;

use super::{batch_alike, enc, field, named, plan, redis_now, stored_alike, Model, Rng, US};

const MINUTE: u64 = 60 * 1_000_000_000;
const DAY_NS: u64 = 86_400 * 1_000_000_000;

fn quota(name: &str, count: u64, kind: PeriodKind, offset_minutes: i16, week_start: u8) -> Limit {
    let period = Period {
        kind,
        offset_minutes,
        week_start: Weekday(week_start),
    };
    Limit::quota(name, count, period).unwrap()
}

/// A local midnight at `boundary` (a whole UTC minute, ns): the offset
/// that puts one there, and the weekday (Monday 0) of the day it begins.
fn midnight_at(boundary: u64) -> (i16, u8) {
    let minute_of_day = (boundary / MINUTE) % 1440;
    let mut offset = i64::try_from((1440 - minute_of_day) % 1440).unwrap();
    if offset > 720 {
        offset -= 1440;
    }
    let local_day = (i64::try_from(boundary / 1_000_000_000).unwrap() + offset * 60) / 86_400;
    let weekday = u8::try_from((local_day + 3).rem_euclid(7)).unwrap();
    (i16::try_from(offset).unwrap(), weekday)
}

/// What a scenario exercised.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    batches: usize,
    admitted: usize,
    denied: usize,
    /// Requests denied by a quota (one per quota that denied).
    quota_denials: usize,
    /// A key's quota spent before the boundary, admitting again after it.
    resets: usize,
    /// Entries charging a limit more than 1.
    costly: usize,
}

/// Random calls on three keys until Redis's clock is `after` (ns).
fn scenario(webdis: &str, redis: &Redis, scenario: u64, boundary: u64, after: u64) -> Tally {
    let mut rng = Rng(0xA076_1D64_78BD_642F ^ ((scenario + 1) * 0x1000_0001));
    let (offset, weekday) = midnight_at(boundary);
    let count = |rng: &mut Rng| 1 + rng.below(5) as u64;
    let random_offset = |rng: &mut Rng| i16::try_from(rng.below(1681)).unwrap() - 840;
    let pool = [
        named(
            "fast",
            1 + rng.below(20) as u64,
            1,
            1 + rng.below(20) as u64,
        ),
        named("slow", 2, 3, 2),
        quota("daily", count(&mut rng), PeriodKind::Day, offset, 0),
        quota("weekly", count(&mut rng), PeriodKind::Week, offset, weekday),
        quota(
            "monthly",
            3 + count(&mut rng),
            PeriodKind::Month,
            random_offset(&mut rng),
            0,
        ),
        quota(
            "elsewhere",
            count(&mut rng),
            [PeriodKind::Day, PeriodKind::Week][rng.below(2)],
            random_offset(&mut rng),
            u8::try_from(rng.below(7)).unwrap(),
        ),
    ];
    let keys: Vec<String> = (0..3)
        .map(|k| format!("apikey_ratelimit:quotas-{scenario}-{k}"))
        .collect();
    let mut model = Model::default();
    let mut tally = Tally::default();
    let mut spent: BTreeSet<(String, String)> = BTreeSet::new();
    let mut step = 0;
    let mut now = 0;
    while now <= after {
        step += 1;
        // Three sets, each a subset of the pool at its own costs.
        let sets: Vec<Vec<Limit>> = (0..3)
            .map(|_| {
                let mask = rng.below(64);
                pool.iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, l)| l.costing(1 + rng.below(l.burst.min(3)) as u64))
                    .collect()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.below(300) as u64));
        let entries: Vec<Entry<'_>> = (0..1 + rng.below(4))
            .map(|_| {
                let set = rng.below(3);
                Entry {
                    redis_key: &keys[rng.below(3)],
                    applied: plan(set),
                    limits: &sets[set],
                    count: 1 + rng.below(5) as u32,
                }
            })
            .collect();
        let context = format!("quota scenario {scenario} step {step}");
        let reply = batch_alike(webdis, &mut model, &entries, &context);
        now = reply.now_us * US;
        tally.batches += 1;
        for (entry, answer) in entries.iter().zip(&reply.entries) {
            let count = usize::try_from(entry.count).unwrap();
            // The decisions `batch_alike` found equal to the model's.
            let decisions = replay(entry.limits, reply.now_us, answer, count).unwrap();
            let decisions = decisions.decisions;
            tally.admitted += decisions.iter().filter(|d| d.allowed).count();
            tally.denied += decisions.iter().filter(|d| !d.allowed).count();
            tally.costly += usize::from(entry.limits.iter().any(|l| l.cost > 1));
            for (i, limit) in entry.limits.iter().enumerate() {
                if limit.period.is_none() {
                    continue;
                }
                let spent_key = (entry.redis_key.to_string(), field(limit));
                let denied_by_it = |d: &&Decision| d.denied_by & (1 << i) != 0;
                let denials = decisions.iter().filter(denied_by_it).count();
                tally.quota_denials += denials;
                if now < boundary && denials > 0 {
                    spent.insert(spent_key);
                } else if now >= boundary
                    && decisions.iter().any(|d| d.allowed)
                    && spent.remove(&spent_key)
                {
                    tally.resets += 1;
                }
            }
        }
        let touched: BTreeSet<&str> = entries.iter().map(|e| e.redis_key).collect();
        for key in touched {
            stored_alike(redis, &model, key, now, &context);
        }
    }
    tally
}

#[test]
fn quotas_and_rates_decide_alike_in_redis_and_rust_across_a_calendar_boundary() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    // The next whole UTC minute at least 12 s away.
    let start = redis_now(redis);
    let boundary = (start + 12 * 1_000_000_000).div_ceil(MINUTE) * MINUTE;
    let after = boundary + 3 * 1_000_000_000;
    eprintln!(
        "boundary in {} s, local midnight at offset {:?}",
        (boundary - start) / 1_000_000_000,
        midnight_at(boundary)
    );
    let tallies: Vec<Tally> =
        super::in_parallel(6, |n| scenario(&webdis, redis, n, boundary, after));
    let mut total = Tally::default();
    for t in &tallies {
        total.batches += t.batches;
        total.admitted += t.admitted;
        total.denied += t.denied;
        total.quota_denials += t.quota_denials;
        total.resets += t.resets;
        total.costly += t.costly;
    }
    eprintln!("compared: {total:?}");
    for (what, n) in [
        ("admissions", total.admitted),
        ("denials", total.denied),
        ("a request denied by a quota", total.quota_denials),
        ("a spent quota whole again after it", total.resets),
        ("a cost above 1", total.costly),
    ] {
        assert!(n > 0, "no call with {what}: {total:?}");
    }
    // The one-request function of earlier filters refuses quotas.
    let code = wire::quota_code(
        3,
        &Period {
            kind: PeriodKind::Day,
            offset_minutes: 0,
            week_start: Weekday::MONDAY,
        },
    );
    let path = format!(
        "/FCALL/apikey_ratelimit_gcra/1/{}/1/q/-1/{code}",
        enc("apikey_ratelimit:gcra-quota")
    );
    let r = http::get(&webdis, &path).unwrap();
    let error = webdis::fcall_integers(Some(u32::from(r.status)), &r.body).unwrap_err();
    assert!(error.detail.contains("is a quota"), "{error:?}");
}

/// The shipped library and one more function over its own `period_end`:
/// `(code, now_us)` pairs in, period ends (µs) out.
fn calendar_library() -> String {
    webdis::LIBRARY.to_string()
        + r"
redis.register_function('calendar_period_end', function(keys, args)
  local out = {}
  for i = 1, #args, 2 do
    out[#out + 1] = period_end(tonumber(args[i + 1]), read_quota(1, tonumber(args[i])))
  end
  return out
end)
"
}

#[test]
fn the_functions_calendar_agrees_with_rusts_at_every_month_end_offset_and_week_start() {
    let redis = Redis::start();
    let loaded = redis.cli(&["FUNCTION", "LOAD", "REPLACE", &calendar_library()]);
    assert_eq!(loaded.trim(), "apikey_ratelimit");
    let mut cases: Vec<(Period, u64)> = Vec::new();
    let mut rng = Rng(0x5851_F42D_4C95_7F2D);
    let period = |kind, offset_minutes, week_start| Period {
        kind,
        offset_minutes,
        week_start: Weekday(week_start),
    };
    // Around every month's end from 1970 to 2200 (UTC, and local midnights
    // 14 hours either side), a microsecond before, at and after it.
    for year in 1970..2200 {
        for month in 1..=12u32 {
            let end = days_from_civil(year, month, 1) * 86_400_000_000_000;
            for offset in [-840i16, -330, 0, 60, 840] {
                let local_end = end - i64::from(offset) * 60_000_000_000;
                for delta in [-1_000i64, 0, 1_000] {
                    if let Ok(now) = u64::try_from(local_end + delta) {
                        cases.push((period(PeriodKind::Month, offset, 0), now));
                    }
                }
            }
        }
    }
    // Random moments, kinds, offsets and week starts.
    for _ in 0..20_000 {
        let kind = [PeriodKind::Day, PeriodKind::Week, PeriodKind::Month][rng.below(3)];
        let offset = i16::try_from(rng.below(1681)).unwrap() - 840;
        let now = (rng.next() % (230 * 365 * DAY_NS / 1_000)) * 1_000;
        cases.push((
            period(kind, offset, u8::try_from(rng.below(7)).unwrap()),
            now,
        ));
    }
    let mut compared = 0;
    for chunk in cases.chunks(400) {
        let mut args = vec![
            "FCALL".to_string(),
            "calendar_period_end".into(),
            "0".into(),
        ];
        for (p, now) in chunk {
            args.push(wire::quota_code(1, p).to_string());
            args.push((now / 1_000).to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer = redis.cli(&args);
        let lua: Vec<u64> = answer
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().unwrap_or_else(|_| panic!("{answer}")))
            .collect();
        assert_eq!(lua.len(), chunk.len(), "{answer}");
        for ((p, now), lua_end) in chunk.iter().zip(lua) {
            let (rust_end, _) = p.end_nanos(*now);
            assert_eq!(lua_end * 1_000, rust_end, "{p:?} at {now} ns");
            compared += 1;
        }
    }
    assert!(compared > 60_000, "{compared}");
}
