//! The key registry: which plan a key is on, by plain key or by the SHA-256
//! of it. Built once at load; a lookup is one hash-map probe per form used
//! (SHA-256 of the key only when some key was registered that way).

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
                parse_sha256(hex).ok_or_else(|| {
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

    /// The plan `key` is registered on.
    pub fn plan_of(&self, key: &[u8]) -> Option<u16> {
        if !self.plain.is_empty() {
            if let Some((stored, plan)) = self.plain.get(&xxh3_128(key)) {
                if **stored == *key {
                    return Some(*plan);
                }
            }
        }
        if self.digests.len() > self.plain.len() {
            let digest: [u8; 32] = Sha256::digest(key).into();
            if let Some(origin) = self.digests.get(&digest).filter(|o| o.hashed) {
                return Some(origin.plan);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
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
        assert_eq!(r.plan_of(b"gold"), Some(1));
        assert_eq!(r.plan_of(b"1234"), Some(2));
        assert_eq!(r.plan_of(b"other"), None);
        assert_eq!(r.add("k[2]", "1234", 1, 64).unwrap_err().field, "k[2]");
        let gold = hex(&Sha256::digest(b"gold"));
        assert!(r.add("k[3]", &format!("sha256:{gold}"), 1, 64).is_err());
        assert!(r.add("k[4]", "sha256:abc", 1, 64).is_err());
        assert!(r.add("k[5]", "", 1, 64).is_err());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_hundred_thousand_hashed_keys_load_and_are_found() {
        let mut r = Registry::default();
        for i in 0..100_000u32 {
            let digest = hex(&Sha256::digest(format!("key-{i}").as_bytes()));
            r.add("keys", &format!("sha256:{digest}"), (i % 3) as u16, 64)
                .unwrap();
        }
        assert_eq!(r.plan_of(b"key-99999"), Some((99_999 % 3) as u16));
        assert_eq!(r.plan_of(b"key-100000"), None);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
