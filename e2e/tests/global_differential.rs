//! The Redis function in a real Redis and the Rust algorithm decide alike.
//!
//! Random request timings over random subsets of a pool of named limits
//! (limits added and removed between calls, as in a rolling update) go to
//! the real function through webdis (the filter's own URLs and reply
//! parser); the Rust GCRA is run on the same sequence at the times Redis
//! reports, with each limit's TAT kept by name. Every decision, retry time
//! and per-limit reset must be identical, Redis must hold exactly the
//! model's TATs (a field a call does not carry is left alone), and the
//! key's expiry must never fall before its latest TAT.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::backend::Redis;
use e2e::backend::RedisWebdis;
use e2e::http;
use ratelimit_core::gcra::{self, Limit};
use ratelimit_core::rate::Rate;
use ratelimit_core::webdis::{self, Parsed, Reply};

/// A small deterministic generator (xorshift64*), seeded per scenario.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A pool of named limits; each call carries a random subset of them.
fn random_pool(rng: &mut Rng) -> Vec<Limit> {
    (0..4)
        .map(|i| {
            let count = 1 + rng.below(6);
            let window_seconds = [1, 1, 2, 3][rng.below(4) as usize];
            let burst = 1 + rng.below(count + 2);
            Limit::new(
                format!("l{i}/{count}.{window_seconds}s"),
                Rate {
                    count,
                    window_seconds,
                },
                burst,
            )
            .unwrap()
        })
        .collect()
}

/// A non-empty subset of the pool, as a bit mask.
fn random_subset(rng: &mut Rng) -> u64 {
    1 + rng.below(15)
}

fn decide_in_redis(webdis: &str, key: &str, limits: &[Limit]) -> Reply {
    let path = webdis::request_path(key, limits);
    let r = http::get(webdis, &path).unwrap();
    match webdis::parse_reply(Some(u32::from(r.status)), &r.body, limits.len()) {
        Parsed::Decided(reply) => reply,
        Parsed::Failed(e) => panic!("{e:?}"),
    }
}

/// The key's fields in Redis, as (name, TAT in ns).
fn stored(redis: &Redis, key: &str) -> BTreeMap<String, u64> {
    let text = redis.cli(&["HGETALL", key]);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|pair| (pair[0].to_string(), pair[1].parse::<u64>().unwrap() * 1_000))
        .collect()
}

#[test]
fn the_redis_function_and_rust_decide_alike_as_limits_come_and_go() {
    let backend = RedisWebdis::start();
    let webdis = backend.webdis.addr();
    let redis = &backend.redis;
    let scenarios = 8;
    let steps = 40;
    let compared: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..scenarios)
            .map(|scenario| {
                let webdis = webdis.clone();
                s.spawn(move || {
                    let mut rng =
                        Rng(0x9E37_79B9_7F4A_7C15 ^ ((scenario as u64 + 1) * 0x1000_0001));
                    let pool = random_pool(&mut rng);
                    let key = format!("apikey_ratelimit:differential-{scenario}");
                    // The Rust side: each limit's TAT by name, as Redis keeps it.
                    let mut model: BTreeMap<String, u64> = BTreeMap::new();
                    let mut mask = random_subset(&mut rng);
                    let mut admitted = 0;
                    for step in 0..steps {
                        // Now and then a limit is added or removed.
                        if rng.below(4) == 0 {
                            mask = random_subset(&mut rng);
                        }
                        let limits: Vec<Limit> = (0..pool.len())
                            .filter(|i| mask & (1 << i) != 0)
                            .map(|i| pool[i].clone())
                            .collect();
                        // Bursts (no gap), near-interval gaps and long ones.
                        let gap = match rng.below(4) {
                            0 => 0,
                            1 => rng.below(50),
                            _ => rng.below(400),
                        };
                        std::thread::sleep(Duration::from_millis(gap));
                        let reply = decide_in_redis(&webdis, &key, &limits);
                        let now = reply.now_us * 1_000;
                        let mut tats: Vec<u64> = limits
                            .iter()
                            .map(|l| model.get(&l.name).copied().unwrap_or(0))
                            .collect();
                        let rust = gcra::decide(&limits, &mut tats, now);
                        if rust.allowed {
                            for (limit, tat) in limits.iter().zip(&tats) {
                                model.insert(limit.name.clone(), *tat);
                            }
                        }
                        let context = format!("scenario {scenario} step {step}, limits {limits:?}");
                        assert_eq!(reply.allowed, rust.allowed, "{context}");
                        assert_eq!(
                            reply.retry_after_us * 1_000,
                            rust.retry_after_nanos,
                            "{context}"
                        );
                        let resets: Vec<u64> = rust
                            .states()
                            .iter()
                            .map(|s| s.reset_nanos / 1_000)
                            .collect();
                        assert_eq!(reply.resets_us(), &resets[..], "{context}");
                        // Fields of limits this call did not carry are kept
                        // (Redis may forget the key once every TAT passed).
                        let in_redis = stored(redis, &key);
                        for (name, tat) in &in_redis {
                            assert_eq!(model.get(name), Some(tat), "{context}: {in_redis:?}");
                        }
                        for (name, tat) in model.iter().filter(|(_, tat)| **tat > now) {
                            assert_eq!(in_redis.get(name), Some(tat), "{context}: {in_redis:?}");
                        }
                        // Redis never forgets the key before its latest TAT.
                        let latest = model.values().max().copied().unwrap_or(0);
                        if latest > now {
                            let expire_at: i64 =
                                redis.cli(&["PEXPIRETIME", &key]).trim().parse().unwrap();
                            if expire_at == -2 {
                                // Gone already (a slow machine): only if
                                // Redis's clock has passed the latest TAT.
                                let time = redis.cli(&["TIME"]);
                                let mut parts = time.split_whitespace();
                                let (s, us): (u64, u64) = (
                                    parts.next().unwrap().parse().unwrap(),
                                    parts.next().unwrap().parse().unwrap(),
                                );
                                let redis_now = s * 1_000_000_000 + us * 1_000;
                                assert!(
                                    redis_now >= latest,
                                    "{context}: forgotten at {redis_now} ns, latest TAT {latest} ns"
                                );
                            } else {
                                let expire_at_ns = u64::try_from(expire_at)
                                    .map_err(|_| format!("{context}: no expiry ({expire_at})"))
                                    .unwrap()
                                    * 1_000_000;
                                assert!(
                                    expire_at_ns >= latest,
                                    "{context}: expires at {expire_at} ms, latest TAT {latest} ns"
                                );
                            }
                        }
                        admitted += usize::from(reply.allowed);
                    }
                    // Both outcomes were exercised.
                    assert!(
                        admitted > 0 && admitted < steps,
                        "scenario {scenario}: {admitted} admitted"
                    );
                    steps
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(compared, scenarios * steps);
    // Redis forgets idle keys: every key left has an expiry.
    for key in redis.keys() {
        let ttl: i64 = redis.cli(&["PTTL", &key]).trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}
