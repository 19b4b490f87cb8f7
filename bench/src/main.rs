//! `make bench`: the filter's cost side by side with Envoy alone, Envoy's
//! native `local_ratelimit`, and an empty proxy-wasm filter, in local and
//! global mode, on a `direct_response` route and on the real upstream.
//!
//! Every setup runs in one Envoy with one worker, loaded by wrk (1 thread,
//! the same connections and duration) on loopback. Each setup runs right
//! after the two baselines (Envoy alone, the empty filter) and is compared
//! with them; the whole round repeats, and ratios are medians over rounds,
//! so that they hold on a machine whose speed drifts.
//! Results: a Markdown table on stdout, `target/bench/results.json`, and
//! `target/bench/ratios.png`. Not a pass/fail test: `--smoke` runs it with
//! tiny durations in `make test`, to keep it from rotting.
//!
//! Layout: `setups.rs` (what is measured), `wrk.rs` (the load generator),
//! `report.rs` (medians, ratios, table, JSON, chart), this file (the runs).
//!
//! Usage: bench [--duration SECONDS] [--repeats N] [--connections N]
//!              [--only SETUP_ID,...] [--route direct_response|upstream]
//!              [--pin] [--out DIR] [--smoke] [--repo DIR]
//!
//! The repository is found from the current directory (or `--repo DIR`, or
//! `$REPO_ROOT`); `--out` defaults to its `target/bench/`.
//!
//! `--pin` gives Envoy CPU 0 to itself and everything else CPU 1: less
//! noise from the load generator, but on 2 cores the backend then shares a
//! CPU with wrk.

mod report;
mod setups;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::metrics::metric;
use e2e::paths;
use e2e::upstream::Upstream;

use report::Sample;
use setups::{Keys, Route, Setup};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

