//! The webdis calls, owned by the worker's root context, batched.
//!
//! Why the root: the SDK files each call's token under the context active
//! when it was sent, and drops the answer if that context is gone; a call
//! that decides many requests must outlive any one of them. So a request
//! only joins this root's queue ([`Callouts::request`]) and pauses; the
//! root is woken through its own shared queue (`on_queue_ready`, at once)
//! when a call could go out, and sends calls only from its own callbacks
//! (`on_queue_ready`, `on_tick`, `on_http_call_response`). What goes in a
//! call, when, and what each request gets is decided by
//! `ratelimit_core::batch::queue::Batcher`; this file routes the host's
//! callbacks to it and finishes each request through
//! `proxy_set_effective_context` (its status checked: the host refuses a
//! deleted context), then switches back to the root.
//!
//! The SDK still records each token until its answer, and panics on a
//! duplicate. Envoy answers every call of a live root context (a reply, a
//! failure, or its timeout), and the root does not let Envoy delete it while
//! calls are out or requests wait (`on_done` waits, then `proxy_done`), so
//! no SDK entry outlives its call.

use std::cell::{Cell, RefCell};

use ratelimit_core::batch::queue::{
    queue_full_error, Batcher, Finished, Learnt, Outgoing, RequestId, Ticket, Verdict,
};
use ratelimit_core::deny_cache;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::webdis::BackendError;
use ratelimit_core::Event;

use crate::admin_calls::{AdminCall, AdminCalls, Answered};
use crate::epoch_poll::EpochPoll;
use crate::filter::Filter;
use crate::host::{self, Status, LOG_ERROR, LOG_INFO};
use crate::metrics::SETTLE_FAILED;
use crate::settle_calls::{Queued, SettleCalls, When};
use crate::shared_store::{table_prefix, with_slot_key};
use crate::verdict::{self, Pending};
use crate::webdis_store::WebdisStore;

/// Bounds the CAS loop that numbers the queues.
const MAX_QUEUE_NUMBER_TRIES: u32 = 64;

#[derive(Default)]
pub struct Callouts {
    batcher: RefCell<Option<Batcher<Pending>>>,
    queue: Cell<Option<u32>>,
    root_id: Cell<u32>,
    /// The admin API's calls (`admin_calls.rs`).
    admin: AdminCalls,
    /// Settlements of cost from the response (`settle_calls.rs`).
    settlements: SettleCalls,
    /// The admin epoch the deny cache files entries under (`epoch_poll.rs`).
    epoch: EpochPoll,
}

impl Callouts {
    /// Registers this root's queue, under a name no other root in the
    /// process uses (queue names are process-wide; the last one registered
    /// wins). Called in the root's `on_configure`.
    pub fn open(&self, root_id: u32, filter: &Filter, webdis: &WebdisStore) -> Result<(), String> {
        let plugin_name = filter.plugin_name();
        let number = next_queue_number(plugin_name)
            .map_err(|s| format!("cannot number the call queue (host status {})", s.0))?;
        let name = format!("apikey_ratelimit.{plugin_name}.calls.{number}");
        let queue = host::register_shared_queue(&name).map_err(|s| {
            format!(
                "cannot register the shared queue '{name}' (host status {})",
                s.0
            )
        })?;
        // Every worker's calls share webdis: nonces start at random.
        let seed = host::random_bytes::<8>()
            .map(u64::from_le_bytes)
            .map_err(|s| format!("cannot draw a nonce seed (host status {})", s.0))?;
        self.queue.set(Some(queue));
        self.root_id.set(root_id);
        let batcher =
            Batcher::new(webdis.batch_settings(), seed).with_plans_key(webdis.plans_key());
        *self.batcher.borrow_mut() = Some(batcher);
        self.epoch.open(filter, webdis);
        Ok(())
    }

    /// `key` as the deny cache files it under this worker's admin epoch.
    pub fn cache_key(&self, key: KeyHash) -> KeyHash {
        self.epoch.cache_key(key)
    }

