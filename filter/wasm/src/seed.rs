//! The process's secret for key hashes (see `ratelimit_core::hash`): drawn
//! once per Envoy process and kept in shared data, so every worker's VM, and
//! a VM restarted after a failure, hash keys the same way.
//!
//! Creating a shared-data key is not CAS-protected, so two VMs configuring
//! at the same instant could each store a seed of their own; each then
//! re-reads the stored one and adopts it, and [`refresh`] (on the root's
//! tick) makes any VM that still holds another seed adopt the stored one.
//! In Envoy the main thread configures the plugin before the workers do, so
//! in practice the workers only ever read.

use ratelimit_core::hash::{KeyHasher, SEED_LEN};

use crate::host::{self, Status};

/// The stored seed, creating it if there is none.
pub fn load_or_create(key: &[u8]) -> Result<KeyHasher, String> {
    let fail = |what: &str, status: Status| format!("{what} (host status {})", status.0);
    let current = host::get_shared_data(key).map_err(|s| fail("cannot read the hash seed", s))?;
    if let Some(hasher) = current
        .as_ref()
        .and_then(|(bytes, _)| KeyHasher::from_bytes(bytes))
    {
        return Ok(hasher);
    }
    let seed: [u8; SEED_LEN] =
        host::random_bytes().map_err(|s| fail("no randomness for the hash seed", s))?;
    let cas = current.map_or(0, |(_, cas)| cas);
    match host::set_shared_data(key, &seed, cas) {
        Ok(()) | Err(host::CAS_MISMATCH) => {}
        Err(status) => return Err(fail("cannot store the hash seed", status)),
    }
    stored(key)?.ok_or_else(|| "the stored hash seed is not 16 bytes".to_string())
}

/// The stored seed, if it differs from the one in use.
pub fn refresh(key: &[u8], in_use: KeyHasher) -> Option<KeyHasher> {
    stored(key)
        .ok()
        .flatten()
        .filter(|stored| *stored != in_use)
}

fn stored(key: &[u8]) -> Result<Option<KeyHasher>, String> {
    let value = host::get_shared_data(key)
        .map_err(|s| format!("cannot read the hash seed (host status {})", s.0))?;
    Ok(value.and_then(|(bytes, _)| KeyHasher::from_bytes(&bytes)))
}
