//! Which state an admin call acts on, found from the key its path names.
//!
//! A plain key leads where a request carrying it leads. A `sha256:` key
//! leads there too when the configuration lists that key in plain (its
//! digest finds it). Otherwise only the digest is known, and it addresses
//! the key's state only where the state is named by it: in global mode
//! without `key_hash_secret`, whose Redis key is the prefix and the hex
//! SHA-256 of the key. With a secret the Redis key is an HMAC of the plain
//! key, and local slots are chosen by a secret-keyed SipHash of it: neither
//! can be computed from the digest, so such a call is refused (400).

use crate::admin::KeyName;
use crate::config::StoreConfig;
use crate::hash::KeyHash;
use crate::policy::Policy;
use crate::response::{detail_reply, LocalReply};

/// An admin call's key, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The key's SHA-256, which the log names.
    pub digest: [u8; 32],
    /// The key's plan, as a request carrying it would get it.
    pub plan: u16,
    /// The plain key and its hash, when known. `None` only in global mode
    /// without a secret, where the digest names the Redis key.
    pub plain: Option<(Vec<u8>, KeyHash)>,
}

/// Where `name` leads under `policy`: 404 for a key no plan lists under
/// `unknown_keys: reject`, 400 for a digest whose state cannot be found.
pub fn target(policy: &Policy, name: KeyName) -> Result<Target, LocalReply> {
    let digest = name.digest();
    let key = match name {
        KeyName::Plain(key) => key,
        KeyName::Sha256(_) => match policy.digest_plan(&digest).ok_or_else(unknown)? {
            (_, Some(listed)) => listed.to_vec(),
            (plan, None) => {
                addressable_by_digest(policy)?;
                return Ok(Target {
                    digest,
                    plan,
                    plain: None,
                });
            }
        },
    };
    let (hash, plan) = policy.key_plan(&key).ok_or_else(unknown)?;
    Ok(Target {
        digest,
        plan,
        plain: Some((key, hash)),
    })
}

fn unknown() -> LocalReply {
    detail_reply(404, "This key is not registered.")
}

/// `Ok` when the store names a key's state by its SHA-256; else the 400
/// that says why not and what to send instead.
fn addressable_by_digest(policy: &Policy) -> Result<(), LocalReply> {
    let why = match &policy.store {
        StoreConfig::Webdis(w) if w.key_hash_secret.is_none() => return Ok(()),
        StoreConfig::Webdis(_) => {
            "with store.webdis.key_hash_secret its Redis key is an HMAC of the plain key"
        }
        StoreConfig::Local(_) => "local slots are chosen by a keyed hash of the plain key",
    };
    Err(detail_reply(
        400,
        &format!(
            "A sha256: key cannot address this key's state: {why}. Send the plain key instead, percent-encoded: /keys/<key>."
        ),
    ))
}
