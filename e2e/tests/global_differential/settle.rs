//! `apikey_ratelimit_settle` (costs settled from responses) in a real Redis
//! against the filter's Rust side: random calls on a few keys mix
//! `apikey_ratelimit_batch` decisions (rates and calendar quotas at random
//! costs, as `quotas.rs`) with settle calls built by the filter's own
//! `settle::redis::path`, each of several entries: refunds and charges of 0,
//! a few, more than was ever reserved, and up to 10^9 units (past a rate's
//! 50-year cap and a quota's 2^30 - 1), on keys and fields that do not exist
//! yet, a key now and then twice in one call. Now and then a key's field is
//! set in Redis as another period (or a stale TAT) left it.
//!
//! The model applies `settle::apply` (the spec) to each entry in order at
//! the call's `now_us`, on the Rust side's own representation of quotas.
//! Redis must then hold exactly the model's values, and every later
//! decision must be the model's. Malformed settle calls are refused with a
//! Redis error and write nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::backend::{Redis, RedisWebdis};
use e2e::http;
use ratelimit_core::batch::replay::replay;
use ratelimit_core::batch::wire::Entry as BatchEntry;
use ratelimit_core::calendar::{Period, PeriodKind, Weekday};
use ratelimit_core::gcra::{Clock, Limit};
use ratelimit_core::quota;
use ratelimit_core::settle::redis::{self as wire, Entry};
use ratelimit_core::settle::{apply, Adjust, MAX_DEBT_NANOS};
use ratelimit_core::webdis::{self, FailureClass};

use super::{
    batch_alike, enc, field, named, plan, redis_now, stored_alike, subset, Model, Rng, DAY, US,
};

/// The most a quota's used count holds (30 bits), in Rust and in Lua.
const MAX_USED: u64 = (1 << 30) - 1;

/// What a scenario exercised (settle entries counted limit by limit).
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    batches: usize,
    admitted: usize,
    denied: usize,
    settle_calls: usize,
    refunds: usize,
    charges: usize,
    /// Settle calls with one key in two entries.
    repeated_keys: usize,
    /// A refund on a field not stored: nothing written.
    skipped: usize,
    /// A charge on a field not stored: created.
    created: usize,
    /// A rate's refund stopped at a full bucket (`now`).
    rates_to_full: usize,
    /// A quota's refund stopped at 0 used.
    quotas_to_zero: usize,
    /// A rate charged past its burst (a debt beyond its capacity).
    past_burst: usize,
    /// A rate's charge stopped at now + 50 years.
    rate_caps: usize,
    /// A quota's charge stopped at 2^30 - 1 used.
    quota_caps: usize,
    /// Fields set as another period or a stale TAT left them.
    foreign: usize,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.batches += o.batches;
        self.admitted += o.admitted;
        self.denied += o.denied;
        self.settle_calls += o.settle_calls;
        self.refunds += o.refunds;
        self.charges += o.charges;
        self.repeated_keys += o.repeated_keys;
        self.skipped += o.skipped;
        self.created += o.created;
        self.rates_to_full += o.rates_to_full;
        self.quotas_to_zero += o.quotas_to_zero;
        self.past_burst += o.past_burst;
        self.rate_caps += o.rate_caps;
        self.quota_caps += o.quota_caps;
        self.foreign += o.foreign;
    }
}

impl Model {
    /// One settle entry at Redis's `now` (ns), limit by limit, by
    /// `settle::apply`. A quota goes through the Rust side's packed value
    /// and back to Redis's `end + used`; a refund that leaves the packed
    /// value as it was leaves the stored one too (an older period's value
    /// reads as nothing used either way).
    fn settle(&mut self, entry: &Entry, now: u64, tally: &mut Tally) {
        let clock = Clock::wall(now);
        let refund = matches!(entry.adjust, Adjust::Refund(_));
        let fields = self.0.entry(entry.redis_key.clone()).or_default();
        for limit in &entry.limits {
            let name = field(limit);
            let stored = fields.get(&name).copied();
            let value = stored.unwrap_or(0);
            let (new, used_before) = match &limit.period {
                None => (apply(entry.adjust, limit, value, clock), 0),
                Some(period) => {
                    let packed = quota::from_redis(period, value, now);
                    let after = apply(entry.adjust, limit, packed, clock);
                    let (end, _) = period.end_nanos(now);
                    let new = if refund && after == packed {
                        value
                    } else {
                        // Settled in the current period.
                        assert_eq!(quota::unpack(after).0, quota::pack(end, 0, true));
                        end + quota::unpack(after).1 * US
                    };
                    (new, quota::unpack(packed).1)
                }
            };
            // The function skips a refund on a field it does not hold; the
            // Rust side's refund of a fresh state (0) must change nothing.
            if refund && stored.is_none() {
                assert_eq!(new, 0, "{entry:?}: a refund of nothing gave {new}");
                tally.skipped += 1;
                continue;
            }
            tally.created += usize::from(stored.is_none());
            let amount = match entry.adjust {
                Adjust::Refund(n) | Adjust::Charge(n) => n,
            };
            match &limit.period {
                None if refund => {
                    let room = value.saturating_sub(now);
                    let back = amount.saturating_mul(limit.interval_nanos);
                    tally.rates_to_full += usize::from(room > 0 && back > room);
                }
                None => {
                    tally.past_burst += usize::from(new > now + limit.capacity_nanos);
                    tally.rate_caps += usize::from(new == now + MAX_DEBT_NANOS);
                }
                Some(period) => {
                    let used = (new - period.end_nanos(now).0.min(new)) / US;
                    tally.quotas_to_zero +=
                        usize::from(refund && amount > used_before && used_before > 0);
                    tally.quota_caps += usize::from(!refund && used == MAX_USED);
                }
            }
            fields.insert(name, new);
        }
    }
}

