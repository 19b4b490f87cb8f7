//! The batch call when keys' plans are read from Redis
//! (`store.webdis.plans_from_redis`), and its answer; the function is
//! described at the top of `gcra.lua`:
//!
//! `GET /FCALL/apikey_ratelimit_batch2/<1+m>/<plans key>/<key_1>/.../<key_m>/<nonce>`
//! `/<p>/<q>/<plans>/<s>/<rule sets>/<plan_1>/<set_1>/<count_1>/...`
//!
//! The call describes every plan Redis may name (the first `q` of its `p`
//! plans), since any key may be on any of them, then the plans the
//! configuration gives this call's keys when Redis may not name them
//! (overrides, the anonymous bucket); each entry names the configuration's
//! plan, the fallback, and its rules' limits. The function reads every
//! key's plan with one `HMGET` of the plans hash, decides each key on the
//! plan it found, and answers which one it used, so that the filter replays
//! (and reports in the headers) exactly the limits Redis applied.

use std::fmt::Write;

use crate::applied::Applied;
use crate::batch::wire::{self, EntryReply};
use crate::gcra::Limit;
use crate::per_limit::MAX_LIMITS;
use crate::webdis::{encode_into, encoded_len, fcall_integers, parse_error, BackendError};

/// The function a batch calls when plans are read from Redis.
pub const FUNCTION: &str = "apikey_ratelimit_batch2";

/// The Redis key of the plans hash, under the filter's key prefix.
pub fn plans_key(key_prefix: &str) -> String {
    format!("{key_prefix}plans")
}

/// A plan as a call describes it.
#[derive(Debug, Clone, Copy)]
pub struct PlanSet<'a> {
    pub name: &'a str,
    /// Its key-wide limits (cost 1).
    pub limits: &'a [Limit],
}

/// One key of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub redis_key: &'a str,
    /// The plan the configuration gives the key: its place in the call's
    /// plans (0-based), used unless Redis names another.
    pub plan: usize,
    /// The rules' part of what applies (no plan limits): entries with the
    /// same one share their description in the path.
    pub rules: Applied,
    /// Its limits, each charging the request's cost.
    pub rule_limits: &'a [Limit],
    /// How many of the key's requests the call decides.
    pub count: u32,
}

/// Bytes of the path outside its keys, plans, sets and entries, at most.
pub fn fixed_bytes(plans_key: &str) -> usize {
    "/FCALL/".len() + FUNCTION.len() + 1 + encoded_len(plans_key.as_bytes()) + 5 * (1 + 20)
}

/// The bytes an entry adds to a path, at most, besides its set and plan.
pub fn entry_bytes(redis_key: &str) -> usize {
    // "/<key>" and "/<plan>/<set>/<count>", numbers at most 10 digits.
    1 + encoded_len(redis_key.as_bytes()) + 3 * (1 + 10)
}

/// The bytes a plan's description adds to a path.
pub fn plan_bytes(plan: &PlanSet<'_>) -> usize {
    let mut out = String::new();
    write_plan(&mut out, plan);
    out.len()
}

fn write_plan(out: &mut String, plan: &PlanSet<'_>) {
    out.push('/');
    encode_into(out, plan.name.as_bytes());
    wire::write_set(out, plan.limits);
}

/// The `:path` of call `nonce` (below [`wire::NONCE_LIMIT`]): `plans`, of
/// which Redis may name the first `nameable`, and `entries`.
pub fn path(
    nonce: u64,
    plans_key: &str,
    plans: &[PlanSet<'_>],
    nameable: usize,
    entries: &[Entry<'_>],
) -> String {
    let mut keys = String::new();
    let mut sets = wire::NumberedSets::default();
    let mut refs = String::new();
    for entry in entries {
        keys.push('/');
        encode_into(&mut keys, entry.redis_key.as_bytes());
        let number = sets.number(entry.rules, entry.rule_limits);
        let _ = write!(refs, "/{}/{number}/{}", entry.plan + 1, entry.count);
    }
    let mut path = String::with_capacity(fixed_bytes(plans_key) + keys.len() + sets.text.len());
    let _ = write!(path, "/FCALL/{FUNCTION}/{}/", entries.len() + 1);
    encode_into(&mut path, plans_key.as_bytes());
    path.push_str(&keys);
    let _ = write!(path, "/{nonce}/{}/{nameable}", plans.len());
    for plan in plans {
        write_plan(&mut path, plan);
    }
    let _ = write!(path, "/{}", sets.len());
    path.push_str(&sets.text);
    path.push_str(&refs);
    path
}

/// What the function answered for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedReply {
    /// The plan it decided on: its place in the call's plans (0-based).
    pub plan: usize,
    /// Redis named a plan the call did not describe, so the configuration's
    /// was used.
    pub unknown_plan: bool,
    pub reply: EntryReply,
}

/// What the function answered for a whole call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub nonce: u64,
    pub now_us: u64,
    pub entries: Vec<PlannedReply>,
}

