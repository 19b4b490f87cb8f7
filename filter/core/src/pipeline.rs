//! One request's path through the filter, host-free: identify the key, let a
//! store decide, turn the outcome into an action and the events to count.
//!
//! The glue calls [`start`], asks its store when told to, and calls
//! [`finish`] with what the store said; both return the [`Events`] to add to
//! the metrics, so what is counted is decided (and tested) here.

use std::borrow::Cow;

use crate::applied::Applied;
use crate::gcra::Decision;
use crate::hash::KeyHash;
use crate::key::RequestHeaders;
use crate::per_limit::PerLimit;
use crate::policy::{Identity, Policy};
use crate::response::{self, LocalReply};
use crate::slots::{Outcome, Placement};
use crate::webdis::FailureClass;

/// What the filter does with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
// A decision carries one state per limit (up to 16) by value: boxing it
// would allocate on every request.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Forward it; the response gets these quota headers, if any.
    Continue(Option<Quota>),
    /// Answer it here.
    Respond(LocalReply),
}

/// Enough to write the quota headers on the upstream's response later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub applied: Applied,
    pub decision: Decision,
}

/// Things worth counting. Each maps to one metric. A new event is listed
/// in `Event::PLAIN` too, which gives it its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Allowed,
    Throttled,
    ShadowThrottled,
    MissingKey,
    InvalidKey,
    CasRetriesExhausted,
    /// A request that met at least one CAS conflict (and retried).
    CasConflict,
    SlotEviction,
    StoreError,
    FailureModeAllowed,
    FailureModeDenied,
    /// A call to webdis.
    BackendCall,
    /// A request denied from the local "denied until" table, with no call.
    BackendCacheHit,
    /// A failed call to webdis, by class.
    BackendError(FailureClass),
    /// Every candidate slot held a throttled key: the newcomer was denied.
    SlotTableFull,
    /// Shadow mode let through a request that would have been a 401.
    ShadowMissingKey,
    /// Shadow mode let through a request that would have been a 400.
    ShadowInvalidKey,
    /// Shadow mode let through a store failure that `failure_mode: deny`
    /// would have answered 503.
    ShadowFailureDenied,
    /// A key no plan lists, under `unknown_keys: reject`.
    UnknownKey,
    /// Shadow mode let through a request with an unregistered key.
    ShadowUnknownKey,
    /// A 400 for the request's cost or path (the rules could not apply).
    BadRequest,
    /// Redis put the key on a plan the configuration does not know
    /// (`plans_from_redis`): the configuration's plan applied.
    BackendUnknownPlan,
    /// A request to the introspection path (answered here, costing nothing).
    Introspection,
}

impl Event {
    /// Every event that is not a backend error (a new event goes here too).
    const PLAIN: [Event; 22] = [
        Event::Allowed,
        Event::Throttled,
        Event::ShadowThrottled,
        Event::MissingKey,
        Event::InvalidKey,
        Event::CasRetriesExhausted,
        Event::CasConflict,
        Event::SlotEviction,
        Event::StoreError,
        Event::FailureModeAllowed,
        Event::FailureModeDenied,
        Event::BackendCall,
        Event::BackendCacheHit,
        Event::SlotTableFull,
        Event::ShadowMissingKey,
        Event::ShadowInvalidKey,
        Event::ShadowFailureDenied,
        Event::UnknownKey,
        Event::ShadowUnknownKey,
        Event::BadRequest,
        Event::BackendUnknownPlan,
        Event::Introspection,
    ];

    /// Every event, each at its [`Event::index`]: the plain ones, then one
    /// backend error per [`FailureClass`].
    // Built at compile time: an index out of range fails the build.
    #[allow(clippy::indexing_slicing)]
    pub const ALL: [Event; Event::PLAIN.len() + FailureClass::ALL.len()] = {
        let mut all = [Event::Allowed; Event::PLAIN.len() + FailureClass::ALL.len()];
        let mut i = 0;
        while i < all.len() {
            all[i] = match i.checked_sub(Event::PLAIN.len()) {
                None => Event::PLAIN[i],
                Some(class) => Event::BackendError(FailureClass::ALL[class]),
            };
            i += 1;
        }
        all
    };

