//! A bad `pluginConfig` as istiod delivers it (ECDS, here served from a
//! file): Envoy does not exit as it does on a static config; it rejects the
//! update, the log names the field at fault, and the pod stays Ready.

use std::time::Duration;

use e2e::ecds::FileFilter;
use e2e::envoy::Envoy;
use e2e::http;
use e2e::lds;
use e2e::topology::local_config;
use e2e::upstream::Upstream;
use serde_json::Value;

const GOOD: &str = r#"{"limits": ["1/min"], "key_sources": [{"query": "api_key"}]}"#;
/// Refused by the filter's config parser, naming `store.local.slots`.
const BAD: &str = r#"{"limits": ["1/min"], "store": {"local": {"slots": 0}}}"#;
const UPDATE: Duration = Duration::from_secs(10);
/// Envoy's count of the discovered filter's rejected configs.
const REJECTED: &str = "extension_config_discovery.http_filter.apikey_ratelimit.config_fail";

fn plugin(config: &mut Value, plugin: &str) {
    config["name"] = "ns.api".into();
    config["configuration"]["value"] = plugin.into();
}

/// Upstream and an Envoy whose plugin config comes from a file, first
/// `first`.
fn start(first: &str) -> (Upstream, Envoy, FileFilter) {
    let upstream = Upstream::start();
    let mut config = local_config(&upstream);
    let filter = FileFilter::take(&mut config).unwrap();
    filter.write(|c| plugin(c, first)).unwrap();
    let envoy = Envoy::start_with_args(&config, 1, &lds::ARGS).unwrap_or_else(|e| panic!("{e:?}"));
    (upstream, envoy, filter)
}

fn status(envoy: &Envoy, key: &str) -> u16 {
    http::get(&envoy.addr(), &format!("/?api_key={key}"))
        .unwrap()
        .status
}

/// The log names the plugin and the field at fault, and Envoy is Ready.
fn assert_refused_and_ready(envoy: &Envoy) {
    envoy.wait_counter(REJECTED, 1, UPDATE).unwrap();
    let log = envoy.proc().log();
    assert!(
        log.contains("plugin 'ns.api'") && log.contains("store.local.slots"),
        "the log does not name the field:\n{}",
        envoy.proc().log_tail(30)
    );
    let ready = envoy.admin("GET", "/ready").unwrap();
    assert_eq!(ready.status, 200, "Envoy is no longer ready");
}

#[test]
fn a_bad_update_is_refused_and_the_old_config_keeps_limiting() {
    let (_upstream, envoy, filter) = start(GOOD);
    assert_eq!(status(&envoy, "kept"), 200);
    filter.write(|c| plugin(c, BAD)).unwrap();
    assert_refused_and_ready(&envoy);
    assert_eq!(status(&envoy, "kept"), 429, "the old limit is gone");
    assert_eq!(status(&envoy, "fresh"), 200);
}

#[test]
fn a_bad_first_config_answers_500_and_envoy_stays_ready() {
    let (_upstream, envoy, _filter) = start(BAD);
    assert_refused_and_ready(&envoy);
    assert_eq!(status(&envoy, "any"), 500);
}
