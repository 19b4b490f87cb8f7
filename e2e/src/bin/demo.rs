//! `make run`: the tutorial's topology on this machine, in the foreground.
//!
//! Starts the upstream on 127.0.0.1:8000 and Envoy on 127.0.0.1:9018 (admin
//! 9901), with the shipped `envoy/local.yaml` (only the `.wasm` path made
//! absolute). Their logs go to this terminal. Ctrl-C or SIGTERM stops every
//! child; if one child dies, the others are stopped too.
//!
//! Usage: demo [--workers N]

use std::path::Path;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use e2e::envoy::EnvoyConfig;
use e2e::paths;

struct Options {
    workers: u32,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options { workers: 1 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--workers" => {
                let value = args.next().ok_or("--workers needs a number")?;
                options.workers = value
                    .parse()
                    .ok()
                    .filter(|w| (1..=64).contains(w))
                    .ok_or_else(|| format!("--workers: expected 1 to 64, got {value:?}"))?;
            }
            "-h" | "--help" => {
                println!("usage: demo [--workers N]   (make run WORKERS=N)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<(), String> {
    let envoy_bin = paths::envoy_bin().map_err(|e| e.0)?;
    let upstream_bin = paths::upstream_bin().map_err(|e| e.0)?;
    let wasm = paths::wasm_path().map_err(|e| e.0)?;

    let mut config = EnvoyConfig::load(paths::shipped_config("local.yaml")).map_err(|e| e.0)?;
    config.set_wasm_filename(&wasm).map_err(|e| e.0)?;
    let dir = paths::repo_root().join("target").join("demo");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config_path = dir.join("local.json");
    config.write(&config_path).map_err(|e| e.0)?;

    let signals = block_stop_signals();
    let mut children = Vec::new();
    children.push((
        "upstream",
        spawn(Command::new(&upstream_bin).args(["--bind", "127.0.0.1:8000"]))?,
    ));
    children.push((
        "envoy",
        spawn(
            Command::new(&envoy_bin)
                .arg("-c")
                .arg(&config_path)
                .args(["--concurrency", &options.workers.to_string()])
                .args(["--disable-hot-restart", "--log-level", "warn"]),
        )?,
    ));
    eprintln!(
        "demo: upstream on 127.0.0.1:8000, Envoy ({} worker{}) on 127.0.0.1:9018, admin on 127.0.0.1:9901\n\
         demo: try  curl -i 'http://localhost:9018/?api_key=1234'   (Ctrl-C stops everything)",
        options.workers,
        if options.workers == 1 { "" } else { "s" }
    );
    let outcome = supervise(&signals, &mut children);
    stop_all(&mut children);
    outcome
}

/// Waits for a stop signal or for a child to exit on its own.
fn supervise(signals: &libc::sigset_t, children: &mut [(&str, Child)]) -> Result<(), String> {
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
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{name} exited ({status}); stopping the others"));
            }
        }
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

fn stop_all(children: &mut [(&str, Child)]) {
    for (_, child) in children.iter_mut() {
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
