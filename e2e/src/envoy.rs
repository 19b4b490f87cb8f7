//! [`Envoy`]: a running Envoy process on an [`EnvoyConfig`], its admin endpoint and
//! stats; and [`validate`], Envoy's own check of a config file.

use crate::envoy_config::EnvoyConfig;
use crate::http::{self, Response};
use crate::metrics::parse_stats;
use crate::paths;
use crate::process::{describe_status, new_dir, Proc};
use crate::Error;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

/// How long [`Envoy::start`] waits for `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running Envoy. Killed (SIGTERM, then SIGKILL) when dropped.
pub struct Envoy {
    proc: Proc,
    config: EnvoyConfig,
    admin_port: u16,
    listener_port: u16,
}

impl Envoy {
    /// Writes `cfg` into a fresh temp dir, runs the Envoy binary on it with
    /// `--concurrency workers --disable-hot-restart --log-level info`, and waits until
    /// the admin endpoint's `/ready` answers 200 ([`READY_TIMEOUT`]). If Envoy exits
    /// first, the error says how ("exited with code 1") and quotes its log.
    pub fn start(cfg: &EnvoyConfig, workers: u32) -> Result<Envoy, Error> {
        Self::start_with_args(cfg, workers, &[])
    }

    /// [`Envoy::start`] with extra command-line arguments (e.g.
    /// `["--component-log-level", "wasm:debug"]`; a `--log-level` here replaces ours).
    pub fn start_with_args(
        cfg: &EnvoyConfig,
        workers: u32,
        extra: &[&str],
    ) -> Result<Envoy, Error> {
        let admin_port = cfg
            .admin_port()
            .ok_or_else(|| Error("admin.address.socket_address.port_value: missing".into()))?;
        let (_, listener_port) = cfg
            .first_listener()
            .ok_or_else(|| Error("static_resources.listeners: no named listener".into()))?;
        // Say "run make build" rather than let Envoy fail on a missing .wasm.
        for f in cfg.wasm_filenames() {
            if !f.is_file() {
                paths::wasm_path()?;
                return Err(Error(format!(
                    "the config's .wasm {} does not exist",
                    f.display()
                )));
            }
        }
        let proc = spawn(cfg, workers, extra)?;
        let admin = format!("127.0.0.1:{admin_port}");
        proc.wait_ready(READY_TIMEOUT, || {
            let ready = http::Conn::connect_timeout(&admin, Duration::from_secs(1))
                .and_then(|mut c| c.request("GET", b"/ready", &[("Connection", b"close")]));
            match ready {
                Ok(Response { status: 200, .. }) => Ok(()),
                Ok(r) => Err(format!("/ready: {} {}", r.status, r.body_str().trim())),
                Err(e) => Err(format!("/ready: {e}")),
            }
        })?;
        Ok(Envoy {
            proc,
            config: cfg.clone(),
            admin_port,
            listener_port,
        })
    }

    /// Runs Envoy on a config that must make it refuse to start: waits up to `timeout`
    /// for it to exit and returns the exit status (`None` if it was still running,
    /// and then killed) and its whole log.
    pub fn start_expect_failure(
        cfg: &EnvoyConfig,
        workers: u32,
        timeout: Duration,
    ) -> (Option<ExitStatus>, String) {
        match spawn(cfg, workers, &[]) {
            Ok(proc) => {
                let status = proc.wait_exit(timeout);
                if status.is_none() {
                    proc.kill();
                }
                (status, proc.log())
            }
            Err(e) => (None, e.to_string()),
        }
    }

