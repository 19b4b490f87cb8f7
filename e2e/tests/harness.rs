//! The harness's own tests: real Envoy and upstream processes, real assertions.
//!
//! The filter's .wasm is not needed here: these tests take the shipped local config,
//! remove the rate-limit filter, and check the plumbing around it.

use e2e::envoy::{self, Envoy};
use e2e::envoy_config::EnvoyConfig;
use e2e::http::{self, Conn};
use e2e::load::{self, StatusTable};
use e2e::paths;
use e2e::ports::free_port;
use e2e::process::{Proc, Signal};
use e2e::upstream::{self, Upstream};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FILTER: &str = "apikey_ratelimit";

/// The shipped local config, without our filter, in front of `up`.
fn plain_config(up: &Upstream) -> EnvoyConfig {
    let mut cfg = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
    cfg.remove_http_filter(FILTER).unwrap();
    cfg.set_cluster_endpoint("upstream", "127.0.0.1", up.port())
        .unwrap();
    cfg
}

fn pid_exists(pid: u32) -> bool {
    // kill(pid, 0) probes without signalling.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn envoy_routes_a_get_to_the_upstream_and_counts_it() {
    let up = Upstream::start();
    let envoy = Envoy::start(&plain_config(&up), 2).unwrap();

    let r = http::get(&envoy.addr(), "/?api_key=1234").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body_str(), "\"ok\"");
    assert_eq!(r.header("Content-Type"), Some("application/json"));

    // Several requests on one keep-alive connection.
    let mut c = Conn::connect(&envoy.addr()).unwrap();
    for _ in 0..3 {
        let r = c.get("/healthz").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body_str(), r#"{"status":"healthy"}"#);
    }
    assert!(!c.is_closed());

    let completed = envoy
        .wait_counter(
            "http.api.downstream_rq_completed",
            4,
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(completed >= 4, "{completed}");
    assert!(envoy.counter("http.api.downstream_rq_2xx").unwrap() >= 4);
    assert_eq!(envoy.counter("no.such.stat"), None);
    let prom = envoy.prometheus_text().unwrap();
    assert!(
        prom.contains("envoy_http_downstream_rq_completed{envoy_http_conn_manager_prefix=\"api\"}"),
        "{prom}"
    );
    let rss = envoy.rss_bytes().unwrap();
    assert!(rss > 10 << 20, "Envoy's RSS is only {rss} bytes");
}

#[test]
fn two_envoys_run_side_by_side() {
    let up = Upstream::start();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Envoy::start(&plain_config(&up), 1));
        let b = s.spawn(|| Envoy::start(&plain_config(&up), 1));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    // Started from threads that have ended: still alive (no PDEATHSIG on thread exit).
    assert!(a.proc().is_running() && b.proc().is_running());
    assert_ne!(a.addr(), b.addr());
    for e in [&a, &b] {
        assert_eq!(http::get(&e.addr(), "/").unwrap().status, 200);
    }
}

#[test]
fn envoy_refuses_a_config_with_an_unknown_field() {
    let up = Upstream::start();
    let mut cfg = plain_config(&up);
    cfg.json_mut()["static_resources"]["clusters"][0]["no_such_field"] = true.into();

    let (status, log) = Envoy::start_expect_failure(&cfg, 1, Duration::from_secs(20));
    let status = status.expect("Envoy kept running with an unknown field");
    assert!(!status.success(), "{status:?}");
    assert!(log.contains("no_such_field"), "{log}");

    let err = Envoy::start(&cfg, 1).err().unwrap().to_string();
    assert!(err.contains("exited with code 1"), "{err}");
    assert!(err.contains("no_such_field"), "{err}");
}

#[test]
fn dropping_a_proc_kills_the_process() {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    let p = Proc::spawn("sleeper", cmd).unwrap();
    let pid = p.pid();
    assert!(p.is_running());
    assert!(p.rss_bytes().unwrap() > 0);
    let dir = p.dir().to_path_buf();
    drop(p);
    assert!(!pid_exists(pid), "pid {pid} survived its guard");
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
}

#[test]
fn cpu_time_counts_what_a_busy_process_used() {
    let mut idle = Command::new("sleep");
    idle.arg("1000");
    let idle = Proc::spawn("sleeper", idle).unwrap();
    let mut busy = Command::new("sh");
    busy.args(["-c", "while :; do :; done"]);
    let busy = Proc::spawn("spinner", busy).unwrap();
    let used = e2e::poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
        busy.cpu_time().filter(|t| *t >= Duration::from_millis(50))
    });
    assert!(used.is_some(), "a busy loop used {:?}", busy.cpu_time());
    assert!(idle.cpu_time().unwrap() < used.unwrap());
    busy.kill();
    assert_eq!(busy.cpu_time(), None, "an exited process has no CPU time");
}

