//! One run: a fresh Envoy for one setup on one route, loaded by wrk, and
//! what it cost Envoy, webdis and Redis.

use std::path::Path;
use std::time::Duration;

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::metrics::counters;
use e2e::upstream::Upstream;

use crate::options::Options;
use crate::report::Sample;
use crate::setups::{self, Keys, Route, Setup};
use crate::wrk;

/// The filter's counters a run reads. `backend_batched_requests` (requests
/// carried by webdis calls) exists only in a filter that batches.
const COUNTERS: [&str; 5] = [
    "allowed",
    "throttled",
    "backend_calls",
    "backend_cache_hits",
    "backend_batched_requests",
];

/// What every run shares: one upstream and one backend for the whole bench.
pub struct Bench<'a> {
    pub options: &'a Options,
    pub upstream: &'a Upstream,
    pub backend: &'a RedisWebdis,
    pub empty_wasm: &'a Path,
    /// The wrk script that cycles through many keys.
    pub many_keys: &'a Path,
}

impl Bench<'_> {
    pub fn measure(
        &self,
        setup: &Setup,
        route: Route,
        (repeat, block): (usize, usize),
    ) -> Result<Sample, String> {
        let config = setups::envoy_config(
            setup,
            route,
            self.upstream.port(),
            self.backend.webdis.port(),
            self.empty_wasm,
        )?;
        let envoy = Envoy::start(&config, self.options.workers).map_err(|e| e.0)?;
        if let Some(cpu) = self.options.envoy_cpu {
            crate::pin(envoy.proc().pid(), cpu)?;
        }
        let (key, script) = match setup.keys {
            Keys::One(key) => (key, None),
            Keys::Many(_) => ("", Some(self.many_keys)),
        };
        let url = format!("http://{}/?api_key={key}", envoy.addr());
        let pid = envoy.proc().pid();
        let cpu_before = cpu_nanos(pid);
        let backend_before = self.backend_cpu()?;
        let measured = wrk::run(&wrk::Load {
            url: &url,
            connections: self.options.connections,
            duration: self.options.duration,
            script,
        })?;
        let backend_cpu = self.backend_cpu()?.saturating_sub(backend_before);
        let cpu = cpu_nanos(pid).saturating_sub(cpu_before);
        let peak_rss_bytes = peak_rss(pid);
        let requests = measured.requests.max(1) as f64;
        let [admitted, throttled, backend_calls, backend_cache_hits, backend_batched_requests] =
            <[Option<u64>; COUNTERS.len()]>::try_from(counters(&envoy, &COUNTERS))
                .map_err(|_| "the stats read returned too few counters".to_string())?;
        Ok(Sample {
            setup: setup.id,
            route,
            repeat,
            block,
            admitted: admitted.unwrap_or(0),
            throttled: throttled.unwrap_or(0),
            backend_calls: backend_calls.unwrap_or(0),
            backend_cache_hits: backend_cache_hits.unwrap_or(0),
            backend_batched_requests,
            peak_rss_bytes,
            envoy_cpu_us_per_request: cpu as f64 / 1000.0 / requests,
            backend_cpu_us_per_request: backend_cpu.as_secs_f64() * 1e6 / requests,
            measured,
        })
    }

    fn backend_cpu(&self) -> Result<Duration, String> {
        self.backend
            .cpu_time()
            .ok_or_else(|| "webdis or Redis has exited".to_string())
    }
}

/// CPU time all of a process's threads have used (schedstat, in ns): what
/// a request costs Envoy, less sensitive than throughput to the load
/// generator sharing the machine.
fn cpu_nanos(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// VmHWM: the process's peak resident memory.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
