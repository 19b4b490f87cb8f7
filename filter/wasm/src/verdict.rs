//! How a decided request ends, from wherever it was decided: the request's
//! own callback (local store, deny cache) or the root context that received
//! its webdis answer (`callouts.rs`). Either way the pipeline's verdict is
//! carried out on the current (effective) request.

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::types::Action;
use ratelimit_core::deny_cache;
use ratelimit_core::gcra::Decision;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::header_map;
use ratelimit_core::pipeline::{self, Events, Quota, StoreFailure};
use ratelimit_core::response::LocalReply;
use ratelimit_core::slots::{Outcome, Placement};
use ratelimit_core::webdis::{self, BackendError};

use crate::filter::Filter;
use crate::host::{self, LOG_ERROR};
use crate::webdis_store::WebdisStore;

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
            let decision = reply.decision(limits);
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

pub fn decided(decision: Decision) -> Outcome {
    Outcome::Decided {
        decision,
        placement: Placement::Existing,
        conflicts: 0,
    }
}

/// Lets the current (effective) paused request go on.
pub fn resume() {
    if let Err(status) = host::resume_request() {
        host::log(
            LOG_ERROR,
            &format!("cannot resume the request (host status {})", status.0),
        );
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
