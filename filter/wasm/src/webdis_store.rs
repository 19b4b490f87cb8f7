//! The global store: batch calls of the Redis function through webdis
//! (`ratelimit_core::batch` builds and reads them), and the "denied until"
//! cache in shared data (`ratelimit_core::deny_cache`). The calls
//! themselves are sent and answered by the root context (`callouts.rs`).

use std::time::Duration;

use ratelimit_core::admin::epoch;
use ratelimit_core::batch::wire::NONCE_LIMIT;
use ratelimit_core::batch::{self, queue::Settings, wire_plans};
use ratelimit_core::config::WebdisStoreConfig;
use ratelimit_core::deny_cache;
use ratelimit_core::gcra::{Decision, Limit};
use ratelimit_core::hash::KeyHash;
use ratelimit_core::pipeline::Subject;
use ratelimit_core::state::MAX_VALUE;
use ratelimit_core::webdis;

use crate::host::{self, Status};

/// A fresh nonce for one call (`fallback` if the host has no randomness):
/// every worker's calls share webdis, whose replies must be told apart.
pub fn call_nonce(fallback: u64) -> u64 {
    host::random_bytes::<8>()
        .map(u64::from_le_bytes)
        .unwrap_or(fallback)
        % NONCE_LIMIT
}
use crate::shared_store::{table_prefix, with_slot_key};

pub struct WebdisStore {
    cluster: String,
    authority: String,
    batch: Settings,
    key_prefix: String,
    secret: Option<Vec<u8>>,
    cache_slots: u32,
    cache_prefix: Vec<u8>,
    /// The admin epoch's Redis key (`ratelimit_core::admin::epoch`).
    epoch_key: String,
    admin_sync_ms: u32,
}

impl WebdisStore {
    pub fn new(config: &WebdisStoreConfig, plugin_name: &str) -> WebdisStore {
        let key_prefix = config
            .key_prefix
            .clone()
            .unwrap_or_else(|| webdis::default_key_prefix(plugin_name));
        WebdisStore {
            cluster: config.cluster.clone(),
            authority: config
                .authority
                .clone()
                .unwrap_or_else(|| config.cluster.clone()),
            batch: batch::settings(config),
            // Computed once here, not per request.
            epoch_key: epoch::key(&key_prefix),
            key_prefix,
            secret: config
                .key_hash_secret
                .as_ref()
                .map(|s| s.as_bytes().to_vec()),
            cache_slots: config.cache_slots,
            cache_prefix: table_prefix(plugin_name, "deny"),
            admin_sync_ms: config.admin_sync_ms,
        }
    }

    /// The Redis key the admin function counts resets and grants in, and
    /// workers poll.
    pub fn epoch_key(&self) -> &str {
        &self.epoch_key
    }

    /// How often a worker polls the admin epoch (0: never).
    pub fn admin_sync_ms(&self) -> u32 {
        self.admin_sync_ms
    }

    /// The bounds of a worker's queue and calls.
    pub fn batch_settings(&self) -> Settings {
        self.batch
    }

    /// The whole `timeout_ms`, for a call that decides no waiting request
    /// (an admin call, the epoch poll, settlements).
    pub fn call_timeout_ms(&self) -> u32 {
        u32::try_from(self.batch.timeout_nanos / 1_000_000).unwrap_or(u32::MAX)
    }

    /// The failure of a call Envoy refused outright.
    pub fn refused(&self, status: Status) -> webdis::BackendError {
        webdis::BackendError::dispatch(format!(
            "Envoy refused the call to cluster '{}' (host status {}): is the cluster defined?",
            self.cluster, status.0
        ))
    }

    /// The Redis hash of keys' plans (read when the policy says
    /// `plans_from_redis`).
    pub fn plans_key(&self) -> String {
        wire_plans::plans_key(&self.key_prefix)
    }

    /// The Redis key for a subject: a hash of the API key, never the key.
    pub fn redis_key(&self, subject: &Subject<'_>) -> String {
        match subject {
            Subject::Key(key) => webdis::redis_key(&self.key_prefix, self.secret.as_deref(), key),
            Subject::Anonymous => format!("{}anonymous", self.key_prefix),
        }
    }

