//! The backend breaks: webdis killed, Redis killed, webdis frozen (SIGSTOP),
//! the cluster misconfigured. Under both failure modes, every request is
//! answered within the timeout plus a margin, its status is what the mode
//! says (`allow`: the upstream's 200; `deny`: a JSON 503), the metric of the
//! cause counts it, and once the backend is back, limiting recovers within
//! a few seconds. A restarted Redis has the filter's function before it
//! takes any client (redis-start.sh loads it first), so no request ever
//! meets a Redis without it; one whose library was flushed answers an error,
//! counted in `backend_errors_redis` and handled by the failure mode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::backend::{Redis, RedisWebdis, Webdis};
use e2e::envoy::Envoy;
use e2e::http::{self, Response};
use e2e::process::Signal;
use e2e::topology::{global_test_config, GlobalEnvoy};
use e2e::upstream::Upstream;
use ratelimit_core::webdis;

const TIMEOUT_MS: u64 = 100;
/// Envoy's own scheduling on a loaded 2-core machine, on top of the timeout.
const MARGIN: Duration = Duration::from_millis(250);
const RECOVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FailureMode {
    Allow,
    Deny,
}

impl FailureMode {
    fn name(self) -> &'static str {
        match self {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
        }
    }
}

fn plugin_config(mode: FailureMode, cluster: &str) -> String {
    format!(
        r#"{{"limits": ["1/min"], "failure_mode": "{}",
            "store": {{"webdis": {{"cluster": "{cluster}", "timeout_ms": {TIMEOUT_MS}}}}}}}"#,
        mode.name()
    )
}

static FRESH: AtomicUsize = AtomicUsize::new(0);

/// A request with a key never used before, and how long it took.
fn fresh_request(addr: &str) -> (Response, Duration) {
    let key = FRESH.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let r = http::get(addr, &format!("/?api_key=fault-{key}")).unwrap();
    (r, started.elapsed())
}

/// While the backend is broken: every answer follows the failure mode, in
/// time.
fn check_failing(addr: &str, mode: FailureMode, what: &str) {
    for _ in 0..5 {
        let (r, took) = fresh_request(addr);
        assert!(
            took < Duration::from_millis(TIMEOUT_MS) + MARGIN,
            "{what}: answered after {took:?}"
        );
        match mode {
            FailureMode::Allow => {
                assert_eq!(r.status, 200, "{what}: {r:?}");
                assert_eq!(r.body_str(), "\"ok\"");
            }
            FailureMode::Deny => {
                assert_eq!(r.status, 503, "{what}: {r:?}");
                assert_eq!(r.header("content-type"), Some("application/json"));
                assert_eq!(
                    r.body_str(),
                    r#"{"detail":"Rate limiter unavailable. Please retry later."}"#
                );
            }
        }
    }
}

/// Limiting works again: a fresh key gets one request, then a 429 that
/// only the backend could have decided (the first of a key is never cached).
fn wait_recovered(addr: &str, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let key = FRESH.fetch_add(1, Ordering::Relaxed);
        let target = format!("/?api_key=recover-{key}");
        let first = http::get(addr, &target).unwrap().status;
        let second = http::get(addr, &target).unwrap().status;
        if (first, second) == (200, 429) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < RECOVERY,
            "{what}: not recovered after {RECOVERY:?} (last: {first}, {second})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counter_grew(global: &GlobalEnvoy, metric: &str, before: u64) -> u64 {
    let now = global.metric_at_least(metric, before + 5);
    assert!(now >= before + 5, "{metric}: {before} -> {now}");
    now
}

