//! The shipped `envoy/webdis.json`, run for real against Redis started by
//! the shipped `envoy/redis-start.sh` and `envoy/redis-acl.conf`: webdis
//! answers only on 127.0.0.1 with WebSockets off, passes on nothing but
//! `FCALL` (not even `FCALL_RO`, which Redis would refuse too), and the
//! Redis user it connects as may run only the filter's function and
//! the commands that function runs, on the filter's keys. No script of
//! anyone's own can run: no `EVAL`, `EVALSHA`, `SCRIPT` or `FUNCTION`.

use e2e::backend::RedisWebdis;
use e2e::http::{self, Conn};

/// The port's listening sockets from /proc/net/tcp{,6}: local addresses.
fn listening_addresses(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((ip, p)) = local.rsplit_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16) == Ok(port) {
                found.push(ip.to_string());
            }
        }
    }
    found
}

#[test]
fn webdis_refuses_every_command_but_fcall_and_no_script_can_run() {
    let backend = RedisWebdis::start();
    let addr = backend.webdis.addr();
    let redis = &backend.redis;
    assert_eq!(
        redis
            .cli(&["SET", "apikey_ratelimit:canary", "alive"])
            .trim(),
        "OK"
    );

    // Only on loopback: 127.0.0.1 is 0100007F in /proc/net/tcp.
    assert_eq!(listening_addresses(backend.webdis.port()), vec!["0100007F"]);

    // Every command this Redis knows, and the script ones with arguments.
    let mut refused: Vec<String> = redis
        .cli(&["COMMAND", "LIST"])
        .lines()
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "fcall")
        .map(|c| format!("/{}", c.to_uppercase()))
        .collect();
    assert!(refused.len() > 200, "COMMAND LIST: {refused:?}");
    for script in [
        "/EVAL/return%201/0",
        "/EVAL/while%20true%20do%20end/0",
        "/eval/return%201/0",
        "/EVAL_RO/return%201/0",
        "/EVALSHA/e0e1f9fabfc9d4800c877a703b823ac0578ff8db/0",
        "/SCRIPT/LOAD/return%201",
        "/SCRIPT/FLUSH",
        "/FUNCTION/LIST",
        "/FUNCTION/FLUSH",
        "/FUNCTION/DELETE/apikey_ratelimit",
        "/FUNCTION/LOAD/%23%21lua%20name%3Dx%0Aredis.register_function%28%27x%27%2Cfunction%28%29%20return%201%20end%29",
        "/SET/apikey_ratelimit:canary/dead",
        "/flushall",
        "/CONFIG/SET/dir/tmp",
    ] {
        refused.push(script.to_string());
    }
    for path in &refused {
        let r = http::get(&addr, path).unwrap();
        assert_eq!(r.status, 403, "{path} was not refused by webdis: {r:?}");
    }

    // What webdis lets through, Redis refuses: FCALL of anything but the
    // filter's function (none other is loaded), on a key outside the
    // filter's pattern.
    for (path, refusal) in [
        ("/FCALL/no_such_function/0", "ERR"),
        ("/FCALL/apikey_ratelimit_gcra/1/other%3Akey/0", "NOPERM"),
    ] {
        let r = http::get(&addr, path).unwrap();
        assert!(
            r.body_str().contains(&format!("[false,\"{refusal}")),
            "{path} was not refused by Redis: {r:?}"
        );
    }

    // The Redis user itself may run nothing else, on no other key.
    let user = redis.cli(&["ACL", "GETUSER", "default"]);
    let mut commands: Vec<&str> = user
        .lines()
        .skip_while(|l| *l != "commands")
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    commands.sort_unstable();
    assert_eq!(
        commands,
        ["+fcall", "+hmget", "+hset", "+pexpireat", "+time", "-@all"],
        "{user}"
    );
    assert!(user.contains("~apikey_ratelimit:*"), "{user}");
    for command in [
        &[
            "FCALL_RO",
            "apikey_ratelimit_gcra",
            "1",
            "apikey_ratelimit:x",
            "0",
        ][..],
        &["EVAL", "return 1", "0"],
        &[
            "FUNCTION",
            "LOAD",
            "#!lua name=x\nredis.register_function('x', function() end)",
        ],
        &["SCRIPT", "LOAD", "return 1"],
        &["PING"],
    ] {
        let answer = redis.cli_as_webdis(command);
        assert!(answer.starts_with("NOPERM"), "{command:?}: {answer}");
    }

    assert_eq!(
        redis.cli(&["GET", "apikey_ratelimit:canary"]).trim(),
        "alive"
    );

    // WebSockets are off: an upgrade request is not switched.
    let r = Conn::connect(&addr).unwrap().request(
        "GET",
        b"/.json",
        &[
            ("Connection", b"Upgrade"),
            ("Upgrade", b"websocket"),
            ("Sec-WebSocket-Key1", b"4 @1  46546xW%0l 1 5"),
            ("Sec-WebSocket-Key2", b"12998 5 Y3 1  .P00"),
            ("Origin", b"http://127.0.0.1"),
        ],
    );
    if let Ok(r) = r {
        assert_ne!(r.status, 101, "{r:?}");
    }
}
