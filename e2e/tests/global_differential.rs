//! The Redis functions in a real Redis and the filter's Rust side decide alike.
//!
//! Random batches go to `apikey_ratelimit_batch` through webdis with the
//! filter's own path (`batch::wire::path`), reply parser (`batch::wire::parse`)
//! and replay (`batch::replay::replay`): several keys a call, each with its
//! own limit set (some shared by several keys, some of no limit at all) and
//! 1 to 20 requests, a key now and then twice in one call, and limits added
//! and removed between calls as in a rolling update. Now and then an earlier
//! filter's one-request `apikey_ratelimit_gcra` decides on the same keys.
//!
//! The model is `gcra::decide`, once per request at Redis's clock, with each
//! key's TATs kept by limit name. Every request's decision (allowed,
//! Retry-After, each limit's remaining and reset) must be the model's, Redis
//! must hold exactly the model's TATs (a field a call does not carry is left
//! alone), and a key's expiry must never fall before its latest TAT. Edge
//! values (a burst exactly filled, a debt exactly at the tolerance,
//! capacities at the 50-year bound) have a test of their own, and malformed
//! calls are refused with a Redis error and write nothing.
//!
//! `plans.rs` does the same for `apikey_ratelimit_batch2`, the call of
//! `plans_from_redis`: keys' plans moved in Redis between calls, and rules'
//! limits at random costs.
//!
//! `settle.rs` mixes those decisions with `apikey_ratelimit_settle` calls
//! (refunds and charges of costs settled from responses) against
//! `settle::apply`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use e2e::backend::{Redis, RedisWebdis};
use e2e::http;
use ratelimit_core::applied::Applied;
use ratelimit_core::batch::replay::replay;
use ratelimit_core::batch::wire::{self, Entry, Reply};
use ratelimit_core::gcra::{self, Decision, Limit};
use ratelimit_core::quota;
use ratelimit_core::rate::{Rate, MAX_CAPACITY_NANOS};
use ratelimit_core::webdis::{self, FailureClass};

#[path = "global_differential/plans.rs"]
mod plans;
#[path = "global_differential/quotas.rs"]
mod quotas;
#[path = "global_differential/settle.rs"]
mod settle;

/// Nanoseconds per microsecond: the model counts in the first, Redis in the second.
const US: u64 = 1_000;
const DAY: u64 = 86_400;

/// A small deterministic generator (xorshift64*), seeded per scenario.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> usize {
        usize::try_from(self.next() % n).unwrap()
    }
}

/// Entries of one plan share their limits' description in a call.
fn plan(plan: usize) -> Applied {
    Applied {
        plan: u16::try_from(plan).unwrap(),
        ..Applied::default()
    }
}

fn named(name: &str, count: u64, window_seconds: u64, burst: u64) -> Limit {
    let rate = Rate {
        count,
        window_seconds,
    };
    Limit::new(name, rate, burst).unwrap()
}

/// The Rust side: each key's TATs (ns) by field, as Redis keeps them: a
/// rate's under its name, a calendar quota's under `quota#<name>`, as its
/// period's end plus what was used in it (µs as units).
#[derive(Default)]
struct Model(BTreeMap<String, BTreeMap<String, u64>>);

/// A limit's field in a key's Redis hash.
fn field(limit: &Limit) -> String {
    match limit.period {
        Some(_) => format!("{}{}", quota::FIELD_PREFIX, limit.name.as_str()),
        None => limit.name.as_str().to_string(),
    }
}

impl Model {
    fn fields(&self, key: &str) -> BTreeMap<String, u64> {
        self.0.get(key).cloned().unwrap_or_default()
    }

    /// The values Redis holds for `limits`.
    fn values(&self, key: &str, limits: &[Limit]) -> Vec<u64> {
        let fields = self.fields(key);
        let value = |l: &Limit| fields.get(&field(l)).copied().unwrap_or(0);
        limits.iter().map(value).collect()
    }

