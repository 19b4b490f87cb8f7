//! The deployment files, checked by real validators (no Docker engine and no
//! Kubernetes here, so this is as far as this machine can go):
//!
//! - `envoy/docker-compose.yaml`: Debian's `docker-compose` (1.29) `config`,
//!   for every profile; what it mounts is what the tests run;
//! - `envoy/compose/*.yaml`: differ from the tested `envoy/*.yaml` in
//!   addresses and the `.wasm` path only, pass `envoy --mode validate`, and
//!   run for real on loopback;
//! - `k8s/`: rendered by `kubectl kustomize`; core kinds checked by
//!   `kubernetes-validate` 1.37.0 (PyPI) with `--strict` against Kubernetes
//!   1.32's schemas; `WasmPlugin` and `EnvoyFilter` by the schema validators
//!   compiled into `@kubernetes-models/istio` 3.0.1 (npm), from Istio's CRDs;
//!   deliberately broken copies are refused by each validator;
//! - every plugin configuration (Envoy YAML, compose, `pluginConfig`) goes
//!   through the filter's own parser and names a cluster that exists;
//! - the webdis and Redis files compose mounts and the ConfigMaps hold are
//!   the very files the global-mode tests run;
//! - both run one pinned, supported Redis line, and their Redis probes (an
//!   authenticated PING, password in REDISCLI_AUTH) pass on a live Redis and
//!   fail on a wedged (BUSY) one, run for real.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

mod common;

use e2e::backend::Redis;
use e2e::backend::RedisWebdis;
use e2e::envoy::{self, Envoy};
use e2e::envoy_config::EnvoyConfig;
use e2e::http;
use e2e::metrics::metric;
use e2e::paths;
use e2e::ports::free_port;
use e2e::process::Proc;
use e2e::upstream::Upstream;
use ratelimit_core::Policy;
use serde_json::Value;

const COMPOSE_CONFIGS: [&str; 3] = ["local.yaml", "global.yaml", "front.yaml"];
const KUBERNETES_VERSION: &str = "1.32.0";

fn repo() -> PathBuf {
    paths::repo_root()
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", command.get_program()))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------- compose

fn compose(args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = paths::docker_compose_bin().unwrap_or_else(|e| panic!("{e}"));
    let mut command = Command::new(bin);
    command
        .current_dir(repo())
        .env_remove("REDIS_PASSWORD")
        .env_remove("MODE")
        .args(["-f", "envoy/docker-compose.yaml"])
        .args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    run(&mut command)
}

#[test]
fn the_compose_file_is_valid_for_docker_compose_in_every_profile() {
    for profile in [None, Some("local"), Some("global"), Some("replicas")] {
        for env in [
            &[][..],
            &[("REDIS_PASSWORD", "s3cret0")][..],
            &[
                ("REDIS_PASSWORD", "s3cret0"),
                ("MODE", "local"),
                ("WORKERS", "6"),
            ][..],
        ] {
            let mut args: Vec<&str> = profile.map_or(vec![], |p| vec!["--profile", p]);
            args.extend(["config", "-q"]);
            let out = compose(&args, env);
            assert!(out.status.success(), "{args:?} {env:?}: {}", text(&out));
        }
    }
    // The validator bites: a misspelt key in a copy is refused.
    let original = std::fs::read_to_string(repo().join("envoy/docker-compose.yaml")).unwrap();
    let broken = original.replacen("    network_mode:", "    network_mod:", 1);
    assert_ne!(broken, original);
    let dir = tempfile::Builder::new()
        .prefix("e2e-compose-")
        .tempdir_in(repo().join("envoy"))
        .unwrap();
    let copy = dir.path().join("docker-compose.yaml");
    std::fs::write(&copy, broken).unwrap();
    let bin = paths::docker_compose_bin().unwrap();
    let out = run(Command::new(bin)
        .arg("-f")
        .arg(&copy)
        .args(["config", "-q"]));
    assert!(!out.status.success(), "a broken compose file passed");
    assert!(text(&out).contains("network_mod"), "{}", text(&out));
}

/// The resolved compose config: service name -> its bind mounts
/// (target -> source, relative to the repository).
fn compose_mounts(env: &[(&str, &str)]) -> BTreeMap<String, BTreeMap<String, String>> {
    let out = compose(&["config"], env);
    assert!(out.status.success(), "{}", text(&out));
    let resolved: Value = serde_norway::from_slice(&out.stdout).unwrap();
    let root = std::fs::canonicalize(repo()).unwrap();
    let mut services = BTreeMap::new();
    for (name, service) in resolved["services"].as_object().unwrap() {
        let mut mounts = BTreeMap::new();
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = Path::new(volume["source"].as_str().unwrap());
            let relative = source.strip_prefix(&root).unwrap_or(source);
            mounts.insert(
                volume["target"].as_str().unwrap().to_string(),
                relative.display().to_string(),
            );
        }
        services.insert(name.clone(), mounts);
    }
    services
}

