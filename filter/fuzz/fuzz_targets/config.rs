//! The config parser: arbitrary bytes through `Policy::from_json`.
//!
//! Checks, beyond "no panic": parsing is deterministic; an error names what
//! is wrong; an accepted policy keeps every documented bound, and what the
//! hot path builds from it (identify, webdis paths) stays well-formed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::applied::Applied;
use ratelimit_core::batch::wire::{self, Entry};
use ratelimit_core::config::StoreConfig;
use ratelimit_core::header_map::HeaderMap;
use ratelimit_core::per_limit::MAX_LIMITS;
use ratelimit_core::policy::{Identity, MAX_KEY_LENGTH};
use ratelimit_core::rate::{MAX_COUNT, MAX_PER_SECOND, MAX_WINDOW_SECONDS};
use ratelimit_core::Policy;

/// A plan's limits, gathered.
struct Set {
    limits: Vec<ratelimit_core::gcra::Limit>,
}

fuzz_target!(|data: &[u8]| {
    let policy = match Policy::from_json(data) {
        Err(error) => {
            assert!(!error.message.is_empty(), "an error without a message");
            assert_eq!(
                Policy::from_json(data).err(),
                Some(error),
                "not deterministic"
            );
            return;
        }
        Ok(policy) => policy,
    };
    assert!(Policy::from_json(data).is_ok(), "not deterministic");

    assert!((1..=8).contains(&policy.sources.len()));
    assert!((1..=MAX_KEY_LENGTH).contains(&policy.max_key_length));
    assert!(!policy.plans.is_empty(), "no default plan");
    assert_eq!(
        policy.slot_table().is_some(),
        matches!(policy.store, StoreConfig::Local(_))
    );
    assert_eq!(
        policy.webdis().is_some(),
        matches!(policy.store, StoreConfig::Webdis(_))
    );

    for (index, plan) in policy.plans.iter().enumerate() {
        let limits: Vec<_> = plan
            .limits
            .iter()
            .map(|i| {
                *policy
                    .instance(*i)
                    .expect("a plan names a limit that exists")
            })
            .collect();
        let set = Set { limits };
        assert!(set.limits.len() <= MAX_LIMITS);
        for (i, limit) in set.limits.iter().enumerate() {
            let rate = limit.rate;
            assert!((1..=MAX_COUNT).contains(&rate.count));
            assert!((1..=MAX_WINDOW_SECONDS).contains(&rate.window_seconds));
            assert!(rate.count <= rate.window_seconds * MAX_PER_SECOND);
            assert!((1..=MAX_COUNT).contains(&limit.burst));
            // The algorithm works in whole microseconds (as Redis does).
            assert!(limit.interval_nanos >= 1_000 && limit.interval_nanos % 1_000 == 0);
            assert_eq!(
                limit.interval_nanos.checked_mul(limit.burst),
                Some(limit.capacity_nanos)
            );
            assert!(!limit.name.as_str().is_empty());
            assert!(
                set.limits
                    .iter()
                    .skip(i + 1)
                    .all(|other| other.name != limit.name),
                "two limits named {:?} in one set",
                limit.name
            );
        }
        // webdis reads '.', '+' and ' ' in a path specially: none may appear
        // in a call for this set (here a batch of one key, one request).
        let redis_key = "apikey_ratelimit:k";
        let path = wire::path(
            wire::NONCE_LIMIT - 1,
            &[Entry {
                redis_key,
                applied: Applied {
                    plan: index as u16,
                    ..Applied::default()
                },
                limits: &set.limits,
                count: 1,
            }],
        );
        assert!(path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'.' && b != b'+'));
        // The queue sizes calls by these estimates: they must bound the path.
        let estimate =
            wire::FIXED_BYTES + wire::set_bytes(&set.limits) + wire::entry_bytes(redis_key);
        assert!(path.len() <= estimate, "{} > {estimate}", path.len());
    }

    // A request with no headers at all carries no key.
    match policy.identify(&HeaderMap::empty()) {
        Identity::Anonymous { plan, .. } => assert!(policy.plans.get(usize::from(plan)).is_some()),
        Identity::MissingAllowed | Identity::MissingRejected => {}
        other => panic!("an empty request identified as {other:?}"),
    }
});