    /// Queues request `ticket.context_id` for the next call; the root is
    /// woken if a call can go now. `Err` when it cannot wait: the failure
    /// mode applies.
    pub fn request(
        &self,
        ticket: Ticket,
        pending: Pending,
        now: u64,
    ) -> Result<RequestId, (Pending, BackendError)> {
        let (Some(queue), Some(batcher)) = (self.queue.get(), &mut *self.batcher.borrow_mut())
        else {
            let error = BackendError::dispatch("the root context has no call queue");
            return Err((pending, error));
        };
        let enqueued = batcher
            .enqueue(ticket, pending, now)
            .map_err(|pending| (pending, queue_full_error(batcher.settings().max_waiting)))?;
        if enqueued.wake && host::enqueue_shared_queue(queue, &[1]).is_err() {
            // The root's tick sends it instead; let the next request try.
            batcher.woken();
        }
        Ok(enqueued.id)
    }

    /// Queues an admin call and wakes the root to send it; `false` when
    /// there is no queue to wake it through.
    pub fn admin(&self, call: AdminCall) -> bool {
        let Some(queue) = self.queue.get() else {
            return false;
        };
        self.admin.queue(call);
        if host::enqueue_shared_queue(queue, &[1]).is_err() {
            // The root's tick sends it instead.
            host::log(LOG_INFO, "admin call waits for the next tick");
        }
        true
    }

    /// Queues a request's settlement for the root to send, waking it if
    /// nothing else will soon.
    pub fn settle(&self, filter: &Filter, settlement: Queued) {
        if !self
            .settlements
            .queue(settlement, host::now_nanos().unwrap_or(0))
        {
            filter.metrics.settled(SETTLE_FAILED, 1);
            return;
        }
        // A call out now wakes the root when answered, which sends what
        // waits: a wake-up of its own (a queue event and a callback) would
        // cost more than it saves. Only an idle root is woken.
        let busy = self.settlements.outstanding() > 0
            || self
                .batcher
                .try_borrow()
                .is_ok_and(|b| b.as_ref().is_some_and(|b| b.outstanding() > 0));
        if busy || self.settlements.wake_pending.get() {
            return;
        }
        if let Some(queue) = self.queue.get() {
            // If the wake-up is lost, the root's tick sends it.
            if host::enqueue_shared_queue(queue, &[1]).is_ok() {
                self.settlements.wake_pending.set(true);
            }
        }
    }

    /// Sends the queued settlements now (a closing root).
    pub fn send_settlements(&self, filter: &Filter, webdis: &WebdisStore) {
        self.settlements.send(filter, webdis, When::Now);
    }

    /// The admin request of `context_id` ended.
    pub fn release_admin(&self, context_id: u32) {
        self.admin.release(context_id);
    }

    /// Sends the queued admin calls, answering those Envoy refuses.
    fn send_admin(&self, filter: &Filter, webdis: &WebdisStore) {
        for answered in self.admin.send(filter, webdis) {
            self.answer_admin(answered);
        }
    }

    /// Answers an admin request from the root.
    fn answer_admin(&self, answered: Answered) {
        if host::set_effective_context(answered.context_id).is_ok() {
            verdict::respond(&answered.reply);
        }
        let _ = host::set_effective_context(self.root_id.get());
    }

    /// The request `id` ended.
    pub fn release(&self, id: RequestId) {
        let closing = match &mut *self.batcher.borrow_mut() {
            Some(batcher) => {
                batcher.release(id);
                batcher.is_closing()
            }
            None => false,
        };
        if let (true, Some(queue)) = (closing, self.queue.get()) {
            // A closing root may be done now, which only a root callback
            // may say: wake it.
            let _ = host::enqueue_shared_queue(queue, &[1]);
        }
    }

    /// The root's queue callback: drain the wake-ups, send what is due.
    pub fn on_queue_ready(&self, filter: &Filter, webdis: &WebdisStore) {
        if let Some(queue) = self.queue.get() {
            while let Ok(Some(_)) = host::dequeue_shared_queue(queue) {}
        }
        if let Some(batcher) = &mut *self.batcher.borrow_mut() {
            batcher.woken();
        }
        // Woken for settlements: the root was idle, send them now.
        let when = match self.settlements.wake_pending.replace(false) {
            true => When::Now,
            false => When::Gathered,
        };
        self.send_admin(filter, webdis);
        self.settlements.send(filter, webdis, when);
        self.pump(filter, webdis);
        self.finish_if_closing(filter);
    }

