//! The queue with plans read from Redis (`store.webdis.plans_from_redis`),
//! against a model of `apikey_ratelimit_batch2`: each key is decided, and
//! reported, on the plan the function found for it.

use std::collections::BTreeMap;

use super::*;
use crate::gcra;
use crate::pipeline::{self, Start};
use crate::testing::{key_hash, policy, url_decoded, Headers, S};
use crate::time::micros_to_nanos;

const NONCE: u64 = 40;
const PLANS_KEY: &str = "rl:plans";

fn settings() -> Settings {
    Settings {
        max_keys: 4,
        max_path_bytes: 12_000,
        max_in_flight: 2,
        max_waiting: 1_000,
        timeout_nanos: 3_600 * S,
    }
}

fn batcher() -> Batcher<String> {
    Batcher::new(settings(), NONCE).with_plans_key(PLANS_KEY.into())
}

/// The ticket of a request of `key` to `path`, with an `x-cost` header.
fn ticket(p: &Policy, context_id: u32, key: &str, path: &str, cost: Option<u32>) -> Ticket {
    let path = format!("{path}?api_key={key}");
    let cost = cost.map(|c| c.to_string());
    let mut pairs: Vec<(&str, &[u8])> = vec![(":path", path.as_bytes())];
    if let Some(cost) = &cost {
        pairs.push(("x-cost", cost.as_bytes()));
    }
    let headers = Headers::of(&pairs);
    let Start::Decide { applied, .. } = pipeline::start(p, &headers.map()) else {
        panic!("{path} is not decided by the store");
    };
    Ticket {
        peek: false,
        context_id,
        redis_key: format!("rl:{key}"),
        hash: key_hash(key.as_bytes()),
        applied,
    }
}

/// A limit as a call describes it: name, step and capacity (µs).
type Described = (String, u64, u64);

/// `apikey_ratelimit_batch2`, modelled: `store` is key -> limit name ->
/// TAT (µs), `plans` the plans hash (field -> plan name).
fn function(
    path: &str,
    store: &mut BTreeMap<String, BTreeMap<String, u64>>,
    plans: &BTreeMap<String, String>,
    now_us: u64,
) -> String {
    let mut parts = path.split('/').skip(2);
    assert_eq!(parts.next(), Some(wire_plans::FUNCTION));
    let args: Vec<String> = parts.map(url_decoded).collect();
    let mut it = args.iter();
    let mut next = || it.next().unwrap().clone();
    let m: usize = next().parse::<usize>().unwrap() - 1;
    let plans_key = next();
    let prefix = plans_key.strip_suffix("plans").unwrap().to_string();
    let keys: Vec<String> = (0..m).map(|_| next()).collect();
    let nonce: u64 = next().parse().unwrap();
    let read_set = |next: &mut dyn FnMut() -> String| -> Vec<Described> {
        let n: usize = next().parse().unwrap();
        (0..n)
            .map(|_| (next(), next().parse().unwrap(), next().parse().unwrap()))
            .collect()
    };
    let p: usize = next().parse().unwrap();
    let q: usize = next().parse().unwrap();
    let table: Vec<(String, Vec<Described>)> =
        (0..p).map(|_| (next(), read_set(&mut next))).collect();
    let s: usize = next().parse().unwrap();
    let sets: Vec<Vec<Described>> = (0..s).map(|_| read_set(&mut next)).collect();
    let mut out = vec![nonce, now_us];
    for key in keys {
        let fallback: usize = next().parse().unwrap();
        let set = &sets[next().parse::<usize>().unwrap() - 1];
        let count: usize = next().parse().unwrap();
        let field = key.strip_prefix(&prefix).unwrap();
        let (used, answer) = match plans.get(field) {
            None => (fallback, fallback),
            Some(name) => match table.iter().take(q).position(|(n, _)| n == name) {
                Some(k) => (k + 1, k + 1),
                None => (fallback, 0),
            },
        };
        let limits: Vec<Described> = table[used - 1].1.iter().chain(set).cloned().collect();
        let fields = store.entry(key).or_default();
        let tat = |fields: &BTreeMap<String, u64>, name: &str| {
            fields.get(name).copied().unwrap_or(0).max(now_us)
        };
        let debts: Vec<u64> = limits
            .iter()
            .map(|(name, _, _)| tat(fields, name) - now_us)
            .collect();
        let mut admitted = 0;
        for _ in 0..count {
            if limits
                .iter()
                .all(|(name, t, c)| tat(fields, name) - now_us <= c - t)
            {
                admitted += 1;
                for (name, t, _) in &limits {
                    let next = tat(fields, name) + t;
                    fields.insert(name.clone(), next);
                }
            }
        }
        out.push(answer as u64);
        out.push(admitted);
        out.extend(debts);
    }
    format!(r#"{{"FCALL":{out:?}}}"#)
}

fn none(_: &Ticket) -> Option<Decision> {
    None
}

const POLICY: &str = r#"{
    "limits": [{"rate": "5/s", "name": "default"}],
    "plans": {"free": [{"rate": "3/min", "name": "free"}],
              "pro": [{"rate": "10/min", "name": "pro"}, {"rate": "4/s", "name": "pro-burst"}]},
    "keys": {"free": ["a", "b"]},
    "overrides": [{"key": "o", "limits": [{"rate": "2/s", "name": "own"}]}],
    "rules": [
        {"name": "llm", "match": {"path_prefix": "/v1"}, "limits": [{"rate": "20/s", "name": "tokens"}],
         "cost": {"header": "x-cost", "default": 1, "max": 8}},
        {"name": "batch", "match": {"path": "/batch", "plans": ["free"]}, "limits": ["2/s"], "cost": 2}
    ],
    "store": {"webdis": {"plans_from_redis": true}}}"#;

