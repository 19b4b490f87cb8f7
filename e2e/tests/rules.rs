//! Rules (issue 12) end to end: three rules (a method + path rule, a host
//! rule, a path template) and key-wide limits on one key, under interleaved
//! traffic from concurrent clients, in local mode (one Envoy, 6 workers)
//! and in global mode (6 replicas sharing Redis). Every count is exact.
//!
//! # The policy and its routes
//!
//! Key-wide `12/min`; `create-order` (`POST /orders`) `4/min`; `eu` (host
//! `eu.example.test`) `6/min`; `order` (`/orders/{id}`) `5/min`.
//!
//! | route        | requests                                      | limits                |
//! |--------------|-----------------------------------------------|-----------------------|
//! | create-order | `POST /orders`, `//orders/`, `/%6Frders`      | 12/min, create-order  |
//! | eu-order     | `GET /orders/42`, `/orders/7`, on the eu host | 12/min, eu, order     |
//! | eu           | `GET /x` on the eu host                       | 12/min, eu            |
//! | plain        | `GET /other`                                  | 12/min                |
//!
//! The eu host is sent as `eu.example.test` and as `EU.Example.Test:8080`
//! (case and port ignored). Phases, all on one key, each from several
//! clients at once, one connection a request (so they spread over workers
//! and replicas), each phase after the previous one's answers:
//!
//! 1. create-order and eu-order interleaved, 24 requests each;
//! 2. eu, 12 requests;
//! 3. plain, 12 requests;
//! 4. each route once more (create-order in its three spellings).
//!
//! # Why the counts are exact
//!
//! Every limit is `b/min` with burst `b`: GCRA (emission interval
//! `T = 60 s / b`) admits `b` requests at once, then one more `T` after
//! the limit's first admission. Until then a limit that has admitted `n`
//! requests has its TAT at `first + n·T` and denies exactly when `n >= b`:
//! it is a plain counter of capacity `b`. The shortest `T` is the key-wide
//! limit's 5 s, and [`check`] first makes sure the whole run, from the
//! first request sent to the last answer, took less (else it panics and
//! blames the machine, not the filter). A request is then admitted exactly
//! when every limit it meets has room, and a denied one takes nothing:
//!
//! 1. create-order and eu-order share no rule limit and never fill the
//!    key-wide one (4 + 5 < 12): create-order admits exactly 4 and eu-order
//!    exactly 5 (order's limit; eu's 6 has room), in any interleaving. Each
//!    429 names the one limit that denied it.
//! 2. eu finds eu's limit with 6 - 5 = 1 left and the key-wide 3: exactly 1,
//!    so eu-order's 19 denials took nothing from eu.
//! 3. plain finds the key-wide limit with 12 - 10 = 2 left: exactly 2, so
//!    phases 1 and 2's denials took nothing from it either, and the
//!    key-wide limit capped the routes' sum at 12 (the rule limits hold 15).
//! 4. Everything is denied. The 429 names the denying limit with the
//!    longest wait (`T` minus the time since its first admission): for
//!    create-order its own (15 s - x) over the key-wide's (5 s - y); for
//!    eu-order order's (12 s - x) over eu's (10 s - x, the same first
//!    admission); for eu eu's (10 s - x) over the key-wide's (5 s - y).
//!
//! The `RateLimit` header of an admitted response gives each limit's
//! remaining count, `b - n` after its `n`-th admission: over all admitted
//! responses each limit's values are `b-1, ..., 0`, each once, or one less
//! where a request's clock was read before a concurrent admission committed.
//!
//! In global mode a replica's "denied until" cache knows only the limits its
//! own answers showed; it answers a request only when it knows every limit
//! the request meets, so a 429 always names the longest-waiting limit
//! (`a_cached_denial_names_the_binding_limit_across_replicas` failed before).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use e2e::envoy::Envoy;
use e2e::http::Conn;
use e2e::metrics;
use e2e::topology::{Mode, OneEnvoy, Replicas};

const KEY: &str = "rules-key";
const KEY_WIDE: &str = "12/min";
const CREATE_ORDER: &str = "create-order:4/min";
const EU: &str = "eu:6/min";
const ORDER: &str = "order:5/min";
/// Every limit, with its count (= burst); all are per minute.
const LIMITS: [(&str, usize); 4] = [(KEY_WIDE, 12), (CREATE_ORDER, 4), (EU, 6), (ORDER, 5)];
/// The shortest emission interval, 60 s / 12: the run must be shorter.
const SHORTEST_INTERVAL: Duration = Duration::from_secs(5);
/// Clients sending at once in each phase.
const CLIENTS: usize = 8;
const EU_HOSTS: [&str; 2] = ["eu.example.test", "EU.Example.Test:8080"];