#[test]
fn compose_mounts_the_files_the_tests_run() {
    let wasm = "target/wasm32-wasip1/release/apikey_ratelimit.wasm";
    for (mode, replica_config) in [
        ("global", "envoy/compose/global.yaml"),
        ("local", "envoy/compose/local.yaml"),
    ] {
        let services = compose_mounts(&[("REDIS_PASSWORD", "s3cret0"), ("MODE", mode)]);
        let mut expected: Vec<(String, &str, &str)> = vec![
            (
                "envoy-local".into(),
                "/etc/envoy/envoy.yaml",
                "envoy/compose/local.yaml",
            ),
            (
                "envoy-global".into(),
                "/etc/envoy/envoy.yaml",
                "envoy/compose/global.yaml",
            ),
            (
                "front".into(),
                "/etc/envoy/envoy.yaml",
                "envoy/compose/front.yaml",
            ),
            (
                "webdis-global".into(),
                "/etc/webdis/webdis.json",
                "envoy/webdis.json",
            ),
            (
                "redis".into(),
                "/etc/redis/redis-acl.conf",
                "envoy/redis-acl.conf",
            ),
            (
                "redis".into(),
                "/etc/redis/redis-start.sh",
                "envoy/redis-start.sh",
            ),
            (
                "redis".into(),
                "/etc/redis/gcra.lua",
                "filter/core/src/gcra.lua",
            ),
        ];
        for i in 1..=6 {
            expected.push((
                format!("replica-{i}"),
                "/etc/envoy/envoy.yaml",
                replica_config,
            ));
            expected.push((
                format!("replica-{i}"),
                "/etc/envoy/apikey_ratelimit.wasm",
                wasm,
            ));
            expected.push((
                format!("webdis-{i}"),
                "/etc/webdis/webdis.json",
                "envoy/webdis.json",
            ));
        }
        expected.push((
            "envoy-local".into(),
            "/etc/envoy/apikey_ratelimit.wasm",
            wasm,
        ));
        expected.push((
            "envoy-global".into(),
            "/etc/envoy/apikey_ratelimit.wasm",
            wasm,
        ));
        for (service, target, source) in expected {
            let mounts = services
                .get(&service)
                .unwrap_or_else(|| panic!("no service {service} in {services:?}"));
            assert_eq!(
                mounts.get(target).map(String::as_str),
                Some(source),
                "{service} {target}"
            );
        }
    }
}

/// A config tree with the addresses, the `.wasm` path and the cluster
/// endpoints (host and port: the compose front lists 6 replicas by name,
/// the tested one 2 by port) taken out. Listener and admin ports stay.
fn without_addresses(mut config: EnvoyConfig) -> Value {
    config.set_all_addresses("<address>");
    if !config.wasm_filenames().is_empty() {
        config.set_wasm_filename(Path::new("/wasm")).unwrap();
    }
    let mut tree = config.json().clone();
    fn first_endpoint_only(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(endpoints)) = map.get_mut("lb_endpoints") {
                    endpoints.truncate(1);
                    if let Some(port) = endpoints
                        .first_mut()
                        .and_then(|e| e.pointer_mut("/endpoint/address/socket_address/port_value"))
                    {
                        *port = Value::from("<port>");
                    }
                }
                map.values_mut().for_each(first_endpoint_only);
            }
            Value::Array(items) => items.iter_mut().for_each(first_endpoint_only),
            _ => {}
        }
    }
    first_endpoint_only(&mut tree);
    tree
}

