//! The `upstream` binary (the tutorial's "ok" endpoint) on a port the kernel picks.
//!
//! It is started with `--bind 127.0.0.1:0` and prints
//! `upstream listening on http://127.0.0.1:PORT` first; we read that line from its log,
//! so there is no window in which another process can take the port. `make run` puts
//! it on a fixed port instead ([`Upstream::try_start_on`]).

use crate::paths;
use crate::process::Proc;
use crate::Error;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What the upstream prints once it listens, before the URL.
pub const LISTENING_PREFIX: &str = "upstream listening on http://";

/// How long we wait for that line.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running upstream. Killed when dropped.
pub struct Upstream {
    proc: Proc,
    addr: String,
    port: u16,
}

impl Upstream {
    /// Starts [`paths::upstream_bin`]. Panics with the reason (a missing binary says
    /// "run `make build`"): tests never skip.
    pub fn start() -> Upstream {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start() -> Result<Upstream, Error> {
        Self::start_bin(&paths::upstream_bin()?, &[])
    }

    /// Starts `bin --bind 127.0.0.1:0 <extra>` and waits for its listening line.
    pub fn start_bin(bin: &Path, extra: &[&str]) -> Result<Upstream, Error> {
        let mut cmd = Command::new(bin);
        cmd.args(["--bind", "127.0.0.1:0"]).args(extra);
        let proc = Proc::spawn("upstream", cmd)
            .map_err(|e| Error(format!("cannot run {}: {e}", bin.display())))?;
        let mut addr = String::new();
        proc.wait_ready(START_TIMEOUT, || {
            addr = parse_listening_line(&proc.log())
                .ok_or_else(|| format!("no `{LISTENING_PREFIX}…` line yet"))?;
            Ok(())
        })?;
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| proc.error(&format!("no port in `{LISTENING_PREFIX}{addr}`")))?;
        Ok(Upstream { proc, addr, port })
    }

    /// Starts [`paths::upstream_bin`] on the fixed `127.0.0.1:port`, ready once the port
    /// accepts connections (its output may go to a terminal, not a log we can read).
    pub fn try_start_on(port: u16) -> Result<Upstream, Error> {
        let bin = paths::upstream_bin()?;
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(&bin);
        cmd.args(["--bind", &addr]);
        let proc = Proc::spawn("upstream", cmd)
            .map_err(|e| Error(format!("cannot run {}: {e}", bin.display())))?;
        proc.wait_ready(START_TIMEOUT, || {
            TcpStream::connect(&addr)
                .map(drop)
                .map_err(|e| format!("{addr}: {e}"))
        })?;
        Ok(Upstream { proc, addr, port })
    }

    /// "127.0.0.1:port".
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}

/// The `host:port` of the first complete `upstream listening on http://host:port` line.
pub fn parse_listening_line(log: &str) -> Option<String> {
    // Only whole lines: the last one may still be being written.
    let complete = &log[..log.rfind('\n')? + 1];
    complete.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(LISTENING_PREFIX)?;
        let hostport = rest.trim_end_matches('/');
        (!hostport.is_empty()).then(|| hostport.to_owned())
    })
}