    /// The event's position in [`Event::ALL`], for per-event tables.
    pub fn index(self) -> usize {
        match self {
            Event::BackendError(class) => Event::PLAIN.len() + class.index(),
            plain => Event::PLAIN
                .iter()
                .position(|e| *e == plain)
                .unwrap_or_default(),
        }
    }

    /// The metric's name, after the filter's prefix.
    pub fn metric_name(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Event::Allowed => "allowed",
            Event::Throttled => "throttled",
            Event::ShadowThrottled => "shadow_throttled",
            Event::MissingKey => "missing_key",
            Event::InvalidKey => "invalid_key",
            Event::CasRetriesExhausted => "cas_retries_exhausted",
            Event::CasConflict => "cas_conflicts",
            Event::SlotEviction => "slot_evictions",
            Event::StoreError => "store_errors",
            Event::FailureModeAllowed => "failure_mode_allowed",
            Event::FailureModeDenied => "failure_mode_denied",
            Event::BackendCall => "backend_calls",
            Event::BackendCacheHit => "backend_cache_hits",
            Event::BackendError(class) => {
                return Cow::Owned(format!("backend_errors_{}", class.name()))
            }
            Event::SlotTableFull => "slot_table_full",
            Event::ShadowMissingKey => "shadow_missing_key",
            Event::ShadowInvalidKey => "shadow_invalid_key",
            Event::ShadowFailureDenied => "shadow_failure_denied",
            Event::UnknownKey => "unknown_key",
            Event::ShadowUnknownKey => "shadow_unknown_key",
            Event::BadRequest => "bad_request",
            Event::BackendUnknownPlan => "backend_unknown_plans",
            Event::Introspection => "introspections",
        })
    }
}

/// A small set of events, without allocating: one bit per [`Event::index`],
/// and which rules matched and which limits denied (their counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    bits: u32,
    /// Bit `i`: rule `i` matched the request.
    pub rules: u32,
    /// The limits that denied it, by [`crate::gcra::Limit::index`].
    pub denied_limits: PerLimit<u16>,
}

const _: () = assert!(Event::ALL.len() <= u32::BITS as usize);

impl Events {
    pub fn of(events: &[Event]) -> Events {
        let mut set = Events::default();
        for e in events {
            set.insert(*e);
        }
        set
    }

    pub fn insert(&mut self, event: Event) {
        self.bits |= 1 << event.index();
    }

    pub fn contains(&self, event: Event) -> bool {
        self.bits & (1 << event.index()) != 0
    }

    /// Whether the request was throttled (or would have been, in shadow).
    pub fn throttled(&self) -> bool {
        self.contains(Event::Throttled) || self.contains(Event::ShadowThrottled)
    }

    /// The events alone, without which rules and limits they concern.
    pub fn plain(&self) -> Events {
        Events {
            bits: self.bits,
            ..Events::default()
        }
    }

    /// The events held, in the order of [`Event::ALL`].
    pub fn iter(self) -> impl Iterator<Item = Event> {
        Event::ALL
            .into_iter()
            .enumerate()
            .filter(move |(i, _)| self.bits & (1 << i) != 0)
            .map(|(_, event)| event)
    }
}

/// Whose counter a decision is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject<'a> {
    Key(Cow<'a, [u8]>),
    /// Requests without a key, in one shared bucket.
    Anonymous,
}

/// The first step: either the answer, or a key for the store to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
// A decision carries one state per limit (up to 16) by value: boxing it
// would allocate on every request.
#[allow(clippy::large_enum_variant)]
pub enum Start<'a> {
    Done(Action, Events),
    /// Ask the store; pass `events` on to [`finish`].
    Decide {
        subject: Subject<'a>,
        hash: KeyHash,
        applied: Applied,
        events: Events,
    },
    /// The introspection path: read the key's state on `applied` (every
    /// limit it holds) without spending, and pass the reading to
    /// [`inspected`].
    Inspect {
        subject: Subject<'a>,
        hash: KeyHash,
        applied: Applied,
        events: Events,
    },
}

