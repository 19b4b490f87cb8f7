//! The admin API's reset and grant reach every replica (issue 13, global
//! mode). A throttled key's denial is cached on each replica; the admin
//! plugin's own Envoy clears its entry, but the others would answer 429 from
//! theirs until its time. So the admin function counts every reset and grant
//! in `<key_prefix>epoch`, each worker polls it every `admin_sync_ms`, and a
//! worker that sees it move stops trusting the entries it cached before
//! (`docs/design.md#the-deny-cache`): the next request asks Redis.
//!
//! Here: three replicas of two workers over one Redis, the admin listener on
//! the first. The key's `3/h` is spent and its denial cached on every
//! replica (so without the epoch its 429s would last 20 minutes); after a
//! reset each replica admits it again within a bounded wait, then the same
//! after a grant, which gives back exactly what it says.

use std::time::{Duration, Instant};

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::http::send_once as send;
use e2e::metrics::{metric, metric_name};
use e2e::poll_until;
use e2e::topology::{global_test_config, start_envoys};
use e2e::upstream::Upstream;

const TOKEN: &str = "operator-token-9";
const KEY: &str = "epoch-key-1";
const REPLICAS: usize = 3;
const WORKERS: u32 = 2;
/// A cached denial of this rate lasts 20 minutes: only the epoch can end it
/// within the test.
const PLUGIN: &str =
    r#"{"limits": ["3/h"], "store": {"webdis": {"timeout_ms": 5000, "admin_sync_ms": 200}}}"#;
/// Far above `admin_sync_ms` plus a tick and a round trip, far below the
/// cached denial's 20 minutes: how long a replica may keep denying.
const SYNC_BOUND: Duration = Duration::from_secs(10);

struct Cluster {
    _upstream: Upstream,
    backend: RedisWebdis,
    replicas: Vec<Envoy>,
}

