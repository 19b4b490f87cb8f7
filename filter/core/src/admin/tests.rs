use super::*;
use crate::pipeline::{inspected, StoreFailure};
use crate::slots::Rewritten;
use crate::testing::{policy, Headers, MemStore, S};

/// Some 64 hex digits (a well-formed `sha256:` key).
const TOKEN_SHA256: &str = "8a2ab8d5b3b3a6c9ba5a7b4b1d4c71d1a8bd0b62c7b9b5ac7fb1cb7a5bb84f6c";

fn admin_policy() -> crate::Policy {
    policy(&format!(
        r#"{{"limits": ["3/min", {{"quota": "5/day", "reset": "calendar", "name": "daily"}}],
            "admin": {{"token_sha256": "{}"}}}}"#,
        key_digest(b"secret-token")
    ))
}

fn call(
    p: &crate::Policy,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> Result<Command, LocalReply> {
    let mut pairs: Vec<(&str, &[u8])> =
        vec![(":method", method.as_bytes()), (":path", path.as_bytes())];
    if let Some(auth) = auth {
        pairs.push(("authorization", auth.as_bytes()));
    }
    let headers = Headers::of(&pairs);
    p.admin.as_ref().unwrap().route(&headers.map())
}

fn status(result: Result<Command, LocalReply>) -> u32 {
    result.map_or_else(|r| r.status, |_| 200)
}

#[test]
fn every_call_needs_the_token() {
    let p = admin_policy();
    for (method, path) in [
        ("GET", "/keys/k"),
        ("DELETE", "/keys/k"),
        ("POST", "/keys/k/grant?amount=1"),
        ("GET", "/other"),
    ] {
        let missing = call(&p, method, path, None).unwrap_err();
        assert_eq!(missing.status, 401);
        assert!(missing
            .headers
            .contains(&("www-authenticate", "Bearer".to_string())));
        assert_eq!(status(call(&p, method, path, Some("Bearer wrong"))), 403);
        assert_eq!(
            status(call(&p, method, path, Some("Basic secret-token"))),
            401
        );
    }
    let good = Some("Bearer secret-token");
    assert_eq!(
        call(&p, "GET", "/keys/k%2Fx", good),
        Err(refusal(
            400,
            "The key in the path is empty or badly escaped."
        ))
    );
    assert_eq!(
        call(&p, "GET", "/keys/a%20b", good),
        Ok(Command {
            op: Op::Inspect,
            key: b"a b".to_vec()
        })
    );
    assert_eq!(call(&p, "DELETE", "/keys/k", good).unwrap().op, Op::Reset);
    assert_eq!(
        call(&p, "POST", "/keys/k/grant?amount=7", good).unwrap().op,
        Op::Grant(7)
    );
    assert_eq!(status(call(&p, "POST", "/keys/k/grant", good)), 400);
    assert_eq!(
        status(call(&p, "POST", "/keys/k/grant?amount=0", good)),
        400
    );
    assert_eq!(status(call(&p, "POST", "/keys/k", good)), 405);
    assert_eq!(status(call(&p, "GET", "/other", good)), 404);
    assert_eq!(
        status(call(
            &p,
            "GET",
            &format!("/keys/sha256:{TOKEN_SHA256}"),
            good
        )),
        400
    );
}

#[test]
fn the_token_hash_is_checked_at_load() {
    for bad in ["", "abc", &"g".repeat(64)] {
        let json = format!(r#"{{"limits": ["1/s"], "admin": {{"token_sha256": "{bad}"}}}}"#);
        let error = crate::Policy::from_json(json.as_bytes()).unwrap_err();
        assert!(error.to_string().contains("admin.token_sha256"), "{error}");
    }
    let json = format!(
        r#"{{"limits": ["1/s"], "store": {{"webdis": {{}}}}, "admin": {{"token_sha256": "{TOKEN_SHA256}"}}}}"#
    );
    assert!(crate::Policy::from_json(json.as_bytes()).is_ok());
}

/// What the key's usage reads as: each limit's remaining.
fn remaining(p: &crate::Policy, store: &mut MemStore, key: &[u8], now: u64) -> Vec<u64> {
    let (hash, plan) = p.key_plan(key).unwrap();
    let applied = p.all_of_plan(plan);
    let table = p.slot_table().unwrap();
    let limits = p.limits(&applied);
    let clock = crate::gcra::Clock::local(now, Some(now));
    let reading = table
        .peek(store, hash, limits.as_slice(), clock)
        .map_err(|()| StoreFailure::Host);
    let decision = reading.unwrap();
    let (action, _) = inspected(p, &applied, Default::default(), reading);
    assert!(matches!(action, crate::pipeline::Action::Respond(r) if r.status == 200));
    decision.states().iter().map(|s| s.remaining).collect()
}

fn spend(p: &crate::Policy, store: &mut MemStore, key: &[u8], now: u64) -> bool {
    let (hash, plan) = p.key_plan(key).unwrap();
    let limits = p.limits(&p.all_of_plan(plan));
    let clock = crate::gcra::Clock::local(now, Some(now));
    match p
        .slot_table()
        .unwrap()
        .decide(store, hash, limits.as_slice(), clock)
        .unwrap()
    {
        crate::slots::Outcome::Decided { decision, .. } => decision.allowed,
        other => panic!("{other:?}"),
    }
}

fn run(p: &crate::Policy, store: &mut MemStore, op: Op, key: &[u8], now: u64) -> Rewritten {
    let (hash, plan) = p.key_plan(key).unwrap();
    let limits = p.limits(&p.all_of_plan(plan));
    p.slot_table()
        .unwrap()
        .rewrite(
            store,
            hash,
            limits.as_slice(),
            crate::gcra::Clock::local(now, Some(now)),
            |l, v, clock| apply(op, l, v, clock),
        )
        .unwrap()
}

#[test]
fn reset_restores_everything_and_grant_gives_back_what_it_says() {
    let p = admin_policy();
    let mut store = MemStore::default();
    let now = 1_700_000_000 * S;
    assert_eq!(run(&p, &mut store, Op::Reset, b"k", now), Rewritten::Fresh);
    for _ in 0..3 {
        assert!(spend(&p, &mut store, b"k", now));
    }
    assert!(!spend(&p, &mut store, b"k", now));
    assert_eq!(remaining(&p, &mut store, b"k", now), [0, 2]);
    // A grant of 2: two more of the rate, two units of the quota back.
    assert_eq!(
        run(&p, &mut store, Op::Grant(2), b"k", now),
        Rewritten::Done
    );
    assert_eq!(remaining(&p, &mut store, b"k", now), [2, 4]);
    assert!(spend(&p, &mut store, b"k", now));
    assert!(spend(&p, &mut store, b"k", now));
    assert!(!spend(&p, &mut store, b"k", now));
    // Never past a full bucket, nor below nothing used.
    assert_eq!(
        run(&p, &mut store, Op::Grant(1000), b"k", now),
        Rewritten::Done
    );
    assert_eq!(remaining(&p, &mut store, b"k", now), [3, 5]);
    for _ in 0..3 {
        assert!(spend(&p, &mut store, b"k", now));
    }
    assert_eq!(remaining(&p, &mut store, b"k", now), [0, 2]);
    assert_eq!(run(&p, &mut store, Op::Reset, b"k", now), Rewritten::Done);
    assert_eq!(remaining(&p, &mut store, b"k", now), [3, 5]);
    assert!(spend(&p, &mut store, b"k", now));
    // Inspection writes nothing.
    let writes = store.writes;
    remaining(&p, &mut store, b"k", now);
    assert_eq!(store.writes, writes);
    assert_eq!(key_digest(b"secret-token").len(), 64);
}