    /// The root's tick: end queued requests past their deadline, and send
    /// anything a lost wake-up left behind.
    pub fn on_tick(&self, filter: &Filter, webdis: &WebdisStore) {
        let now = host::now_nanos().unwrap_or(0);
        let mut finished = Vec::new();
        if let Some(batcher) = &mut *self.batcher.borrow_mut() {
            batcher.expire(now, &mut finished);
        }
        self.finish_all(filter, finished);
        self.send_admin(filter, webdis);
        self.settlements.send(filter, webdis, When::Now);
        if !self.closing() {
            self.epoch.send(filter, webdis, now);
        }
        self.pump(filter, webdis);
        self.finish_if_closing(filter);
    }

    /// The host asked to delete the root: no new poll goes out.
    fn closing(&self) -> bool {
        self.admin.closing.get()
            || self
                .batcher
                .borrow()
                .as_ref()
                .is_some_and(Batcher::is_closing)
    }

    /// Sends every call that is due, finishing requests that end without
    /// one (expired, or denied from the deny cache).
    fn pump(&self, filter: &Filter, webdis: &WebdisStore) {
        loop {
            let now = host::now_nanos().unwrap_or(0);
            // Only a quota's period length in a cached 429's headers.
            let wall = filter.wall_clock().ok().flatten();
            let mut finished = Vec::new();
            let outgoing = match &mut *self.batcher.borrow_mut() {
                Some(batcher) => {
                    let cached = |ticket: &Ticket| {
                        let key = self.epoch.cache_key(ticket.hash);
                        let cacheable = filter.policy.cacheable(&ticket.applied);
                        webdis.cached_denial(
                            key,
                            filter.policy.limits(&cacheable).as_slice(),
                            now,
                            wall,
                        )
                    };
                    batcher.next_call(now, &filter.policy, cached, &mut finished)
                }
                None => None,
            };
            self.finish_all(filter, finished);
            let Some(outgoing) = outgoing else {
                break;
            };
            self.send(filter, webdis, outgoing);
        }
        self.count(filter);
    }

    fn send(&self, filter: &Filter, webdis: &WebdisStore, outgoing: Outgoing) {
        let Outgoing {
            path,
            timeout_ms,
            call,
            ..
        } = outgoing;
        let mut finished = Vec::new();
        if let Some(batcher) = &mut *self.batcher.borrow_mut() {
            match webdis.dispatch(&path, timeout_ms) {
                Ok(token) => batcher.sent(call, token, &mut finished),
                Err(status) => {
                    batcher.send_failed(call, &webdis.refused(status), &mut finished);
                }
            }
        }
        self.finish_all(filter, finished);
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
        // No headers at all: the call was reset or never connected.
        let status = if num_headers == 0 {
            None
        } else {
            host::http_call_response_status()
        };
        let body = host::http_call_response_body(body_size).unwrap_or_default();
        if self.settlements.answered(filter, token, status, &body) {
            self.settlements.send(filter, webdis, When::Gathered);
            self.finish_if_closing(filter);
            return;
        }
        if let Some(answered) = self.admin.answered(filter, webdis, token, status, &body) {
            if let Some(answered) = answered {
                self.answer_admin(answered);
            }
            self.finish_if_closing(filter);
            return;
        }
        if self.epoch.answered(filter, token, status, &body) {
            self.finish_if_closing(filter);
            return;
        }
        let received_at = host::now_nanos().unwrap_or(0);
        let mut finished = Vec::new();
        let mut learnt = Vec::new();
        let known = match &mut *self.batcher.borrow_mut() {
            Some(batcher) => batcher.answered(
                token,
                status,
                &body,
                received_at,
                &filter.policy,
                &mut finished,
                &mut learnt,
            ),
            None => false,
        };
        if !known {
            filter.metrics.orphaned_answer(Some(received_at));
        }
        for learnt in &learnt {
            // Not an answer to a call sent before this worker learnt its
            // epoch: it may predate a reset.
            if let Some(key) = self.epoch.remembered_key(learnt.hash, learnt.sent_at) {
                remember(filter, webdis, key, learnt);
            }
        }
        self.finish_all(filter, finished);
        self.pump(filter, webdis);
        // Settlements queued while this call was out were not woken for.
        self.settlements.send(filter, webdis, When::Gathered);
        self.finish_if_closing(filter);
    }

