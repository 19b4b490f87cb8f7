//! The global store's local memory of throttled keys.
//!
//! Every answer from Redis says, per limit, how long until that bucket is
//! full again. Added to the time the call was *sent* (never later than the
//! moment Redis decided), that gives a lower bound of the key's TATs on the
//! local clock. Since a TAT only grows (other instances can only add to it),
//! whenever these lower bounds already deny a request, Redis would deny it
//! too: the instance answers 429 itself, with no call, and loses nothing.
//! Under a flood on a throttled key this keeps Redis out of the way: only
//! requests that might be admitted go to it.
//!
//! A lower bound is the right way to decide, but the wrong way to promise:
//! Redis decided somewhere between sending and receiving, so the true TAT can
//! be up to the call's round trip later. An entry therefore also keeps that
//! round trip (its `guard` word, the *slack*), and a `Retry-After` answered
//! from the cache is the lower-bound wait plus the slack: a client that waits
//! that long is admitted if nothing else happened.
//!
//! The table is direct-mapped in Envoy shared data (one entry per slot,
//! shared by the workers): an entry is a [`KeyState`], the layout of the
//! local store's slots, with each TAT under its limit's identity. A new
//! answer is merged into the key's entry by taking, per limit, the later TAT
//! (and the larger slack): both are true lower bounds, so the later one is
//! too, and an answer that arrives late never loosens what a newer one
//! established. Any entry is a true lower bound for its key, so a lost write
//! only costs a cache miss. Times are the filter's monotonic clock.
//!
//! A calendar quota's entry is the same kind of lower bound: its period's
//! end (the answer's time to the reset, added to the sending time, rounded
//! down) with what was used in it (`quota::pack`). It denies while that end
//! is ahead and too little is left; its `Retry-After` is the end rounded up
//! plus the slack. Which calendar period Redis is in is Redis's to say: the
//! cache never reads it from a clock of its own.
//!
//! The `key` of every function here is the key's hash as the worker's
//! admin epoch files it (`admin::epoch::Poller::cache_key`): after an
//! operator's reset or grant, entries learnt before are simply misses.

use crate::gcra::{self, Clock, Decision, Limit, LimitState};
use crate::hash::KeyHash;
use crate::per_limit::{PerLimit, MAX_LIMITS};
use crate::quota;
use crate::state::{KeyState, MAX_VALUE};

/// The cache slot of a key.
pub fn slot(key: KeyHash, slots: u32) -> u32 {
    u32::try_from(key.spread % u64::from(slots.max(1))).unwrap_or(0)
}

/// A denial decided from the cached entry at monotonic `now`, if it denies;
/// `None` means ask Redis. Its `retry_after_nanos` includes the entry's
/// slack. `wall` (read with `now`, when some limit is a quota) only names a
/// quota's period length in the headers.
pub fn lookup(
    limits: &[Limit],
    entry: &[u8],
    key: KeyHash,
    now: u64,
    wall: Option<u64>,
) -> Option<Decision> {
    let state = KeyState::decode(entry)?;
    if state.fingerprint != key.fingerprint {
        return None;
    }
    // An entry holds at most MAX_LIMITS TATs; it cannot vouch for more.
    if limits.len() > MAX_LIMITS {
        return None;
    }
    // Nor for a limit it holds nothing of: another replica may have spent
    // it (another route of the key), so its wait, and which limit binds,
    // are Redis's to say; a denial from the others alone could promise a
    // Retry-After that comes too early.
    if !limits
        .iter()
        .all(|l| state.entries().iter().any(|(id, _)| *id == l.id))
    {
        return None;
    }
    let mut tats = state.tats_for(limits);
    let mut decision = gcra::decide(limits, tats.as_mut_slice(), Clock::cached(now, wall));
    if decision.allowed {
        return None;
    }
    decision.retry_after_nanos = decision.retry_after_nanos.saturating_add(state.guard);
    Some(decision)
}

/// Whether an answer on `limits` is worth a cache entry: only one that
/// leaves some limit with less than the request's cost to spend can make a
/// later lookup deny. The others would cost a shared-data write for nothing.
pub fn worth_remembering(decision: &Decision, limits: &[Limit]) -> bool {
    worth_remembering_from(decision, limits, 0)
}

/// The same, for a cache that decides only on the limits from `first` on
/// (with plans from Redis, the rules' limits: `Policy::cacheable`).
pub fn worth_remembering_from(decision: &Decision, limits: &[Limit], first: usize) -> bool {
    decision
        .states()
        .iter()
        .zip(limits)
        .skip(first)
        .any(|(state, limit)| state.remaining < limit.cost.max(1))
}

