//! The global store's backend: a real Redis and a real webdis, on free
//! loopback ports, started by the shipped `envoy/redis-start.sh` and
//! `envoy/webdis-start.sh` from the shipped `envoy/redis-acl.conf` and
//! `envoy/webdis.json`: the very scripts and files docker compose and the
//! Kubernetes manifests use, with only ports and the password differing.
//!
//! Redis's `admin` user (its password a fresh secret, never the webdis
//! user's) loads the function at start and serves the tests' own
//! inspection with `redis-cli`; the filter's traffic uses the shipped user.
//!
//! [`RedisWebdis`] is the pair, wired together, as global mode needs it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::paths;
use crate::ports::free_port;
use crate::process::{new_dir, Proc};
use crate::Error;

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The Redis user that loads the library (`envoy/redis-acl.conf`): may read any key.
pub const ADMIN_USER: &str = "admin";

/// A fresh random secret (hex), for passwords.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos ^ u128::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running Redis. Killed on drop.
pub struct Redis {
    proc: Proc,
    port: u16,
    password: String,
    admin_password: String,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::try_start_on(free_port(), &random_secret()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts Redis on `port` with the webdis user's `password` (a restart
    /// after a kill reuses both).
    pub fn try_start_on(port: u16, password: &str) -> Result<Redis, Error> {
        Redis::try_start_with(port, password, &[])
    }

    /// [`Redis::try_start_on`] with extra redis-server arguments.
    pub fn try_start_with(port: u16, password: &str, extra: &[&str]) -> Result<Redis, Error> {
        let admin_password = random_secret();
        let dir = new_dir("redis").map_err(|e| Error(e.to_string()))?;
        let mut cmd = redis_command(port, password, &admin_password, dir.path())?;
        cmd.args(extra);
        let proc = Proc::spawn_in("redis", cmd, dir)
            .map_err(|e| Error(format!("cannot run redis-start.sh: {e}")))?;
        let redis = Redis {
            proc,
            port,
            password: password.to_string(),
            admin_password,
        };
        redis.proc.wait_ready(START_TIMEOUT, || resp_ping(port))?;
        Ok(redis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of the user webdis connects as.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The password of the admin user.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Runs `redis-cli` as the admin user; returns its stdout (`--raw`).
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_as(ADMIN_USER, &self.admin_password, args)
    }

    /// Runs `redis-cli` as the user webdis connects as.
    pub fn cli_as_webdis(&self, args: &[&str]) -> String {
        self.cli_as("default", &self.password, args)
    }

    fn cli_as(&self, user: &str, password: &str, args: &[&str]) -> String {
        let bin = paths::redis_cli_bin().unwrap_or_else(|e| panic!("{e}"));
        let out = Command::new(bin)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--user", user, "--raw"])
            .env("REDISCLI_AUTH", password)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cli(&["--scan"])
            .lines()
            .map(str::to_string)
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys
    }
}

/// A running webdis. Killed on drop.
pub struct Webdis {
    proc: Proc,
    port: u16,
}

impl Webdis {
    /// webdis with the shipped `envoy/webdis.json`, for `redis`.
    pub fn start(redis: &Redis) -> Webdis {
        Webdis::try_start_on(free_port(), redis.port(), redis.password())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start_on(port: u16, redis_port: u16, password: &str) -> Result<Webdis, Error> {
        let dir = new_dir("webdis").map_err(|e| Error(e.to_string()))?;
        let cmd = webdis_command(port, redis_port, password, dir.path())?;
        let proc = Proc::spawn_in("webdis", cmd, dir)
            .map_err(|e| Error(format!("cannot run webdis-start.sh: {e}")))?;
        let webdis = Webdis { proc, port };
        webdis
            .proc
            .wait_ready(START_TIMEOUT, || http_answers(port))?;
        Ok(webdis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Requests webdis has not read yet on connections whose client has
    /// gone (`CLOSE_WAIT` with bytes queued, accepted or still in its accept
    /// queue). webdis 0.1.9 runs such a request once it gets to it, and
    /// writes its reply to whichever new connection reuses that file
    /// descriptor (`global_faults.rs`,
    /// `replies_of_calls_envoy_gave_up_on_never_decide_other_requests`).
    pub fn unread_abandoned_requests(&self) -> usize {
        const CLOSE_WAIT: &str = "08";
        let local = format!("0100007F:{:04X}", self.port);
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter(|line| {
                // sl, local address, remote address, state, tx_queue:rx_queue
                let fields: Vec<&str> = line.split_whitespace().collect();
                let unread = fields
                    .get(4)
                    .and_then(|queues| queues.split_once(':'))
                    .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                    .is_some_and(|bytes| bytes > 0);
                fields.get(1) == Some(&local.as_str())
                    && fields.get(3) == Some(&CLOSE_WAIT)
                    && unread
            })
            .count()
    }
}

/// Redis and a webdis in front of it: the global store the filter calls.
pub struct RedisWebdis {
    pub redis: Redis,
    pub webdis: Webdis,
}

impl RedisWebdis {
    /// Both on free ports. Panics with their logs if either does not start.
    pub fn start() -> RedisWebdis {
        RedisWebdis::try_start_on(free_port(), free_port(), &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Redis on `redis_port` (with extra redis-server arguments) and webdis on
    /// `webdis_port`, sharing a fresh password.
    pub fn try_start_on(
        redis_port: u16,
        webdis_port: u16,
        redis_args: &[&str],
    ) -> Result<RedisWebdis, Error> {
        let redis = Redis::try_start_with(redis_port, &random_secret(), redis_args)?;
        let webdis = Webdis::try_start_on(webdis_port, redis.port(), redis.password())?;
        Ok(RedisWebdis { redis, webdis })
    }

    /// CPU time webdis and Redis have used so far, together (both start
    /// scripts `exec` the server, so each [`Proc`] is the server itself).
    /// `None` if either has exited.
    pub fn cpu_time(&self) -> Option<Duration> {
        Some(self.redis.proc().cpu_time()? + self.webdis.proc().cpu_time()?)
    }
}

/// `envoy/redis-start.sh` on `port` with the shipped ACL and function
/// library, its files in `dir`; extra arguments go to redis-server.
pub fn redis_command(
    port: u16,
    password: &str,
    admin_password: &str,
    dir: &Path,
) -> Result<Command, Error> {
    let mut cmd = start_script("redis-start.sh", &paths::redis_server_bin()?);
    cmd.env("REDIS_PASSWORD", password)
        .env("REDIS_ADMIN_PASSWORD", admin_password)
        .env(
            "REDIS_ACL",
            paths::repo_root().join("envoy").join("redis-acl.conf"),
        )
        .env("REDIS_FUNCTIONS", redis_functions())
        .env("REDIS_PORT", port.to_string())
        .env("TMPDIR", dir)
        .args(["--daemonize", "no", "--dir"])
        .arg(dir);
    Ok(cmd)
}

/// The filter's Redis function library, loaded by `redis-start.sh`.
pub fn redis_functions() -> std::path::PathBuf {
    paths::repo_root().join("filter/core/src/gcra.lua")
}

/// `envoy/webdis-start.sh` on `port` with the shipped `webdis.json`, for
/// the Redis on `redis_port`, its files in `dir`.
pub fn webdis_command(
    port: u16,
    redis_port: u16,
    password: &str,
    dir: &Path,
) -> Result<Command, Error> {
    let mut cmd = start_script("webdis-start.sh", &paths::webdis_bin()?);
    cmd.env("REDIS_PASSWORD", password)
        .env("REDIS_PORT", redis_port.to_string())
        .env("WEBDIS_PORT", port.to_string())
        .env(
            "WEBDIS_CONFIG",
            paths::repo_root().join("envoy").join("webdis.json"),
        )
        .env("TMPDIR", dir);
    Ok(cmd)
}

/// `sh envoy/<script>`, with the directory of `server` (the binary the
/// script execs) first on the PATH.
pub fn start_script(script: &str, server: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg(paths::repo_root().join("envoy").join(script));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> =
        server.parent().map(Path::to_path_buf).into_iter().collect();
    dirs.extend(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(dirs) {
        cmd.env("PATH", joined);
    }
    cmd
}

/// Redis answers something (even NOAUTH) to an inline PING.
fn resp_ping(port: u16) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    stream.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err("closed without answering PING".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// webdis answers an HTTP request (its ACL refuses PING with a 403: fine).
fn http_answers(port: u16) -> Result<(), String> {
    crate::http::get(&format!("127.0.0.1:{port}"), "/PING")
        .map(drop)
        .map_err(|e| e.to_string())
}