    /// The Redis key of the API key whose SHA-256 is `digest` (the admin
    /// API's `sha256:` keys); `None` with a secret, whose keys are HMACs of
    /// the plain key.
    pub fn digest_redis_key(&self, digest: &[u8; 32]) -> Option<String> {
        match self.secret {
            Some(_) => None,
            None => Some(webdis::digest_key(&self.key_prefix, digest)),
        }
    }

    /// A denial from the local cache, if the cached state already denies
    /// (`wall`: see `deny_cache::lookup`). `key` is as the worker's admin
    /// epoch files it (`Callouts::cache_key`), here and in `remember`.
    pub fn cached_denial(
        &self,
        key: KeyHash,
        limits: &[Limit],
        now: u64,
        wall: Option<u64>,
    ) -> Option<Decision> {
        if self.cache_slots == 0 {
            return None;
        }
        let slot = deny_cache::slot(key, self.cache_slots);
        let entry = with_slot_key(&self.cache_prefix, slot, host::get_shared_data).ok()??;
        deny_cache::lookup(limits, &entry.0, key, now, wall)
    }

    /// Forgets a key's cached denial (after the admin API reset or granted
    /// it in Redis, or a refund), so that this Envoy's next request of it
    /// asks Redis. The slot is emptied whatever it holds: its entry may be
    /// filed under any worker's epoch, and another key's entry there only
    /// costs that key one more call.
    pub fn forget(&self, key: KeyHash) {
        if self.cache_slots == 0 {
            return;
        }
        self.empty_slot(deny_cache::slot(key, self.cache_slots));
    }

    /// Forgets every cached denial: after the admin API reset or granted a
    /// key it knows only by its SHA-256, whose slot the keyed hash of the
    /// plain key would choose. One read per slot (a write per entry held),
    /// and each throttled key asks Redis once more; admin calls only.
    pub fn forget_all(&self) {
        for slot in 0..self.cache_slots {
            self.empty_slot(slot);
        }
    }

    fn empty_slot(&self, slot: u32) {
        with_slot_key(&self.cache_prefix, slot, |name| {
            for _ in 0..8 {
                let Ok(Some((current, cas))) = host::get_shared_data(name) else {
                    return;
                };
                if current.is_empty() || host::set_shared_data(name, &[], cas).is_ok() {
                    return;
                }
            }
        });
    }

    /// Remembers what Redis said about a key (a lower bound of its state).
    pub fn remember(&self, key: KeyHash, limits: &[Limit], answer: deny_cache::Answer<'_>) {
        if self.cache_slots == 0 {
            return;
        }
        let slot = deny_cache::slot(key, self.cache_slots);
        with_slot_key(&self.cache_prefix, slot, |name| {
            // Merge with what the slot holds, under its CAS; a conflict or a
            // host error only costs a cache miss later, so no retry loop.
            let (current, cas) = host::get_shared_data(name)
                .ok()
                .flatten()
                .unwrap_or_default();
            let mut buf = [0u8; MAX_VALUE];
            let entry = deny_cache::entry(&mut buf, &current, key, limits, answer);
            let _ = host::set_shared_data(name, entry, cas);
        });
    }

    /// Sends one batch call; the answer comes to `on_http_call_response`
    /// of the context active now (the root, see `callouts.rs`).
    pub fn dispatch(&self, path: &str, timeout_ms: u32) -> Result<u32, Status> {
        // The SDK's own dispatch registers the call so that its answer is
        // routed back to the active context; it returns an error for the
        // statuses Envoy's httpCall produces (BadArgument, InternalFailure).
        proxy_wasm::hostcalls::dispatch_http_call(
            &self.cluster,
            vec![
                (":method", "GET"),
                (":path", path),
                (":authority", &self.authority),
            ],
            None,
            vec![],
            // Never 0, which Envoy reads as no timeout at all.
            Duration::from_millis(u64::from(timeout_ms.max(1))),
        )
        .map_err(|status| Status(status as u32))
    }
}
