//! What one batch call carries to the Redis function, and what it answers
//! (the function's own description is at the top of `gcra.lua`):
//!
//! `GET /FCALL/apikey_ratelimit_batch/<m>/<key_1>/.../<key_m>/<nonce>/<s>/<sets>/<set_1>/<count_1>/...`
//!
//! The nonce comes back first in the answer: webdis 0.1.9 can hand the reply
//! of a call Envoy gave up on to a later call on the same file descriptor,
//! and a call must never be decided by another call's reply.
//!
//! Each limit set is written once however many keys use it, so a call of
//! many keys on one policy is mostly the keys themselves.

use std::fmt::Write;

use crate::applied::Applied;
use crate::calendar::{Period, MAX_OFFSET_MINUTES};
use crate::gcra::Limit;
use crate::per_limit::{PerLimit, MAX_LIMITS};
use crate::time::nanos_to_micros;
use crate::webdis::{
    encode_into, encoded_len, fcall_integers, parse_error, BackendError, FailureClass,
};

/// The function a batch calls (registered by the library, checked by a test).
pub const FUNCTION: &str = "apikey_ratelimit_batch";

/// Bytes of the path outside its keys, sets and entries, at most.
pub const FIXED_BYTES: usize = "/FCALL/".len() + FUNCTION.len() + 3 * (1 + 20);

/// Nonces stay below this: the function reads numbers as Lua doubles and
/// refuses any above 2^52.
pub const NONCE_LIMIT: u64 = 1 << 48;

/// One key of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub redis_key: &'a str,
    /// The limits that apply: entries with the same ones share their
    /// description in the path.
    pub applied: Applied,
    pub limits: &'a [Limit],
    /// How many of the key's requests the call decides.
    pub count: u32,
}

/// The bytes an entry adds to a path, at most, besides its set.
pub fn entry_bytes(redis_key: &str) -> usize {
    // "/<key>" and "/<set number>/<count>", both numbers at most 10 digits.
    1 + encoded_len(redis_key.as_bytes()) + 2 * (1 + 10)
}

/// The bytes a limit set's description adds to a path.
pub fn set_bytes(limits: &[Limit]) -> usize {
    let mut out = String::new();
    write_set(&mut out, limits);
    out.len()
}

/// The limit sets of one call, each written once in order of first use and
/// referred to by its 1-based number.
#[derive(Default)]
pub(crate) struct NumberedSets {
    numbered: Vec<Applied>,
    /// The sets' descriptions, in order.
    pub(crate) text: String,
}

