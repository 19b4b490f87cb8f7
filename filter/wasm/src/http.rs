//! The per-request context: a thin shell around `ratelimit_core::pipeline`.
//!
//! Local store: decided at once, in `on_http_request_headers`. Global
//! store: denied at once from the local cache when it already knows, else
//! paused in the root context's queue until a batch call decides it
//! (`callouts.rs`), which then finishes it (`verdict.rs`).

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use ratelimit_core::admin::{self, Admin, Op};
use ratelimit_core::applied::Applied;
use ratelimit_core::batch::queue::{RequestId, Ticket};
use ratelimit_core::gcra::Clock;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::pipeline::{self, Event, Events, Quota, Start, StoreFailure, Subject};
use ratelimit_core::response::{self, LocalReply};
use ratelimit_core::slots::Rewritten;

use crate::admin_calls::AdminCall;
use crate::callouts::Callouts;
use crate::filter::{Filter, Store};
use crate::host::{self, LOG_INFO, LOG_WARN};
use crate::request_headers::LazyHeaders;
use crate::settlement::{SettleKey, Settling};
use crate::shared_store::SharedStore;
use crate::verdict::{carry_out, decided, respond, Pending};
use crate::webdis_store::{call_nonce, WebdisStore};

pub struct Request {
    filter: Option<Rc<Filter>>,
    /// The root's webdis calls, which this request's call joins.
    callouts: Rc<Callouts>,
    context_id: u32,
    /// Set when the request was let through: its response gets these
    /// quota headers. Local replies carry theirs already. Shared with the
    /// request's webdis call, which the root context finishes.
    quota: Rc<Cell<Option<Quota>>>,
    /// This request's place in the root's queue, released when it ends.
    call: Option<RequestId>,
    /// The host clock when this request was decided, once read.
    now: Option<u64>,
    /// An admin call of this request waits for Redis.
    admin_call: bool,
    /// Where a request that may settle its cost from the response keeps
    /// its counters (set only when a settling rule matched).
    settle_key: Option<SettleKey>,
    /// Its reservations waiting for the response to say its real cost.
    settling: Option<Settling>,
}

impl Request {
    pub fn new(filter: Option<Rc<Filter>>, callouts: Rc<Callouts>, context_id: u32) -> Request {
        Request {
            filter,
            callouts,
            context_id,
            quota: Rc::default(),
            call: None,
            now: None,
            admin_call: false,
            settle_key: None,
            settling: None,
        }
    }

    /// Reads the host clock, remembering it for the metrics.
    fn clock(&mut self) -> Result<u64, host::Status> {
        let now = host::now_nanos()?;
        self.now = Some(now);
        Ok(now)
    }

    fn apply(&mut self, filter: &Filter, action: pipeline::Action, events: Events) -> Action {
        carry_out(filter, &self.quota, self.now, action, events)
    }

    /// The admin API (`ratelimit_core::admin`): one operator call on this
    /// Envoy's shared data, answered with the key's usage after it, and
    /// logged under the key's SHA-256, never the key.
    fn admin(&mut self, filter: &Filter, admin: &Admin, headers: &LazyHeaders) -> Action {
        let command = match admin.route(&headers) {
            Ok(command) => command,
            Err(reply) => {
                host::log(
                    LOG_INFO,
                    &format!(
                        "plugin '{}': admin call refused ({})",
                        filter.plugin_name(),
                        reply.status
                    ),
                );
                return respond(&reply);
            }
        };
        let digest = admin::hex(&command.key.digest());
        let op = command.op;
        let reply = match admin::target::target(&filter.policy, command.key) {
            Err(reply) => reply,
            Ok(target) => match &filter.store {
                Store::Webdis(webdis) => {
                    return self.admin_global(filter, webdis, op, target, digest)
                }
                Store::Local { .. } => self.admin_call(filter, op, &target),
            },
        };
        crate::admin_calls::log_outcome(filter, op, &digest, &reply.status.to_string());
        respond(&reply)
    }

    /// Global mode: one Redis call, sent and answered by the root
    /// (`admin_calls.rs`), which also logs it.
    fn admin_global(
        &mut self,
        filter: &Filter,
        webdis: &WebdisStore,
        op: Op,
        target: admin::target::Target,
        digest: String,
    ) -> Action {
        let policy = &filter.policy;
        let applied = policy.all_of_plan(target.plan);
        let limits = policy.limits(&applied);
        // By the plain key when known; else by its digest (`target` allows
        // that only without a secret, which the store checks again).
        let (redis_key, hash) = match &target.plain {
            Some((key, hash)) => (
                Some(webdis.redis_key(&Subject::Key(key.as_slice().into()))),
                Some(*hash),
            ),
            None => (webdis.digest_redis_key(&target.digest), None),
        };
        let Some(redis_key) = redis_key else {
            return respond(&response::unavailable());
        };
        let nonce = call_nonce(u64::from(self.context_id));
        let path = admin::redis::path(nonce, &redis_key, webdis.epoch_key(), op, limits.as_slice());
        let call = AdminCall::new(self.context_id, path, nonce, applied, op, digest, hash);
        if !self.callouts.admin(call) {
            return respond(&response::unavailable());
        }
        self.admin_call = true;
        Action::Pause
    }

