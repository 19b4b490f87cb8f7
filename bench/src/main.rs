//! `make bench`: the filter's cost side by side with Envoy alone, Envoy's
//! native `local_ratelimit`, and an empty proxy-wasm filter, in local and
//! global mode, on a `direct_response` route and on the real upstream.
//!
//! Every setup runs in one Envoy (one worker unless `--workers`), loaded by
//! wrk (1 thread, the same connections and duration) on loopback. Each
//! setup runs right after the two baselines (Envoy alone, the empty filter)
//! and is compared with them; the whole round repeats, and ratios are
//! medians over rounds, so that they hold on a machine whose speed drifts.
//! Results: Markdown tables on stdout, `target/bench/results.json`, and
//! `target/bench/ratios.png`. Not a pass/fail test: `--smoke` runs it with
//! tiny durations in `make test`, to keep it from rotting.
//!
//! Layout: `options.rs` (the command line), `setups.rs` (what is measured),
//! `measure.rs` (one run), `wrk.rs` (the load generator), `report.rs`
//! (medians, ratios, the table), `aims.rs` (global mode against local mode,
//! and the aims), `policies.rs` (the registry and rules setups, and
//! their table), `settlement.rs` (cost settled from the response: its
//! setups, their drain and table), `chart.rs` (the PNG), this file (the
//! runs).
//!
//! Usage: see [`options::USAGE`]. `--one-connection` measures latency:
//! local and global mode at one connection on a 2-worker Envoy.
//!
//! The repository is found from the current directory (or `--repo DIR`, or
//! `$REPO_ROOT`); `--out` defaults to its `target/bench/`.
//!
//! `--pin` gives Envoy CPU 0 to itself and everything else CPU 1: less
//! noise from the load generator, but on 2 cores the backend then shares a
//! CPU with wrk.

mod aims;
mod chart;
mod measure;
mod options;
mod policies;
mod report;
mod settlement;
mod setups;
mod wrk;

use std::process::ExitCode;

use e2e::backend::RedisWebdis;
use e2e::paths;
use e2e::upstream::Upstream;

