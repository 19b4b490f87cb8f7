//! Hashes of API keys.
//!
//! Inside one Envoy nothing secret is at stake (the table is in the proxy's
//! own memory), so a fast non-cryptographic 128-bit hash (XXH3) gives both
//! the fingerprint that identifies a key in its slot and the bits that
//! choose its candidate slots. Keys that leave Envoy (to Redis) are hashed
//! with a keyed cryptographic hash elsewhere.

use xxhash_rust::xxh3::xxh3_128;

/// The identity of a key inside the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash {
    /// Identifies the key in its slot. Two keys share a state only if they
    /// collide on all 64 bits.
    pub fingerprint: u64,
    /// Chooses the key's candidate slots; independent of the fingerprint.
    pub spread: u64,
}

impl KeyHash {
    pub fn of(key: &[u8]) -> KeyHash {
        let h = xxh3_128(key);
        KeyHash {
            fingerprint: h as u64,
            spread: (h >> 64) as u64,
        }
    }

    /// The shared bucket of requests without a key. Real keys are never
    /// empty (an empty value counts as absent), so the empty key's hash is
    /// free for this.
    pub fn anonymous() -> KeyHash {
        KeyHash::of(b"")
    }

    /// The whole 128 bits, for exact-match lookups of configured keys.
    pub fn wide(&self) -> u128 {
        (u128::from(self.spread) << 64) | u128::from(self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keys_get_distinct_identities() {
        let a = KeyHash::of(b"1234");
        let b = KeyHash::of(b"1235");
        assert_ne!(a.fingerprint, b.fingerprint);
        assert_ne!(a.spread, b.spread);
        assert_eq!(a, KeyHash::of(b"1234"));
        assert_ne!(KeyHash::anonymous(), KeyHash::of(b" "));
        assert_eq!(
            KeyHash::of(b"x").wide() as u64,
            KeyHash::of(b"x").fingerprint
        );
    }
}
