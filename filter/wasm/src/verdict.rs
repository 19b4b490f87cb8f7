//! How a decided request ends, from wherever it was decided: the request's
//! own callback (local store, deny cache) or the root context that received
//! its batch's webdis answer (`callouts.rs`). Either way the pipeline's
//! verdict is carried out on the current (effective) request.

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::types::Action;
use ratelimit_core::gcra::Decision;
use ratelimit_core::header_map;
use ratelimit_core::pipeline::{self, Events, Quota};
use ratelimit_core::response::LocalReply;
use ratelimit_core::slots::{Outcome, Placement};

use crate::filter::Filter;
use crate::host::{self, LOG_ERROR};

/// What a paused request needs when its decision comes (the rest is in
/// its `ratelimit_core::batch::queue::Ticket`).
pub struct Pending {
    pub events: Events,
    pub quota: Rc<Cell<Option<Quota>>>,
    /// The introspection path: the decision is a reading, answered with
    /// the key's usage (`pipeline::inspected`).
    pub inspect: bool,
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

pub fn decided(decision: Decision) -> Outcome {
    Outcome::Decided {
        decision,
        placement: Placement::Existing,
        conflicts: 0,
    }
}

/// Lets the current (effective) paused request go on; `false` if the host
/// refused.
pub fn resume() -> bool {
    match host::resume_request() {
        Ok(()) => true,
        Err(status) => {
            host::log(
                LOG_ERROR,
                &format!("cannot resume the request (host status {})", status.0),
            );
            false
        }
    }
}

pub fn respond(reply: &LocalReply) -> Action {
    let pairs: Vec<(&[u8], &[u8])> = reply
        .headers
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
        .collect();
    let headers = header_map::serialize(&pairs);
    let sent = host::send_local_response(
        reply.status,
        &headers,
        reply.body.as_bytes(),
        reply.grpc_status(),
    );
    if let Err(status) = sent {
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