/// What the reader needs of one entry: its fallback plan and how many
/// limits its rules add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub plan: usize,
    pub rule_limits: usize,
}

/// Reads an answer to call `nonce`: `plan_limits` holds how many limits
/// each of the call's plans has, of which Redis may name the first
/// `nameable`. Another call's reply is a transport failure.
pub fn parse(
    status: Option<u32>,
    body: &[u8],
    nonce: u64,
    plan_limits: &[usize],
    nameable: usize,
    entries: &[Expected],
) -> Result<Reply, BackendError> {
    let numbers = fcall_integers(status, body)?;
    wire::check_nonce(&numbers, nonce)?;
    let mut numbers = numbers.into_iter();
    let (Some(nonce), Some(now_us)) = (numbers.next(), numbers.next()) else {
        return Err(parse_error("the function answered no nonce and clock"));
    };
    let mut out = Vec::with_capacity(entries.len());
    for (j, expected) in entries.iter().enumerate() {
        let Some(answered) = numbers.next() else {
            return Err(short(j));
        };
        // 0: Redis named a plan the call does not describe.
        let unknown_plan = answered == 0;
        let plan = match usize::try_from(answered) {
            Ok(0) => expected.plan,
            Ok(number) if number <= nameable || number == expected.plan + 1 => number - 1,
            _ => {
                return Err(parse_error(format!(
                    "the function decided key {} on plan {answered}, which it may not use",
                    j + 1
                )))
            }
        };
        let limits = plan_limits.get(plan).copied().unwrap_or(0) + expected.rule_limits;
        if limits > MAX_LIMITS {
            return Err(parse_error(format!("key {} has {limits} limits", j + 1)));
        }
        let Some(admitted) = numbers.next() else {
            return Err(short(j));
        };
        let debts_us: Vec<u64> = numbers.by_ref().take(limits).collect();
        if debts_us.len() != limits {
            return Err(short(j));
        }
        out.push(PlannedReply {
            plan,
            unknown_plan,
            reply: EntryReply {
                admitted,
                debts_us: debts_us.into_iter().collect(),
            },
        });
    }
    if numbers.next().is_some() {
        return Err(parse_error(
            "the function answered more integers than the call's keys take",
        ));
    }
    Ok(Reply {
        nonce,
        now_us,
        entries: out,
    })
}

