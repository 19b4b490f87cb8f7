//! A key's usage for its operator (issue 13): one Envoy with the
//! data-plane listener and an admin listener whose plugin has the same
//! `name`, `root_id` and `vm_id` (so it sees the same shared data, hash seed
//! and, in global mode, deny cache and Redis keys) and an `admin` token. In
//! local mode it acts on shared data, in global mode on Redis. Without the token every call is 401 (none)
//! or 403 (a wrong one); with it, inspect matches the headers, reset
//! restores the full quota on the next request, and grant extends it. The
//! log names keys by their SHA-256 only. A key may be named `sha256:<hex>`
//! wherever that addresses its state exactly: in global mode without
//! `key_hash_secret` always, elsewhere only for keys listed in plain.

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::envoy_config::EnvoyConfig;
use e2e::http::{send_once as send, Response};
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
/// admin API: `LIMITS` and `extra` (the store, overrides), and the token's
/// hash.
fn add_admin_listener(config: &mut EnvoyConfig, extra: &str) {
    let admin_plugin = format!(
        r#"{{{LIMITS}{extra}, "admin": {{"token_sha256": "{}"}}}}"#,
        sha256_hex(TOKEN)
    );
    config
        .add_listener_with_plugin("admin_api", &admin_plugin)
        .unwrap();
}

/// Local mode: the data-plane listener (`api`) and the admin one, both
/// with `extra`.
fn start_local(extra: &str) -> (Upstream, Envoy) {
    let upstream = Upstream::start();
    let mut config = local_config(&upstream);
    config
        .set_plugin_config(&format!("{{{LIMITS}{extra}}}"))
        .unwrap();
    add_admin_listener(&mut config, extra);
    let envoy = Envoy::start(&config, 2).unwrap_or_else(|e| panic!("{e:?}"));
    (upstream, envoy)
}

const GLOBAL: &str = r#", "store": {"webdis": {"timeout_ms": 5000}}"#;
const GLOBAL_WITH_SECRET: &str =
    r#", "store": {"webdis": {"timeout_ms": 5000, "key_hash_secret": "pepper-1"}}"#;

/// Global mode: the same, over one Redis and webdis; `extra` holds the
/// store.
fn start_global(extra: &str) -> (Upstream, RedisWebdis, Envoy) {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let plugin = format!("{{{LIMITS}{extra}}}");
    let mut config = global_test_config(&upstream, backend.webdis.port(), Some(&plugin));
    add_admin_listener(&mut config, extra);
    let envoy = Envoy::start(&config, 2).unwrap_or_else(|e| panic!("{e:?}"));
    (upstream, backend, envoy)
}

/// A key listed as `sha256:` (on `2/min`) and one listed in plain (on
/// `4/min`), each an override: a plan of one key.
const HASHED_KEY: &str = "hashed-key-7";
const LISTED_KEY: &str = "listed-key-8";

fn overrides() -> String {
    format!(
        r#", "overrides": [{{"key": "sha256:{}", "limits": ["2/min"]}},
                           {{"key": "{LISTED_KEY}", "limits": ["4/min"]}}]"#,
        sha256_hex(HASHED_KEY)
    )
}

/// `sha256:<hex>` of `key`, the hex in upper case (either case is
/// accepted).
fn digest_name(key: &str) -> String {
    format!("sha256:{}", sha256_hex(key).to_uppercase())
}

fn by_digest(key: &str) -> String {
    format!("/keys/{}", digest_name(key))
}

/// Where the admin function counts resets and grants, under the default
/// key prefix of the plugin `api`.
const EPOCH_KEY: &str = "apikey_ratelimit:api:epoch";

/// Redis's keys but the admin epoch: the keys' states, sorted.
fn state_keys(backend: &RedisWebdis) -> Vec<String> {
    let mut keys = backend.redis.keys();
    keys.retain(|k| k != EPOCH_KEY);
    keys
}

/// The refusal of a `sha256:` key the mode cannot address.
fn assert_refused(r: &Response, why: &str) {
    assert_eq!(r.status, 400, "{r:?}");
    let body: Value = serde_json::from_str(&r.body_str()).unwrap();
    assert_eq!(
        body["detail"].as_str().unwrap(),
        format!(
            "A sha256: key cannot address this key's state: {why}. Send the plain key instead, percent-encoded: /keys/<key>."
        ),
        "{body}"
    );
}

const LOCAL_WHY: &str = "local slots are chosen by a keyed hash of the plain key";
const SECRET_WHY: &str =
    "with store.webdis.key_hash_secret its Redis key is an HMAC of the plain key";

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
    let (_upstream, envoy) = start_local("");
    inspect_reset_and_grant(&envoy, "customer-key-42", "customer-key-42");
}

#[test]
fn the_admin_listener_inspects_resets_and_grants_with_the_token_only_in_global_mode() {
    let (_upstream, backend, envoy) = start_global(GLOBAL);
    inspect_reset_and_grant(&envoy, "customer-key-42", "customer-key-42");
    // Redis holds the key under its hash only, and the admin epoch, counted
    // up by the grant and the reset (`admin_epoch.rs`).
    let keys = state_keys(&backend);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(backend.redis.cli(&["HGET", EPOCH_KEY, "n"]).trim(), "2");
    assert!(
        keys[0].ends_with(&sha256_hex("customer-key-42")),
        "{keys:?}"
    );
}

