//! `apikey_ratelimit_batch2` (plans read from Redis) in a real Redis against
//! the filter's Rust side: random calls with the filter's own path
//! (`batch::wire_plans::path`), reply parser and replay, on keys whose plan
//! an operator moves in Redis between calls (`HSET`/`HDEL` of the plans
//! hash, as the admin user), to plans the call describes, to a plan only the
//! configuration may give (an override's), and to plans it does not know;
//! each entry adds rules' limits at random costs. The model is the same as
//! for `apikey_ratelimit_batch`: `gcra::decide` per request at Redis's
//! clock, on the plan Redis held for the key.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::backend::{Redis, RedisWebdis};
use e2e::http;
use ratelimit_core::applied::Applied;
use ratelimit_core::batch::replay::replay;
use ratelimit_core::batch::wire_plans::{self, Entry, Expected, PlanSet, Reply};
use ratelimit_core::calendar::{Period, PeriodKind, Weekday};
use ratelimit_core::gcra::Limit;
use ratelimit_core::webdis::{self, FailureClass};

use super::{enc, named, names, stored_alike, subset, Model, Rng, US};

/// Plans the calls describe: Redis may name the first three; the fourth is
/// a configuration's own (an override's), only ever a key's fallback.
const PLAN_NAMES: [&str; 4] = ["free", "pro", "team.v2", "overrides[0]"];
const NAMEABLE: usize = 3;

fn call(webdis: &str, plans_key: &str, plans: &[PlanSet<'_>], entries: &[Entry<'_>]) -> Reply {
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = wire_plans::path(nonce, plans_key, plans, NAMEABLE, entries);
    let r = http::get(webdis, &path).unwrap();
    let plan_limits: Vec<usize> = plans.iter().map(|p| p.limits.len()).collect();
    let expected: Vec<Expected> = entries
        .iter()
        .map(|e| Expected {
            plan: e.plan,
            rule_limits: e.rule_limits.len(),
        })
        .collect();
    wire_plans::parse(
        Some(u32::from(r.status)),
        &r.body,
        nonce,
        &plan_limits,
        NAMEABLE,
        &expected,
    )
    .unwrap_or_else(|e| panic!("{e:?}: {:?} for {path}", r.body_str()))
}

/// What a scenario exercised.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub batches: usize,
    pub admitted: usize,
    pub denied: usize,
    /// Entries decided on a plan Redis named (not their fallback).
    pub moved: usize,
    /// Entries whose field named a plan the call may not use.
    pub unknown: usize,
    /// Entries charging a rule's limit more than 1.
    pub costly: usize,
    /// Entries with a calendar quota (a plan's or a rule's).
    pub quotas: usize,
    /// Calls with one key in two entries.
    pub repeated_keys: usize,
}

