//! The settlement setups (issue 13): a rule whose cost is an estimate
//! settled from the response's `x-usage-tokens` header, beside the same
//! rule with a fixed cost, in global and local mode, all four in one block,
//! on the upstream's `/metered?tokens=120&via=header` (upstream route only).
//!
//! Every request reserves 300 tokens and reports 120, so every admitted
//! request settles with a refund of 180; the rule's quota (10⁹ tokens a
//! day, one fresh key per run) and the plan's rate are never reached.
//!
//! Global mode's settlement lag, measured under the load: every
//! [`PROBE_EVERY`] a probe sends one request of a key of its own and, from
//! the moment its response is read, reads that key's quota field straight
//! from Redis (as the admin user: not through Envoy, whose counters and
//! batches the reads would disturb) until it shows the refund.
//!
//! After the load, the run's key is read until it has not changed for
//! [`QUIET`]: its last change says how long the state took to take in what
//! the load left in flight, and its final state must be what the counters
//! say (every refund landed, none twice).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::backend::{Redis, ADMIN_USER};
use e2e::http::Conn;
use e2e::topology::Mode;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::report::Row;
use crate::setups::Route;

/// What each request reserves (the rule's `cost`) and what the upstream
/// reports: every response refunds the difference.
pub const ESTIMATE: u64 = 300;
pub const REPORTED: u64 = 120;
/// The rule's quota: a run of 4 s at 25,000 req/s reserves 3·10⁷.
const QUOTA: u64 = 1_000_000_000;
const LIMIT_NAME: &str = "tokens";
/// Under the Redis ACL's key pattern (`envoy/redis-acl.conf`).
const KEY_PREFIX: &str = "apikey_ratelimit:bench:";

/// Each setup that settles, and the fixed-cost setup it is compared with.
pub const PAIRS: [(&str, &str); 2] = [
    ("global-settle", "global-fixed"),
    ("local-settle", "local-fixed"),
];

/// Whether setup `id` settles from the response.
pub fn settles(id: &str) -> bool {
    PAIRS.iter().any(|(s, _)| *s == id)
}

/// The aims: settling from the response keeps at least this share of the
/// fixed cost's throughput, and a p99 at most this multiple of its p99,
/// measured in the same block; no settlement lost (`settle_failed` 0).
pub const MIN_VS_FIXED: f64 = 0.90;
pub const MAX_P99_VS_FIXED: f64 = 1.25;

/// How long the quota field must stay unchanged before the drain is over:
/// longer than the webdis timeout (1 s), within which a settlement call
/// either lands or fails (counted).
const QUIET: Duration = Duration::from_millis(1500);
/// A probe's request every so often, during the load.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A probe's refund not seen in Redis within this is counted as not seen.
const PROBE_LIMIT: Duration = Duration::from_secs(2);
/// How often a probe reads its key in Redis.
const PROBE_POLL: Duration = Duration::from_micros(200);

/// The drain is given up on after this long (then reported as not quiet).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(1);

/// The counters a settlement run reads, besides the usual ones.
pub const COUNTERS: [&str; 9] = [
    "settle_exact",
    "settle_refunded",
    "settle_charged",
    "settle_missing",
    "settle_malformed",
    "settle_aborted",
    "settle_failed",
    "settle_calls",
    "backend_requests_gone",
];

/// The plugin configuration: the plan's rate and the rule never reached;
/// with `settle`, the rule's cost is an estimate settled from the header.
pub fn config(mode: Mode, settle: bool) -> &'static str {
    static CONFIGS: [OnceLock<String>; 4] = [const { OnceLock::new() }; 4];
    let slot = usize::from(mode == Mode::Global) * 2 + usize::from(settle);
    CONFIGS
        .get(slot)
        .map_or("", |c| c.get_or_init(|| build(mode, settle)))
}

fn build(mode: Mode, settle: bool) -> String {
    let mut rule = json!({
        "name": "chat",
        "match": {"path_prefix": "/metered"},
        "limits": [{"quota": format!("{QUOTA}/day"), "reset": "calendar", "name": LIMIT_NAME}],
        "cost": ESTIMATE,
    });
    if settle {
        rule["settle"] = json!({"header": "x-usage-tokens"});
    }
    let mut config = json!({"limits": ["1000000/s"], "rules": [rule]});
    if mode == Mode::Global {
        config["store"] = json!({"webdis": {"timeout_ms": 1000, "key_prefix": KEY_PREFIX}});
    }
    config.to_string()
}

/// A run's request: a key of its own (the quota starts empty), usage
/// reported in a header.
pub fn target(key: &str) -> String {
    format!("/metered?tokens={REPORTED}&via=header&api_key={key}")
}

