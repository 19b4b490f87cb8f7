//! The plugin's name as istiod sets it (issue 10): `<namespace>.<name>` up
//! to Istio 1.29, `<namespace>.<name>~istio-translated-wasmplugin` from 1.30,
//! with empty `root_id` and `vm_id`. An upgrade renames the plugin under a
//! running proxy, here by a new version of a listener served from a file.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::envoy::Envoy;
use e2e::http;
use e2e::lds::{self, FileListener};
use e2e::poll_until;
use e2e::topology::local_config;
use e2e::upstream::Upstream;
use serde_json::Value;

const PLUGIN: &str = r#"{"limits": ["1/min"], "key_sources": [{"query": "api_key"}]}"#;
const ISTIO_1_29: &str = "ns.api";
const ISTIO_1_30: &str = "ns.api~istio-translated-wasmplugin";
const SWAP: Duration = Duration::from_secs(10);

/// The plugin as istiod names it: empty ids, `name` as given.
fn istio_plugin(config: &mut Value, name: &str, plugin: &str) {
    config["name"] = name.into();
    config["root_id"] = "".into();
    config["vm_config"]["vm_id"] = "".into();
    config["configuration"]["value"] = plugin.into();
}

/// Upstream and one Envoy whose listener, from a file, runs the plugin
/// named `name`; returns once that listener serves.
fn start(name: &str) -> (Upstream, Envoy, FileListener) {
    let upstream = Upstream::start();
    let mut config = local_config(&upstream);
    let listener = FileListener::take(&mut config).unwrap();
    listener.write(|c| istio_plugin(c, name, PLUGIN)).unwrap();
    let envoy = Envoy::start_with_args(&config, 1, &lds::ARGS).unwrap_or_else(|e| panic!("{e:?}"));
    let served = poll_until(SWAP, Duration::from_millis(100), || {
        let r = http::get(&listener.addr(), "/?api_key=warm-up").ok()?;
        (r.status == 200).then_some(())
    });
    assert!(served.is_some(), "the file listener never served");
    (upstream, envoy, listener)
}

fn status(listener: &FileListener, key: &str) -> u16 {
    http::get(&listener.addr(), &format!("/?api_key={key}"))
        .unwrap()
        .status
}

/// The filter's stat names (`wasmcustom.apikey_ratelimit.*`).
fn filter_stats(envoy: &Envoy) -> BTreeSet<String> {
    let stats = envoy.stats().unwrap();
    stats
        .keys()
        .filter(|n| n.starts_with("wasmcustom.apikey_ratelimit."))
        .cloned()
        .collect()
}

/// Waits until Envoy has taken the `count`th listener update in and the
/// old listener has drained.
fn wait_updated(envoy: &Envoy, count: u64) {
    let stat = |name: &str| envoy.counter(name).unwrap_or(0);
    let done = poll_until(SWAP, Duration::from_millis(50), || {
        (stat("listener_manager.listener_modified") >= count
            && stat("listener_manager.total_listeners_warming") == 0
            && stat("listener_manager.total_listeners_draining") == 0)
            .then_some(())
    });
    assert!(done.is_some(), "update {count} was not applied");
}

/// An Istio upgrade to 1.30 renames the plugin under a running proxy: its
/// stat names stay those of 1.29 and its counts carry on (a key that spent
/// its quota under the old name is still throttled under the new one).
#[test]
fn istio_1_30_names_keep_the_stat_names_and_the_counts() {
    let (_upstream, envoy, listener) = start(ISTIO_1_29);
    assert_eq!(status(&listener, "carried"), 200);
    assert_eq!(status(&listener, "carried"), 429);
    let before = filter_stats(&envoy);
    assert!(
        before.contains("wasmcustom.apikey_ratelimit.ns_api.throttled"),
        "{before:#?}"
    );

    listener
        .write(|c| istio_plugin(c, ISTIO_1_30, PLUGIN))
        .unwrap();
    wait_updated(&envoy, 1);
    assert_eq!(
        status(&listener, "carried"),
        429,
        "the count restarted under {ISTIO_1_30}"
    );
    let after = filter_stats(&envoy);
    assert_eq!(after, before, "stat names changed with the plugin name");
}