    /// The first listener, "127.0.0.1:port".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.listener_port)
    }

    pub fn port(&self) -> u16 {
        self.listener_port
    }

    /// Listener `name`, "127.0.0.1:port".
    pub fn listener_addr(&self, name: &str) -> Option<String> {
        Some(format!("127.0.0.1:{}", self.config.listener_port(name)?))
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn config(&self) -> &EnvoyConfig {
        &self.config
    }

    pub fn rss_bytes(&self) -> Option<u64> {
        self.proc.rss_bytes()
    }

    /// A request to the admin endpoint, e.g. `admin("POST", "/reset_counters")`.
    pub fn admin(&self, method: &str, path: &str) -> io::Result<Response> {
        let mut c = http::Conn::connect(&self.admin_addr())?;
        c.request(method, path.as_bytes(), &[("Connection", b"close")])
    }

    /// `GET /stats` (text).
    pub fn stats_text(&self) -> io::Result<String> {
        self.admin_text("/stats")
    }

    /// `GET /stats/prometheus`.
    pub fn prometheus_text(&self) -> io::Result<String> {
        self.admin_text("/stats/prometheus")
    }

    /// Every numeric stat (counters and gauges; histograms are left out).
    pub fn stats(&self) -> io::Result<BTreeMap<String, u64>> {
        Ok(parse_stats(&self.stats_text()?))
    }

    /// The value of counter (or gauge) `name`, e.g. `http.api.downstream_rq_completed`;
    /// our filter's metrics are `wasmcustom.<name>`. `None` if no such stat exists.
    /// Panics if the admin endpoint does not answer: that is a test failure.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.stats_now().get(name).copied()
    }

    /// [`Envoy::stats`], panicking if the admin endpoint does not answer:
    /// that is a test failure.
    pub fn stats_now(&self) -> BTreeMap<String, u64> {
        match self.stats() {
            Ok(s) => s,
            Err(e) => panic!(
                "{}",
                self.proc
                    .error(&format!("GET /stats on {} failed: {e}", self.admin_addr()))
            ),
        }
    }

    /// Polls counter `name` until it reaches `at_least`. Stats of a request are
    /// recorded as its stream ends, which can be just after the client has the answer.
    pub fn wait_counter(&self, name: &str, at_least: u64, timeout: Duration) -> Result<u64, Error> {
        let mut last = None;
        crate::poll_until(timeout, Duration::from_millis(20), || {
            last = self.counter(name);
            last.filter(|v| *v >= at_least)
        })
        .ok_or_else(|| {
            Error(format!(
                "counter {name} is {} after {timeout:?}, expected at least {at_least}",
                last.map_or_else(|| "absent".to_owned(), |v| v.to_string())
            ))
        })
    }

    fn admin_text(&self, path: &str) -> io::Result<String> {
        let r = self.admin("GET", path)?;
        if r.status != 200 {
            return Err(io::Error::other(format!(
                "GET {path}: {} {}",
                r.status,
                r.body_str()
            )));
        }
        Ok(r.body_str().into_owned())
    }
}

fn spawn(cfg: &EnvoyConfig, workers: u32, extra: &[&str]) -> Result<Proc, Error> {
    let bin = paths::envoy_bin()?;
    let name = format!("envoy:{}", cfg.admin_port().unwrap_or(0));
    let dir = new_dir("envoy").map_err(|e| Error(format!("temp dir: {e}")))?;
    let file = dir.path().join("envoy.json");
    cfg.write(&file)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-c")
        .arg(&file)
        .args(["--concurrency", &workers.to_string()])
        // Several Envoys on one machine: without this the second exits with
        // "unable to bind domain socket".
        .arg("--disable-hot-restart");
    if !extra.contains(&"--log-level") && !extra.contains(&"-l") {
        cmd.args(["--log-level", "info"]);
    }
    cmd.args(extra).current_dir(dir.path());
    Proc::spawn_in(&name, cmd, dir).map_err(|e| Error(format!("cannot run {}: {e}", bin.display())))
}

/// `envoy --mode validate -c path`, run from the repository root (so a shipped
/// config's relative paths resolve as they do for `make run`).
pub fn validate(path: impl AsRef<Path>) -> Result<(), Error> {
    let path = std::path::absolute(path.as_ref())
        .map_err(|e| Error(format!("{}: {e}", path.as_ref().display())))?;
    let bin = paths::envoy_bin()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .current_dir(paths::repo_root());
    let proc = Proc::spawn("envoy-validate", cmd)
        .map_err(|e| Error(format!("cannot run {}: {e}", bin.display())))?;
    match proc.wait_exit(Duration::from_secs(60)) {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(proc.error(&format!(
            "{} does not validate: {}",
            path.display(),
            describe_status(s)
        ))),
        None => Err(proc.error("validation still running after 60 s")),
    }
}
