//! Key extraction: arbitrary `:path` and headers through `Policy::identify`
//! for a few fixed policies (query and header sources, a prefix, overrides,
//! each `missing_key` choice).
//!
//! Input: the first byte picks the policy; the rest is split on '\n' into
//! the `:path` value, then header lines `name:value` (split at the first ':'
//! after the name's first byte, so `:path:/x` is a second `:path`).
//!
//! Checks: identify is deterministic; a key is non-empty, within
//! `max_key_length` and UTF-8; the key, percent-encoded into a query
//! source (or sent as an unprefixed header), is identified again as the
//! same key with the same limits; an error names a configured source; a
//! missing key follows the policy's `missing_key`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ratelimit_core::config::MissingKey;
use ratelimit_core::header_map::{serialize, HeaderMap};
use ratelimit_core::key::{KeyError, KeySource};
use ratelimit_core::policy::Identity;
use ratelimit_core::webdis::encode_into;
use ratelimit_core::Policy;

const POLICIES: [&str; 3] = [
    // The defaults: ?api_key= then x-api-key, a missing key is a 401.
    r#"{"limits": ["1/s"]}"#,
    // A prefixed header first, a short cap, overrides, one anonymous bucket.
    r#"{"limits": ["10/s", "1000/d"], "max_key_length": 16, "missing_key": "anonymous",
        "key_sources": [{"header": "authorization", "prefix": "Api-Key "}, {"query": "key"}],
        "overrides": [{"key": "gold", "limits": []},
                      {"key": "sha256:03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4",
                       "limits": ["100/s"]}]}"#,
    // A parameter name that must be decoded to match, the longest cap.
    r#"{"limits": ["1/m"], "max_key_length": 4096, "missing_key": "allow",
        "key_sources": [{"query": "api key"}, {"header": "x-api-key"}]}"#,
];

fn policies() -> &'static [Policy] {
    // A policy is not `Sync` (the filter runs one per VM thread); libFuzzer
    // runs the target on one thread, so one leaked copy per thread will do.
    thread_local! {
        static COMPILED: &'static [Policy] = Box::leak(
            POLICIES
                .iter()
                .map(|json| Policy::from_json(json.as_bytes()).expect("a fixed fuzz policy"))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
    }
    COMPILED.with(|policies| *policies)
}

/// The key and limit set a request is identified with, if it has a key.
fn identified_key(policy: &Policy, pairs: &[(&[u8], &[u8])]) -> Option<(Vec<u8>, u16)> {
    let bytes = serialize(pairs);
    let map = HeaderMap::parse(&bytes).expect("serialize makes a valid map");
    match policy.identify(&map) {
        Identity::Key { key, plan, .. } => Some((key.into_owned(), plan)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let policy = &policies()[usize::from(pick) % POLICIES.len()];
    let mut lines = rest.split(|b| *b == b'\n');
    let mut pairs: Vec<(&[u8], &[u8])> = vec![(b":path", lines.next().unwrap_or_default())];
    for line in lines {
        let split = line
            .iter()
            .skip(1)
            .position(|b| *b == b':')
            .map_or(line.len(), |at| at + 1);
        let (name, value) = line.split_at(split);
        pairs.push((name, value.get(1..).unwrap_or_default()));
    }
    let bytes = serialize(&pairs);
    let map = HeaderMap::parse(&bytes).expect("serialize makes a valid map");
    let identity = policy.identify(&map);
    assert_eq!(identity, policy.identify(&map), "not deterministic");

    match identity {
        Identity::Key { key, hash, plan } => {
            assert!(!key.is_empty(), "an empty key");
            assert!(key.len() <= policy.max_key_length, "a key over the cap");
            assert!(std::str::from_utf8(&key).is_ok(), "a key that is not UTF-8");
            let on = policy.plans.get(usize::from(plan));
            assert!(on.is_some(), "a plan that does not exist");
            if key.as_ref() == b"gold" && policy.max_key_length == 16 {
                assert!(
                    on.is_some_and(|p| p.limits.is_empty()),
                    "the override was missed"
                );
            }
            // The same key, sent alone in each plain source, is the same key.
            for source in &policy.sources {
                let (name, value) = match source {
                    KeySource::Query { name } => {
                        let mut path = String::from("/?");
                        encode_into(&mut path, name.as_bytes());
                        path.push('=');
                        encode_into(&mut path, &key);
                        (b":path".to_vec(), path.into_bytes())
                    }
                    KeySource::Header { name, prefix: None } => {
                        (name.as_bytes().to_vec(), key.to_vec())
                    }
                    KeySource::Header {
                        prefix: Some(_), ..
                    } => continue,
                };
                let again = identified_key(policy, &[(&name, &value)]);
                assert_eq!(again, Some((key.to_vec(), plan)), "{source:?} lost the key");
            }
            let same = policy.identify(&map);
            assert!(matches!(same, Identity::Key { hash: h, .. } if h == hash));
        }
        Identity::Invalid(error) => {
            let sources = policy.sources.len();
            match error {
                KeyError::Source { source, .. } => {
                    assert!(source < sources, "an error naming no source")
                }
                KeyError::Conflict { first, second } => assert!(
                    first < second && second < sources,
                    "a conflict naming sources {first} and {second} of {sources}"
                ),
            }
        }
        Identity::Anonymous { plan, .. } => {
            assert_eq!(policy.missing_key, MissingKey::Anonymous);
            assert!(policy.plans.get(usize::from(plan)).is_some());
        }
        Identity::Unknown => panic!("no fuzzed policy rejects unknown keys"),
        Identity::MissingAllowed => assert_eq!(policy.missing_key, MissingKey::Allow),
        Identity::MissingRejected => assert_eq!(policy.missing_key, MissingKey::Reject),
    }
});