#[test]
fn dropping_an_envoy_kills_it() {
    let up = Upstream::start();
    let envoy = Envoy::start(&plain_config(&up), 1).unwrap();
    let (pid, addr) = (envoy.proc().pid(), envoy.addr());
    drop(envoy);
    assert!(!pid_exists(pid));
    assert!(http::get(&addr, "/").is_err());
    let up_pid = up.proc().pid();
    drop(up);
    assert!(!pid_exists(up_pid));
}

#[test]
fn a_frozen_process_stops_answering_and_still_dies_on_drop() {
    let up = Upstream::start();
    up.proc().signal(Signal::Stop).unwrap();
    let mut c = Conn::connect_timeout(up.addr(), Duration::from_millis(300)).unwrap();
    let err = c.get("/").unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    up.proc().signal(Signal::Cont).unwrap();
    let mut c = Conn::connect(up.addr()).unwrap();
    assert_eq!(c.get("/").unwrap().status, 200);

    // stop() sends SIGCONT after SIGTERM, so a frozen process exits gracefully
    // instead of waiting out the grace period.
    up.proc().signal(Signal::Stop).unwrap();
    let t = Instant::now();
    let status = up.proc().stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(status.success(), "{status:?}\n{}", up.proc().log());
    assert!(
        up.proc().signal(Signal::Term).is_err(),
        "signalled a reaped pid"
    );
}

#[test]
fn envoy_answers_an_invalid_request_with_400() {
    let up = Upstream::start();
    let envoy = Envoy::start(&plain_config(&up), 1).unwrap();
    let r = http::send_raw(
        &envoy.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    )
    .unwrap()
    .expect("Envoy closed without answering");
    assert_eq!(r.status, 400, "{r:?}");

    // Bytes a normal client would refuse: non-UTF-8 header value, odd method.
    let mut c = Conn::connect(&envoy.addr()).unwrap();
    let r = c
        .request("GET", b"/?api_key=%zz", &[("x-api-key", b"\xff\xfe")])
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // Envoy's parser refuses methods it does not know, and lower-case ones.
    let r = c.request("BREW", b"/", &[]).unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(c.is_closed());
    let mut c = Conn::connect(&envoy.addr()).unwrap();
    let r = c.request("HEAD", b"/", &[]).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(c.get("/").unwrap().body_str(), "\"ok\"");
}

#[test]
fn envoy_answers_a_huge_header_with_431() {
    let up = Upstream::start();
    let envoy = Envoy::start(&plain_config(&up), 1).unwrap();
    // Envoy's default limit is 60 KiB of request headers.
    let big = vec![b'a'; 200 * 1024];
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nx-api-key: ".to_vec();
    req.extend_from_slice(&big);
    req.extend_from_slice(b"\r\n\r\n");
    let r = http::send_raw(&envoy.addr(), &req).unwrap();
    assert_eq!(r.map(|r| r.status), Some(431));
}

#[test]
fn paced_keeps_an_absolute_schedule() {
    let t0 = Instant::now();
    let starts = Mutex::new(Vec::new());
    let statuses = load::paced(10, Duration::from_millis(50), |i| {
        starts.lock().unwrap().push((i, t0.elapsed()));
        // A slow first answer must not delay the sends after it.
        if i == 0 {
            std::thread::sleep(Duration::from_millis(180));
        }
        200 + i as u16
    });
    let took = t0.elapsed();
    assert_eq!(statuses, (200..210).collect::<Vec<u16>>());
    assert!(
        took >= Duration::from_millis(450) && took <= Duration::from_millis(600),
        "{took:?}"
    );
    for (i, at) in starts.into_inner().unwrap() {
        let due = Duration::from_millis(50 * i as u64);
        assert!(
            at >= due && at < due + Duration::from_millis(50),
            "send {i} at {at:?}, due at {due:?}"
        );
    }
}

#[test]
fn concurrent_puts_every_call_in_flight_at_once() {
    const N: usize = 300;
    let inside = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let t0 = Instant::now();
    let statuses = load::concurrent(N, |i| {
        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        // Hold on until everyone is in, or give up after 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        while peak.load(Ordering::SeqCst) < N && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        inside.fetch_sub(1, Ordering::SeqCst);
        if i % 3 == 0 {
            429
        } else {
            200
        }
    });
    assert_eq!(peak.load(Ordering::SeqCst), N);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let table = StatusTable::new(&statuses);
    assert_eq!((table.count(200), table.count(429)), (200, 100));
    assert_eq!(table.to_string(), "200 x 200, 429 x 100");
    assert_eq!(StatusTable::new(&[]).to_string(), "none");
}

