//! Checks shared by the tests that read shipped configs.

use e2e::envoy_config::EnvoyConfig;
use ratelimit_core::Policy;

/// The plugin configuration of an Envoy config, through the filter's own
/// parser; panics (naming `what`) if it is refused, or if it calls a
/// webdis cluster the config does not define.
pub fn plugin_policy(what: &str, config: &EnvoyConfig) -> Policy {
    let plugin = config
        .plugin_config()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let policy = Policy::from_json(plugin.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e}"));
    if let Some(webdis) = policy.webdis() {
        let clusters = config.json()["static_resources"]["clusters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            clusters
                .iter()
                .any(|c| c["name"] == webdis.cluster.as_str()),
            "{what}: the plugin calls cluster {:?}, which the file does not define",
            webdis.cluster
        );
    }
    policy
}