fn short(entry: usize) -> BackendError {
    parse_error(format!(
        "the function's answer ends within key {}; is an older library loaded?",
        entry + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::applied::LimitRef;
    use crate::testing::{limit, named_limit};
    use crate::webdis::FailureClass;

    fn rules(instance: u16) -> Applied {
        Applied {
            limits: [LimitRef { instance, cost: 1 }].into_iter().collect(),
            ..Applied::default()
        }
    }

    #[test]
    fn a_path_describes_every_plan_once_each_rule_set_once_and_each_keys_fallback() {
        let free = [named_limit("free", 3, 60, 3)];
        let pro = [named_limit("pro", 10, 60, 10), limit(1000, 86_400, 1000)];
        let own = [named_limit("own", 1, 1, 1)];
        let search = [named_limit("search:5/s", 5, 1, 5).costing(2)];
        let plans = [
            PlanSet {
                name: "free",
                limits: &free,
            },
            PlanSet {
                name: "pro.v2",
                limits: &pro,
            },
            PlanSet {
                name: "overrides[0]",
                limits: &own,
            },
        ];
        let entry = |redis_key, plan, rules, rule_limits, count| Entry {
            redis_key,
            plan,
            rules,
            rule_limits,
            count,
        };
        let entries = [
            entry("rl:a", 0, Applied::default(), &[][..], 3),
            entry("rl:b", 2, super::tests::rules(7), &search[..], 1),
            entry("rl:a", 0, super::tests::rules(7), &search[..], 2),
        ];
        assert_eq!(
            path(9, "rl:plans", &plans, 2, &entries),
            "/FCALL/apikey_ratelimit_batch2/4/rl%3Aplans/rl%3Aa/rl%3Ab/rl%3Aa/9/3/2\
             /free/1/free/20000000/60000000\
             /pro%2Ev2/2/pro/6000000/60000000/1000%2F86400s/86400000/86400000000\
             /overrides%5B0%5D/1/own/1000000/1000000\
             /2/0/1/search%3A5%2Fs/400000/1000000\
             /1/1/3/3/2/1/1/2/2"
        );
        assert!(
            path(9, "rl:plans", &plans, 2, &entries).len()
                <= fixed_bytes("rl:plans")
                    + plans.iter().map(plan_bytes).sum::<usize>()
                    + 2 * wire::set_bytes(&search)
                    + entries
                        .iter()
                        .map(|e| entry_bytes(e.redis_key))
                        .sum::<usize>()
        );
        assert_eq!(
            plans_key("apikey_ratelimit:api:"),
            "apikey_ratelimit:api:plans"
        );
    }

    #[test]
    fn each_key_is_read_with_the_plan_redis_used() {
        // Plans: free (1 limit), pro (2), an override (1); Redis may name 2.
        let plan_limits = [1, 2, 1];
        let expected = [
            Expected {
                plan: 0,
                rule_limits: 0,
            },
            Expected {
                plan: 2,
                rule_limits: 1,
            },
            Expected {
                plan: 0,
                rule_limits: 1,
            },
        ];
        // Key 1 moved to pro; key 2 on its override; key 3 named an unknown plan.
        let body = br#"{"FCALL":[9,5,2,1,0,7,3,1,4,0,0,1,8,9]}"#;
        let reply = parse(Some(200), body, 9, &plan_limits, 2, &expected).unwrap();
        let seen: Vec<(usize, bool, u64, Vec<u64>)> = reply
            .entries
            .iter()
            .map(|e| {
                let debts = e.reply.debts_us.as_slice().to_vec();
                (e.plan, e.unknown_plan, e.reply.admitted, debts)
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, false, 1, vec![0, 7]),
                (2, false, 1, vec![4, 0]),
                (0, true, 1, vec![8, 9])
            ]
        );
        assert_eq!((reply.nonce, reply.now_us), (9, 5));
    }

    #[test]
    fn an_answer_of_the_wrong_shape_or_plan_is_a_parse_failure() {
        let expected = [Expected {
            plan: 0,
            rule_limits: 0,
        }];
        let class = |body: &[u8]| {
            parse(Some(200), body, 9, &[1, 1, 1], 2, &expected)
                .unwrap_err()
                .class
        };
        for body in [
            // Too short, too long, the older batch's answer (no plan).
            &br#"{"FCALL":[9,5,1,1]}"#[..],
            br#"{"FCALL":[9,5,1,1,0,0]}"#,
            br#"{"FCALL":[9,5]}"#,
            // A plan past the nameable ones that is not the key's own, or
            // past the call's.
            br#"{"FCALL":[9,5,3,1,0]}"#,
            br#"{"FCALL":[9,5,4,1,0]}"#,
        ] {
            assert_eq!(class(body), FailureClass::Parse, "{:?}", body);
        }
        assert_eq!(
            class(br#"{"FCALL":[8,5,1,1,0]}"#),
            FailureClass::Transport,
            "another call's reply"
        );
        assert_eq!(
            parse(Some(200), br#"{"FCALL":[9,5]}"#, 9, &[1], 1, &[])
                .unwrap()
                .entries,
            []
        );
    }
}
