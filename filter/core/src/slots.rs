//! The local store's fixed table of slots, and the compare-and-swap loop that
//! updates a key's state in it.
//!
//! Envoy never frees a shared-data key, so one entry per API key would grow
//! forever and any client could mint keys. Instead the table has `slots`
//! entries, all created at start-up; a key lives in one of [`PROBES`]
//! candidate slots chosen by its keyed hash (`hash::KeyHasher`: the slots of
//! a key cannot be computed offline). A slot holds the key's state
//! ([`KeyState`]: its fingerprint and one TAT per limit), so a single CAS
//! write updates the whole state of a key atomically.
//!
//! Finding a key's slot, in order:
//! 1. a candidate holding the key's fingerprint is the key's state;
//! 2. else the first candidate that is empty or *idle* (every bucket full,
//!    which is the same as a fresh state) is taken over: nothing is lost;
//! 3. else, among candidates whose key is not throttled right now, the one
//!    with the least debt (the earliest TAT, the key closest to being
//!    forgotten anyway) is evicted, like nginx's `limit_req` evicts its
//!    least recently used state. The evicted key restarts with a full bucket
//!    but was not throttled, so it regains less than one burst. Evictions are
//!    counted;
//! 4. else every candidate holds a throttled key: a throttled state is never
//!    evicted (that would hand its key a fresh bucket), so the newcomer is
//!    the one that loses: it is denied ([`Outcome::Full`]) until the first
//!    of those keys stops being throttled, and counted (`slot_table_full`).
//!
//! Every write is a CAS on the value read; on a conflict the lookup starts
//! again, at most `max_retries` times. If the retries run out the request is
//! denied (see [`Outcome::RetriesExhausted`]): a conflict means another
//! worker just wrote this key, so it is hot, and denying keeps the promise
//! of never admitting more than the limit.

use crate::gcra::{self, Clock, Decision, Limit};
use crate::hash::KeyHash;
use crate::per_limit::MAX_LIMITS;
use crate::state::{KeyState, MAX_VALUE};

/// Candidate slots per key.
pub const PROBES: usize = 4;

/// The result of a CAS write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Ok,
    /// The value changed since it was read.
    Conflict,
}

/// A store of slots with compare-and-swap semantics: Envoy shared data in
/// the filter, an in-memory map in tests.
pub trait CasStore {
    type Value: AsRef<[u8]>;
    type Error;
    /// The slot's bytes (empty if it holds nothing yet) and its CAS token.
    fn read(&mut self, slot: u32) -> Result<(Self::Value, u32), Self::Error>;
    /// Writes `value` if the slot's CAS token is still `cas`.
    fn write(&mut self, slot: u32, value: &[u8], cas: u32) -> Result<Written, Self::Error>;
}

/// What [`SlotTable::rewrite`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewritten {
    Done,
    /// The key holds no slot: its state is fresh, nothing to change.
    Fresh,
    /// Every attempt met a CAS conflict: nothing changed.
    Conflicts,
}

/// How the key's state was found, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The key's own slot.
    Existing,
    /// An empty or idle slot, taken over at no loss.
    Fresh,
    /// Another key's live, unthrottled state was evicted.
    Evicted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// A decision carries one state per limit (up to 16) by value: boxing it
// would allocate on every request.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Decided {
        decision: Decision,
        placement: Placement,
        /// CAS conflicts met on the way.
        conflicts: u32,
    },
    /// Every attempt met a CAS conflict; the caller denies the request. The
    /// wait is read from the key's state after the last conflict: 0 if that
    /// state would admit the request (the caller still answers at least one
    /// second), else the exact wait it implies.
    RetriesExhausted { retry_after_nanos: u64 },
    /// Every candidate slot holds another key that is throttled: the request
    /// is denied, and a wait of `retry_after_nanos` frees a candidate.
    Full { retry_after_nanos: u64 },
}

/// The table's shape: how many slots, how many CAS retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotTable {
    slots: u32,
    max_retries: u32,
}

