//! The `upstream` binary: port announcement, serving, signals, usage errors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{assert_ok, Conn};

const BIN: &str = env!("CARGO_BIN_EXE_upstream");

fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("UPSTREAM_BIND")
        .env_remove("UPSTREAM_THREADS");
    cmd
}

/// Kills the child if the test fails before it exits on its own.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Guard {
    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.0.id()).unwrap();
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
    }

    fn wait_for_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts the binary and reads the address from its one stdout line.
fn spawn(mut cmd: Command) -> (Guard, SocketAddr) {
    let mut guard = Guard(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn upstream"),
    );
    let stdout = guard.0.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read stdout");
    let addr = line
        .trim_end()
        .strip_prefix("upstream listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    (guard, addr)
}

fn serves_then_exits_cleanly_on(sig: libc::c_int) {
    let mut cmd = command();
    cmd.args(["--bind", "127.0.0.1:0"]);
    let (mut child, addr) = spawn(cmd);
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0, "the real port is announced, not 0");

    let mut conn = Conn::open(addr);
    assert_ok(&conn.request("GET", "/?api_key=1234", b""));

    // An idle keep-alive connection must not hold up the exit.
    child.signal(sig);
    let status = child.wait_for_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn sigterm_stops_gracefully_with_exit_0() {
    serves_then_exits_cleanly_on(libc::SIGTERM);
}

#[test]
fn sigint_stops_gracefully_with_exit_0() {
    serves_then_exits_cleanly_on(libc::SIGINT);
}

#[test]
fn bind_from_equals_flag_and_from_env() {
    let mut cmd = command();
    cmd.arg("--bind=127.0.0.1:0");
    let (mut child, addr) = spawn(cmd);
    let resp = Conn::open(addr).request("GET", "/healthz", b"");
    assert_eq!(resp.body_str(), r#"{"status":"healthy"}"#);
    child.signal(libc::SIGTERM);
    assert!(child.wait_for_exit(Duration::from_secs(5)).success());

    let mut cmd = command();
    cmd.env("UPSTREAM_BIND", "127.0.0.1:0")
        .env("UPSTREAM_THREADS", "1");
    let (mut child, addr) = spawn(cmd);
    assert_ok(&Conn::open(addr).request("GET", "/", b""));
    child.signal(libc::SIGTERM);
    assert!(child.wait_for_exit(Duration::from_secs(5)).success());
}

fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = command();
    cmd.args(args).envs(env.iter().copied());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Guarded so a binary that wrongly starts serving does not outlive us.
    let mut guard = Guard(child);
    let status = guard.wait_for_exit(Duration::from_secs(5));
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    std::io::Read::read_to_end(guard.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    std::io::Read::read_to_end(guard.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

fn assert_usage_error(out: &std::process::Output, mentions: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(mentions),
        "stderr {stderr:?} lacks {mentions:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn bad_bind_address_exits_2_with_message() {
    assert_usage_error(&run_to_end(&["--bind", "nonsense"], &[]), "nonsense");
    assert_usage_error(&run_to_end(&["--bind=127.0.0.1"], &[]), "127.0.0.1");
    assert_usage_error(&run_to_end(&["--bind"], &[]), "--bind");
    assert_usage_error(&run_to_end(&[], &[("UPSTREAM_BIND", "nope")]), "nope");
}

#[test]
fn bad_flags_and_thread_counts_exit_2() {
    assert_usage_error(&run_to_end(&["--frobnicate"], &[]), "--frobnicate");
    assert_usage_error(
        &run_to_end(&["--bind", "127.0.0.1:0"], &[("UPSTREAM_THREADS", "zero")]),
        "UPSTREAM_THREADS",
    );
}

#[test]
fn help_prints_usage_and_exits_0() {
    let out = run_to_end(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("usage: upstream [--bind ADDR]"), "{stdout}");
}

fn assert_unhealthy(out: &std::process::Output, mentions: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upstream unhealthy") && stderr.contains(mentions),
        "stderr {stderr:?} lacks {mentions:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn healthcheck_exits_0_against_a_running_server_and_1_once_it_is_gone() {
    let mut cmd = command();
    cmd.args(["--bind", "127.0.0.1:0"]);
    let (mut child, addr) = spawn(cmd);

    let out = run_to_end(&["--healthcheck", "--bind", &addr.to_string()], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("upstream healthy: 200"), "{stdout}");

    // As in the container: the port from UPSTREAM_BIND, and an unspecified
    // address checked on loopback.
    let everywhere = format!("0.0.0.0:{}", addr.port());
    let out = run_to_end(&["--healthcheck"], &[("UPSTREAM_BIND", &everywhere)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    child.signal(libc::SIGTERM);
    assert!(child.wait_for_exit(Duration::from_secs(5)).success());
    let out = run_to_end(&["--healthcheck", "--bind", &addr.to_string()], &[]);
    assert_unhealthy(&out, &addr.to_string());
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn healthcheck_exits_1_on_a_non_200_and_on_silence_within_its_time_limit() {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    // A server that answers 503.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 512];
        let _ = conn.read(&mut buf);
        conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
    });
    let out = run_to_end(&["--healthcheck", "--bind", &addr.to_string()], &[]);
    assert_unhealthy(&out, "answered 503");
    server.join().unwrap();

    // A server that accepts and never answers: unhealthy after about 2 s.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let started = Instant::now();
    let out = run_to_end(&["--healthcheck", "--bind", &addr.to_string()], &[]);
    let took = started.elapsed();
    assert_unhealthy(&out, "no answer within 2s");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    drop(listener);

    // Port 0 names no server.
    let out = run_to_end(&["--healthcheck", "--bind", "127.0.0.1:0"], &[]);
    assert_unhealthy(&out, "port 0");
}