use measure::Bench;
use options::Options;
use report::Sample;
use setups::Setup;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn main() -> ExitCode {
    match options::parse_args().and_then(|o| {
        if o.envoy_cpu.is_some() {
            // Everything this process starts (wrk, the upstream, webdis,
            // Redis) inherits "not CPU 0"; each Envoy is then moved there.
            pin(std::process::id(), 1)?;
        }
        run(&o)
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Redraws the chart of a saved run next to its results.json.
fn redraw(results: &std::path::Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(results).map_err(|e| format!("{}: {e}", results.display()))?;
    let saved: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let rows: Vec<report::Row> = serde_json::from_value(saved["rows"].clone())
        .map_err(|e| format!("{}: {e}", results.display()))?;
    let setups: Vec<Setup> = setups::all()
        .into_iter()
        .filter(|s| rows.iter().any(|r| r.setup == s.id))
        .collect();
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
    let png = results.with_file_name("ratios.png");
    chart::chart(&rows, &setups, &font, &png)?;
    eprintln!("bench: wrote {}", png.display());
    Ok(())
}

fn run(options: &Options) -> Result<(), String> {
    if let Some(results) = &options.chart_from {
        return redraw(results);
    }
    let root = paths::init_repo_root(options.repo.as_deref()).map_err(|e| e.0)?;
    let out = options.out.clone().unwrap_or_else(|| {
        let dir = if options.smoke {
            "bench-smoke"
        } else {
            "bench"
        };
        root.join("target").join(dir)
    });
    let empty_wasm = root.join("target/wasm32-wasip1/release/empty_filter.wasm");
    if !empty_wasm.is_file() {
        return Err(format!(
            "{} is missing: run `make bench`",
            empty_wasm.display()
        ));
    }
    let wasm = paths::wasm_path().map_err(|e| e.0)?;
    let font = std::fs::read(FONT)
        .map_err(|e| format!("{FONT}: {e} (make bench installs fonts-dejavu-core)"))?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let script_path = out.join("many-keys.lua");
    std::fs::write(&script_path, wrk::many_keys_script(10_000)).map_err(|e| e.to_string())?;
    let rule_mix = out.join("rule-mix.lua");
    std::fs::write(&rule_mix, policies::rules_script()).map_err(|e| e.to_string())?;

    let all = setups::all();
    let chosen = |id: &str| {
        options
            .only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == id))
    };
    let setups: Vec<Setup> = all
        .iter()
        .filter(|s| {
            // Every ratio is taken against the baselines: they always run,
            // and so do the setups a chosen one is measured beside.
            BASELINES.contains(&s.id)
                || chosen(s.id)
                || all.iter().any(|o| {
                    chosen(o.id) && setups::beside_chain(o, &all).iter().any(|b| b.id == s.id)
                })
        })
        .copied()
        .collect();
    if let Some(unknown) = options
        .only
        .iter()
        .flatten()
        .find(|o| !setups.iter().any(|s| s.id == o.as_str()))
    {
        return Err(format!("--only: no setup is named {unknown:?}"));
    }
    // One upstream (one thread, like a small service) and one backend for
    // the whole bench; a fresh Envoy for every run.
    std::env::set_var("UPSTREAM_THREADS", "1");
    let upstream = Upstream::try_start().map_err(|e| e.0)?;
    let backend = RedisWebdis::start();

    let bench = Bench {
        options,
        upstream: &upstream,
        backend: &backend,
        empty_wasm: &empty_wasm,
        many_keys: &script_path,
        rule_mix: &rule_mix,
    };
    let mut samples = Vec::new();
    let runs = schedule(&setups, options);
    for &(repeat, block, setup) in &runs {
        for &route in &options.routes {
            if !runs_on(setup, route, &runs, (repeat, block)) {
                continue;
            }
            let sample = bench.measure(setup, route, (repeat, block))?;
            eprintln!(
                "bench: [{}/{}] {:<15} {:<16} {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms{}{}",
                repeat + 1,
                options.repeats,
                setup.id,
                route.name(),
                sample.measured.rps,
                sample.measured.p50_ms,
                sample.measured.p99_ms,
                backend_summary(setup, &sample),
                settle_summary(&sample)
            );
            samples.push(sample);
        }
    }

    let rows = report::summarize(&setups, &samples);
    let wasm_size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    let machine = machine();
    let mut table = format!(
        "## apikey-ratelimit bench\n\n{machine}; Envoy {}, {} worker(s); wrk 1 thread, {} connection(s), {} s per run, {} repeat(s), medians. Filter: {} bytes.\n",
        paths::ENVOY_VERSION,
        options.workers,
        options.connections,
        options.duration.as_secs(),
        options.repeats,
        wasm_size
    );
    table.push_str(&report::markdown(&rows));
    table.push_str(&aims::global_table(&rows, &setups));
    table.push_str(&policies::table(&rows, &setups));
    table.push_str(&settlement::table(&rows));
    table.push_str(&aims::targets(
        &rows,
        &setups,
        &aims::Shape {
            connections: options.connections,
            workers: options.workers,
        },
    ));
    println!("{table}");
    let json = serde_json::json!({
        "machine": machine,
        "duration_seconds": options.duration.as_secs(),
        "repeats": options.repeats,
        "connections": options.connections,
        "workers": options.workers,
        "wasm_bytes": wasm_size,
        "rows": rows,
        "samples": samples,
    });
    let json_path = out.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(out.join("results.md"), &table).map_err(|e| e.to_string())?;
    let png = out.join("ratios.png");
    chart::chart(&rows, &setups, &font, &png)?;
    eprintln!(
        "bench: wrote {}, {} and results.md",
        json_path.display(),
        png.display()
    );
    if options.smoke {
        smoke_checks(&samples)?;
    }
    Ok(())
}

/// The setups whose runs every other setup is compared with.
const BASELINES: [&str; 2] = ["no-filter", "empty-wasm"];

/// The order of the runs, as (round, block, setup). This machine's speed
/// drifts by tens of percent within minutes, so each setup is measured in
/// a block right after the two baselines, and compared with those: seconds
/// apart, not minutes. Each round starts one setup later. A setup measured
/// beside another joins that one's block (or, through a chain of them, the
/// block of the last), and the block's order flips every round (A, B, C
/// then C, B, A), so a drift within it favours none.
/// The smoke run just runs each setup once.
fn schedule<'a>(setups: &'a [Setup], options: &Options) -> Vec<(usize, usize, &'a Setup)> {
    if options.smoke {
        return setups.iter().map(|s| (0, 0, s)).collect();
    }
    let (baselines, measured): (Vec<&Setup>, Vec<&Setup>) = setups
        .iter()
        .filter(|s| s.beside.is_none())
        .partition(|s| BASELINES.contains(&s.id));
    let mut runs = Vec::new();
    for repeat in 0..options.repeats {
        if measured.is_empty() {
            runs.extend(baselines.iter().map(|s| (repeat, 0, *s)));
            continue;
        }
        let rotated = measured
            .iter()
            .cycle()
            .skip(repeat % measured.len())
            .take(measured.len());
        for (block, setup) in rotated.enumerate() {
            runs.extend(baselines.iter().map(|s| (repeat, block, *s)));
            let mut together: Vec<&Setup> = std::iter::once(*setup)
                .chain(setups.iter().filter(|s| {
                    setups::beside_chain(s, setups)
                        .last()
                        .is_some_and(|head| head.id == setup.id)
                }))
                .collect();
            if repeat % 2 == 1 {
                together.reverse();
            }
            runs.extend(together.into_iter().map(|s| (repeat, block, s)));
        }
    }
    runs
}