/// Sends what is queued as one call and answers it from the model.
fn decide_queued(
    p: &Policy,
    batcher: &mut Batcher<String>,
    store: &mut BTreeMap<String, BTreeMap<String, u64>>,
    plans: &BTreeMap<String, String>,
    now_us: u64,
) -> (String, Vec<Finished<String>>, Vec<Learnt>) {
    let now = micros_to_nanos(now_us);
    let mut finished = Vec::new();
    let call = batcher.next_call(now, p, none, &mut finished).unwrap();
    let path = call.path.clone();
    batcher.sent(call.call, 4, &mut finished);
    let body = function(&path, store, plans, now_us);
    let mut learnt = Vec::new();
    assert!(batcher.answered(
        4,
        Some(200),
        body.as_bytes(),
        now,
        p,
        &mut finished,
        &mut learnt
    ));
    (path, finished, learnt)
}

fn plan_of(p: &Policy, name: &str) -> u16 {
    (0..p.plans.len() as u16)
        .find(|i| p.plan_name(*i) == name)
        .unwrap()
}

#[test]
fn a_key_moved_in_redis_is_decided_and_reported_on_its_new_plan() {
    let p = policy(POLICY);
    let mut batcher = batcher();
    let (mut store, mut plans) = (BTreeMap::new(), BTreeMap::new());
    let now_us = 1_764_000_000_000_000u64;
    let at = |us: u64| micros_to_nanos(now_us + us);
    let remaining = |f: &Finished<String>| match f.verdict {
        Verdict::Decided(d) => (d.allowed, d.states()[0].remaining),
        ref other => panic!("{other:?}"),
    };

    // On its configured plan: free, 3/min.
    batcher
        .enqueue(ticket(&p, 1, "a", "/", None), "a".into(), at(0))
        .unwrap();
    let (path, finished, _) = decide_queued(&p, &mut batcher, &mut store, &plans, now_us);
    assert!(
        path.starts_with("/FCALL/apikey_ratelimit_batch2/2/rl%3Aplans/rl%3Aa/40/3/3/default/"),
        "{path}"
    );
    assert_eq!(finished[0].applied.plan, plan_of(&p, "free"));
    assert_eq!(remaining(&finished[0]), (true, 2));

    // Moved to pro in Redis: decided, and reported, on pro's limits.
    plans.insert("a".to_string(), "pro".to_string());
    for ctx in 2..4 {
        batcher
            .enqueue(ticket(&p, ctx, "a", "/", None), "a".into(), at(1))
            .unwrap();
    }
    let (_, finished, _) = decide_queued(&p, &mut batcher, &mut store, &plans, now_us + 1);
    let moved = p.on_plan(&ticket(&p, 0, "a", "/", None).applied, plan_of(&p, "pro"));
    assert_eq!(finished.len(), 2);
    for (f, left) in finished.iter().zip([9, 8]) {
        assert_eq!(f.applied, moved);
        assert!(!f.unknown_plan);
        assert_eq!(remaining(f), (true, left));
        assert!(
            matches!(f.verdict, Verdict::Decided(d) if d.states().len() == 2),
            "pro has two limits"
        );
    }

    // A plan the configuration does not know: its own plan, counted.
    plans.insert("a".to_string(), "gold".to_string());
    batcher
        .enqueue(ticket(&p, 5, "a", "/", None), "a".into(), at(2))
        .unwrap();
    let (_, finished, _) = decide_queued(&p, &mut batcher, &mut store, &plans, now_us + 2);
    assert_eq!(finished[0].applied.plan, plan_of(&p, "free"));
    assert!(finished[0].unknown_plan);
    assert_eq!(remaining(&finished[0]), (true, 1));

    // Back on free (the field removed): its debt is where it was. Free
    // runs out, and the cache learns nothing: the key's plan may change.
    plans.remove("a");
    for ctx in 6..8 {
        batcher
            .enqueue(ticket(&p, ctx, "a", "/", None), "a".into(), at(3))
            .unwrap();
    }
    let (_, finished, learnt) = decide_queued(&p, &mut batcher, &mut store, &plans, now_us + 3);
    let seen: Vec<(bool, u64)> = finished.iter().map(remaining).collect();
    assert_eq!(seen, [(true, 0), (false, 0)]);
    assert!(learnt.is_empty(), "{learnt:?}");

    // A rule's limit running out is learnt, as before.
    let rule = |ctx| ticket(&p, ctx, "b", "/v1/chat", Some(5));
    for ctx in 8..13 {
        batcher.enqueue(rule(ctx), "b".into(), at(4)).unwrap();
    }
    plans.insert("b".to_string(), "pro".to_string());
    let (_, finished, learnt) = decide_queued(&p, &mut batcher, &mut store, &plans, now_us + 4);
    let allowed: Vec<bool> = finished
        .iter()
        .map(|f| matches!(f.verdict, Verdict::Decided(d) if d.allowed))
        .collect();
    assert_eq!(
        allowed,
        [true, true, true, true, false],
        "20 tokens, 5 each"
    );
    assert_eq!(learnt.len(), 1);
    assert_eq!(learnt[0].applied.plan, plan_of(&p, "pro"));
}