#[test]
fn compose_envoy_configs_differ_from_the_tested_ones_in_addresses_only() {
    for name in COMPOSE_CONFIGS {
        let tested = EnvoyConfig::load(paths::shipped_config(name)).unwrap();
        let compose = EnvoyConfig::load(repo().join("envoy/compose").join(name)).unwrap();
        assert_eq!(
            without_addresses(compose),
            without_addresses(tested),
            "envoy/compose/{name} differs from envoy/{name} beyond addresses and the .wasm path"
        );
    }
}

#[test]
fn compose_envoy_configs_pass_envoy_validate_and_the_filters_parser() {
    let wasm = paths::wasm_path().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in COMPOSE_CONFIGS {
        let mut config = EnvoyConfig::load(repo().join("envoy/compose").join(name)).unwrap();
        if !config.wasm_filenames().is_empty() {
            // The container's /etc/envoy path, pointed at the built module:
            // validation loads it and runs its on_configure.
            config.set_wasm_filename(&wasm).unwrap();
            common::plugin_policy(&format!("envoy/compose/{name}"), &config);
        }
        let path = dir.path().join(name.replace(".yaml", ".json"));
        config.write(&path).unwrap();
        envoy::validate(&path).unwrap_or_else(|e| panic!("envoy/compose/{name}: {e}"));
    }
}

#[test]
fn compose_envoy_configs_run_for_real_on_loopback() {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    for name in ["local.yaml", "global.yaml"] {
        let mut config = EnvoyConfig::load(repo().join("envoy/compose").join(name)).unwrap();
        config.set_all_addresses("127.0.0.1");
        config.set_admin_port(free_port()).unwrap();
        let (listener, _) = config.first_listener().unwrap();
        config.set_listener_port(&listener, free_port()).unwrap();
        config
            .set_cluster_endpoint("upstream", "127.0.0.1", upstream.port())
            .unwrap();
        if name == "global.yaml" {
            config
                .set_cluster_endpoint("webdis", "127.0.0.1", backend.webdis.port())
                .unwrap();
        }
        config
            .set_wasm_filename(&paths::wasm_path().unwrap())
            .unwrap();
        let envoy = Envoy::start(&config, 2).unwrap();
        let first = http::get(&envoy.addr(), "/?api_key=1234").unwrap();
        let second = http::get(&envoy.addr(), "/?api_key=1234").unwrap();
        assert_eq!((first.status, second.status), (200, 429), "{name}");
        assert_eq!(first.body_str(), "\"ok\"");
        if name == "global.yaml" {
            assert!(metric(&envoy, "backend_calls") >= 1);
            assert_eq!(metric(&envoy, "store_errors"), 0);
        }
    }
}

// ------------------------------------------------------------- Kubernetes