fn faults_under(mode: FailureMode) {
    let mut global = GlobalEnvoy::start(Some(&plugin_config(mode, "webdis")), 2);
    let addr = global.addr();
    wait_recovered(&addr, "at start");
    let failure_metric = match mode {
        FailureMode::Allow => "failure_mode_allowed",
        FailureMode::Deny => "failure_mode_denied",
    };

    // webdis killed: Envoy cannot connect (503 from its cluster).
    let (webdis_port, redis_port, password) = (
        global.backend.webdis.port(),
        global.backend.redis.port(),
        global.backend.redis.password().to_string(),
    );
    global.backend.webdis.proc().kill();
    let status_errors = global.metric("backend_errors_status");
    check_failing(&addr, mode, "webdis killed");
    counter_grew(&global, "backend_errors_status", status_errors);
    assert!(global.metric(failure_metric) >= 5);
    global.backend.webdis = Webdis::try_start_on(webdis_port, redis_port, &password).unwrap();
    let took = wait_recovered(&addr, "webdis restarted");
    eprintln!(
        "[{}] webdis restarted: limiting again after {took:?}",
        mode.name()
    );

    // Redis killed: webdis answers 503 itself.
    global.backend.redis.proc().kill();
    let status_errors = global.metric("backend_errors_status");
    check_failing(&addr, mode, "Redis killed");
    counter_grew(&global, "backend_errors_status", status_errors);
    let redis_errors = global.metric("backend_errors_redis");
    global.backend.redis = Redis::try_start_on(redis_port, &password).unwrap();
    let took = wait_recovered(&addr, "Redis restarted");
    eprintln!(
        "[{}] Redis restarted: limiting again after {took:?}",
        mode.name()
    );
    assert_eq!(
        global.metric("backend_errors_redis"),
        redis_errors,
        "a request met the restarted Redis without its function"
    );

    // The library flushed (by an operator): a Redis error, under the mode.
    let redis = &global.backend.redis;
    assert_eq!(redis.cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
    check_failing(&addr, mode, "library flushed");
    counter_grew(&global, "backend_errors_redis", redis_errors);
    let loaded = redis.cli(&["FUNCTION", "LOAD", webdis::LIBRARY]);
    assert_eq!(loaded.trim(), "apikey_ratelimit");
    wait_recovered(&addr, "library reloaded");

    // webdis frozen: connections open, no answer: the call's timeout.
    global.backend.webdis.proc().signal(Signal::Stop).unwrap();
    let timeouts = global.metric("backend_errors_timeout");
    check_failing(&addr, mode, "webdis frozen");
    counter_grew(&global, "backend_errors_timeout", timeouts);
    global.backend.webdis.proc().signal(Signal::Cont).unwrap();
    let took = wait_recovered(&addr, "webdis thawed");
    eprintln!(
        "[{}] webdis thawed: limiting again after {took:?}",
        mode.name()
    );

    // Each cause was logged, without any API key in the line.
    let log = global.envoy.proc().log();
    for cause in [
        "(Status): webdis answered 503",
        "(Timeout): webdis did not answer",
        "(Redis): Redis error: ERR Function not found",
    ] {
        assert!(log.contains(cause), "no log line for {cause}:\n{log}");
    }
    assert!(
        !log.contains("fault-") && !log.contains("recover-"),
        "a key leaked into the log"
    );
}

#[test]
fn backend_faults_with_failure_mode_allow() {
    faults_under(FailureMode::Allow);
}

#[test]
fn backend_faults_with_failure_mode_deny() {
    faults_under(FailureMode::Deny);
}

#[test]
fn a_misconfigured_cluster_is_counted_and_follows_the_failure_mode() {
    let upstream = Upstream::start();
    let backend = RedisWebdis::start();
    for mode in [FailureMode::Allow, FailureMode::Deny] {
        let config = global_test_config(
            &upstream,
            backend.webdis.port(),
            Some(&plugin_config(mode, "no_such_cluster")),
        );
        let envoy = Envoy::start(&config, 1).unwrap();
        let addr = envoy.addr();
        for _ in 0..5 {
            let (r, took) = fresh_request(&addr);
            assert!(took < MARGIN, "{took:?}");
            let expected = if mode == FailureMode::Allow { 200 } else { 503 };
            assert_eq!(r.status, expected, "{mode:?}: {r:?}");
        }
        let metric = "wasmcustom.apikey_ratelimit.api.backend_errors_dispatch";
        assert_eq!(
            envoy
                .wait_counter(metric, 5, Duration::from_secs(5))
                .unwrap(),
            5
        );
        assert!(envoy
            .proc()
            .log()
            .contains("Envoy refused the call to cluster 'no_such_cluster'"));
    }
}
