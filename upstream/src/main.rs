//! `upstream`: serves the tutorial's `"ok"` endpoint until SIGINT/SIGTERM;
//! with `--healthcheck`, asks a running one for its health instead.

// Nothing a client sends may make the upstream panic (tests may).
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![deny(clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

const DEFAULT_BIND: &str = "127.0.0.1:8000";

const USAGE: &str = "\
usage: upstream [--bind ADDR] [--healthcheck]

Answers every request with 200 \"ok\" (application/json); /healthz answers
{\"status\":\"healthy\"}. Stops gracefully on SIGINT or SIGTERM.

options:
  --bind ADDR     IP:PORT to listen on (port 0 picks a free port)
  --healthcheck   do not serve: send GET /healthz to the server listening on
                  ADDR's port (on 127.0.0.1 when ADDR is 0.0.0.0, ::1 when it
                  is ::) and exit 0 on a 200 within 2 s, 1 otherwise (for a
                  container HEALTHCHECK; needs no shell or curl)
  -h, --help      print this help

environment:
  UPSTREAM_BIND     listen address when --bind is not given (default 127.0.0.1:8000)
  UPSTREAM_THREADS  tokio worker threads (default: one per CPU)

Prints `upstream listening on http://ADDR` once bound.";

/// Usage errors exit with 2, like most command-line tools.
const EXIT_USAGE: u8 = 2;

/// The whole `--healthcheck`, connect to last byte, must fit in this.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the command line asks for.
struct Args {
    bind: SocketAddr,
    healthcheck: bool,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => return usage_error(&msg),
    };
    let bind = args.bind;
    if args.healthcheck {
        return healthcheck(bind);
    }
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
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = args;
    let mut bind: Option<String> = None;
    let mut healthcheck = false;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--healthcheck" => {
                healthcheck = true;
                continue;
            }
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
    let bind = text.parse::<SocketAddr>().map_err(|_| {
        format!("{source}: invalid address '{text}', expected IP:PORT such as {DEFAULT_BIND}")
    })?;
    Ok(Some(Args { bind, healthcheck }))
}

/// `--healthcheck`: `GET /healthz` from the server that `bind` describes.
/// Exit 0 on a 200 within [`HEALTHCHECK_TIMEOUT`], else 1 with the reason on
/// stderr (Docker keeps a health check's output in `docker inspect`).
fn healthcheck(bind: SocketAddr) -> ExitCode {
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let target = SocketAddr::new(ip, bind.port());
    match probe(target, upstream::HEALTH_PATH, HEALTHCHECK_TIMEOUT) {
        Ok(status) if status == "200" => {
            println!(
                "upstream healthy: 200 from http://{target}{}",
                upstream::HEALTH_PATH
            );
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!(
                "upstream unhealthy: http://{target}{} answered {status}, not 200",
                upstream::HEALTH_PATH
            );
            ExitCode::FAILURE
        }
        Err(why) => {
            eprintln!(
                "upstream unhealthy: http://{target}{}: {why}",
                upstream::HEALTH_PATH
            );
            ExitCode::FAILURE
        }
    }
}

/// Sends `GET path` over HTTP/1.1 and returns the status code's text, all
/// within `limit`.
fn probe(target: SocketAddr, path: &str, limit: Duration) -> Result<String, String> {
    if target.port() == 0 {
        return Err("port 0 names no server: give the port it listens on".to_owned());
    }
    let deadline = Instant::now() + limit;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {limit:?}"))
    };
    let mut stream =
        TcpStream::connect_timeout(&target, left()?).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| format!("cannot set a timeout: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {target}\r\nuser-agent: upstream-healthcheck\r\n\
         connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;

    // Only the status line matters: read until its end, a close, or the deadline.
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 128];
    let line = loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            break head.get(..end).unwrap_or_default();
        }
        if head.len() > 1024 {
            return Err("the status line is longer than 1 KiB".to_owned());
        }
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| format!("cannot set a timeout: {e}"))?;
        match stream.read(&mut buf) {
            Ok(0) => return Err("the connection closed before a status line".to_owned()),
            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer within {limit:?}"));
            }
            Err(e) => return Err(format!("cannot read the answer: {e}")),
        }
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(version), Some(status))
            if version.starts_with("HTTP/1.")
                && status.len() == 3
                && status.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(status.to_owned())
        }
        _ => Err(format!("not an HTTP/1.x status line: {line:?}")),
    }
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
