//! The webdis calls, owned by the worker's root context.
//!
//! Why the root: the SDK files each call's token under the context active
//! when it was sent, and drops the answer if that context is gone; a request
//! that sent its own call could never learn of, count, or clean up after an
//! answer that came once its client had left. So a request only queues its
//! call ([`Callouts::request`]: an entry in a [`CallTable`] and our call id
//! on this root's shared queue) and pauses. The root sends it from
//! `on_queue_ready`, so the SDK files the token under the root; every answer
//! comes back to the root, which finds the request through the table and
//! finishes it through `proxy_set_effective_context` (its status checked:
//! the host refuses a deleted context). A request that ends releases its
//! entry at once; an answer that finds none is counted and dropped.
//!
//! The SDK still records each token until its answer, and panics on a
//! duplicate. Envoy answers every call of a live root context (a reply, a
//! failure, or its timeout, at most 60 s), and the root does not let Envoy
//! delete it while calls are outstanding (`on_done` waits, then
//! `proxy_done`), so no SDK entry outlives its call; a duplicate would need
//! Envoy to hand out 2^30 ids within one call's lifetime.

use std::cell::{Cell, RefCell};

use ratelimit_core::calls::{Answer, CallId, CallTable};
use ratelimit_core::webdis::{self, BackendError, FailureClass, Parsed};
use ratelimit_core::Event;

use crate::filter::Filter;
use crate::host::{self, Status, LOG_ERROR, LOG_INFO};
use crate::shared_store::{table_prefix, with_slot_key};
use crate::verdict::{self, Pending};
use crate::webdis_store::WebdisStore;

/// Bounds the CAS loop that numbers the queues.
const MAX_QUEUE_NUMBER_TRIES: u32 = 64;

#[derive(Default)]
pub struct Callouts {
    table: RefCell<CallTable<Pending>>,
    queue: Cell<Option<u32>>,
    root_id: Cell<u32>,
}

impl Callouts {
    /// Registers this root's queue, under a name no other root in the
    /// process uses (queue names are process-wide; the last one registered
    /// wins). Called in the root's `on_configure`.
    pub fn open(&self, root_id: u32, plugin_name: &str) -> Result<(), String> {
        let number = next_queue_number(plugin_name)
            .map_err(|s| format!("cannot number the call queue (host status {})", s.0))?;
        let name = format!("apikey_ratelimit.{plugin_name}.calls.{number}");
        let queue = host::register_shared_queue(&name).map_err(|s| {
            format!(
                "cannot register the shared queue '{name}' (host status {})",
                s.0
            )
        })?;
        self.queue.set(Some(queue));
        self.root_id.set(root_id);
        Ok(())
    }

    /// Queues a call for request `context_id`; the root sends it next.
    pub fn request(&self, context_id: u32, pending: Pending) -> Result<CallId, (Pending, Status)> {
        let Some(queue) = self.queue.get() else {
            return Err((pending, host::NOT_FOUND));
        };
        // The root reads the queue only after this callback returns.
        let id = self.table.borrow().next_id();
        if let Err(status) = host::enqueue_shared_queue(queue, &id.to_le_bytes()) {
            return Err((pending, status));
        }
        Ok(self.table.borrow_mut().queue(context_id, pending))
    }

    /// The request of call `id` ended.
    pub fn release(&self, id: CallId) {
        self.table.borrow_mut().release(id);
    }

