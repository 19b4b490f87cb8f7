//! The filter's counters, one per `ratelimit_core::Event`, visible in
//! Envoy's `/stats` as `wasmcustom.apikey_ratelimit.<plugin>.<event>`.
//!
//! A host call costs more than everything else a request does in the VM
//! (one is 1 to 3 µs of Envoy CPU here), so counts gather in the VM and go
//! to Envoy in one call per counter at most every [`FLUSH_EVERY_NANOS`], on
//! the next request, and on the root context's tick for the tail of a
//! burst. `/stats` lags by at most [`TICK_MILLIS`].
//!
//! Besides the core's events (`backend_calls` among them: one per batch
//! call), the root's calls are counted: `backend_batched_requests` (requests
//! the calls carried: requests per call is this over `backend_calls`),
//! `backend_requests_gone` (requests whose client left before their
//! decision), `backend_requests_expired` (requests that waited past
//! `timeout_ms` before being sent), `backend_queue_full` (requests turned
//! away by a full queue), `backend_resume_failures` (a request the host
//! would not let the root finish: must stay 0) and
//! `backend_answers_orphaned` (answers to a call the root never sent), and
//! the admin epoch's polls (`admin_epoch_polls` sent, of which
//! `admin_epoch_poll_failures` failed, and `admin_epoch_changes`: a worker
//! saw the epoch move after a reset or grant, one per worker and change).
//!
//! Settlements of cost from the response: `settle_exact`, `_refunded`,
//! `_charged` (settled, by direction), `_missing`, `_malformed`, `_aborted`
//! (the reservation kept: the response ended without the value, with an
//! unreadable one, or never ended), `settle_failed` (a settlement the
//! store did not take) and `settle_calls` (global mode's calls).
//!
//! Per rule, `rule.<name>.requests` (requests it matched) and
//! `rule.<name>.throttled` (those of them throttled); per limit name,
//! `limit.<name>.throttled` (requests that limit denied): which limit bites.
//!
//! One gauge, `wasm_memory_bytes`, is the linear memory of every VM of the
//! plugin added up (each VM adds its own growth): Wasm memory never
//! shrinks, so a leak in the VM shows as a gauge that keeps rising.

use std::cell::Cell;

use ratelimit_core::batch::queue::Counts;
use ratelimit_core::settle::Outcome;
use ratelimit_core::{Event, Events, Policy};

use crate::host::{self, Status};

/// How long counts may gather before a request flushes them.
pub const FLUSH_EVERY_NANOS: u64 = ratelimit_core::time::NANOS_PER_SECOND / 10;
/// The root context's tick, which flushes what requests left.
pub const TICK_MILLIS: u32 = 250;
/// The tick in global mode, which also ends queued requests past their
/// deadline and sends what a lost wake-up left behind.
pub const WATCHDOG_TICK_MILLIS: u32 = 50;

/// The root's own counters, besides the core's events.
const CALL_COUNTERS: [&str; 9] = [
    "backend_batched_requests",
    "backend_requests_gone",
    "backend_requests_expired",
    "backend_queue_full",
    "backend_resume_failures",
    "backend_answers_orphaned",
    "admin_epoch_polls",
    "admin_epoch_poll_failures",
    "admin_epoch_changes",
];
const BATCHED: usize = 0;
const GONE: usize = 1;
const EXPIRED: usize = 2;
const QUEUE_FULL: usize = 3;
const RESUME_FAILURES: usize = 4;
const ORPHANED: usize = 5;
pub const EPOCH_POLLS: usize = 6;
pub const EPOCH_POLL_FAILURES: usize = 7;
pub const EPOCH_CHANGES: usize = 8;