pub fn start<'a>(policy: &Policy, headers: &impl RequestHeaders<'a>) -> Start<'a> {
    if policy.introspects(headers) {
        return inspect(policy, headers);
    }
    let (subject, hash, plan, mut events) = match policy.identify(headers) {
        Identity::Key { key, hash, plan } => (Subject::Key(key), hash, plan, Events::default()),
        Identity::Anonymous { hash, plan } => (
            Subject::Anonymous,
            hash,
            plan,
            Events::of(&[Event::MissingKey]),
        ),
        Identity::MissingAllowed => {
            return Start::Done(Action::Continue(None), Events::of(&[Event::MissingKey]))
        }
        // Shadow mode never denies: what would be a 401 or 400 goes on,
        // unlimited (there is no key to count), and is counted.
        Identity::MissingRejected if policy.shadow_mode => {
            return Start::Done(
                Action::Continue(None),
                Events::of(&[Event::MissingKey, Event::ShadowMissingKey]),
            )
        }
        Identity::MissingRejected => {
            return Start::Done(
                Action::Respond(response::missing_key(&policy.replies)),
                Events::of(&[Event::MissingKey]),
            )
        }
        Identity::Invalid(_) if policy.shadow_mode => {
            return Start::Done(
                Action::Continue(None),
                Events::of(&[Event::InvalidKey, Event::ShadowInvalidKey]),
            )
        }
        Identity::Invalid(error) => {
            return Start::Done(
                Action::Respond(response::invalid_key(&policy.replies, error)),
                Events::of(&[Event::InvalidKey]),
            )
        }
        Identity::Unknown if policy.shadow_mode => {
            return Start::Done(
                Action::Continue(None),
                Events::of(&[Event::UnknownKey, Event::ShadowUnknownKey]),
            )
        }
        Identity::Unknown => {
            return Start::Done(
                Action::Respond(response::unknown_key()),
                Events::of(&[Event::UnknownKey]),
            )
        }
    };
    match policy.applied(plan, headers) {
        Ok(applied) if !applied.is_empty() => Start::Decide {
            subject,
            hash,
            applied,
            events,
        },
        // A plan without limits that no rule adds to: unlimited.
        Ok(_) => {
            events.insert(Event::Allowed);
            Start::Done(Action::Continue(None), events)
        }
        // Shadow mode never denies, but a cost it cannot read cannot be
        // counted either: the request goes on, uncounted.
        Err(_) if policy.shadow_mode => {
            events.insert(Event::BadRequest);
            Start::Done(Action::Continue(None), events)
        }
        Err(error) => {
            events.insert(Event::BadRequest);
            Start::Done(
                Action::Respond(response::bad_request(policy, &error)),
                events,
            )
        }
    }
}

/// The introspection path's first step: only the caller's own key, found
/// as for any request; without one it is refused as any request would be
/// under `missing_key: reject` (there is no key to report on), in every
/// mode.
fn inspect<'a>(policy: &Policy, headers: &impl RequestHeaders<'a>) -> Start<'a> {
    let mut events = Events::of(&[Event::Introspection]);
    let reply = match policy.identify(headers) {
        Identity::Key { key, hash, plan } => {
            let applied = policy.all_of_plan(plan);
            if applied.is_empty() {
                // An unlimited key: nothing to read.
                let reply = response::introspection(&policy.headers, &[], &Decision::unlimited());
                return Start::Done(Action::Respond(reply), events);
            }
            return Start::Inspect {
                subject: Subject::Key(key),
                hash,
                applied,
                events,
            };
        }
        Identity::Invalid(error) => {
            events.insert(Event::InvalidKey);
            response::invalid_key(&policy.replies, error)
        }
        Identity::Unknown => {
            events.insert(Event::UnknownKey);
            response::unknown_key()
        }
        Identity::Anonymous { .. } | Identity::MissingAllowed | Identity::MissingRejected => {
            events.insert(Event::MissingKey);
            response::missing_key(&policy.replies)
        }
    };
    Start::Done(Action::Respond(reply), events)
}

