//! Hashes of API keys.
//!
//! A key's hash chooses its candidate slots in the local table and its
//! entry in the deny cache, and its fingerprint identifies it there. Were
//! that hash public, a client could grind keys offline whose slots collide
//! with a chosen key and push it around the table. So it is keyed: SipHash-1-3
//! (the hash Rust's own `HashMap` uses against flooding) with 128 bits of
//! output under a 128-bit secret that the filter draws at random once per
//! Envoy process and keeps in shared data, so every worker and a restarted
//! VM use the same one. Keys that leave Envoy (to Redis) are hashed with
//! SHA-256 or HMAC elsewhere; configured overrides are matched exactly.

use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

/// The identity of a key inside the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash {
    /// Identifies the key in its slot. Two keys share a state only if they
    /// collide on all 64 bits.
    pub fingerprint: u64,
    /// Chooses the key's candidate slots; independent of the fingerprint.
    pub spread: u64,
}

/// The secret-keyed hash that turns keys into [`KeyHash`]es.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHasher {
    k0: u64,
    k1: u64,
}

/// The length of a seed, in bytes.
pub const SEED_LEN: usize = 16;

impl KeyHasher {
    /// Keyed by a secret drawn at random (see the module docs).
    pub fn new(seed: [u8; SEED_LEN]) -> KeyHasher {
        let (k0, k1) = seed.split_at(SEED_LEN / 2);
        KeyHasher {
            k0: u64::from_le_bytes(k0.try_into().unwrap_or([0; 8])),
            k1: u64::from_le_bytes(k1.try_into().unwrap_or([0; 8])),
        }
    }

    /// A seed read back from the host, if it is one.
    pub fn from_bytes(bytes: &[u8]) -> Option<KeyHasher> {
        let seed: [u8; SEED_LEN] = bytes.try_into().ok()?;
        Some(KeyHasher::new(seed))
    }

    /// The hasher a policy starts with, before the filter seeds it: a fixed,
    /// public key, as good as unkeyed. Only tests and the seed-less path of
    /// a host that cannot store one use it.
    pub const fn unseeded() -> KeyHasher {
        KeyHasher { k0: 0, k1: 0 }
    }

    pub fn hash(&self, key: &[u8]) -> KeyHash {
        let mut hasher = SipHasher13::new_with_keys(self.k0, self.k1);
        hasher.write(key);
        let h = hasher.finish128();
        KeyHash {
            fingerprint: h.h1,
            spread: h.h2,
        }
    }

    /// The shared bucket of requests without a key. Real keys are never
    /// empty (an empty value counts as absent), so the empty key's hash is
    /// free for this.
    pub fn anonymous(&self) -> KeyHash {
        self.hash(b"")
    }
}

impl Default for KeyHasher {
    fn default() -> KeyHasher {
        KeyHasher::unseeded()
    }
}

/// A stable, unkeyed hash of a configured name (a limit, a plugin): names
/// are configuration, not client input, and must hash the same in every
/// process and release.
pub fn name_hash(name: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name)
}

/// The 32 bytes of 64 hex digits (either case; nothing else, not even a
/// sign, which `u8::from_str_radix` would take): a `sha256:` key or token.
pub fn parse_sha256(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [high, low] = pair else { return None };
        *byte = hex_byte(*high, *low)?;
    }
    Some(out)
}

/// The byte two hex digits spell (either case; nothing else).
pub fn hex_byte(high: u8, low: u8) -> Option<u8> {
    let nibble = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    Some((nibble(high)? << 4) | nibble(low)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::key_hash;

    #[test]
    fn distinct_keys_get_distinct_identities() {
        let a = key_hash(b"1234");
        let b = key_hash(b"1235");
        assert_ne!(a.fingerprint, b.fingerprint);
        assert_ne!(a.spread, b.spread);
        assert_eq!(a, key_hash(b"1234"));
        assert_ne!(KeyHasher::unseeded().anonymous(), key_hash(b" "));
    }

    #[test]
    fn the_seed_changes_every_key_s_identity() {
        let seeded = KeyHasher::new(*b"0123456789abcdef");
        assert_ne!(seeded.hash(b"1234"), key_hash(b"1234"));
        assert_eq!(seeded.hash(b"1234"), seeded.hash(b"1234"));
        let other = KeyHasher::new(*b"0123456789abcdeg");
        assert_ne!(seeded.hash(b"1234"), other.hash(b"1234"));
        assert_eq!(KeyHasher::from_bytes(b"0123456789abcdef"), Some(seeded));
        assert_eq!(KeyHasher::from_bytes(b"short"), None);
    }

    #[test]
    fn a_digest_is_64_hex_digits_and_nothing_else() {
        let digest = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4";
        assert!(parse_sha256(digest.as_bytes()).is_some());
        assert_eq!(
            parse_sha256(digest.to_uppercase().as_bytes()),
            parse_sha256(digest.as_bytes())
        );
        let signed = format!("+3{}", &digest[2..]);
        for bad in [
            &digest[..62],
            "",
            signed.as_str(),
            &format!("g{}", &digest[1..]),
        ] {
            assert_eq!(parse_sha256(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(hex_byte(b'+', b'1'), None);
        assert_eq!(hex_byte(b'f', b'F'), Some(0xff));
    }
}