struct Options {
    duration: Duration,
    repeats: usize,
    connections: u32,
    only: Option<Vec<String>>,
    /// With `--pin`: Envoy gets this CPU to itself, everything else the rest.
    envoy_cpu: Option<usize>,
    routes: Vec<Route>,
    /// `None`: `target/bench` (or `target/bench-smoke`) in the repository.
    out: Option<PathBuf>,
    smoke: bool,
    repo: Option<PathBuf>,
    /// Only redraw the chart from a saved results.json.
    chart_from: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        duration: Duration::from_secs(4),
        repeats: 3,
        connections: 32,
        only: None,
        envoy_cpu: None,
        routes: Route::ALL.to_vec(),
        out: None,
        smoke: false,
        repo: None,
        chart_from: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match arg.as_str() {
            "--duration" => {
                options.duration = Duration::from_secs(number("--duration", value("--duration")?)?)
            }
            "--repeats" => options.repeats = number("--repeats", value("--repeats")?)? as usize,
            "--connections" => {
                options.connections = number("--connections", value("--connections")?)? as u32
            }
            "--pin" => options.envoy_cpu = Some(0),
            "--chart-from" => options.chart_from = Some(PathBuf::from(value("--chart-from")?)),
            "--only" => {
                options.only = Some(value("--only")?.split(',').map(str::to_string).collect())
            }
            "--route" => {
                let name = value("--route")?;
                let route = Route::ALL
                    .into_iter()
                    .find(|r| r.name() == name)
                    .ok_or(format!(
                        "--route: expected direct_response or upstream, got {name:?}"
                    ))?;
                options.routes = vec![route];
            }
            "--out" => options.out = Some(PathBuf::from(value("--out")?)),
            "--repo" => options.repo = Some(PathBuf::from(value("--repo")?)),
            "--smoke" => {
                options.smoke = true;
                options.duration = Duration::from_secs(1);
                options.repeats = 1;
                options.connections = 8;
            }
            "-h" | "--help" => {
                println!("usage: bench [--duration S] [--repeats N] [--connections N] [--only SETUP,...] [--route NAME] [--out DIR] [--smoke] [--repo DIR]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if options.repeats == 0 || options.connections == 0 || options.duration.is_zero() {
        return Err("--repeats, --connections and --duration must be at least 1".into());
    }
    Ok(options)
}

fn main() -> ExitCode {
    match parse_args().and_then(|o| {
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
    report::chart(&rows, &setups, &font, &png)?;
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

    let setups: Vec<Setup> = setups::all()
        .into_iter()
        .filter(|s| {
            options
                .only
                .as_ref()
                .is_none_or(|only| only.iter().any(|o| o == s.id))
        })
        .collect();
    if setups.is_empty() {
        return Err("--only matches no setup".into());
    }
    // One upstream (one thread, like a small service) and one backend for
    // the whole bench; a fresh Envoy for every run.
    std::env::set_var("UPSTREAM_THREADS", "1");
    let upstream = Upstream::try_start().map_err(|e| e.0)?;
    let backend = RedisWebdis::start();

    let mut samples = Vec::new();
    for (repeat, block, setup) in schedule(&setups, options) {
        for &route in &options.routes {
            let sample = measure(
                options,
                setup,
                route,
                (repeat, block),
                &upstream,
                &backend,
                &empty_wasm,
                &script_path,
            )?;
            eprintln!(
                "bench: [{}/{}] {:<15} {:<16} {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms",
                repeat + 1,
                options.repeats,
                setup.id,
                route.name(),
                sample.measured.rps,
                sample.measured.p50_ms,
                sample.measured.p99_ms
            );
            samples.push(sample);
        }
    }

    let rows = report::summarize(&setups, &samples);
    let wasm_size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    let machine = machine();
    let mut table = format!(
        "## apikey-ratelimit bench\n\n{machine}; Envoy {}, 1 worker; wrk 1 thread, {} connections, {} s per run, {} repeat(s), medians. Filter: {} bytes.\n",
        paths::ENVOY_VERSION,
        options.connections,
        options.duration.as_secs(),
        options.repeats,
        wasm_size
    );
    table.push_str(&report::markdown(&rows));
    table.push_str(&report::targets(&rows));
    println!("{table}");
    let json = serde_json::json!({
        "machine": machine,
        "duration_seconds": options.duration.as_secs(),
        "repeats": options.repeats,
        "connections": options.connections,
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
    report::chart(&rows, &setups, &font, &png)?;
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
/// apart, not minutes. Each round starts one setup later. The smoke run
/// just runs each setup once.
fn schedule<'a>(setups: &'a [Setup], options: &Options) -> Vec<(usize, usize, &'a Setup)> {
    if options.smoke {
        return setups.iter().map(|s| (0, 0, s)).collect();
    }
    let (baselines, measured): (Vec<&Setup>, Vec<&Setup>) =
        setups.iter().partition(|s| BASELINES.contains(&s.id));
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
            runs.push((repeat, block, *setup));
        }
    }
    runs
}

#[allow(clippy::too_many_arguments)]
fn measure(
    options: &Options,
    setup: &Setup,
    route: Route,
    (repeat, block): (usize, usize),
    upstream: &Upstream,
    backend: &RedisWebdis,
    empty_wasm: &std::path::Path,
    script: &std::path::Path,
) -> Result<Sample, String> {
    let config = setups::envoy_config(
        setup,
        route,
        upstream.port(),
        backend.webdis.port(),
        empty_wasm,
    )?;
    let envoy = Envoy::start(&config, 1).map_err(|e| e.0)?;
    let (key, script) = match setup.keys {
        Keys::One(key) => (key, None),
        Keys::Many(_) => ("", Some(script)),
    };
    let url = format!("http://{}/?api_key={key}", envoy.addr());
    let cpu_before = cpu_nanos(envoy.proc().pid());
    let measured = wrk::run(&wrk::Load {
        url: &url,
        connections: options.connections,
        duration: options.duration,
        script,
    })?;
    let cpu = cpu_nanos(envoy.proc().pid()).saturating_sub(cpu_before);
    let peak_rss_bytes = peak_rss(envoy.proc().pid());
    Ok(Sample {
        setup: setup.id,
        route,
        repeat,
        block,
        admitted: metric(&envoy, "allowed"),
        backend_calls: metric(&envoy, "backend_calls"),
        peak_rss_bytes,
        envoy_cpu_us_per_request: cpu as f64 / 1000.0 / measured.requests.max(1) as f64,
        measured,
    })
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

/// Moves every thread of a process to one CPU (`taskset`, util-linux).
fn pin(pid: u32, cpu: usize) -> Result<(), String> {
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

/// VmHWM: the process's peak resident memory.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
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
        if s.setup.starts_with("global") && s.backend_calls == 0 {
            return Err(format!(
                "smoke: {} on {} made no backend call",
                s.setup,
                s.route.name()
            ));
        }
    }
    eprintln!("bench: smoke run ok ({} runs)", samples.len());
    Ok(())
}
