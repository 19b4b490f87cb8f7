//! Clients that vanish while their request waits on webdis (issue 8, item
//! 3): with webdis frozen, 50,000 requests are sent and their connections
//! closed while the filter holds them paused on a call. Each call still ends
//! (Envoy's timeout), after its request is gone. Afterwards the VM's memory
//! is what it was, nothing panicked, those answers were counted as orphaned,
//! and once thawed webdis has caught up, requests are served and limited
//! normally. A second test replaces the plugin configuration (LDS) while
//! calls are in flight: the old root context still gets every answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use e2e::backend::RedisWebdis;
use e2e::envoy::Envoy;
use e2e::envoy_config::EnvoyConfig;
use e2e::http;
use e2e::lds::{self, FileListener};
use e2e::metrics::metric_name;
use e2e::poll_until;
use e2e::process::Signal;
use e2e::topology::{global_test_config, GlobalEnvoy, OneEnvoy};
use e2e::upstream::Upstream;

const ABANDONED: usize = 50_000;
/// Sent first, the same way, so the VM reaches its steady size before the
/// measurement starts (allocator pools, maps grown to the in-flight peak).
const WARM_UP: usize = 5_000;
const CLIENT_THREADS: usize = 8;
/// Long enough that every abandoned call is still in flight when its client
/// closes, short enough that few are in flight at once.
const TIMEOUT_MS: u64 = 200;
/// How long a client waits after sending before it closes: far below the
/// call's timeout.
const LINGER: Duration = Duration::from_millis(5);
/// Envoy works through the abandoned connections at its own pace.
const DRAIN: Duration = Duration::from_secs(60);
const RECOVERY: Duration = Duration::from_secs(20);

fn plugin_config(timeout_ms: u64) -> String {
    format!(
        r#"{{"limits": ["1/min"], "failure_mode": "allow",
            "store": {{"webdis": {{"cluster": "webdis", "timeout_ms": {timeout_ms}}}}}}}"#
    )
}

static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);

/// Sends `count` requests, each with a fresh key on its own connection, and
/// closes every connection without reading the answer.
fn abandon(addr: &str, count: usize) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..CLIENT_THREADS {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
                    let request = format!("GET /?api_key=gone-{key} HTTP/1.1\r\nHost: api\r\n\r\n");
                    // A refused connection only makes this run shorter; the
                    // call count below says how many were really paused.
                    // A close that Envoy reads with the request often ends it
                    // before the filter sees it: wait a little (nothing comes
                    // back before the call's timeout), then go away.
                    if let Ok(mut conn) = http::Conn::connect(addr) {
                        let _ = conn.write_raw(request.as_bytes());
                        let _ = conn.set_timeout(LINGER);
                        let _ = conn.read_response(false);
                    }
                }
            });
        }
    });
}

/// A fresh key gets its one request, then a 429 only Redis could decide.
fn limited_normally(global: &GlobalEnvoy) -> Result<(), String> {
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    let target = format!("/?api_key=fresh-{key}");
    let first = http::get(&global.addr(), &target).map_err(|e| e.to_string())?;
    let second = http::get(&global.addr(), &target).map_err(|e| e.to_string())?;
    match (first.status, second.status) {
        (200, 429) => Ok(()),
        _ => Err(format!("{first:?} then {second:?}")),
    }
}

/// Limiting works, once webdis has worked through the connections Envoy
/// left in its accept queue while it was frozen (each a call long timed
/// out): until then a fresh call can time out too, and `allow` lets it by.
fn wait_limited_normally(global: &GlobalEnvoy, what: &str) {
    let mut last = Err(String::new());
    let recovered = poll_until(RECOVERY, Duration::from_millis(100), || {
        last = limited_normally(global);
        last.is_ok().then_some(())
    });
    assert!(
        recovered.is_some(),
        "{what}: not limiting after {RECOVERY:?}: {last:?}"
    );
}