fn render(overlay: &str) -> String {
    let kubectl = paths::kubectl_bin().unwrap_or_else(|e| panic!("{e}"));
    let out = run(Command::new(kubectl)
        .current_dir(repo())
        .args(["kustomize", &format!("k8s/{overlay}")]));
    assert!(
        out.status.success(),
        "kubectl kustomize k8s/{overlay}: {}",
        text(&out)
    );
    assert!(out.stderr.is_empty(), "kustomize warned: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_norway::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn kubernetes_validate(yaml: &str) -> Output {
    let bin = paths::kubernetes_validate_bin().unwrap_or_else(|e| panic!("{e}"));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    run(Command::new(bin)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(file.path()))
}

fn istio_validate(yaml: &str) -> Output {
    let node = paths::node_bin().unwrap_or_else(|e| panic!("{e}"));
    let script = paths::istio_validator().unwrap_or_else(|e| panic!("{e}"));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    run(Command::new(node).arg(script).arg(file.path()))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn kubernetes_manifests_pass_the_kubernetes_and_istio_schemas() {
    for (overlay, istio_kinds) in [
        ("local", vec!["WasmPlugin"]),
        ("global", vec!["WasmPlugin", "EnvoyFilter"]),
    ] {
        let yaml = render(overlay);
        let docs = documents(&yaml);
        let out = kubernetes_validate(&yaml);
        let report = text(&out);
        assert!(out.status.success(), "k8s/{overlay}: {report}");
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap();
            if istio_kinds.contains(&kind) {
                continue;
            }
            let resource = format!(
                "{}/{}",
                kind.to_lowercase(),
                doc["metadata"]["name"].as_str().unwrap()
            );
            assert!(
                report.contains(&format!("passed for resource {resource} ")),
                "k8s/{overlay}: {resource} was not validated:\n{report}"
            );
        }
        let out = istio_validate(&yaml);
        let report = text(&out);
        assert!(out.status.success(), "k8s/{overlay}: {report}");
        for kind in istio_kinds {
            for doc in of_kind(&docs, kind) {
                let line = format!("ok {kind}/{}", doc["metadata"]["name"].as_str().unwrap());
                assert!(
                    report.contains(&line),
                    "k8s/{overlay}: no `{line}` in\n{report}"
                );
            }
        }
    }
}

#[test]
fn broken_manifests_are_refused_by_the_validators() {
    let docs = documents(&render("global"));
    let broken = |kind: &str, edit: &dyn Fn(&mut Value)| {
        let mut copy = docs.clone();
        let doc = copy.iter_mut().find(|d| d["kind"] == kind).unwrap();
        edit(doc);
        to_yaml(&copy)
    };
    // Unknown field in a Deployment (a typo of `replicas`).
    let yaml = broken("Deployment", &|d| {
        d["spec"]["replica"] = Value::from(6);
    });
    let out = kubernetes_validate(&yaml);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("'replica' was unexpected"),
        "{}",
        text(&out)
    );
    // A Service nodePort that is not a number.
    let yaml = broken("Service", &|d| {
        d["spec"]["ports"][0]["nodePort"] = Value::from("x")
    });
    assert!(!kubernetes_validate(&yaml).status.success());
    // A failStrategy Istio does not know.
    let yaml = broken("WasmPlugin", &|d| {
        d["spec"]["failStrategy"] = Value::from("FAIL_SOMETIMES")
    });
    let out = istio_validate(&yaml);
    assert!(!out.status.success());
    assert!(text(&out).contains("failStrategy"), "{}", text(&out));
    // An EnvoyFilter patch context Istio does not know.
    let yaml = broken("EnvoyFilter", &|d| {
        d["spec"]["configPatches"][0]["match"]["context"] = Value::from("SIDECAR_SOMEWHERE");
    });
    assert!(!istio_validate(&yaml).status.success());
}