/// `steps` random calls on four keys whose plans move in Redis.
pub fn scenario(webdis: &str, redis: &Redis, scenario: u64, steps: usize) -> Tally {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ ((scenario + 1) * 0x1000_0001));
    let prefix = format!("apikey_ratelimit:plans-{scenario}:");
    let plans_key = wire_plans::plans_key(&prefix);
    let keys: Vec<String> = (0..4).map(|k| format!("{prefix}{:064x}", k + 1)).collect();
    // Plan limits and rule limits under names of their own (the filter
    // refuses a plan and a rule sharing one).
    let plan_pool: Vec<Limit> = (0..5)
        .map(|i| {
            let count = 1 + rng.below(8) as u64;
            let window = [1, 2, 3][rng.below(3)];
            let burst = 1 + rng.below(count + 2) as u64;
            named(&format!("plan{i}/{count}.{window}s"), count, window, burst)
        })
        .collect();
    let mut rule_pool: Vec<Limit> = (0..4)
        .map(|i| {
            let count = 2 + rng.below(20) as u64;
            let window = [1, 2][rng.below(2)];
            let burst = 2 + rng.below(count) as u64;
            named(&format!("rule{i}:{count}/{window}s"), count, window, burst)
        })
        .collect();
    // And a rule's weekly quota, charged at the rule's cost.
    let week = Period {
        kind: PeriodKind::Week,
        offset_minutes: i16::try_from(rng.below(1681)).unwrap() - 840,
        week_start: Weekday(u8::try_from(rng.below(7)).unwrap()),
    };
    rule_pool.push(Limit::quota("rule-quota", 10 + rng.below(30) as u64, week).unwrap());
    // Half of the plans also carry a calendar quota, daily or monthly, at
    // a random offset (`quotas.rs` has the boundaries).
    let plans: Vec<Vec<Limit>> = (0..PLAN_NAMES.len())
        .map(|p| {
            let mut limits = subset(&plan_pool, 1 + rng.below(31));
            if rng.below(2) == 0 {
                let period = Period {
                    kind: [PeriodKind::Day, PeriodKind::Month][rng.below(2)],
                    offset_minutes: i16::try_from(rng.below(1681)).unwrap() - 840,
                    week_start: Weekday::MONDAY,
                };
                let count = 5 + rng.below(20) as u64;
                limits.push(Limit::quota(&format!("plan-quota{p}"), count, period).unwrap());
            }
            limits
        })
        .collect();
    let plan_sets: Vec<PlanSet<'_>> = PLAN_NAMES
        .iter()
        .zip(&plans)
        .map(|(name, limits)| PlanSet { name, limits })
        .collect();
    let mut model = Model::default();
    let mut tally = Tally::default();
    for step in 0..steps {
        // An operator moves a key now and then: to a plan, to one Redis may
        // not name, to one nobody knows, or back to its configured one.
        if rng.below(3) == 0 {
            let field = &keys[rng.below(4)][prefix.len()..];
            match rng.below(6) {
                0 => redis.cli(&["HDEL", &plans_key, field]),
                3 => redis.cli(&["HSET", &plans_key, field, "overrides[0]"]),
                4 => redis.cli(&["HSET", &plans_key, field, "gold"]),
                5 => redis.cli(&["HSET", &plans_key, field, PLAN_NAMES[2]]),
                n => redis.cli(&["HSET", &plans_key, field, PLAN_NAMES[n - 1]]),
            };
        }
        // Rules' sets: random subsets, each limit at a random cost within
        // its burst (the filter refuses a cost above it).
        let rule_sets: Vec<Vec<Limit>> = (0..3)
            .map(|_| {
                subset(&rule_pool, rng.below(32))
                    .into_iter()
                    .map(|l| l.costing(1 + rng.below(l.burst.min(6)) as u64))
                    .collect()
            })
            .collect();
        let gap = match rng.below(3) {
            0 => 0,
            1 => rng.below(50),
            _ => rng.below(400),
        };
        std::thread::sleep(Duration::from_millis(gap as u64));
        let entries: Vec<Entry<'_>> = (0..1 + rng.below(5))
            .map(|_| {
                let set = rng.below(3);
                let most = [3, 12][rng.below(2)];
                Entry {
                    redis_key: &keys[rng.below(4)],
                    plan: rng.below(PLAN_NAMES.len() as u64),
                    rules: Applied {
                        rules: u32::try_from(set).unwrap(),
                        ..Applied::default()
                    },
                    rule_limits: &rule_sets[set],
                    count: 1 + rng.below(most) as u32,
                }
            })
            .collect();
        // What Redis holds now is what the call will find.
        let held: Vec<Option<String>> = entries
            .iter()
            .map(|e| {
                let field = &e.redis_key[prefix.len()..];
                let answer = redis.cli(&["HGET", &plans_key, field]);
                Some(answer.trim().to_string()).filter(|a| !a.is_empty())
            })
            .collect();
        let reply = call(webdis, &plans_key, &plan_sets, &entries);
        let now = reply.now_us * US;
        let context = format!("scenario {scenario} step {step}");
        for (j, ((entry, answer), held)) in
            entries.iter().zip(&reply.entries).zip(&held).enumerate()
        {
            let named_plan = held
                .as_deref()
                .and_then(|h| PLAN_NAMES.iter().take(NAMEABLE).position(|n| *n == h));
            let used = named_plan.unwrap_or(entry.plan);
            let context = format!("{context}, entry {j}: {} held {held:?}", entry.redis_key);
            assert_eq!(answer.plan, used, "{context}");
            assert_eq!(
                answer.unknown_plan,
                held.is_some() && named_plan.is_none(),
                "{context}"
            );
            let limits: Vec<Limit> = plans[used]
                .iter()
                .chain(entry.rule_limits)
                .copied()
                .collect();
            let context = format!("{context} under {:?}", names(&limits));
            let key = entry.redis_key;
            assert_eq!(
                answer.reply.debts_us.as_slice(),
                model.debts_us(key, &limits, now),
                "{context}"
            );
            let expected = model.decide(key, &limits, entry.count, now);
            let count = usize::try_from(entry.count).unwrap();
            let replayed = replay(&limits, reply.now_us, &answer.reply, count)
                .unwrap_or_else(|e| panic!("{context}: {e:?}"));
            assert_eq!(replayed.decisions, expected, "{context}");
            tally.admitted += expected.iter().filter(|d| d.allowed).count();
            tally.denied += expected.iter().filter(|d| !d.allowed).count();
            tally.moved += usize::from(used != entry.plan);
            tally.unknown += usize::from(answer.unknown_plan);
            tally.costly += usize::from(entry.rule_limits.iter().any(|l| l.cost > 1));
            tally.quotas += usize::from(limits.iter().any(|l| l.period.is_some()));
        }
        tally.batches += 1;
        let touched: BTreeSet<&str> = entries.iter().map(|e| e.redis_key).collect();
        tally.repeated_keys += usize::from(touched.len() < entries.len());
        for key in touched {
            stored_alike(redis, &model, key, now, &context);
        }
    }
    tally
}

