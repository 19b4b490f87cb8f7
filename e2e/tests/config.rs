//! Configuration: a bad plugin configuration stops Envoy from starting, with
//! a log line naming the field; every shipped Envoy config is valid for both
//! Envoy and the filter's own parser, and calls only clusters it defines.

use std::time::Duration;

mod common;

use e2e::envoy::{self, Envoy};
use e2e::envoy_config::EnvoyConfig;
use e2e::paths;
use e2e::topology::local_config;
use e2e::upstream::Upstream;

#[test]
fn a_bad_configuration_makes_envoy_refuse_to_start_naming_the_field() {
    let upstream = Upstream::start();
    let cases = [
        (
            r#"{"limits": ["1/x"]}"#,
            "field `limits[0]`: invalid rate \"1/x\"",
        ),
        (
            r#"{"limts": ["1/s"]}"#,
            "field `limts`: unknown field `limts`",
        ),
        (
            r#"{"limits": ["1/s"], "store": {"local": {"slots": 2}}}"#,
            "field `store.local.slots`: must be from 4",
        ),
        (
            r#"{"limits": ["1/s"], "key_sources": [{"header": "bad header"}]}"#,
            "field `key_sources[0].header`",
        ),
        (r#"{"limits": "1/s"}"#, "field `limits`: invalid type"),
        // A template no request path can match: `{id}` is a whole segment.
        (
            r#"{"limits": ["1/s"], "rules": [{"name": "order",
                "match": {"path_template": "/orders/{id}.json"}, "limits": ["3/min"]}]}"#,
            "field `rules[0].match.path_template`: path template \"/orders/{id}.json\"",
        ),
        // A fixed cost the rule's limit can never hold.
        (
            r#"{"limits": ["1/s"], "rules": [{"name": "batch",
                "match": {"path": "/batch"}, "limits": ["10/min"], "cost": 11}]}"#,
            "field `rules[0].cost`: a request costing 11 can never fit limits[0] (burst 10)",
        ),
        ("", "the configuration is empty"),
    ];
    for (plugin_config, expected) in cases {
        let mut config = local_config(&upstream);
        config.set_plugin_config(plugin_config).unwrap();
        let (status, log) = Envoy::start_expect_failure(&config, 1, Duration::from_secs(30));
        let status = status.unwrap_or_else(|| panic!("Envoy kept running with {plugin_config:?}"));
        assert_eq!(status.code(), Some(1), "{plugin_config:?}\n{log}");
        let line = log
            .lines()
            .find(|l| {
                l.contains("invalid plugin configuration") || l.contains("configuration is empty")
            })
            .unwrap_or_else(|| panic!("no log line explains {plugin_config:?}:\n{log}"));
        assert!(line.contains("plugin 'api'"), "{line}");
        assert!(line.contains(expected), "expected {expected:?} in\n{line}");
    }
}

#[test]
fn every_shipped_envoy_config_is_valid_for_envoy_and_for_the_filter() {
    // Envoy's own validation loads the .wasm (it runs on_configure), so it
    // needs `make build`; it runs from the repository root, where the
    // shipped relative .wasm path resolves.
    paths::wasm_path().unwrap();
    for name in ["local.yaml", "global.yaml", "front.yaml"] {
        let shipped = paths::shipped_config(name);
        envoy::validate(&shipped).unwrap_or_else(|e| panic!("{name}: {e}"));
        let config = EnvoyConfig::load(&shipped).unwrap();
        if name == "front.yaml" {
            assert!(
                config.wasm_filenames().is_empty(),
                "the front proxy runs no filter"
            );
            continue;
        }
        let policy = common::plugin_policy(name, &config);
        // The tutorial's throttle, keyed on api_key first.
        let default = policy.plans[0].limits[0];
        let limit = policy.instance(default).unwrap();
        assert_eq!(limit.rate.count, 1, "{name}");
        assert_eq!(limit.rate.window_seconds, 1, "{name}");
        assert_eq!(
            policy.sources[0],
            ratelimit_core::key::KeySource::Query {
                name: "api_key".into()
            }
        );
        assert_eq!(name == "global.yaml", policy.webdis().is_some(), "{name}");
    }
}