impl NumberedSets {
    /// The number of the set `applied` (of `limits`), written if new.
    pub(crate) fn number(&mut self, applied: Applied, limits: &[Limit]) -> usize {
        match self.numbered.iter().position(|set| *set == applied) {
            Some(index) => index + 1,
            None => {
                write_set(&mut self.text, limits);
                self.numbered.push(applied);
                self.numbered.len()
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.numbered.len()
    }
}

/// The `:path` of call `nonce` (below [`NONCE_LIMIT`]) deciding `entries`.
pub fn path(nonce: u64, entries: &[Entry<'_>]) -> String {
    let mut keys = String::new();
    let mut sets = NumberedSets::default();
    let mut refs = String::new();
    for entry in entries {
        keys.push('/');
        encode_into(&mut keys, entry.redis_key.as_bytes());
        let number = sets.number(entry.applied, entry.limits);
        let _ = write!(refs, "/{number}/{}", entry.count);
    }
    let mut path = String::with_capacity(FIXED_BYTES + keys.len() + sets.text.len() + refs.len());
    let _ = write!(path, "/FCALL/{FUNCTION}/{}", entries.len());
    path.push_str(&keys);
    let _ = write!(path, "/{nonce}/{}", sets.len());
    path.push_str(&sets.text);
    path.push_str(&refs);
    path
}

/// `/<n>` then `/<name>/<T>/<C>` per limit, times in microseconds. A
/// request costing `c` under a limit moves its TAT by `c * T` and fits when
/// that much fits: to the function it is a request on a limit of interval
/// `c * T`, so `T` is sent as the step.
///
/// A calendar quota is `/<name>/-<cost>/<code>` ([`quota_code`]): a
/// negative step, which functions from before quotas refuse (an error
/// reply, never a quota decided as a rate).
pub(crate) fn write_set(out: &mut String, limits: &[Limit]) {
    let _ = write!(out, "/{}", limits.len());
    for limit in limits {
        out.push('/');
        encode_into(out, limit.name.as_str().as_bytes());
        match &limit.period {
            Some(period) => {
                let _ = write!(out, "/-{}/{}", limit.cost, quota_code(limit.burst, period));
            }
            None => {
                let interval = nanos_to_micros(limit.step_nanos());
                let capacity = nanos_to_micros(limit.capacity_nanos);
                let _ = write!(out, "/{interval}/{capacity}");
            }
        }
    }
}

/// A quota of `count` per `period` as one number (below 2^46, exact in
/// Lua's doubles): `count * 2^16 + kind * 2^14 + week start * 2^11 +
/// (offset minutes + 840)`, kind 0 day, 1 week, 2 month, week start 0 Monday.
pub fn quota_code(count: u64, period: &Period) -> u64 {
    let offset = i64::from(period.offset_minutes) + i64::from(MAX_OFFSET_MINUTES);
    count
        .saturating_mul(1 << 16)
        .saturating_add(period.kind.code() << 14)
        .saturating_add(u64::from(period.week_start.0) << 11)
        .saturating_add(u64::try_from(offset).unwrap_or(0))
}

/// What the function answered for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryReply {
    /// How many of the key's requests were admitted (the first ones).
    pub admitted: u64,
    /// Per limit: `max(TAT - now, 0)` before these requests, microseconds.
    pub debts_us: PerLimit<u64>,
}

/// What the function answered for a whole call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The call's nonce, as the function echoed it.
    pub nonce: u64,
    /// Redis's clock when it decided, microseconds.
    pub now_us: u64,
    /// One per entry, in the call's order.
    pub entries: Vec<EntryReply>,
}

/// Another call's reply (its first number, the nonce, is not `nonce`) is a
/// transport failure, never a decision.
pub(crate) fn check_nonce(numbers: &[u64], nonce: u64) -> Result<(), BackendError> {
    match numbers.first().filter(|first| **first != nonce) {
        Some(other) => Err(BackendError::new(
            FailureClass::Transport,
            true,
            format!(
                "webdis answered call {nonce} with the reply of call {other} \
                 (one Envoy gave up on; webdis 0.1.9 hands such replies on)"
            ),
        )),
        None => Ok(()),
    }
}

/// Reads an answer to call `nonce`, whose entries carried
/// `limits_per_entry` limits each: `status` is `None` when the call came back
/// with no headers. Another call's reply is a transport failure.
pub fn parse(
    status: Option<u32>,
    body: &[u8],
    nonce: u64,
    limits_per_entry: &[usize],
) -> Result<Reply, BackendError> {
    let numbers = fcall_integers(status, body)?;
    check_nonce(&numbers, nonce)?;
    let expected = 2 + limits_per_entry.iter().map(|n| 1 + n).sum::<usize>();
    if numbers.len() != expected || limits_per_entry.iter().any(|n| *n > MAX_LIMITS) {
        return Err(parse_error(format!(
            "the function answered {} integers for {} key(s) where {expected} were due; \
             is an older library loaded?",
            numbers.len(),
            limits_per_entry.len()
        )));
    }
    let mut numbers = numbers.into_iter();
    let nonce = numbers.next().unwrap_or(0);
    let now_us = numbers.next().unwrap_or(0);
    let entries = limits_per_entry
        .iter()
        .map(|n| EntryReply {
            admitted: numbers.next().unwrap_or(0),
            debts_us: numbers.by_ref().take(*n).collect(),
        })
        .collect();
    Ok(Reply {
        nonce,
        now_us,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::{PeriodKind, Weekday};
    use crate::rate::{MAX_CAPACITY_NANOS, MAX_COUNT, MAX_WINDOW_SECONDS};
    use crate::testing::{limit, named_limit, quota_limit};
    use crate::time::SECONDS_PER_YEAR;
    use crate::webdis::FailureClass;

    fn plan(plan: usize) -> Applied {
        Applied {
            plan: plan as u16,
            ..Applied::default()
        }
    }

    #[test]
    fn a_path_names_each_key_once_and_each_set_once() {
        let day = [
            limit(1, 1, 1),
            named_limit("per-day.v2/a:b", 1000, 86_400, 100),
        ];
        let gold = [named_limit("gold", 10, 1, 10)];
        let entries = [
            Entry {
                redis_key: "rl:api:ab12",
                applied: plan(0),
                limits: &day,
                count: 3,
            },
            Entry {
                redis_key: "rl:api:cd34",
                applied: plan(4),
                limits: &gold,
                count: 1,
            },
            Entry {
                redis_key: "rl:api:ef56",
                applied: plan(0),
                limits: &day,
                count: 12,
            },
        ];
        assert_eq!(
            path(77, &entries),
            "/FCALL/apikey_ratelimit_batch/3/rl%3Aapi%3Aab12/rl%3Aapi%3Acd34/rl%3Aapi%3Aef56\
             /77/2/2/1%2F1s/1000000/1000000/per-day%2Ev2%2Fa%3Ab/86400000/8640000000\
             /1/gold/100000/1000000\
             /1/3/2/1/1/12"
        );
    }

    #[test]
    fn the_byte_estimates_bound_the_path() {
        let limits = [limit(5, 60, 10), named_limit("a name/with:bytes", 1, 1, 1)];
        let keys: Vec<String> = (0..40)
            .map(|i| format!("apikey_ratelimit:api:{i:064x}"))
            .collect();
        let entries: Vec<Entry<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| Entry {
                redis_key: key,
                applied: plan(i % 3),
                limits: &limits,
                count: u32::MAX,
            })
            .collect();
        let estimate = FIXED_BYTES
            + 3 * set_bytes(&limits)
            + keys.iter().map(|k| entry_bytes(k)).sum::<usize>();
        assert!(path(NONCE_LIMIT - 1, &entries).len() <= estimate);
        assert_eq!(path(3, &[]), "/FCALL/apikey_ratelimit_batch/0/3/0");
    }

    #[test]
    fn every_number_a_path_carries_is_within_the_functions_bound() {
        // gcra.lua refuses any number past its MAX before writing anything
        // (Lua's tonumber() reads "inf" and "1e300" too); what the filter
        // sends must stay within it, and the clock plus MAX within a
        // double's exact integers (2^53) for as long as the filter runs.
        let max = crate::webdis::LIBRARY
            .lines()
            .find_map(|line| line.strip_prefix("local MAX = 2^"))
            .map(|exponent| 1u64 << exponent.parse::<u32>().unwrap())
            .expect("gcra.lua bounds the numbers it takes");
        let largest_quota = Period {
            kind: PeriodKind::Month,
            offset_minutes: MAX_OFFSET_MINUTES,
            week_start: Weekday(6),
        };
        let largest_sent = [
            u64::from(u32::MAX),
            NONCE_LIMIT - 1,
            MAX_CAPACITY_NANOS / 1_000,
            MAX_WINDOW_SECONDS * 1_000_000,
            quota_code(MAX_COUNT, &largest_quota),
            MAX_COUNT,
        ];
        assert!(quota_code(MAX_COUNT, &largest_quota) < 1 << 46);
        assert!(largest_sent.iter().all(|n| *n <= max), "{largest_sent:?}");
        let year_2100_us = 130 * SECONDS_PER_YEAR * 1_000_000;
        assert!(year_2100_us + max < 1 << 53);
    }

    #[test]
    fn a_quota_is_sent_as_its_negative_cost_and_its_code() {
        let monthly = quota_limit("monthly", 10_000, PeriodKind::Month, 120).costing(3);
        let daily = quota_limit("d", 1, PeriodKind::Day, -840);
        let entries = [Entry {
            redis_key: "k",
            applied: plan(0),
            limits: &[monthly, daily, limit(1, 1, 1)],
            count: 1,
        }];
        // 10000 * 2^16 + month (2) * 2^14 + Monday (0) + (120 + 840); then
        // 1 * 2^16 + day (0) + (-840 + 840).
        assert_eq!(
            path(5, &entries),
            "/FCALL/apikey_ratelimit_batch/1/k/5/1/3/monthly/-3/655393728/d/-1/65536/1%2F1s/1000000/1000000/1/1"
        );
        let week = Period {
            kind: PeriodKind::Week,
            offset_minutes: 0,
            week_start: Weekday(6),
        };
        assert_eq!(quota_code(7, &week), 7 * 65_536 + 16_384 + 6 * 2_048 + 840);
    }

    #[test]
    fn replies_are_split_per_entry() {
        let body = br#"{"FCALL":[77,1764000000000000,2,0,5,0,1,7000]}"#;
        let reply = parse(Some(200), body, 77, &[2, 0, 1]).unwrap();
        assert_eq!(reply.nonce, 77);
        assert_eq!(reply.now_us, 1_764_000_000_000_000);
        let parts: Vec<(u64, Vec<u64>)> = reply
            .entries
            .iter()
            .map(|e| (e.admitted, e.debts_us.as_slice().to_vec()))
            .collect();
        assert_eq!(parts, [(2, vec![0, 5]), (0, vec![]), (1, vec![7000])]);
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_a_parse_failure() {
        let class =
            |body: &[u8], limits: &[usize]| parse(Some(200), body, 7, limits).unwrap_err().class;
        // Too few, too many, the one-request function's answer, too many limits.
        assert_eq!(class(br#"{"FCALL":[7,5,1]}"#, &[1]), FailureClass::Parse);
        assert_eq!(
            class(br#"{"FCALL":[7,5,1,0,0]}"#, &[1]),
            FailureClass::Parse
        );
        assert_eq!(class(br#"{"FCALL":[]}"#, &[]), FailureClass::Parse);
        assert_eq!(class(br#"{"FCALL":[7]}"#, &[]), FailureClass::Parse);
        let over = MAX_LIMITS + 1;
        let too_many = format!(r#"{{"FCALL":[7,5,1{}]}}"#, ",0".repeat(over));
        assert_eq!(class(too_many.as_bytes(), &[over]), FailureClass::Parse);
        // The failures every call shares come through unchanged.
        assert_eq!(
            parse(Some(504), b"", 7, &[1]).unwrap_err().class,
            FailureClass::Timeout
        );
        assert_eq!(
            parse(None, b"", 7, &[1]).unwrap_err().class,
            FailureClass::Transport
        );
        // An empty batch (a health check) is the nonce and the clock.
        assert_eq!(
            parse(Some(200), br#"{"FCALL":[7,9]}"#, 7, &[]).unwrap(),
            Reply {
                nonce: 7,
                now_us: 9,
                entries: vec![]
            }
        );
    }

    #[test]
    fn another_calls_reply_never_decides_this_one() {
        // The same shape, another nonce: what webdis 0.1.9 hands on from a
        // call Envoy gave up on.
        let error = parse(Some(200), br#"{"FCALL":[8,5,1,0]}"#, 7, &[1]).unwrap_err();
        assert_eq!(
            (error.class, error.transient),
            (FailureClass::Transport, true)
        );
        assert!(error.detail.contains("call 8"), "{}", error.detail);
    }
}