    fn finish_all(&self, filter: &Filter, finished: Vec<Finished<Pending>>) {
        for request in finished {
            self.finish(filter, request);
        }
    }

    /// Answers or resumes one request, from the root.
    fn finish(&self, filter: &Filter, request: Finished<Pending>) {
        if host::set_effective_context(request.context_id).is_err() {
            // Deleted by the host though it had not told us: never act on it.
            filter.metrics.resume_failure();
            return;
        }
        let Finished {
            applied,
            unknown_plan,
            payload,
            verdict,
            ..
        } = request;
        let mut events = payload.events;
        if unknown_plan {
            events.insert(Event::BackendUnknownPlan);
        }
        let reading = match verdict {
            Verdict::Decided(decision) => Ok(decision),
            Verdict::Cached(decision) => {
                events.insert(Event::BackendCacheHit);
                Ok(decision)
            }
            Verdict::Failed(error) => Err(filter.backend_failure(&error)),
        };
        let now = host::now_nanos().ok();
        let policy = &filter.policy;
        let (action, events) = match payload.inspect {
            // The introspection path: a reading of the key's state.
            true => ratelimit_core::pipeline::inspected(policy, &applied, events, reading),
            false => {
                let outcome = reading.map(verdict::decided);
                ratelimit_core::pipeline::finish(policy, &applied, events, outcome)
            }
        };
        if verdict::carry_out(filter, &payload.quota, now, action, events)
            == proxy_wasm::types::Action::Continue
            && !verdict::resume()
        {
            filter.metrics.resume_failure();
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

    /// Hands the calls' counts to the metrics.
    fn count(&self, filter: &Filter) {
        if let Some(batcher) = &mut *self.batcher.borrow_mut() {
            filter.metrics.calls(batcher.take_counts());
        }
    }

    /// A closing root whose last call was answered and last request ended
    /// tells the host it is done.
    fn finish_if_closing(&self, filter: &Filter) {
        let finish = match &mut *self.batcher.borrow_mut() {
            // A root closing for its admin calls, settlements or epoch
            // poll alone has an idle batcher.
            Some(batcher) if self.admin.closing.get() => {
                self.admin.outstanding() == 0
                    && self.epoch.outstanding() == 0
                    && self.settlements.outstanding() == 0
                    && self.settlements.waiting() == 0
                    && batcher.waiting() == 0
                    && batcher.outstanding() == 0
            }
            Some(batcher) => batcher.may_finish(),
            None => false,
        };
        if finish {
            self.admin.closing.set(false);
        }
        if finish {
            self.count(filter);
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

    /// The root's `on_done`: `true` if it may be deleted now, else it waits
    /// for the outstanding answers and waiting requests, then calls
    /// `proxy_done`.
    pub fn may_close(&self) -> bool {
        let Some(batcher) = &mut *self.batcher.borrow_mut() else {
            return true;
        };
        if self.admin.outstanding() > 0
            || self.epoch.outstanding() > 0
            || self.settlements.outstanding() > 0
            || self.settlements.waiting() > 0
        {
            self.admin.closing.set(true);
            host::log(
                LOG_INFO,
                &format!(
                    "root context closing: waiting for {} admin call(s), {} epoch poll(s), {} settlement call(s) and {} settlement(s) to send",
                    self.admin.outstanding(),
                    self.epoch.outstanding(),
                    self.settlements.outstanding(),
                    self.settlements.waiting()
                ),
            );
            return false;
        }
        if batcher.may_close() {
            return true;
        }
        host::log(
            LOG_INFO,
            &format!(
                "root context closing: waiting for {} webdis call(s) and {} request(s)",
                batcher.outstanding(),
                batcher.waiting()
            ),
        );
        false
    }
}

/// Writes what an answer taught into the deny cache, under `key` (the
/// key's hash as the worker's epoch files it).
fn remember(filter: &Filter, webdis: &WebdisStore, key: KeyHash, learnt: &Learnt) {
    let answer = deny_cache::Answer {
        sent_at: learnt.sent_at,
        received_at: learnt.received_at,
        states: learnt.states.as_slice(),
    };
    let limits = filter.policy.limits(&learnt.applied);
    webdis.remember(key, limits.as_slice(), answer);
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
