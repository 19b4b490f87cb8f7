//! What the filter answers: DRF's 429 wording, the quota headers, and the
//! JSON bodies for a missing key, a bad key and an unavailable backend.
//!
//! - 429: `{"detail":"Request was throttled. Expected available in N seconds."}`
//!   (singular for 1) and `Retry-After: N`, N in whole seconds rounded up.
//! - Quota headers (IETF draft-ietf-httpapi-ratelimit-headers), on by
//!   default: `RateLimit-Policy: "1/s";q=1;w=1` and `RateLimit: "1/s";r=0;t=1`,
//!   one list member per limit. `r` is what may still be sent now, `t` the
//!   seconds until the quota is whole again (a calendar quota: until its
//!   period ends; its `w` is the current period's length). `r` never exceeds `q`: with a
//!   burst above the count (`{"rate": "10/min", "burst": 49}`) the bucket
//!   may hold more than `q`, and the header then says `q` rather than
//!   contradict the policy it names.
//! - Legacy `X-RateLimit-Limit/Remaining/Reset`, opt-in, describe the most
//!   restrictive limit (fewest remaining).
//! - gRPC: every reply also names its gRPC status ([`LocalReply::grpc_status`]).
//!   Envoy uses it only for a gRPC request (it tells those by their content
//!   type) and answers trailers-only, with the body as `grpc-message` and
//!   the headers above beside `grpc-status`. Without it, Envoy would map the
//!   429 to `UNAVAILABLE`, which gRPC clients retry at once.

use std::fmt::Write;

use crate::config::ResponseHeadersConfig;
use crate::gcra::{Decision, Limit, LimitState};
use crate::key::{KeyError, KeyErrorKind, KeySource};
use crate::policy::rules::{Cost, CostError};
use crate::policy::{Policy, RequestError};
use crate::time::ceil_seconds;

const JSON: (&str, &str) = ("content-type", "application/json");

/// A response the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl LocalReply {
    /// The gRPC status of this reply for a gRPC request (`-1`: let Envoy map
    /// the HTTP status): throttled is `RESOURCE_EXHAUSTED` (8), a missing key
    /// `UNAUTHENTICATED` (16), a bad key `INVALID_ARGUMENT` (3), and an
    /// unavailable store `UNAVAILABLE` (14).
    pub fn grpc_status(&self) -> i32 {
        match self.status {
            429 => 8,
            401 => 16,
            400 => 3,
            503 => 14,
            _ => -1,
        }
    }
}

/// Writes `RateLimit-Policy` for the limits that applied into `out`; `w`
/// is each limit's window as its state says (a quota's current period:
/// `w=2592000` in a month of 30 days).
pub fn write_policy_header(out: &mut String, limits: &[Limit], states: &[LimitState]) {
    for (i, (limit, state)) in limits.iter().zip(states).enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(
            out,
            "{sep}\"{}\";q={};w={}",
            limit.name, limit.rate.count, state.window_seconds
        );
    }
}

/// Writes the quota headers of a decision, as configured, through `emit`;
/// values are formatted in `buf`, reused from header to header. Nothing is
/// written when the decision carries no per-limit state (no limits, or the
/// store could not decide).
pub fn write_quota_headers(
    headers: &ResponseHeadersConfig,
    limits: &[Limit],
    decision: &Decision,
    buf: &mut String,
    mut emit: impl FnMut(&'static str, &str),
) {
    let states = decision.states();
    if states.is_empty() {
        return;
    }
    if headers.ratelimit {
        buf.clear();
        write_policy_header(buf, limits, states);
        emit("ratelimit-policy", buf);
        buf.clear();
        for (i, (limit, state)) in limits.iter().zip(states).enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(
                buf,
                "{sep}\"{}\";r={};t={}",
                limit.name,
                shown_remaining(limit, state.remaining),
                ceil_seconds(state.reset_nanos)
            );
        }
        emit("ratelimit", buf);
    }
    if headers.x_ratelimit {
        let tightest = limits
            .iter()
            .zip(states)
            .min_by_key(|(_, s)| (s.remaining, std::cmp::Reverse(s.reset_nanos)));
        if let Some((limit, state)) = tightest {
            let mut number = |name, value: u64| {
                buf.clear();
                let _ = write!(buf, "{value}");
                emit(name, buf);
            };
            number("x-ratelimit-limit", limit.rate.count);
            number(
                "x-ratelimit-remaining",
                shown_remaining(limit, state.remaining),
            );
            number("x-ratelimit-reset", ceil_seconds(state.reset_nanos));
        }
    }
}

