//! The key registry: which plan a key is on, by plain key or by the SHA-256
//! of it. Built once at load; a lookup is one hash-map probe per form used
//! (SHA-256 of the key only when some key was registered that way).
//!
//! SHA-256 is the costliest computation of a request (about 2.4 µs of
//! Envoy CPU in `make bench`, docs/bench/policies.md), so the answers it
//! leads to are remembered in [`Recent`], a small table of recently seen
//! keys: a key seen again is found there by its bytes.

use std::cell::RefCell;
use std::collections::HashMap;

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::config::ConfigError;

#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Plain keys by 128-bit hash, with the key to confirm a match.
    plain: HashMap<u128, (Box<[u8]>, u16)>,
    /// `sha256:` keys, and the digests of the plain ones (to refuse a key
    /// listed twice, in either form).
    digests: HashMap<[u8; 32], Origin>,
    recent: Recent,
}

/// Entries of [`Recent`]: at most this many keys are remembered...
const RECENT_ENTRIES: usize = 4096;
/// ...each of at most this many bytes (longer keys are always hashed), so
/// the table stays under 1 MB however keys are shaped.
const RECENT_KEY_MAX: usize = 128;

/// Keys whose SHA-256 was looked up lately, and what it found (a plan, or
/// none). Direct-mapped by the key's secret-keyed hash (`spread`), so no
/// client can aim keys at one entry; an entry answers only for the very
/// same bytes, so a hit is exact, and an eviction only costs the hash
/// again. Per VM, single-threaded: a `RefCell` that a lookup borrows once.
#[derive(Debug, Clone, Default)]
struct Recent {
    entries: RefCell<Vec<RecentKey>>,
}

#[derive(Debug, Clone, Default)]
struct RecentKey {
    key: Vec<u8>,
    plan: Option<u16>,
}

impl Recent {
    fn slot(spread: u64) -> usize {
        usize::try_from(spread % RECENT_ENTRIES as u64).unwrap_or(0)
    }

    /// `Some(answer)` if `key` was looked up lately. (An unused entry is
    /// empty, and so is no key.)
    fn get(&self, key: &[u8], spread: u64) -> Option<Option<u16>> {
        let entries = self.entries.try_borrow().ok()?;
        let entry = entries.get(Self::slot(spread))?;
        (!key.is_empty() && entry.key == key).then_some(entry.plan)
    }

