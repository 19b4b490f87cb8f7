//! The per-request context: a thin shell around `ratelimit_core::pipeline`.
//!
//! Local store: decided at once, in `on_http_request_headers`. Global
//! store: denied at once from the local cache when it already knows, else
//! paused while the root context calls webdis for it (`callouts.rs`), which
//! then finishes it through [`conclude`] and [`carry_out`].

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use ratelimit_core::calls::CallId;
use ratelimit_core::deny_cache;
use ratelimit_core::gcra::Decision;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::header_map;
use ratelimit_core::pipeline::{self, Event, Events, Quota, Start, StoreFailure, Subject};
use ratelimit_core::response::{self, LocalReply};
use ratelimit_core::slots::{Outcome, Placement};
use ratelimit_core::webdis::{self, BackendError};

use crate::host::{self, LOG_ERROR, LOG_WARN};
use crate::request_headers::LazyHeaders;
use crate::root::{Filter, Store};
use crate::shared_store::SharedStore;
use crate::webdis_store::WebdisStore;

pub struct Request {
    filter: Option<Rc<Filter>>,
    context_id: u32,
    /// Set when the request was let through: its response gets these
    /// quota headers. Local replies carry theirs already. Shared with the
    /// request's webdis call, which the root context finishes.
    quota: Rc<Cell<Option<Quota>>>,
    /// The webdis call made for this request, released when it ends.
    call: Option<CallId>,
    /// The host clock when this request was decided, once read.
    now: Option<u64>,
}

/// What a paused request needs when webdis answers.
pub struct Pending {
    pub set: usize,
    pub events: Events,
    pub hash: KeyHash,
    pub redis_key: String,
    /// When the call was sent (the filter's monotonic clock, ns).
    pub sent_at: u64,
    pub quota: Rc<Cell<Option<Quota>>>,
}

