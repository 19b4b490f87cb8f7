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
//! The configs are the shipped ones (`envoy/*.yaml`, `envoy/webdis.json`,
//! `envoy/redis-acl.conf`), made by the same functions the tests use, with
//! only ports, the `.wasm` path and a fresh Redis password filled in. Logs go
//! to this terminal. Ctrl-C or SIGTERM stops every child; if one dies, the
//! others are stopped too.
//!
//! Usage: demo [--mode local|global] [--workers N] [--replicas N]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use e2e::backend::{random_secret, redis_command, webdis_command};
use e2e::envoy::EnvoyConfig;
use e2e::paths;
use e2e::topology::{front_config, replica_config, Mode, ReplicaPorts};

const UPSTREAM_PORT: u16 = 8000;
const LISTEN_PORT: u16 = 9018;
const ADMIN_PORT: u16 = 9901;
const FRONT_ADMIN_PORT: u16 = 9900;
const REPLICA_BASE_PORT: u16 = 10000;
const REPLICA_ADMIN_BASE_PORT: u16 = 9910;
const REDIS_PORT: u16 = 6379;
const WEBDIS_PORT: u16 = 7379;

struct Options {
    mode: Mode,
    workers: u32,
    replicas: u16,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        mode: Mode::Local,
        workers: 1,
        replicas: 1,
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
            "-h" | "--help" => {
                println!("usage: demo [--mode local|global] [--workers N] [--replicas N]");
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
    let mut children = Vec::new();
    let outcome = run(&options, &signals, &mut children);
    stop_all(&mut children);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    options: &Options,
    signals: &libc::sigset_t,
    children: &mut Vec<(String, Child)>,
) -> Result<(), String> {
    let envoy_bin = paths::envoy_bin().map_err(|e| e.0)?;
    let upstream_bin = paths::upstream_bin().map_err(|e| e.0)?;
    paths::wasm_path().map_err(|e| e.0)?;
    let dir = paths::repo_root().join("target").join("demo");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    if options.mode == Mode::Global {
        start_backend(&dir, children)?;
    }
    children.push((
        "upstream".into(),
        spawn(Command::new(&upstream_bin).args(["--bind", &format!("127.0.0.1:{UPSTREAM_PORT}")]))?,
    ));
    wait_port("upstream", UPSTREAM_PORT, children)?;

    let webdis = (options.mode == Mode::Global).then_some(WEBDIS_PORT);
    let single = options.replicas == 1;
    let mut replica_ports = Vec::new();
    for i in 1..=options.replicas {
        let (listen, admin) = if single {
            (LISTEN_PORT, ADMIN_PORT)
        } else {
            (REPLICA_BASE_PORT + i, REPLICA_ADMIN_BASE_PORT + i)
        };
        let config = replica_config(
            options.mode,
            ReplicaPorts {
                listen,
                admin,
                upstream: UPSTREAM_PORT,
                webdis,
            },
        )
        .map_err(|e| e.0)?;
        let name = if single {
            "envoy".to_string()
        } else {
            format!("replica-{i}")
        };
        start_envoy(&envoy_bin, &dir, &name, &config, options.workers, children)?;
        replica_ports.push((listen, admin));
    }
    if !single {
        let listens: Vec<u16> = replica_ports.iter().map(|(l, _)| *l).collect();
        let config = front_config(LISTEN_PORT, FRONT_ADMIN_PORT, &listens).map_err(|e| e.0)?;
        start_envoy(&envoy_bin, &dir, "front", &config, 1, children)?;
        replica_ports.push((LISTEN_PORT, FRONT_ADMIN_PORT));
    }
    for (_, admin) in &replica_ports {
        wait_ready(*admin, children)?;
    }

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
    supervise(signals, children)
}

/// Redis and webdis through the shipped start scripts, as the tests, docker
/// compose and Kubernetes start them.
fn start_backend(dir: &Path, children: &mut Vec<(String, Child)>) -> Result<(), String> {
    let password = random_secret();
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir).map_err(|e| format!("{}: {e}", redis_dir.display()))?;
    let mut redis =
        redis_command(REDIS_PORT, &password, &random_secret(), &redis_dir).map_err(|e| e.0)?;
    redis.args(["--loglevel", "warning"]);
    children.push(("redis".into(), spawn(&mut redis)?));
    wait_port("redis", REDIS_PORT, children)?;

    let mut webdis = webdis_command(WEBDIS_PORT, REDIS_PORT, &password, dir).map_err(|e| e.0)?;
    children.push(("webdis".into(), spawn(&mut webdis)?));
    wait_port("webdis", WEBDIS_PORT, children)
}

fn start_envoy(
    bin: &Path,
    dir: &Path,
    name: &str,
    config: &EnvoyConfig,
    workers: u32,
    children: &mut Vec<(String, Child)>,
) -> Result<(), String> {
    let path: PathBuf = dir.join(format!("{name}.json"));
    write(&path, &config.to_json_string())?;
    let child = spawn(
        Command::new(bin)
            .arg("-c")
            .arg(&path)
            .args(["--concurrency", &workers.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warn"]),
    )?;
    children.push((name.to_string(), child));
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Waits until something listens on the port (or a child dies).
fn wait_port(name: &str, port: u16, children: &mut [(String, Child)]) -> Result<(), String> {
    wait(&format!("{name} on port {port}"), children, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// Waits until an Envoy's admin says `/ready`.
fn wait_ready(admin: u16, children: &mut [(String, Child)]) -> Result<(), String> {
    wait(
        &format!("Envoy with admin port {admin}"),
        children,
        || matches!(e2e::http::get(&format!("127.0.0.1:{admin}"), "/ready"), Ok(r) if r.status == 200),
    )
}

fn wait(
    what: &str,
    children: &mut [(String, Child)],
    ready: impl Fn() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        check_children(children)?;
        if Instant::now() > deadline {
            return Err(format!("{what} not ready after 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn check_children(children: &mut [(String, Child)]) -> Result<(), String> {
    for (name, child) in children.iter_mut() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{name} exited ({status}); stopping the others (is its port taken?)"
            ));
        }
    }
    Ok(())
}

/// Waits for a stop signal or for a child to exit on its own.
fn supervise(signals: &libc::sigset_t, children: &mut [(String, Child)]) -> Result<(), String> {
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
        check_children(children)?;
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this process so that `sigtimedwait` can
/// take them; children get an empty mask back before `exec`.
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

fn spawn(command: &mut Command) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Die with the demo, even if it is killed with SIGKILL.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let program = Path::new(command.get_program()).display().to_string();
    command
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))
}

fn stop_all(children: &mut [(String, Child)]) {
    // Front first, backend last: the reverse of the start order.
    for (_, child) in children.iter_mut().rev() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (name, child) in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("demo: {name} did not stop in 5 s; killing it");
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}