/// Whether `setup` runs on `route` in its block: where it can, and for a
/// baseline, where a setup of its block does (all routes in a block of
/// baselines alone).
fn runs_on(
    setup: &Setup,
    route: setups::Route,
    runs: &[(usize, usize, &Setup)],
    block: (usize, usize),
) -> bool {
    if !setup.runs_on(route) {
        return false;
    }
    if !BASELINES.contains(&setup.id) {
        return true;
    }
    let mut measured = runs
        .iter()
        .filter(|(r, b, s)| (*r, *b) == block && !BASELINES.contains(&s.id))
        .peekable();
    measured.peek().is_none() || measured.any(|(_, _, s)| s.runs_on(route))
}

/// Moves every thread of a process to one CPU (`taskset`, util-linux).
pub fn pin(pid: u32, cpu: usize) -> Result<(), String> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("taskset: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("taskset could not pin {pid} to CPU {cpu}"))
    }
}

/// A global run's backend figures, for the progress line.
fn backend_summary(setup: &Setup, sample: &Sample) -> String {
    if !setup.is_global() {
        return String::new();
    }
    format!(
        "  {:.3} calls/req  {:.1} req/call  webdis+Redis {:.1} µs/req",
        sample.calls_per_request(),
        sample.requests_per_call(),
        sample.backend_cpu_us_per_request
    )
}

/// A settlement run's figures, for the progress line.
fn settle_summary(sample: &Sample) -> String {
    let Some(c) = &sample.settle else {
        return String::new();
    };
    let requests = sample.measured.requests.max(1) as f64;
    let mut text = format!(
        "  settled {:.3}/req  settle_failed {}",
        c.settled_by_load() as f64 / requests,
        c.failed
    );
    if c.calls > 0 {
        text.push_str(&format!(
            "  settle calls {:.4}/req ({:.1} entries each)",
            c.calls as f64 / requests,
            c.settled as f64 / c.calls as f64
        ));
    }
    let lags: Vec<f64> = c.probe_lags_ms.iter().flatten().copied().collect();
    if !c.probe_lags_ms.is_empty() {
        text.push_str(&format!(
            "  lag {} ms ({} of {} probes seen)",
            lags.iter()
                .map(|l| format!("{l:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            lags.len(),
            c.probe_lags_ms.len()
        ));
    }
    if let Some(d) = &c.drain {
        text.push_str(&format!(
            "  after wrk: used {} at {:.1} ms, {} at {:.1} ms (quiet {}, = counters {})",
            d.used_first, d.first_read_ms, d.used_final, d.ms, d.quiet, d.agrees
        ));
    }
    text
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu})")
}