/// The plugin configuration, with `extra` fields (the store).
fn plugin_config(extra: &str) -> String {
    format!(
        r#"{{
            "limits": ["12/min"],
            "rules": [
                {{"name": "create-order", "match": {{"methods": ["POST"], "path": "/orders"}}, "limits": ["4/min"]}},
                {{"name": "eu", "match": {{"hosts": ["eu.example.test"]}}, "limits": ["6/min"]}},
                {{"name": "order", "match": {{"path_template": "/orders/{{id}}"}}, "limits": ["5/min"]}}
            ]{extra}
        }}"#
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    CreateOrder,
    EuOrder,
    Eu,
    Plain,
}

impl Route {
    /// The limits that apply, in `RateLimit-Policy`'s order (key-wide, then
    /// the rules' in rule order).
    fn limits(self) -> &'static [&'static str] {
        match self {
            Route::CreateOrder => &[KEY_WIDE, CREATE_ORDER],
            Route::EuOrder => &[KEY_WIDE, EU, ORDER],
            Route::Eu => &[KEY_WIDE, EU],
            Route::Plain => &[KEY_WIDE],
        }
    }

    /// The rules (metric names) it matches.
    fn rules(self) -> &'static [&'static str] {
        match self {
            Route::CreateOrder => &["create_order"],
            Route::EuOrder => &["eu", "order"],
            Route::Eu => &["eu"],
            Route::Plain => &[],
        }
    }

    /// Method, target and Host (`None`: the address) of its `n`-th request.
    fn request(self, n: usize) -> (&'static str, String, Option<&'static str>) {
        let eu_host = Some(EU_HOSTS[(n / 2) % 2]);
        let (method, path, host) = match self {
            Route::CreateOrder => ("POST", ["/orders", "//orders/", "/%6Frders"][n % 3], None),
            Route::EuOrder => ("GET", ["/orders/42", "/orders/7"][n % 2], eu_host),
            Route::Eu => ("GET", "/x", eu_host),
            Route::Plain => ("GET", "/other", None),
        };
        (method, format!("{path}?api_key={KEY}"), host)
    }

    fn expected_policy(self) -> String {
        let limits = self.limits().iter().map(|name| {
            let count = LIMITS.iter().find(|(n, _)| n == name).unwrap().1;
            format!("\"{name}\";q={count};w=60")
        });
        limits.collect::<Vec<_>>().join(", ")
    }
}

/// What each phase's requests of a route do (see the module docs).
struct Expected {
    phase: usize,
    route: Route,
    requests: usize,
    admitted: usize,
    /// What its 429s name.
    binding: &'static str,
    /// The limits that deny its 429s.
    denied_by: &'static [&'static str],
}

const PLAN: [Expected; 8] = [
    Expected {
        phase: 1,
        route: Route::CreateOrder,
        requests: 24,
        admitted: 4,
        binding: CREATE_ORDER,
        denied_by: &[CREATE_ORDER],
    },
    Expected {
        phase: 1,
        route: Route::EuOrder,
        requests: 24,
        admitted: 5,
        binding: ORDER,
        denied_by: &[ORDER],
    },
    Expected {
        phase: 2,
        route: Route::Eu,
        requests: 12,
        admitted: 1,
        binding: EU,
        denied_by: &[EU],
    },
    Expected {
        phase: 3,
        route: Route::Plain,
        requests: 12,
        admitted: 2,
        binding: KEY_WIDE,
        denied_by: &[KEY_WIDE],
    },
    Expected {
        phase: 4,
        route: Route::CreateOrder,
        requests: 3,
        admitted: 0,
        binding: CREATE_ORDER,
        denied_by: &[KEY_WIDE, CREATE_ORDER],
    },
    Expected {
        phase: 4,
        route: Route::EuOrder,
        requests: 2,
        admitted: 0,
        binding: ORDER,
        denied_by: &[KEY_WIDE, EU, ORDER],
    },
    Expected {
        phase: 4,
        route: Route::Eu,
        requests: 2,
        admitted: 0,
        binding: EU,
        denied_by: &[KEY_WIDE, EU],
    },
    Expected {
        phase: 4,
        route: Route::Plain,
        requests: 1,
        admitted: 0,
        binding: KEY_WIDE,
        denied_by: &[KEY_WIDE],
    },
];

fn expected(phase: usize, route: Route) -> &'static Expected {
    PLAN.iter()
        .find(|e| e.phase == phase && e.route == route)
        .unwrap()
}

