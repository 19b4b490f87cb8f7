//! Limit identity in Redis: each limit's state is a hash field named for
//! the limit, and each plugin counts under its own key prefix. Real Envoys
//! share one Redis, as replicas do during a rolling update.

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::http;
use e2e::topology::global_test_config;
use e2e::upstream::Upstream;
use ratelimit_core::webdis::redis_key;

const PLUGIN_NAME: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters/0/typed_config/config/name";

/// An Envoy named `plugin` with these `limits` and `webdis` store fields.
fn envoy(
    upstream: &Upstream,
    backend: &RedisWebdis,
    plugin: &str,
    limits: &str,
    webdis: &str,
) -> Envoy {
    let plugin_config =
        format!(r#"{{"limits": {limits}, "store": {{"webdis": {{"timeout_ms": 1000{webdis}}}}}}}"#);
    let mut config = global_test_config(upstream, backend.webdis.port(), Some(&plugin_config));
    *config.json_mut().pointer_mut(PLUGIN_NAME).unwrap() = plugin.into();
    Envoy::start(&config, 1).unwrap()
}

fn status(envoy: &Envoy, key: &str) -> u16 {
    http::get(&envoy.addr(), &format!("/?api_key={key}"))
        .unwrap()
        .status
}

/// The limit names stored for `key`, sorted.
fn fields(backend: &RedisWebdis, key: &str) -> Vec<String> {
    let key = redis_key("apikey_ratelimit:api:", None, key.as_bytes());
    let mut fields: Vec<String> = backend
        .redis
        .cli(&["HKEYS", &key])
        .lines()
        .map(str::to_string)
        .collect();
    fields.sort();
    fields
}

#[test]
fn a_limits_debt_survives_adding_or_removing_another_limit() {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let old = envoy(&upstream, &backend, "api", r#"["1/min"]"#, "");
    let new = envoy(&upstream, &backend, "api", r#"["1/min", "1000/d"]"#, "");

    // Adding a limit: the debt under 1/min stays, and the denial writes
    // nothing.
    assert_eq!(status(&old, "adding"), 200);
    assert_eq!(status(&new, "adding"), 429);
    assert_eq!(fields(&backend, "adding"), ["1/min"]);
    // Removing one: likewise, and the field of the limit that call did not
    // carry is left in place.
    assert_eq!(status(&new, "removing"), 200);
    assert_eq!(status(&old, "removing"), 429);
    assert_eq!(fields(&backend, "removing"), ["1/min", "1000/d"]);
}

#[test]
fn plugins_count_apart_unless_they_share_a_key_prefix() {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let api = envoy(&upstream, &backend, "api", r#"["1/min"]"#, "");
    // Istio's name for a WasmPlugin `other` in namespace `team-b`.
    let istio = "team-b.other~istio-translated-wasmplugin";
    let other = envoy(&upstream, &backend, istio, r#"["1/min"]"#, "");
    assert_eq!(status(&api, "k"), 200);
    assert_eq!(status(&api, "k"), 429);
    assert_eq!(status(&other, "k"), 200);
    assert_eq!(status(&other, "k"), 429);
    let prefixes: Vec<String> = backend
        .redis
        .keys()
        .iter()
        .map(|k| k.rsplit_once(':').unwrap().0.to_string())
        .collect();
    assert_eq!(
        prefixes,
        ["apikey_ratelimit:api", "apikey_ratelimit:team-b.other"]
    );

    // The same key_prefix in two plugins shares their state, on purpose.
    let shared = r#", "key_prefix": "apikey_ratelimit:shared:""#;
    let first = envoy(&upstream, &backend, "first", r#"["1/min"]"#, shared);
    let second = envoy(&upstream, &backend, "second", r#"["1/min"]"#, shared);
    assert_eq!(status(&first, "k"), 200);
    assert_eq!(status(&second, "k"), 429);
}
