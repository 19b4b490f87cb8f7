//! The global store's decisions, batched: a worker's waiting requests are
//! decided by one call of the Redis function per batch, exactly as if they
//! had reached Redis one after the other.
//!
//! - [`wire`]: what a call carries and what it answers.
//! - [`wire_plans`]: the same when keys' plans are read from Redis.
//! - [`replay`]: each request's own decision from its key's answer.
//! - [`queue`]: the waiting requests and the calls, as a state machine.

pub mod queue;
pub mod replay;
pub mod wire;
pub mod wire_plans;

use crate::config::WebdisStoreConfig;
use crate::time::NANOS_PER_MILLI;

/// Bytes of a call's `:path` at most: webdis reads at most
/// `http_max_request_size` (16,384 in the shipped `webdis.json`) bytes of a
/// request, and Envoy adds its own headers to the path, authority and method.
pub const MAX_PATH_BYTES: usize = 12_000;

/// A worker's queue bounds from the store's configuration.
pub fn settings(config: &WebdisStoreConfig) -> queue::Settings {
    let widen = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    queue::Settings {
        max_keys: widen(config.max_keys_per_call),
        max_path_bytes: MAX_PATH_BYTES,
        max_in_flight: widen(config.max_calls_in_flight),
        max_waiting: widen(config.max_waiting),
        timeout_nanos: u64::from(config.timeout_ms).saturating_mul(NANOS_PER_MILLI),
    }
}
