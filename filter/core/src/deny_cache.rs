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
//! The table is direct-mapped in Envoy shared data (one entry per slot,
//! shared by the workers): an entry holds the key's fingerprint and those
//! TATs, the same layout as the local store's slots. A new answer is merged
//! into the key's entry by taking, per limit, the later TAT: both are true
//! lower bounds, so the later one is too, and an answer that arrives late
//! never loosens what a newer one established. Any entry is a true lower
//! bound for its key, so a lost write only costs a cache miss.

use crate::gcra::{self, Decision, Limit, MAX_LIMITS};
use crate::hash::KeyHash;
use crate::slots::{self, Stored};

/// The cache slot of a key.
pub fn slot(key: KeyHash, slots: u32) -> u32 {
    u32::try_from(key.spread % u64::from(slots.max(1))).unwrap_or(0)
}

/// A denial decided from the cached entry, if it denies; `None` means ask
/// Redis.
pub fn lookup(limits: &[Limit], entry: &[u8], key: KeyHash, now: u64) -> Option<Decision> {
    let stored = Stored::decode(entry)?;
    if stored.fingerprint != key.fingerprint || stored.count != limits.len() {
        return None;
    }
    let mut tats = stored.tats;
    let tats = tats.get_mut(..limits.len())?;
    let decision = gcra::decide(limits, tats, now);
    (!decision.allowed).then_some(decision)
}

/// Whether an answer is worth an entry: only one that leaves some limit
/// with nothing remaining can make the next request's lookup deny. Other
/// entries would always be misses, so writing them would only cost two
/// host calls per admitted request.
pub fn worth_remembering(decision: &Decision) -> bool {
    decision.states().iter().any(|state| state.remaining == 0)
}

/// The lower-bound TATs after a Redis answer: `sent_at` plus each reset.
pub fn tats_after(sent_at_nanos: u64, resets_us: &[u64]) -> [u64; MAX_LIMITS] {
    let mut tats = [0; MAX_LIMITS];
    for (tat, reset) in tats.iter_mut().zip(resets_us) {
        *tat = sent_at_nanos.saturating_add(reset.saturating_mul(1_000));
    }
    tats
}

/// The entry to write after a Redis answer, merged with `current` (what
/// the slot holds now) when that is the same key's.
pub fn entry<'a>(
    buf: &'a mut [u8; slots::MAX_VALUE],
    current: &[u8],
    key: KeyHash,
    sent_at_nanos: u64,
    resets_us: &[u64],
) -> &'a [u8] {
    let mut tats = tats_after(sent_at_nanos, resets_us);
    let count = resets_us.len().min(MAX_LIMITS);
    if let Some(stored) = Stored::decode(current) {
        if stored.fingerprint == key.fingerprint && stored.count == count {
            for (tat, old) in tats.iter_mut().zip(stored.tats) {
                *tat = (*tat).max(old);
            }
        }
    }
    slots::encode(buf, key.fingerprint, tats.get(..count).unwrap_or(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limits() -> Vec<Limit> {
        vec![crate::gcra::test_limit(2, 10, 2)]
    }

    #[test]
    fn a_throttled_key_is_denied_locally_until_its_retry_time() {
        let limits = limits();
        let key = KeyHash::of(b"k");
        let sent_at = 100 * S;
        // Redis: denied, the bucket is full again in 10 s (2 x 5 s).
        let mut buf = [0; slots::MAX_VALUE];
        let e = entry(&mut buf, &[], key, sent_at, &[10_000_000]).to_vec();
        let d = lookup(&limits, &e, key, sent_at + S).unwrap();
        assert_eq!(d.retry_after_nanos, 4 * S);
        assert!(lookup(&limits, &e, key, sent_at + 5 * S - 1).is_some());
        // From the retry time on, the request goes to Redis again.
        assert!(lookup(&limits, &e, key, sent_at + 5 * S).is_none());
    }

    #[test]
    fn other_keys_and_other_configs_miss() {
        let limits = limits();
        let key = KeyHash::of(b"k");
        let mut buf = [0; slots::MAX_VALUE];
        let e = entry(&mut buf, &[], key, 0, &[10_000_000]).to_vec();
        assert!(lookup(&limits, &e, KeyHash::of(b"other"), 1).is_none());
        let two = [limits.clone(), limits.clone()].concat();
        assert!(lookup(&two, &e, key, 1).is_none());
        assert!(lookup(&limits, &[], key, 1).is_none());
        assert!(slot(key, 7) < 7);
    }

    #[test]
    fn an_entry_after_an_admission_denies_only_when_nothing_is_left() {
        let limits = limits();
        let key = KeyHash::of(b"k");
        let mut buf = [0; slots::MAX_VALUE];
        // One of two used: 5 s of debt, still room for one more.
        let e = entry(&mut buf, &[], key, 0, &[5_000_000]).to_vec();
        assert!(lookup(&limits, &e, key, 1).is_none());
    }

    #[test]
    fn only_answers_that_exhaust_a_limit_are_worth_an_entry() {
        let limits = limits();
        let mut tats = [0];
        let first = gcra::decide(&limits, &mut tats, S);
        assert_eq!(first.states()[0].remaining, 1);
        assert!(!worth_remembering(&first));
        let second = gcra::decide(&limits, &mut tats, S);
        assert!(worth_remembering(&second));
        let denied = gcra::decide(&limits, &mut tats, S);
        assert!(!denied.allowed && worth_remembering(&denied));
        assert!(!worth_remembering(&Decision::unlimited()));
    }

    #[test]
    fn a_late_answer_never_loosens_a_newer_one() {
        let limits = limits();
        let key = KeyHash::of(b"k");
        let mut newer = [0; slots::MAX_VALUE];
        // Sent at 2 s: the bucket is full again only at 12 s (denying).
        let newer = entry(&mut newer, &[], key, 2 * S, &[10_000_000]).to_vec();
        // An answer sent at 1 s, arriving later, saying "full at 6 s".
        let mut merged = [0; slots::MAX_VALUE];
        let merged = entry(&mut merged, &newer, key, S, &[5_000_000]).to_vec();
        assert_eq!(merged, newer);
        assert!(lookup(&limits, &merged, key, 3 * S).is_some());
        // Another key's entry in the slot is simply replaced.
        let mut other = [0; slots::MAX_VALUE];
        let other = entry(&mut other, &newer, KeyHash::of(b"x"), S, &[5_000_000]).to_vec();
        assert!(lookup(&limits, &other, key, 3 * S).is_none());
    }
}