    fn put(&self, key: &[u8], spread: u64, plan: Option<u16>) {
        if key.is_empty() || key.len() > RECENT_KEY_MAX {
            return;
        }
        let Ok(mut entries) = self.entries.try_borrow_mut() else {
            return;
        };
        if entries.is_empty() {
            entries.resize_with(RECENT_ENTRIES, RecentKey::default);
        }
        if let Some(entry) = entries.get_mut(Self::slot(spread)) {
            entry.key.clear();
            entry.key.extend_from_slice(key);
            entry.plan = plan;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Origin {
    plan: u16,
    hashed: bool,
}

impl Registry {
    /// Registers `text` (a key, or `sha256:<64 hex digits>`) on `plan`;
    /// `field` names it in errors, `first` says where a duplicate was.
    pub fn add(
        &mut self,
        field: &str,
        text: &str,
        plan: u16,
        max_key_length: usize,
    ) -> Result<(), ConfigError> {
        let (digest, hashed) = match text.strip_prefix("sha256:") {
            Some(hex) => (
                crate::hash::parse_sha256(hex.as_bytes()).ok_or_else(|| {
                    ConfigError::new(
                        field,
                        "a \"sha256:\" key must be followed by 64 hexadecimal digits",
                    )
                })?,
                true,
            ),
            None => {
                let key = text.as_bytes();
                if key.is_empty() || key.len() > max_key_length {
                    return Err(ConfigError::new(
                        field,
                        format!(
                            "must be 1 to {max_key_length} bytes (max_key_length), or \"sha256:<hex>\""
                        ),
                    ));
                }
                (Sha256::digest(key).into(), false)
            }
        };
        if self.digests.contains_key(&digest) {
            return Err(ConfigError::new(
                field,
                "this key is listed twice (as plain text or \"sha256:\"); a key is on one plan",
            ));
        }
        self.digests.insert(digest, Origin { plan, hashed });
        if !hashed {
            let key = text.as_bytes();
            self.plain.insert(xxh3_128(key), (key.into(), plan));
        }
        Ok(())
    }

    /// The plan `key` is registered on; `spread` is its secret-keyed hash
    /// (`KeyHash::spread`), which places it in the table of recent keys.
    pub fn plan_of(&self, key: &[u8], spread: u64) -> Option<u16> {
        if !self.plain.is_empty() {
            if let Some((stored, plan)) = self.plain.get(&xxh3_128(key)) {
                if **stored == *key {
                    return Some(*plan);
                }
            }
        }
        if self.digests.len() > self.plain.len() {
            if let Some(answer) = self.recent.get(key, spread) {
                return answer;
            }
            let digest: [u8; 32] = Sha256::digest(key).into();
            let plan = self
                .digests
                .get(&digest)
                .filter(|o| o.hashed)
                .map(|o| o.plan);
            self.recent.put(key, spread, plan);
            return plan;
        }
        None
    }

    /// The plan of the key whose SHA-256 is `digest`, and the key itself
    /// when it is listed in plain. For the admin API only: the plan is one
    /// probe of `digests` (kept anyway, to refuse duplicates), but a plain
    /// key is found by hashing the plain keys until one matches, so that
    /// the data path pays nothing, neither per request nor in memory.
    pub fn by_digest(&self, digest: &[u8; 32]) -> Option<(u16, Option<&[u8]>)> {
        let origin = self.digests.get(digest)?;
        if origin.hashed {
            return Some((origin.plan, None));
        }
        let key = self
            .plain
            .values()
            .map(|(key, _)| &**key)
            .find(|key| <[u8; 32]>::from(Sha256::digest(key)) == *digest);
        Some((origin.plan, key))
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_plain_text_or_digest_and_listed_once() {
        let digest = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"; // "1234"
        let mut r = Registry::default();
        r.add("k[0]", "gold", 1, 64).unwrap();
        r.add("k[1]", &format!("sha256:{}", digest.to_uppercase()), 2, 64)
            .unwrap();
        assert_eq!(r.plan_of(b"gold", 0), Some(1));
        assert_eq!(r.plan_of(b"1234", 0), Some(2));
        assert_eq!(r.plan_of(b"other", 0), None);
        assert_eq!(r.add("k[2]", "1234", 1, 64).unwrap_err().field, "k[2]");
        let gold = hex(&Sha256::digest(b"gold"));
        assert!(r.add("k[3]", &format!("sha256:{gold}"), 1, 64).is_err());
        assert!(r.add("k[4]", "sha256:abc", 1, 64).is_err());
        assert!(r.add("k[5]", "", 1, 64).is_err());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_digest_finds_its_plan_and_a_plain_key_too() {
        let mut r = Registry::default();
        r.add("k[0]", "gold", 1, 64).unwrap();
        r.add("k[1]", &format!("sha256:{}", sha256_hex(b"1234")), 2, 64)
            .unwrap();
        let digest = |key: &[u8]| -> [u8; 32] { Sha256::digest(key).into() };
        assert_eq!(r.by_digest(&digest(b"gold")), Some((1, Some(&b"gold"[..]))));
        assert_eq!(r.by_digest(&digest(b"1234")), Some((2, None)));
        assert_eq!(r.by_digest(&digest(b"other")), None);
    }

    #[test]
    fn a_hundred_thousand_hashed_keys_load_and_are_found() {
        let mut r = Registry::default();
        for i in 0..100_000u32 {
            let digest = hex(&Sha256::digest(format!("key-{i}").as_bytes()));
            r.add("keys", &format!("sha256:{digest}"), (i % 3) as u16, 64)
                .unwrap();
        }
        assert_eq!(r.plan_of(b"key-99999", 7), Some((99_999 % 3) as u16));
        assert_eq!(r.plan_of(b"key-100000", 8), None);
    }

    fn hashed(keys: &[(&str, u16)]) -> Registry {
        let mut r = Registry::default();
        for (i, (key, plan)) in keys.iter().enumerate() {
            let digest = hex(&Sha256::digest(key.as_bytes()));
            r.add(&format!("k[{i}]"), &format!("sha256:{digest}"), *plan, 64)
                .unwrap();
        }
        r
    }

    #[test]
    fn a_key_seen_again_gets_the_same_answer_and_no_other_key_gets_it() {
        let r = hashed(&[("gold-key", 1), ("silver-key", 2)]);
        // Every key on one entry of the recent table: each evicts the last,
        // and none is ever answered with another's plan.
        for round in 0..3 {
            for (key, want) in [
                (&b"gold-key"[..], Some(1)),
                (b"silver-key", Some(2)),
                (b"unknown", None),
                (b"gold-key\0", None),
                (b"gold-ke", None),
            ] {
                assert_eq!(r.plan_of(key, 42), want, "round {round}: {key:?}");
                assert_eq!(r.recent.get(key, 42), Some(want), "remembered: {key:?}");
            }
        }
        // A key remembered in one place is not found from another.
        assert_eq!(r.recent.get(b"gold-key", 43), None);
        assert_eq!(r.plan_of(b"gold-key", 43), Some(1));
        assert_eq!(r.recent.get(b"", 44), None);
    }

    #[test]
    fn long_keys_are_hashed_every_time_and_the_table_stays_bounded() {
        let r = hashed(&[("k", 1)]);
        let long = vec![b'a'; RECENT_KEY_MAX + 1];
        assert_eq!(r.plan_of(&long, 1), None);
        assert_eq!(r.recent.get(&long, 1), None);
        for i in 0..(2 * RECENT_ENTRIES as u64) {
            r.plan_of(format!("key-{i}").as_bytes(), i);
        }
        let entries = r.recent.entries.borrow();
        assert_eq!(entries.len(), RECENT_ENTRIES);
        assert!(entries.iter().all(|e| e.key.len() <= RECENT_KEY_MAX));
    }

    #[test]
    fn plain_keys_never_fill_the_recent_table() {
        let mut r = Registry::default();
        r.add("k[0]", "plain-key", 1, 64).unwrap();
        assert_eq!(r.plan_of(b"plain-key", 5), Some(1));
        assert_eq!(r.plan_of(b"other", 5), None);
        assert!(r.recent.entries.borrow().is_empty());
    }

    fn sha256_hex(key: &[u8]) -> String {
        hex(&Sha256::digest(key))
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