/// The introspection path's last step: the key's state as read (a
/// decision at cost 0, see [`crate::gcra::peek`]) becomes the 200 reply; a
/// store that cannot be read, a 503 whatever the failure mode (there is
/// nothing to forward).
pub fn inspected(
    policy: &Policy,
    applied: &Applied,
    mut events: Events,
    reading: Result<Decision, StoreFailure>,
) -> (Action, Events) {
    match reading {
        Ok(decision) => {
            let limits = policy.limits(applied);
            let reply = response::introspection(&policy.headers, limits.as_slice(), &decision);
            (Action::Respond(reply), events)
        }
        Err(failure) => {
            events.insert(Event::StoreError);
            if let StoreFailure::Backend(class) = failure {
                events.insert(Event::BackendError(class));
            }
            (Action::Respond(response::unavailable()), events)
        }
    }
}

/// The store could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// A host call failed (shared data, the clock).
    Host,
    /// A webdis call failed, in this way.
    Backend(FailureClass),
}

/// The last step: the store's outcome (or failure) becomes the action.
pub fn finish(
    policy: &Policy,
    applied: &Applied,
    mut events: Events,
    outcome: Result<Outcome, StoreFailure>,
) -> (Action, Events) {
    let decision = match outcome {
        Ok(Outcome::Decided {
            decision,
            placement,
            conflicts,
        }) => {
            if placement == Placement::Evicted {
                events.insert(Event::SlotEviction);
            }
            if conflicts > 0 {
                events.insert(Event::CasConflict);
            }
            decision
        }
        Ok(Outcome::RetriesExhausted { retry_after_nanos }) => {
            events.insert(Event::CasConflict);
            events.insert(Event::CasRetriesExhausted);
            Decision::denied_for(retry_after_nanos)
        }
        Ok(Outcome::Full { retry_after_nanos }) => {
            events.insert(Event::SlotTableFull);
            Decision::denied_for(retry_after_nanos)
        }
        Err(failure) => {
            events.insert(Event::StoreError);
            if let StoreFailure::Backend(class) = failure {
                events.insert(Event::BackendError(class));
            }
            return match policy.failure_mode {
                crate::config::FailureMode::Allow => {
                    events.insert(Event::FailureModeAllowed);
                    (Action::Continue(None), events)
                }
                crate::config::FailureMode::Deny if policy.shadow_mode => {
                    events.insert(Event::ShadowFailureDenied);
                    (Action::Continue(None), events)
                }
                crate::config::FailureMode::Deny => {
                    events.insert(Event::FailureModeDenied);
                    (Action::Respond(response::unavailable()), events)
                }
            };
        }
    };
    let quota = Quota {
        applied: *applied,
        decision,
    };
    events.rules = applied.rules;
    if decision.allowed {
        events.insert(Event::Allowed);
        return (Action::Continue(Some(quota)), events);
    }
    let limits = policy.limits(applied);
    events.denied_limits = limits
        .iter()
        .enumerate()
        .filter(|(i, _)| decision.denied_by & 1u32.checked_shl(*i as u32).unwrap_or(0) != 0)
        .map(|(_, l)| l.index)
        .collect();
    if policy.shadow_mode {
        events.insert(Event::ShadowThrottled);
        (Action::Continue(Some(quota)), events)
    } else {
        events.insert(Event::Throttled);
        let reply = response::throttled(&policy.headers, limits.as_slice(), &decision);
        (Action::Respond(reply), events)
    }
}