    /// Sends every queued call whose request is still here.
    pub fn on_queue_ready(&self, filter: &Filter, webdis: &WebdisStore) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        while let Ok(Some(item)) = host::dequeue_shared_queue(queue) {
            let Some(id) = item.get(..8).and_then(|b| b.try_into().ok()) else {
                continue;
            };
            let id = CallId::from_le_bytes(id);
            let Some((context_id, pending)) = self.table.borrow_mut().take(id) else {
                continue;
            };
            self.send(filter, webdis, id, context_id, pending);
        }
    }

    /// Sends a call; must run in a root callback.
    fn send(
        &self,
        filter: &Filter,
        webdis: &WebdisStore,
        id: CallId,
        context_id: u32,
        pending: Pending,
    ) {
        let limits = filter.policy.limits(pending.set);
        match webdis.dispatch(&pending.redis_key, limits) {
            Ok(token) => {
                filter
                    .metrics
                    .record(ratelimit_core::Events::of(&[Event::BackendCall]), None);
                let displaced = self.table.borrow_mut().sent(id, context_id, token, pending);
                if let Some(old) = displaced {
                    let error = BackendError {
                        class: FailureClass::Transport,
                        transient: true,
                        detail: format!("Envoy reused call id {token} before it was answered"),
                    };
                    self.finish(filter, webdis, old.context_id, old.payload, Err(error));
                }
            }
            Err(status) => {
                let error = BackendError::dispatch(format!(
                    "Envoy refused the call to cluster '{}' (host status {}): is the cluster defined?",
                    webdis.cluster(),
                    status.0
                ));
                self.finish(filter, webdis, context_id, pending, Err(error));
            }
        }
    }

    /// An answer came to the root.
    pub fn on_answer(
        &self,
        filter: &Filter,
        webdis: &WebdisStore,
        token: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        let answer = self.table.borrow_mut().answered(token);
        match answer {
            Answer::Orphaned => filter.metrics.orphaned_answer(host::now_nanos().ok()),
            Answer::Live {
                context_id,
                payload,
                ..
            } => self.answer(filter, webdis, context_id, payload, num_headers, body_size),
        }
        if self.table.borrow_mut().may_finish() {
            // The host stops this root's ticks: hand over the last counts.
            filter.metrics.flush(host::now_nanos().unwrap_or(0));
            if let Err(status) = host::done() {
                host::log(
                    LOG_ERROR,
                    &format!("cannot finish the root context (host status {})", status.0),
                );
            }
        }
    }

    fn answer(
        &self,
        filter: &Filter,
        webdis: &WebdisStore,
        context_id: u32,
        pending: Pending,
        num_headers: usize,
        body_size: usize,
    ) {
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
        self.finish(filter, webdis, context_id, pending, result);
    }

    /// Answers or resumes request `context_id`, from the root.
    fn finish(
        &self,
        filter: &Filter,
        webdis: &WebdisStore,
        context_id: u32,
        pending: Pending,
        result: Result<webdis::Reply, BackendError>,
    ) {
        if host::set_effective_context(context_id).is_err() {
            // Deleted by the host though we had not heard of it yet.
            filter.metrics.orphaned_answer(host::now_nanos().ok());
            return;
        }
        let quota = pending.quota.clone();
        let now = host::now_nanos().ok();
        let (action, events) = verdict::conclude(filter, webdis, pending, result);
        if verdict::carry_out(filter, &quota, now, action, events)
            == proxy_wasm::types::Action::Continue
        {
            verdict::resume();
        }
        if let Err(status) = host::set_effective_context(self.root_id.get()) {
            host::log(
                LOG_ERROR,
                &format!(
                    "cannot return to the root context (host status {})",
                    status.0
                ),
            );
        }
    }

    /// The root's `on_done`: `true` if it may be deleted now, else it waits
    /// for the outstanding answers and then calls `proxy_done`.
    pub fn may_close(&self) -> bool {
        let mut table = self.table.borrow_mut();
        if table.may_close() {
            return true;
        }
        host::log(
            LOG_INFO,
            &format!(
                "root context closing: waiting for {} outstanding webdis call(s)",
                table.outstanding()
            ),
        );
        false
    }
}

/// A process-wide number for a new queue: a counter in shared data.
fn next_queue_number(plugin_name: &str) -> Result<u64, Status> {
    // Named like every shared-data key of the plugin (`shared_store.rs`).
    let key = with_slot_key(&table_prefix(plugin_name, "queues"), 0, <[u8]>::to_vec);
    let mut last = host::CAS_MISMATCH;
    for _ in 0..MAX_QUEUE_NUMBER_TRIES {
        let (current, cas) = host::get_shared_data(&key)?.unwrap_or_default();
        let number = current
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
            .wrapping_add(1);
        match host::set_shared_data(&key, &number.to_le_bytes(), cas) {
            Ok(()) => return Ok(number),
            Err(status) => last = status,
        }
    }
    Err(last)
}
