//! The pure core of apikey-ratelimit: everything the filter decides, with no
//! proxy-wasm call in it, so it is tested natively. Time is always passed in.
//!
//! # Layout
//! - [`rate`]: DRF-style rates (`1/s`, `100/min`, `100/15m`).
//! - [`config`]: the plugin's JSON configuration and its parsing.
//! - [`policy`]: the validated, compiled configuration; key → limits lookup.
//! - [`header_map`]: reads the header map the host serializes.
//! - [`key`]: finds the API key in the query string or a header.
//! - [`hash`]: the keyed hash of API keys (fingerprints, slot choice).
//! - [`time`]: time units and their conversions.
//! - [`per_limit`]: one value per limit of a key, without allocating.
//! - [`gcra`]: the algorithm, its limits and its decisions.
//! - [`state`]: a key's stored state and its byte layout.
//! - [`slots`]: the local store's fixed slot table and its CAS loop, over a
//!   [`slots::CasStore`] trait the glue implements on Envoy shared data.
//! - [`webdis`]: the global store's calls (the Redis function library, URLs, replies).
//! - [`deny_cache`]: the global store's local memory of throttled keys.
//! - [`calls`]: which request each webdis call the root sends is for.
//! - [`response`]: 429/401/400/503 bodies and the quota headers.
//! - [`pipeline`]: one request from headers to action and metrics.
//!
//! # Accuracy
//! **What GCRA guarantees.** Each limit `N/window` with burst `b` (default
//! `N`) admits `b` requests at once and then one every `T = window / N`
//! (rounded up to the nanosecond). Over any span of length `L` a key is
//! admitted at most `b + L/T` times; `Retry-After` is exact (rounded up to a
//! whole second, a client that waits it is never early); a denied request
//! consumes nothing, from any of the key's limits.
//!
//! **How it differs from DRF's sliding log.** For `1/s` (the tutorial) the
//! two are identical. For `N/window` with `N > 1`, DRF admits `N` and then
//! nothing until the oldest request leaves the window; GCRA refills steadily,
//! one request every `window/N`. So in the worst case a key that was idle
//! gets `N` at once plus up to `N - 1` more spread over the following
//! window: up to `2N - 1` in one window, never more than `N` per window on
//! average. Set `"burst": 1` for the strictest spacing (at most `N` in any
//! window, evenly spread). DRF also records a request in every throttle that
//! passed even when another throttle denied it; here a denied request moves
//! no limit.
//!
//! **The local store.** One state per key in a fixed table of slots, updated
//! by compare-and-swap, so counts are exact across all of an Envoy's workers.
//! A key's candidate slots come from a keyed hash ([`hash::KeyHasher`]) whose
//! secret is drawn once per process: they cannot be computed offline. On
//! collisions: a slot whose state is idle (all buckets full) is taken over,
//! losing nothing; when all of a key's candidates hold live states, the
//! unthrottled one with the least debt is evicted (it regains less than one
//! burst); a throttled state is never evicted, and a newcomer whose
//! candidates are all throttled is denied instead ([`slots::Outcome::Full`]).
//! A key's first request can be placed twice only if two of its requests
//! race on two workers in the very microsecond another key's state in an
//! earlier candidate slot turns idle: at most one extra admission per such
//! race. When CAS retries run out the request is denied. Each limit's debt is
//! kept under its name ([`state`]), so adding or removing a limit leaves the
//! others' debt in place.

// A panic in the filter aborts the VM: outside tests, no way to panic.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![deny(clippy::panic, clippy::indexing_slicing)]

pub mod calls;
pub mod config;
pub mod deny_cache;
pub mod gcra;
pub mod hash;
pub mod header_map;
pub mod key;
pub mod per_limit;
pub mod pipeline;
pub mod policy;
pub mod rate;
pub mod response;
pub mod slots;
pub mod state;
#[cfg(test)]
pub(crate) mod testing;
pub mod time;
pub mod webdis;

pub use config::{Config, ConfigError};
pub use pipeline::{Action, Event, Events, Quota, Start, StoreFailure};
pub use policy::Policy;
