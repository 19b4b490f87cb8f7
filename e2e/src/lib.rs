//! End-to-end harness: starts REAL processes (Envoy, the upstream, Redis and webdis)
//! on free loopback ports, talks to them over raw HTTP/1.1, and kills them when their
//! guard drops, also when a test panics. `make run` (the `demo` binary) and the bench
//! are built on it too.
//!
//! Blocking std code only (threads, `std::net`): simple and predictable timing, which
//! the rate-limit tests depend on.
//!
//! ```no_run
//! use e2e::{envoy::Envoy, envoy_config::EnvoyConfig, http, paths, upstream::Upstream};
//!
//! let up = Upstream::start();
//! let mut cfg = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
//! cfg.set_cluster_endpoint("upstream", "127.0.0.1", up.port()).unwrap();
//! let envoy = Envoy::start(&cfg, 2).unwrap();
//! let r = http::get(&envoy.addr(), "/?api_key=1234").unwrap();
//! assert_eq!(r.status, 200, "{}", r.body_str());
//! ```
//!
//! # Layout
//! - [`paths`]: the repository (found from the current directory), the Envoy binary,
//!   the upstream binary, the `.wasm` and the shipped configs; a missing one is an
//!   [`Error`] that says which `make` target builds it. Tests panic with it: an
//!   end-to-end test never skips.
//! - [`ports`]: free loopback ports, never the same one twice in a process.
//! - [`process`]: [`process::Proc`], a child whose stdout+stderr go to a log file, killed
//!   on drop (and by `PR_SET_PDEATHSIG` if the test binary itself dies); on panic the
//!   tail of its log goes to stderr.
//! - [`http`]: a raw HTTP/1.1 client, able to send bytes no normal client would (the
//!   upstream's tests use it too).
//! - [`envoy_config`]: [`envoy_config::EnvoyConfig`], a shipped YAML edited as a tree.
//! - [`envoy`]: [`envoy::Envoy`], a running Envoy and its admin endpoint.
//! - [`lds`], [`ecds`]: a listener, or the plugin's filter config, served from a file, to
//!   push a running Envoy new plugin configs as a control plane does.
//! - [`metrics`]: the filter's counters and Envoy's stats, read from the admin endpoint.
//! - [`upstream`]: the `upstream` binary on a kernel-chosen port.
//! - [`docker`]: a Docker engine (started if none answers), the stand-in images and
//!   docker compose stacks, for the compose test.
//! - [`backend`]: Redis, webdis, and [`backend::RedisWebdis`], the pair global mode uses.
//! - [`topology`]: what tests start in one line: [`topology::OneEnvoy`] (upstream + one
//!   Envoy, local mode), [`topology::GlobalEnvoy`] (the same in global mode, with its
//!   Redis and webdis), [`topology::Replicas`] (N Envoys behind a front Envoy), and the
//!   shipped configs on given ports, which `make run` uses with fixed ones.
//! - [`load`]: paced, concurrent and sustained (background, every request timed)
//!   request drivers, and [`load::StatusTable`].
//! - [`tutorial`]: the tutorial's paced load test.

pub mod backend;
pub mod docker;
pub mod ecds;
pub mod envoy;
pub mod envoy_config;
pub mod http;
pub mod lds;
pub mod load;
pub mod metrics;
pub mod paths;
pub mod ports;
pub mod process;
pub mod topology;
pub mod tutorial;
pub mod upstream;

use std::fmt;
use std::time::{Duration, Instant};

/// The harness's error: a message for a human.
///
/// `Debug` prints the message verbatim (not as an escaped string), so that
/// `.unwrap()` on a failed `Envoy::start` shows Envoy's log tail line by line.
#[derive(Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error(s.to_owned())
    }
}

/// Calls `f` every `every` until it returns `Some`, or `timeout` has passed (then `None`).
/// `f` is always called at least once, and once more at the deadline.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(every.min(deadline - now));
    }
}
