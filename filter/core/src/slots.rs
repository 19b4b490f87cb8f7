//! The local store's fixed table of slots, and the compare-and-swap loop that
//! updates a key's state in it.
//!
//! Envoy never frees a shared-data key, so one entry per API key would grow
//! forever and any client could mint keys. Instead the table has `slots`
//! entries, all created at start-up; a key lives in one of [`PROBES`]
//! candidate slots chosen by its hash. A slot holds the key's 64-bit
//! fingerprint and one TAT per limit, so a single CAS write updates the whole
//! state of a key atomically.
//!
//! Finding a key's slot, in order:
//! 1. a candidate holding the key's fingerprint is the key's state;
//! 2. else the first candidate that is empty or *idle* (every bucket full,
//!    which is the same as a fresh state) is taken over: nothing is lost;
//! 3. else every candidate holds a live state of another key, and the one
//!    with the least debt (the earliest TAT, the key closest to being
//!    forgotten anyway) is evicted, like nginx's `limit_req` evicts its least
//!    recently used state. The evicted key restarts with a full bucket, so it
//!    can get back at most the debt it had; heavy and throttled keys carry
//!    the most debt and are the last to go. Evictions are counted.
//!
//! Every write is a CAS on the value read; on a conflict the lookup starts
//! again, at most `max_retries` times. If the retries run out the request is
//! denied (see [`Outcome::RetriesExhausted`]): a conflict means another
//! worker just wrote this key, so it is hot, and denying keeps the promise
//! of never admitting more than the limit.

use crate::gcra::{self, Decision, Limit, MAX_LIMITS};
use crate::hash::KeyHash;

/// Candidate slots per key.
pub const PROBES: usize = 4;

const TAT_BYTES: usize = 8;
/// The largest slot value: a fingerprint and [`MAX_LIMITS`] TATs.
pub const MAX_VALUE: usize = 8 + TAT_BYTES * MAX_LIMITS;

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

/// How the key's state was found, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The key's own slot.
    Existing,
    /// An empty or idle slot, taken over at no loss.
    Fresh,
    /// Another key's live state was evicted.
    Evicted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Decided {
        decision: Decision,
        placement: Placement,
        /// CAS conflicts met on the way.
        conflicts: u32,
    },
    /// Every attempt met a CAS conflict; the caller denies the request.
    RetriesExhausted,
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

    /// Decides one request for `key` at `now`, updating its slot.
    pub fn decide<S: CasStore>(
        &self,
        store: &mut S,
        key: KeyHash,
        limits: &[Limit],
        now: u64,
    ) -> Result<Outcome, S::Error> {
        let limits = limits.get(..MAX_LIMITS).unwrap_or(limits);
        let candidates = self.candidates(key);
        let mut conflicts = 0;
        loop {
            let found = self.find(store, key, &candidates, limits.len(), now)?;
            let mut tats = found.tats;
            let tats = tats.get_mut(..limits.len()).unwrap_or(&mut []);
            let decision = gcra::decide(limits, tats, now);
            if !decision.allowed {
                // A denial changes no state: nothing to write.
                return Ok(Outcome::Decided {
                    decision,
                    placement: found.placement,
                    conflicts,
                });
            }
            let mut buf = [0u8; MAX_VALUE];
            let value = encode(&mut buf, key.fingerprint, tats);
            match store.write(found.slot, value, found.cas)? {
                Written::Ok => {
                    return Ok(Outcome::Decided {
                        decision,
                        placement: found.placement,
                        conflicts,
                    })
                }
                Written::Conflict if conflicts >= self.max_retries => {
                    return Ok(Outcome::RetriesExhausted)
                }
                Written::Conflict => conflicts += 1,
            }
        }
    }

    fn find<S: CasStore>(
        &self,
        store: &mut S,
        key: KeyHash,
        candidates: &[u32; PROBES],
        limits: usize,
        now: u64,
    ) -> Result<Found, S::Error> {
        let mut free: Option<(u32, u32)> = None;
        let mut least_debt: Option<(u32, u32, u64)> = None;
        for &slot in candidates {
            let (value, cas) = store.read(slot)?;
            match Stored::decode(value.as_ref()) {
                Some(stored) if stored.fingerprint == key.fingerprint => {
                    let mut found = Found::fresh(slot, cas, Placement::Existing);
                    // A state with another number of limits predates a config
                    // change; it restarts fresh rather than being misread.
                    if stored.count == limits {
                        found.tats = stored.tats;
                    }
                    return Ok(found);
                }
                Some(stored) if !stored.is_idle(now) => {
                    let latest = stored.latest_tat();
                    if least_debt.is_none_or(|(_, _, best)| latest < best) {
                        least_debt = Some((slot, cas, latest));
                    }
                }
                _ => {
                    free.get_or_insert((slot, cas));
                }
            }
        }
        Ok(match (free, least_debt) {
            (Some((slot, cas)), _) => Found::fresh(slot, cas, Placement::Fresh),
            (None, Some((slot, cas, _))) => Found::fresh(slot, cas, Placement::Evicted),
            // Unreachable with PROBES > 0; a fresh state on the first
            // candidate is the safe answer anyway.
            (None, None) => Found::fresh(
                candidates.first().copied().unwrap_or(0),
                0,
                Placement::Fresh,
            ),
        })
    }
}