/// Writes the quota headers of a forwarded response through `emit` (see
/// [`response::write_quota_headers`]).
pub fn write_response_headers(
    policy: &Policy,
    quota: &Quota,
    buf: &mut String,
    emit: impl FnMut(&'static str, &str),
) {
    let limits = policy.limits(&quota.applied);
    response::write_quota_headers(
        &policy.headers,
        limits.as_slice(),
        &quota.decision,
        buf,
        emit,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{default_applied, policy, Headers, MemStore, S};

    /// `finish` on the default plan, its events without their detail.
    fn finish_default(
        p: &Policy,
        events: Events,
        outcome: Result<Outcome, StoreFailure>,
    ) -> (Action, Events) {
        let (action, events) = finish(p, &default_applied(p), events, outcome);
        (action, events.plain())
    }

    /// The whole local path, as the glue runs it.
    fn run(p: &Policy, store: &mut MemStore, path: &str, now: u64) -> (Action, Events) {
        run_method(p, store, "GET", path, now)
    }

    fn run_method(
        p: &Policy,
        store: &mut MemStore,
        method: &str,
        path: &str,
        now: u64,
    ) -> (Action, Events) {
        let headers = Headers::of(&[(":method", method.as_bytes()), (":path", path.as_bytes())]);
        match start(p, &headers.map()) {
            Start::Done(action, events) => (action, events),
            Start::Inspect {
                hash,
                applied,
                events,
                ..
            } => {
                let table = p.slot_table().unwrap();
                let reading = table
                    .peek(store, hash, p.limits(&applied).as_slice(), now)
                    .map_err(|()| StoreFailure::Host);
                let (action, events) = inspected(p, &applied, events, reading);
                (action, events.plain())
            }
            Start::Decide {
                hash,
                applied,
                events,
                ..
            } => {
                let table = p.slot_table().unwrap();
                let outcome = table
                    .decide(store, hash, p.limits(&applied).as_slice(), now)
                    .map_err(|()| StoreFailure::Host);
                let (action, events) = finish(p, &applied, events, outcome);
                (action, events.plain())
            }
        }
    }

    fn status(action: &Action) -> u32 {
        match action {
            Action::Continue(_) => 200,
            Action::Respond(reply) => reply.status,
        }
    }

    const INTROSPECTED: &str = r#"{"limits": ["3/s"],
        "rules": [{"name": "orders", "match": {"path": "/orders"}, "limits": ["2/min"]},
                  {"name": "pro-only", "match": {"plans": ["pro"]}, "limits": ["9/min"]}],
        "plans": {"pro": ["5/s"]}, "keys": {"pro": ["p"]},
        "introspection": {"path": "/.well-known/ratelimit"}}"#;

    fn reply(action: Action) -> LocalReply {
        match action {
            Action::Respond(reply) => reply,
            other => panic!("{other:?}"),
        }
    }

    fn header<'r>(reply: &'r LocalReply, name: &str) -> Option<&'r str> {
        reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn introspection_reports_every_limit_of_the_key_and_spends_nothing() {
        let p = policy(INTROSPECTED);
        let mut store = MemStore::default();
        assert_eq!(status(&run(&p, &mut store, "/orders?api_key=k", S).0), 200);
        let writes = store.writes;
        for (method, path) in [
            ("GET", "/.well-known/ratelimit?api_key=k"),
            ("HEAD", "//.well-known/./ratelimit/?api_key=k"),
            ("GET", "/.well-known/rate%6Cimit?api_key=k"),
        ] {
            let (action, events) = run_method(&p, &mut store, method, path, S);
            assert_eq!(events, Events::of(&[Event::Introspection]), "{path}");
            let reply = reply(action);
            assert_eq!(reply.status, 200);
            // Its plan's limit and the rules that may apply to its plan
            // (not the `pro` plan's rule), as one request left them.
            assert_eq!(
                header(&reply, "ratelimit"),
                Some(r#""3/s";r=2;t=1, "orders:2/min";r=1;t=30"#)
            );
            assert_eq!(
                header(&reply, "ratelimit-policy"),
                Some(r#""3/s";q=3;w=1, "orders:2/min";q=2;w=60"#)
            );
            let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"limits": [
                    {"name": "3/s", "quota": 3, "window": 1, "remaining": 2, "reset": 1},
                    {"name": "orders:2/min", "quota": 2, "window": 60, "remaining": 1, "reset": 30},
                ]})
            );
        }
        assert_eq!(store.writes, writes, "introspection writes nothing");
        // The next requests are admitted exactly as without it.
        assert_eq!(status(&run(&p, &mut store, "/orders?api_key=k", S).0), 200);
        assert_eq!(status(&run(&p, &mut store, "/orders?api_key=k", S).0), 429);
        // A fresh key reads full buckets; a `pro` key its own limits.
        let fresh = reply(run(&p, &mut store, "/.well-known/ratelimit?api_key=new", S).0);
        assert_eq!(
            header(&fresh, "ratelimit"),
            Some(r#""3/s";r=3;t=0, "orders:2/min";r=2;t=0"#)
        );
        let pro = reply(run(&p, &mut store, "/.well-known/ratelimit?api_key=p", S).0);
        assert_eq!(
            header(&pro, "ratelimit-policy"),
            Some(r#""5/s";q=5;w=1, "orders:2/min";q=2;w=60, "pro-only:9/min";q=9;w=60"#)
        );
    }

    #[test]
    fn introspection_needs_a_usable_key_and_only_answers_its_path() {
        let p = policy(INTROSPECTED);
        let mut store = MemStore::default();
        let path = "/.well-known/ratelimit";
        let (a, e) = run(&p, &mut store, path, S);
        assert_eq!(
            (status(&a), e),
            (401, Events::of(&[Event::Introspection, Event::MissingKey]))
        );
        let (a, e) = run(&p, &mut store, &format!("{path}?api_key=%zz"), S);
        assert_eq!(
            (status(&a), e),
            (400, Events::of(&[Event::Introspection, Event::InvalidKey]))
        );
        let reject = policy(
            r#"{"plans": {"a": ["1/s"]}, "keys": {"a": ["x"]}, "unknown_keys": "reject",
                "introspection": {"path": "/usage"}}"#,
        );
        let (a, e) = run(&reject, &mut store, "/usage?api_key=y", S);
        assert_eq!(
            (status(&a), e),
            (401, Events::of(&[Event::Introspection, Event::UnknownKey]))
        );
        // Even where a missing key is let through, the path needs one.
        let anon = policy(
            r#"{"limits": ["1/s"], "missing_key": "anonymous", "introspection": {"path": "/usage"}}"#,
        );
        assert_eq!(status(&run(&anon, &mut store, "/usage", S).0), 401);
        // Another method, or another path, is an ordinary request.
        let (_, e) = run_method(&p, &mut store, "POST", &format!("{path}?api_key=k"), S);
        assert_eq!(e, Events::of(&[Event::Allowed]));
        let (_, e) = run(&p, &mut store, &format!("{path}/x?api_key=k"), S);
        assert_eq!(e, Events::of(&[Event::Allowed]));
        // Off by default.
        let off = policy(r#"{"limits": ["1/s"]}"#);
        let (_, e) = run(&off, &mut store, &format!("{path}?api_key=k"), S);
        assert_eq!(e, Events::of(&[Event::Allowed]));
    }

    #[test]
    fn introspection_paths_are_checked_at_load() {
        for bad in ["", "usage", "/usage?x=1", "/a//b", "/a/../b", "/usage/"] {
            let json = format!(r#"{{"limits": ["1/s"], "introspection": {{"path": "{bad}"}}}}"#);
            let error = Policy::from_json(json.as_bytes()).unwrap_err();
            assert!(
                error.to_string().contains("introspection.path"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn tutorial_table_one_instance() {
        let p = policy(r#"{"limits": ["1/s"]}"#);
        let mut store = MemStore::default();
        let mut ok = 0;
        let mut throttled = 0;
        for i in 0..100 {
            let (action, events) = run(&p, &mut store, "/?api_key=1234", 10 * S + i * S / 10);
            match status(&action) {
                200 => {
                    ok += 1;
                    assert_eq!(events, Events::of(&[Event::Allowed]));
                }
                429 => {
                    throttled += 1;
                    assert_eq!(events, Events::of(&[Event::Throttled]));
                }
                other => panic!("{other}"),
            }
        }
        assert_eq!((ok, throttled), (10, 90));
    }

    #[test]
    fn allowed_requests_carry_quota_for_the_response() {
        let p = policy(r#"{"limits": ["3/s"]}"#);
        let mut store = MemStore::default();
        let (action, _) = run(&p, &mut store, "/?api_key=k", S);
        let Action::Continue(Some(quota)) = action else {
            panic!("{action:?}")
        };
        let mut written = Vec::new();
        write_response_headers(&p, &quota, &mut String::new(), |name, value| {
            written.push((name, value.to_string()));
        });
        assert_eq!(
            written,
            vec![
                ("ratelimit-policy", "\"3/s\";q=3;w=1".to_string()),
                ("ratelimit", "\"3/s\";r=2;t=1".to_string())
            ]
        );
    }

    #[test]
    fn shadow_mode_counts_but_never_denies() {
        let p = policy(r#"{"limits": ["1/min"], "shadow_mode": true}"#);
        let mut store = MemStore::default();
        let (first, e1) = run(&p, &mut store, "/?api_key=k", S);
        assert_eq!(status(&first), 200);
        assert_eq!(e1, Events::of(&[Event::Allowed]));
        let (second, e2) = run(&p, &mut store, "/?api_key=k", S);
        assert_eq!(status(&second), 200);
        assert_eq!(e2, Events::of(&[Event::ShadowThrottled]));
        let Action::Continue(Some(quota)) = second else {
            panic!()
        };
        assert!(!quota.decision.allowed);
    }

    #[test]
    fn shadow_mode_lets_every_would_be_denial_through_and_counts_it() {
        let p = policy(r#"{"limits": ["1/min"], "shadow_mode": true, "failure_mode": "deny"}"#);
        let mut store = MemStore::default();
        let (a, e) = run(&p, &mut store, "/", S);
        assert_eq!(
            (a, e),
            (
                Action::Continue(None),
                Events::of(&[Event::MissingKey, Event::ShadowMissingKey])
            )
        );
        let (a, e) = run(&p, &mut store, "/?api_key=%zz", S);
        assert_eq!(
            (a, e),
            (
                Action::Continue(None),
                Events::of(&[Event::InvalidKey, Event::ShadowInvalidKey])
            )
        );
        assert_eq!(
            finish_default(&p, Events::default(), Err(StoreFailure::Host)),
            (
                Action::Continue(None),
                Events::of(&[Event::StoreError, Event::ShadowFailureDenied])
            )
        );
        for outcome in [
            Outcome::RetriesExhausted {
                retry_after_nanos: 0,
            },
            Outcome::Full {
                retry_after_nanos: S,
            },
        ] {
            let (a, _) = finish_default(&p, Events::default(), Ok(outcome));
            assert!(matches!(a, Action::Continue(_)), "{outcome:?}");
        }
    }

    #[test]
    fn missing_invalid_and_unlimited_keys() {
        let p = policy(r#"{"limits": ["1/s"], "overrides": [{"key": "free", "limits": []}]}"#);
        let mut store = MemStore::default();
        let (a, e) = run(&p, &mut store, "/", S);
        assert_eq!((status(&a), e), (401, Events::of(&[Event::MissingKey])));
        let (a, e) = run(&p, &mut store, "/?api_key=%zz", S);
        assert_eq!((status(&a), e), (400, Events::of(&[Event::InvalidKey])));
        for _ in 0..5 {
            let (a, e) = run(&p, &mut store, "/?api_key=free", S);
            assert_eq!(
                (a, e),
                (Action::Continue(None), Events::of(&[Event::Allowed]))
            );
        }
        assert_eq!(store.reads, 0, "unlimited keys never touch the store");

        let anon = policy(r#"{"limits": ["1/min"], "missing_key": "anonymous"}"#);
        let (a, e) = run(&anon, &mut store, "/", S);
        assert_eq!(
            (status(&a), e),
            (200, Events::of(&[Event::MissingKey, Event::Allowed]))
        );
        let (a, e) = run(&anon, &mut store, "/?x=1", S);
        assert_eq!(
            (status(&a), e),
            (429, Events::of(&[Event::MissingKey, Event::Throttled]))
        );

        let allow = policy(r#"{"limits": ["1/min"], "missing_key": "allow"}"#);
        let (a, e) = run(&allow, &mut store, "/", S);
        assert_eq!(
            (a, e),
            (Action::Continue(None), Events::of(&[Event::MissingKey]))
        );
    }

    #[test]
    fn exhausted_retries_deny_with_the_wait_the_state_implies() {
        let p = policy(r#"{"limits": ["10/s", "100/min"]}"#);
        // The state read after the last conflict would deny for 61.5 s.
        let exhausted = |retry_after_nanos| {
            finish_default(
                &p,
                Events::default(),
                Ok(Outcome::RetriesExhausted { retry_after_nanos }),
            )
        };
        let Action::Respond(reply) = exhausted(61_500_000_000).0 else {
            panic!()
        };
        assert!(reply.headers.contains(&("retry-after", "62".to_string())));
        // It would admit: the smallest honest Retry-After, one second.
        let (action, events) = exhausted(0);
        assert_eq!(
            events,
            Events::of(&[
                Event::CasConflict,
                Event::CasRetriesExhausted,
                Event::Throttled
            ])
        );
        let Action::Respond(reply) = action else {
            panic!()
        };
        assert_eq!(reply.status, 429);
        assert!(reply.headers.contains(&("retry-after", "1".to_string())));
    }

    #[test]
    fn store_failures_follow_the_failure_mode() {
        let allow = policy(r#"{"limits": ["1/s"]}"#);
        assert_eq!(
            finish_default(&allow, Events::default(), Err(StoreFailure::Host)),
            (
                Action::Continue(None),
                Events::of(&[Event::StoreError, Event::FailureModeAllowed])
            )
        );
        let deny = policy(r#"{"limits": ["1/s"], "failure_mode": "deny"}"#);
        let (action, events) = finish_default(
            &deny,
            Events::default(),
            Err(StoreFailure::Backend(FailureClass::Timeout)),
        );
        assert_eq!(
            events,
            Events::of(&[
                Event::StoreError,
                Event::FailureModeDenied,
                Event::BackendError(FailureClass::Timeout)
            ])
        );
        assert_eq!(status(&action), 503);
    }

    #[test]
    fn events_set_round_trips() {
        let e = Events::of(&[Event::Throttled, Event::SlotEviction]);
        assert_eq!(
            e.iter().collect::<Vec<_>>(),
            vec![Event::Throttled, Event::SlotEviction]
        );
        let names: std::collections::HashSet<_> =
            Event::ALL.iter().map(|e| e.metric_name()).collect();
        assert_eq!(names.len(), Event::ALL.len());
    }

    #[test]
    fn every_event_has_its_own_index_and_keeps_its_metric_name() {
        for (i, event) in Event::ALL.iter().enumerate() {
            assert_eq!(event.index(), i, "{event:?}");
        }
        let mut names: Vec<_> = Event::ALL.iter().map(|e| e.metric_name()).collect();
        names.sort();
        // The names operators and the e2e tests read in /stats.
        let expected = [
            "allowed",
            "backend_cache_hits",
            "backend_calls",
            "backend_errors_dispatch",
            "backend_errors_parse",
            "backend_errors_redis",
            "backend_errors_status",
            "backend_errors_timeout",
            "backend_errors_transport",
            "backend_unknown_plans",
            "bad_request",
            "cas_conflicts",
            "cas_retries_exhausted",
            "failure_mode_allowed",
            "failure_mode_denied",
            "introspections",
            "invalid_key",
            "missing_key",
            "shadow_failure_denied",
            "shadow_invalid_key",
            "shadow_missing_key",
            "shadow_throttled",
            "shadow_unknown_key",
            "slot_evictions",
            "slot_table_full",
            "store_errors",
            "throttled",
            "unknown_key",
        ];
        assert_eq!(names, expected);
    }
}