#[test]
fn kubernetes_plugin_configs_parse_and_name_existing_clusters() {
    for overlay in ["local", "global"] {
        let docs = documents(&render(overlay));
        let plugins = of_kind(&docs, "WasmPlugin");
        assert_eq!(plugins.len(), 1, "k8s/{overlay}");
        let spec = &plugins[0]["spec"];
        assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
        assert_eq!(spec["imagePullPolicy"], "IfNotPresent");
        assert!(spec["phase"].is_string());
        assert!(spec["url"].as_str().unwrap().starts_with("oci://"));
        assert_eq!(spec["selector"]["matchLabels"]["app"], "tutorial-api");
        // Istio hands the filter pluginConfig as a JSON string.
        let json = serde_json::to_string(&spec["pluginConfig"]).unwrap();
        let policy =
            Policy::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("k8s/{overlay}: {e}"));
        match (overlay, policy.webdis()) {
            ("local", None) => {}
            ("global", Some(webdis)) => {
                let added: Vec<&Value> = of_kind(&docs, "EnvoyFilter")
                    .iter()
                    .flat_map(|f| f["spec"]["configPatches"].as_array().unwrap().iter())
                    .filter(|p| p["applyTo"] == "CLUSTER" && p["patch"]["operation"] == "ADD")
                    .map(|p| &p["patch"]["value"])
                    .collect();
                let cluster = added
                    .iter()
                    .find(|c| c["name"] == webdis.cluster.as_str())
                    .unwrap_or_else(|| panic!("no EnvoyFilter adds cluster {:?}", webdis.cluster));
                let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                    ["endpoint"]["address"]["socket_address"];
                assert_eq!(
                    (address["address"].as_str(), address["port_value"].as_u64()),
                    (Some("127.0.0.1"), Some(7379))
                );
            }
            (overlay, store) => panic!("k8s/{overlay}: unexpected store {store:?}"),
        }
        // The tutorial's shape: 6 replicas behind NodePort 31534.
        let app = of_kind(&docs, "Deployment")
            .into_iter()
            .find(|d| d["metadata"]["name"] == "tutorial-api")
            .unwrap();
        assert_eq!(app["spec"]["replicas"], 6);
        let service = of_kind(&docs, "Service")
            .into_iter()
            .find(|d| d["metadata"]["name"] == "tutorial-api")
            .unwrap();
        assert_eq!(service["spec"]["type"], "NodePort");
        assert_eq!(service["spec"]["ports"][0]["nodePort"], 31534);
        // Redis is never exposed outside the cluster.
        for svc in of_kind(&docs, "Service") {
            if svc["metadata"]["name"] == "redis" {
                assert!(svc["spec"]["type"].is_null() || svc["spec"]["type"] == "ClusterIP");
            }
        }
    }
}

#[test]
fn the_webdis_and_redis_files_in_kubernetes_are_the_tested_ones() {
    let docs = documents(&render("global"));
    let config_maps = of_kind(&docs, "ConfigMap");
    for (file, original, config_map) in [
        ("webdis.json", "envoy/webdis.json", "webdis-config"),
        ("redis-acl.conf", "envoy/redis-acl.conf", "redis-config"),
        ("redis-start.sh", "envoy/redis-start.sh", "redis-config"),
        ("gcra.lua", "filter/core/src/gcra.lua", "redis-config"),
    ] {
        let tested = std::fs::read_to_string(repo().join(original)).unwrap();
        let held = config_maps
            .iter()
            .find(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with(config_map)
            })
            .and_then(|c| c["data"][file].as_str())
            .unwrap_or_else(|| panic!("no {file} in ConfigMap {config_map}"));
        assert_eq!(
            held, tested,
            "the {config_map} ConfigMap's {file} is not {original}"
        );
    }
    // The webdis sidecar mounts that ConfigMap where the image's start
    // script reads it, and gets the Redis password from the Secret.
    let app = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "tutorial-api")
        .unwrap();
    let pod = &app["spec"]["template"]["spec"];
    let webdis = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "webdis")
        .unwrap();
    let mount = webdis["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/webdis/webdis.json" || m["mountPath"] == "/etc/webdis")
        .unwrap();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(volume["configMap"]["name"]
        .as_str()
        .unwrap()
        .starts_with("webdis-config"));
    let env = webdis["env"].as_array().unwrap();
    let password = env.iter().find(|e| e["name"] == "REDIS_PASSWORD").unwrap();
    assert!(password["valueFrom"]["secretKeyRef"]["name"]
        .as_str()
        .unwrap()
        .starts_with("redis-auth"));
}

/// The Redis line compose and Kubernetes run: one that still gets security
/// fixes (the tests run Debian's 7.0 with the same script, ACL and library).
const REDIS_IMAGE: &str = "redis:8.6";