#[test]
fn concurrent_burst_through_envoy_all_gets_answered() {
    let up = Upstream::start();
    let envoy = Envoy::start(&plain_config(&up), 2).unwrap();
    let addr = envoy.addr();
    let statuses = load::concurrent_prepared(
        100,
        |_| Conn::connect(&addr).unwrap(),
        |_, mut c| load::status(c.get("/")),
    );
    let table = StatusTable::new(&statuses);
    assert_eq!(table.count(200), 100, "{table}");
}

#[test]
fn the_shipped_local_config_validates_with_a_wasm_module_present() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EnvoyConfig::load(paths::shipped_config("local.yaml")).unwrap();
    let wasm = dir.path().join("noop.wasm");
    std::fs::write(&wasm, noop_proxy_wasm(true)).unwrap();
    cfg.set_wasm_filename(&wasm).unwrap();
    let file = dir.path().join("local.json");
    cfg.write(&file).unwrap();
    envoy::validate(&file).unwrap();

    // Validation loads the module: an empty file is refused...
    std::fs::write(&wasm, b"").unwrap();
    let err = envoy::validate(&file).unwrap_err().to_string();
    assert!(err.contains("Unable to create Wasm plugin"), "{err}");
    // ...and so is a missing one.
    cfg.set_wasm_filename(&dir.path().join("missing.wasm"))
        .unwrap();
    cfg.write(&file).unwrap();
    let err = envoy::validate(&file).unwrap_err().to_string();
    assert!(err.contains("missing.wasm"), "{err}");
}

#[test]
fn validate_rejects_an_unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EnvoyConfig::load(paths::shipped_config("local.yaml")).unwrap();
    cfg.remove_http_filter(FILTER).unwrap();
    cfg.json_mut()["admin"]["bogus"] = 1.into();
    let file = dir.path().join("bad.json");
    cfg.write(&file).unwrap();
    let err = envoy::validate(&file).unwrap_err().to_string();
    assert!(
        err.contains("exited with code 1") && err.contains("bogus"),
        "{err}"
    );
}

