//! The bench's report: medians per setup and route, ratios to Envoy alone
//! and to the empty Wasm filter, as a Markdown table (the JSON file holds
//! the same rows).

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::settlement::Counted;
use crate::setups::{Route, Setup};
use crate::wrk::Measured;

/// One run of one setup on one route.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub setup: &'static str,
    pub route: Route,
    pub repeat: usize,
    /// Runs measured back to back: the baselines, then one setup.
    pub block: usize,
    pub measured: Measured,
    /// The filter's `allowed` counter (admitted requests).
    pub admitted: u64,
    /// The filter's `throttled` counter (429s, from Redis or the cache).
    pub throttled: u64,
    /// The filter's `backend_calls` counter (global setups).
    pub backend_calls: u64,
    /// The filter's `backend_cache_hits` counter: denials with no call.
    pub backend_cache_hits: u64,
    /// The filter's `backend_batched_requests` counter (requests carried by
    /// webdis calls), if the filter has it.
    pub backend_batched_requests: Option<u64>,
    /// Envoy's peak resident memory (VmHWM).
    pub peak_rss_bytes: u64,
    /// From starting Envoy to its `/ready` answering 200.
    pub ready_ms: f64,
    /// From Envoy starting its workers to the last worker VM configured.
    pub workers_configured_ms: Option<f64>,
    /// The filter's `wasm_memory_bytes` gauge after the run: every VM's
    /// linear memory, added up.
    pub wasm_memory_bytes: Option<u64>,
    /// Requests the rules matched, added up over rules (`rule.*.requests`).
    pub rule_matches: u64,
    /// Envoy's CPU time (all threads) per request, in microseconds.
    pub envoy_cpu_us_per_request: f64,
    /// webdis's and Redis's CPU time (utime + stime) per request, in µs.
    pub backend_cpu_us_per_request: f64,
    /// The settlement setups' counters, and global mode's drain.
    pub settle: Option<Counted>,
}

/// Where a run's count of requests decided through Redis comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Carried {
    /// The filter's `backend_batched_requests` counter.
    Counter,
    /// A filter without that counter sends a call per request not answered
    /// from its denied-until cache: `allowed + throttled - backend_cache_hits`.
    Derived,
}

impl Carried {
    pub fn describe(self) -> &'static str {
        match self {
            Carried::Counter => "the filter's backend_batched_requests counter",
            Carried::Derived => {
                "allowed + throttled - backend_cache_hits (this filter has no backend_batched_requests counter)"
            }
        }
    }
}

impl Sample {
    /// Requests decided through Redis, and where that count comes from.
    pub fn carried(&self) -> (u64, Carried) {
        match self.backend_batched_requests {
            Some(requests) => (requests, Carried::Counter),
            None => (
                (self.admitted + self.throttled).saturating_sub(self.backend_cache_hits),
                Carried::Derived,
            ),
        }
    }

    pub fn calls_per_request(&self) -> f64 {
        self.backend_calls as f64 / self.measured.requests.max(1) as f64
    }

    pub fn requests_per_call(&self) -> f64 {
        self.carried().0 as f64 / self.backend_calls.max(1) as f64
    }
}

/// The medians of a setup on a route.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub setup: String,
    pub title: String,
    pub route: Route,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub vs_no_filter: f64,
    pub vs_empty_wasm: f64,
    /// The lowest and highest round's ratio to the empty filter.
    pub vs_empty_wasm_range: (f64, f64),
    /// Envoy's CPU microseconds per request, and what the filter adds to
    /// Envoy alone (same route).
    pub cpu_us: f64,
    pub cpu_us_over_no_filter: f64,
    /// Global setups: webdis calls per request, requests decided through
    /// Redis per call (and where that count comes from), and webdis's and
    /// Redis's CPU microseconds per request.
    pub backend_calls_per_request: Option<f64>,
    pub requests_per_call: Option<f64>,
    pub requests_per_call_from: Option<Carried>,
    pub backend_cpu_us_per_request: Option<f64>,
    pub admitted_per_run: u64,
    pub requests_per_run: u64,
    pub peak_rss_mib: f64,
    /// Setups measured beside another (`Setup::beside`): throughput over
    /// that setup's in the same block, and Envoy CPU µs per request over
    /// it, medians over rounds.
    #[serde(default)]
    pub vs_beside: Option<f64>,
    /// The lowest and highest round's `vs_beside`.
    #[serde(default)]
    pub vs_beside_range: Option<(f64, f64)>,
    #[serde(default)]
    pub cpu_us_over_beside: Option<f64>,
    #[serde(default)]
    pub ready_ms: f64,
    #[serde(default)]
    pub workers_configured_ms: Option<f64>,
    #[serde(default)]
    pub wasm_memory_mib: Option<f64>,
    #[serde(default)]
    pub rule_matches_per_request: f64,
    /// Settlement setups: requests settled per request wrk completed, and
    /// `settle_failed` over all runs; global mode: settlement calls per
    /// request, settled requests per call, and whether every run's final
    /// state in Redis was what the counters say.
    #[serde(default)]
    pub settled_per_request: Option<f64>,
    #[serde(default)]
    pub settle_failed: Option<u64>,
    #[serde(default)]
    pub settle_calls_per_request: Option<f64>,
    #[serde(default)]
    pub settle_entries_per_call: Option<f64>,
    /// Global mode's probes: lag from a response to its refund in Redis,
    /// median and max over every probe of every run, and the probes whose
    /// refund was not seen.
    #[serde(default)]
    pub settle_lag_ms: Option<f64>,
    #[serde(default)]
    pub settle_lag_max_ms: Option<f64>,
    #[serde(default)]
    pub settle_probes: Option<(usize, usize)>,
    /// From wrk's exit to the last change of the run's key in Redis, ms
    /// (median and max over runs; the first read's time when it never
    /// changed).
    #[serde(default)]
    pub settle_drain_ms: Option<(f64, f64)>,
    #[serde(default)]
    pub settle_state_agrees: Option<bool>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of the runs that have a value, if any has.