impl Request {
    pub fn new(filter: Option<Rc<Filter>>, context_id: u32) -> Request {
        Request {
            filter,
            context_id,
            quota: Rc::default(),
            call: None,
            now: None,
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

    fn decide_global(
        &mut self,
        filter: &Filter,
        webdis: &WebdisStore,
        subject: Subject<'_>,
        hash: KeyHash,
        set: usize,
        mut events: Events,
    ) -> Action {
        let policy = &filter.policy;
        let limits = policy.limits(set);
        let Ok(now) = self.clock() else {
            let (action, events) = pipeline::finish(policy, set, events, Err(StoreFailure::Host));
            return self.apply(filter, action, events);
        };
        if let Some(decision) = webdis.cached_denial(hash, limits, now) {
            events.insert(Event::BackendCacheHit);
            let (action, events) = pipeline::finish(policy, set, events, Ok(decided(decision)));
            return self.apply(filter, action, events);
        }
        let redis_key = webdis.redis_key(&subject);
        let pending = Pending {
            set,
            events,
            hash,
            redis_key,
            sent_at: now,
            quota: self.quota.clone(),
        };
        // The root context sends the call and finishes this request.
        match webdis.callouts.request(self.context_id, pending) {
            Ok(id) => {
                self.call = Some(id);
                Action::Pause
            }
            Err((pending, status)) => {
                let error = BackendError::dispatch(format!(
                    "cannot hand the call to the root context (host status {})",
                    status.0
                ));
                let (action, events) = conclude(filter, webdis, pending, Err(error));
                self.apply(filter, action, events)
            }
        }
    }
}

impl Drop for Request {
    /// No state of a call outlives its request: its answer, if one comes,
    /// is counted as orphaned and dropped.
    fn drop(&mut self) {
        if let (Some(filter), Some(id)) = (&self.filter, self.call.take()) {
            if let Store::Webdis(webdis) = &filter.store {
                webdis.callouts.release(id);
            }
        }
    }
}

/// Carries out the pipeline's verdict on the current (effective) request.
pub fn carry_out(
    filter: &Filter,
    quota: &Cell<Option<Quota>>,
    now: Option<u64>,
    action: pipeline::Action,
    events: Events,
) -> Action {
    filter.metrics.record(events, now);
    if filter.policy.shadow_mode {
        filter.log_shadow(events);
    }
    match action {
        pipeline::Action::Continue(granted) => {
            quota.set(granted);
            Action::Continue
        }
        pipeline::Action::Respond(reply) => respond(&reply),
    }
}

/// Ends a global decision: what Redis said (or why it could not), cached
/// and turned into the pipeline's verdict.
pub fn conclude(
    filter: &Filter,
    webdis: &WebdisStore,
    pending: Pending,
    result: Result<webdis::Reply, BackendError>,
) -> (pipeline::Action, Events) {
    let policy = &filter.policy;
    let limits = policy.limits(pending.set);
    let outcome = match result {
        Ok(reply) => {
            let decision = Decision::from_resets(
                limits,
                reply.allowed,
                reply.retry_after_us.saturating_mul(1_000),
                reply.resets_us().iter().map(|r| r.saturating_mul(1_000)),
            );
            if deny_cache::worth_remembering(&decision) {
                let answer = deny_cache::Answer {
                    sent_at: pending.sent_at,
                    received_at: host::now_nanos().unwrap_or(pending.sent_at),
                    resets_us: reply.resets_us(),
                };
                webdis.remember(pending.hash, limits, answer);
            }
            Ok(decided(decision))
        }
        Err(error) => {
            filter.log_backend_error(&error);
            Err(StoreFailure::Backend(error.class))
        }
    };
    pipeline::finish(policy, pending.set, pending.events, outcome)
}

fn decided(decision: Decision) -> Outcome {
    Outcome::Decided {
        decision,
        placement: Placement::Existing,
        conflicts: 0,
    }
}

impl Context for Request {}

/// Lets the current (effective) paused request go on.
pub fn resume() {
    if let Err(status) = host::resume_request() {
        host::log(
            LOG_ERROR,
            &format!("cannot resume the request (host status {})", status.0),
        );
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(filter) = self.filter.clone() else {
            // Unreachable in practice: Envoy creates no request context for
            // a plugin whose configuration failed.
            return respond(&response::unavailable());
        };
        let headers = LazyHeaders::fetch();
        let policy = &filter.policy;
        match pipeline::start(policy, &&headers) {
            Start::Done(action, events) => self.apply(&filter, action, events),
            Start::Decide {
                subject,
                hash,
                set,
                events,
            } => match &filter.store {
                Store::Local { table, prefix } => {
                    let limits = policy.limits(set);
                    let outcome = match self.clock() {
                        Ok(now) => table
                            .decide(&mut SharedStore::new(prefix), hash, limits, now)
                            .map_err(|status| {
                                host::log(
                                    LOG_WARN,
                                    &format!("shared data failed (host status {})", status.0),
                                );
                                StoreFailure::Host
                            }),
                        Err(_) => Err(StoreFailure::Host),
                    };
                    let (action, events) = pipeline::finish(policy, set, events, outcome);
                    self.apply(&filter, action, events)
                }
                Store::Webdis(webdis) => {
                    self.decide_global(&filter, webdis, subject, hash, set, events)
                }
            },
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let (Some(filter), Some(quota)) = (&self.filter, self.quota.take()) {
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
        Action::Continue
    }
}

pub fn respond(reply: &LocalReply) -> Action {
    let pairs: Vec<(&[u8], &[u8])> = reply
        .headers
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
        .collect();
    let headers = header_map::serialize(&pairs);
    if let Err(status) = host::send_local_response(reply.status, &headers, reply.body.as_bytes()) {
        host::log(
            LOG_ERROR,
            &format!(
                "cannot send the {} reply (host status {})",
                reply.status, status.0
            ),
        );
        return Action::Continue;
    }
    Action::Pause
}
