//! The topologies the tests, the bench and `make run` share:
//!
//! - [`OneEnvoy`]: the real upstream behind one Envoy running the shipped
//!   `envoy/local.yaml`, with the test's plugin configuration;
//! - [`GlobalEnvoy`]: the same with `envoy/global.yaml`, and its own Redis and
//!   webdis ([`RedisWebdis`]);
//! - [`Replicas`]: the tutorial's Kubernetes deployment on one machine: N
//!   Envoy replicas (local or global mode), each running the filter, behind
//!   the shipped `envoy/front.yaml`, a front Envoy balancing round-robin as
//!   a Kubernetes Service does.
//!
//! Configs come from the shipped files through [`replica_config`] and
//! [`front_config`], with only ports, the `.wasm` path and (per test) the
//! plugin configuration changed; `make run` uses the same functions with
//! fixed ports.

use crate::backend::RedisWebdis;
use crate::envoy::Envoy;
use crate::envoy_config::EnvoyConfig;
use crate::metrics::{self, metric};
use crate::paths;
use crate::ports::free_port;
use crate::upstream::Upstream;
use crate::Error;

/// Where the filter keeps its counters: the one meaning of "mode" in the
/// harness (`make run MODE=`, `demo --mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Envoy shared data: each replica counts alone.
    Local,
    /// Redis through webdis: one count across all replicas.
    Global,
}

impl Mode {
    pub fn shipped_config(self) -> &'static str {
        match self {
            Mode::Local => "local.yaml",
            Mode::Global => "global.yaml",
        }
    }
}

/// Ports of one replica Envoy.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaPorts {
    pub listen: u16,
    pub admin: u16,
    pub upstream: u16,
    /// The webdis sidecar (global mode).
    pub webdis: Option<u16>,
}

/// The shipped config of `mode` with these ports and the built `.wasm`.
pub fn replica_config(mode: Mode, ports: ReplicaPorts) -> Result<EnvoyConfig, Error> {
    let mut config = EnvoyConfig::load(paths::shipped_config(mode.shipped_config()))?;
    config.set_admin_port(ports.admin)?;
    let (listener, _) = config
        .first_listener()
        .ok_or_else(|| Error("no listener in the shipped config".into()))?;
    config.set_listener_port(&listener, ports.listen)?;
    config.set_cluster_endpoint("upstream", "127.0.0.1", ports.upstream)?;
    if let Some(webdis) = ports.webdis {
        config.set_cluster_endpoint("webdis", "127.0.0.1", webdis)?;
    }
    config.set_wasm_filename(&paths::wasm_path_unchecked())?;
    Ok(config)
}

/// The shipped front proxy listening on `listen`, balancing over `replicas`.
pub fn front_config(listen: u16, admin: u16, replicas: &[u16]) -> Result<EnvoyConfig, Error> {
    let mut config = EnvoyConfig::load(paths::shipped_config("front.yaml"))?;
    config.set_admin_port(admin)?;
    config.set_listener_port("front", listen)?;
    let endpoints: Vec<(&str, u16)> = replicas.iter().map(|p| ("127.0.0.1", *p)).collect();
    config.set_cluster_endpoints("replicas", &endpoints)?;
    Ok(config)
}

/// The real upstream behind one Envoy that runs the filter. Built by
/// [`OneEnvoy::local`] in local mode; [`GlobalEnvoy`] holds one in global mode.
pub struct OneEnvoy {
    pub upstream: Upstream,
    pub envoy: Envoy,
}

impl OneEnvoy {
    /// Upstream + Envoy in local mode with `workers` workers and this plugin
    /// configuration (JSON). Panics with the processes' logs if either does
    /// not start.
    pub fn local(plugin_config: &str, workers: u32) -> OneEnvoy {
        OneEnvoy::start_local(Some(plugin_config), workers)
    }

    /// Local mode as shipped, plugin configuration included.
    pub fn local_shipped(workers: u32) -> OneEnvoy {
        OneEnvoy::start_local(None, workers)
    }