impl SlotTable {
    /// `slots` must be at least [`PROBES`]; config validation enforces it.
    pub fn new(slots: u32, max_retries: u32) -> SlotTable {
        SlotTable {
            slots: slots.max(PROBES as u32),
            max_retries,
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The key's candidate slots (double hashing; a repeated index, possible
    /// only for unlucky table sizes, is simply probed twice).
    pub fn candidates(&self, key: KeyHash) -> [u32; PROBES] {
        let n = u64::from(self.slots);
        let start = key.spread % n;
        let step = 1 + (key.spread >> 32) % (n - 1).max(1);
        let mut out = [0u32; PROBES];
        for (k, slot) in out.iter_mut().enumerate() {
            let index = (start + step * k as u64) % n;
            *slot = u32::try_from(index).unwrap_or(0);
        }
        out
    }

    /// Decides one request for `key` at `clock` (in the filter
    /// [`Clock::local`]: the monotonic clock, and the wall clock for
    /// quotas), updating its slot.
    pub fn decide<S: CasStore>(
        &self,
        store: &mut S,
        key: KeyHash,
        limits: &[Limit],
        clock: impl Into<Clock>,
    ) -> Result<Outcome, S::Error> {
        let clock = clock.into();
        let now = clock.now;
        let limits = limits.get(..MAX_LIMITS).unwrap_or(limits);
        let candidates = self.candidates(key);
        let mut conflicts = 0;
        loop {
            let found = match self.find(store, key, &candidates, now)? {
                Ok(found) => found,
                Err(retry_after_nanos) => return Ok(Outcome::Full { retry_after_nanos }),
            };
            let mut tats = found.state.tats_for(limits);
            let decision = gcra::decide(limits, tats.as_mut_slice(), clock);
            if !decision.allowed {
                // A denial changes no state: nothing to write.
                return Ok(Outcome::Decided {
                    decision,
                    placement: found.placement,
                    conflicts,
                });
            }
            let mut next = found.state.with_tats(limits, tats.as_slice(), now);
            next.guard = next.throttled_until(limits);
            let mut buf = [0u8; MAX_VALUE];
            match store.write(found.slot, next.encode(&mut buf), found.cas)? {
                Written::Ok => {
                    return Ok(Outcome::Decided {
                        decision,
                        placement: found.placement,
                        conflicts,
                    })
                }
                Written::Conflict if conflicts >= self.max_retries => {
                    let retry_after_nanos = match self.find(store, key, &candidates, now)? {
                        Ok(found) => {
                            let mut tats = found.state.tats_for(limits);
                            gcra::decide(limits, tats.as_mut_slice(), clock).retry_after_nanos
                        }
                        Err(wait) => wait,
                    };
                    return Ok(Outcome::RetriesExhausted { retry_after_nanos });
                }
                Written::Conflict => conflicts += 1,
            }
        }
    }

    /// The key's usage now, read without writing: its own slot's state, or
    /// a fresh one when no candidate holds it (see [`gcra::peek`]).
    pub fn peek<S: CasStore>(
        &self,
        store: &mut S,
        key: KeyHash,
        limits: &[Limit],
        clock: impl Into<Clock>,
    ) -> Result<Decision, S::Error> {
        let clock = clock.into();
        let limits = limits.get(..MAX_LIMITS).unwrap_or(limits);
        let state = match self.find(store, key, &self.candidates(key), clock.now)? {
            Ok(found) if found.placement == Placement::Existing => found.state,
            _ => KeyState::fresh(key.fingerprint),
        };
        let tats = state.tats_for(limits);
        Ok(gcra::peek(limits, tats.as_slice(), clock))
    }

    /// Rewrites the key's stored values of `limits` with `change(limit,
    /// value, clock)` (the admin API's reset and grant, a settlement), in
    /// the same CAS loop as a decision (`Err` is the host's).
    pub fn rewrite<S: CasStore>(
        &self,
        store: &mut S,
        key: KeyHash,
        limits: &[Limit],
        clock: impl Into<Clock>,
        change: impl Fn(&Limit, u64, Clock) -> u64,
    ) -> Result<Rewritten, S::Error> {
        let clock = clock.into();
        let now = clock.now;
        let limits = limits.get(..MAX_LIMITS).unwrap_or(limits);
        let candidates = self.candidates(key);
        for _ in 0..=self.max_retries {
            let found = match self.find(store, key, &candidates, now)? {
                Ok(found) if found.placement == Placement::Existing => found,
                _ => return Ok(Rewritten::Fresh),
            };
            let tats = found.state.tats_for(limits);
            let changed: crate::per_limit::PerLimit<u64> = limits
                .iter()
                .zip(tats.as_slice())
                .map(|(limit, value)| change(limit, *value, clock))
                .collect();
            let mut next = found.state.with_tats(limits, changed.as_slice(), now);
            next.guard = next.throttled_until(limits);
            let mut buf = [0u8; MAX_VALUE];
            if store.write(found.slot, next.encode(&mut buf), found.cas)? == Written::Ok {
                return Ok(Rewritten::Done);
            }
        }
        Ok(Rewritten::Conflicts)
    }

    /// The slot for `key`, or `Err(wait)` when every candidate holds a
    /// throttled key (the wait until the first of them is not).
    fn find<S: CasStore>(
        &self,
        store: &mut S,
        key: KeyHash,
        candidates: &[u32; PROBES],
        now: u64,
    ) -> Result<Result<Found, u64>, S::Error> {
        let mut free: Option<(u32, u32)> = None;
        let mut least_debt: Option<(u32, u32, u64)> = None;
        let mut soonest_unthrottled = u64::MAX;
        for &slot in candidates {
            let (value, cas) = store.read(slot)?;
            match KeyState::decode(value.as_ref()) {
                Some(state) if state.fingerprint == key.fingerprint => {
                    return Ok(Ok(Found {
                        slot,
                        cas,
                        placement: Placement::Existing,
                        state,
                    }));
                }
                Some(state) if state.is_idle(now) => {
                    free.get_or_insert((slot, cas));
                }
                Some(state) if state.guard > now => {
                    soonest_unthrottled = soonest_unthrottled.min(state.guard - now);
                }
                Some(state) => {
                    let latest = state.latest_tat();
                    if least_debt.is_none_or(|(_, _, best)| latest < best) {
                        least_debt = Some((slot, cas, latest));
                    }
                }
                None => {
                    free.get_or_insert((slot, cas));
                }
            }
        }
        let fresh = |(slot, cas), placement| Found {
            slot,
            cas,
            placement,
            state: KeyState::fresh(key.fingerprint),
        };
        Ok(match (free, least_debt) {
            (Some(at), _) => Ok(fresh(at, Placement::Fresh)),
            (None, Some((slot, cas, _))) => Ok(fresh((slot, cas), Placement::Evicted)),
            (None, None) => Err(soonest_unthrottled),
        })
    }
}

struct Found {
    slot: u32,
    cas: u32,
    placement: Placement,
    state: KeyState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{key_hash, limit, MemStore, SharedStore, S};
    use std::sync::{Arc, Barrier};

    fn limits(count: u64, window_seconds: u64, burst: u64) -> Vec<Limit> {
        vec![limit(count, window_seconds, burst)]
    }

    /// A key whose candidates in a 4-slot table are all four slots (double
    /// hashing with step 2 probes only two), named `name` or `name` plus a
    /// counter.
    fn four_slot_key(name: &str) -> KeyHash {
        let table = SlotTable::new(4, 1);
        (0..)
            .map(|i| key_hash(format!("{name}{i}").as_bytes()))
            .find(|k| {
                let mut c = table.candidates(*k).to_vec();
                c.sort();
                c.dedup();
                c.len() == PROBES
            })
            .unwrap()
    }

    fn allowed(outcome: Outcome) -> bool {
        matches!(outcome, Outcome::Decided { decision, .. } if decision.allowed)
    }

    fn placement(outcome: Outcome) -> Placement {
        match outcome {
            Outcome::Decided { placement, .. } => placement,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_keeps_its_slot_and_is_limited() {
        let table = SlotTable::new(1024, 8);
        let mut store = MemStore::default();
        let key = key_hash(b"1234");
        let lim = limits(1, 1, 1);
        let first = table.decide(&mut store, key, &lim, 10 * S).unwrap();
        assert!(allowed(first));
        assert_eq!(placement(first), Placement::Fresh);
        let second = table.decide(&mut store, key, &lim, 10 * S + 1).unwrap();
        assert!(!allowed(second));
        assert_eq!(placement(second), Placement::Existing);
        assert!(allowed(
            table.decide(&mut store, key, &lim, 11 * S).unwrap()
        ));
    }

    #[test]
    fn keys_are_independent() {
        let table = SlotTable::new(64, 8);
        let mut store = MemStore::default();
        let lim = limits(1, 60, 1);
        for i in 0..40 {
            let key = key_hash(format!("key-{i}").as_bytes());
            assert!(
                allowed(table.decide(&mut store, key, &lim, S).unwrap()),
                "{i}"
            );
        }
        for i in 0..40 {
            let key = key_hash(format!("key-{i}").as_bytes());
            assert!(
                !allowed(table.decide(&mut store, key, &lim, S).unwrap()),
                "{i}"
            );
        }
    }

    #[test]
    fn a_denial_reads_but_never_writes() {
        let table = SlotTable::new(1024, 8);
        let mut store = MemStore::default();
        let key = key_hash(b"k");
        let lim = limits(1, 60, 1);
        table.decide(&mut store, key, &lim, S).unwrap();
        let writes = store.writes;
        for _ in 0..10 {
            assert!(!allowed(table.decide(&mut store, key, &lim, S).unwrap()));
        }
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn conflicts_are_retried_then_the_request_is_denied() {
        let table = SlotTable::new(1024, 3);
        let key = key_hash(b"k");
        let lim = limits(10, 1, 10);

        let mut store = MemStore {
            conflicts: 3,
            ..MemStore::default()
        };
        match table.decide(&mut store, key, &lim, S).unwrap() {
            Outcome::Decided {
                decision,
                conflicts,
                ..
            } => {
                assert!(decision.allowed);
                assert_eq!(conflicts, 3);
            }
            other => panic!("{other:?}"),
        }

        let mut store = MemStore {
            conflicts: 4,
            ..MemStore::default()
        };
        assert_eq!(
            table.decide(&mut store, key, &lim, S).unwrap(),
            Outcome::RetriesExhausted {
                retry_after_nanos: 0
            }
        );
        assert_eq!(store.writes, 0);
    }

    #[test]
    fn idle_slots_are_taken_over_and_unthrottled_ones_evicted_least_debt_first() {
        // Four slots: every key has the same four candidates.
        let table = SlotTable::new(4, 8);
        let mut store = MemStore::default();
        let lim = limits(10, 10, 10);
        let heavy = four_slot_key("heavy");
        for _ in 0..10 {
            assert!(allowed(table.decide(&mut store, heavy, &lim, S).unwrap()));
        }
        for i in 0..3 {
            let key = four_slot_key(&format!("light-{i}-"));
            assert_eq!(
                placement(table.decide(&mut store, key, &lim, S).unwrap()),
                Placement::Fresh
            );
        }
        // The table is full of live states: a newcomer evicts a light key
        // (one request of debt, not throttled), never the throttled heavy one.
        let newcomer = four_slot_key("newcomer");
        assert_eq!(
            placement(table.decide(&mut store, newcomer, &lim, S).unwrap()),
            Placement::Evicted
        );
        assert!(!allowed(table.decide(&mut store, heavy, &lim, S).unwrap()));
        assert_eq!(
            placement(table.decide(&mut store, heavy, &lim, S).unwrap()),
            Placement::Existing
        );
        // Once the light keys' buckets are full again, their slots are free.
        let later = S + 2 * S;
        let other = four_slot_key("other");
        assert_eq!(
            placement(table.decide(&mut store, other, &lim, later).unwrap()),
            Placement::Fresh
        );
    }

    #[test]
    fn a_throttled_key_is_never_evicted_the_newcomer_is_denied() {
        // Four slots, every key on the same candidates, 1/min with burst 1:
        // every admitted key is throttled for a minute.
        let table = SlotTable::new(4, 8);
        let mut store = MemStore::default();
        let lim = limits(1, 60, 1);
        let victim = four_slot_key("victim");
        assert!(allowed(table.decide(&mut store, victim, &lim, S).unwrap()));
        for i in 0..3 {
            let key = four_slot_key(&format!("junk-{i}-"));
            assert!(allowed(table.decide(&mut store, key, &lim, 2 * S).unwrap()));
        }
        // The victim has the least debt, but it is throttled: a newcomer
        // gets no slot and is told when the first candidate frees up.
        let newcomer = four_slot_key("newcomer");
        assert_eq!(
            table.decide(&mut store, newcomer, &lim, 3 * S).unwrap(),
            Outcome::Full {
                retry_after_nanos: 58 * S
            }
        );
        assert!(!allowed(
            table.decide(&mut store, victim, &lim, 3 * S).unwrap()
        ));
        // After that wait, the newcomer is admitted (nothing else happened).
        assert_eq!(
            placement(table.decide(&mut store, newcomer, &lim, 61 * S).unwrap()),
            Placement::Fresh
        );
    }

    /// The attack: an attacker holding key K grinds, offline against
    /// the hash it believes the filter uses, junk keys Z whose candidates
    /// include K's slot, and fillers that occupy Z's other candidates after
    /// K, so that K has the least debt there and Z evicts it. Returns how
    /// many times K was admitted.
    fn targeted_eviction_attack(filter_hash: impl Fn(&[u8]) -> KeyHash) -> usize {
        let slots = 65_536;
        let table = SlotTable::new(slots, 8);
        let mut store = MemStore::default();
        let lim = limits(1, 60, 1);
        let attacker_hash = key_hash;
        let mut admitted = 0;
        let mut now = 10 * S;
        let mut minted = 0u64;
        let mut mint = |wanted: &dyn Fn(&[u32; PROBES]) -> bool| loop {
            minted += 1;
            let key = format!("junk-{minted}").into_bytes();
            if wanted(&table.candidates(attacker_hash(&key))) {
                return key;
            }
        };
        let request = |store: &mut MemStore, key: &[u8], now: u64| {
            allowed(table.decide(store, filter_hash(key), &lim, now).unwrap())
        };
        for _ in 0..20 {
            if request(&mut store, b"K", now) {
                admitted += 1;
            }
            now += S / 100;
            let k_slot = table.candidates(attacker_hash(b"K"))[0];
            let z = mint(&|c| c.contains(&k_slot) && c[0] != k_slot);
            let z_candidates = table.candidates(attacker_hash(&z));
            for slot in z_candidates.iter().filter(|s| **s != k_slot) {
                let filler = mint(&|c| c[0] == *slot);
                request(&mut store, &filler, now);
            }
            now += S / 100;
            request(&mut store, &z, now);
            now += S / 100;
        }
        admitted
    }

    #[test]
    fn targeted_eviction_cannot_reset_a_throttled_key_even_with_a_known_hash() {
        // The attacker even knows the hash (the filter is unseeded here):
        // K is throttled, so it is never the one evicted.
        assert_eq!(targeted_eviction_attack(key_hash), 1);
    }

    #[test]
    fn keys_ground_offline_miss_a_seeded_table() {
        let seeded = crate::hash::KeyHasher::new(*b"secret-seed-0001");
        assert_eq!(targeted_eviction_attack(|k| seeded.hash(k)), 1);
        // And the ground keys do not even land on K's candidates.
        let table = SlotTable::new(65_536, 8);
        let k_slots = table.candidates(seeded.hash(b"K"));
        let k_known = table.candidates(key_hash(b"K"));
        let mut hits = 0;
        let mut ground = 0;
        for i in 0..2_000_000u32 {
            let key = format!("z{i}");
            if table
                .candidates(key_hash(key.as_bytes()))
                .contains(&k_known[0])
            {
                ground += 1;
                let c = table.candidates(seeded.hash(key.as_bytes()));
                hits += usize::from(c.iter().any(|s| k_slots.contains(s)));
            }
        }
        assert!(ground > 50, "{ground}");
        assert!(
            hits <= 1,
            "{hits} of {ground} ground keys reached K's slots"
        );
    }

    #[test]
    fn a_flood_of_random_keys_leaves_every_throttled_key_throttled() {
        let table = SlotTable::new(1024, 8);
        let mut store = MemStore::default();
        let lim = limits(1, 60, 1);
        let hot: Vec<KeyHash> = (0..200)
            .map(|i| key_hash(format!("hot-{i}").as_bytes()))
            .collect();
        for key in &hot {
            assert!(allowed(table.decide(&mut store, *key, &lim, S).unwrap()));
        }
        let mut full = 0;
        for i in 0..50_000u64 {
            let junk = key_hash(format!("flood-{i}").as_bytes());
            let now = S + i * (50 * S / 50_000);
            full += usize::from(matches!(
                table.decide(&mut store, junk, &lim, now).unwrap(),
                Outcome::Full { .. }
            ));
        }
        assert!(full > 0, "the flood never filled the table");
        for key in &hot {
            assert!(!allowed(
                table.decide(&mut store, *key, &lim, 55 * S).unwrap()
            ));
        }
    }

    #[test]
    fn adding_a_limit_keeps_the_existing_limit_s_debt() {
        let table = SlotTable::new(16, 8);
        let mut store = MemStore::default();
        let key = key_hash(b"k");
        let one = limits(1, 60, 1);
        assert!(allowed(table.decide(&mut store, key, &one, S).unwrap()));
        // A rolling update adds a daily cap: the per-minute debt stays.
        let two = [one.clone(), limits(1000, 86_400, 1000)].concat();
        assert!(!allowed(
            table.decide(&mut store, key, &two, 2 * S).unwrap()
        ));
        assert!(allowed(
            table.decide(&mut store, key, &two, 61 * S).unwrap()
        ));
        // And back: removing the daily cap keeps the per-minute debt too.
        assert!(!allowed(
            table.decide(&mut store, key, &one, 62 * S).unwrap()
        ));
    }

    #[test]
    fn garbage_in_a_slot_is_treated_as_free() {
        let table = SlotTable::new(4, 8);
        let mut store = MemStore::default();
        for slot in 0..4 {
            store.slots.insert(slot, (vec![1, 2, 3], 7));
        }
        let key = key_hash(b"k");
        assert!(allowed(
            table.decide(&mut store, key, &limits(1, 1, 1), S).unwrap()
        ));
    }

    #[test]
    fn candidates_are_in_range_and_mostly_distinct() {
        for slots in [4u32, 5, 7, 64, 1000, 65_536] {
            let table = SlotTable::new(slots, 1);
            let mut distinct_sets = 0;
            for i in 0..500 {
                let c = table.candidates(key_hash(format!("{i}").as_bytes()));
                assert!(c.iter().all(|s| *s < slots));
                let mut sorted = c.to_vec();
                sorted.sort();
                sorted.dedup();
                if sorted.len() == PROBES {
                    distinct_sets += 1;
                }
            }
            if slots >= 64 {
                assert!(distinct_sets > 490, "{slots}: {distinct_sets}");
            }
        }
    }

    #[test]
    fn concurrent_workers_admit_exactly_the_burst() {
        // 6 threads (Envoy's workers) × 50 requests on one key at one instant,
        // burst 50 at 1/min: exactly 50 are admitted, whatever the
        // interleaving of reads and CAS writes.
        let table = SlotTable::new(1024, 1_000);
        let store = SharedStore::default();
        let lim = limits(1, 60, 50);
        let key = key_hash(b"hot");
        let barrier = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let mut store = store.clone();
                let lim = lim.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..50)
                        .filter(|_| allowed(table.decide(&mut store, key, &lim, 100 * S).unwrap()))
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 50);
    }
}