/// One settle call with the filter's path and answer check; Redis's clock
/// (ns) when it ran.
fn call_settle(webdis: &str, entries: &[Entry]) -> u64 {
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = wire::path(nonce, entries);
    let r = http::get(webdis, &path).unwrap();
    let status = Some(u32::from(r.status));
    wire::check(status, &r.body, nonce)
        .unwrap_or_else(|e| panic!("{e:?}: {:?} for {path}", r.body_str()));
    let numbers = webdis::fcall_integers(status, &r.body).unwrap();
    assert_eq!(numbers.len(), 2, "{numbers:?}");
    numbers[1] * US
}

/// A settled amount: nothing, a few, more than any reservation, or huge.
fn amount(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 | 2 => 1 + rng.below(3) as u64,
        3 | 4 => 1 + rng.below(40) as u64,
        5 => rng.below(1_000) as u64,
        6 => rng.next() % 1_000_000_001,
        _ => 1_000_000_000,
    }
}

fn random_period(rng: &mut Rng, kind: PeriodKind) -> Period {
    Period {
        kind,
        offset_minutes: i16::try_from(rng.below(1681)).unwrap() - 840,
        week_start: Weekday(u8::try_from(rng.below(7)).unwrap()),
    }
}

/// `steps` random calls on four keys: batches on the first three,
/// settlements on all four (the last one only ever settled).
fn scenario(webdis: &str, redis: &Redis, scenario: u64, steps: usize) -> Tally {
    let mut rng = Rng(0xC2B2_AE3D_27D4_EB4F ^ ((scenario + 1) * 0x1000_0001));
    let fast = 1 + rng.below(20) as u64;
    let daily = random_period(&mut rng, PeriodKind::Day);
    let weekly = random_period(&mut rng, PeriodKind::Week);
    let monthly = random_period(&mut rng, PeriodKind::Month);
    let pool = [
        named("fast", fast, 1, 1 + rng.below(fast + 2) as u64),
        // T = 3 s: 10^9 of them pass the 50-year cap.
        named("slow", 1, 3, 2),
        // T = 6 h: any refund of 1 matters.
        named("day", 4, DAY, 4),
        Limit::quota("daily", 1 + rng.below(10) as u64, daily).unwrap(),
        Limit::quota("weekly", 5 + rng.below(30) as u64, weekly).unwrap(),
        // The largest count: only a cap of 2^30 - 1 denies it.
        Limit::quota("monthly", 1_000_000_000, monthly).unwrap(),
    ];
    let keys: Vec<String> = (0..4)
        .map(|k| format!("apikey_ratelimit:settle-{scenario}-{k}"))
        .collect();
    let mut model = Model::default();
    let mut tally = Tally::default();
    for step in 0..steps {
        std::thread::sleep(Duration::from_millis(rng.below(80) as u64));
        let context = format!("settle scenario {scenario} step {step}");
        let (touched, now): (BTreeSet<String>, u64) = match rng.below(10) {
            0..=4 => {
                // Three sets, each a subset of the pool at its own costs.
                let sets: Vec<Vec<Limit>> = (0..3)
                    .map(|_| {
                        subset(&pool, rng.below(64))
                            .into_iter()
                            .map(|l| l.costing(1 + rng.below(l.burst.min(3)) as u64))
                            .collect()
                    })
                    .collect();
                let entries: Vec<BatchEntry<'_>> = (0..1 + rng.below(4))
                    .map(|_| {
                        let set = rng.below(3);
                        BatchEntry {
                            redis_key: &keys[rng.below(3)],
                            applied: plan(set),
                            limits: &sets[set],
                            count: 1 + rng.below(5) as u32,
                        }
                    })
                    .collect();
                let reply = batch_alike(webdis, &mut model, &entries, &context);
                tally.batches += 1;
                for (entry, answer) in entries.iter().zip(&reply.entries) {
                    let count = usize::try_from(entry.count).unwrap();
                    let replayed = replay(entry.limits, reply.now_us, answer, count).unwrap();
                    let admitted = replayed.decisions.iter().filter(|d| d.allowed).count();
                    tally.admitted += admitted;
                    tally.denied += count - admitted;
                }
                let touched = entries.iter().map(|e| e.redis_key.to_string()).collect();
                (touched, reply.now_us * US)
            }
            5..=8 => {
                let entries: Vec<Entry> = (0..1 + rng.below(6))
                    .map(|_| {
                        let amount = amount(&mut rng);
                        Entry {
                            redis_key: keys[rng.below(4)].clone(),
                            adjust: if rng.below(2) == 0 {
                                Adjust::Refund(amount)
                            } else {
                                Adjust::Charge(amount)
                            },
                            // Each limit costing 1, as the filter settles.
                            limits: subset(&pool, rng.below(64))
                                .into_iter()
                                .map(|l| l.costing(1))
                                .collect(),
                        }
                    })
                    .collect();
                let now = call_settle(webdis, &entries);
                for entry in &entries {
                    model.settle(entry, now, &mut tally);
                    match entry.adjust {
                        Adjust::Refund(_) => tally.refunds += 1,
                        Adjust::Charge(_) => tally.charges += 1,
                    }
                }
                tally.settle_calls += 1;
                let touched: BTreeSet<String> =
                    entries.iter().map(|e| e.redis_key.clone()).collect();
                tally.repeated_keys += usize::from(touched.len() < entries.len());
                (touched, now)
            }
            _ => {
                // A field as another period left it (a quota: that
                // period's end plus what was used then, maybe still in the
                // future), or a rate's TAT a little past or ahead.
                let key = &keys[rng.below(3)];
                let limit = &pool[rng.below(pool.len() as u64)];
                let now = redis_now(redis);
                let value_us = now / US
                    + match limit.period {
                        Some(_) => {
                            let used = [0, 1 + rng.below(50), rng.below(1 << 30)][rng.below(3)];
                            used as u64
                        }
                        None => 10_000_000,
                    }
                    - match limit.period {
                        Some(_) => 1 + rng.below(3 * DAY * 1_000_000) as u64,
                        None => rng.below(20_000_000) as u64,
                    };
                let name = field(limit);
                redis.cli(&["HSET", key, &name, &value_us.to_string()]);
                let fields = model.0.entry(key.clone()).or_default();
                fields.insert(name, value_us * US);
                // Kept at least as long as its latest value, as the
                // functions keep it.
                let expire_ms =
                    (model.latest(key).max(now + 60 * 1_000_000_000) / US).div_ceil(1000);
                redis.cli(&["PEXPIREAT", key, &expire_ms.to_string()]);
                tally.foreign += 1;
                (BTreeSet::from([key.clone()]), now)
            }
        };
        for key in touched {
            stored_alike(redis, &model, &key, now, &context);
        }
    }
    tally
}

