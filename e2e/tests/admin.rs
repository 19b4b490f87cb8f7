//! A key's usage for its operator (issue 13): one Envoy with the
//! data-plane listener and an admin listener whose plugin has the same
//! `name`, `root_id` and `vm_id` (so it sees the same shared data, hash seed
//! and, in global mode, deny cache and Redis keys) and an `admin` token. In
//! local mode it acts on shared data, in global mode on Redis. Without the token every call is 401 (none)
//! or 403 (a wrong one); with it, inspect matches the headers, reset
//! restores the full quota on the next request, and grant extends it. The
//! log names keys by their SHA-256 only.

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::envoy_config::EnvoyConfig;
use e2e::http::{Conn, Response};
use e2e::ports::free_port;
use e2e::topology::{global_test_config, local_config};
use e2e::upstream::Upstream;
use serde_json::Value;

const TOKEN: &str = "operator-token-1";
const LIMITS: &str =
    r#""limits": ["3/min", {"quota": "5/day", "reset": "calendar", "name": "daily"}]"#;

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Adds `admin_api`, a copy of the first listener whose plugin is the
/// admin API: `LIMITS` and `store`, and the token's hash.
fn add_admin_listener(config: &mut EnvoyConfig, store: &str) {
    let admin_plugin = format!(
        r#"{{{LIMITS}{store}, "admin": {{"token_sha256": "{}"}}}}"#,
        sha256_hex(TOKEN)
    );
    let listeners = config
        .json_mut()
        .pointer_mut("/static_resources/listeners")
        .and_then(Value::as_array_mut)
        .unwrap();
    let mut admin = listeners[0].clone();
    admin["name"] = "admin_api".into();
    admin["address"]["socket_address"]["port_value"] = free_port().into();
    let filter = &mut admin["filter_chains"][0]["filters"][0]["typed_config"];
    filter["stat_prefix"] = "admin_api".into();
    let wasm = &mut filter["http_filters"][0]["typed_config"]["config"];
    wasm["configuration"]["value"] = admin_plugin.into();
    listeners.push(admin);
}

/// Local mode: the data-plane listener (`api`) and the admin one.
fn start_local() -> (Upstream, Envoy) {
    let upstream = Upstream::start();
    let mut config = local_config(&upstream);
    config.set_plugin_config(&format!("{{{LIMITS}}}")).unwrap();
    add_admin_listener(&mut config, "");
    let envoy = Envoy::start(&config, 2).unwrap_or_else(|e| panic!("{e:?}"));
    (upstream, envoy)
}

const GLOBAL: &str = r#", "store": {"webdis": {"timeout_ms": 5000}}"#;

/// Global mode: the same, over one Redis and webdis.
fn start_global() -> (Upstream, RedisWebdis, Envoy) {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let plugin = format!("{{{LIMITS}{GLOBAL}}}");
    let mut config = global_test_config(&upstream, backend.webdis.port(), Some(&plugin));
    add_admin_listener(&mut config, GLOBAL);
    let envoy = Envoy::start(&config, 2).unwrap_or_else(|e| panic!("{e:?}"));
    (upstream, backend, envoy)
}

fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Response {
    let mut all = vec![("Connection", b"close".as_slice())];
    all.extend_from_slice(headers);
    Conn::connect(addr)
        .unwrap()
        .request(method, path.as_bytes(), &all)
        .unwrap()
}

fn admin(addr: &str, method: &str, path: &str) -> Response {
    let auth = format!("Bearer {TOKEN}");
    send(addr, method, path, &[("authorization", auth.as_bytes())])
}

fn get(addr: &str, key: &str) -> Response {
    send(addr, "GET", "/", &[("x-api-key", key.as_bytes())])
}

/// Each limit's `remaining` in an admin answer, checked against its headers.
fn remaining(r: &Response) -> Vec<u64> {
    assert_eq!(r.status, 200, "{r:?}");
    let body: Value = serde_json::from_str(&r.body_str()).unwrap();
    let header = r.header("ratelimit").unwrap();
    body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let left = l["remaining"].as_u64().unwrap();
            let member = format!("\"{}\";r={left};", l["name"].as_str().unwrap());
            assert!(header.contains(&member), "{header} vs {body}");
            left
        })
        .collect()
}

#[test]
fn the_admin_listener_inspects_resets_and_grants_with_the_token_only_in_local_mode() {
    let (_upstream, envoy) = start_local();
    inspect_reset_and_grant(&envoy);
}

#[test]
fn the_admin_listener_inspects_resets_and_grants_with_the_token_only_in_global_mode() {
    let (_upstream, backend, envoy) = start_global();
    inspect_reset_and_grant(&envoy);
    // Redis holds the key under its hash only.
    let keys = backend.redis.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].ends_with(&sha256_hex("customer-key-42")),
        "{keys:?}"
    );
}

/// The story, in either mode: the 429s of a spent key come from Redis or
/// (global mode) this Envoy's deny cache, which a reset or grant clears.
fn inspect_reset_and_grant(envoy: &Envoy) {
    let api = envoy.listener_addr("api").unwrap();
    let ops = envoy.listener_addr("admin_api").unwrap();
    let key = "customer-key-42";

    // Without the token: 401; with a wrong one: 403; nothing changes.
    for (method, path) in [
        ("GET", format!("/keys/{key}")),
        ("DELETE", format!("/keys/{key}")),
        ("POST", format!("/keys/{key}/grant?amount=5")),
    ] {
        let r = send(&ops, method, &path, &[]);
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = send(&ops, method, &path, &[("authorization", b"Bearer nope")]);
        assert_eq!(r.status, 403, "{r:?}");
    }

    // Spend the rate; inspect matches the last response's headers.
    let mut last = None;
    for _ in 0..3 {
        let r = get(&api, key);
        assert_eq!(r.status, 200, "{r:?}");
        last = Some(r);
    }
    assert_eq!(get(&api, key).status, 429);
    let last = last.unwrap();
    let inspected = remaining(&admin(&ops, "GET", &format!("/keys/{key}")));
    assert_eq!(
        inspected,
        [
            last.ratelimit_remaining("3/min"),
            last.ratelimit_remaining("daily")
        ]
    );
    assert_eq!(inspected, [0, 2]);

    // Grant 1: exactly one more request fits.
    let granted = remaining(&admin(&ops, "POST", &format!("/keys/{key}/grant?amount=1")));
    assert_eq!(granted, [1, 3]);
    assert_eq!(get(&api, key).status, 200);
    assert_eq!(get(&api, key).status, 429);

    // Reset: the full quota on the next request.
    assert_eq!(
        remaining(&admin(&ops, "DELETE", &format!("/keys/{key}"))),
        [3, 5]
    );
    let r = get(&api, key);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (
            r.ratelimit_remaining("3/min"),
            r.ratelimit_remaining("daily")
        ),
        (2, 4)
    );

    // The admin listener limits nothing itself: a key-less call is a 401
    // for the token, never a rate-limit 401 or 429.
    let r = send(&ops, "GET", "/", &[("x-api-key", key.as_bytes())]);
    assert_eq!(r.status, 401, "{r:?}");

    // The log names the key by its SHA-256, never in plain text.
    let log = envoy.proc().log();
    let hashed = format!("sha256:{}", sha256_hex(key));
    for op in ["inspect", "grant", "reset"] {
        assert!(
            log.contains(&format!("admin {op} of key {hashed}: 200")),
            "{op}: {log}"
        );
    }
    assert!(!log.contains(key), "the plain key is in the log");
}