    /// Each limit's `max(TAT - now, 0)` in microseconds, as the function says it.
    fn debts_us(&self, key: &str, limits: &[Limit], now: u64) -> Vec<u64> {
        let values = self.values(key, limits);
        values
            .iter()
            .map(|tat| tat.saturating_sub(now) / US)
            .collect()
    }

    /// `count` requests of `key` under `limits` at `now`, one by one, by
    /// `gcra::decide` (on the Rust side's own representation of quotas).
    fn decide(&mut self, key: &str, limits: &[Limit], count: u32, now: u64) -> Vec<Decision> {
        let mut tats: Vec<u64> = self
            .values(key, limits)
            .into_iter()
            .zip(limits)
            .map(|(value, limit)| match &limit.period {
                Some(period) => quota::from_redis(period, value, now),
                None => value,
            })
            .collect();
        let decisions: Vec<Decision> = (0..count)
            .map(|_| gcra::decide(limits, &mut tats, now))
            .collect();
        if decisions.iter().any(|d| d.allowed) {
            let fields = self.0.entry(key.to_string()).or_default();
            for (limit, tat) in limits.iter().zip(tats) {
                // An admission leaves a quota in the current period.
                let value = match &limit.period {
                    Some(period) => period.end_nanos(now).0 + quota::unpack(tat).1 * US,
                    None => tat,
                };
                fields.insert(field(limit), value);
            }
        }
        decisions
    }

    fn latest(&self, key: &str) -> u64 {
        self.fields(key).values().max().copied().unwrap_or(0)
    }
}

fn names(limits: &[Limit]) -> Vec<&str> {
    limits.iter().map(|l| l.name.as_str()).collect()
}