struct Found {
    slot: u32,
    cas: u32,
    placement: Placement,
    tats: [u64; MAX_LIMITS],
}

impl Found {
    fn fresh(slot: u32, cas: u32, placement: Placement) -> Found {
        Found {
            slot,
            cas,
            placement,
            tats: [0; MAX_LIMITS],
        }
    }
}

/// A decoded slot value: fingerprint, then TATs, all little-endian u64.
pub(crate) struct Stored {
    pub(crate) fingerprint: u64,
    pub(crate) tats: [u64; MAX_LIMITS],
    pub(crate) count: usize,
}

impl Stored {
    /// `None` for an empty slot or bytes that are not a state.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Stored> {
        if bytes.len() < 8 || bytes.len() % TAT_BYTES != 0 || bytes.len() > MAX_VALUE {
            return None;
        }
        let mut words = bytes
            .chunks_exact(TAT_BYTES)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
        let fingerprint = words.next()?;
        let mut tats = [0u64; MAX_LIMITS];
        let mut count = 0;
        for (tat, word) in tats.iter_mut().zip(words) {
            *tat = word;
            count += 1;
        }
        Some(Stored {
            fingerprint,
            tats,
            count,
        })
    }

    fn live_tats(&self) -> &[u64] {
        self.tats.get(..self.count).unwrap_or(&[])
    }

    fn is_idle(&self, now: u64) -> bool {
        gcra::is_idle(self.live_tats().iter().copied(), now)
    }

    fn latest_tat(&self) -> u64 {
        self.live_tats().iter().copied().max().unwrap_or(0)
    }
}

