//! The bench's command line.

use std::path::PathBuf;
use std::time::Duration;

use crate::setups::Route;

pub const USAGE: &str = "usage: bench [--duration S] [--repeats N] [--connections N] [--workers N] \
     [--only SETUP,...] [--route NAME] [--one-connection] [--pin] [--out DIR] [--smoke] [--repo DIR] [--chart-from RESULTS_JSON]";

/// The setups `--one-connection` compares (the baselines always run too).
const ONE_CONNECTION_SETUPS: [&str; 2] = ["local-1key", "global-allowed"];

pub struct Options {
    pub duration: Duration,
    pub repeats: usize,
    pub connections: u32,
    /// Envoy's worker threads (`--concurrency`).
    pub workers: u32,
    pub only: Option<Vec<String>>,
    /// With `--pin`: Envoy gets this CPU to itself, everything else the rest.
    pub envoy_cpu: Option<usize>,
    pub routes: Vec<Route>,
    /// `None`: `target/bench` (or `target/bench-smoke`) in the repository.
    pub out: Option<PathBuf>,
    pub smoke: bool,
    pub repo: Option<PathBuf>,
    /// Only redraw the chart from a saved results.json.
    pub chart_from: Option<PathBuf>,
}

pub fn parse_args() -> Result<Options, String> {
    parse(std::env::args().skip(1))
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        duration: Duration::from_secs(4),
        repeats: 3,
        connections: 32,
        workers: 1,
        only: None,
        envoy_cpu: None,
        routes: Route::ALL.to_vec(),
        out: None,
        smoke: false,
        repo: None,
        chart_from: None,
    };
    let mut args = args.into_iter();
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
            "--workers" => options.workers = number("--workers", value("--workers")?)? as u32,
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
            // The latency aim: global mode's p50 with one client
            // connection on a 2-worker Envoy, next to local mode's.
            "--one-connection" => {
                options.connections = 1;
                options.workers = 2;
                options.only = Some(ONE_CONNECTION_SETUPS.map(str::to_string).to_vec());
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
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if options.repeats == 0
        || options.connections == 0
        || options.workers == 0
        || options.duration.is_zero()
    {
        return Err("--repeats, --connections, --workers and --duration must be at least 1".into());
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Options {
        parse(args.iter().map(|a| a.to_string())).unwrap()
    }

    #[test]
    fn one_connection_runs_local_and_global_at_one_connection_on_two_workers() {
        let o = parsed(&["--one-connection"]);
        assert_eq!((o.connections, o.workers), (1, 2));
        assert_eq!(o.only.unwrap(), ["local-1key", "global-allowed"]);
        let o = parsed(&["--one-connection", "--repeats", "5", "--route", "upstream"]);
        assert_eq!((o.repeats, o.routes), (5, vec![Route::Upstream]));
    }

    #[test]
    fn zero_workers_is_refused() {
        assert!(parse(["--workers".to_string(), "0".to_string()]).is_err());
    }
}
