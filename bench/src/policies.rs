//! The policy setups (issue 12): local mode with a 100,000-key registry,
//! alone and with five rules, measured in the same block as plain local
//! mode (`local-1key`) and compared with it.
//!
//! Everything here is generated, deterministically: the registry (SHA-256
//! digests of made-up keys, the bench's own keys among them), the rules
//! (one of each kind of match, with limits no run can reach) and the wrk
//! script whose requests match them.

use std::fmt::Write;
use std::sync::OnceLock;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::report::Row;
use crate::setups::{Route, Setup};

/// The aim: local mode with the registry and rules at least this
/// share of plain local mode's throughput, measured in the same block.
pub const MIN_VS_LOCAL: f64 = 0.90;

/// The setup the policy setups are measured beside: plain local mode.
pub const PLAIN_LOCAL: &str = "local-1key";

/// Keys in the registry, all as `sha256:` digests.
pub const REGISTERED_KEYS: usize = 100_000;

/// The plans, each with one limit no run reaches (like `ALLOW_ALL`); keys
/// are spread over them in turn.
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

/// The bench's keys, one per plan (same order as [`PLANS`]), registered
/// among the made-up ones.
pub const BENCH_KEYS: [&str; 3] = ["bench-free", "bench-pro", "bench-enterprise"];

/// One key of the registry for a run that uses a single key: on `free`,
/// whose one limit is like plain local mode's.
pub const ONE_REGISTERED_KEY: &str = "bench-free";

/// A rate no run reaches (the fastest the filter expresses).
const NEVER: &str = "1000000/s";

/// The rules' names, which their counters (`rule.<name>.requests`) carry.
pub const RULE_NAMES: [&str; 5] = ["create_order", "search", "order", "eu", "gold"];

/// A plugin configuration with the registry, and the rules if `rules`.
fn config(rules: bool) -> String {
    let mut keys: Vec<Vec<String>> = vec![Vec::new(); PLANS.len()];
    for i in 0..REGISTERED_KEYS {
        let key = BENCH_KEYS
            .get(i)
            .map_or_else(|| format!("registered-key-{i}"), |k| k.to_string());
        let mut entry = String::with_capacity(71);
        entry.push_str("sha256:");
        for b in Sha256::digest(key.as_bytes()) {
            let _ = write!(entry, "{b:02x}");
        }
        keys[i % PLANS.len()].push(entry);
    }
    let mut config = json!({
        "plans": PLANS.iter().map(|p| (p.to_string(), json!([NEVER]))).collect::<serde_json::Map<_, _>>(),
        "keys": PLANS.iter().zip(keys).map(|(p, k)| (p.to_string(), json!(k))).collect::<serde_json::Map<_, _>>(),
        "unknown_keys": "reject",
    });
    if rules {
        config["rules"] = rule_configs();
    }
    config.to_string()
}

/// One rule of each kind of match: method and exact path, segment prefix,
/// template, host, header.
fn rule_configs() -> Value {
    let [create_order, search, order, eu, gold] = RULE_NAMES;
    json!([
        {"name": create_order, "match": {"methods": ["POST"], "path": "/orders"}, "limits": [NEVER]},
        {"name": search, "match": {"path_prefix": "/search"}, "limits": [NEVER]},
        {"name": order, "match": {"path_template": "/orders/{id}"}, "limits": [NEVER]},
        {"name": eu, "match": {"hosts": ["eu.example.com", "*.eu.example.com"]}, "limits": [NEVER]},
        {"name": gold, "match": {"headers": [{"name": "x-tier", "exact": "gold"}]}, "limits": [NEVER]}
    ])
}

/// The registry alone.
pub fn registry_config() -> &'static str {
    static CONFIG: OnceLock<String> = OnceLock::new();
    CONFIG.get_or_init(|| config(false))
}

/// The registry and the five rules.
pub fn rules_config() -> &'static str {
    static CONFIG: OnceLock<String> = OnceLock::new();
    CONFIG.get_or_init(|| config(true))
}