/// One batch call, with the filter's path and reply parser.
fn call_batch(webdis: &str, entries: &[Entry<'_>]) -> Reply {
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = http::get(webdis, &wire::path(nonce, entries)).unwrap();
    let limits: Vec<usize> = entries.iter().map(|e| e.limits.len()).collect();
    wire::parse(Some(u32::from(r.status)), &r.body, nonce, &limits)
        .unwrap_or_else(|e| panic!("{e:?}: {:?}", r.body_str()))
}

/// One batch call whose every request must get the model's decision; its reply.
fn batch_alike(webdis: &str, model: &mut Model, entries: &[Entry<'_>], context: &str) -> Reply {
    let reply = call_batch(webdis, entries);
    assert_eq!(reply.entries.len(), entries.len(), "{context}");
    let now = reply.now_us * US;
    for (j, (entry, answer)) in entries.iter().zip(&reply.entries).enumerate() {
        let (key, limits) = (entry.redis_key, entry.limits);
        let context = format!(
            "{context}, entry {j}: {key} x{} under {:?}",
            entry.count,
            names(limits)
        );
        let debts = model.debts_us(key, limits, now);
        assert_eq!(answer.debts_us.as_slice(), debts, "{context}");
        let expected = model.decide(key, limits, entry.count, now);
        let count = usize::try_from(entry.count).unwrap();
        let replayed = replay(limits, reply.now_us, answer, count)
            .unwrap_or_else(|e| panic!("{context}: {e:?}"));
        assert_eq!(replayed.decisions, expected, "{context}");
        // What the deny cache may learn: each rate's time to a full bucket.
        let after = model.debts_us(key, limits, now);
        let last = replayed.last().unwrap().states();
        for ((limit, state), debt) in limits.iter().zip(last).zip(after) {
            if limit.period.is_none() {
                assert_eq!(state.reset_nanos / US, debt, "{context}");
            }
        }
    }
    reply
}

/// An earlier filter's one-request call, built as it built it.
fn gcra_path(key: &str, limits: &[Limit]) -> String {
    let mut path = format!(
        "/FCALL/apikey_ratelimit_gcra/1/{}/{}",
        enc(key),
        limits.len()
    );
    for limit in limits {
        let (t, c) = (limit.interval_nanos / US, limit.capacity_nanos / US);
        path += &format!("/{}/{t}/{c}", enc(limit.name.as_str()));
    }
    path
}

/// The one-request function against the model: it still answers
/// `{allowed, retry_after_us, now_us, reset_1_us, ...}`. Returns the
/// decision and Redis's clock (ns).
fn gcra_alike(
    webdis: &str,
    model: &mut Model,
    key: &str,
    limits: &[Limit],
    context: &str,
) -> (Decision, u64) {
    let r = http::get(webdis, &gcra_path(key, limits)).unwrap();
    let numbers = webdis::fcall_integers(Some(u32::from(r.status)), &r.body)
        .unwrap_or_else(|e| panic!("{context}: {e:?}"));
    assert_eq!(numbers.len(), 3 + limits.len(), "{context}: {numbers:?}");
    let now = numbers[2] * US;
    let rust = model.decide(key, limits, 1, now).remove(0);
    let resets: Vec<u64> = rust.states().iter().map(|s| s.reset_nanos / US).collect();
    assert!(numbers[0] <= 1, "{context}: {numbers:?}");
    assert_eq!(
        (numbers[0] == 1, numbers[1] * US, &numbers[3..]),
        (rust.allowed, rust.retry_after_nanos, &resets[..]),
        "{context}: gcra under {:?}",
        names(limits)
    );
    (rust, now)
}

fn enc(text: &str) -> String {
    let mut out = String::new();
    webdis::encode_into(&mut out, text.as_bytes());
    out
}

/// The key's fields in Redis, as (name, TAT in ns).
fn stored(redis: &Redis, key: &str) -> BTreeMap<String, u64> {
    let text = redis.cli(&["HGETALL", key]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    lines
        .chunks(2)
        .map(|pair| (pair[0].to_string(), pair[1].parse::<u64>().unwrap() * US))
        .collect()
}

/// Redis's clock, in ns.
fn redis_now(redis: &Redis) -> u64 {
    let time = redis.cli(&["TIME"]);
    let parts: Vec<u64> = time
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    parts[0] * 1_000_000_000 + parts[1] * US
}

/// Redis holds exactly the model's TATs for `key` after a call at `now`,
/// and keeps the key at least until its latest TAT.
fn stored_alike(redis: &Redis, model: &Model, key: &str, now: u64, context: &str) {
    let in_redis = stored(redis, key);
    let fields = model.fields(key);
    let latest = model.latest(key);
    let forgotten = |what: &str| {
        // Gone already (a slow machine): only once Redis's clock passed it.
        let redis_now = redis_now(redis);
        assert!(
            redis_now >= latest,
            "{context}: {key} {what} at {redis_now} ns, latest TAT {latest} ns"
        );
    };
    if in_redis.is_empty() && latest > now {
        return forgotten("forgotten");
    }
    // Fields of limits this call did not carry are kept; a TAT in the past
    // is a full bucket either way.
    for (name, tat) in &in_redis {
        assert_eq!(fields.get(name), Some(tat), "{context}: {key} {in_redis:?}");
    }
    for (name, tat) in fields.iter().filter(|(_, tat)| **tat > now) {
        assert_eq!(
            in_redis.get(name),
            Some(tat),
            "{context}: {key} {in_redis:?}"
        );
    }
    if latest > now {
        let expire_at: i64 = redis.cli(&["PEXPIRETIME", key]).trim().parse().unwrap();
        if expire_at == -2 {
            return forgotten("expired");
        }
        let expire_at = u64::try_from(expire_at)
            .unwrap_or_else(|_| panic!("{context}: {key} has no expiry ({expire_at})"));
        assert!(
            expire_at * 1_000_000 >= latest,
            "{context}: {key} expires at {expire_at} ms, latest TAT {latest} ns"
        );
    }
}

/// A pool of named limits; each set is a subset of it.
fn random_pool(rng: &mut Rng) -> Vec<Limit> {
    (0..5)
        .map(|i| {
            let count = 1 + rng.below(6) as u64;
            let window_seconds = [1, 1, 2, 3][rng.below(4)];
            let burst = 1 + rng.below(count + 2) as u64;
            named(
                &format!("l{i}/{count}.{window_seconds}s"),
                count,
                window_seconds,
                burst,
            )
        })
        .collect()
}

fn subset(pool: &[Limit], mask: usize) -> Vec<Limit> {
    let chosen = pool
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0);
    chosen.map(|(_, limit)| *limit).collect()
}

/// What a scenario exercised.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    batches: usize,
    gcra_calls: usize,
    admitted: usize,
    denied: usize,
    /// Calls with one key in two entries.
    repeated_keys: usize,
    /// Calls with one set for two distinct keys.
    shared_sets: usize,
    /// Calls with two distinct sets.
    mixed_sets: usize,
    /// Entries whose set has no limit.
    empty_sets: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.batches += other.batches;
        self.gcra_calls += other.gcra_calls;
        self.admitted += other.admitted;
        self.denied += other.denied;
        self.repeated_keys += other.repeated_keys;
        self.shared_sets += other.shared_sets;
        self.mixed_sets += other.mixed_sets;
        self.empty_sets += other.empty_sets;
    }

    fn count_batch(&mut self, entries: &[Entry<'_>], reply: &Reply) {
        self.batches += 1;
        let keys: BTreeSet<&str> = entries.iter().map(|e| e.redis_key).collect();
        let sets: BTreeSet<u16> = entries.iter().map(|e| e.applied.plan).collect();
        let pairs: BTreeSet<(u16, &str)> = entries
            .iter()
            .map(|e| (e.applied.plan, e.redis_key))
            .collect();
        self.repeated_keys += usize::from(keys.len() < entries.len());
        self.shared_sets += usize::from(pairs.len() > sets.len());
        self.mixed_sets += usize::from(sets.len() > 1);
        for (entry, answer) in entries.iter().zip(&reply.entries) {
            let admitted = usize::try_from(answer.admitted).unwrap();
            self.admitted += admitted;
            self.denied += usize::try_from(entry.count).unwrap() - admitted;
            self.empty_sets += usize::from(entry.limits.is_empty());
        }
    }
}

/// `steps` random calls on four keys and three limit sets drawn from a pool.
fn scenario(webdis: &str, redis: &Redis, scenario: u64, steps: usize) -> Tally {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((scenario + 1) * 0x1000_0001));
    let pool = random_pool(&mut rng);
    let keys: Vec<String> = (0..4)
        .map(|k| format!("apikey_ratelimit:differential-{scenario}-{k}"))
        .collect();
    // Each set a subset of the pool, the empty one included.
    let mut masks: Vec<usize> = (0..3).map(|_| rng.below(32)).collect();
    let mut model = Model::default();
    let mut tally = Tally::default();
    for step in 0..steps {
        // Now and then a set gains or loses limits (a rolling update).
        if rng.below(4) == 0 {
            let set = rng.below(3);
            masks[set] = rng.below(32);
        }
        let sets: Vec<Vec<Limit>> = masks.iter().map(|m| subset(&pool, *m)).collect();
        // Bursts (no gap), near-interval gaps and long ones.
        let gap = match rng.below(4) {
            0 => 0,
            1 => rng.below(50),
            _ => rng.below(400),
        };
        std::thread::sleep(Duration::from_millis(gap as u64));
        let context = format!("scenario {scenario} step {step}, sets {masks:?}");
        let (touched, now): (BTreeSet<&str>, u64) = if rng.below(6) == 0 {
            let key = &keys[rng.below(4)];
            let limits = &sets[rng.below(3)];
            let (decision, now) = gcra_alike(webdis, &mut model, key, limits, &context);
            tally.gcra_calls += 1;
            tally.admitted += usize::from(decision.allowed);
            tally.denied += usize::from(!decision.allowed);
            (BTreeSet::from([key.as_str()]), now)
        } else {
            let entries: Vec<Entry<'_>> = (0..1 + rng.below(5))
                .map(|_| {
                    let set = rng.below(3);
                    // Often a few requests, sometimes many more than a burst.
                    let most = [3, 20][rng.below(2)];
                    Entry {
                        redis_key: &keys[rng.below(4)],
                        applied: plan(set),
                        limits: &sets[set],
                        count: 1 + rng.below(most) as u32,
                    }
                })
                .collect();
            let reply = batch_alike(webdis, &mut model, &entries, &context);
            tally.count_batch(&entries, &reply);
            let touched = entries.iter().map(|e| e.redis_key).collect();
            (touched, reply.now_us * US)
        };
        for key in touched {
            stored_alike(redis, &model, key, now, &context);
        }
    }
    assert!(
        tally.admitted > 0 && tally.denied > 0,
        "scenario {scenario}: {tally:?}"
    );
    tally
}

