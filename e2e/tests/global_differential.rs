//! The Lua script in a real Redis and the Rust algorithm decide alike.
//!
//! Random limit sets and random request timings go to the real script
//! through webdis (the filter's own URLs and reply parser); the Rust GCRA
//! is run on the same sequence at the times Redis reports, and every
//! decision, retry time and per-limit reset must be identical.

use std::time::Duration;

use e2e::http;
use e2e::topology::Backend;
use ratelimit_core::gcra::{self, Limit};
use ratelimit_core::rate::Rate;
use ratelimit_core::webdis::{self, Command, Parsed, Reply};

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

fn random_limits(rng: &mut Rng) -> Vec<Limit> {
    let n = 1 + rng.below(3) as usize;
    (0..n)
        .map(|i| {
            let count = 1 + rng.below(6);
            let window_seconds = [1, 1, 2, 3][rng.below(4) as usize];
            let burst = 1 + rng.below(count + 2);
            Limit::new(
                format!("l{i}"),
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

fn call(webdis: &str, command: Command, key: &str, limits: &[Limit]) -> Parsed {
    let path = webdis::request_path(command, key, limits);
    let r = http::get(webdis, &path).unwrap();
    webdis::parse_reply(Some(u32::from(r.status)), &r.body, limits.len())
}

fn decide_in_redis(webdis: &str, key: &str, limits: &[Limit]) -> Reply {
    match call(webdis, Command::EvalSha, key, limits) {
        Parsed::Decided(reply) => reply,
        Parsed::NoScript => match call(webdis, Command::Eval, key, limits) {
            Parsed::Decided(reply) => reply,
            other => panic!("EVAL: {other:?}"),
        },
        Parsed::Failed(e) => panic!("{e:?}"),
    }
}

#[test]
fn lua_in_redis_and_rust_decide_alike_on_random_sequences() {
    let backend = Backend::start();
    let webdis = backend.webdis.addr();
    let scenarios = 8;
    let compared: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..scenarios)
            .map(|scenario| {
                let webdis = webdis.clone();
                s.spawn(move || {
                    let mut rng =
                        Rng(0x9E37_79B9_7F4A_7C15 ^ ((scenario as u64 + 1) * 0x1000_0001));
                    let limits = random_limits(&mut rng);
                    let key = format!("apikey_ratelimit:differential-{scenario}");
                    let mut tats = vec![0u64; limits.len()];
                    let mut admitted = 0;
                    for step in 0..40 {
                        // Bursts (no gap), near-interval gaps and long ones.
                        let gap = match rng.below(4) {
                            0 => 0,
                            1 => rng.below(50),
                            _ => rng.below(400),
                        };
                        std::thread::sleep(Duration::from_millis(gap));
                        let reply = decide_in_redis(&webdis, &key, &limits);
                        let now = reply.now_us * 1_000;
                        let rust = gcra::decide(&limits, &mut tats, now);
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
                        admitted += usize::from(reply.allowed);
                    }
                    // Both outcomes were exercised.
                    assert!(
                        admitted > 0 && admitted < 40,
                        "scenario {scenario}: {admitted} admitted"
                    );
                    40
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(compared, scenarios * 40);
    // Redis forgets idle keys: every key left has an expiry.
    for key in backend.redis.keys() {
        let ttl: i64 = backend.redis.cli(&["PTTL", &key]).trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}