/// A request: method, path, extra headers (`Host` replaces wrk's).
type Request = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The requests of the rules setup. Each matches one to three rules:
/// `create_order`; `search` and `gold`; `order`; `eu`; `order`, `eu` and
/// `gold`: 1.6 a request.
const REQUESTS: [Request; 5] = [
    ("POST", "/orders", &[]),
    ("GET", "/search/books", &[("x-tier", "gold")]),
    ("GET", "/orders/42", &[]),
    ("GET", "/catalog", &[("Host", "api.eu.example.com")]),
    (
        "GET",
        "/orders/7",
        &[("Host", "eu.example.com"), ("x-tier", "gold")],
    ),
];

/// Rule matches the requests of [`rules_script`] make, on average.
pub const RULE_MATCHES_PER_REQUEST: f64 = 8.0 / 5.0;

/// A wrk script that cycles through [`REQUESTS`] with each of
/// [`BENCH_KEYS`], formatted once per thread (`init`) so that wrk's own
/// cost per request stays that of a fixed request.
pub fn rules_script() -> String {
    let mut shapes = String::new();
    for (method, path, headers) in REQUESTS {
        let headers: Vec<String> = headers
            .iter()
            .map(|(name, value)| format!("[\"{name}\"] = \"{value}\""))
            .collect();
        let _ = writeln!(
            shapes,
            "  {{\"{method}\", \"{path}\", {{{}}}}},",
            headers.join(", ")
        );
    }
    let keys: Vec<String> = BENCH_KEYS.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "local shapes = {{\n{shapes}}}\n\
         local keys = {{{}}}\n\
         local requests = {{}}\n\
         local i = 0\n\
         function init(args)\n  \
           for _, key in ipairs(keys) do\n    \
             for _, s in ipairs(shapes) do\n      \
               local headers = {{}}\n      \
               for name, value in pairs(s[3]) do headers[name] = value end\n      \
               table.insert(requests, wrk.format(s[1], s[2] .. \"?api_key=\" .. key, headers))\n    \
             end\n  \
           end\n\
         end\n\
         function request()\n  \
           i = i % #requests + 1\n  \
           return requests[i]\n\
         end\n",
        keys.join(", ")
    )
}