/// A slot value: the fingerprint, then the TATs.
pub fn encode<'a>(buf: &'a mut [u8; MAX_VALUE], fingerprint: u64, tats: &[u64]) -> &'a [u8] {
    let mut words = buf.chunks_exact_mut(TAT_BYTES);
    let mut len = 0;
    for (chunk, word) in (&mut words).zip(std::iter::once(fingerprint).chain(tats.iter().copied()))
    {
        chunk.copy_from_slice(&word.to_le_bytes());
        len += TAT_BYTES;
    }
    buf.get(..len).unwrap_or(&[])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Barrier, Mutex};

    const S: u64 = 1_000_000_000;

    /// An in-memory CAS store; `conflicts` makes the next N writes fail as
    /// if another worker had written first.
    #[derive(Default)]
    pub struct MemStore {
        pub slots: SlotMap,
        pub conflicts: u32,
        pub reads: u32,
        pub writes: u32,
    }

    impl CasStore for MemStore {
        type Value = Vec<u8>;
        type Error = ();
        fn read(&mut self, slot: u32) -> Result<(Vec<u8>, u32), ()> {
            self.reads += 1;
            Ok(self.slots.get(&slot).cloned().unwrap_or((Vec::new(), 1)))
        }
        fn write(&mut self, slot: u32, value: &[u8], cas: u32) -> Result<Written, ()> {
            let entry = self.slots.entry(slot).or_insert((Vec::new(), 1));
            if self.conflicts > 0 {
                self.conflicts -= 1;
                entry.1 += 1;
                return Ok(Written::Conflict);
            }
            if entry.1 != cas {
                return Ok(Written::Conflict);
            }
            self.writes += 1;
            *entry = (value.to_vec(), cas + 1);
            Ok(Written::Ok)
        }
    }

    /// The same store shared by threads, as Envoy's workers share data.
    type SlotMap = HashMap<u32, (Vec<u8>, u32)>;

    #[derive(Clone, Default)]
    struct SharedStore(Arc<Mutex<SlotMap>>);

    impl CasStore for SharedStore {
        type Value = Vec<u8>;
        type Error = ();
        fn read(&mut self, slot: u32) -> Result<(Vec<u8>, u32), ()> {
            let map = self.0.lock().unwrap();
            Ok(map.get(&slot).cloned().unwrap_or((Vec::new(), 1)))
        }
        fn write(&mut self, slot: u32, value: &[u8], cas: u32) -> Result<Written, ()> {
            let mut map = self.0.lock().unwrap();
            let entry = map.entry(slot).or_insert((Vec::new(), 1));
            if entry.1 != cas {
                return Ok(Written::Conflict);
            }
            *entry = (value.to_vec(), cas + 1);
            Ok(Written::Ok)
        }
    }

    fn limits(count: u64, window_seconds: u64, burst: u64) -> Vec<Limit> {
        vec![crate::gcra::test_limit(count, window_seconds, burst)]
    }

    fn allowed(outcome: Outcome) -> bool {
        matches!(outcome, Outcome::Decided { decision, .. } if decision.allowed)
    }

    fn placement(outcome: Outcome) -> Placement {
        match outcome {
            Outcome::Decided { placement, .. } => placement,
            Outcome::RetriesExhausted => panic!("exhausted"),
        }
    }

    #[test]
    fn a_key_keeps_its_slot_and_is_limited() {
        let table = SlotTable::new(1024, 8);
        let mut store = MemStore::default();
        let key = KeyHash::of(b"1234");
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
            let key = KeyHash::of(format!("key-{i}").as_bytes());
            assert!(
                allowed(table.decide(&mut store, key, &lim, S).unwrap()),
                "{i}"
            );
        }
        for i in 0..40 {
            let key = KeyHash::of(format!("key-{i}").as_bytes());
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
        let key = KeyHash::of(b"k");
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
        let key = KeyHash::of(b"k");
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
            Outcome::RetriesExhausted
        );
        assert_eq!(store.writes, 0);
    }

    #[test]
    fn idle_slots_are_taken_over_and_live_ones_evicted_least_debt_first() {
        // Four slots: every key has the same four candidates.
        let table = SlotTable::new(4, 8);
        let mut store = MemStore::default();
        let lim = limits(10, 10, 10);
        let heavy = KeyHash::of(b"heavy");
        for _ in 0..10 {
            assert!(allowed(table.decide(&mut store, heavy, &lim, S).unwrap()));
        }
        for i in 0..3 {
            let key = KeyHash::of(format!("light-{i}").as_bytes());
            assert_eq!(
                placement(table.decide(&mut store, key, &lim, S).unwrap()),
                Placement::Fresh
            );
        }
        // The table is full of live states: a newcomer evicts a light key
        // (one request of debt), never the throttled heavy one.
        let newcomer = KeyHash::of(b"newcomer");
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
        let other = KeyHash::of(b"other");
        assert_eq!(
            placement(table.decide(&mut store, other, &lim, later).unwrap()),
            Placement::Fresh
        );
    }

    #[test]
    fn a_state_from_another_config_restarts_fresh() {
        let table = SlotTable::new(16, 8);
        let mut store = MemStore::default();
        let key = KeyHash::of(b"k");
        table.decide(&mut store, key, &limits(1, 60, 1), S).unwrap();
        let two = [limits(1, 60, 1), limits(5, 60, 5)].concat();
        assert!(allowed(table.decide(&mut store, key, &two, S).unwrap()));
        assert!(!allowed(table.decide(&mut store, key, &two, S).unwrap()));
    }

    #[test]
    fn garbage_in_a_slot_is_treated_as_free() {
        let table = SlotTable::new(4, 8);
        let mut store = MemStore::default();
        for slot in 0..4 {
            store.slots.insert(slot, (vec![1, 2, 3], 7));
        }
        let key = KeyHash::of(b"k");
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
                let c = table.candidates(KeyHash::of(format!("{i}").as_bytes()));
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
        let key = KeyHash::of(b"hot");
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

    #[test]
    fn encoding_round_trips() {
        let mut buf = [0u8; MAX_VALUE];
        let bytes = encode(&mut buf, 42, &[1, 2, 3]).to_vec();
        let stored = Stored::decode(&bytes).unwrap();
        assert_eq!(stored.fingerprint, 42);
        assert_eq!(stored.live_tats(), &[1, 2, 3]);
        assert!(Stored::decode(&[]).is_none());
        assert!(Stored::decode(&[0; 9]).is_none());
        assert!(Stored::decode(&[0; MAX_VALUE + 8]).is_none());
    }
}
