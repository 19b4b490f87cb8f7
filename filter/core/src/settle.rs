//! Cost settled from the response (`"settle"` on a rule): the rule's cost
//! is an estimate, reserved when the request arrives; the response says
//! what the request really cost (a header, a trailer, or a field of a JSON
//! body), and the difference is settled on the rule's limits: unused
//! reservation refunded, extra charged as debt. So overshoot is bounded by
//! the estimate error of the requests in flight, not by how many there are
//! (`docs/design.md#cost-settled-from-the-response`).
//!
//! A response that never says (a client abort, an upstream error without
//! the value, a malformed value) keeps the reservation: the estimate is
//! what the request cost. Each case is counted ([`Outcome`]).

use crate::applied::{Applied, LimitRef};
use crate::config::{ConfigError, SettleConfig};
use crate::gcra::{Clock, Limit};
use crate::header_map::HeaderMap;
use crate::key::RequestHeaders;
use crate::per_limit::PerLimit;
use crate::policy::rules::MAX_COST;
use crate::policy::Policy;
use crate::quota;
use crate::rate::MAX_CAPACITY_NANOS;

pub mod body;
pub mod redis;

/// A JSON body (or one event of a stream) read by default, and at most.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024;
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;
/// A charge never puts a rate's TAT further than this past `now` (the
/// longest capacity either store computes exactly, 50 years).
pub const MAX_DEBT_NANOS: u64 = MAX_CAPACITY_NANOS;
/// Nesting of a `json` path, at most.
const MAX_PATH_DEPTH: usize = 8;

/// Where a rule's real cost is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A response header (lower case).
    Header(String),
    /// A response trailer (lower case).
    Trailer(String),
    /// A numeric field of a JSON body, by its path of object keys; in a
    /// `text/event-stream`, the last `data:` event carrying it.
    Json {
        path: Vec<String>,
        max_body_bytes: usize,
    },
}

/// Compiles rule `field`'s `settle`.
pub fn compile(field: &str, config: &SettleConfig) -> Result<Source, ConfigError> {
    let at = format!("{field}.settle");
    let given = [&config.header, &config.trailer, &config.json]
        .iter()
        .filter(|f| f.is_some())
        .count();
    if given != 1 {
        return Err(ConfigError::new(
            at,
            "give exactly one of \"header\", \"trailer\" and \"json\"",
        ));
    }
    if config.max_body_bytes.is_some() && config.json.is_none() {
        return Err(ConfigError::new(
            format!("{at}.max_body_bytes"),
            "applies only with \"json\"",
        ));
    }
    let header_name = |what: &str, name: &str| {
        if crate::policy::rules::is_header_name(name) {
            Ok(name.to_ascii_lowercase())
        } else {
            Err(ConfigError::new(
                format!("{at}.{what}"),
                format!("\"{name}\" is not a valid header name"),
            ))
        }
    };
    if let Some(name) = &config.header {
        return header_name("header", name).map(Source::Header);
    }
    if let Some(name) = &config.trailer {
        return header_name("trailer", name).map(Source::Trailer);
    }
    let json = config.json.as_deref().unwrap_or_default();
    let path: Vec<String> = json.split('.').map(str::to_string).collect();
    if json.is_empty() || path.iter().any(String::is_empty) || path.len() > MAX_PATH_DEPTH {
        return Err(ConfigError::new(
            format!("{at}.json"),
            format!(
                "\"{json}\" must be a dotted path of 1 to {MAX_PATH_DEPTH} object keys, such as \"usage.total_tokens\""
            ),
        ));
    }
    let max = config.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if !(1..=MAX_BODY_BYTES).contains(&max) {
        return Err(ConfigError::new(
            format!("{at}.max_body_bytes"),
            format!("must be from 1 to {MAX_BODY_BYTES}, got {max}"),
        ));
    }
    Ok(Source::Json {
        path,
        max_body_bytes: usize::try_from(max).unwrap_or(usize::MAX),
    })
}

/// What the response said of a request's real cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A whole number from 0 to [`MAX_COST`].
    Value(u64),
    /// There, but not such a number (or given twice, or past the body bound).
    Malformed,
    /// Not there.
    Missing,
}

/// A header's or trailer's value as a cost: plain ASCII digits, optional
/// surrounding spaces.
pub fn parse_value(value: &[u8]) -> Observed {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Observed::Malformed;
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
        .filter(|v| *v <= MAX_COST)
        .map_or(Observed::Malformed, Observed::Value)
}

/// A response header's or trailer's value, from the map the host
/// serialized (`None`: it could not be read, so nothing is there); given
/// twice is malformed (which one would count?).
pub fn observe_header(headers: Option<&HeaderMap<'_>>, name: &str) -> Observed {
    let Some(headers) = headers else {
        return Observed::Missing;
    };
    match headers.single(name.as_bytes()) {
        Ok(Some(value)) => parse_value(value),
        Ok(None) => Observed::Missing,
        Err(_) => Observed::Malformed,
    }
}

/// How a request's settlement ended; each is counted
/// (`settle_<metric_name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The value was the estimate: nothing to do.
    Exact,
    /// Less than the estimate: this much given back.
    Refund(u64),
    /// More than the estimate: this much charged as debt.
    Charge(u64),
    /// The response ended without the value: the reservation stays.
    Missing,
    /// The value was there but unreadable: the reservation stays.
    Malformed,
    /// The stream ended before the response did (client abort, upstream
    /// reset): the reservation stays.
    Aborted,
}

