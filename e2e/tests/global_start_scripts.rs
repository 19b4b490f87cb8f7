//! The shipped start scripts refuse to run an unsafe Redis: they refuse weak
//! passwords before starting anything (the placeholders shipped in
//! `k8s/global/redis-password.env`, anything shorter than 16 characters, an
//! admin password equal to the webdis user's), and Redis never opens its
//! TCP port without the filter's function loaded.

use std::time::Duration;

use e2e::backend::{random_secret, redis_command, webdis_command};
use e2e::paths;
use e2e::ports::free_port;
use e2e::process::{new_dir, Proc};

/// The placeholders of the shipped Secret (`password=...` lines).
fn placeholders() -> Vec<String> {
    let env = paths::repo_root().join("k8s/global/redis-password.env");
    let text = std::fs::read_to_string(env).unwrap();
    let found: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(name, _)| !name.starts_with('#'))
        .map(|(_, value)| value.to_string())
        .collect();
    assert!(!found.is_empty(), "no placeholder in {text}");
    found
}

/// Runs the command; it must exit at once, unsuccessfully, saying `why`.
fn refused(what: &str, name: &str, cmd: std::process::Command, dir: tempfile::TempDir, why: &str) {
    let proc = Proc::spawn_in(name, cmd, dir).unwrap();
    let status = proc
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{what}: {name} started:\n{}", proc.log()));
    assert!(!status.success(), "{what}: {status:?}");
    let log = proc.log();
    assert!(log.contains(why), "{what}: {log}");
}

#[test]
fn start_scripts_refuse_short_and_placeholder_passwords() {
    let good = random_secret();
    let admin = random_secret();
    let mut weak: Vec<(String, String)> = placeholders()
        .into_iter()
        .map(|p| (format!("the placeholder {p}"), p))
        .collect();
    weak.push(("15 characters".into(), "abcdefghij12345".into()));

    for (what, password) in &weak {
        let dir = new_dir("redis").unwrap();
        let cmd = redis_command(free_port(), password, &admin, dir.path()).unwrap();
        refused(what, "redis", cmd, dir, "REDIS_PASSWORD");
        let dir = new_dir("redis").unwrap();
        let cmd = redis_command(free_port(), &good, password, dir.path()).unwrap();
        refused(what, "redis", cmd, dir, "REDIS_ADMIN_PASSWORD");
        let dir = new_dir("webdis").unwrap();
        let cmd = webdis_command(free_port(), free_port(), password, dir.path()).unwrap();
        refused(what, "webdis", cmd, dir, "REDIS_PASSWORD");
    }
    let dir = new_dir("redis").unwrap();
    let cmd = redis_command(free_port(), &good, &good, dir.path()).unwrap();
    refused(
        "the same password twice",
        "redis",
        cmd,
        dir,
        "REDIS_ADMIN_PASSWORD",
    );
}

#[test]
fn redis_never_opens_its_port_without_the_function() {
    let dir = new_dir("redis").unwrap();
    let broken = dir.path().join("broken.lua");
    std::fs::write(&broken, "#!lua name=apikey_ratelimit\nthis is not lua\n").unwrap();
    let port = free_port();
    let mut cmd = redis_command(port, &random_secret(), &random_secret(), dir.path()).unwrap();
    cmd.env("REDIS_FUNCTIONS", &broken);
    let proc = Proc::spawn_in("redis", cmd, dir).unwrap();
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("Redis kept running:\n{}", proc.log()));
    assert!(!status.success(), "{status:?}");
    assert!(proc.log().contains("cannot load"), "{}", proc.log());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
