//! The bench's report: medians per setup and route, ratios to Envoy alone
//! and to the empty Wasm filter, as a Markdown table, a JSON file and a PNG
//! chart of the ratios.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::register_font;
use serde::Serialize;

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
    /// The filter's `backend_calls` counter (global setups).
    pub backend_calls: u64,
    /// Envoy's peak resident memory (VmHWM).
    pub peak_rss_bytes: u64,
    /// Envoy's CPU time (all threads) per request, in microseconds.
    pub envoy_cpu_us_per_request: f64,
}

/// The medians of a setup on a route.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
    pub backend_calls_per_request: Option<f64>,
    pub admitted_per_run: u64,
    pub requests_per_run: u64,
    pub peak_rss_mib: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
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
            let global = matches!(
                setup.filter,
                crate::setups::Filter::Ours(e2e::topology::Mode::Global, _)
            );
            let ratio = |s: &Sample, b: &Sample| s.measured.rps / b.measured.rps.max(1e-9);
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
                backend_calls_per_request: global.then(|| {
                    median(
                        runs.iter()
                            .map(|s| s.backend_calls as f64 / s.measured.requests.max(1) as f64)
                            .collect(),
                    )
                }),
                admitted_per_run: median(runs.iter().map(|s| s.admitted as f64).collect()) as u64,
                requests_per_run: median(runs.iter().map(|s| s.measured.requests as f64).collect())
                    as u64,
                peak_rss_mib: runs.iter().map(|s| s.peak_rss_bytes).max().unwrap_or(0) as f64
                    / 1048576.0,
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

/// The targets, checked against this run (informational: a bench
/// never fails on a number).
pub fn targets(rows: &[Row]) -> String {
    let mut out = String::from("\n**Targets (ratios from this run)**\n\n");
    for route in Route::ALL {
        let row = |id: &str| rows.iter().find(|r| r.setup == id && r.route == route);
        let (Some(local), Some(flood), Some(global), Some(global_flood)) = (
            row("local-1key"),
            row("local-flood"),
            row("global-allowed"),
            row("global-flood"),
        ) else {
            continue;
        };
        let mark = |ok: bool| if ok { "met" } else { "missed" };
        let local_vs_floor = local.vs_empty_wasm;
        let _ = writeln!(
            out,
            "- {}: local mode at {local_vs_floor:.2}× the empty-filter floor (aim ≥ 0.90): {}",
            route.name(),
            mark(local_vs_floor >= 0.90)
        );
        // Each side is already paired with Envoy alone round by round.
        let flood_vs_local = global_flood.vs_no_filter / flood.vs_no_filter.max(1e-9);
        let calls = global_flood.backend_calls_per_request.unwrap_or(0.0);
        let windows = 1.0; // `1/hour`: the whole run is one window.
        let allowed_calls = (global_flood.admitted_per_run as f64 + windows)
            / global_flood.requests_per_run.max(1) as f64;
        let _ = writeln!(
            out,
            "- {}: global throttled flood at {flood_vs_local:.2}× local mode's (aim ≥ 0.8), {calls:.5} backend calls per request (aim ≤ (admitted + 1 per window) / total = {allowed_calls:.5}): {}",
            route.name(),
            mark(flood_vs_local >= 0.8 && calls <= allowed_calls)
        );
        let allowed_vs_local = global.vs_no_filter / local.vs_no_filter.max(1e-9);
        let _ = writeln!(
            out,
            "- {}: global all-allowed at {allowed_vs_local:.2}× local mode (aim ≥ 0.4), p99 {:.2} ms (aim ≤ 3): {}",
            route.name(),
            global.p99_ms,
            mark(allowed_vs_local >= 0.4 && global.p99_ms <= 3.0)
        );
    }
    out
}

/// A grouped bar chart: per setup, throughput relative to Envoy alone, on
/// each route.
pub fn chart(rows: &[Row], setups: &[Setup], font: &[u8], path: &Path) -> Result<(), String> {
    register_font("sans-serif", FontStyle::Normal, leak(font))
        .map_err(|_| "cannot load the chart font".to_string())?;
    let root = BitMapBackend::new(path, (1200, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let count = setups.len();
    let top = rows.iter().map(|r| r.vs_no_filter).fold(1.0f64, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "apikey-ratelimit: throughput relative to Envoy with no filter",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(90)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(count as f64 - 0.5), 0f64..top)
        .map_err(|e| e.to_string())?;
    let ids: Vec<&str> = setups.iter().map(|s| s.id).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(count)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                ids.get(i as usize).map_or(String::new(), |s| s.to_string())
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 14))
        .y_desc("req/s ÷ req/s of Envoy alone (same route)")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [RGBColor(66, 133, 244), RGBColor(244, 160, 0)];
    for (r, route) in Route::ALL.iter().enumerate() {
        let color = colors[r];
        let offset = if r == 0 { -0.38 } else { 0.02 };
        // (x of the bar's left edge, ratio) for each setup measured on this route.
        let points: Vec<(f64, f64)> = setups
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let row = rows
                    .iter()
                    .find(|row| row.setup == s.id && row.route == *route)?;
                Some((i as f64 + offset, row.vs_no_filter))
            })
            .collect();
        chart
            .draw_series(
                points.iter().map(|&(x, ratio)| {
                    Rectangle::new([(x, 0.0), (x + 0.36, ratio)], color.filled())
                }),
            )
            .map_err(|e| e.to_string())?
            .label(route.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let labels = points.iter().map(|&(x, ratio)| {
            Text::new(
                format!("{ratio:.2}"),
                (x + 0.02, ratio + top * 0.02),
                ("sans-serif", 13).into_font(),
            )
        });
        chart.draw_series(labels).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// plotters keeps registered fonts for the life of the process.
fn leak(bytes: &[u8]) -> &'static [u8] {
    Box::leak(bytes.to_vec().into_boxed_slice())
}
