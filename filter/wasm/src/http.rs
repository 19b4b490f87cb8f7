//! The per-request context: a thin shell around `ratelimit_core::pipeline`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use ratelimit_core::header_map::{self, HeaderMap};
use ratelimit_core::pipeline::{self, Quota, Start, StoreFailure};
use ratelimit_core::response::{self, LocalReply};

use crate::host::{self, LOG_ERROR, LOG_WARN};
use crate::root::Filter;
use crate::shared_store::SharedStore;

pub struct Request {
    filter: Option<Rc<Filter>>,
    /// Set when the request was let through: its response gets these
    /// quota headers. Local replies carry theirs already.
    quota: Option<Quota>,
}

impl Request {
    pub fn new(filter: Option<Rc<Filter>>) -> Request {
        Request {
            filter,
            quota: None,
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
        let (action, events) = decide(&filter);
        filter.metrics.record(events);
        match action {
            pipeline::Action::Continue(quota) => {
                self.quota = quota;
                Action::Continue
            }
            pipeline::Action::Respond(reply) => respond(&reply),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let (Some(filter), Some(quota)) = (&self.filter, self.quota.take()) {
            for (name, value) in pipeline::response_headers(&filter.policy, &quota) {
                if let Err(status) = host::add_response_header(name, &value) {
                    host::log(
                        LOG_WARN,
                        &format!(
                            "apikey_ratelimit: cannot add {name} (host status {})",
                            status.0
                        ),
                    );
                }
            }
        }
        Action::Continue
    }
}

fn decide(filter: &Filter) -> (pipeline::Action, ratelimit_core::Events) {
    let policy = &filter.policy;
    let bytes = match host::request_header_pairs() {
        Ok(bytes) => bytes,
        Err(status) => {
            host::log(
                LOG_ERROR,
                &format!(
                    "apikey_ratelimit: cannot read request headers (host status {})",
                    status.0
                ),
            );
            Vec::new()
        }
    };
    // A malformed map (a host bug) reads as no headers: the key is missing.
    let headers = HeaderMap::parse(&bytes).unwrap_or(HeaderMap::empty());
    match pipeline::start(policy, &headers) {
        Start::Done(action, events) => (action, events),
        Start::Decide { hash, set, events } => {
            let limits = policy.set(set).map_or(&[][..], |s| &s.limits[..]);
            let outcome = match (filter.table, host::now_nanos()) {
                (Some(table), Ok(now)) => table
                    .decide(
                        &mut SharedStore::new(&filter.slot_prefix),
                        hash,
                        limits,
                        now,
                    )
                    .map_err(|status| {
                        host::log(
                            LOG_WARN,
                            &format!(
                                "apikey_ratelimit: shared data failed (host status {})",
                                status.0
                            ),
                        );
                        StoreFailure
                    }),
                _ => Err(StoreFailure),
            };
            pipeline::finish(policy, set, events, outcome)
        }
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
                "apikey_ratelimit: cannot send the {} reply (host status {})",
                reply.status, status.0
            ),
        );
        return Action::Continue;
    }
    Action::Pause
}
