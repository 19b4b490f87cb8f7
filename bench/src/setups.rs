//! What is measured: each setup is an Envoy config derived from the shipped
//! `envoy/local.yaml` or `envoy/global.yaml` (same listener, same worker
//! count, same route), changed only in its HTTP filter and, per route, in
//! where the route goes.

use e2e::envoy_config::EnvoyConfig;
use e2e::ports::free_port;
use e2e::topology::{replica_config, Mode, ReplicaPorts};
use serde_json::{json, Value};

use crate::aims::{self, Aim};
use crate::policies;
use crate::settlement;

/// Where the single route goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Route {
    /// `direct_response`: Envoy answers `"ok"` itself; isolates the filter.
    Direct,
    /// The real upstream service: what a user sees.
    Upstream,
}

impl Route {
    pub const ALL: [Route; 2] = [Route::Direct, Route::Upstream];

    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct_response",
            Route::Upstream => "upstream",
        }
    }
}

/// The HTTP filter under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    None,
    /// Envoy's native `local_ratelimit`, one bucket that never runs dry.
    NativeLocal,
    /// A proxy-wasm filter that only reads `:path`.
    EmptyWasm,
    /// Ours, with this plugin configuration.
    Ours(Mode, &'static str),
}

/// Which keys the load uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    One(&'static str),
    /// Cycles through this many distinct keys.
    Many(usize),
    /// The policy setup's requests, which match its rules, with each of
    /// its keys (`policies::rules_script`).
    RuleMix,
    /// The settlement setups' requests: `/metered`, which reports its usage
    /// in a header, with a fresh key each run (`settlement::target`).
    Metered,
}

#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub id: &'static str,
    pub title: &'static str,
    pub filter: Filter,
    pub keys: Keys,
    /// Global setups: what the issue asks of them, against a local setup.
    pub aim: Option<Aim>,
    /// Measured in this setup's block (the block of the setup at the end
    /// of the `beside` chain), next to it, and compared with it.
    pub beside: Option<&'static str>,
}

impl Setup {
    pub fn is_global(&self) -> bool {
        matches!(self.filter, Filter::Ours(Mode::Global, _))
    }

    /// `/metered` exists only on the upstream.
    pub fn runs_on(&self, route: Route) -> bool {
        self.keys != Keys::Metered || route == Route::Upstream
    }
}

/// The setups `setup` is measured beside, nearest first, up to the one
/// whose block they share.
pub fn beside_chain<'a>(setup: &Setup, setups: &'a [Setup]) -> Vec<&'a Setup> {
    let mut chain: Vec<&Setup> = Vec::new();
    let mut next = setup.beside;
    while let Some(id) = next {
        match setups.iter().find(|s| s.id == id) {
            Some(s) if !chain.iter().any(|c| c.id == id) => {
                chain.push(s);
                next = s.beside;
            }
            _ => break,
        }
    }
    chain
}

/// Never throttles at any rate this machine reaches (the fastest rate the
/// filter expresses: one per microsecond).
const ALLOW_ALL: &str = r#"{"limits": ["1000000/s"]}"#;
const THROTTLE: &str = r#"{"limits": ["1/hour"]}"#;
const GLOBAL_ALLOW_ALL: &str =
    r#"{"limits": ["1000000/s"], "store": {"webdis": {"timeout_ms": 1000}}}"#;
const GLOBAL_THROTTLE: &str =
    r#"{"limits": ["1/hour"], "store": {"webdis": {"timeout_ms": 1000}}}"#;

