//! A request's settlement of cost from the response
//! (`ratelimit_core::settle`): begun when an admitted request's response
//! starts, fed the response's headers, body and trailers as they pass (the
//! response is never held), and ended when the value comes, the response
//! ends without it, or the stream goes away first (the reservation is then
//! kept, and counted). Local mode settles in this Envoy's shared data at
//! once; global mode hands the settlement to the root context
//! (`settle_calls.rs`), so the response never waits for Redis and the call
//! outlives the request.

use ratelimit_core::gcra::Clock;
use ratelimit_core::hash::KeyHash;
use ratelimit_core::header_map::HeaderMap;
use ratelimit_core::key::RequestHeaders;
use ratelimit_core::pipeline::Quota;
use ratelimit_core::settle::body::BodyScan;
use ratelimit_core::settle::{self, Observed, Outcome, Reserved, Source};
use ratelimit_core::slots::Rewritten;

use crate::callouts::Callouts;
use crate::filter::{Filter, Store};
use crate::host;
use crate::metrics::SETTLE_FAILED;
use crate::settle_calls::Queued;
use crate::shared_store::SharedStore;

/// Where a request's counters are: its slot's key hash, and in global
/// mode its Redis key.
pub struct SettleKey {
    pub hash: KeyHash,
    pub redis_key: Option<String>,
}

/// An admitted request's reservations still waiting for their value.
pub struct Settling {
    key: SettleKey,
    open: Vec<Open>,
}

struct Open {
    reserved: Reserved,
    /// A `json` source's body, being read.
    scan: Option<BodyScan>,
}

impl Settling {
    /// `None` unless the request was admitted with a settling rule.
    pub fn begin(filter: &Filter, quota: &Quota, key: SettleKey) -> Option<Settling> {
        if !quota.decision.allowed {
            return None;
        }
        let reserved = settle::reserved(&filter.policy, &quota.applied);
        (!reserved.is_empty()).then(|| Settling {
            key,
            open: reserved
                .into_iter()
                .map(|reserved| Open {
                    reserved,
                    scan: None,
                })
                .collect(),
        })
    }

    /// Whether a body is being read (its chunks are wanted).
    pub fn reads_body(&self) -> bool {
        self.open.iter().any(|o| o.scan.is_some())
    }

    /// The response headers: a `header` source is read now, a `json` one's
    /// body scan starts. `true` when nothing is left open.
    pub fn on_headers(&mut self, filter: &Filter, callouts: &Callouts, end: bool) -> bool {
        let map = host::response_header_pairs().unwrap_or_default();
        let headers = HeaderMap::parse(&map);
        let content_type = headers
            .as_ref()
            .and_then(|h| h.single(b"content-type").ok().flatten());
        let mut i = 0;
        while let Some(open) = self.open.get_mut(i) {
            match open.reserved.source(&filter.policy) {
                Some(Source::Header(name)) => {
                    let observed = settle::observe_header(headers.as_ref(), name);
                    let open = self.open.swap_remove(i);
                    settle_one(filter, callouts, &self.key, open.reserved, observed);
                    continue;
                }
                Some(Source::Json { max_body_bytes, .. }) => {
                    open.scan = Some(BodyScan::new(content_type, *max_body_bytes));
                }
                _ => {}
            }
            i += 1;
        }
        if end {
            self.end(filter, callouts);
        }
        self.open.is_empty()
    }

    /// A piece of the response body. `true` when nothing is left open.
    pub fn on_body(
        &mut self,
        filter: &Filter,
        callouts: &Callouts,
        size: usize,
        end: bool,
    ) -> bool {
        if self.reads_body() && size > 0 {
            let chunk = host::response_body(size).unwrap_or_default();
            for open in &mut self.open {
                if let (Some(scan), Some(Source::Json { path, .. })) =
                    (&mut open.scan, open.reserved.source(&filter.policy))
                {
                    scan.feed(&chunk, path);
                }
            }
        }
        if end {
            self.end(filter, callouts);
        }
        self.open.is_empty()
    }

    /// The response trailers, which end the response.
    pub fn on_trailers(&mut self, filter: &Filter, callouts: &Callouts) {
        let map = host::response_trailer_pairs().unwrap_or_default();
        let trailers = HeaderMap::parse(&map);
        let mut i = 0;
        while let Some(open) = self.open.get(i) {
            if let Some(Source::Trailer(name)) = open.reserved.source(&filter.policy) {
                let observed = settle::observe_header(trailers.as_ref(), name);
                let open = self.open.swap_remove(i);
                settle_one(filter, callouts, &self.key, open.reserved, observed);
                continue;
            }
            i += 1;
        }
        self.end(filter, callouts);
    }

    /// The response ended: a body read says what it found, the rest are
    /// missing.
    fn end(&mut self, filter: &Filter, callouts: &Callouts) {
        for open in std::mem::take(&mut self.open) {
            let observed = match (open.scan, open.reserved.source(&filter.policy)) {
                (Some(scan), Some(Source::Json { path, .. })) => scan.finish(path),
                _ => Observed::Missing,
            };
            settle_one(filter, callouts, &self.key, open.reserved, observed);
        }
    }

    /// The stream went away before its response ended: every reservation
    /// still open is kept.
    pub fn abort(self, filter: &Filter) {
        let open = u64::try_from(self.open.len()).unwrap_or(u64::MAX);
        filter.metrics.settled(Outcome::Aborted.index(), open);
    }

    /// The stream went away before its response began: every reservation
    /// of an admitted request is kept.
    pub fn abort_unanswered(filter: &Filter, quota: &Quota) {
        if quota.decision.allowed {
            let open = settle::reserved(&filter.policy, &quota.applied).len();
            let open = u64::try_from(open).unwrap_or(u64::MAX);
            filter.metrics.settled(Outcome::Aborted.index(), open);
        }
    }
}

/// Counts one reservation's outcome and applies it to the store.
fn settle_one(
    filter: &Filter,
    callouts: &Callouts,
    key: &SettleKey,
    reserved: Reserved,
    observed: Observed,
) {
    let outcome = Outcome::of(reserved.estimate, observed);
    filter.metrics.settled(outcome.index(), 1);
    let Some(adjust) = outcome.adjust() else {
        return;
    };
    match &filter.store {
        Store::Local { table, prefix } => {
            let wall = filter.wall_clock().ok().flatten();
            let written = host::now_nanos().ok().map(|now| {
                table.rewrite(
                    &mut SharedStore::new(prefix),
                    key.hash,
                    reserved.limits(&filter.policy).as_slice(),
                    Clock::local(now, wall),
                    |limit, value, clock| settle::apply(adjust, limit, value, clock),
                )
            });
            // A slot taken over since (the key idle) has nothing to settle.
            if !matches!(written, Some(Ok(Rewritten::Done | Rewritten::Fresh))) {
                filter.metrics.settled(SETTLE_FAILED, 1);
            }
        }
        // No deny cache to clear: it never decides on a settled rule's
        // limits (`Policy::cacheable`).
        Store::Webdis(_) => {
            let Some(redis_key) = key.redis_key.clone() else {
                filter.metrics.settled(SETTLE_FAILED, 1);
                return;
            };
            callouts.settle(
                filter,
                Queued {
                    redis_key,
                    adjust,
                    rule: reserved.rule,
                },
            );
        }
    }
}