#[test]
fn random_plan_moves_rules_and_costs_decide_alike_in_redis_and_rust() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    let (scenarios, steps) = (6, 40);
    let tallies: Vec<Tally> = super::in_parallel(scenarios, |n| scenario(&webdis, redis, n, steps));
    let mut total = Tally::default();
    for t in tallies {
        total.batches += t.batches;
        total.admitted += t.admitted;
        total.denied += t.denied;
        total.moved += t.moved;
        total.unknown += t.unknown;
        total.costly += t.costly;
        total.quotas += t.quotas;
        total.repeated_keys += t.repeated_keys;
    }
    eprintln!("compared: {total:?}");
    assert_eq!(total.batches, 6 * steps);
    // Every shape was met (the generator is seeded: not by luck).
    for (what, n) in [
        ("admissions", total.admitted),
        ("denials", total.denied),
        ("a key on a plan Redis named", total.moved),
        ("a plan the call may not use", total.unknown),
        ("a rule costing more than 1", total.costly),
        ("a calendar quota", total.quotas),
        ("a key twice in a call", total.repeated_keys),
    ] {
        assert!(n > 0, "no entry with {what}: {total:?}");
    }
    // The plans hashes are the operator's: the function never writes them.
    for scenario in 0..6 {
        let key = format!("apikey_ratelimit:plans-{scenario}:plans");
        assert_eq!(redis.cli(&["TYPE", &key]).trim(), "hash", "{key}");
        assert_eq!(redis.cli(&["PTTL", &key]).trim(), "-1", "{key}");
    }
}

#[test]
fn malformed_plan_calls_are_refused_with_a_redis_error_and_write_nothing() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    let prefix = "apikey_ratelimit:m:";
    let plans_key = wire_plans::plans_key(prefix);
    let key = format!("{prefix}{:064x}", 7);
    redis.cli(&["HSET", &plans_key, &key[prefix.len()..], "pro"]);
    let before = || (redis.keys(), redis.cli(&["HGETALL", &plans_key]));
    let state = before();
    let plan = "free/1/a/1000000/5000000";
    let (p, k) = (enc(&plans_key), enc(&key));
    for (what, args) in [
        ("no plans key", format!("1/{k}/7/1/1/{plan}/1/0/1/1/1")),
        (
            "a plans key not ending in plans",
            format!("2/{k}/{k}/7/1/1/{plan}/1/0/1/1/1"),
        ),
        (
            "a key outside its prefix",
            format!("2/{p}/other%3Ax/7/1/1/{plan}/1/0/1/1/1"),
        ),
        (
            "more nameable plans than plans",
            format!("2/{p}/{k}/7/1/2/{plan}/1/0/1/1/1"),
        ),
        ("plan 0", format!("2/{p}/{k}/7/1/1/{plan}/1/0/0/1/1")),
        (
            "a plan past the last",
            format!("2/{p}/{k}/7/1/1/{plan}/1/0/2/1/1"),
        ),
        (
            "a plan one limit short",
            format!("2/{p}/{k}/7/1/1/free/2/a/1/2/1/0/1/1/1"),
        ),
        (
            "an entry without its count",
            format!("2/{p}/{k}/7/1/1/{plan}/1/0/1/1"),
        ),
        (
            "a negative count",
            format!("2/{p}/{k}/7/1/1/{plan}/1/0/1/1/-1"),
        ),
        (
            "an infinite nonce",
            format!("2/{p}/{k}/inf/1/1/{plan}/1/0/1/1/1"),
        ),
    ] {
        let path = format!("/FCALL/{}/{args}", wire_plans::FUNCTION);
        let r = http::get(&webdis, &path).unwrap();
        let error = match webdis::fcall_integers(Some(u32::from(r.status)), &r.body) {
            Err(error) => error,
            Ok(numbers) => panic!("{what}: answered {numbers:?} to {path}"),
        };
        assert_eq!(error.class, FailureClass::Redis, "{what}: {error:?}");
        assert_eq!(before(), state, "{what} wrote something: {path}");
    }
    // A plans key that is not a hash: a Redis error, nothing written.
    redis.cli(&["DEL", &plans_key]);
    redis.cli(&["SET", &plans_key, "pro"]);
    let path = format!(
        "/FCALL/{}/2/{p}/{k}/7/1/1/{plan}/1/0/1/1/1",
        wire_plans::FUNCTION
    );
    let r = http::get(&webdis, &path).unwrap();
    let error = webdis::fcall_integers(Some(u32::from(r.status)), &r.body).unwrap_err();
    assert!(error.detail.contains("WRONGTYPE"), "{error:?}");
    assert_eq!(redis.cli(&["EXISTS", &key]).trim(), "0");
}