fn median_of_some(runs: &[&Sample], value: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(|s| value(s)).collect();
    (!values.is_empty()).then(|| median(values))
}

/// The settlement figures of a setup's runs (all `None` for setups
/// without settlement counters).
struct Settled {
    per_request: Option<f64>,
    failed: Option<u64>,
    calls_per_request: Option<f64>,
    entries_per_call: Option<f64>,
    lag_ms: Option<f64>,
    lag_max_ms: Option<f64>,
    /// Probes, and those whose refund was not seen.
    probes: Option<(usize, usize)>,
    drain_ms: Option<(f64, f64)>,
    state_agrees: Option<bool>,
}

fn settled(runs: &[&Sample], global: bool) -> Settled {
    let counted: Vec<(&Sample, &Counted)> = runs
        .iter()
        .filter_map(|s| Some((*s, s.settle.as_ref()?)))
        .collect();
    let of = |value: &dyn Fn(&Sample, &Counted) -> f64| {
        (!counted.is_empty()).then(|| median(counted.iter().map(|(s, c)| value(s, c)).collect()))
    };
    let requests = |s: &Sample| s.measured.requests.max(1) as f64;
    let drains: Vec<_> = counted
        .iter()
        .filter_map(|(_, c)| c.drain.as_ref())
        .collect();
    let probes: Vec<Option<f64>> = counted
        .iter()
        .flat_map(|(_, c)| c.probe_lags_ms.iter().copied())
        .collect();
    let lags: Vec<f64> = probes.iter().flatten().copied().collect();
    Settled {
        per_request: of(&|s, c| c.settled_by_load() as f64 / requests(s)),
        failed: (!counted.is_empty()).then(|| counted.iter().map(|(_, c)| c.failed).sum()),
        calls_per_request: of(&|s, c| c.calls as f64 / requests(s)).filter(|_| global),
        entries_per_call: of(&|_, c| c.settled as f64 / c.calls.max(1) as f64).filter(|_| global),
        lag_ms: (!lags.is_empty()).then(|| median(lags.clone())),
        lag_max_ms: lags.iter().copied().reduce(f64::max),
        probes: (!probes.is_empty()).then(|| (probes.len(), probes.len() - lags.len())),
        drain_ms: drains
            .iter()
            .map(|d| d.ms)
            .reduce(f64::max)
            .map(|max| (median(drains.iter().map(|d| d.ms).collect()), max)),
        state_agrees: (!drains.is_empty()).then(|| drains.iter().all(|d| d.quiet && d.agrees)),
    }
}

