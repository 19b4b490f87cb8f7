//! `envoy/docker-compose.yaml` run for real, as the README tells a user to, and the
//! Istio plugin image's layout.
//!
//! A Docker engine is used if one answers, else `dockerd` is started here and
//! stopped after each test. Images no registry serves here are replaced by local
//! stand-ins built once (`envoy/images/standins.sh`: Debian 12 from mmdebstrap,
//! the same Envoy binary as `.venv/envoy`, Debian's Redis, the host-built
//! upstream as the upstream Dockerfile's build stage), selected through the
//! compose file's `${ENVOY_IMAGE:-...}` variables. Each profile is brought up and
//! waited on until healthy, checked from the host on 127.0.0.1 only, and brought
//! down (`down -v`), leaving no container, network or volume of its project.
//! The tests share the host's ports 9018/9901/9900, so they run one at a time.

use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use e2e::docker::{self, Engine, Stack};
use e2e::{http, paths, tutorial};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const PROJECT: &str = "apikey_ratelimit_e2e";
const FRONT: &str = "127.0.0.1:9018";

/// A password for Redis (letters and digits, 32), from the kernel's randomness.
fn password() -> String {
    let mut buf = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `check` on `profile` brought up with `extra` variables, then brings it down
/// and asserts nothing of the project is left.
fn with_profile(profile: &str, extra: &[(&str, &str)], check: impl FnOnce(&Stack)) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let engine = Engine::ensure().unwrap_or_else(|e| panic!("{e}"));
    let mut env = docker::standin_env().unwrap_or_else(|e| panic!("{e}"));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut stack = Stack::up(PROJECT, profile, &env).unwrap_or_else(|e| panic!("{e}"));
    check(&stack);
    stack.down().unwrap_or_else(|e| panic!("{e}"));
    let left = docker::leftovers(PROJECT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, "", "down -v left these behind");
    drop(engine);
}