/// The key of a setup's run.
pub fn run_key(setup: &str, repeat: usize) -> String {
    format!("{setup}-{repeat}")
}

/// What a settlement run counted, its probes and its drain.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counted {
    /// Global mode's probes: each one's lag from its response to its
    /// refund in Redis, in ms (`None`: not seen within [`PROBE_LIMIT`]).
    pub probe_lags_ms: Vec<Option<f64>>,
    /// Settled, by direction (all refunds here).
    pub settled: u64,
    /// Reservations kept: no value, an unreadable one, or the stream gone.
    pub kept: u64,
    pub failed: u64,
    /// Global mode's settlement calls.
    pub calls: u64,
    /// Requests whose client left before their decision (some of them
    /// while it was in a call: reserved, never settled).
    pub gone: u64,
    pub drain: Option<Drain>,
}

impl Counted {
    /// From [`COUNTERS`], read in that order.
    pub fn from_counters(read: &[Option<u64>]) -> Counted {
        let n = |i: usize| read.get(i).copied().flatten().unwrap_or(0);
        Counted {
            settled: n(0) + n(1) + n(2),
            kept: n(3) + n(4) + n(5),
            failed: n(6),
            calls: n(7),
            gone: n(8),
            probe_lags_ms: Vec::new(),
            drain: None,
        }
    }
}

/// The quota field's changes after the load stopped.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Drain {
    /// From wrk's exit to the last change: the state had taken in all of
    /// the run by then (the first read's time when it never changed).
    pub ms: f64,
    /// The first read's time: the resolution of `ms`.
    pub first_read_ms: f64,
    /// Tokens used at the first read and at the end.
    pub used_first: u64,
    pub used_final: u64,
    /// It stayed unchanged for [`QUIET`] within [`DRAIN_LIMIT`].
    pub quiet: bool,
    /// The final state is what the counters say: settled requests at 120,
    /// kept ones and lost refunds at 300, and at most `gone` more at 300.
    pub agrees: bool,
}

/// Until `stop`, a probe every [`PROBE_EVERY`] (the first after one):
/// its lags, in ms.
pub fn probe(
    addr: &str,
    redis: &Redis,
    run_key: &str,
    stop: &AtomicBool,
) -> Result<Vec<Option<f64>>, String> {
    let mut conn = RedisConn::admin(redis)?;
    let mut lags = Vec::new();
    let mut next = Instant::now() + PROBE_EVERY;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        next += PROBE_EVERY;
        let key = format!("{run_key}-probe-{}", lags.len());
        let response = Conn::connect(addr)
            .and_then(|mut c| {
                c.request("GET", target(&key).as_bytes(), &[("Connection", b"close")])
            })
            .map_err(|e| format!("probe: {e}"))?;
        let answered = Instant::now();
        if response.status != 200 {
            return Err(format!("probe: {response:?}"));
        }
        let (redis_key, field) = (redis_key(&key), quota_field());
        let lag = loop {
            let value = conn.hget(&redis_key, &field)?;
            // Reads of the field before the reservation landed show 0.
            if used(value) == REPORTED {
                break Some(answered.elapsed().as_secs_f64() * 1000.0);
            }
            if answered.elapsed() > PROBE_LIMIT {
                break None;
            }
            std::thread::sleep(PROBE_POLL);
        };
        lags.push(lag);
    }
    Ok(lags)
}

fn quota_field() -> String {
    format!("quota#{LIMIT_NAME}")
}

/// Reads `key`'s quota field until it stays unchanged for [`QUIET`].
pub fn drain(redis: &Redis, key: &str, stopped: Instant) -> Result<Drain, String> {
    let mut conn = RedisConn::admin(redis)?;
    let field = quota_field();
    let redis_key = redis_key(key);
    let mut first: Option<(f64, u64)> = None;
    let mut last = (0.0, 0);
    let mut changed = Instant::now();
    let quiet = loop {
        let value = conn.hget(&redis_key, &field)?;
        let at = stopped.elapsed().as_secs_f64() * 1000.0;
        let used = used(value);
        if first.is_none() {
            first = Some((at, used));
            last = (at, used);
        } else if used != last.1 {
            last = (at, used);
            changed = Instant::now();
        }
        if changed.elapsed() >= QUIET {
            break true;
        }
        if stopped.elapsed() >= DRAIN_LIMIT {
            break false;
        }
        std::thread::sleep(POLL);
    };
    let (first_read_ms, used_first) = first.unwrap_or_default();
    Ok(Drain {
        ms: last.0,
        first_read_ms,
        used_first,
        used_final: last.1,
        quiet,
        agrees: false,
    })
}

