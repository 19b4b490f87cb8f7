//! Reading what an Envoy counted: the filter's own metrics (`define_metric`
//! names show up as `wasmcustom.<name>`) and Envoy's listener stats, all from
//! the admin endpoint's `/stats` ([`Envoy::stats`]).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::envoy::Envoy;

/// The shipped configs' plugin name: metrics are
/// `wasmcustom.apikey_ratelimit.api.<event>`.
pub const PLUGIN: &str = "api";

/// How long the filter may hold counts before Envoy sees them (its tick,
/// 250 ms, with a margin): counts gather in each VM and are flushed in
/// batches, because a host call per request is the costliest thing it does.
pub const METRIC_FLUSH: Duration = Duration::from_millis(400);

/// The stat name of the filter's counter `event`, e.g. `throttled`.
pub fn metric_name(event: &str) -> String {
    format!("wasmcustom.apikey_ratelimit.{PLUGIN}.{event}")
}

/// One of the filter's counters in this Envoy (0 before it is first used),
/// once it has settled (see [`counters`]).
pub fn metric(envoy: &Envoy, event: &str) -> u64 {
    counters(envoy, &[event])
        .first()
        .copied()
        .flatten()
        .unwrap_or(0)
}

/// Several of the filter's counters from one `/stats` read, once they have
/// settled: read again after a flush period until two reads agree, so every
/// count already made is in. `None` for a counter this Envoy does not have
/// (a filter without that metric).
pub fn counters(envoy: &Envoy, events: &[&str]) -> Vec<Option<u64>> {
    let read = || {
        let stats = envoy.stats_now();
        events
            .iter()
            .map(|event| stats.get(&metric_name(event)).copied())
            .collect::<Vec<_>>()
    };
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

/// Connections each worker accepted on the Envoy's first listener, in
/// worker order.
pub fn connections_per_worker(envoy: &Envoy) -> Vec<u64> {
    let stats = envoy.stats().unwrap_or_default();
    let prefix = format!("listener.127.0.0.1_{}.worker_", envoy.port());
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

/// Requests the shipped configs' HTTP listener (`api`) received.
pub fn requests_received(envoy: &Envoy) -> u64 {
    envoy.counter("http.api.downstream_rq_total").unwrap_or(0)
}

/// The `name: value` lines of `/stats` whose value is an integer (counters and
/// gauges; histograms are left out).
pub fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