/// When an answer reached the filter: the times it was sent and received,
/// and what it said per limit (what is left, and how long until each
/// bucket is full or quota whole again).
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub sent_at: u64,
    pub received_at: u64,
    pub states: &'a [LimitState],
}

/// The entry to write for `key` after `answer` on `limits`, merged with the
/// slot's `current` bytes.
pub fn entry<'a>(
    buf: &'a mut [u8; MAX_VALUE],
    current: &[u8],
    key: KeyHash,
    limits: &[Limit],
    answer: Answer<'_>,
) -> &'a [u8] {
    let mut tats: PerLimit<u64> = answer
        .states
        .iter()
        .zip(limits)
        .map(|(state, limit)| {
            let until = answer.sent_at.saturating_add(state.reset_nanos);
            match limit.period {
                Some(_) => quota::pack(until, limit.burst.saturating_sub(state.remaining), false),
                None => until,
            }
        })
        .collect();
    let count = limits.len().min(tats.len());
    let mut slack = answer.received_at.saturating_sub(answer.sent_at);
    let mut base = KeyState::fresh(key.fingerprint);
    if let Some(old) = KeyState::decode(current).filter(|s| s.fingerprint == key.fingerprint) {
        for (tat, old_tat) in tats.as_mut_slice().iter_mut().zip(&old.tats_for(limits)) {
            *tat = (*tat).max(*old_tat);
        }
        slack = slack.max(old.guard);
        base = old;
    }
    let limits = limits.get(..count).unwrap_or(&[]);
    let mut next = base.with_tats(limits, tats.as_slice(), answer.sent_at);
    next.guard = slack;
    next.encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{key_hash, limit, named_limit, S};
    use crate::time::{ceil_seconds, micros_to_nanos};
    use std::time::Duration;

    fn limits() -> Vec<Limit> {
        vec![limit(2, 10, 2)]
    }

    /// Per limit, microseconds until the bucket is full (all a rate's
    /// entry needs).
    fn states(resets_us: &[u64]) -> Vec<LimitState> {
        resets_us
            .iter()
            .map(|us| LimitState {
                reset_nanos: us * 1_000,
                ..LimitState::default()
            })
            .collect()
    }

    fn answer(sent_at: u64, states: &[LimitState]) -> Answer<'_> {
        Answer {
            sent_at,
            received_at: sent_at,
            states,
        }
    }

    fn write(current: &[u8], key: KeyHash, limits: &[Limit], answer: Answer<'_>) -> Vec<u8> {
        let mut buf = [0; MAX_VALUE];
        entry(&mut buf, current, key, limits, answer).to_vec()
    }

    fn lookup(limits: &[Limit], entry: &[u8], key: KeyHash, now: u64) -> Option<Decision> {
        super::lookup(limits, entry, key, now, None)
    }

    #[test]
    fn a_throttled_key_is_denied_locally_until_its_retry_time() {
        let limits = limits();
        let key = key_hash(b"k");
        let sent_at = 100 * S;
        // Redis: denied, the bucket is full again in 10 s (2 x 5 s).
        let e = write(&[], key, &limits, answer(sent_at, &states(&[10_000_000])));
        let d = lookup(&limits, &e, key, sent_at + S).unwrap();
        assert_eq!(d.retry_after_nanos, 4 * S);
        assert!(lookup(&limits, &e, key, sent_at + 5 * S - 1).is_some());
        // From the retry time on, the request goes to Redis again.
        assert!(lookup(&limits, &e, key, sent_at + 5 * S).is_none());
    }

    #[test]
    fn retry_after_from_the_cache_is_never_early() {
        // Redis decided at some point of a 300 ms round trip. The cache
        // denies on the lower bound but promises the upper bound: a client
        // that waits exactly Retry-After (rounded up to whole seconds, as
        // the reply does) is admitted by Redis, wherever in the round trip
        // Redis decided.
        let limits = limits();
        let key = key_hash(b"k");
        let (sent_at, rtt) = (100 * S, 300_000_000);
        let reset_us = 9_200_000; // the true TAT is 9.2 s after Redis decided
        let e = write(
            &[],
            key,
            &limits,
            Answer {
                sent_at,
                received_at: sent_at + rtt,
                states: &states(&[reset_us]),
            },
        );
        let asked_at = sent_at + rtt + S;
        let d = lookup(&limits, &e, key, asked_at).unwrap();
        let wait = ceil_seconds(d.retry_after_nanos) * S;
        for decided_at in [sent_at, sent_at + rtt / 2, sent_at + rtt] {
            let true_tat = decided_at + micros_to_nanos(reset_us);
            let tolerance = limits[0].tolerance_nanos();
            assert!(
                true_tat - tolerance <= asked_at + wait,
                "decided at +{:?}: admitted only {:?} after Retry-After",
                Duration::from_nanos(decided_at - sent_at),
                Duration::from_nanos(true_tat - tolerance - asked_at - wait)
            );
        }
    }

    #[test]
    fn other_keys_miss_and_other_limits_decide_alone() {
        let limits = limits();
        let key = key_hash(b"k");
        let e = write(&[], key, &limits, answer(0, &states(&[10_000_000])));
        assert!(lookup(&limits, &e, key_hash(b"other"), 1).is_none());
        // A request that also meets a limit the entry knows nothing of
        // (another route's, spent on another replica) goes to Redis.
        let daily = named_limit("daily", 1000, 86_400, 1000);
        let two = [limits.clone(), vec![daily]].concat();
        assert!(lookup(&two, &e, key, 1).is_none());
        assert!(lookup(&[daily], &e, key, 1).is_none());
        assert!(lookup(&limits, &[], key, 1).is_none());
        assert!(slot(key, 7) < 7);
    }

    #[test]
    fn a_cached_denial_never_names_a_limit_for_another_that_binds_longer() {
        // Replica B saw the key-wide limit spent (5 s to the next request);
        // create-order (15 s) was spent through replica A. B's entry must
        // not answer a request that meets both: Redis names create-order.
        let key_wide = named_limit("12/min", 12, 60, 12);
        let create = named_limit("create-order:4/min", 4, 60, 4);
        let key = key_hash(b"k");
        let e = write(&[], key, &[key_wide], answer(0, &states(&[60_000_000])));
        assert!(lookup(&[key_wide], &e, key, S).is_some());
        assert!(lookup(&[key_wide, create], &e, key, S).is_none());
        // Once Redis answered for both, the entry knows both and names the
        // binding one.
        let e = write(
            &e,
            key,
            &[key_wide, create],
            answer(S, &states(&[59_000_000, 60_000_000])),
        );
        let d = lookup(&[key_wide, create], &e, key, S).unwrap();
        assert_eq!(d.binding(), Some(1));
    }

    #[test]
    fn an_entry_after_an_admission_denies_only_when_nothing_is_left() {
        let limits = limits();
        let key = key_hash(b"k");
        // One of two used: 5 s of debt, still room for one more.
        let e = write(&[], key, &limits, answer(0, &states(&[5_000_000])));
        assert!(lookup(&limits, &e, key, 1).is_none());
    }

    #[test]
    fn only_answers_that_exhaust_a_limit_are_worth_an_entry() {
        let limits = limits();
        let mut tats = [0];
        let first = gcra::decide(&limits, &mut tats, S);
        assert_eq!(first.states()[0].remaining, 1);
        assert!(!worth_remembering(&first, &limits));
        let second = gcra::decide(&limits, &mut tats, S);
        assert!(worth_remembering(&second, &limits));
        let denied = gcra::decide(&limits, &mut tats, S);
        assert!(!denied.allowed && worth_remembering(&denied, &limits));
        assert!(!worth_remembering(&Decision::unlimited(), &[]));
        // Past the limits the cache decides on: nothing to remember.
        assert!(!worth_remembering_from(&second, &limits, 1));
        // At cost 8 of a 20-burst: 16 spent leaves 4, less than one request.
        let costly = [named_limit("tokens", 20, 60, 20).costing(8)];
        let mut tats = [0];
        let first = gcra::decide(&costly, &mut tats, S);
        assert!(!worth_remembering(&first, &costly), "12 left");
        let second = gcra::decide(&costly, &mut tats, S);
        assert_eq!(second.states()[0].remaining, 4);
        assert!(worth_remembering(&second, &costly));
    }

    #[test]
    fn a_late_answer_never_loosens_a_newer_one() {
        let limits = limits();
        let key = key_hash(b"k");
        // Sent at 2 s: the bucket is full again only at 12 s (denying).
        let newer = write(&[], key, &limits, answer(2 * S, &states(&[10_000_000])));
        // An answer sent at 1 s, arriving later, saying "full at 6 s".
        let merged = write(&newer, key, &limits, answer(S, &states(&[5_000_000])));
        assert_eq!(merged, newer);
        assert!(lookup(&limits, &merged, key, 3 * S).is_some());
        // Another key's entry in the slot is simply replaced.
        let other = write(
            &newer,
            key_hash(b"x"),
            &limits,
            answer(S, &states(&[5_000_000])),
        );
        assert!(lookup(&limits, &other, key, 3 * S).is_none());
    }
}