pub fn all() -> Vec<Setup> {
    vec![
        Setup {
            id: "no-filter",
            title: "1. Envoy, no rate-limit filter",
            filter: Filter::None,
            keys: Keys::One("bench"),
            aim: None,
            beside: None,
        },
        Setup {
            id: "native",
            title: "2. Envoy's native local_ratelimit",
            filter: Filter::NativeLocal,
            keys: Keys::One("bench"),
            aim: None,
            beside: None,
        },
        Setup {
            id: "empty-wasm",
            title: "3. empty proxy-wasm filter (the floor)",
            filter: Filter::EmptyWasm,
            keys: Keys::One("bench"),
            aim: None,
            beside: None,
        },
        Setup {
            id: "local-1key",
            title: "4a. ours, local, one key, all allowed",
            filter: Filter::Ours(Mode::Local, ALLOW_ALL),
            keys: Keys::One("bench"),
            aim: None,
            beside: None,
        },
        Setup {
            id: "local-keys",
            title: "4b. ours, local, 10k keys, all allowed",
            filter: Filter::Ours(Mode::Local, ALLOW_ALL),
            keys: Keys::Many(10_000),
            aim: None,
            beside: None,
        },
        Setup {
            id: "local-registry",
            title: "4c. ours, local, 100k-key registry",
            filter: Filter::Ours(Mode::Local, policies::registry_config()),
            keys: Keys::One(policies::ONE_REGISTERED_KEY),
            aim: None,
            beside: Some(policies::PLAIN_LOCAL),
        },
        Setup {
            id: "local-policies",
            title: "4d. ours, local, 5 rules + 100k-key registry",
            filter: Filter::Ours(Mode::Local, policies::rules_config()),
            keys: Keys::RuleMix,
            aim: None,
            beside: Some(policies::PLAIN_LOCAL),
        },
        Setup {
            id: "local-flood",
            title: "5. ours, local, flood on a throttled key",
            filter: Filter::Ours(Mode::Local, THROTTLE),
            keys: Keys::One("flood"),
            aim: None,
            beside: None,
        },
        Setup {
            id: "global-allowed",
            title: "6a. ours, global, one key, all allowed",
            filter: Filter::Ours(Mode::Global, GLOBAL_ALLOW_ALL),
            keys: Keys::One("bench"),
            aim: Some(aims::allowed("local-1key")),
            beside: None,
        },
        Setup {
            id: "global-keys",
            title: "6b. ours, global, 10k keys, all allowed",
            filter: Filter::Ours(Mode::Global, GLOBAL_ALLOW_ALL),
            keys: Keys::Many(10_000),
            aim: Some(aims::allowed("local-keys")),
            beside: None,
        },
        Setup {
            id: "global-flood",
            title: "7. ours, global, flood on a throttled key",
            filter: Filter::Ours(Mode::Global, GLOBAL_THROTTLE),
            keys: Keys::One("flood"),
            aim: Some(aims::FLOOD),
            beside: None,
        },
        Setup {
            id: "global-fixed",
            title: "8a. ours, global, a rule of fixed cost 300, /metered",
            filter: Filter::Ours(Mode::Global, settlement::config(Mode::Global, false)),
            keys: Keys::Metered,
            aim: None,
            beside: None,
        },
        Setup {
            id: "global-settle",
            title: "8b. ours, global, estimate 300 settled from the response (120)",
            filter: Filter::Ours(Mode::Global, settlement::config(Mode::Global, true)),
            keys: Keys::Metered,
            aim: None,
            beside: Some("global-fixed"),
        },
        Setup {
            id: "local-fixed",
            title: "8c. ours, local, a rule of fixed cost 300, /metered",
            filter: Filter::Ours(Mode::Local, settlement::config(Mode::Local, false)),
            keys: Keys::Metered,
            aim: None,
            beside: Some("global-fixed"),
        },
        Setup {
            id: "local-settle",
            title: "8d. ours, local, estimate 300 settled from the response (120)",
            filter: Filter::Ours(Mode::Local, settlement::config(Mode::Local, true)),
            keys: Keys::Metered,
            aim: None,
            beside: Some("local-fixed"),
        },
    ]
}

/// The Envoy config of a setup on a route, on fresh ports.
pub fn envoy_config(
    setup: &Setup,
    route: Route,
    upstream_port: u16,
    webdis_port: u16,
    empty_wasm: &std::path::Path,
) -> Result<EnvoyConfig, String> {
    let mode = match setup.filter {
        Filter::Ours(mode, _) => mode,
        _ => Mode::Local,
    };
    let ports = ReplicaPorts {
        listen: free_port(),
        admin: free_port(),
        upstream: upstream_port,
        webdis: (mode == Mode::Global).then_some(webdis_port),
    };
    let mut config = replica_config(mode, ports).map_err(|e| e.0)?;
    match setup.filter {
        Filter::None => config
            .remove_http_filter("apikey_ratelimit")
            .map_err(|e| e.0)?,
        Filter::NativeLocal => *filter_slot(&mut config)? = native_local_ratelimit(),
        Filter::EmptyWasm => config.set_wasm_filename(empty_wasm).map_err(|e| e.0)?,
        Filter::Ours(_, plugin) => config.set_plugin_config(plugin).map_err(|e| e.0)?,
    }
    if route == Route::Direct {
        let route = config
            .json_mut()
            .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes/0")
            .ok_or("the shipped config has no first route")?;
        *route = json!({
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "\"ok\""}}
        });
    }
    Ok(config)
}

fn filter_slot(config: &mut EnvoyConfig) -> Result<&mut Value, String> {
    config
        .json_mut()
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters/0",
        )
        .ok_or_else(|| "the shipped config has no first HTTP filter".to_string())
}

/// One bucket, refilled far faster than it can be drained, enforced: the
/// native filter's full cost, never a 429.
fn native_local_ratelimit() -> Value {
    json!({
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench",
            "token_bucket": {
                "max_tokens": 1_000_000_000u64,
                "tokens_per_fill": 1_000_000_000u64,
                "fill_interval": "1s"
            },
            "filter_enabled": {"runtime_key": "bench_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "bench_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}}
        }
    })
}