impl Counted {
    /// Requests of the load settled: the probes' are counted too.
    pub fn settled_by_load(&self) -> u64 {
        let probes = u64::try_from(self.probe_lags_ms.len()).unwrap_or(0);
        self.settled.saturating_sub(probes)
    }
}

/// Whether the run key's `used` tokens are what the counters account for.
pub fn agrees(used: u64, counted: &Counted) -> bool {
    let accounted = counted.settled_by_load() * REPORTED
        + counted.kept * ESTIMATE
        + counted.failed * (ESTIMATE - REPORTED);
    used >= accounted
        && (used - accounted) % ESTIMATE == 0
        && (used - accounted) / ESTIMATE <= counted.gone
}

/// A quota field holds its period's end plus what was used in it, in µs
/// (`gcra.lua`); the period is today (UTC). A missing field: nothing used.
fn used(value: Option<u64>) -> u64 {
    let day = 86_400;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let end_us = (now / day + 1) * day * 1_000_000;
    value.map_or(0, |v| v.saturating_sub(end_us))
}

fn redis_key(key: &str) -> String {
    let mut out = String::from(KEY_PREFIX);
    for b in Sha256::digest(key.as_bytes()) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The least of a Redis client: AUTH, then HGETs.
struct RedisConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RedisConn {
    fn admin(redis: &Redis) -> Result<RedisConn, String> {
        let stream =
            TcpStream::connect(("127.0.0.1", redis.port())).map_err(|e| format!("redis: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut conn = RedisConn {
            reader: BufReader::new(stream),
            writer,
        };
        let line = conn.call(&["AUTH", ADMIN_USER, redis.admin_password()])?;
        if line != "+OK" {
            return Err(format!("redis AUTH: {line}"));
        }
        Ok(conn)
    }

    fn hget(&mut self, key: &str, field: &str) -> Result<Option<u64>, String> {
        let line = self.call(&["HGET", key, field])?;
        let Some(len) = line.strip_prefix('$') else {
            return Err(format!("redis HGET: {line}"));
        };
        if len == "-1" {
            return Ok(None);
        }
        let mut value = String::new();
        self.reader
            .read_line(&mut value)
            .map_err(|e| format!("redis: {e}"))?;
        value
            .trim_end()
            .parse()
            .map(Some)
            .map_err(|_| format!("redis HGET: not a number: {value}"))
    }

    /// Sends a command, returns the reply's first line.
    fn call(&mut self, args: &[&str]) -> Result<String, String> {
        let mut command = format!("*{}\r\n", args.len());
        for arg in args {
            let _ = write!(command, "${}\r\n{arg}\r\n", arg.len());
        }
        self.writer
            .write_all(command.as_bytes())
            .map_err(|e| format!("redis: {e}"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(line.trim_end().to_string())
    }
}

/// Each settling setup beside its fixed-cost one, then one line per pair
/// against the aims.
pub fn table(rows: &[Row]) -> String {
    let route = Route::Upstream;
    let row = |id: &str| rows.iter().find(|r| r.setup == id && r.route == route);
    let pairs: Vec<(&Row, &Row)> = PAIRS
        .iter()
        .filter_map(|(settle, fixed)| Some((row(settle)?, row(fixed)?)))
        .collect();
    if pairs.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n**Cost settled from the response against a fixed cost, route: upstream** (`{}`, estimate {ESTIMATE}: every request refunds {}; measured in the same block)\n\n",
        target("KEY"),
        ESTIMATE - REPORTED
    );
    out.push_str("| setup | against | × it (rounds' range) | p50 ms (it) | p99 ms (it) | Envoy CPU µs/req (+ over it) | webdis+Redis CPU µs/req (it) | backend calls / req (it) | settle calls / req | entries / settle call | settled / req | settle_failed | lag ms, median (max) of probes | drain after wrk's exit ms, median (max) | Redis state = counters |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut targets = String::new();
    let optional =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for (settle, fixed) in pairs {
        let ratio = settle.vs_beside.unwrap_or(0.0);
        let (low, high) = settle.vs_beside_range.unwrap_or((0.0, 0.0));
        let failed = settle.settle_failed.unwrap_or(0);
        let lag = match (
            settle.settle_lag_ms,
            settle.settle_lag_max_ms,
            settle.settle_probes,
        ) {
            (Some(median), Some(max), Some((probes, unseen))) => {
                format!("{median:.2} ({max:.2}) of {probes}, {unseen} unseen")
            }
            _ => "–".to_string(),
        };
        let agrees = settle
            .settle_state_agrees
            .map_or("–", |a| if a { "yes" } else { "no" });
        let _ = writeln!(
            out,
            "| {} | {} | {ratio:.2} ({low:.2}–{high:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.1} ({:+.1}) | {} ({}) | {} ({}) | {} | {} | {} | {failed} | {lag} | {} | {agrees} |",
            settle.title,
            fixed.setup,
            settle.p50_ms,
            fixed.p50_ms,
            settle.p99_ms,
            fixed.p99_ms,
            settle.cpu_us,
            settle.cpu_us_over_beside.unwrap_or(0.0),
            optional(settle.backend_cpu_us_per_request, 1),
            optional(fixed.backend_cpu_us_per_request, 1),
            optional(settle.backend_calls_per_request, 4),
            optional(fixed.backend_calls_per_request, 4),
            optional(settle.settle_calls_per_request, 4),
            optional(settle.settle_entries_per_call, 1),
            optional(settle.settled_per_request, 3),
            settle
                .settle_drain_ms
                .map_or("–".to_string(), |(m, x)| format!("{m:.1} ({x:.1})")),
        );
        let p99_ratio = settle.p99_ms / fixed.p99_ms.max(1e-9);
        let met = ratio >= MIN_VS_FIXED && p99_ratio <= MAX_P99_VS_FIXED && failed == 0;
        let _ = writeln!(
            targets,
            "- {}: {} at {ratio:.2}× {} (aim ≥ {MIN_VS_FIXED:.2}), p99 {:.2} ms = {p99_ratio:.2}× its {:.2} ms (aim ≤ {MAX_P99_VS_FIXED}×), settle_failed {failed} (aim 0): {}",
            route.name(),
            settle.title,
            fixed.setup,
            settle.p99_ms,
            fixed.p99_ms,
            if met { "met" } else { "missed" }
        );
    }
    out.push_str(
        "\nsettle calls / req: `settle_calls` over the requests wrk completed; entries / settle call: settled requests (`settle_exact` + `_refunded` + `_charged`) over `settle_calls`; lag: global mode's probes during the load (one request of a key of its own every 250 ms), from its response read to its refund seen in Redis (read every 0.2 ms), median and max over all runs; drain: from wrk's exit to the last change of the run's key in Redis (read every ms until unchanged for 1.5 s; the first read's time if it never changed); Redis state = counters: that key's final state is what the settle counters account for, in every run. Local mode settles in the response's own callback: no lag.\n",
    );
    out.push_str("\n**Cost settled from the response: targets (ratios from this run)**\n\n");
    out.push_str(&targets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratelimit_core::Policy;

    #[test]
    fn the_configs_load_and_differ_only_in_settle_and_store() {
        for mode in [Mode::Local, Mode::Global] {
            for settle in [false, true] {
                let policy = Policy::from_json(config(mode, settle).as_bytes()).unwrap();
                assert_eq!(policy.rules.len(), 1);
            }
            let fixed = config(mode, false);
            let settling = config(mode, true);
            assert_eq!(
                settling.replace(r#","settle":{"header":"x-usage-tokens"}"#, ""),
                fixed
            );
        }
        assert!(config(Mode::Global, true).contains(r#""key_prefix":"apikey_ratelimit:bench:""#));
        assert!(!config(Mode::Local, true).contains("store"));
    }

    #[test]
    fn the_redis_key_is_the_filter_s() {
        assert_eq!(
            redis_key("k"),
            ratelimit_core::webdis::redis_key(KEY_PREFIX, None, b"k")
        );
    }

    #[test]
    fn the_state_agrees_with_the_counters_up_to_the_requests_gone_mid_call() {
        let counted = Counted {
            settled: 10,
            kept: 2,
            failed: 1,
            gone: 3,
            ..Counted::default()
        };
        let accounted = 10 * REPORTED + 2 * ESTIMATE + (ESTIMATE - REPORTED);
        assert!(agrees(accounted, &counted));
        // Two of the ten settled were probes, on keys of their own.
        let probed = Counted {
            probe_lags_ms: vec![Some(0.5), None],
            ..counted.clone()
        };
        assert!(agrees(accounted - 2 * REPORTED, &probed));
        assert!(!agrees(accounted, &probed));
        assert!(agrees(accounted + 3 * ESTIMATE, &counted));
        assert!(!agrees(accounted + 4 * ESTIMATE, &counted));
        assert!(!agrees(accounted + REPORTED, &counted));
        assert!(!agrees(accounted - 1, &counted));
    }
}