/// What a header reports as remaining: never more than the limit's count,
/// the quota the policy header announces.
fn shown_remaining(limit: &Limit, remaining: u64) -> u64 {
    remaining.min(limit.rate.count)
}

/// The quota headers of a decision, collected (for local replies).
pub fn quota_headers(
    headers: &ResponseHeadersConfig,
    limits: &[Limit],
    decision: &Decision,
    out: &mut Vec<(&'static str, String)>,
) {
    let mut buf = String::new();
    write_quota_headers(headers, limits, decision, &mut buf, |name, value| {
        out.push((name, value.to_string()));
    });
}

/// 429 Too Many Requests, in DRF's words, naming the limit that denied
/// (its name only, never the key) when one did.
pub fn throttled(
    headers: &ResponseHeadersConfig,
    limits: &[Limit],
    decision: &Decision,
) -> LocalReply {
    let wait = ceil_seconds(decision.retry_after_nanos).max(1);
    let unit = if wait == 1 { "second" } else { "seconds" };
    let mut out = vec![
        (JSON.0, JSON.1.to_string()),
        ("retry-after", wait.to_string()),
    ];
    quota_headers(headers, limits, decision, &mut out);
    let detail = format!("Request was throttled. Expected available in {wait} {unit}.");
    let body = match decision.binding().and_then(|i| limits.get(i)) {
        Some(limit) => {
            serde_json::json!({ "detail": detail, "limit": limit.name.as_str() }).to_string()
        }
        None => serde_json::json!({ "detail": detail }).to_string(),
    };
    LocalReply {
        status: 429,
        headers: out,
        body,
    }
}

/// 200 to the introspection path: the key's quota headers, as a response
/// would carry them, and per limit its quota `q`, window `w` (seconds),
/// what is left and the seconds until it is whole again. Never cached by
/// a proxy: it changes with every request of the key.
pub fn introspection(
    headers: &ResponseHeadersConfig,
    limits: &[Limit],
    decision: &Decision,
) -> LocalReply {
    let mut out = vec![
        (JSON.0, JSON.1.to_string()),
        ("cache-control", "no-store".to_string()),
    ];
    quota_headers(headers, limits, decision, &mut out);
    let listed: Vec<serde_json::Value> = limits
        .iter()
        .zip(decision.states())
        .map(|(limit, state)| {
            serde_json::json!({
                "name": limit.name.as_str(),
                "quota": limit.rate.count,
                "window": state.window_seconds,
                "remaining": shown_remaining(limit, state.remaining),
                "reset": ceil_seconds(state.reset_nanos),
            })
        })
        .collect();
    LocalReply {
        status: 200,
        headers: out,
        body: serde_json::json!({ "limits": listed }).to_string(),
    }
}

/// 401 for a key no plan lists (`unknown_keys: reject`): the shape of the
/// missing-key 401.
pub fn unknown_key() -> LocalReply {
    LocalReply {
        status: 401,
        headers: vec![
            (JSON.0, JSON.1.to_string()),
            ("www-authenticate", "ApiKey".to_string()),
        ],
        body: detail("Invalid API key: this key is not registered."),
    }
}

/// 400 for a request the rules cannot charge: a cost that is not a whole
/// number, above its maximum, or that no limit can ever admit; or a path
/// that cannot be read. Nothing was consumed.
pub fn bad_request(policy: &Policy, error: &RequestError) -> LocalReply {
    let rule = |index: usize| policy.rules.get(index).map_or("", |r| r.name.as_str());
    let header = |index: usize| match policy.rules.get(index).map(|r| &r.cost) {
        Some(Cost::Header { name, .. }) => name.as_str(),
        _ => "",
    };
    let message = match error {
        RequestError::BadPath => {
            "Invalid request: the path is not valid percent-encoding.".to_string()
        }
        RequestError::Cost(CostError::Malformed { rule: r }) => format!(
            "Invalid request cost: the {} header must be one whole number from 1 (rule {}).",
            header(*r),
            rule(*r)
        ),
        RequestError::Cost(CostError::AboveMax { rule: r, cost }) => {
            let max = match policy.rules.get(*r).map(|x| &x.cost) {
                Some(Cost::Header { max, .. }) => *max,
                _ => 0,
            };
            format!(
                "Invalid request cost: {cost} is above the most one request may cost, {max} (header {}, rule {}).",
                header(*r),
                rule(*r)
            )
        }
        RequestError::NeverFits { instance, cost } => {
            let limit = policy.instance(*instance);
            let (name, burst) = limit.map_or(("", 0), |l| (l.name.as_str(), l.burst));
            match limit.and_then(|l| l.period) {
                Some(period) => format!(
                    "Request cost {cost} can never be admitted: quota {name} is {burst} per {}.",
                    period.kind.unit()
                ),
                None => format!(
                    "Request cost {cost} can never be admitted: limit {name} admits at most {burst} at once."
                ),
            }
        }
    };
    LocalReply {
        status: 400,
        headers: vec![(JSON.0, JSON.1.to_string())],
        body: detail(&message),
    }
}

/// 401 for a request without a key (`missing_key: reject`).
pub fn missing_key(replies: &Replies) -> LocalReply {
    LocalReply {
        status: 401,
        headers: vec![
            (JSON.0, JSON.1.to_string()),
            ("www-authenticate", "ApiKey".to_string()),
        ],
        body: replies.missing_key.clone(),
    }
}

/// 400 for a key that cannot be used.
pub fn invalid_key(replies: &Replies, error: KeyError) -> LocalReply {
    let body = replies
        .invalid_key(error)
        .map_or_else(|| detail("Invalid API key."), str::to_string);
    LocalReply {
        status: 400,
        headers: vec![(JSON.0, JSON.1.to_string())],
        body,
    }
}

/// A JSON `{"detail": ...}` reply with this status (the admin API's).
pub fn detail_reply(status: u32, message: &str) -> LocalReply {
    LocalReply {
        status,
        headers: vec![(JSON.0, JSON.1.to_string())],
        body: detail(message),
    }
}

/// 503 when the counter store cannot answer and `failure_mode` is `deny`.
pub fn unavailable() -> LocalReply {
    LocalReply {
        status: 503,
        headers: vec![(JSON.0, JSON.1.to_string())],
        body: detail("Rate limiter unavailable. Please retry later."),
    }
}

/// The bodies of the 401 and the 400s, which name the configured key
/// sources: computed once per configuration, one per (source, reason) and
/// one per pair of sources that can disagree.
#[derive(Debug, Clone)]
pub struct Replies {
    missing_key: String,
    per_source: Vec<[String; KeyErrorKind::ALL.len()]>,
    /// Row-major `first * sources + second`.
    conflicts: Vec<String>,
}

impl Replies {
    pub fn new(sources: &[KeySource], max_len: usize) -> Replies {
        let places: Vec<String> = sources.iter().map(KeySource::describe).collect();
        let missing_key = detail(&format!(
            "Authentication credentials were not provided. Send an API key in {}.",
            places.join(" or ")
        ));
        let per_source = sources
            .iter()
            .map(|s| KeyErrorKind::ALL.map(|kind| invalid_key_body(s, kind, max_len)))
            .collect();
        let conflicts = sources
            .iter()
            .flat_map(|first| {
                sources.iter().map(move |second| {
                    detail(&format!(
                        "Invalid API key: {} and {} hold different keys; send the key in one place only.",
                        first.describe(),
                        second.describe()
                    ))
                })
            })
            .collect();
        Replies {
            missing_key,
            per_source,
            conflicts,
        }
    }

    fn invalid_key(&self, error: KeyError) -> Option<&str> {
        match error {
            KeyError::Source { source, kind } => self
                .per_source
                .get(source)
                .and_then(|bodies| bodies.get(kind.index())),
            KeyError::Conflict { first, second } => self.conflicts.get(
                first
                    .checked_mul(self.per_source.len())?
                    .checked_add(second)?,
            ),
        }
        .map(String::as_str)
    }
}

fn invalid_key_body(source: &KeySource, kind: KeyErrorKind, max_len: usize) -> String {
    let place = source.describe();
    let why = match kind {
        KeyErrorKind::Repeated => format!("{place} is given more than once"),
        KeyErrorKind::BadEncoding => format!("{place} is not valid percent-encoding"),
        KeyErrorKind::NotUtf8 => format!("{place} is not valid UTF-8"),
        KeyErrorKind::TooLong => format!("{place} is longer than {max_len} bytes"),
        KeyErrorKind::Semicolon => format!(
            "{place} is next to a ';', which some servers read as a separator (separate parameters with '&', encode ';' as %3B)"
        ),
    };
    detail(&format!("Invalid API key: {why}."))
}

/// `{"detail": "..."}`, compact like DRF's JSON renderer.
fn detail(message: &str) -> String {
    serde_json::json!({ "detail": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcra;
    use crate::testing::{default_limits, policy};

    fn header<'a>(reply: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        reply
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn throttled_reply_uses_drf_wording_and_rounds_up() {
        let p = policy(r#"{"limits": ["1/s"]}"#);
        let set = default_limits(&p);
        let mut tats = [0];
        gcra::decide(&set, &mut tats, 10_000_000_000);
        let d = gcra::decide(&set, &mut tats, 10_100_000_000);
        let reply = throttled(&p.headers, &set, &d);
        assert_eq!(reply.status, 429);
        assert_eq!(
            reply.body,
            r#"{"detail":"Request was throttled. Expected available in 1 second.","limit":"1/s"}"#
        );
        assert_eq!(header(&reply.headers, "retry-after"), Some("1"));
        assert_eq!(
            header(&reply.headers, "content-type"),
            Some("application/json")
        );
        assert_eq!(
            header(&reply.headers, "ratelimit-policy"),
            Some("\"1/s\";q=1;w=1")
        );
        assert_eq!(header(&reply.headers, "ratelimit"), Some("\"1/s\";r=0;t=1"));
        assert_eq!(header(&reply.headers, "x-ratelimit-limit"), None);
    }

    #[test]
    fn each_reply_names_the_grpc_status_clients_expect() {
        let p = policy(r#"{"limits": ["1/s"]}"#);
        let set = default_limits(&p);
        let denied = gcra::Decision::denied_for(1);
        let replies = Replies::new(&[], 16);
        let statuses: Vec<(u32, i32)> = [
            throttled(&p.headers, &set, &denied),
            missing_key(&replies),
            unavailable(),
        ]
        .iter()
        .map(|r| (r.status, r.grpc_status()))
        .collect();
        // RESOURCE_EXHAUSTED, UNAUTHENTICATED, UNAVAILABLE; not UNAVAILABLE
        // for a 429, which gRPC clients would retry at once.
        assert_eq!(statuses, [(429, 8), (401, 16), (503, 14)]);
        let bad = LocalReply {
            status: 400,
            headers: vec![],
            body: String::new(),
        };
        assert_eq!(bad.grpc_status(), 3, "INVALID_ARGUMENT");
    }

    #[test]
    fn plural_seconds_and_several_limits() {
        let p = policy(
            r#"{"limits": ["2/min", {"rate": "100/day", "name": "daily"}],
                "response_headers": {"x_ratelimit": true}}"#,
        );
        let set = default_limits(&p);
        let mut tats = [0, 0];
        let now = 1_000_000_000_000;
        gcra::decide(&set, &mut tats, now);
        gcra::decide(&set, &mut tats, now);
        let d = gcra::decide(&set, &mut tats, now);
        let reply = throttled(&p.headers, &set, &d);
        assert_eq!(
            reply.body,
            r#"{"detail":"Request was throttled. Expected available in 30 seconds.","limit":"2/min"}"#
        );
        assert_eq!(header(&reply.headers, "retry-after"), Some("30"));
        assert_eq!(
            header(&reply.headers, "ratelimit-policy"),
            Some("\"2/min\";q=2;w=60, \"daily\";q=100;w=86400")
        );
        assert_eq!(
            header(&reply.headers, "ratelimit"),
            Some("\"2/min\";r=0;t=60, \"daily\";r=98;t=1728")
        );
        assert_eq!(header(&reply.headers, "x-ratelimit-limit"), Some("2"));
        assert_eq!(header(&reply.headers, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(header(&reply.headers, "x-ratelimit-reset"), Some("60"));
    }

    /// Every member of a parsed SF list: its name and integer parameters.
    fn sf_members(value: &str) -> Vec<(String, std::collections::HashMap<String, i64>)> {
        let list: sfv::List = sfv::Parser::new(value)
            .parse()
            .unwrap_or_else(|e| panic!("{value:?} is not a Structured Fields list: {e}"));
        list.into_iter()
            .map(|entry| {
                let sfv::ListEntry::Item(item) = entry else {
                    panic!("{value:?}: an inner list")
                };
                let name = item.bare_item.as_string().unwrap().as_str().to_string();
                let params = item
                    .params
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.as_integer().unwrap().into()))
                    .collect();
                (name, params)
            })
            .collect()
    }

    #[test]
    fn quota_headers_agree_with_their_policy_for_every_burst() {
        for burst in [1u64, 2, 9, 10, 11, 49, 500] {
            let p = policy(&format!(
                r#"{{"limits": [{{"rate": "10/min", "burst": {burst}}}, "1000/day"]}}"#
            ));
            let set = default_limits(&p);
            let mut tats = [0, 0];
            for step in 0..(burst + 2) {
                let d = gcra::decide(&set, &mut tats, 1_000 + step);
                let mut out = Vec::new();
                quota_headers(&p.headers, &set, &d, &mut out);
                let policy_members = sf_members(header(&out, "ratelimit-policy").unwrap());
                let members = sf_members(header(&out, "ratelimit").unwrap());
                assert_eq!(policy_members.len(), members.len());
                for ((name, policy), (same, state)) in policy_members.iter().zip(&members) {
                    assert_eq!(name, same);
                    assert!(
                        state["r"] <= policy["q"],
                        "burst {burst}: {name} r={} above q={}",
                        state["r"],
                        policy["q"]
                    );
                    assert!(state["r"] >= 0 && state["t"] >= 0 && policy["w"] > 0);
                }
            }
        }
    }

    #[test]
    fn quota_headers_follow_the_config() {
        let p = policy(r#"{"limits": ["5/s"], "response_headers": {"ratelimit": false}}"#);
        let set = default_limits(&p);
        let d = gcra::decide(&set, &mut [0], 1);
        let mut out = Vec::new();
        quota_headers(&p.headers, &set, &d, &mut out);
        assert!(out.is_empty());
        let p = policy(r#"{"limits": ["5/s"]}"#);
        let mut out = Vec::new();
        quota_headers(&p.headers, &default_limits(&p), &d, &mut out);
        assert_eq!(header(&out, "ratelimit"), Some("\"5/s\";r=4;t=1"));
        let mut out = Vec::new();
        quota_headers(
            &p.headers,
            &default_limits(&p),
            &Decision::denied_for(5),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn missing_and_invalid_key_bodies_name_the_source() {
        let p = policy(r#"{"limits": ["1/s"]}"#);
        let reply = missing_key(&p.replies);
        assert_eq!(reply.status, 401);
        assert_eq!(
            reply.body,
            r#"{"detail":"Authentication credentials were not provided. Send an API key in the query parameter 'api_key' or the header 'x-api-key'."}"#
        );
        let reply = invalid_key(
            &p.replies,
            KeyError::Source {
                source: 1,
                kind: KeyErrorKind::TooLong,
            },
        );
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.body,
            r#"{"detail":"Invalid API key: the header 'x-api-key' is longer than 256 bytes."}"#
        );
        let reply = invalid_key(
            &p.replies,
            KeyError::Source {
                source: 0,
                kind: KeyErrorKind::Repeated,
            },
        );
        assert_eq!(
            reply.body,
            r#"{"detail":"Invalid API key: the query parameter 'api_key' is given more than once."}"#
        );
    }

    #[test]
    fn conflict_and_semicolon_bodies_name_the_sources() {
        let p = policy(
            r#"{"limits": ["1/s"], "key_sources": [{"query": "k"}, {"header": "x-a"},
                {"header": "authorization", "prefix": "Api-Key "}]}"#,
        );
        let reply = invalid_key(
            &p.replies,
            KeyError::Conflict {
                first: 1,
                second: 2,
            },
        );
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.body,
            r#"{"detail":"Invalid API key: the header 'x-a' and the header 'authorization' (as 'Api-Key <key>') hold different keys; send the key in one place only."}"#
        );
        let reply = invalid_key(
            &p.replies,
            KeyError::Source {
                source: 0,
                kind: KeyErrorKind::Semicolon,
            },
        );
        assert!(
            reply.body.starts_with(
                r#"{"detail":"Invalid API key: the query parameter 'k' is next to a ';'"#
            ),
            "{}",
            reply.body
        );
        // An index no source has still gets a 400 with the generic body.
        let reply = invalid_key(
            &p.replies,
            KeyError::Conflict {
                first: 7,
                second: 9,
            },
        );
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (400, r#"{"detail":"Invalid API key."}"#)
        );
    }

    #[test]
    fn configured_names_are_escaped_in_json() {
        let p = policy(r#"{"limits": ["1/s"], "key_sources": [{"query": "k\"ey"}]}"#);
        let body = missing_key(&p.replies).body;
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(parsed["detail"].as_str().unwrap().contains("'k\"ey'"));
    }

    #[test]
    fn unavailable_is_json_503() {
        let reply = unavailable();
        assert_eq!(reply.status, 503);
        assert!(reply.body.contains("unavailable"));
    }
}