#[test]
fn config_setters_walk_the_tree_and_name_what_is_missing() {
    let mut cfg = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
    assert_ne!(cfg.admin_port(), Some(9901));
    assert_ne!(cfg.listener_port("api"), Some(9018));
    let wasm = cfg.wasm_filenames();
    assert_eq!(wasm.len(), 1);
    assert!(wasm[0].is_absolute(), "{wasm:?}");
    assert!(wasm[0].ends_with("target/wasm32-wasip1/release/apikey_ratelimit.wasm"));

    let shipped = cfg.plugin_config().unwrap();
    assert!(shipped.contains("\"1/s\""), "{shipped}");
    cfg.set_plugin_config(r#"{"limits":["5/m"]}"#).unwrap();
    assert_eq!(cfg.plugin_config().unwrap(), r#"{"limits":["5/m"]}"#);

    cfg.set_cluster_endpoint("upstream", "127.0.0.2", 4242)
        .unwrap();
    let sa = &cfg.json()["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
        ["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(sa["address"], "127.0.0.2");
    assert_eq!(sa["port_value"], 4242);

    let err = cfg
        .set_cluster_endpoint("webdis", "127.0.0.1", 1)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "static_resources.clusters: no entry named `webdis` (there are: upstream)"
    );
    let err = cfg.set_listener_port("nope", 1).unwrap_err();
    assert!(
        err.to_string().contains("static_resources.listeners"),
        "{err}"
    );

    cfg.remove_http_filter(FILTER).unwrap();
    assert!(cfg.wasm_filenames().is_empty());
    assert!(cfg.plugin_config().is_err());
    let err = cfg.remove_http_filter(FILTER).unwrap_err();
    assert!(err.to_string().contains(FILTER), "{err}");

    cfg.json_mut()["admin"] = serde_json::json!({});
    let err = cfg.set_admin_port(1).unwrap_err();
    assert_eq!(err.to_string(), "admin.address: missing");
}

#[test]
fn free_ports_are_never_handed_out_twice() {
    let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
    let unique: HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(unique.len(), ports.len());
    for p in &ports[..20] {
        TcpListener::bind(("127.0.0.1", *p)).unwrap();
    }
}

#[test]
fn upstream_start_reads_the_listening_line() {
    let up = Upstream::start();
    assert_eq!(up.addr(), format!("127.0.0.1:{}", up.port()));
    let r = http::get(up.addr(), "/").unwrap();
    assert_eq!((r.status, r.body_str().as_ref()), (200, "\"ok\""));
}

#[test]
fn upstream_start_works_with_any_binary_that_prints_the_line() {
    // A stand-in that ignores its arguments, prints the line late, then waits.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake-upstream");
    std::fs::write(
        &script,
        "#!/bin/sh\necho starting\nsleep 0.2\necho 'upstream listening on http://127.0.0.1:4321'\nexec sleep 1000\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let up = Upstream::start_bin(&script, &[]).unwrap();
    assert_eq!((up.addr(), up.port()), ("127.0.0.1:4321", 4321));

    assert_eq!(
        upstream::parse_listening_line("upstream listening on http://127.0.0.1:5"),
        None
    );
    assert_eq!(
        upstream::parse_listening_line("x\nupstream listening on http://127.0.0.1:5\n").as_deref(),
        Some("127.0.0.1:5")
    );

    // One that dies first: the error quotes its log.
    std::fs::write(&script, "#!/bin/sh\necho 'cannot bind' >&2\nexit 3\n").unwrap();
    let err = Upstream::start_bin(&script, &[]).err().unwrap().to_string();
    assert!(
        err.contains("exited with code 3") && err.contains("cannot bind"),
        "{err}"
    );
}

/// A one-shot server answering each request on a connection with the next canned
/// response; returns its address.
fn canned_server(responses: Vec<&'static [u8]>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        for resp in responses {
            // Wait for the end of a request head.
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            buf.drain(..end);
            s.write_all(resp).unwrap();
        }
    });
    addr
}

#[test]
fn http_client_reads_every_body_framing() {
    let addr = canned_server(vec![
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Usage: 7\r\nx-more:  a b \r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-V: \xff\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\n\r\nuntil close",
    ]);
    let mut c = Conn::connect(&addr).unwrap();
    let r = c.get("/").unwrap();
    assert_eq!((r.status, r.body_str().as_ref()), (200, "hello"));
    assert_eq!(r.header_all("x-a"), vec!["1", "2"]);
    let r = c.get("/").unwrap();
    assert_eq!(r.body_str(), "abcde");
    assert_eq!(
        (r.trailer("x-usage"), r.trailer("X-MORE")),
        (Some("7"), Some("a b"))
    );
    assert_eq!(r.header("x-usage"), None, "a trailer is not a header");
    let r = c.get("/").unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));
    assert_eq!(r.header("x-v"), None);
    assert_eq!(r.header_bytes("X-V"), Some(&b"\xff"[..]));
    let r = c.request("HEAD", b"/", &[]).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = c.get("/").unwrap();
    assert_eq!((r.status, r.body_str().as_ref()), (404, "until close"));
    assert!(c.is_closed());
    assert!(c.get("/").is_err());

    // A server that closes without answering.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
    });
    assert_eq!(
        http::send_raw(&addr, b"GET / HTTP/1.1\r\n\r\n").unwrap(),
        None
    );
}

/// A minimal proxy-wasm module (ABI 0.2.1) that lets every request through, or whose
/// `proxy_on_configure` fails when `configure_ok` is false. It stands in for the
/// filter, which this crate's own tests must not need. In WAT:
///
/// ```wat
/// (module
///   (memory (export "memory") 17)
///   (func (export "proxy_abi_version_0_2_1"))
///   (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 65536)
///   (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
///   (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1 ;; or 0
///   (func (export "proxy_on_context_create") (param i32 i32)))
/// ```
fn noop_proxy_wasm(configure_ok: bool) -> Vec<u8> {
    fn leb128(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, items: &[Vec<u8>]) -> Vec<u8> {
        let mut body = leb128(items.len());
        items.iter().for_each(|i| body.extend(i));
        [vec![id], leb128(body.len()), body].concat()
    }
    fn name(n: &str) -> Vec<u8> {
        let mut v = vec![n.len() as u8];
        v.extend(n.as_bytes());
        v
    }
    const I32: u8 = 0x7f;
    let types = [
        vec![0x60, 0, 0],                // () -> ()
        vec![0x60, 1, I32, 1, I32],      // (i32) -> i32
        vec![0x60, 2, I32, I32, 1, I32], // (i32, i32) -> i32
        vec![0x60, 2, I32, I32, 0],      // (i32, i32) -> ()
    ];
    // Function i has type funcs[i].
    let funcs = [vec![0], vec![1], vec![2], vec![2], vec![3]];
    let exports = [
        ("memory", 2, 0),
        ("proxy_abi_version_0_2_1", 0, 0),
        ("proxy_on_memory_allocate", 0, 1),
        ("proxy_on_vm_start", 0, 2),
        ("proxy_on_configure", 0, 3),
        ("proxy_on_context_create", 0, 4),
    ]
    .map(|(n, kind, idx)| [name(n), vec![kind, idx]].concat());
    let body = |code: &[u8]| [&[code.len() as u8 + 1, 0][..], code].concat();
    let code = [
        body(&[0x0b]),
        body(&[0x41, 0x80, 0x80, 0x04, 0x0b]), // i32.const 65536
        body(&[0x41, 1, 0x0b]),
        body(&[0x41, u8::from(configure_ok), 0x0b]),
        body(&[0x0b]),
    ];
    [
        b"\0asm\x01\0\0\0".to_vec(),
        section(1, &types),
        section(3, &funcs),
        section(5, &[vec![0, 17]]), // one memory, min 17 pages
        section(7, &exports),
        section(10, &code),
    ]
    .concat()
}