/// The call count once it has stopped rising (a client that closed before
/// the filter saw its request makes no call, so the count to wait for is not
/// known in advance): unchanged over `window`, longer than the filter's
/// metric tick. Bounded by [`DRAIN`].
fn calls_stopped_rising(global: &GlobalEnvoy, window: Duration) -> u64 {
    let deadline = std::time::Instant::now() + DRAIN;
    let mut last = global.metric("backend_calls");
    loop {
        std::thread::sleep(window);
        let now = global.metric("backend_calls");
        if now == last || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Waits until every call sent so far has been answered or timed out, and
/// returns the answers counted as orphaned.
fn settle(global: &GlobalEnvoy) -> u64 {
    calls_stopped_rising(global, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(TIMEOUT_MS * 3));
    global.metric("backend_answers_orphaned")
}

/// Global mode on one worker. The webdis cluster's connect timeout is made
/// longer than the call's: with webdis frozen its accept queue fills, and a
/// connection attempt that times out fails every call pending on the pool at
/// once, some of them before their client has gone. Now every call ends by
/// its own timeout, after its client closed.
fn start() -> GlobalEnvoy {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let config = test_config(&upstream, &backend, TIMEOUT_MS);
    let envoy = Envoy::start(&config, 1).unwrap_or_else(|e| panic!("{e:?}"));
    GlobalEnvoy {
        one: OneEnvoy { upstream, envoy },
        backend,
    }
}

fn test_config(upstream: &Upstream, backend: &RedisWebdis, timeout_ms: u64) -> EnvoyConfig {
    let plugin = plugin_config(timeout_ms);
    let mut config = global_test_config(upstream, backend.webdis.port(), Some(&plugin));
    let clusters = config.json_mut()["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap();
    for cluster in clusters.iter_mut().filter(|c| c["name"] == "webdis") {
        cluster["connect_timeout"] = "5s".into();
    }
    config
}

#[test]
fn abandoned_requests_leave_the_vm_memory_flat_and_limiting_intact() {
    let global = start();
    let addr = global.addr();
    wait_limited_normally(&global, "at start");
    let webdis = global.backend.webdis.proc();

    webdis.signal(Signal::Stop).unwrap();
    abandon(&addr, WARM_UP);
    let warm_orphaned = settle(&global);
    let warm_calls = global.metric("backend_calls");
    let before = global.metric("wasm_memory_bytes");
    let rss_before = global.envoy.rss_bytes();

    // A client the machine left unscheduled past the call's timeout got its
    // answer before it left: send more until 50,000 were really abandoned.
    let started = std::time::Instant::now();
    let mut orphaned = 0;
    // Bounded: each round sends only what is still missing.
    for _ in 0..10 {
        let missing = ABANDONED.saturating_sub(orphaned as usize);
        if missing == 0 {
            break;
        }
        abandon(&addr, missing);
        orphaned = settle(&global) - warm_orphaned;
    }
    eprintln!(
        "{orphaned} abandoned and settled in {:?}",
        started.elapsed()
    );
    let calls = global.metric("backend_calls") - warm_calls;
    let after = global.metric("wasm_memory_bytes");
    let rss_after = global.envoy.rss_bytes();
    webdis.signal(Signal::Cont).unwrap();
    eprintln!(
        "Wasm memory {before} -> {after} bytes, Envoy RSS {rss_before:?} -> {rss_after:?}, \
         {calls} calls, {orphaned} answers after their request had gone"
    );

    assert!(
        calls >= ABANDONED as u64,
        "only {calls} of {ABANDONED} requests reached a webdis call"
    );
    assert!(before > 0, "the wasm_memory_bytes gauge is not reported");
    assert_eq!(
        after,
        before,
        "the VM grew by {} bytes over {ABANDONED} abandoned requests",
        after.saturating_sub(before)
    );
    assert!(
        orphaned >= ABANDONED as u64,
        "only {orphaned} answers counted as orphaned for {calls} calls of abandoned requests"
    );
    let log = global.envoy.proc().log();
    // A Rust panic prints "panicked at"; a trapped VM, "failed: Uncaught".
    for sign in ["panicked", "failed: Uncaught"] {
        assert!(
            !log.contains(sign),
            "Envoy's log says {sign:?}:\n{}",
            global.envoy.proc().log_tail(40)
        );
    }
    wait_limited_normally(&global, "after webdis thawed");
    limited_normally(&global).unwrap();
}

/// The old root's calls: few, and long enough to be in flight while Envoy
/// swaps the listener.
const REPLACED_CALLS: usize = 200;
const REPLACED_TIMEOUT_MS: u64 = 10_000;
/// A new plugin configuration gives Envoy a new root context and makes it
/// delete the old one, here while the old one's calls are in flight (webdis
/// frozen). Deleted at once, it would cancel them, and the SDK would keep
/// their tokens forever (a later duplicate id panics the VM); the old root
/// waits instead, and every call is answered.
#[test]
fn a_replaced_root_waits_for_its_calls_to_be_answered() {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    let mut config = test_config(&upstream, &backend, REPLACED_TIMEOUT_MS);
    // The filter moves to a listener served from a file (LDS).
    let listener = FileListener::take(&mut config).unwrap();
    listener
        .write_plugin_config(&plugin_config(REPLACED_TIMEOUT_MS))
        .unwrap();
    let envoy = Envoy::start_with_args(&config, 1, &lds::ARGS).unwrap_or_else(|e| panic!("{e:?}"));
    let global = GlobalEnvoy {
        one: OneEnvoy { upstream, envoy },
        backend,
    };
    let addr = listener.addr();
    let served = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = http::get(&addr, "/?api_key=first").ok()?;
        (r.status == 200).then_some(())
    });
    assert!(served.is_some(), "the LDS listener never served");

    global.backend.webdis.proc().signal(Signal::Stop).unwrap();
    // Counted from here: the requests above may have made more than one call.
    let before = global.metric("backend_calls");
    abandon(&addr, REPLACED_CALLS);
    let in_flight = calls_stopped_rising(&global, Duration::from_millis(500)) - before;
    assert!(
        in_flight >= REPLACED_CALLS as u64 * 9 / 10,
        "only {in_flight} of {REPLACED_CALLS} abandoned requests made a call"
    );
    listener
        .write_plugin_config(&plugin_config(REPLACED_TIMEOUT_MS + 1))
        .unwrap();

    // The old listener is gone (drained) well before its calls' timeout.
    let replaced = poll_until(
        Duration::from_millis(REPLACED_TIMEOUT_MS / 2),
        Duration::from_millis(50),
        || {
            let stat = |name: &str| global.envoy.counter(name).unwrap_or(0);
            (stat("listener_manager.listener_modified") >= 1
                && stat("listener_manager.total_listeners_draining") == 0)
                .then_some(())
        },
    );
    assert!(
        replaced.is_some(),
        "the listener was not replaced while the calls were in flight"
    );
    let orphaned = global.envoy.wait_counter(
        &metric_name("backend_answers_orphaned"),
        in_flight,
        Duration::from_millis(REPLACED_TIMEOUT_MS) + DRAIN,
    );
    global.backend.webdis.proc().signal(Signal::Cont).unwrap();
    assert!(
        orphaned.is_ok(),
        "the old root's calls were cancelled, not answered: {orphaned:?}"
    );
    let log = global.envoy.proc().log();
    assert!(log.contains("root context closing: waiting for"));
    for sign in ["panicked", "failed: Uncaught"] {
        assert!(!log.contains(sign), "Envoy's log says {sign:?}");
    }
}