/// Runs `scenario(0..n)` on `n` threads at once (each on its own keys),
/// their results in order.
fn in_parallel<T: Send>(n: u64, scenario: impl Fn(u64) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let scenario = &scenario;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || scenario(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn random_batches_decide_alike_in_redis_and_rust() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    let (scenarios, steps) = (8, 40);
    let tallies: Vec<Tally> = in_parallel(scenarios, |n| scenario(&webdis, redis, n, steps));
    let mut total = Tally::default();
    for tally in tallies {
        total.add(tally);
    }
    eprintln!("compared: {total:?}");
    assert_eq!(total.batches + total.gcra_calls, 8 * steps);
    // Every shape of call was met (the generator is seeded: not by luck).
    for (what, n) in [
        ("one-request calls", total.gcra_calls),
        ("a key twice in a call", total.repeated_keys),
        ("a set shared by keys", total.shared_sets),
        ("several sets in a call", total.mixed_sets),
        ("a set of no limit", total.empty_sets),
    ] {
        assert!(n > 0, "no call with {what}: {total:?}");
    }
    // Redis forgets idle keys: every key left has an expiry (-1 is none;
    // -2, gone since the scan, is fine).
    for key in redis.keys() {
        let ttl: i64 = redis.cli(&["PTTL", &key]).trim().parse().unwrap();
        assert!(ttl > 0 || ttl == -2, "{key} has no expiry ({ttl})");
    }
}

/// `(admitted, debts_us)` of each entry of a reply.
fn summary(reply: &Reply) -> Vec<(u64, Vec<u64>)> {
    let entry = |e: &wire::EntryReply| (e.admitted, e.debts_us.as_slice().to_vec());
    reply.entries.iter().map(entry).collect()
}

#[test]
fn edge_values_decide_alike_a_burst_filled_a_debt_at_the_tolerance_capacities_at_the_bound() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    let mut model = Model::default();
    let key = |name: &str| format!("apikey_ratelimit:edge-{name}");
    let (a, b, c, d, e, f) = (key("a"), key("b"), key("c"), key("d"), key("e"), key("f"));

    // 5 per 500 s, burst 5: T = 100 s (no stall refills one between the
    // calls), tolerance 4 T. Key a: exactly the burst, then one more (the
    // key twice in a call). Key b: one short of the burst, which leaves a
    // debt of exactly the tolerance: one more fits, the next does not.
    let fill = [named("fill", 5, 500, 5)];
    let t_us = 100_000_000;
    let entry = |redis_key, limits, count| Entry {
        redis_key,
        applied: plan(0),
        limits,
        count,
    };
    let entries = [
        entry(&a, &fill[..], 5),
        entry(&a, &fill[..], 1),
        entry(&b, &fill[..], 4),
        entry(&b, &fill[..], 2),
    ];
    let reply = batch_alike(&webdis, &mut model, &entries, "burst");
    assert_eq!(
        summary(&reply),
        [
            (5, vec![0]),
            (0, vec![5 * t_us]),
            (4, vec![0]),
            (1, vec![4 * t_us])
        ]
    );
    let now = reply.now_us * US;
    for k in [&a, &b] {
        stored_alike(redis, &model, k, now, "burst");
    }
    // One request more each, from an earlier filter: both wait.
    let (decision, _) = gcra_alike(&webdis, &mut model, &b, &fill, "burst, gcra");
    assert!(!decision.allowed);

    // Capacities at the bound the config allows (50 years of 365 days),
    // with the densest and the fastest rates next to them.
    let year = named("1/366d", 1, 366 * DAY, 49);
    let fifty = named("1/365d", 1, 365 * DAY, 50);
    let dense = named("1e9/366d", 1_000_000_000, 366 * DAY, 1_000_000_000);
    let fast = named("1e6/s", 1_000_000, 1, 1_000_000_000);
    assert_eq!(fifty.capacity_nanos, MAX_CAPACITY_NANOS);
    assert!(year.capacity_nanos <= MAX_CAPACITY_NANOS);
    assert_eq!(fast.interval_nanos, US);
    let large = [year, fifty, dense, fast];
    let fifty = [fifty];
    let mut entries = vec![entry(&c, &large[..], 20); 3];
    entries.extend([entry(&d, &fifty[..], 20); 3].map(|e| Entry {
        applied: plan(1),
        ..e
    }));
    let reply = batch_alike(&webdis, &mut model, &entries, "large");
    let admitted: Vec<u64> = reply.entries.iter().map(|e| e.admitted).collect();
    // 49 fit under 1/366d, 50 under 1/365d.
    assert_eq!(admitted, [20, 20, 9, 20, 20, 10]);
    let now = reply.now_us * US;
    for k in [&c, &d] {
        stored_alike(redis, &model, k, now, "large");
    }
    assert!(model.latest(&c) >= now + year.capacity_nanos);
    // Earlier filters: a fresh key fits, a full one waits.
    let (decision, _) = gcra_alike(&webdis, &mut model, &e, &fifty, "large, gcra");
    assert!(decision.allowed);
    let (decision, now) = gcra_alike(&webdis, &mut model, &d, &fifty, "large, gcra");
    assert!(!decision.allowed);
    for k in [&d, &e] {
        stored_alike(redis, &model, k, now, "large, gcra");
    }

    // An entry of no limit admits all and writes nothing; an empty batch
    // and the health check's one-request call only read the clock.
    let reply = batch_alike(&webdis, &mut model, &[entry(&f, &[], 7)], "no limit");
    assert_eq!(summary(&reply), [(7, vec![])]);
    assert_eq!(call_batch(&webdis, &[]).entries, []);
    let (decision, _) = gcra_alike(&webdis, &mut model, &f, &[], "health check");
    assert!(decision.allowed);
    assert_eq!(redis.cli(&["EXISTS", &f]).trim(), "0");
}