/// Settlements from the response (`ratelimit_core::settle`): one counter
/// per outcome, then failed store writes (`settle_failed`: a local CAS
/// that gave up, or a global call that failed: each settlement it carried is lost) and
/// the global calls sent (`settle_calls`).
pub const SETTLE_COUNTERS: [&str; Outcome::NAMES.len() + 2] = {
    let mut all = ["settle_failed"; Outcome::NAMES.len() + 2];
    let mut i = 0;
    while i < Outcome::NAMES.len() {
        // Built at compile time: an index out of range fails the build.
        #[allow(clippy::indexing_slicing)]
        {
            all[i] = Outcome::NAMES[i];
        }
        i += 1;
    }
    #[allow(clippy::indexing_slicing)]
    {
        all[i + 1] = "settle_calls";
    }
    all
};
pub const SETTLE_FAILED: usize = Outcome::NAMES.len();
pub const SETTLE_CALLS: usize = Outcome::NAMES.len() + 1;

pub struct Metrics {
    ids: [u32; Event::ALL.len()],
    pending: [Cell<u64>; Event::ALL.len()],
    last_flush: Cell<u64>,
    memory_id: u32,
    call_ids: [u32; CALL_COUNTERS.len()],
    calls_pending: [Cell<u64>; CALL_COUNTERS.len()],
    settle_ids: [u32; SETTLE_COUNTERS.len()],
    settle_pending: [Cell<u64>; SETTLE_COUNTERS.len()],
    /// Per rule: (requests, throttled).
    rule_ids: Vec<(u32, u32)>,
    rules_pending: Vec<(Cell<u64>, Cell<u64>)>,
    /// Per limit name: throttled.
    limit_ids: Vec<u32>,
    limits_pending: Vec<Cell<u64>>,
}

thread_local! {
    /// This VM's memory as last added to the gauge: one per VM, however
    /// many plugin configurations (each with its `Metrics`) it runs.
    static MEMORY_REPORTED: Cell<u64> = const { Cell::new(0) };
}

