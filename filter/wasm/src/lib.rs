//! apikey-ratelimit: a proxy-wasm filter that rate-limits requests by API key
//! inside Envoy or Istio. All decisions live in `ratelimit_core`; this crate
//! is the glue to the host.
//!
//! The design (the slot table on shared data, the webdis callouts, the deny
//! cache, the failure modes, why nothing may panic) is written once, in
//! `docs/design.md` at the repository root.
//!
//! # Layout
//! - `lib.rs`: the entry point, `proxy_wasm::main!`.
//! - `host.rs`: the host calls used, each returning `Result` (the SDK's own
//!   wrappers can panic on unexpected statuses or non-UTF-8 headers).
//! - `root.rs`: the root context, one per worker: configures, ticks, and
//!   owns the worker's webdis calls.
//! - `filter.rs`: what a configuration becomes (`Filter`: policy, store,
//!   metrics, throttled logs), built once by `configure`.
//! - `http.rs`: the request context, a thin shell around the core pipeline
//!   (paused while webdis answers, in global mode).
//! - `verdict.rs`: how a decided request ends, from the request's callback
//!   or from the root that received its webdis answer.
//! - `request_headers.rs`: `:path` at once, the full header map only if needed.
//! - `shared_store.rs`: the slot table on Envoy shared data.
//! - `webdis_store.rs`: the global store: calls to webdis, the deny cache.
//! - `callouts.rs`: the webdis calls, sent and answered by the root context
//!   for its requests (`ratelimit_core::calls` keeps the books).
//! - `admin_calls.rs`: the admin API's Redis calls; `epoch_poll.rs`: the
//!   admin epoch the root polls, under which the deny cache files entries.
//! - `settlement.rs`: a request's cost settled from its response;
//!   `settle_calls.rs`: global mode's settlements, sent by the root.
//! - `metrics.rs`: one counter per core event.
//! - `seed.rs`: the process's secret for key hashes, in shared data.
//! - `log_limit.rs`: one log line per cause per 10 s.

// A panic in the filter aborts the VM: outside tests, no way to panic.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![deny(clippy::panic, clippy::indexing_slicing)]

mod admin_calls;
mod callouts;
mod epoch_poll;
mod filter;
mod host;
mod http;
mod log_limit;
mod metrics;
mod request_headers;
mod root;
mod seed;
mod settle_calls;
mod settlement;
mod shared_store;
mod verdict;
mod webdis_store;

use proxy_wasm::traits::RootContext;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(root::Root::new(context_id))
    });
}}