#[test]
fn a_stand_in_wasm_filter_runs_with_its_plugin_config() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("noop.wasm");
    std::fs::write(&wasm, noop_proxy_wasm(true)).unwrap();
    let mut cfg = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
    cfg.set_wasm_filename(&wasm).unwrap();
    cfg.set_plugin_config(r#"{"limits":["2/s"]}"#).unwrap();
    cfg.set_cluster_endpoint("upstream", "127.0.0.1", up.port())
        .unwrap();
    let envoy = Envoy::start(&cfg, 2).unwrap();
    let r = http::get(&envoy.addr(), "/?api_key=1").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // One VM per worker plus the main thread's.
    assert!(envoy.counter("wasm.envoy.wasm.runtime.v8.active").unwrap() >= 3);
}

#[test]
fn envoy_exits_1_when_the_plugin_rejects_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("refuses.wasm");
    std::fs::write(&wasm, noop_proxy_wasm(false)).unwrap();
    let mut cfg = EnvoyConfig::for_test(paths::shipped_config("local.yaml"));
    cfg.set_wasm_filename(&wasm).unwrap();
    let err = Envoy::start(&cfg, 1).err().unwrap().to_string();
    assert!(err.contains("exited with code 1"), "{err}");
    assert!(
        err.contains("Failed to configure base Wasm plugin"),
        "{err}"
    );

    // `--mode validate` runs on_configure too, so it catches a rejected config.
    let file = dir.path().join("refuses.json");
    cfg.write(&file).unwrap();
    let err = envoy::validate(&file).unwrap_err().to_string();
    assert!(
        err.contains("Failed to configure base Wasm plugin"),
        "{err}"
    );
}

#[test]
fn children_die_with_the_test_binary() {
    // Run the helper below in a child test binary, let it start a sleeper, then
    // SIGKILL that binary: no Drop runs, only PR_SET_PDEATHSIG can end the sleeper.
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "helper_starts_a_sleeper_and_waits",
        "--ignored",
        "--nocapture",
    ]);
    let parent = Proc::spawn("test-binary", cmd).unwrap();
    let pid: u32 = e2e::poll_until(Duration::from_secs(10), Duration::from_millis(10), || {
        let log = parent.log();
        let line = log.lines().find(|l| l.starts_with("SLEEPER_PID "))?;
        line["SLEEPER_PID ".len()..].trim().parse().ok()
    })
    .unwrap_or_else(|| panic!("no SLEEPER_PID line:\n{}", parent.log()));
    assert!(pid_exists(pid));
    // Become the sleeper's new parent when its own dies, so we can reap it and see
    // how it ended.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    parent.signal(Signal::Kill).unwrap();
    let status = e2e::poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        let mut status = 0;
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        (r == pid as libc::pid_t).then_some(status)
    })
    .unwrap_or_else(|| panic!("sleeper {pid} outlived the test binary that started it"));
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "sleeper ended with wait status {status:#x}"
    );
    // No Drop ran in the killed binary to remove the sleeper's temp dir.
    if let Some(dir) = parent
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("SLEEPER_DIR "))
    {
        std::fs::remove_dir_all(dir.trim()).unwrap();
    }
}

#[test]
#[ignore = "helper run by children_die_with_the_test_binary"]
fn helper_starts_a_sleeper_and_waits() {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    let p = Proc::spawn("sleeper", cmd).unwrap();
    println!("SLEEPER_DIR {}", p.dir().display());
    println!("SLEEPER_PID {}", p.pid());
    std::thread::sleep(Duration::from_secs(30));
}