    fn start_local(plugin_config: Option<&str>, workers: u32) -> OneEnvoy {
        let upstream = Upstream::start();
        let mut config = local_config(&upstream);
        if let Some(plugin) = plugin_config {
            config
                .set_plugin_config(plugin)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let envoy = Envoy::start(&config, workers).unwrap_or_else(|e| panic!("{e:?}"));
        OneEnvoy { upstream, envoy }
    }

    pub fn addr(&self) -> String {
        self.envoy.addr()
    }

    /// One of the filter's counters, e.g. `metric("throttled")`.
    pub fn metric(&self, event: &str) -> u64 {
        metric(&self.envoy, event)
    }

    pub fn metric_at_least(&self, event: &str, value: u64) -> u64 {
        metrics::metric_at_least(&self.envoy, event, value)
    }

    /// Connections each worker accepted on the API listener, in worker order.
    pub fn connections_per_worker(&self) -> Vec<u64> {
        metrics::connections_per_worker(&self.envoy)
    }
}

/// `envoy/local.yaml` on fresh ports, pointed at `upstream`.
pub fn local_config(upstream: &Upstream) -> EnvoyConfig {
    let mut config = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
    config
        .set_cluster_endpoint("upstream", "127.0.0.1", upstream.port())
        .unwrap_or_else(|e| panic!("{e}"));
    config
}

/// One Envoy in global mode, with its own Redis and webdis.
pub struct GlobalEnvoy {
    /// The upstream and the Envoy, read as in local mode (`addr`, `metric`,
    /// `envoy`, `upstream` through `Deref`).
    pub one: OneEnvoy,
    pub backend: RedisWebdis,
}

impl GlobalEnvoy {
    /// `plugin_config` replaces the shipped one when given.
    pub fn start(plugin_config: Option<&str>, workers: u32) -> GlobalEnvoy {
        let upstream = Upstream::start();
        let backend = RedisWebdis::start();
        let config = global_test_config(&upstream, backend.webdis.port(), plugin_config);
        let envoy = Envoy::start(&config, workers).unwrap_or_else(|e| panic!("{e:?}"));
        GlobalEnvoy {
            one: OneEnvoy { upstream, envoy },
            backend,
        }
    }
}

impl std::ops::Deref for GlobalEnvoy {
    type Target = OneEnvoy;

    fn deref(&self) -> &OneEnvoy {
        &self.one
    }
}

/// `envoy/global.yaml` on fresh ports, pointed at this upstream and webdis.
pub fn global_test_config(
    upstream: &Upstream,
    webdis_port: u16,
    plugin_config: Option<&str>,
) -> EnvoyConfig {
    test_config(Mode::Global, upstream, Some(webdis_port), plugin_config)
}

/// The shipped config of `mode` on fresh ports; `plugin_config` replaces the
/// shipped one when given. Panics (a test helper) if the config lacks a part.
fn test_config(
    mode: Mode,
    upstream: &Upstream,
    webdis: Option<u16>,
    plugin_config: Option<&str>,
) -> EnvoyConfig {
    let ports = ReplicaPorts {
        listen: free_port(),
        admin: free_port(),
        upstream: upstream.port(),
        webdis,
    };
    let mut config = replica_config(mode, ports).unwrap_or_else(|e| panic!("{e}"));
    if let Some(plugin) = plugin_config {
        config
            .set_plugin_config(plugin)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    config
}

/// N replicas behind a front Envoy.
pub struct Replicas {
    pub upstream: Upstream,
    pub backend: Option<RedisWebdis>,
    pub replicas: Vec<Envoy>,
    pub front: Envoy,
}

impl Replicas {
    /// `count` replicas of `workers` workers each; `plugin_config` replaces
    /// the shipped one when given.
    pub fn start(mode: Mode, count: usize, workers: u32, plugin_config: Option<&str>) -> Replicas {
        let upstream = Upstream::start();
        let backend = (mode == Mode::Global).then(RedisWebdis::start);
        let webdis = backend.as_ref().map(|b| b.webdis.port());
        let configs: Vec<EnvoyConfig> = (0..count)
            .map(|_| test_config(mode, &upstream, webdis, plugin_config))
            .collect();
        let replicas = start_envoys(&configs, workers, &[]).unwrap_or_else(|e| panic!("{e:?}"));
        let ports: Vec<u16> = replicas.iter().map(Envoy::port).collect();
        let front =
            front_config(free_port(), free_port(), &ports).unwrap_or_else(|e| panic!("{e}"));
        let front = Envoy::start(&front, 1).unwrap_or_else(|e| panic!("{e:?}"));
        Replicas {
            upstream,
            backend,
            replicas,
            front,
        }
    }

    /// The front proxy's address: where clients go.
    pub fn addr(&self) -> String {
        self.front.addr()
    }

    /// A filter counter summed over the replicas.
    pub fn metric(&self, event: &str) -> u64 {
        self.replicas.iter().map(|r| metric(r, event)).sum()
    }

    /// Requests each replica received (its HTTP listener's count).
    pub fn requests_per_replica(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(metrics::requests_received)
            .collect()
    }
}

/// Starts an Envoy on each config side by side (each takes about a second),
/// with `workers` workers and `extra` arguments ([`Envoy::start_with_args`]).
pub fn start_envoys(
    configs: &[EnvoyConfig],
    workers: u32,
    extra: &[&str],
) -> Result<Vec<Envoy>, Error> {
    std::thread::scope(|s| {
        let handles: Vec<_> = configs
            .iter()
            .map(|c| s.spawn(move || Envoy::start_with_args(c, workers, extra)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