/// One answer, with what the checks read of it.
struct Answer {
    phase: usize,
    route: Route,
    target: String,
    host: Option<&'static str>,
    /// 0: no answer.
    status: u16,
    body: String,
    policy: Option<String>,
    retry_after: Option<u64>,
    /// Each limit's `r=` in the `RateLimit` header.
    remaining: BTreeMap<String, usize>,
    sent: Instant,
    answered: Instant,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "phase {} {:?} {} (host {:?}): {} {} policy {:?} retry-after {:?} remaining {:?}",
            self.phase,
            self.route,
            self.target,
            self.host,
            self.status,
            self.body,
            self.policy,
            self.retry_after,
            self.remaining
        )
    }
}

impl Answer {
    /// The `limit` a 429's body names.
    fn limit(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        body["limit"].as_str().map(str::to_owned)
    }
}

/// `"12/min";r=3;t=20, "eu:6/min";r=1;t=50` -> {12/min: 3, eu:6/min: 1}.
fn parse_remaining(header: &str) -> BTreeMap<String, usize> {
    header
        .split(", ")
        .filter_map(|item| {
            let rest = item.strip_prefix('"')?;
            let (name, params) = rest.split_once('"')?;
            let r = params.split(';').find_map(|p| p.strip_prefix("r="))?;
            Some((name.to_owned(), r.parse().ok()?))
        })
        .collect()
}

fn send(addr: &str, phase: usize, route: Route, n: usize) -> Answer {
    let (method, target, host) = route.request(n);
    let mut headers: Vec<(&str, &[u8])> = vec![("Connection", b"close")];
    if let Some(host) = host {
        headers.push(("Host", host.as_bytes()));
    }
    if method == "POST" {
        headers.push(("Content-Length", b"0"));
    }
    let sent = Instant::now();
    let response =
        Conn::connect(addr).and_then(|mut c| c.request(method, target.as_bytes(), &headers));
    let answered = Instant::now();
    let (status, body, policy, retry_after, remaining) = match response {
        Ok(r) => (
            r.status,
            r.body_str().into_owned(),
            r.header("ratelimit-policy").map(str::to_owned),
            r.header("retry-after").and_then(|v| v.parse().ok()),
            r.header("ratelimit")
                .map(parse_remaining)
                .unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string(), None, None, BTreeMap::new()),
    };
    Answer {
        phase,
        route,
        target,
        host,
        status,
        body,
        policy,
        retry_after,
        remaining,
        sent,
        answered,
    }
}

/// Sends `requests` from [`CLIENTS`] clients that start together and each
/// take the next request of the list when done with their last.
fn phase(addr: &str, phase: usize, requests: &[(Route, usize)]) -> Vec<Answer> {
    let next = AtomicUsize::new(0);
    let start = Barrier::new(CLIENTS);
    let answers = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| {
                start.wait();
                while let Some((route, n)) = requests.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let answer = send(addr, phase, *route, *n);
                    answers.lock().unwrap().push(answer);
                }
            });
        }
    });
    answers.into_inner().unwrap()
}

/// The four phases of the module docs against `addr`.
fn run(addr: &str) -> Vec<Answer> {
    let of =
        |phase: usize, route: Route| (0..expected(phase, route).requests).map(move |n| (route, n));
    let interleaved: Vec<_> = of(1, Route::CreateOrder)
        .zip(of(1, Route::EuOrder))
        .flat_map(|(a, b)| [a, b])
        .collect();
    let last: Vec<_> = [Route::CreateOrder, Route::EuOrder, Route::Eu, Route::Plain]
        .into_iter()
        .flat_map(|route| of(4, route))
        .collect();
    let mut answers = phase(addr, 1, &interleaved);
    answers.extend(phase(addr, 2, &of(2, Route::Eu).collect::<Vec<_>>()));
    answers.extend(phase(addr, 3, &of(3, Route::Plain).collect::<Vec<_>>()));
    answers.extend(phase(addr, 4, &last));
    answers
}

