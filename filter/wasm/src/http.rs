//! The per-request context: a thin shell around `ratelimit_core::pipeline`.
//!
//! Local store: decided at once, in `on_http_request_headers`. Global
//! store: denied at once from the local cache when it already knows, else
//! paused while webdis answers, then finished in `on_http_call_response`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use ratelimit_core::deny_cache;
use ratelimit_core::gcra::Decision;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::header_map;
use ratelimit_core::pipeline::{self, Event, Events, Quota, Start, StoreFailure, Subject};
use ratelimit_core::response::{self, LocalReply};
use ratelimit_core::slots::{Outcome, Placement};
use ratelimit_core::webdis::{self, BackendError, Parsed};

use crate::host::{self, LOG_ERROR, LOG_WARN};
use crate::request_headers::LazyHeaders;
use crate::root::{Filter, Store};
use crate::shared_store::SharedStore;
use crate::webdis_store::WebdisStore;

pub struct Request {
    filter: Option<Rc<Filter>>,
    /// Set when the request was let through: its response gets these
    /// quota headers. Local replies carry theirs already.
    quota: Option<Quota>,
    /// A webdis call in flight for this request.
    pending: Option<Pending>,
    /// The host clock when this request was decided, once read.
    now: Option<u64>,
}

/// What a paused request needs when webdis answers.
struct Pending {
    token: u32,
    set: usize,
    events: Events,
    hash: KeyHash,
    redis_key: String,
    /// When the call was sent (host clock, ns).
    sent_at: u64,
}

impl Request {
    pub fn new(filter: Option<Rc<Filter>>) -> Request {
        Request {
            filter,
            quota: None,
            pending: None,
            now: None,
        }
    }

    /// Reads the host clock, remembering it for the metrics.
    fn clock(&mut self) -> Result<u64, host::Status> {
        let now = host::now_nanos()?;
        self.now = Some(now);
        Ok(now)
    }

    /// Carries out the pipeline's verdict.
    fn apply(&mut self, filter: &Filter, action: pipeline::Action, events: Events) -> Action {
        filter.metrics.record(events, self.now);
        if filter.policy.shadow_mode {
            filter.log_shadow(events);
        }
        match action {
            pipeline::Action::Continue(quota) => {
                self.quota = quota;
                Action::Continue
            }
            pipeline::Action::Respond(reply) => respond(&reply),
        }
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
            token: 0,
            set,
            events,
            hash,
            redis_key,
            sent_at: now,
        };
        self.send(filter, webdis, pending, u64::from(webdis.timeout_ms))
    }

    /// Sends the call of `pending`; pauses the request.
    fn send(
        &mut self,
        filter: &Filter,
        webdis: &WebdisStore,
        mut pending: Pending,
        timeout_ms: u64,
    ) -> Action {
        let limits = filter.policy.limits(pending.set);
        match webdis.dispatch(&pending.redis_key, limits, timeout_ms) {
            Ok(token) => {
                filter
                    .metrics
                    .record(Events::of(&[Event::BackendCall]), None);
                pending.token = token;
                self.pending = Some(pending);
                Action::Pause
            }
            Err(status) => {
                let error = BackendError::dispatch(format!(
                    "Envoy refused the call to cluster '{}' (host status {}): is the cluster defined?",
                    webdis.cluster(),
                    status.0
                ));
                self.conclude(filter, webdis, pending, Err(error))
            }
        }
    }

    /// Ends a global decision: records, caches, and answers or resumes.
    fn conclude(
        &mut self,
        filter: &Filter,
        webdis: &WebdisStore,
        pending: Pending,
        result: Result<webdis::Reply, BackendError>,
    ) -> Action {
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
        let (action, events) = pipeline::finish(policy, pending.set, pending.events, outcome);
        self.apply(filter, action, events)
    }
}

fn decided(decision: Decision) -> Outcome {
    Outcome::Decided {
        decision,
        placement: Placement::Existing,
        conflicts: 0,
    }
}

impl Context for Request {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let (Some(filter), Some(pending)) = (self.filter.clone(), self.pending.take()) else {
            return;
        };
        if pending.token != token_id {
            self.pending = Some(pending);
            return;
        }
        let Store::Webdis(webdis) = &filter.store else {
            return;
        };
        let limits = filter.policy.limits(pending.set).len();
        // No headers at all: the call was reset or never connected.
        let status = if num_headers == 0 {
            None
        } else {
            host::http_call_response_status()
        };
        let body = host::http_call_response_body(body_size).unwrap_or_default();
        let result = match webdis::parse_reply(status, &body, limits) {
            Parsed::Decided(reply) => Ok(reply),
            Parsed::Failed(error) => Err(error),
        };
        if self.conclude(&filter, webdis, pending, result) == Action::Continue {
            resume();
        }
    }
}

fn resume() {
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

fn respond(reply: &LocalReply) -> Action {
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