#[test]
fn malformed_calls_are_refused_with_a_redis_error_and_write_nothing() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    // A key with state, which every refused call must leave as it is, and
    // one without, which none may create.
    let held = "apikey_ratelimit:malformed-held";
    let fresh = "apikey_ratelimit:malformed-fresh";
    let long = [named("a", 1, 366 * DAY, 3)];
    let entry = |redis_key| Entry {
        redis_key,
        applied: plan(0),
        limits: &long,
        count: 1,
    };
    assert_eq!(
        summary(&call_batch(&webdis, &[entry(held)])),
        [(1, vec![0])]
    );
    let state = || {
        let hash = redis.cli(&["HGETALL", held]);
        (redis.keys(), hash, redis.cli(&["PEXPIRETIME", held]))
    };
    let before = state();

    // One limit, T = 1 s, C = 5 s; a valid first entry shows the whole call
    // is checked before anything is written. "B" calls the batch function,
    // "G" the one-request one.
    let set = "1/a/1000000/5000000";
    let cases = [
        ("more keys than arguments", "B 3/{h}/{f}"),
        ("a negative number of keys", "B -1/{h}/1/{set}/1/1"),
        ("no nonce", "B 1/{h}"),
        ("no limit sets", "B 1/{h}/7"),
        ("a negative nonce", "B 1/{h}/-7/1/{set}/1/1"),
        ("an infinite nonce", "B 1/{h}/inf/1/{set}/1/1"),
        ("a key without its entry", "B 2/{h}/{f}/7/1/{set}/1/1"),
        ("an entry without its count", "B 2/{h}/{f}/7/1/{set}/1/1/1"),
        ("an argument too many", "B 1/{h}/7/1/{set}/1/1/1"),
        (
            "a set one limit short",
            "B 1/{h}/7/1/2/a/1000000/5000000/1/1",
        ),
        ("set 0", "B 2/{h}/{f}/7/1/{set}/1/1/0/1"),
        ("a set past the last", "B 2/{h}/{f}/7/1/{set}/1/1/2/1"),
        ("a fractional set", "B 1/{f}/7/1/{set}/1%2E5/1"),
        ("a negative set", "B 1/{f}/7/1/{set}/-1/1"),
        ("a non-numeric count", "B 2/{h}/{f}/7/1/{set}/1/1/1/x"),
        ("a negative count", "B 1/{f}/7/1/{set}/1/-1"),
        ("a fractional count", "B 1/{f}/7/1/{set}/1/0%2E5"),
        ("an infinite count", "B 1/{f}/7/1/{set}/1/inf"),
        ("a NaN count", "B 1/{f}/7/1/{set}/1/nan"),
        ("a count past 2^52, no limit", "B 1/{f}/7/1/0/1/1e300"),
        ("a negative number of sets", "B 1/{f}/7/-1/1/1"),
        ("a negative number of limits", "B 1/{f}/7/1/-1/1/1"),
        ("a non-numeric interval", "B 1/{f}/7/1/1/a/x/5000000/1/1"),
        ("a zero interval", "B 1/{f}/7/1/1/a/0/5000000/1/1"),
        (
            "a negative interval",
            "B 1/{f}/7/1/1/a/-1000000/5000000/1/1",
        ),
        ("a negative capacity", "B 1/{f}/7/1/1/a/1000000/-1/1/1"),
        ("an infinite capacity", "B 1/{f}/7/1/1/a/1/inf/1/1"),
        ("a capacity of 1e300", "B 1/{f}/7/1/1/a/1/1e300/1/1"),
        (
            "a capacity of 2^53",
            "B 1/{f}/7/1/1/a/1/9007199254740992/1/1",
        ),
        // Calendar quotas: (name, -cost, code), code = N*2^16 + kind*2^14
        // + week start*2^11 + (offset + 840); 3/day at +00:00 is 197448.
        ("a quota of kind 3", "B 1/{f}/7/1/1/q/-1/246600/1/1"),
        ("a week starting on day 7", "B 1/{f}/7/1/1/q/-1/228552/1/1"),
        ("an offset past +14:00", "B 1/{f}/7/1/1/q/-1/198289/1/1"),
        ("a quota of 0", "B 1/{f}/7/1/1/q/-1/840/1/1"),
        ("a cost above the quota", "B 1/{f}/7/1/1/q/-4/197448/1/1"),
        ("a quota over 10^9", "B 1/{f}/7/1/1/q/-1/65536000066376/1/1"),
        (
            "a fractional quota cost",
            "B 1/{f}/7/1/1/q/-1%2E5/197448/1/1",
        ),
        ("an infinite quota cost", "B 1/{f}/7/1/1/q/-inf/197448/1/1"),
        (
            "a fractional quota code",
            "B 1/{f}/7/1/1/q/-1/197448%2E5/1/1",
        ),
        (
            "a quota code of 2^53",
            "B 1/{f}/7/1/1/q/-1/9007199254740992/1/1",
        ),
        ("a quota without its code", "B 1/{f}/7/1/1/q/-1"),
        ("gcra with a quota", "G 1/{f}/1/q/-1/197448"),
        ("gcra on two keys", "G 2/{h}/{f}/0"),
        ("gcra without limits", "G 1/{f}"),
        ("gcra without a capacity", "G 1/{f}/1/a/1000000"),
        ("gcra with an argument too many", "G 1/{f}/{set}/1"),
        ("gcra with a negative interval", "G 1/{f}/1/a/-1/5000000"),
        ("gcra with an infinite capacity", "G 1/{f}/1/a/1/inf"),
    ];
    for (what, call) in cases {
        let path = call
            .replace("B ", "/FCALL/apikey_ratelimit_batch/")
            .replace("G ", "/FCALL/apikey_ratelimit_gcra/")
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
    // Redis is still up and deciding.
    assert_eq!(
        summary(&call_batch(&webdis, &[entry(fresh)])),
        [(1, vec![0])]
    );
}