    fn admin_call(
        &mut self,
        filter: &Filter,
        op: Op,
        target: &admin::target::Target,
    ) -> LocalReply {
        let policy = &filter.policy;
        // Local mode always knows the plain key (`target` refuses others).
        let (Store::Local { table, prefix }, Some((_, hash))) = (&filter.store, &target.plain)
        else {
            return response::unavailable();
        };
        let hash = *hash;
        let applied = policy.all_of_plan(target.plan);
        let limits = policy.limits(&applied);
        let (Ok(now), Ok(wall)) = (self.clock(), filter.wall_clock()) else {
            return response::unavailable();
        };
        let mut store = SharedStore::new(prefix);
        let clock = Clock::local(now, wall);
        let changed = match op {
            Op::Inspect => Ok(Rewritten::Done),
            _ => table.rewrite(&mut store, hash, limits.as_slice(), clock, |l, v, clock| {
                admin::apply(op, l, v, clock)
            }),
        };
        if !matches!(changed, Ok(Rewritten::Done | Rewritten::Fresh)) {
            return response::unavailable();
        }
        let reading = table
            .peek(&mut store, hash, limits.as_slice(), clock)
            .map_err(|_| StoreFailure::Host);
        match pipeline::inspected(policy, &applied, Events::default(), reading) {
            (pipeline::Action::Respond(reply), _) => reply,
            (pipeline::Action::Continue(_), _) => response::unavailable(),
        }
    }

    /// The introspection path: the key's state read without spending,
    /// answered here (`pipeline::inspected`).
    fn inspect(
        &mut self,
        filter: &Filter,
        subject: Subject<'_>,
        hash: KeyHash,
        applied: Applied,
        events: Events,
    ) -> Action {
        let policy = &filter.policy;
        let reading = match &filter.store {
            Store::Local { table, prefix } => {
                let limits = policy.limits(&applied);
                match (self.clock(), filter.wall_clock()) {
                    (Ok(now), Ok(wall)) => table
                        .peek(
                            &mut SharedStore::new(prefix),
                            hash,
                            limits.as_slice(),
                            Clock::local(now, wall),
                        )
                        .map_err(|_| StoreFailure::Host),
                    _ => Err(StoreFailure::Host),
                }
            }
            Store::Webdis(webdis) => {
                return self.decide_global(filter, webdis, subject, hash, applied, events, true)
            }
        };
        let (action, events) = pipeline::inspected(policy, &applied, events, reading);
        self.apply(filter, action, events)
    }

    /// Asks Redis, or the deny cache; `peek` only reads the key's state
    /// (never from the cache, whose denials say nothing of what is left).
    #[allow(clippy::too_many_arguments)]
    fn decide_global(
        &mut self,
        filter: &Filter,
        webdis: &WebdisStore,
        subject: Subject<'_>,
        hash: KeyHash,
        applied: Applied,
        mut events: Events,
        peek: bool,
    ) -> Action {
        let policy = &filter.policy;
        let end = |events, failure| match peek {
            true => pipeline::inspected(policy, &applied, events, Err(failure)),
            false => pipeline::finish(policy, &applied, events, Err(failure)),
        };
        // With plans from Redis, only the rules' limits: the key's plan
        // may have moved since the cache learnt it.
        let cacheable = policy.cacheable(&applied);
        let (Ok(now), Ok(wall)) = (self.clock(), filter.wall_clock()) else {
            let (action, events) = end(events, StoreFailure::Host);
            return self.apply(filter, action, events);
        };
        let limits = policy.limits(&cacheable);
        let cached = match peek {
            true => None,
            // Filed under this worker's admin epoch.
            false => {
                let key = self.callouts.cache_key(hash);
                webdis.cached_denial(key, limits.as_slice(), now, wall)
            }
        };
        if let Some(decision) = cached {
            events.insert(Event::BackendCacheHit);
            let outcome = Ok(decided(decision));
            let (action, events) = pipeline::finish(policy, &cacheable, events, outcome);
            return self.apply(filter, action, events);
        }
        let redis_key = webdis.redis_key(&subject);
        if !peek {
            self.remember_settle_key(filter, hash, &applied, Some(&redis_key));
        }
        let ticket = Ticket {
            context_id: self.context_id,
            redis_key,
            hash,
            applied,
            peek,
        };
        let pending = Pending {
            events,
            quota: self.quota.clone(),
            inspect: peek,
        };
        // The root context sends the call and finishes this request.
        match self.callouts.request(ticket, pending, now) {
            Ok(id) => {
                self.call = Some(id);
                Action::Pause
            }
            Err((pending, error)) => {
                let (action, events) = end(pending.events, filter.backend_failure(&error));
                self.apply(filter, action, events)
            }
        }
    }
}