/// In `make test`: the harness ran every setup and each answered as its
/// setup says (no errors; floods throttled; everything else allowed).
fn smoke_checks(samples: &[Sample]) -> Result<(), String> {
    for s in samples {
        let m = &s.measured;
        let flood = s.setup.ends_with("flood");
        let ok = m.requests > 0
            && m.socket_errors == 0
            && if flood {
                m.non_2xx + 1 >= m.requests
            } else {
                m.non_2xx == 0
            };
        if !ok {
            return Err(format!(
                "smoke: {} on {} measured {m:?}",
                s.setup,
                s.route.name()
            ));
        }
        let all = setups::all();
        let setup = all.iter().find(|g| g.id == s.setup);
        // The rules setup's requests match its rules as meant to.
        let matches = s.rule_matches as f64 / m.requests.max(1) as f64;
        if setup.is_some_and(|g| g.keys == setups::Keys::RuleMix)
            && (matches - policies::RULE_MATCHES_PER_REQUEST).abs() > 0.1
        {
            return Err(format!(
                "smoke: {} on {} matched {matches:.2} rules per request, not {}",
                s.setup,
                s.route.name(),
                policies::RULE_MATCHES_PER_REQUEST
            ));
        }
        let global = setup.is_some_and(Setup::is_global);
        if global && s.backend_calls == 0 {
            return Err(format!(
                "smoke: {} on {} made no backend call",
                s.setup,
                s.route.name()
            ));
        }
        // The settlement setups settle every response, or none, and lose
        // none; in global mode through calls of their own.
        if let Some(c) = &s.settle {
            let settles = settlement::settles(s.setup);
            let ok = c.failed == 0
                && if settles {
                    c.settled > 0 && (!global || c.calls > 0)
                } else {
                    c.settled == 0 && c.calls == 0
                };
            if !ok {
                return Err(format!(
                    "smoke: {} on {} counted {c:?}",
                    s.setup,
                    s.route.name()
                ));
            }
        }
    }
    eprintln!("bench: smoke run ok ({} runs)", samples.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use setups::Route;

    #[test]
    fn the_settlement_setups_share_one_block_on_the_upstream_route_only() {
        let all = setups::all();
        for (settle, fixed) in settlement::PAIRS {
            let s = all.iter().find(|s| s.id == settle).unwrap();
            assert_eq!(s.beside, Some(fixed), "{settle}");
        }
        let options = options::parse(["--repeats".to_string(), "2".to_string()]).unwrap();
        let runs = schedule(&all, &options);
        let block_of = |id: &str, repeat: usize| {
            runs.iter()
                .find(|(r, _, s)| *r == repeat && s.id == id)
                .map(|(_, b, _)| *b)
                .unwrap()
        };
        for repeat in 0..2 {
            let block = block_of("global-fixed", repeat);
            for id in ["global-settle", "local-fixed", "local-settle"] {
                assert_eq!(block_of(id, repeat), block, "{id}");
            }
            let members: Vec<&str> = runs
                .iter()
                .filter(|(r, b, _)| (*r, *b) == (repeat, block))
                .map(|(_, _, s)| s.id)
                .collect();
            assert_eq!(members.len(), 6, "{members:?}");
            // The baselines run only where the block's setups do.
            let baseline = all.iter().find(|s| s.id == "no-filter").unwrap();
            assert!(runs_on(baseline, Route::Upstream, &runs, (repeat, block)));
            assert!(!runs_on(baseline, Route::Direct, &runs, (repeat, block)));
            let fixed = all.iter().find(|s| s.id == "global-fixed").unwrap();
            assert!(!runs_on(fixed, Route::Direct, &runs, (repeat, block)));
        }
        // Elsewhere, baselines run on both routes.
        let block = block_of("local-1key", 0);
        let baseline = all.iter().find(|s| s.id == "empty-wasm").unwrap();
        assert!(runs_on(baseline, Route::Direct, &runs, (0, block)));
    }
}
