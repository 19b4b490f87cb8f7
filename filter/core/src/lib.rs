//! The pure core of apikey-ratelimit: everything the filter decides, with no
//! proxy-wasm call in it, so it is tested natively. Time is always passed in.
//!
//! How it keeps its promises (what GCRA guarantees and how it differs from
//! DRF's sliding log, the slot table and its collisions, the deny cache, the
//! clock, the failure modes) is written once, in `docs/design.md` at the
//! repository root.
//!
//! # Layout
//! - [`rate`]: DRF-style rates (`1/s`, `100/min`, `100/15m`).
//! - [`calendar`]: the day, week or month a moment falls in, at a UTC offset.
//! - [`config`]: the plugin's JSON configuration and its parsing.
//! - [`policy`]: the validated, compiled configuration; key → limits lookup.
//! - [`header_map`]: reads the header map the host serializes.
//! - [`key`]: finds the API key in the query string or a header.
//! - [`matching`]: a request's normalized method, path and host, and rule patterns.
//! - [`applied`]: the limits that apply to one request (plan and rules).
//! - [`hash`]: the keyed hash of API keys (fingerprints, slot choice).
//! - [`time`]: time units and their conversions.
//! - [`per_limit`]: one value per limit of a key, without allocating.
//! - [`gcra`]: the algorithm, its limits and its decisions.
//! - [`quota`]: calendar quotas' state, one number like a TAT.
//! - [`state`]: a key's stored state and its byte layout.
//! - [`slots`]: the local store's fixed slot table and its CAS loop, over a
//!   [`slots::CasStore`] trait the glue implements on Envoy shared data.
//! - [`webdis`]: the global store's transport (the Redis function library,
//!   Redis keys, URL encoding, how an answer is classified).
//! - [`batch`]: the global store's batched decisions: the wire format, the
//!   replay of each request's decision, the queue and its calls.
//! - [`deny_cache`]: the global store's local memory of throttled keys.
//! - [`calls`]: the calls a root context has sent, by the host's token.
//! - [`response`]: 429/401/400/503 bodies and the quota headers.
//! - [`pipeline`]: one request from headers to action and metrics.
//! - [`settle`]: cost settled from the response: reservation, refund, debt.
//! - [`admin`]: the operators' API (inspect, reset, grant a key), its token, and
//!   which state a key named plain or `sha256:` leads to ([`admin::target`]);
//!   the admin epoch that carries a reset to every replica's deny cache
//!   ([`admin::epoch`]).
//! - [`plugin_name`]: the plugin's name, stable across Istio versions.

// A panic in the filter aborts the VM: outside tests, no way to panic.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![deny(clippy::panic, clippy::indexing_slicing)]

pub mod admin;
pub mod applied;
pub mod batch;
pub mod calendar;
pub mod calls;
pub mod config;
pub mod deny_cache;
pub mod gcra;
pub mod hash;
pub mod header_map;
pub mod key;
pub mod matching;
pub mod per_limit;
pub mod pipeline;
pub mod plugin_name;
pub mod policy;
pub mod quota;
pub mod rate;
pub mod response;
pub mod settle;
pub mod slots;
pub mod state;
#[cfg(test)]
pub(crate) mod testing;
pub mod time;
pub mod webdis;

pub use config::{Config, ConfigError};
pub use pipeline::{Action, Event, Events, Quota, Start, StoreFailure};
pub use policy::Policy;