/// Each setup measured beside another, set against it, per route: then
/// one line per setup against [`MIN_VS_LOCAL`]. Informational.
pub fn table(rows: &[Row], setups: &[Setup]) -> String {
    let mut out = String::new();
    let mut targets = String::new();
    for route in Route::ALL {
        let row = |id: &str| rows.iter().find(|r| r.setup == id && r.route == route);
        // The policy setups are those measured beside plain local mode.
        let pairs: Vec<(&Row, &Row)> = setups
            .iter()
            .filter(|s| s.beside == Some(PLAIN_LOCAL))
            .filter_map(|s| Some((row(s.id)?, row(s.beside?)?)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n**Registry and rules against plain local mode, route: {}** (measured in the same block)\n",
            route.name()
        );
        let _ = writeln!(
            out,
            "| setup | against | × it (rounds' range) | p50 ms (it) | p99 ms (it) | Envoy CPU µs/req (+ over it) | rule matches / req | Envoy start to /ready ms (it) | a worker's VM made and configured ms (it) | wasm_memory_bytes MiB (it) |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (setup, local) in pairs {
            let ratio = setup.vs_beside.unwrap_or(0.0);
            let (low, high) = setup.vs_beside_range.unwrap_or((0.0, 0.0));
            let mib = |r: &Row| {
                r.wasm_memory_mib
                    .map_or("–".to_string(), |m| format!("{m:.1}"))
            };
            let workers = |r: &Row| {
                r.workers_configured_ms
                    .map_or("–".to_string(), |m| format!("{m:.0}"))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {ratio:.2} ({low:.2}–{high:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.1} ({:+.1}) | {:.2} | {:.0} ({:.0}) | {} ({}) | {} ({}) |",
                setup.title,
                local.setup,
                setup.p50_ms,
                local.p50_ms,
                setup.p99_ms,
                local.p99_ms,
                setup.cpu_us,
                setup.cpu_us_over_beside.unwrap_or(0.0),
                setup.rule_matches_per_request,
                setup.ready_ms,
                local.ready_ms,
                workers(setup),
                workers(local),
                mib(setup),
                mib(local),
            );
            let _ = writeln!(
                targets,
                "- {}: {} at {ratio:.2}× {} (aim ≥ {MIN_VS_LOCAL:.2}), p99 {:.2} ms against {:.2} ms: {}",
                route.name(),
                setup.title,
                local.setup,
                setup.p99_ms,
                local.p99_ms,
                if ratio >= MIN_VS_LOCAL { "met" } else { "missed" }
            );
        }
    }
    if !targets.is_empty() {
        out.push_str("\n**Registry and rules: targets (ratios from this run)**\n\n");
        out.push_str(&targets);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratelimit_core::key::{KeyErrorKind, RequestHeaders};
    use ratelimit_core::pipeline::{self, Start};
    use ratelimit_core::Policy;

    #[test]
    fn both_configs_load_with_the_bench_keys_registered() {
        for (config, rules) in [(registry_config(), 0), (rules_config(), RULE_NAMES.len())] {
            let policy = Policy::from_json(config.as_bytes()).unwrap();
            assert_eq!(policy.registered_keys(), REGISTERED_KEYS);
            assert_eq!(policy.rules.len(), rules);
            assert_eq!(policy.plans.len(), PLANS.len() + 1);
        }
        assert!(registry_config().contains(&format!(
            "sha256:{:x}",
            Sha256::digest(ONE_REGISTERED_KEY.as_bytes())
        )));
    }

    /// Headers as Envoy hands them to the filter (HTTP/1 `Host` becomes
    /// `:authority`).
    struct Headers(Vec<(Vec<u8>, Vec<u8>)>);

    impl<'a> RequestHeaders<'a> for &'a Headers {
        fn single(&self, name: &[u8]) -> Result<Option<&'a [u8]>, KeyErrorKind> {
            let mut found = self.0.iter().filter(|(n, _)| n == name);
            match (found.next(), found.next()) {
                (Some(_), Some(_)) => Err(KeyErrorKind::Repeated),
                (one, _) => Ok(one.map(|(_, v)| v.as_slice())),
            }
        }
    }

    #[test]
    fn every_request_of_the_script_matches_the_rules_it_is_meant_to() {
        let policy = Policy::from_json(rules_config().as_bytes()).unwrap();
        let expected: [&[usize]; 5] = [&[0], &[1, 4], &[2], &[3], &[2, 3, 4]];
        let mut matches = 0;
        for key in BENCH_KEYS {
            for ((method, path, extra), want) in REQUESTS.iter().zip(expected) {
                let mut headers = vec![
                    (b":method".to_vec(), method.as_bytes().to_vec()),
                    (
                        b":path".to_vec(),
                        format!("{path}?api_key={key}").into_bytes(),
                    ),
                    (b":authority".to_vec(), b"127.0.0.1:10000".to_vec()),
                ];
                for (name, value) in *extra {
                    let name = match name.to_ascii_lowercase().as_str() {
                        "host" => ":authority".to_string(),
                        other => other.to_string(),
                    };
                    headers.retain(|(n, _)| *n != name.as_bytes());
                    headers.push((name.into_bytes(), value.as_bytes().to_vec()));
                }
                let headers = Headers(headers);
                let Start::Decide { applied, .. } = pipeline::start(&policy, &&headers) else {
                    panic!("{method} {path} with {key} is not decided by its limits");
                };
                assert_eq!(
                    applied.matched_rules().collect::<Vec<_>>(),
                    want,
                    "{method} {path}"
                );
                matches += want.len();
            }
        }
        let per_request = matches as f64 / (REQUESTS.len() * BENCH_KEYS.len()) as f64;
        assert!((per_request - RULE_MATCHES_PER_REQUEST).abs() < 1e-9);
    }

    #[test]
    fn the_script_sends_every_request_with_every_key() {
        let script = rules_script();
        assert!(script.contains("{\"GET\", \"/orders/7\", {[\"Host\"] = \"eu.example.com\", [\"x-tier\"] = \"gold\"}},"), "{script}");
        assert!(
            script.contains("local keys = {\"bench-free\", \"bench-pro\", \"bench-enterprise\"}")
        );
    }
}