fn global_env(mode: Option<&str>) -> Vec<(&'static str, String)> {
    let filter = password();
    // REDISCLI_AUTH: the filter's password for `redis-cli` in the Redis container.
    let mut env = vec![
        ("REDIS_PASSWORD", filter.clone()),
        ("REDISCLI_AUTH", filter),
        ("REDIS_ADMIN_PASSWORD", password()),
    ];
    if let Some(m) = mode {
        env.push(("MODE", m.to_owned()));
    }
    env
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// `curl` twice within the second: 200, then 429 with `Retry-After`.
fn assert_200_then_429() {
    let first = http::get(FRONT, "/?api_key=compose-curl").unwrap();
    assert_eq!(first.status, 200, "{}", first.body_str());
    let second = http::get(FRONT, "/?api_key=compose-curl").unwrap();
    assert_eq!(second.status, 429, "{}", second.body_str());
    assert!(second.header("retry-after").is_some(), "no Retry-After");
}

fn assert_tutorial_admits(expected: usize) {
    let table = tutorial::run(FRONT);
    assert_eq!(
        (table.count(200), table.count(429)),
        (expected, 100 - expected),
        "{table}"
    );
}

#[test]
#[ignore = "heavy (a Docker engine, 13 containers): `make test` runs it last, through `make compose-e2e`"]
fn compose_local_profile_answers_200_then_429_and_admits_ten_of_a_hundred() {
    with_profile("local", &[], |stack| {
        assert_200_then_429();
        assert_tutorial_admits(10);
        let published = stack.published().unwrap();
        assert_eq!(published, ["127.0.0.1:9018", "127.0.0.1:9901"]);
    });
}

#[test]
#[ignore = "heavy (a Docker engine, 13 containers): `make test` runs it last, through `make compose-e2e`"]
fn compose_global_profile_admits_ten_hides_webdis_and_locks_redis_to_the_function() {
    let env = global_env(None);
    with_profile("global", &borrowed(&env), |stack| {
        assert_200_then_429();
        assert_tutorial_admits(10);

        // Nothing but Envoy's listener and admin (both on loopback) is published,
        // and webdis listens only inside Envoy's network namespace.
        assert_eq!(
            stack.published().unwrap(),
            ["127.0.0.1:9018", "127.0.0.1:9901"]
        );
        let envoy_ip = stack.ip("envoy-global").unwrap();
        let webdis = TcpStream::connect_timeout(
            &format!("{envoy_ip}:7379").parse().unwrap(),
            Duration::from_secs(3),
        );
        assert!(
            webdis.is_err(),
            "webdis answered from the host at {envoy_ip}:7379"
        );

        // The filter's Redis user may call its function, and nothing else.
        let as_filter = |args: &[&str]| {
            let mut cli = vec!["redis-cli", "--user", "default"];
            cli.extend_from_slice(args);
            stack.exec("redis", &["REDISCLI_AUTH"], &cli).unwrap()
        };
        let health = as_filter(&[
            "FCALL",
            "apikey_ratelimit_gcra",
            "1",
            "apikey_ratelimit:health",
            "0",
        ]);
        assert!(health.starts_with("1\n0\n"), "FCALL refused: {health}");
        for refused in [
            &["GET", "apikey_ratelimit:x"][..],
            &["EVAL", "return 1", "0"],
            &["FUNCTION", "LIST"],
            &["CONFIG", "GET", "*"],
            &["KEYS", "*"],
            &["FLUSHALL"],
        ] {
            let out = as_filter(refused);
            assert!(
                out.starts_with("NOPERM"),
                "{refused:?} was not refused: {out}"
            );
        }
    });
}

#[test]
#[ignore = "heavy (a Docker engine, 13 containers): `make test` runs it last, through `make compose-e2e`"]
fn compose_replicas_with_redis_counters_admit_exactly_ten() {
    let env = global_env(None);
    with_profile("replicas", &borrowed(&env), |_| {
        assert_200_then_429();
        assert_tutorial_admits(10);
    });
}

#[test]
#[ignore = "heavy (a Docker engine, 13 containers): `make test` runs it last, through `make compose-e2e`"]
fn compose_replicas_with_local_counters_admit_far_more_than_ten() {
    let env = global_env(Some("local"));
    with_profile("replicas", &borrowed(&env), |_| {
        // "Far more" needs no exact timing, and 13 containers' health checks
        // load a small machine.
        let table = tutorial::run_unchecked(FRONT);
        assert!(table.count(200) >= 40, "{table}");
        assert_eq!(table.count(200) + table.count(429), 100, "{table}");
    });
}

/// What Istio's OCI fetcher expects of a `FROM scratch` plugin image: one layer,
/// holding `plugin.wasm` at its root and nothing else, the built `.wasm`'s bytes.
#[test]
#[ignore = "heavy (a Docker engine, 13 containers): `make test` runs it last, through `make compose-e2e`"]
fn the_plugin_image_is_one_layer_holding_the_built_wasm_as_plugin_wasm() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let _engine = Engine::ensure().unwrap_or_else(|e| panic!("{e}"));
    let root = paths::repo_root();
    let image = "apikey-ratelimit-e2e/filter:test";
    docker::run(
        Command::new("make")
            .current_dir(&root)
            .args(["--no-print-directory", "image-filter"])
            .args(["REGISTRY=apikey-ratelimit-e2e", "VERSION=test"]),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("image.tar");
    docker::run(
        Command::new("docker")
            .args(["save", "-o"])
            .arg(&saved)
            .arg(image),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    docker::run(Command::new("docker").args(["rmi", image])).unwrap_or_else(|e| panic!("{e}"));
    docker::run(
        Command::new("tar")
            .arg("-xf")
            .arg(&saved)
            .arg("-C")
            .arg(dir.path()),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let layers = manifest[0]["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = dir.path().join(layers[0].as_str().unwrap());
    let entries =
        docker::run(Command::new("tar").arg("-tf").arg(&layer)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(entries.trim(), "plugin.wasm", "the layer holds more");
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(&layer)
        .arg("plugin.wasm")
        .output()
        .unwrap();
    let built = std::fs::read(paths::wasm_path().unwrap()).unwrap();
    assert!(
        out.stdout == built,
        "plugin.wasm differs from the built .wasm"
    );
}