#[test]
fn random_refunds_and_charges_settle_alike_in_redis_and_rust() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    let (scenarios, steps) = (6, 50);
    let tallies: Vec<Tally> = super::in_parallel(scenarios, |n| scenario(&webdis, redis, n, steps));
    let mut total = Tally::default();
    for t in tallies {
        total.add(t);
    }
    eprintln!("compared: {total:?}");
    // Every shape was met (the generator is seeded: not by luck).
    for (what, n) in [
        ("admissions", total.admitted),
        ("denials", total.denied),
        ("refunds", total.refunds),
        ("charges", total.charges),
        ("a key twice in a settle call", total.repeated_keys),
        ("a refund of a field not stored", total.skipped),
        ("a charge creating a field", total.created),
        ("a rate refunded to a full bucket", total.rates_to_full),
        ("a quota refunded to 0 used", total.quotas_to_zero),
        ("a rate charged past its burst", total.past_burst),
        ("a rate charged to the 50-year cap", total.rate_caps),
        ("a quota charged to 2^30 - 1", total.quota_caps),
        ("a field of another period", total.foreign),
    ] {
        assert!(n > 0, "no call with {what}: {total:?}");
    }
}

#[test]
fn malformed_settle_calls_are_refused_with_a_redis_error_and_write_nothing() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    // A key with state, which every refused call must leave as it is, and
    // one without, which none may create.
    let held = "apikey_ratelimit:malformed-held";
    let fresh = "apikey_ratelimit:malformed-fresh";
    let long = [named("a", 1, 366 * DAY, 3)];
    let charge = |redis_key: &str| Entry {
        redis_key: redis_key.to_string(),
        adjust: Adjust::Charge(2),
        limits: long.iter().copied().collect(),
    };
    call_settle(&webdis, &[charge(held)]);
    let state = || {
        let hash = redis.cli(&["HGETALL", held]);
        (redis.keys(), hash, redis.cli(&["PEXPIRETIME", held]))
    };
    let before = state();
    assert_eq!(before.0, [held]);

    // One limit, T = 1 s, C = 5 s; a valid first entry shows the whole call
    // is checked before anything is written.
    let set = "1/a/1000000/5000000";
    let cases = [
        ("no nonce", "1/{h}"),
        ("a negative nonce", "1/{h}/-7/1/1/{set}"),
        ("more keys than arguments", "3/{h}/{f}"),
        ("a negative number of keys", "-1/{h}/7/1/1/{set}"),
        ("no op", "1/{h}/7"),
        ("no amount", "1/{h}/7/1"),
        ("no set", "1/{h}/7/1/1"),
        ("op 2 (the admin's grant)", "1/{h}/7/2/1/{set}"),
        ("a negative op", "1/{h}/7/-1/1/{set}"),
        ("a fractional op", "1/{h}/7/0%2E5/1/{set}"),
        ("a non-numeric op", "1/{h}/7/x/1/{set}"),
        ("a negative amount", "1/{h}/7/0/-1/{set}"),
        ("a fractional amount", "1/{h}/7/1/1%2E5/{set}"),
        ("an infinite amount", "1/{h}/7/1/inf/{set}"),
        ("a NaN amount", "1/{h}/7/1/nan/{set}"),
        ("an amount past 2^52", "1/{h}/7/1/1e300/{set}"),
        ("a set one limit short", "1/{h}/7/1/1/2/{set}"),
        ("a negative number of limits", "1/{h}/7/1/1/-1"),
        ("a fractional number of limits", "1/{h}/7/1/1/0%2E5"),
        ("a zero interval", "1/{h}/7/1/1/1/a/0/5000000"),
        ("a negative capacity", "1/{h}/7/1/1/1/a/1000000/-1"),
        ("an infinite capacity", "1/{h}/7/1/1/1/a/1/inf"),
        ("a quota of kind 3", "1/{h}/7/1/1/1/q/-1/246600"),
        ("a quota of 0", "1/{h}/7/1/1/1/q/-1/840"),
        ("a quota without its code", "1/{h}/7/1/1/1/q/-1"),
        ("an argument too many", "1/{h}/7/1/1/{set}/1"),
        ("an empty set and an argument too many", "1/{h}/7/1/1/0/0"),
        ("a key without its entry", "2/{f}/{h}/7/1/1/{set}"),
        ("a second entry of op 2", "2/{f}/{h}/7/1/1/{set}/2/1/{set}"),
        (
            "a second entry's negative amount",
            "2/{f}/{h}/7/1/1/{set}/0/-3/{set}",
        ),
        (
            "a second entry's set one limit short",
            "2/{f}/{h}/7/1/1/{set}/1/1/2/{set}",
        ),
    ];
    for (what, args) in cases {
        let path = format!("/FCALL/{}/{args}", wire::FUNCTION)
            .replace("{set}", set)
            .replace("{h}", &enc(held))
            .replace("{f}", &enc(fresh));
        let r = http::get(&webdis, &path).unwrap();
        let error = match webdis::fcall_integers(Some(u32::from(r.status)), &r.body) {
            Err(error) => error,
            Ok(numbers) => panic!("{what}: answered {numbers:?} to {path}"),
        };
        assert_eq!(error.class, FailureClass::Redis, "{what}: {error:?}");
        assert!(
            error.detail.starts_with("Redis error: ERR"),
            "{what}: {error:?}"
        );
        assert_eq!(state(), before, "{what} wrote something: {path}");
    }
    // Still settling: a refund of a key not stored writes nothing, a
    // charge creates it.
    let refund = Entry {
        adjust: Adjust::Refund(1),
        ..charge(fresh)
    };
    call_settle(&webdis, &[refund]);
    assert_eq!(redis.cli(&["EXISTS", fresh]).trim(), "0");
    call_settle(&webdis, &[charge(fresh)]);
    assert_eq!(redis.cli(&["EXISTS", fresh]).trim(), "1");
}
