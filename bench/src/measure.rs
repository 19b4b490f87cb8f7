//! One run: a fresh Envoy for one setup on one route, loaded by wrk, and
//! what it cost Envoy, webdis and Redis.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::metrics::counters;
use e2e::upstream::Upstream;

use crate::options::Options;
use crate::policies;
use crate::report::Sample;
use crate::settlement::{self, Counted};
use crate::setups::{self, Keys, Route, Setup};
use crate::wrk;

/// The filter's counters a run reads. `backend_batched_requests` (requests
/// carried by webdis calls) exists only in a filter that batches;
/// `wasm_memory_bytes` is a gauge (every VM's linear memory).
const COUNTERS: [&str; 6] = [
    "allowed",
    "throttled",
    "backend_calls",
    "backend_cache_hits",
    "backend_batched_requests",
    "wasm_memory_bytes",
];

/// What every run shares: one upstream and one backend for the whole bench.
pub struct Bench<'a> {
    pub options: &'a Options,
    pub upstream: &'a Upstream,
    pub backend: &'a RedisWebdis,
    pub empty_wasm: &'a Path,
    /// The wrk script that cycles through many keys.
    pub many_keys: &'a Path,
    /// The wrk script of the policy setup's requests.
    pub rule_mix: &'a Path,
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
        let started = Instant::now();
        let envoy = Envoy::start(&config, self.options.workers).map_err(|e| e.0)?;
        // Up to /ready: reading the config, compiling the Wasm, configuring
        // the plugin (polled every 20 ms).
        let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
        if let Some(cpu) = self.options.envoy_cpu {
            crate::pin(envoy.proc().pid(), cpu)?;
        }
        let metered_key = settlement::run_key(setup.id, repeat);
        let (target, script) = match setup.keys {
            Keys::One(key) => (format!("/?api_key={key}"), None),
            Keys::Many(_) => ("/?api_key=".to_string(), Some(self.many_keys)),
            Keys::RuleMix => ("/?api_key=".to_string(), Some(self.rule_mix)),
            Keys::Metered => (settlement::target(&metered_key), None),
        };
        let url = format!("http://{}{target}", envoy.addr());
        let pid = envoy.proc().pid();
        let cpu_before = cpu_nanos(pid);
        let backend_before = self.backend_cpu()?;
        let load = wrk::Load {
            url: &url,
            connections: self.options.connections,
            duration: self.options.duration,
            script,
        };
        // Global settlement: probes measure its lag during the load.
        let probed = setup.is_global() && settlement::settles(setup.id);
        let stop = AtomicBool::new(false);
        let addr = envoy.addr();
        let (measured, probe_lags_ms) = std::thread::scope(|scope| {
            let probes = probed.then(|| {
                scope.spawn(|| settlement::probe(&addr, &self.backend.redis, &metered_key, &stop))
            });
            let measured = wrk::run(&load);
            stop.store(true, Ordering::Relaxed);
            let lags = match probes.map(|p| p.join()) {
                Some(Ok(lags)) => lags,
                Some(Err(_)) => Err("the probe thread panicked".to_string()),
                None => Ok(Vec::new()),
            };
            (measured, lags)
        });
        let (measured, probe_lags_ms) = (measured?, probe_lags_ms?);
        let stopped = Instant::now();
        let backend_cpu = self.backend_cpu()?.saturating_sub(backend_before);
        let cpu = cpu_nanos(pid).saturating_sub(cpu_before);
        let peak_rss_bytes = peak_rss(pid);
        // Before the counters, whose read waits: the drain starts now.
        let drain = match probed {
            true => Some(settlement::drain(
                &self.backend.redis,
                &metered_key,
                stopped,
            )?),
            false => None,
        };
        let requests = measured.requests.max(1) as f64;
        let rule_counters: Vec<String> = policies::RULE_NAMES
            .iter()
            .map(|rule| format!("rule.{rule}.requests"))
            .collect();
        let mut names: Vec<&str> = COUNTERS.to_vec();
        names.extend(rule_counters.iter().map(String::as_str));
        let metered = setup.keys == Keys::Metered;
        if metered {
            names.extend(settlement::COUNTERS);
        }
        let read = counters(&envoy, &names);
        let [admitted, throttled, backend_calls, backend_cache_hits, backend_batched_requests, wasm_memory_bytes] =
            <[Option<u64>; COUNTERS.len()]>::try_from(&read[..COUNTERS.len()])
                .map_err(|_| "the stats read returned too few counters".to_string())?;
        let rules_end = COUNTERS.len() + rule_counters.len();
        let rule_matches = read[COUNTERS.len()..rules_end].iter().flatten().sum();
        let settle = metered.then(|| {
            let mut counted = Counted::from_counters(&read[rules_end..]);
            counted.probe_lags_ms = probe_lags_ms;
            counted.drain = drain.map(|mut d| {
                d.agrees = settlement::agrees(d.used_final, &counted);
                d
            });
            counted
        });
        let workers_configured_ms = workers_configured_ms(&envoy.proc().log());
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
            ready_ms,
            workers_configured_ms,
            wasm_memory_bytes,
            rule_matches,
            envoy_cpu_us_per_request: cpu as f64 / 1000.0 / requests,
            backend_cpu_us_per_request: backend_cpu.as_secs_f64() * 1e6 / requests,
            settle,
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

/// From Envoy's "starting workers" to the last worker VM's "configured"
/// line (our filter's, at info): each worker's VM is made and configured
/// then, the main thread's before `/ready`. From Envoy's log timestamps
/// (`[2026-12-03 15:06:04.611]`, ms).
fn workers_configured_ms(log: &str) -> Option<f64> {
    let millis = |line: &str| -> Option<f64> {
        let time = line.strip_prefix('[')?.get(11..23)?;
        let mut parts = time.split(':');
        let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
        Some(
            (h.parse::<f64>().ok()? * 60.0 + m.parse::<f64>().ok()?) * 60_000.0
                + s.parse::<f64>().ok()? * 1000.0,
        )
    };
    let mut lines = log.lines();
    let start = millis(lines.find(|l| l.contains("starting workers"))?)?;
    let end = lines
        .filter(|l| l.contains("plugin '") && l.contains("' configured:"))
        .filter_map(millis)
        .fold(None, |last: Option<f64>, t| {
            Some(last.map_or(t, |l| l.max(t)))
        })?;
    Some(end - start)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_configure_time_comes_from_envoy_s_log() {
        let log = "[2026-12-03 15:06:04.351][4532][info][wasm] [context.cc:1151] wasm log apikey_ratelimit apikey_ratelimit: plugin 'api' configured: 4 plan(s)
[2026-12-03 15:06:04.611][4532][info][config] [listener_manager_impl.cc:1149] all dependencies initialized. starting workers
[2026-12-03 15:06:04.890][4581][info][wasm] [context.cc:1151] wasm log apikey_ratelimit apikey_ratelimit: plugin 'api' configured: 4 plan(s)
[2026-12-03 15:06:05.002][4582][info][wasm] [context.cc:1151] wasm log apikey_ratelimit apikey_ratelimit: plugin 'api' configured: 4 plan(s)
";
        let ms = workers_configured_ms(log).unwrap();
        assert!((ms - 391.0).abs() < 1e-6, "{ms}");
        assert_eq!(workers_configured_ms("no workers"), None);
    }
}
