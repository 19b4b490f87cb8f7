//! The local-mode topology the tests share: the real upstream behind one
//! Envoy running the shipped `envoy/local.yaml`, with the test's plugin
//! configuration, on fresh ports.

use std::time::Duration;

use crate::envoy::{Envoy, EnvoyConfig};
use crate::paths;
use crate::upstream::Upstream;

/// The shipped config's plugin name: metrics are
/// `wasmcustom.apikey_ratelimit.api.<event>`.
pub const PLUGIN: &str = "api";

pub struct Local {
    pub upstream: Upstream,
    pub envoy: Envoy,
}

impl Local {
    /// Upstream + Envoy with `workers` workers and this plugin configuration
    /// (JSON). Panics with the processes' logs if either does not start.
    pub fn start(plugin_config: &str, workers: u32) -> Local {
        let upstream = Upstream::start();
        let mut config = local_config(&upstream);
        config
            .set_plugin_config(plugin_config)
            .unwrap_or_else(|e| panic!("{e}"));
        let envoy = Envoy::start(&config, workers).unwrap_or_else(|e| panic!("{e:?}"));
        Local { upstream, envoy }
    }

    /// As shipped, plugin configuration included.
    pub fn start_shipped(workers: u32) -> Local {
        let upstream = Upstream::start();
        let envoy =
            Envoy::start(&local_config(&upstream), workers).unwrap_or_else(|e| panic!("{e:?}"));
        Local { upstream, envoy }
    }

    pub fn addr(&self) -> String {
        self.envoy.addr()
    }

    /// One of the filter's counters, e.g. `metric("throttled")`.
    pub fn metric(&self, event: &str) -> u64 {
        metric(&self.envoy, event)
    }

    pub fn metric_at_least(&self, event: &str, value: u64) -> u64 {
        metric_at_least(&self.envoy, event, value)
    }

    /// Connections each worker accepted on the API listener, in worker order.
    pub fn connections_per_worker(&self) -> Vec<u64> {
        let stats = self.envoy.stats().unwrap_or_default();
        let prefix = format!("listener.127.0.0.1_{}.worker_", self.envoy.port());
        let mut per_worker: Vec<(u32, u64)> = stats
            .iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix(&prefix)?;
                let (worker, stat) = rest.split_once('.')?;
                (stat == "downstream_cx_total").then(|| Some((worker.parse().ok()?, *value)))?
            })
            .collect();
        per_worker.sort();
        per_worker.into_iter().map(|(_, v)| v).collect()
    }
}

pub fn metric_name(event: &str) -> String {
    format!("wasmcustom.apikey_ratelimit.{PLUGIN}.{event}")
}

/// How long the filter may hold counts before Envoy sees them (its tick,
/// 250 ms, with a margin): counts gather in each VM and are flushed in
/// batches, because a host call per request is the costliest thing it does.
pub const METRIC_FLUSH: Duration = Duration::from_millis(400);

/// One of the filter's counters in this Envoy (0 before it is first used),
/// once it has settled: read again after a flush period until two reads
/// agree, so every count already made is in.
pub fn metric(envoy: &Envoy, event: &str) -> u64 {
    let read = || envoy.counter(&metric_name(event)).unwrap_or(0);
    let mut last = read();
    for _ in 0..20 {
        std::thread::sleep(METRIC_FLUSH);
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Waits until a filter counter reaches `value`, then returns it once
/// settled: a test asserting an exact count must also see a late overshoot.
pub fn metric_at_least(envoy: &Envoy, event: &str, value: u64) -> u64 {
    let _ = envoy.wait_counter(&metric_name(event), value, Duration::from_secs(5));
    metric(envoy, event)
}

/// `envoy/local.yaml` on fresh ports, pointed at `upstream`.
pub fn local_config(upstream: &Upstream) -> EnvoyConfig {
    let mut config = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
    config
        .set_cluster_endpoint("upstream", "127.0.0.1", upstream.port())
        .unwrap_or_else(|e| panic!("{e}"));
    config
}