/// A probe command that PINGs Redis as admin with the password in
/// REDISCLI_AUTH, never on the command line.
fn assert_authenticated_ping(what: &str, command: &str) {
    assert!(
        command.contains("REDISCLI_AUTH=\"$REDIS_ADMIN_PASSWORD\"")
            && command.contains("redis-cli --user admin")
            && command.contains("ping | grep -qx PONG"),
        "{what}: {command}"
    );
    assert!(
        !command.contains(" -a ") && !command.contains("--pass"),
        "{what}: {command}"
    );
}

/// Runs a probe's shell command against `redis` (its port put in); true
/// when the probe passes.
fn probe_passes(command: &str, redis: &Redis) -> bool {
    let command = command
        .replace(" -p 6379", "")
        .replace("redis-cli ", &format!("redis-cli -p {} ", redis.port()));
    let mut sh = Command::new("sh");
    sh.args(["-c", &command])
        .env("REDIS_ADMIN_PASSWORD", redis.admin_password());
    run(&mut sh).status.success()
}

#[test]
fn redis_runs_a_supported_line_and_a_wedged_one_fails_its_probes() {
    let out = compose(
        &["--profile", "global", "config"],
        &[("REDIS_PASSWORD", "s3cret0")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let resolved: Value = serde_norway::from_slice(&out.stdout).unwrap();
    let redis = &resolved["services"]["redis"];
    assert_eq!(redis["image"], REDIS_IMAGE);
    let test = redis["healthcheck"]["test"].as_array().unwrap();
    assert_eq!(test[0], "CMD-SHELL");
    // docker-compose 1.29 prints the file's `$$` escape as it is.
    let mut probes = vec![("compose", test[1].as_str().unwrap().replace("$$", "$"))];

    let docs = documents(&render("global"));
    let deployment = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "redis")
        .unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], REDIS_IMAGE);
    for probe in ["livenessProbe", "readinessProbe"] {
        let command = container[probe]["exec"]["command"].as_array().unwrap();
        assert_eq!(command[..2], [Value::from("sh"), Value::from("-c")]);
        probes.push((probe, command[2].as_str().unwrap().to_string()));
    }
    let env = container["env"].as_array().unwrap();
    let admin = env
        .iter()
        .find(|e| e["name"] == "REDIS_ADMIN_PASSWORD")
        .unwrap();
    assert_eq!(
        admin["valueFrom"]["secretKeyRef"]["key"], "admin_password",
        "{admin}"
    );
    let secret = of_kind(&docs, "Secret")
        .into_iter()
        .find(|s| {
            s["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("redis-auth")
        })
        .unwrap();
    for key in ["password", "admin_password"] {
        assert!(secret["data"][key].is_string(), "{secret}");
    }

    // The probes, run for real: they pass on a live Redis and fail on one
    // wedged in an endless script (BUSY), which Kubernetes then restarts.
    let redis = Redis::start();
    for (what, command) in &probes {
        assert_authenticated_ping(what, command);
        assert!(
            probe_passes(command, &redis),
            "{what} fails on a live Redis"
        );
    }
    assert_eq!(
        redis
            .cli(&["CONFIG", "SET", "busy-reply-threshold", "50"])
            .trim(),
        "OK"
    );
    let mut wedge = Command::new(paths::redis_cli_bin().unwrap());
    wedge
        .args(["-p", &redis.port().to_string(), "--user", "admin"])
        .args(["EVAL", "while true do end", "0"])
        .env("REDISCLI_AUTH", redis.admin_password());
    let _wedged = Proc::spawn("wedge", wedge).unwrap();
    let busy = e2e::poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        redis.cli(&["PING"]).starts_with("BUSY").then_some(())
    });
    assert!(busy.is_some(), "Redis never turned BUSY");
    for (what, command) in &probes {
        assert!(
            !probe_passes(command, &redis),
            "{what} passes on a wedged Redis"
        );
    }
}