/// The filter's counters summed over `envoys`, each read once settled (the
/// Envoys side by side: settling takes a flush period or more each).
fn counters(envoys: &[&Envoy], names: &[String]) -> Vec<u64> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let each: Vec<Vec<Option<u64>>> = std::thread::scope(|s| {
        let reads: Vec<_> = envoys
            .iter()
            .map(|envoy| s.spawn(|| metrics::counters(envoy, &names)))
            .collect();
        reads.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut sums = vec![0; names.len()];
    for values in each {
        for (sum, value) in sums.iter_mut().zip(values) {
            *sum += value.unwrap_or_else(|| panic!("a counter of {names:?} is not defined"));
        }
    }
    sums
}

/// `limit.<sanitized name>.throttled`.
fn limit_metric(name: &str) -> String {
    let sanitized: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("limit.{sanitized}.throttled")
}

/// Every check of the module docs on `answers`, with the counters of
/// `envoys`; returns the counters named in `more`, read with the others.
fn check(answers: &[Answer], envoys: &[&Envoy], more: &[&str]) -> Vec<u64> {
    let first_send = answers.iter().map(|a| a.sent).min().unwrap();
    let last_answer = answers.iter().map(|a| a.answered).max().unwrap();
    let span = last_answer - first_send;
    assert!(
        span < SHORTEST_INTERVAL,
        "the run took {span:?}: the machine was too slow for the exactness argument \
         (needs < {SHORTEST_INTERVAL:?}, the key-wide limit's emission interval)"
    );

    // Every answer: its status, its applied limits, what its 429 names.
    for a in answers {
        let e = expected(a.phase, a.route);
        assert!(matches!(a.status, 200 | 429), "{a}");
        assert_eq!(
            a.policy.as_deref(),
            Some(a.route.expected_policy().as_str()),
            "{a}"
        );
        if a.status == 200 {
            assert_eq!(a.body, "\"ok\"", "{a}");
            continue;
        }
        assert!(
            a.body
                .starts_with(r#"{"detail":"Request was throttled. Expected available in "#),
            "{a}"
        );
        let named = a.limit();
        assert_eq!(named.as_deref(), Some(e.binding), "{a}");
    }

    // Admitted per phase and route, exactly; their sum is the key-wide limit.
    let count = |phase: usize, route: Route, status: u16| {
        answers
            .iter()
            .filter(|a| a.phase == phase && a.route == route && a.status == status)
            .count()
    };
    let table = |status: Option<u16>| -> Vec<(usize, Route, usize)> {
        PLAN.iter()
            .map(|e| {
                let n = match status {
                    Some(status) => count(e.phase, e.route, status),
                    None => e.admitted,
                };
                (e.phase, e.route, n)
            })
            .collect()
    };
    assert_eq!(table(Some(200)), table(None), "admitted per (phase, route)");
    let admitted: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(admitted.len(), 12);
    for e in &PLAN {
        assert_eq!(
            count(e.phase, e.route, 200) + count(e.phase, e.route, 429),
            e.requests
        );
    }

    // Each limit's remaining counts over its admissions: b-1, ..., 0.
    for (limit, burst) in LIMITS {
        let mut seen: Vec<usize> = admitted
            .iter()
            .filter(|a| a.route.limits().contains(&limit))
            .map(|a| {
                *a.remaining
                    .get(limit)
                    .unwrap_or_else(|| panic!("no {limit} in RateLimit: {a}"))
            })
            .collect();
        seen.sort_unstable();
        // The n-th admission leaves b - n, as its request saw it: a request
        // whose clock was read just before another worker's admission
        // committed sees one interval more of debt and says one less
        // (never more: a header never promises what is not left).
        assert_eq!(seen.len(), burst, "{limit}: {seen:?}");
        for (i, r) in seen.iter().enumerate() {
            assert!(*r <= i && *r + 1 >= i, "{limit}: {seen:?}");
        }
    }

    // The counters say the same, per rule and per limit.
    let throttled: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    let mut names = vec!["allowed".to_owned(), "throttled".to_owned()];
    let mut want = vec![admitted.len() as u64, throttled.len() as u64];
    for rule in ["create_order", "eu", "order"] {
        let of_rule = |a: &Answer| a.route.rules().contains(&rule);
        names.push(format!("rule.{rule}.requests"));
        want.push(answers.iter().filter(|a| of_rule(a)).count() as u64);
        names.push(format!("rule.{rule}.throttled"));
        want.push(throttled.iter().filter(|a| of_rule(a)).count() as u64);
    }
    let denied = |limit: &str| {
        throttled
            .iter()
            .filter(|a| expected(a.phase, a.route).denied_by.contains(&limit))
            .count() as u64
    };
    for (limit, _) in LIMITS {
        names.push(limit_metric(limit));
        want.push(denied(limit));
    }
    let checked = names.len();
    names.extend(more.iter().map(|m| (*m).to_owned()));
    let mut got = counters(envoys, &names);
    let more = got.split_off(checked);
    names.truncate(checked);
    let named = |n: &[String], v: &[u64]| -> Vec<(String, u64)> {
        n.iter().cloned().zip(v.iter().copied()).collect()
    };
    assert_eq!(named(&names, &got), named(&names, &want));

    let mut per_route: BTreeMap<Route, (usize, usize)> = BTreeMap::new();
    for a in answers {
        let entry = per_route.entry(a.route).or_default();
        entry.0 += usize::from(a.status == 200);
        entry.1 += 1;
    }
    eprintln!(
        "{} requests in {span:?}, admitted per route (of sent): {per_route:?}, counters {:?}",
        answers.len(),
        named(&names, &got)
    );
    more
}

/// Both need every request back quickly: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn six_workers_each_route_admits_its_limit_and_the_key_wide_caps_the_sum() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let local = OneEnvoy::local(&plugin_config(""), 6);
    let answers = run(&local.addr());
    check(&answers, &[&local.envoy], &[]);
    let per_worker = local.connections_per_worker();
    assert_eq!(per_worker.len(), 6, "{per_worker:?}");
    assert!(
        per_worker.iter().filter(|c| **c > 0).count() >= 4,
        "connections per worker: {per_worker:?}"
    );
    eprintln!(
        "connections per worker {per_worker:?}; test took {:?}",
        started.elapsed()
    );
}

#[test]
fn six_replicas_each_route_admits_its_limit_and_the_key_wide_caps_the_sum() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    // "deny": a store failure shows as a 503, never as an admission.
    let config =
        plugin_config(r#", "failure_mode": "deny", "store": {"webdis": {"timeout_ms": 5000}}"#);
    let replicas = Replicas::start(Mode::Global, 6, 1, Some(&config));
    let answers = run(&replicas.addr());
    let envoys: Vec<&Envoy> = replicas.replicas.iter().collect();
    let more = ["store_errors", "backend_calls", "backend_cache_hits"];
    let more = check(&answers, &envoys, &more);
    let (store_errors, calls, cache_hits) = (more[0], more[1], more[2]);
    assert_eq!(store_errors, 0);
    let per_replica = replicas.requests_per_replica();
    assert!(per_replica.iter().all(|n| *n >= 10), "{per_replica:?}");
    eprintln!(
        "requests per replica {per_replica:?}; backend calls {calls}, denied from the cache \
         {cache_hits}; test took {:?}",
        started.elapsed()
    );
}

/// A cached denial names the binding limit, on two replicas
/// addressed directly. Through replica 0, create-order is spent (4
/// admitted, the 5th denied by Redis: replica 0's cache learns it spent).
/// Through replica 1, plain requests spend the key-wide limit (8 admitted,
/// the 9th denied: replica 1's cache learns only that one spent). Then
/// `POST /orders` through each: Redis would deny it on both limits and name
/// create-order, whose wait (15 s less the run so far) is the longer one.
/// Replica 1's cache, which never saw create-order spent, denies it on the
/// key-wide limit alone (Retry-After at most that limit's 5 s interval,
/// `RateLimit` saying create-order has all 4 left): a client that waits
/// that long is denied again.
#[test]
fn a_cached_denial_names_the_binding_limit_across_replicas() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let config =
        plugin_config(r#", "failure_mode": "deny", "store": {"webdis": {"timeout_ms": 5000}}"#);
    let replicas = Replicas::start(Mode::Global, 2, 1, Some(&config));
    let saw_create_order = replicas.replicas[0].addr();
    let saw_key_wide = replicas.replicas[1].addr();
    let started = Instant::now();
    let statuses = |addr: &str, route: Route, count: usize| -> Vec<u16> {
        (0..count).map(|n| send(addr, 0, route, n).status).collect()
    };
    assert_eq!(
        statuses(&saw_create_order, Route::CreateOrder, 5),
        [200, 200, 200, 200, 429]
    );
    let mut plain = vec![200; 8];
    plain.push(429);
    assert_eq!(statuses(&saw_key_wide, Route::Plain, 9), plain);
    let through_0 = send(&saw_create_order, 0, Route::CreateOrder, 0);
    let through_1 = send(&saw_key_wide, 0, Route::CreateOrder, 0);
    let took = started.elapsed();
    assert!(
        took < SHORTEST_INTERVAL,
        "the run took {took:?}: too slow for the waits argued above (needs < {SHORTEST_INTERVAL:?})"
    );
    for answer in [&through_0, &through_1] {
        assert_eq!(answer.status, 429, "{answer}");
        assert_eq!(answer.limit().as_deref(), Some(CREATE_ORDER), "{answer}");
        assert_eq!(answer.remaining.get(CREATE_ORDER), Some(&0), "{answer}");
        // The key-wide limit's wait is at most its 5 s; create-order's more.
        assert!(answer.retry_after.is_some_and(|s| s > 5), "{answer}");
    }
}
