//! The shipped `envoy/webdis.json`, run for real against Redis with the
//! shipped `envoy/redis-acl.conf`: webdis answers only on 127.0.0.1, refuses
//! every command but the filter's script, and has WebSockets off; and even a
//! script of someone's own (webdis's ACL matches by prefix, so allowing
//! EVALSHA allows EVAL) can only run what the Redis ACL lets it.

use e2e::http::{self, Conn};
use e2e::topology::Backend;
use ratelimit_core::gcra::Limit;
use ratelimit_core::rate::Rate;
use ratelimit_core::webdis::{self, Command, Parsed};

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
fn the_shipped_webdis_config_refuses_everything_but_the_filters_script() {
    let backend = Backend::start();
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

    for refused in [
        "/FLUSHALL",
        "/FLUSHDB",
        "/CONFIG/GET/requirepass",
        "/CONFIG/SET/dir/tmp",
        "/KEYS/*",
        "/SET/apikey_ratelimit:canary/dead",
        "/GET/apikey_ratelimit:canary",
        "/DEL/apikey_ratelimit:canary",
        "/SCRIPT/FLUSH",
        "/DEBUG/SLEEP/1",
        "/SHUTDOWN",
        "/flushall",
    ] {
        let r = http::get(&addr, refused).unwrap();
        assert_eq!(r.status, 403, "{refused}: {r:?}");
    }

    // The filter's own calls work: EVALSHA, and EVAL for the NOSCRIPT case.
    let limits = [Limit::new(
        "l".into(),
        Rate {
            count: 1,
            window_seconds: 1,
        },
        1,
    )
    .unwrap()];
    let key = "apikey_ratelimit:lockdown-test";
    for command in [Command::Eval, Command::EvalSha] {
        let r = http::get(&addr, &webdis::request_path(command, key, &limits)).unwrap();
        assert_eq!(r.status, 200, "{command:?}: {r:?}");
        let parsed = webdis::parse_reply(Some(200), &r.body, 1);
        assert!(
            matches!(parsed, Parsed::Decided(_)),
            "{command:?}: {parsed:?}"
        );
    }

    // A script of one's own gets through webdis's prefix match, but Redis
    // refuses whatever it tries beyond the filter's commands and keys.
    for (script, key) in [
        ("return redis.call('FLUSHALL')", "apikey_ratelimit:x"),
        (
            "return redis.call('CONFIG','GET','*')",
            "apikey_ratelimit:x",
        ),
        ("return redis.call('KEYS','*')", "apikey_ratelimit:x"),
        ("return redis.call('SET',KEYS[1],'pwned')", "other:key"),
        (
            "return redis.call('DEL',KEYS[1])",
            "apikey_ratelimit:canary",
        ),
    ] {
        let mut path = String::from("/EVAL/");
        webdis::encode_into(&mut path, script.as_bytes());
        path.push_str("/1/");
        webdis::encode_into(&mut path, key.as_bytes());
        let r = http::get(&addr, &path).unwrap();
        let body = r.body_str();
        // Refused when called (ERR ... can't run this command) or, for a
        // key outside the pattern, before it runs (NOPERM).
        assert!(
            body.contains("[false,\"ERR") || body.contains("[false,\"NOPERM"),
            "{script} on {key} was not refused by Redis: {r:?}"
        );
    }
    assert_eq!(
        redis.cli(&["GET", "apikey_ratelimit:canary"]).trim(),
        "alive"
    );
    assert_eq!(redis.cli(&["EXISTS", "other:key"]).trim(), "0");

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