/// The replicas, the first with the admin listener (same plugin name, so the
/// same shared data and Redis keys).
fn start() -> Cluster {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let configs: Vec<_> = (0..REPLICAS)
        .map(|i| {
            let mut config = global_test_config(&upstream, backend.webdis.port(), Some(PLUGIN));
            if i == 0 {
                let admin = PLUGIN.replacen(
                    '{',
                    &format!(r#"{{"admin": {{"token_sha256": "{}"}}, "#, token_sha256()),
                    1,
                );
                config
                    .add_listener_with_plugin("admin_api", &admin)
                    .unwrap();
            }
            config
        })
        .collect();
    let replicas = start_envoys(&configs, WORKERS, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    Cluster {
        _upstream: upstream,
        backend,
        replicas,
    }
}

fn token_sha256() -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A request of `KEY`: 200 or 429, nothing else.
fn get(addr: &str) -> u16 {
    let r = send(addr, "GET", "/", &[("x-api-key", KEY.as_bytes())]);
    assert!(matches!(r.status, 200 | 429), "{r:?}");
    r.status
}

fn admin(cluster: &Cluster, method: &str, path: &str) {
    let ops = cluster.replicas[0].listener_addr("admin_api").unwrap();
    let auth = format!("Bearer {TOKEN}");
    let r = send(&ops, method, path, &[("authorization", auth.as_bytes())]);
    assert_eq!(r.status, 200, "{method} {path}: {r:?}");
}

fn api(cluster: &Cluster) -> Vec<String> {
    cluster
        .replicas
        .iter()
        .map(|r| r.listener_addr("api").unwrap())
        .collect()
}

/// Each replica denies the spent key, and answers it from its deny cache
/// (its `backend_cache_hits` grows).
fn cache_the_denial_everywhere(cluster: &Cluster) {
    for (i, (replica, addr)) in cluster.replicas.iter().zip(api(cluster)).enumerate() {
        let hits = metric(replica, "backend_cache_hits");
        let cached = poll_until(SYNC_BOUND, Duration::from_millis(50), || {
            assert_eq!(get(&addr), 429, "replica {i}: the key is spent");
            let now = replica.counter(&metric_name("backend_cache_hits"));
            now.filter(|n| *n > hits)
        });
        assert!(cached.is_some(), "replica {i} never denied from its cache");
    }
}

/// Each replica admits the key once, within `SYNC_BOUND` of the admin call
/// (asked in turn, the admin's own Envoy last).
fn every_replica_admits_once(cluster: &Cluster, after: &str) {
    let addrs = api(cluster);
    let start = Instant::now();
    for i in (1..REPLICAS).chain([0]) {
        let admitted = poll_until(SYNC_BOUND, Duration::from_millis(20), || {
            (get(&addrs[i]) == 200).then_some(())
        });
        assert!(
            admitted.is_some(),
            "replica {i} still denies {SYNC_BOUND:?} after the {after}: its cached denial outlived it"
        );
        eprintln!(
            "{after}: replica {i} admitted {:?} after it",
            start.elapsed()
        );
    }
}

#[test]
fn a_reset_or_grant_reaches_every_replicas_deny_cache_within_admin_sync_ms() {
    let cluster = start();
    let addrs = api(&cluster);
    for _ in 0..3 {
        assert_eq!(get(&addrs[1]), 200);
    }
    cache_the_denial_everywhere(&cluster);

    // Reset: the full quota, whichever replica the next request reaches.
    admin(&cluster, "DELETE", &format!("/keys/{KEY}"));
    every_replica_admits_once(&cluster, "reset");

    // Spent again (one a replica), cached again; a grant of 3 gives back
    // exactly 3, one a replica, and no more.
    cache_the_denial_everywhere(&cluster);
    admin(&cluster, "POST", &format!("/keys/{KEY}/grant?amount=3"));
    every_replica_admits_once(&cluster, "grant");
    for addr in &addrs {
        assert_eq!(get(addr), 429, "the grant gave more than 3");
    }

    // Every worker of every replica moved to the new epoch (each at least
    // once: it may have seen both changes in one poll), and Redis counted
    // both calls.
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let changes = replica.wait_counter(
            &metric_name("admin_epoch_changes"),
            u64::from(WORKERS),
            SYNC_BOUND,
        );
        assert!(changes.is_ok(), "replica {i}: {changes:?}");
        let polls = replica.counter(&metric_name("admin_epoch_polls"));
        assert!(polls.unwrap_or(0) > 0, "replica {i} never polled");
    }
    let epoch = cluster
        .backend
        .redis
        .cli(&["HGET", "apikey_ratelimit:api:epoch", "n"]);
    assert_eq!(epoch.trim(), "2");
}

/// `FCALL` as the filter's Redis user, whose ACL allows what the functions
/// run and nothing else; the reply's lines.
fn fcall(backend: &RedisWebdis, args: &[&str]) -> Vec<String> {
    let out = backend.redis.cli_as_webdis(&[&["FCALL"], args].concat());
    out.lines().map(str::to_string).collect()
}

const EPOCH: &str = "apikey_ratelimit:t:epoch";
const STATE: &str = "apikey_ratelimit:t:state";

/// `apikey_ratelimit_admin` on `STATE` over one `3/h` limit.
fn admin_call(backend: &RedisWebdis, keys: &[&str], op: &str, amount: &str) -> Vec<String> {
    let count = keys.len().to_string();
    let mut args = vec!["apikey_ratelimit_admin", count.as_str()];
    args.extend_from_slice(keys);
    args.extend_from_slice(&["5", op, amount, "1", "3/h", "1200000000", "3600000000"]);
    fcall(backend, &args)
}

fn epoch(backend: &RedisWebdis) -> Vec<String> {
    fcall(backend, &["apikey_ratelimit_epoch", "1", EPOCH, "7"])
}

fn stored(backend: &RedisWebdis) -> String {
    backend
        .redis
        .cli(&["HGET", STATE, "3/h"])
        .trim()
        .to_string()
}

fn refused(reply: &[String], what: &str) {
    assert!(
        reply
            .first()
            .is_some_and(|l| l.starts_with("ERR") || l.starts_with("WRONGTYPE")),
        "{what}: {reply:?}"
    );
}

#[test]
fn resets_and_grants_count_the_epoch_and_malformed_calls_write_nothing() {
    let backend = RedisWebdis::start();
    // No reset yet: epoch 0, and reading it writes nothing.
    assert_eq!(epoch(&backend), ["7", "0"]);
    assert!(backend.redis.keys().is_empty());
    let future = "99999999999999999";
    backend.redis.cli(&["HSET", STATE, "3/h", future]);

    // Inspect counts nothing; reset and grant count one each.
    let two = [STATE, EPOCH];
    assert_eq!(admin_call(&backend, &two, "0", "0").first().unwrap(), "5");
    assert_eq!(epoch(&backend), ["7", "0"]);
    assert_eq!(admin_call(&backend, &two, "1", "0").first().unwrap(), "5");
    assert_eq!(stored(&backend), "0");
    assert_eq!(epoch(&backend), ["7", "1"]);
    assert_eq!(admin_call(&backend, &two, "2", "1").first().unwrap(), "5");
    assert_eq!(epoch(&backend), ["7", "2"]);
    // The one-key form of earlier filters still works, counting nothing.
    backend.redis.cli(&["HSET", STATE, "3/h", future]);
    assert_eq!(
        admin_call(&backend, &[STATE], "1", "0").first().unwrap(),
        "5"
    );
    assert_eq!(stored(&backend), "0");
    assert_eq!(epoch(&backend), ["7", "2"]);

    // Malformed admin calls are refused before anything is written: the
    // state and the epoch stay as they are.
    backend.redis.cli(&["HSET", STATE, "3/h", future]);
    backend
        .redis
        .cli(&["SET", "apikey_ratelimit:t:junk", "not-a-count"]);
    backend
        .redis
        .cli(&["HSET", "apikey_ratelimit:t:bad-n", "n", "1.5"]);
    for (keys, op, amount, what) in [
        (
            &[STATE, EPOCH, "apikey_ratelimit:t:x"][..],
            "1",
            "0",
            "three keys",
        ),
        (&[][..], "1", "0", "no key"),
        (&two[..], "3", "0", "op 3"),
        (&two[..], "-1", "0", "a negative op"),
        (&two[..], "1", "1.5", "a fractional amount"),
        (&two[..], "2", "inf", "an infinite amount"),
        (
            &[STATE, "apikey_ratelimit:t:junk"][..],
            "1",
            "0",
            "an epoch that is no count",
        ),
        (&[STATE, STATE][..], "1", "0", "the state as the epoch"),
        (
            &[STATE, "apikey_ratelimit:t:bad-n"][..],
            "2",
            "1",
            "an epoch hash whose count is no count",
        ),
    ] {
        refused(&admin_call(&backend, keys, op, amount), what);
        assert_eq!(stored(&backend), future, "{what}");
        assert_eq!(epoch(&backend), ["7", "2"], "{what}");
    }

    // Malformed epoch calls are refused.
    for (args, what) in [
        (&["0", "7"][..], "no key"),
        (&["2", EPOCH, STATE, "7"][..], "two keys"),
        (&["1", EPOCH][..], "no nonce"),
        (&["1", EPOCH, "-1"][..], "a negative nonce"),
        (&["1", EPOCH, "1.5"][..], "a fractional nonce"),
        (&["1", EPOCH, "inf"][..], "an infinite nonce"),
        (&["1", EPOCH, "7", "8"][..], "an argument too many"),
        (
            &["1", "apikey_ratelimit:t:junk", "7"][..],
            "an epoch that is no count",
        ),
        (
            &["1", "apikey_ratelimit:t:bad-n", "7"][..],
            "an epoch hash whose count is no count",
        ),
    ] {
        let mut call = vec!["apikey_ratelimit_epoch"];
        call.extend_from_slice(args);
        refused(&fcall(&backend, &call), what);
    }
    assert_eq!(stored(&backend), future);
    assert_eq!(epoch(&backend), ["7", "2"]);
}