impl Metrics {
    pub fn define(plugin_name: &str, policy: &Policy) -> Result<Metrics, Status> {
        let prefix = format!("apikey_ratelimit.{}.", sanitize(plugin_name));
        let mut ids = [0; Event::ALL.len()];
        for (id, event) in ids.iter_mut().zip(Event::ALL) {
            *id = host::define_counter(&format!("{prefix}{}", event.metric_name()))?;
        }
        let memory_id = host::define_gauge(&format!("{prefix}wasm_memory_bytes"))?;
        let mut call_ids = [0; CALL_COUNTERS.len()];
        for (id, name) in call_ids.iter_mut().zip(CALL_COUNTERS) {
            *id = host::define_counter(&format!("{prefix}{name}"))?;
        }
        let mut settle_ids = [0; SETTLE_COUNTERS.len()];
        for (id, name) in settle_ids.iter_mut().zip(SETTLE_COUNTERS) {
            *id = host::define_counter(&format!("{prefix}{name}"))?;
        }
        let rule_ids = policy
            .rules
            .iter()
            .map(|rule| {
                let rule = format!("{prefix}rule.{}.", sanitize(&rule.name));
                Ok((
                    host::define_counter(&format!("{rule}requests"))?,
                    host::define_counter(&format!("{rule}throttled"))?,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let limit_ids = policy
            .limit_names
            .iter()
            .map(|name| {
                host::define_counter(&format!("{prefix}limit.{}.throttled", sanitize(name)))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Metrics {
            ids,
            pending: Default::default(),
            last_flush: Cell::new(0),
            memory_id,
            call_ids,
            calls_pending: Default::default(),
            settle_ids,
            settle_pending: Default::default(),
            rules_pending: rule_ids.iter().map(|_| Default::default()).collect(),
            rule_ids,
            limits_pending: limit_ids.iter().map(|_| Cell::default()).collect(),
            limit_ids,
        })
    }

    /// Counts the events; flushes if `now` (when known) says it is time.
    pub fn record(&self, events: Events, now: Option<u64>) {
        for event in events.iter() {
            if let Some(pending) = self.pending.get(event.index()) {
                add(pending, 1);
            }
        }
        if events.rules != 0 {
            for (i, (requests, throttled)) in self.rules_pending.iter().enumerate() {
                if events.rules & 1u32.checked_shl(i as u32).unwrap_or(0) != 0 {
                    add(requests, 1);
                    if events.throttled() {
                        add(throttled, 1);
                    }
                }
            }
        }
        for index in events.denied_limits.iter() {
            if let Some(pending) = self.limits_pending.get(usize::from(*index)) {
                add(pending, 1);
            }
        }
        if let Some(now) = now {
            if now.saturating_sub(self.last_flush.get()) >= FLUSH_EVERY_NANOS {
                self.flush(now);
            }
        }
    }

    /// Counts an answer to a call the root never sent (flushed with the rest).
    pub fn orphaned_answer(&self, now: Option<u64>) {
        self.add_call_counter(ORPHANED, 1);
        self.record(Events::default(), now);
    }

    /// Counts a request the root could not finish.
    pub fn resume_failure(&self) {
        self.add_call_counter(RESUME_FAILURES, 1);
    }

    /// Counts what the root's calls did since last asked.
    pub fn calls(&self, counts: Counts) {
        if let Some(pending) = self.pending.get(Event::BackendCall.index()) {
            pending.set(pending.get().saturating_add(counts.calls));
        }
        self.add_call_counter(BATCHED, counts.requests_sent);
        self.add_call_counter(GONE, counts.gone);
        self.add_call_counter(EXPIRED, counts.expired);
        self.add_call_counter(QUEUE_FULL, counts.queue_full);
    }

    /// Counts one admin epoch event (`EPOCH_POLLS`, `EPOCH_POLL_FAILURES`,
    /// `EPOCH_CHANGES`).
    pub fn epoch(&self, index: usize) {
        self.add_call_counter(index, 1);
    }

    fn add_call_counter(&self, index: usize, by: u64) {
        if let Some(pending) = self.calls_pending.get(index) {
            pending.set(pending.get().saturating_add(by));
        }
    }

    /// Counts `by` on settlement counter `index` ([`SETTLE_COUNTERS`]).
    pub fn settled(&self, index: usize, by: u64) {
        if let Some(pending) = self.settle_pending.get(index) {
            add(pending, by);
        }
    }

    /// Hands every gathered count to Envoy.
    pub fn flush(&self, now: u64) {
        let events = self.ids.iter().zip(&self.pending);
        let calls = self.call_ids.iter().zip(&self.calls_pending);
        let rules = self
            .rule_ids
            .iter()
            .zip(&self.rules_pending)
            .flat_map(|((a, b), (x, y))| [(a, x), (b, y)]);
        let limits = self.limit_ids.iter().zip(&self.limits_pending);
        let settle = self.settle_ids.iter().zip(&self.settle_pending);
        for (id, pending) in events.chain(calls).chain(rules).chain(limits).chain(settle) {
            let count = pending.replace(0);
            if count > 0 {
                host::increment_metric(*id, i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        self.report_memory();
        self.last_flush.set(now);
    }

    fn report_memory(&self) {
        let bytes = memory_bytes();
        let growth = bytes.saturating_sub(MEMORY_REPORTED.get());
        if growth > 0 {
            host::increment_metric(self.memory_id, i64::try_from(growth).unwrap_or(i64::MAX));
            MEMORY_REPORTED.set(bytes);
        }
    }
}

fn add(counter: &Cell<u64>, by: u64) {
    counter.set(counter.get().saturating_add(by));
}

/// The VM's linear memory, in bytes (0 off Wasm, in native tests).
fn memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        const PAGE: u64 = 65_536;
        (core::arch::wasm32::memory_size(0) as u64).saturating_mul(PAGE)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// Stat names are dot-separated; keep a plugin name to one clean segment
/// (Istio names plugins `<namespace>.<name>`).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
