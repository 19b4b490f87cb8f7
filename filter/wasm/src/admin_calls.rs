//! The admin API's Redis calls in global mode, one per operator call. Like
//! the batch calls (`callouts.rs`) they are sent from the root context, so
//! that no call's token is filed under a request that may go away: the
//! request queues its call and pauses, the root sends it from its queue
//! callback, and finishes the request when the answer comes. A request that
//! ends first is marked gone; its answer is then dropped.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use ratelimit_core::admin::{redis, Op};
use ratelimit_core::applied::Applied;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::pipeline::{self, Events};
use ratelimit_core::response::{self, LocalReply};

use crate::filter::Filter;
use crate::host::{self, LOG_INFO};
use crate::webdis_store::WebdisStore;

/// One operator call, queued or out.
pub struct AdminCall {
    pub context_id: u32,
    pub path: String,
    pub nonce: u64,
    pub applied: Applied,
    pub op: Op,
    /// The key's SHA-256, which the log names.
    pub digest: String,
    /// The key's hash, for this Envoy's deny cache; `None` when the call
    /// names the key by its SHA-256 only, which cannot find its entry.
    pub hash: Option<KeyHash>,
    gone: bool,
}

impl AdminCall {
    pub fn new(
        context_id: u32,
        path: String,
        nonce: u64,
        applied: Applied,
        op: Op,
        digest: String,
        hash: Option<KeyHash>,
    ) -> AdminCall {
        AdminCall {
            hash,
            context_id,
            path,
            nonce,
            applied,
            op,
            digest,
            gone: false,
        }
    }
}

#[derive(Default)]
pub struct AdminCalls {
    queued: RefCell<Vec<AdminCall>>,
    out: RefCell<HashMap<u32, AdminCall>>,
    /// The host asked to delete the root while calls were out.
    pub closing: Cell<bool>,
}

/// A request to finish: its context and its reply.
pub struct Answered {
    pub context_id: u32,
    pub reply: LocalReply,
}

impl AdminCalls {
    pub fn queue(&self, call: AdminCall) {
        self.queued.borrow_mut().push(call);
    }

    /// The request of `context_id` ended.
    pub fn release(&self, context_id: u32) {
        self.queued
            .borrow_mut()
            .retain(|c| c.context_id != context_id);
        for call in self.out.borrow_mut().values_mut() {
            if call.context_id == context_id {
                call.gone = true;
            }
        }
    }

    pub fn outstanding(&self) -> usize {
        self.out.borrow().len()
    }

    /// Sends the queued calls (from a root callback); those Envoy refuses
    /// are answered 503 at once.
    pub fn send(&self, filter: &Filter, webdis: &WebdisStore) -> Vec<Answered> {
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        let mut refused = Vec::new();
        for call in queued {
            match webdis.dispatch(&call.path, webdis.call_timeout_ms()) {
                Ok(token) => {
                    self.out.borrow_mut().insert(token, call);
                }
                Err(status) => {
                    log(filter, &call, &format!("refused by Envoy ({})", status.0));
                    refused.push(Answered {
                        context_id: call.context_id,
                        reply: response::unavailable(),
                    });
                }
            }
        }
        refused
    }

    /// The answer to `token`, if it is an admin call's: `Some(None)` when
    /// its request is gone.
    pub fn answered(
        &self,
        filter: &Filter,
        webdis: &WebdisStore,
        token: u32,
        status: Option<u32>,
        body: &[u8],
    ) -> Option<Option<Answered>> {
        let call = self.out.borrow_mut().remove(&token)?;
        // A reset or grant is done in Redis even if its request left: this
        // Envoy's cached denial of the key must not outlive it. Without the
        // plain key its entry cannot be found, so every entry goes.
        if call.op != Op::Inspect && status == Some(200) {
            match call.hash {
                Some(hash) => webdis.forget(hash),
                None => webdis.forget_all(),
            }
        }
        if call.gone {
            return Some(None);
        }
        let limits = filter.policy.limits(&call.applied);
        let reading = redis::reading(status, body, call.nonce, limits.as_slice())
            .map_err(|error| filter.backend_failure(&error));
        let (action, _) =
            pipeline::inspected(&filter.policy, &call.applied, Events::default(), reading);
        let reply = match action {
            pipeline::Action::Respond(reply) => reply,
            pipeline::Action::Continue(_) => response::unavailable(),
        };
        log(filter, &call, &reply.status.to_string());
        Some(Some(Answered {
            context_id: call.context_id,
            reply,
        }))
    }
}

/// Every admin action is logged, under the key's SHA-256 only.
pub fn log(filter: &Filter, call: &AdminCall, outcome: &str) {
    log_outcome(filter, call.op, &call.digest, outcome);
}

/// The log line of `op` on the key whose hex SHA-256 is `digest`.
pub fn log_outcome(filter: &Filter, op: Op, digest: &str, outcome: &str) {
    host::log(
        LOG_INFO,
        &format!(
            "plugin '{}': admin {} of key sha256:{digest}: {outcome}",
            filter.plugin_name(),
            op.name(),
        ),
    );
}