impl Drop for Request {
    /// Nothing of a request outlives it: if still queued it is never sent;
    /// if its call is out, its decision is dropped when the answer comes.
    fn drop(&mut self) {
        if let Some(id) = self.call.take() {
            self.callouts.release(id);
        }
        if self.admin_call {
            self.callouts.release_admin(self.context_id);
        }
        if let Some(filter) = &self.filter {
            match (
                self.settling.take(),
                self.settle_key.take(),
                self.quota.take(),
            ) {
                (Some(settling), _, _) => settling.abort(filter),
                // Admitted, and gone before its response began.
                (None, Some(_), Some(quota)) => Settling::abort_unanswered(filter, &quota),
                _ => {}
            }
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(filter) = self.filter.clone() else {
            // Unreachable in practice: Envoy creates no request context for
            // a plugin whose configuration failed.
            return respond(&response::unavailable());
        };
        let headers = LazyHeaders::fetch();
        let policy = &filter.policy;
        if let Some(admin) = &policy.admin {
            return self.admin(&filter, admin, &headers);
        }
        match pipeline::start(policy, &&headers) {
            Start::Done(action, events) => self.apply(&filter, action, events),
            Start::Inspect {
                subject,
                hash,
                applied,
                events,
            } => self.inspect(&filter, subject, hash, applied, events),
            Start::Decide {
                subject,
                hash,
                applied,
                events,
            } => self.decide(&filter, subject, hash, applied, events),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(filter) = self.filter.clone() else {
            return Action::Continue;
        };
        if let Some(quota) = self.quota.take() {
            if let Some(key) = self.settle_key.take() {
                self.settling = Settling::begin(&filter, &quota, key);
            }
            let mut buf = String::with_capacity(64);
            pipeline::write_response_headers(&filter.policy, &quota, &mut buf, |name, value| {
                if let Err(status) = host::add_response_header(name, value) {
                    host::log(
                        LOG_WARN,
                        &format!("cannot add {name} (host status {})", status.0),
                    );
                }
            });
        }
        if let Some(settling) = &mut self.settling {
            if settling.on_headers(&filter, &self.callouts, end_of_stream) {
                self.settling = None;
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let (Some(filter), Some(settling)) = (&self.filter, &mut self.settling) {
            if settling.on_body(filter, &self.callouts, body_size, end_of_stream) {
                self.settling = None;
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let (Some(filter), Some(mut settling)) = (&self.filter, self.settling.take()) {
            settling.on_trailers(filter, &self.callouts);
        }
        Action::Continue
    }
}

impl Request {
    /// A request a settling rule matched keeps where its counters are, for
    /// its response (`settlement.rs`): its slot's hash, and in global mode
    /// its Redis key (the one its decision is asked under).
    fn remember_settle_key(
        &mut self,
        filter: &Filter,
        hash: KeyHash,
        applied: &Applied,
        redis_key: Option<&str>,
    ) {
        if applied.rules & filter.policy.settling_rules() != 0 {
            let redis_key = redis_key.map(str::to_string);
            self.settle_key = Some(SettleKey { hash, redis_key });
        }
    }

    /// Decides an admitted key's request in its store.
    fn decide(
        &mut self,
        filter: &Filter,
        subject: Subject<'_>,
        hash: KeyHash,
        applied: Applied,
        events: Events,
    ) -> Action {
        let policy = &filter.policy;
        match &filter.store {
            Store::Local { table, prefix } => {
                self.remember_settle_key(filter, hash, &applied, None);
                let limits = policy.limits(&applied);
                // Counters on the monotonic clock; quotas' calendar on
                // the wall clock (`docs/design.md#calendar-quotas`).
                let clock = match (self.clock(), filter.wall_clock()) {
                    (Ok(now), Ok(wall)) => Ok(Clock::local(now, wall)),
                    _ => Err(()),
                };
                let outcome = match clock {
                    Ok(clock) => table
                        .decide(
                            &mut SharedStore::new(prefix),
                            hash,
                            limits.as_slice(),
                            clock,
                        )
                        .map_err(|status| {
                            host::log(
                                LOG_WARN,
                                &format!("shared data failed (host status {})", status.0),
                            );
                            StoreFailure::Host
                        }),
                    Err(_) => Err(StoreFailure::Host),
                };
                let (action, events) = pipeline::finish(policy, &applied, events, outcome);
                self.apply(filter, action, events)
            }
            Store::Webdis(webdis) => {
                self.decide_global(filter, webdis, subject, hash, applied, events, false)
            }
        }
    }
}
