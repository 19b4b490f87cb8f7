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
//! - `root.rs`: the root context; `on_configure` builds the `Filter` once.
//! - `http.rs`: the request context, a thin shell around the core pipeline
//!   (paused while webdis answers, in global mode).
//! - `request_headers.rs`: `:path` at once, the full header map only if needed.
//! - `shared_store.rs`: the slot table on Envoy shared data.
//! - `webdis_store.rs`: the global store: calls to webdis, the deny cache.
//! - `metrics.rs`: one counter per core event.

#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod host;
mod http;
mod log_limit;
mod metrics;
mod request_headers;
mod root;
mod seed;
mod shared_store;
mod webdis_store;

use proxy_wasm::traits::RootContext;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::<root::Root>::default() });
}}