impl Outcome {
    /// Every outcome's metric name, in a fixed order ([`Outcome::index`]).
    pub const NAMES: [&'static str; 6] = [
        "settle_exact",
        "settle_refunded",
        "settle_charged",
        "settle_missing",
        "settle_malformed",
        "settle_aborted",
    ];

    pub fn index(self) -> usize {
        match self {
            Outcome::Exact => 0,
            Outcome::Refund(_) => 1,
            Outcome::Charge(_) => 2,
            Outcome::Missing => 3,
            Outcome::Malformed => 4,
            Outcome::Aborted => 5,
        }
    }

    /// The outcome of a reservation of `estimate` once the response said
    /// `observed`.
    pub fn of(estimate: u64, observed: Observed) -> Outcome {
        match observed {
            Observed::Missing => Outcome::Missing,
            Observed::Malformed => Outcome::Malformed,
            Observed::Value(v) if v == estimate => Outcome::Exact,
            Observed::Value(v) if v < estimate => Outcome::Refund(estimate - v),
            Observed::Value(v) => Outcome::Charge(v - estimate),
        }
    }

    /// The change to the store, if any.
    pub fn adjust(self) -> Option<Adjust> {
        match self {
            Outcome::Refund(n) => Some(Adjust::Refund(n)),
            Outcome::Charge(n) => Some(Adjust::Charge(n)),
            _ => None,
        }
    }
}

/// A change to a key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adjust {
    /// `n` units given back: a rate's debt less `n` intervals, never below
    /// a full bucket; a quota's used count less `n`, never below 0.
    Refund(u64),
    /// `n` units charged, admitted or not: a rate's TAT `n` intervals
    /// later (at most [`MAX_DEBT_NANOS`] past `now`); a quota's used count
    /// `n` more in its current period (past its count: spent until reset).
    Charge(u64),
}

/// The value stored for `limit` after `adjust` at `clock` (a rate's TAT,
/// or a quota's packed value; 0 is a fresh state). The same arithmetic as
/// `adjusted` in `gcra.lua`.
pub fn apply(adjust: Adjust, limit: &Limit, value: u64, clock: Clock) -> u64 {
    let now = clock.now;
    let Some(period) = &limit.period else {
        return match adjust {
            Adjust::Refund(_) if value <= now => value,
            Adjust::Refund(n) => value
                .saturating_sub(limit.interval_nanos.saturating_mul(n))
                .max(now),
            Adjust::Charge(n) => value
                .max(now)
                .saturating_add(limit.interval_nanos.saturating_mul(n))
                .min(now.saturating_add(MAX_DEBT_NANOS)),
        };
    };
    let reading = quota::read(period, value, clock);
    if reading.unplaced {
        return value;
    }
    match adjust {
        Adjust::Refund(_) if reading.used == 0 => value,
        Adjust::Refund(n) => quota::pack(reading.store_end, reading.used.saturating_sub(n), true),
        Adjust::Charge(n) => quota::pack(reading.store_end, reading.used.saturating_add(n), true),
    }
}

/// One settling rule a request matched: what it reserved, and where the
/// response says what it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// The rule's index in the policy.
    pub rule: usize,
    /// The rule's cost for this request, reserved on its limits.
    pub estimate: u64,
}

impl Reserved {
    /// The source of this rule's real cost.
    pub fn source<'p>(&self, policy: &'p Policy) -> Option<&'p Source> {
        policy.rules.get(self.rule)?.settle.as_ref()
    }

    /// The rule's limits, each costing 1 (the unit of a settlement).
    pub fn limits(&self, policy: &Policy) -> PerLimit<Limit> {
        policy.rule_units(self.rule)
    }
}

/// The settling rules an admitted request matched, in rule order (empty
/// for most requests: no allocation then), with the cost each reserved.
pub fn reserved(policy: &Policy, applied: &Applied) -> Vec<Reserved> {
    if applied.rules & policy.settling_rules() == 0 {
        return Vec::new();
    }
    settling_spans(policy, applied)
        .filter_map(|(rule, refs)| {
            refs.first().map(|first| Reserved {
                rule,
                estimate: u64::from(first.cost),
            })
        })
        .collect()
}

/// `applied` without the limits of the rules that settle from the response
/// (itself when none matched).
pub fn without_settled(policy: &Policy, applied: &Applied) -> Applied {
    if applied.rules & policy.settling_rules() == 0 {
        return *applied;
    }
    let settled: PerLimit<LimitRef> = settling_spans(policy, applied)
        .flat_map(|(_, refs)| refs.iter().copied())
        .collect();
    Applied {
        limits: applied
            .limits
            .iter()
            .filter(|r| !settled.iter().any(|s| s.instance == r.instance))
            .copied()
            .collect(),
        ..*applied
    }
}

/// Each matched settling rule and its limits in `applied`, which lists the
/// plan's limits (if any), then each matched rule's in rule order: the
/// rules' limits are its tail.
fn settling_spans<'a>(
    policy: &'a Policy,
    applied: &'a Applied,
) -> impl Iterator<Item = (usize, &'a [LimitRef])> + 'a {
    let refs = applied.limits.as_slice();
    let matched: usize = applied
        .matched_rules()
        .map(|i| policy.rule_limit_count(i))
        .sum();
    let mut at = refs.len().checked_sub(matched);
    applied.matched_rules().filter_map(move |rule| {
        let start = at?;
        let end = start + policy.rule_limit_count(rule);
        at = Some(end);
        let settles = policy.rules.get(rule).is_some_and(|r| r.settle.is_some());
        settles.then(|| (rule, refs.get(start..end).unwrap_or_default()))
    })
}

#[cfg(test)]
mod tests;
