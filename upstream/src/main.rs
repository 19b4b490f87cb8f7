//! `upstream`: serves the tutorial's `"ok"` endpoint until SIGINT/SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

const DEFAULT_BIND: &str = "127.0.0.1:8000";

const USAGE: &str = "\
usage: upstream [--bind ADDR]

Answers every request with 200 \"ok\" (application/json); /healthz answers
{\"status\":\"healthy\"}. Stops gracefully on SIGINT or SIGTERM.

options:
  --bind ADDR   IP:PORT to listen on (port 0 picks a free port)
  -h, --help    print this help

environment:
  UPSTREAM_BIND     listen address when --bind is not given (default 127.0.0.1:8000)
  UPSTREAM_THREADS  tokio worker threads (default: one per CPU)

Prints `upstream listening on http://ADDR` once bound.";

/// Usage errors exit with 2, like most command-line tools.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let bind = match parse_args(std::env::args().skip(1)) {
        Ok(Some(bind)) => bind,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => return usage_error(&msg),
    };
    let threads = match worker_threads() {
        Ok(threads) => threads,
        Err(msg) => return usage_error(&msg),
    };

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("upstream: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };

    let code = runtime.block_on(serve(bind));
    // Connections that outlived the grace period must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn serve(bind: SocketAddr) -> ExitCode {
    // Install the handlers before announcing the port: a script that reads
    // the line and signals at once must get a graceful stop, not a kill.
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(sigint), Ok(sigterm)) => (sigint, sigterm),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("upstream: cannot install signal handlers: {err}");
            return ExitCode::FAILURE;
        }
    };

    let listener = match TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("upstream: cannot bind {bind}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local = match listener.local_addr() {
        Ok(local) => local,
        Err(err) => {
            eprintln!("upstream: cannot read the bound address: {err}");
            return ExitCode::FAILURE;
        }
    };

    let mut stdout = std::io::stdout().lock();
    if let Err(err) =
        writeln!(stdout, "upstream listening on http://{local}").and_then(|()| stdout.flush())
    {
        // Nobody reading stdout is no reason to refuse traffic.
        eprintln!("upstream: cannot write to stdout: {err}");
    }
    drop(stdout);

    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    match upstream::run(listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("upstream: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` means `--help`.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<SocketAddr>, String> {
    let mut args = args;
    let mut bind: Option<String> = None;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--bind" => args
                .next()
                .ok_or_else(|| "--bind needs an address, e.g. --bind 127.0.0.1:8000".to_owned())?,
            other => match other.strip_prefix("--bind=") {
                Some(value) => value.to_owned(),
                None => return Err(format!("unexpected argument '{other}'")),
            },
        };
        bind = Some(value);
    }

    let (source, text) = match bind {
        Some(text) => ("--bind", text),
        None => match std::env::var("UPSTREAM_BIND") {
            Ok(text) => ("UPSTREAM_BIND", text),
            Err(std::env::VarError::NotPresent) => ("default", DEFAULT_BIND.to_owned()),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err("UPSTREAM_BIND is not valid UTF-8".to_owned())
            }
        },
    };
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("{source}: invalid address '{text}', expected IP:PORT such as {DEFAULT_BIND}")
    })
}

fn worker_threads() -> Result<Option<usize>, String> {
    match std::env::var("UPSTREAM_THREADS") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err("UPSTREAM_THREADS is not valid UTF-8".to_owned())
        }
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!(
                "UPSTREAM_THREADS: invalid thread count '{text}', expected a positive integer"
            )),
        },
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("upstream: {msg}\nTry 'upstream --help'.");
    ExitCode::from(EXIT_USAGE)
}