#[test]
fn a_call_describes_the_plans_redis_may_name_then_the_configured_plans_it_needs() {
    let p = policy(POLICY);
    let mut batcher = batcher();
    batcher
        .enqueue(ticket(&p, 1, "o", "/", None), "o".into(), 0)
        .unwrap();
    batcher
        .enqueue(ticket(&p, 2, "z", "/batch", None), "z".into(), 0)
        .unwrap();
    let mut finished = Vec::new();
    let call = batcher.next_call(0, &p, none, &mut finished).unwrap();
    // default, free, pro (Redis may name them), then the override; the
    // second key is on default (no `keys` entry), so the `batch` rule of
    // free keys does not apply to it.
    assert!(
        call.path.contains(
            "/40/4/3/default/1/default/200000/1000000/free/1/free/20000000/60000000/pro/2/"
        ),
        "{}",
        call.path
    );
    assert!(
        call.path
            .contains("/overrides%5B0%5D/1/own/500000/1000000/1/0/"),
        "{}",
        call.path
    );
    assert!(call.path.ends_with("/4/1/1/1/1/1"), "{}", call.path);
}

/// Random arrivals, costs and plan moves in Redis: every request gets what
/// the same requests, one by one at Redis's clock, get from `gcra::decide`
/// on the plan Redis held for its key, and is reported on that plan.
#[test]
fn batched_decisions_with_plans_from_redis_equal_sequential_ones() {
    let p = policy(POLICY);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let keys = ["a", "b", "o", "z"];
    let names = ["default", "free", "pro", "gold"];
    let mut batcher = batcher();
    let (mut store, mut plans) = (BTreeMap::new(), BTreeMap::<String, String>::new());
    let mut model: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut in_flight: Vec<(u32, String)> = Vec::new();
    let (mut token, mut checked, mut allowed, mut moved, mut unknown) = (0u32, 0, 0, 0, 0);
    let mut now_us = 1_764_000_000_000_000u64;
    for step in 0..3_000u32 {
        now_us += next(80_000);
        let now = micros_to_nanos(now_us);
        if next(10) == 0 {
            let key = keys[next(4) as usize];
            match next(5) as usize {
                4 => plans.remove(key),
                n => plans.insert(key.to_string(), names[n].to_string()),
            };
        }
        for _ in 0..next(4) {
            let key = keys[next(4) as usize];
            let path = ["/", "/v1/x", "/batch"][next(3) as usize];
            let cost = (next(2) == 0).then(|| 1 + next(8) as u32);
            batcher
                .enqueue(ticket(&p, step, key, path, cost), key.to_string(), now)
                .unwrap();
        }
        let mut finished = Vec::new();
        while let Some(call) = batcher.next_call(now, &p, none, &mut finished) {
            token += 4;
            in_flight.push((token, call.path.clone()));
            batcher.sent(call.call, token, &mut finished);
        }
        if next(3) == 0 && !in_flight.is_empty() {
            let (token, path) = in_flight.remove(0);
            let body = function(&path, &mut store, &plans, now_us);
            batcher.answered(
                token,
                Some(200),
                body.as_bytes(),
                now,
                &p,
                &mut finished,
                &mut Vec::new(),
            );
            for f in &finished {
                let Verdict::Decided(decision) = f.verdict else {
                    panic!("{f:?}")
                };
                // The plan Redis held, else (none, or unknown) the configured one.
                let configured = ticket(&p, 0, &f.payload, "/", None).applied.plan;
                let expected = match plans.get(&f.payload).map(String::as_str) {
                    Some(name) if name != "gold" => plan_of(&p, name),
                    _ => configured,
                };
                assert_eq!(f.applied.plan, expected, "step {step}");
                assert_eq!(
                    f.unknown_plan,
                    plans.get(&f.payload).is_some_and(|n| n == "gold")
                );
                moved += usize::from(expected != configured);
                unknown += usize::from(f.unknown_plan);
                let limits = p.limits(&f.applied);
                let fields = model.entry(f.payload.clone()).or_default();
                let mut tats: Vec<u64> = limits
                    .iter()
                    .map(|l| fields.get(l.name.as_str()).copied().unwrap_or(0))
                    .collect();
                assert_eq!(
                    decision,
                    gcra::decide(limits.as_slice(), &mut tats, now),
                    "step {step}"
                );
                for (l, tat) in limits.iter().zip(tats) {
                    fields.insert(l.name.as_str().to_string(), tat);
                }
                checked += 1;
                allowed += usize::from(decision.allowed);
            }
        }
    }
    assert!(
        checked > 1_000 && allowed > 100 && checked - allowed > 100 && moved > 100 && unknown > 10,
        "{checked} {allowed} {moved} {unknown}"
    );
}
