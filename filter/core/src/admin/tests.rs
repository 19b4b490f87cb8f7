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
            key: KeyName::Plain(b"a b".to_vec())
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
}

#[test]
fn a_sha256_path_names_a_digest_in_either_case_and_bad_hex_is_a_400() {
    let p = admin_policy();
    let good = Some("Bearer secret-token");
    let digest = parse_sha256(TOKEN_SHA256.as_bytes()).unwrap();
    for (method, path, op) in [
        ("GET", format!("/keys/sha256:{TOKEN_SHA256}"), Op::Inspect),
        (
            "DELETE",
            format!("/keys/sha256:{}", TOKEN_SHA256.to_uppercase()),
            Op::Reset,
        ),
        (
            "POST",
            format!("/keys/sha256%3A{TOKEN_SHA256}/grant?amount=3"),
            Op::Grant(3),
        ),
    ] {
        assert_eq!(
            call(&p, method, &path, good),
            Ok(Command {
                op,
                key: KeyName::Sha256(digest)
            }),
            "{path}"
        );
    }
    let bad = Err(refusal(
        400,
        "A sha256: key must be followed by the 64 hex digits of the key's SHA-256.",
    ));
    let plus = format!("+{}", &TOKEN_SHA256[1..]);
    for hex in [
        "",
        "abc",
        &TOKEN_SHA256[1..],
        &format!("{TOKEN_SHA256}0"),
        &"g".repeat(64),
        &plus,
    ] {
        assert_eq!(
            call(&p, "GET", &format!("/keys/sha256:{hex}"), good),
            bad,
            "{hex}"
        );
    }
    // The token still comes first.
    assert_eq!(status(call(&p, "GET", "/keys/sha256:abc", None)), 401);
    assert_eq!(
        KeyName::Plain(b"1234".to_vec()).digest(),
        parse_sha256(DIGEST_1234.as_bytes()).unwrap()
    );
    assert_eq!(hex(&KeyName::Sha256(digest).digest()), TOKEN_SHA256);
}

/// sha256("1234").
const DIGEST_1234: &str = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4";

/// A policy with keys and overrides listed both ways, over `store`.
fn listed_policy(store: &str, unknown_keys: &str) -> crate::Policy {
    policy(&format!(
        r#"{{"limits": ["3/min"], "plans": {{"pro": ["10/min"]}},
            "keys": {{"pro": ["plain-pro", "sha256:{}"]}},
            "overrides": [{{"key": "plain-over", "limits": ["1/min"]}},
                          {{"key": "sha256:{}", "limits": ["2/min"]}}],
            "unknown_keys": "{unknown_keys}", "store": {store},
            "admin": {{"token_sha256": "{TOKEN_SHA256}"}}}}"#,
        key_digest(b"hashed-pro"),
        key_digest(b"hashed-over").to_uppercase(),
    ))
}

const STORES: [&str; 3] = [
    r#"{"webdis": {}}"#,
    r#"{"webdis": {"key_hash_secret": "s"}}"#,
    r#"{"local": {}}"#,
];

/// The plan name a target is on, and whether its plain key is known.
fn resolved(p: &crate::Policy, name: KeyName) -> Result<(String, bool), u32> {
    target::target(p, name)
        .map(|t| (p.plans[usize::from(t.plan)].name.clone(), t.plain.is_some()))
        .map_err(|r| r.status)
}

fn by_digest(key: &[u8]) -> KeyName {
    KeyName::Sha256(KeyName::Plain(key.to_vec()).digest())
}

#[test]
fn a_digest_finds_the_plan_of_plain_sha256_and_override_keys() {
    for store in STORES {
        let p = listed_policy(store, "default_plan");
        for (key, plan) in [
            (&b"plain-pro"[..], "pro"),
            (b"hashed-pro", "pro"),
            (b"plain-over", "overrides[0]"),
            (b"hashed-over", "overrides[1]"),
            (b"unlisted", "default"),
        ] {
            // By plain key: as a request, everywhere.
            let plain = target::target(&p, KeyName::Plain(key.to_vec())).unwrap();
            assert_eq!(p.plans[usize::from(plain.plan)].name, plan);
            assert_eq!(
                plain.plain,
                Some((key.to_vec(), p.key_plan(key).unwrap().0))
            );
            assert_eq!(plain.digest, KeyName::Plain(key.to_vec()).digest());
            // By digest: a key listed in plain is found itself, the same
            // target; otherwise the digest reaches only a secret-less Redis.
            let hashed = target::target(&p, by_digest(key));
            let listed_plain = key.starts_with(b"plain-");
            match (listed_plain, store) {
                (true, _) => assert_eq!(hashed, Ok(plain), "{store}"),
                (false, r#"{"webdis": {}}"#) => {
                    let t = hashed.unwrap();
                    assert_eq!(
                        (t.plan, t.digest, t.plain),
                        (plain.plan, plain.digest, None)
                    );
                }
                (false, _) => assert_eq!(hashed.unwrap_err().status, 400, "{store}"),
            }
        }
    }
}

#[test]
fn an_unlisted_digest_is_a_404_under_unknown_keys_reject() {
    for store in STORES {
        let p = listed_policy(store, "reject");
        assert_eq!(resolved(&p, by_digest(b"unlisted")), Err(404));
        assert_eq!(resolved(&p, KeyName::Plain(b"unlisted".to_vec())), Err(404));
        assert_eq!(
            resolved(&p, by_digest(b"plain-over")),
            Ok(("overrides[0]".into(), true))
        );
    }
    let p = listed_policy(STORES[0], "reject");
    assert_eq!(
        resolved(&p, by_digest(b"hashed-pro")),
        Ok(("pro".into(), false))
    );
}

#[test]
fn a_digest_the_store_cannot_address_is_refused_saying_what_to_send() {
    let detail = |store: &str| {
        let p = listed_policy(store, "default_plan");
        let reply = target::target(&p, by_digest(b"unlisted")).unwrap_err();
        assert_eq!(reply.status, 400);
        reply.body
    };
    let secret = detail(STORES[1]);
    assert!(secret.contains("with store.webdis.key_hash_secret its Redis key is an HMAC of the plain key. Send the plain key instead"), "{secret}");
    let local = detail(STORES[2]);
    assert!(
        local.contains(
            "local slots are chosen by a keyed hash of the plain key. Send the plain key instead"
        ),
        "{local}"
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
