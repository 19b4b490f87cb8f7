//! `make run`: the tutorial's topology on this machine, in the foreground.
//!
//! - always: the upstream on 127.0.0.1:8000;
//! - `--replicas 1` (default): one Envoy on 127.0.0.1:9018 (admin 9901);
//! - `--replicas N`: N Envoys on 127.0.0.1:10001.. (admin 9911..) behind a
//!   front Envoy on 127.0.0.1:9018 (admin 9900) balancing round-robin, as
//!   the tutorial's Kubernetes Service does;
//! - `--mode global`: also Redis on 127.0.0.1:6379 and webdis on
//!   127.0.0.1:7379, and the Envoys run `envoy/global.yaml`.
//!
//! Built on the harness the tests use: the same process guard, start-up
//! checks and topology code, and the shipped configs (`envoy/*.yaml`,
//! `envoy/webdis.json`, `envoy/redis-acl.conf`) with only ports, the `.wasm`
//! path and a fresh Redis password filled in; only the ports are fixed. Logs
//! go to this terminal. Ctrl-C or SIGTERM stops every child; if one dies, the
//! others are stopped too. The repository is found from the current
//! directory (or `--repo DIR`, or `$REPO_ROOT`).
//!
//! Usage: demo [--mode local|global] [--workers N] [--replicas N] [--repo DIR]

use std::path::PathBuf;
use std::process::ExitCode;

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::process::{self, describe_status, Proc};
use e2e::topology::{front_config, replica_config, start_envoys, Mode, ReplicaPorts};
use e2e::upstream::Upstream;
use e2e::{paths, Error};

const UPSTREAM_PORT: u16 = 8000;
const LISTEN_PORT: u16 = 9018;
const ADMIN_PORT: u16 = 9901;
const FRONT_ADMIN_PORT: u16 = 9900;
const REPLICA_BASE_PORT: u16 = 10000;
const REPLICA_ADMIN_BASE_PORT: u16 = 9910;
const REDIS_PORT: u16 = 6379;
const WEBDIS_PORT: u16 = 7379;
/// Quieter than the tests: this is someone's terminal.
const ENVOY_ARGS: &[&str] = &["--log-level", "warn"];
const REDIS_ARGS: &[&str] = &["--loglevel", "warning"];
const USAGE: &str = "usage: demo [--mode local|global] [--workers N] [--replicas N] [--repo DIR]";

struct Options {
    mode: Mode,
    workers: u32,
    replicas: u16,
    repo: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        mode: Mode::Local,
        workers: 1,
        replicas: 1,
        repo: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--mode" => {
                options.mode = match value("--mode")?.as_str() {
                    "local" => Mode::Local,
                    "global" => Mode::Global,
                    other => {
                        return Err(format!("--mode: expected local or global, got {other:?}"))
                    }
                }
            }
            "--workers" => options.workers = number("--workers", &value("--workers")?, 64)?,
            "--replicas" => {
                options.replicas = u16::try_from(number("--replicas", &value("--replicas")?, 32)?)
                    .map_err(|e| e.to_string())?
            }
            "--repo" => options.repo = Some(PathBuf::from(value("--repo")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(options)
}

fn number(name: &str, value: &str, max: u32) -> Result<u32, String> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("{name}: expected 1 to {max}, got {value:?}"))
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    let signals = block_stop_signals();
    process::send_output_to_terminal();
    // The demo's processes are stopped when `run` returns, by their guards.
    match run(&options, &signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the demo runs. Fields drop in order, so the Envoys stop first
/// and the backend last: the reverse of the start order.
struct Running {
    front: Option<Envoy>,
    replicas: Vec<Envoy>,
    upstream: Upstream,
    backend: Option<RedisWebdis>,
}

impl Running {
    fn procs(&self) -> Vec<&Proc> {
        let mut procs: Vec<&Proc> = self.front.iter().map(Envoy::proc).collect();
        procs.extend(self.replicas.iter().map(Envoy::proc));
        procs.push(self.upstream.proc());
        if let Some(b) = &self.backend {
            procs.extend([b.redis.proc(), b.webdis.proc()]);
        }
        procs
    }
}

fn run(options: &Options, signals: &libc::sigset_t) -> Result<(), Error> {
    paths::init_repo_root(options.repo.as_deref())?;
    paths::envoy_bin()?;
    paths::upstream_bin()?;
    paths::wasm_path()?;

    // Redis and webdis through the shipped start scripts, as the tests,
    // docker compose and Kubernetes start them.
    let backend = match options.mode {
        Mode::Global => Some(RedisWebdis::try_start_on(
            REDIS_PORT,
            WEBDIS_PORT,
            REDIS_ARGS,
        )?),
        Mode::Local => None,
    };
    let upstream = Upstream::try_start_on(UPSTREAM_PORT)?;
    let webdis = backend.as_ref().map(|b| b.webdis.port());
    let single = options.replicas == 1;
    let configs = (1..=options.replicas)
        .map(|i| {
            let (listen, admin) = if single {
                (LISTEN_PORT, ADMIN_PORT)
            } else {
                (REPLICA_BASE_PORT + i, REPLICA_ADMIN_BASE_PORT + i)
            };
            let ports = ReplicaPorts {
                listen,
                admin,
                upstream: UPSTREAM_PORT,
                webdis,
            };
            replica_config(options.mode, ports)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let replicas = start_envoys(&configs, options.workers, ENVOY_ARGS)?;
    let front = if single {
        None
    } else {
        let listens: Vec<u16> = replicas.iter().map(Envoy::port).collect();
        let config = front_config(LISTEN_PORT, FRONT_ADMIN_PORT, &listens)?;
        Some(Envoy::start_with_args(&config, 1, ENVOY_ARGS)?)
    };
    let running = Running {
        front,
        replicas,
        upstream,
        backend,
    };

    let mode = match options.mode {
        Mode::Local => "local counters (Envoy shared data)",
        Mode::Global => "Redis counters through webdis (127.0.0.1:7379 -> 127.0.0.1:6379)",
    };
    let topology = if single {
        format!(
            "one Envoy ({} worker(s)), admin on 127.0.0.1:{ADMIN_PORT}",
            options.workers
        )
    } else {
        format!(
            "a front Envoy (admin 127.0.0.1:{FRONT_ADMIN_PORT}) over {} replicas on 127.0.0.1:{}-{} (admin {}-{})",
            options.replicas,
            REPLICA_BASE_PORT + 1,
            REPLICA_BASE_PORT + options.replicas,
            REPLICA_ADMIN_BASE_PORT + 1,
            REPLICA_ADMIN_BASE_PORT + options.replicas
        )
    };
    eprintln!(
        "demo: ready on http://127.0.0.1:{LISTEN_PORT}: {topology}, {mode}\n\
         demo: try  curl -i 'http://localhost:{LISTEN_PORT}/?api_key=1234'   or   make loadtest\n\
         demo: Ctrl-C stops everything"
    );
    supervise(signals, &running.procs())
}

/// Waits for a stop signal or for a child to exit on its own.
fn supervise(signals: &libc::sigset_t, procs: &[&Proc]) -> Result<(), Error> {
    loop {
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: `signals` is a valid, initialised set; null info is allowed.
        let signal = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        if signal > 0 {
            eprintln!("\ndemo: stopping");
            return Ok(());
        }
        for proc in procs {
            if let Some(status) = proc.try_status() {
                return Err(
                    proc.error(&format!("{}; stopping the others", describe_status(status)))
                );
            }
        }
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this process so that `sigtimedwait` can
/// take them (children get an empty mask back before `exec`: see `Proc`).
/// Called before any thread starts, so every thread inherits the mask.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}