/// Medians per setup and route. Ratios are taken block by block (a setup
/// against the baselines measured just before it) and then their median:
/// on a shared machine whose speed drifts by tens of percent over a run,
/// only paired ratios mean something.
pub fn summarize(setups: &[Setup], samples: &[Sample]) -> Vec<Row> {
    let mut rows = Vec::new();
    for route in Route::ALL {
        let of = |id: &str| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.setup == id && s.route == route)
                .collect()
        };
        let baseline = |id: &str, of: &Sample| {
            samples.iter().find(|s| {
                s.setup == id && s.route == route && s.repeat == of.repeat && s.block == of.block
            })
        };
        let paired = |runs: &[&Sample], base: &str, value: &dyn Fn(&Sample, &Sample) -> f64| {
            median(
                runs.iter()
                    .filter_map(|s| Some(value(s, baseline(base, s)?)))
                    .collect(),
            )
        };
        for setup in setups {
            let runs = of(setup.id);
            if runs.is_empty() {
                continue;
            }
            let global = setup.is_global();
            let of_runs = |value: &dyn Fn(&Sample) -> f64| {
                global.then(|| median(runs.iter().map(|s| value(s)).collect()))
            };
            let ratio = |s: &Sample, b: &Sample| s.measured.rps / b.measured.rps.max(1e-9);
            let settled = settled(&runs, global);
            let ratios_to_floor: Vec<f64> = runs
                .iter()
                .filter_map(|s| Some(ratio(s, baseline("empty-wasm", s)?)))
                .collect();
            rows.push(Row {
                setup: setup.id.to_string(),
                title: setup.title.to_string(),
                route,
                rps: median(runs.iter().map(|s| s.measured.rps).collect()),
                p50_ms: median(runs.iter().map(|s| s.measured.p50_ms).collect()),
                p99_ms: median(runs.iter().map(|s| s.measured.p99_ms).collect()),
                vs_no_filter: paired(&runs, "no-filter", &ratio),
                vs_empty_wasm: median(ratios_to_floor.clone()),
                vs_empty_wasm_range: (
                    ratios_to_floor
                        .iter()
                        .copied()
                        .fold(f64::INFINITY, f64::min),
                    ratios_to_floor.iter().copied().fold(0.0, f64::max),
                ),
                cpu_us: median(runs.iter().map(|s| s.envoy_cpu_us_per_request).collect()),
                cpu_us_over_no_filter: paired(&runs, "no-filter", &|s, b| {
                    s.envoy_cpu_us_per_request - b.envoy_cpu_us_per_request
                }),
                backend_calls_per_request: of_runs(&Sample::calls_per_request),
                requests_per_call: of_runs(&Sample::requests_per_call),
                requests_per_call_from: runs.first().filter(|_| global).map(|s| s.carried().1),
                backend_cpu_us_per_request: of_runs(&|s| s.backend_cpu_us_per_request),
                admitted_per_run: median(runs.iter().map(|s| s.admitted as f64).collect()) as u64,
                requests_per_run: median(runs.iter().map(|s| s.measured.requests as f64).collect())
                    as u64,
                peak_rss_mib: runs.iter().map(|s| s.peak_rss_bytes).max().unwrap_or(0) as f64
                    / 1048576.0,
                vs_beside: setup.beside.map(|b| paired(&runs, b, &ratio)),
                vs_beside_range: setup.beside.map(|b| {
                    let ratios: Vec<f64> = runs
                        .iter()
                        .filter_map(|s| Some(ratio(s, baseline(b, s)?)))
                        .collect();
                    (
                        ratios.iter().copied().fold(f64::INFINITY, f64::min),
                        ratios.iter().copied().fold(0.0, f64::max),
                    )
                }),
                cpu_us_over_beside: setup.beside.map(|b| {
                    paired(&runs, b, &|s, b| {
                        s.envoy_cpu_us_per_request - b.envoy_cpu_us_per_request
                    })
                }),
                ready_ms: median(runs.iter().map(|s| s.ready_ms).collect()),
                workers_configured_ms: median_of_some(&runs, |s| s.workers_configured_ms),
                wasm_memory_mib: median_of_some(&runs, |s| {
                    s.wasm_memory_bytes.map(|b| b as f64 / 1048576.0)
                }),
                rule_matches_per_request: median(
                    runs.iter()
                        .map(|s| s.rule_matches as f64 / s.measured.requests.max(1) as f64)
                        .collect(),
                ),
                settled_per_request: settled.per_request,
                settle_failed: settled.failed,
                settle_calls_per_request: settled.calls_per_request,
                settle_entries_per_call: settled.entries_per_call,
                settle_lag_ms: settled.lag_ms,
                settle_lag_max_ms: settled.lag_max_ms,
                settle_probes: settled.probes,
                settle_drain_ms: settled.drain_ms,
                settle_state_agrees: settled.state_agrees,
            });
        }
    }
    rows
}

pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    for route in Route::ALL {
        let _ = writeln!(out, "\n**Route: {}**\n", route.name());
        let _ = writeln!(
            out,
            "| setup | req/s | p50 ms | p99 ms | × no filter | × empty Wasm (rounds' range) | Envoy CPU µs/req (+ over no filter) | backend calls / req | peak RSS MiB |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows.iter().filter(|r| r.route == route) {
            let calls = row
                .backend_calls_per_request
                .map_or("".to_string(), |c| format!("{c:.4}"));
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} ({:.2}–{:.2}) | {:.1} ({:+.1}) | {} | {:.0} |",
                row.title,
                row.rps,
                row.p50_ms,
                row.p99_ms,
                row.vs_no_filter,
                row.vs_empty_wasm,
                row.vs_empty_wasm_range.0,
                row.vs_empty_wasm_range.1,
                row.cpu_us,
                row.cpu_us_over_no_filter,
                calls,
                row.peak_rss_mib
            );
        }
    }
    out
}