#[test]
fn the_admin_listener_acts_by_sha256_as_by_plain_key_in_global_mode() {
    let (_upstream, backend, envoy) = start_global(&format!("{GLOBAL}{}", overrides()));
    // A key no plan lists, named only by its digest: the same answers as by
    // the plain key, and the data path (with its deny cache) sees them.
    let key = "customer-key-43";
    inspect_reset_and_grant(&envoy, key, &digest_name(key));
    let api = envoy.listener_addr("api").unwrap();
    let ops = envoy.listener_addr("admin_api").unwrap();
    // Overrides are found by digest, whether listed as `sha256:` or plain.
    for (listed, left) in [(HASHED_KEY, 2), (LISTED_KEY, 4)] {
        assert_eq!(remaining(&admin(&ops, "GET", &by_digest(listed))), [left]);
        assert_eq!(get(&api, listed).status, 200);
        assert_eq!(
            remaining(&admin(&ops, "GET", &by_digest(listed))),
            [left - 1]
        );
        assert_eq!(
            remaining(&admin(&ops, "DELETE", &by_digest(listed))),
            [left]
        );
    }
    // A broken digest is a 400 of its own.
    let r = admin(&ops, "GET", "/keys/sha256:abc");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body_str().contains("64 hex"), "{r:?}");
    let keys = state_keys(&backend);
    let mut want: Vec<String> = [key, HASHED_KEY, LISTED_KEY]
        .iter()
        .map(|k| sha256_hex(k))
        .collect();
    want.sort();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for k in &keys {
        assert!(want.iter().any(|w| k.ends_with(w.as_str())), "{keys:?}");
    }
    let log = envoy.proc().log();
    for listed in [HASHED_KEY, LISTED_KEY] {
        assert!(
            log.contains(&format!(
                "admin reset of key sha256:{}: 200",
                sha256_hex(listed)
            )),
            "{log}"
        );
        assert!(!log.contains(listed), "the plain key is in the log");
    }
}

#[test]
fn a_sha256_key_is_refused_in_global_mode_with_a_secret_unless_listed_in_plain() {
    let extra = format!("{GLOBAL_WITH_SECRET}{}", overrides());
    let (_upstream, _backend, envoy) = start_global(&extra);
    let api = envoy.listener_addr("api").unwrap();
    let ops = envoy.listener_addr("admin_api").unwrap();
    for key in ["customer-key-44", HASHED_KEY] {
        for (method, path) in [
            ("GET", by_digest(key)),
            ("DELETE", by_digest(key)),
            ("POST", format!("{}/grant?amount=1", by_digest(key))),
        ] {
            assert_refused(&admin(&ops, method, &path), SECRET_WHY);
        }
    }
    // The configuration lists this one in plain: its digest leads to it.
    assert_eq!(get(&api, LISTED_KEY).status, 200);
    assert_eq!(remaining(&admin(&ops, "GET", &by_digest(LISTED_KEY))), [3]);
    assert_eq!(
        remaining(&admin(&ops, "DELETE", &by_digest(LISTED_KEY))),
        [4]
    );
    assert_eq!(get(&api, LISTED_KEY).ratelimit_remaining("4/min"), 3);
}

#[test]
fn a_sha256_key_is_refused_in_local_mode_unless_listed_in_plain() {
    let (_upstream, envoy) = start_local(&overrides());
    let api = envoy.listener_addr("api").unwrap();
    let ops = envoy.listener_addr("admin_api").unwrap();
    for key in ["customer-key-45", HASHED_KEY] {
        assert_refused(&admin(&ops, "GET", &by_digest(key)), LOCAL_WHY);
        let grant = format!("{}/grant?amount=1", by_digest(key));
        assert_refused(&admin(&ops, "POST", &grant), LOCAL_WHY);
    }
    assert_eq!(get(&api, LISTED_KEY).status, 200);
    assert_eq!(remaining(&admin(&ops, "GET", &by_digest(LISTED_KEY))), [3]);
    assert_eq!(
        remaining(&admin(&ops, "DELETE", &by_digest(LISTED_KEY))),
        [4]
    );
    assert_eq!(get(&api, LISTED_KEY).ratelimit_remaining("4/min"), 3);
}

/// The story, in either mode, for `key` named `name` in admin paths: the
/// 429s of a spent key come from Redis or (global mode) this Envoy's deny
/// cache, which a reset or grant clears.
fn inspect_reset_and_grant(envoy: &Envoy, key: &str, name: &str) {
    let api = envoy.listener_addr("api").unwrap();
    let ops = envoy.listener_addr("admin_api").unwrap();

    // Without the token: 401; with a wrong one: 403; nothing changes.
    for (method, path) in [
        ("GET", format!("/keys/{name}")),
        ("DELETE", format!("/keys/{name}")),
        ("POST", format!("/keys/{name}/grant?amount=5")),
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
    let inspected = remaining(&admin(&ops, "GET", &format!("/keys/{name}")));
    assert_eq!(
        inspected,
        [
            last.ratelimit_remaining("3/min"),
            last.ratelimit_remaining("daily")
        ]
    );
    assert_eq!(inspected, [0, 2]);

    // Grant 1: exactly one more request fits.
    let granted = remaining(&admin(
        &ops,
        "POST",
        &format!("/keys/{name}/grant?amount=1"),
    ));
    assert_eq!(granted, [1, 3]);
    assert_eq!(get(&api, key).status, 200);
    assert_eq!(get(&api, key).status, 429);

    // Reset: the full quota on the next request.
    assert_eq!(
        remaining(&admin(&ops, "DELETE", &format!("/keys/{name}"))),
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
