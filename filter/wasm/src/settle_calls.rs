//! Global mode's settlements, sent by the worker's root context: a request
//! whose response said its real cost queues its settlement here and goes
//! on at once; the root sends the queued ones, many to a call
//! (`apikey_ratelimit_settle`), from its own callbacks, so no call's answer
//! is filed under a request that may be gone, and no response waits.
//! A call that fails loses its settlements (each counted in `settle_failed`; logged):
//! a lost refund leaves the estimate charged, a lost charge under-counts
//! by that much.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

use ratelimit_core::settle::redis::{self, Entry, Gather};
use ratelimit_core::settle::Adjust;

use crate::filter::Filter;
use crate::host;
use crate::metrics::{SETTLE_CALLS, SETTLE_FAILED};
use crate::webdis_store::{call_nonce, WebdisStore};

/// How long a settlement may wait for others to share its call, while the
/// root is busy with other calls (each of which costs Envoy about as much
/// as a request does): under load, a call carries a few milliseconds' worth.
const GATHER_NANOS: u64 = 5_000_000;

/// Settlements one worker keeps waiting for a call, at most (each about
/// 100 bytes); past it they are dropped (counted): Redis is then far behind.
const MAX_QUEUED: usize = 100_000;

/// One request's settlement of one rule, waiting: its limits are the
/// rule's, found when the call is built.
pub struct Queued {
    pub redis_key: String,
    pub adjust: Adjust,
    pub rule: usize,
}

#[derive(Default)]
pub struct SettleCalls {
    queued: RefCell<VecDeque<Queued>>,
    /// Calls out: their nonce and how many settlements they carry (merged
    /// entries count each of theirs).
    out: RefCell<HashMap<u32, (u64, u64)>>,
    /// The root has been asked to wake and has not yet.
    pub wake_pending: Cell<bool>,
    /// When the oldest settlement waiting was queued (host clock).
    oldest: Cell<Option<u64>>,
}

/// When queued settlements go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Now (the root was woken for them, or is closing, or it is its tick).
    Now,
    /// Once the oldest has waited [`GATHER_NANOS`], or a call is full.
    Gathered,
}

impl SettleCalls {
    /// Queues a settlement; `false` if the queue is full (it is dropped).
    pub fn queue(&self, settlement: Queued, now: u64) -> bool {
        let mut queued = self.queued.borrow_mut();
        if queued.len() >= MAX_QUEUED {
            return false;
        }
        if queued.is_empty() {
            self.oldest.set(Some(now));
        }
        queued.push_back(settlement);
        true
    }

    pub fn outstanding(&self) -> usize {
        self.out.borrow().len()
    }

    pub fn waiting(&self) -> usize {
        self.queued.borrow().len()
    }

    /// Sends what is queued (from a root callback), one key's refunds (and
    /// its charges) on a rule summed into one entry, in calls of at most
    /// `max_keys_per_call` entries (and webdis's path bound), at most
    /// `max_calls_in_flight` out.
    pub fn send(&self, filter: &Filter, webdis: &WebdisStore, when: When) {
        let settings = webdis.batch_settings();
        if when == When::Gathered {
            let waited = self
                .oldest
                .get()
                .map(|at| host::now_nanos().unwrap_or(u64::MAX).saturating_sub(at));
            let full = self.waiting() >= settings.max_keys;
            if !full && waited.is_none_or(|w| w < GATHER_NANOS) {
                return;
            }
        }
        loop {
            if self.outstanding() >= settings.max_in_flight {
                return;
            }
            let mut call = Gather::new(settings.max_keys, settings.max_path_bytes);
            let mut count: u64 = 0;
            {
                let mut queued = self.queued.borrow_mut();
                while let Some(next) = queued.front() {
                    let limits = filter.policy.rule_units(next.rule);
                    if call.merge(&next.redis_key, next.adjust, limits.as_slice()) {
                        queued.pop_front();
                        count += 1;
                        continue;
                    }
                    if !call.fits(&next.redis_key, limits.as_slice()) {
                        break;
                    }
                    if let Some(next) = queued.pop_front() {
                        count += 1;
                        call.push(Entry {
                            limits,
                            redis_key: next.redis_key,
                            adjust: next.adjust,
                        });
                    }
                }
            }
            if self.waiting() == 0 {
                self.oldest.set(None);
            }
            let batch = call.entries();
            if batch.is_empty() {
                return;
            }
            let nonce = call_nonce(count);
            let path = redis::path(nonce, batch);
            filter.metrics.settled(SETTLE_CALLS, 1);
            match webdis.dispatch(&path, webdis.call_timeout_ms()) {
                Ok(token) => {
                    self.out.borrow_mut().insert(token, (nonce, count));
                }
                Err(status) => {
                    filter.metrics.settled(SETTLE_FAILED, count);
                    filter.log_backend_error(&webdis.refused(status));
                }
            }
        }
    }

    /// The answer to `token`, if it is a settlement call's (`false` if not).
    pub fn answered(&self, filter: &Filter, token: u32, status: Option<u32>, body: &[u8]) -> bool {
        let Some((nonce, count)) = self.out.borrow_mut().remove(&token) else {
            return false;
        };
        if let Err(error) = redis::check(status, body, nonce) {
            filter.metrics.settled(SETTLE_FAILED, count);
            filter.log_backend_error(&error);
        }
        true
    }
}
