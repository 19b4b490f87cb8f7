//! The global-mode and replica topologies the tests and `make run` share:
//!
//! - [`Global`]: the upstream, Redis, webdis and one Envoy running the
//!   shipped `envoy/global.yaml`;
//! - [`Replicas`]: the tutorial's Kubernetes deployment on one machine: N
//!   Envoy replicas (local or global mode), each running the filter, behind
//!   the shipped `envoy/front.yaml`, a front Envoy balancing round-robin as
//!   a Kubernetes Service does.
//!
//! Configs come from the shipped files through [`replica_config`] and
//! [`front_config`], with only ports, the `.wasm` path and (per test) the
//! plugin configuration changed; `make run` uses the same functions with
//! fixed ports.

use crate::backend::{Redis, Webdis};
use crate::envoy::{Envoy, EnvoyConfig};
use crate::local::{metric, Local};
use crate::paths;
use crate::ports::free_port;
use crate::upstream::Upstream;
use crate::Error;

/// Where a replica keeps its counters.
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

/// Redis and webdis, ready for the filter.
pub struct Backend {
    pub redis: Redis,
    pub webdis: Webdis,
}

impl Backend {
    pub fn start() -> Backend {
        let redis = Redis::start();
        let webdis = Webdis::start(&redis);
        Backend { redis, webdis }
    }
}

/// One Envoy in global mode, with its own Redis and webdis.
pub struct Global {
    /// The upstream and the Envoy, read like a local setup (`addr`,
    /// `metric`, `envoy`, `upstream` through `Deref`).
    pub local: Local,
    pub backend: Backend,
}

impl Global {
    /// `plugin_config` replaces the shipped one when given.
    pub fn start(plugin_config: Option<&str>, workers: u32) -> Global {
        let upstream = Upstream::start();
        let backend = Backend::start();
        let config = global_test_config(&upstream, backend.webdis.port(), plugin_config);
        let envoy = Envoy::start(&config, workers).unwrap_or_else(|e| panic!("{e:?}"));
        Global {
            local: Local { upstream, envoy },
            backend,
        }
    }
}

impl std::ops::Deref for Global {
    type Target = Local;

    fn deref(&self) -> &Local {
        &self.local
    }
}

/// `envoy/global.yaml` on fresh ports, pointed at this upstream and webdis.
pub fn global_test_config(
    upstream: &Upstream,
    webdis_port: u16,
    plugin_config: Option<&str>,
) -> EnvoyConfig {
    let ports = ReplicaPorts {
        listen: free_port(),
        admin: free_port(),
        upstream: upstream.port(),
        webdis: Some(webdis_port),
    };
    let mut config = replica_config(Mode::Global, ports).unwrap_or_else(|e| panic!("{e}"));
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
    pub backend: Option<Backend>,
    pub replicas: Vec<Envoy>,
    pub front: Envoy,
}

impl Replicas {
    /// `count` replicas of `workers` workers each; `plugin_config` replaces
    /// the shipped one when given.
    pub fn start(mode: Mode, count: usize, workers: u32, plugin_config: Option<&str>) -> Replicas {
        let upstream = Upstream::start();
        let backend = (mode == Mode::Global).then(Backend::start);
        let configs: Vec<EnvoyConfig> = (0..count)
            .map(|_| {
                let ports = ReplicaPorts {
                    listen: free_port(),
                    admin: free_port(),
                    upstream: upstream.port(),
                    webdis: backend.as_ref().map(|b| b.webdis.port()),
                };
                let mut config = replica_config(mode, ports).unwrap_or_else(|e| panic!("{e}"));
                if let Some(plugin) = plugin_config {
                    config
                        .set_plugin_config(plugin)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                config
            })
            .collect();
        // Start the replicas side by side: each takes about a second.
        let replicas: Vec<Envoy> = std::thread::scope(|s| {
            let handles: Vec<_> = configs
                .iter()
                .map(|c| s.spawn(move || Envoy::start(c, workers)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<_>, Error>>()
        })
        .unwrap_or_else(|e| panic!("{e:?}"));
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
            .map(|r| r.counter("http.api.downstream_rq_total").unwrap_or(0))
            .collect()
    }
}
