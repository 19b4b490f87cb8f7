//! A key's stored state and its byte layout: what one slot of the local
//! table, or one entry of the global store's deny cache, holds.
//!
//! Layout, all little-endian u64 words:
//! `fingerprint, guard, (limit id, TAT) × n` with `n <= MAX_LIMITS`.
//!
//! Each TAT is filed under its limit's identity ([`Limit::id`], a hash of the
//! limit's name), not its position: adding or removing one limit leaves the
//! others' debt in place, and an entry of a limit the current configuration
//! does not carry (a rolling update, another plugin version) is kept while
//! it still holds debt, up to the fixed capacity. A limit that keeps its name
//! but changes its rate keeps its TAT: the debt, in time, carries over and is
//! read under the new rate. The `guard` word means what its table needs:
//! the slot table stores until when the key is throttled (such a state is
//! never evicted), the deny cache the reply's slack (see `deny_cache`).

use crate::gcra::{self, Limit};
use crate::per_limit::{PerLimit, MAX_LIMITS};
use crate::quota;

const WORD: usize = 8;
const HEADER: usize = 2 * WORD;
const ENTRY: usize = 2 * WORD;

/// The largest encoded state.
pub const MAX_VALUE: usize = HEADER + ENTRY * MAX_LIMITS;

/// One key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyState {
    /// Identifies the key (see `hash::KeyHash`).
    pub fingerprint: u64,
    /// Table-specific (see the module docs).
    pub guard: u64,
    /// `(limit id, TAT)` pairs.
    entries: PerLimit<(u64, u64)>,
}

impl KeyState {
    /// A key seen for the first time: every bucket full.
    pub fn fresh(fingerprint: u64) -> KeyState {
        KeyState {
            fingerprint,
            guard: 0,
            entries: PerLimit::new(),
        }
    }

    /// `None` for an empty value or bytes that are not a state.
    pub fn decode(bytes: &[u8]) -> Option<KeyState> {
        if bytes.len() < HEADER || bytes.len() > MAX_VALUE || (bytes.len() - HEADER) % ENTRY != 0 {
            return None;
        }
        let mut words = bytes
            .chunks_exact(WORD)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; WORD])));
        let mut state = KeyState::fresh(words.next()?);
        state.guard = words.next()?;
        while let (Some(id), Some(tat)) = (words.next(), words.next()) {
            if id == 0 || state.position(id).is_some() {
                return None;
            }
            // Always fits: the length was checked against `MAX_VALUE`.
            state.entries.push((id, tat));
        }
        Some(state)
    }

    /// Writes the state into `buf` and returns the bytes used.
    pub fn encode<'a>(&self, buf: &'a mut [u8; MAX_VALUE]) -> &'a [u8] {
        let words = [self.fingerprint, self.guard]
            .into_iter()
            .chain(self.entries().iter().flat_map(|(id, tat)| [*id, *tat]));
        let mut len = 0;
        for (chunk, word) in buf.chunks_exact_mut(WORD).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
            len += WORD;
        }
        buf.get(..len).unwrap_or(&[])
    }

    /// The `(limit id, TAT)` pairs held.
    pub fn entries(&self) -> &[(u64, u64)] {
        self.entries.as_slice()
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.entries().iter().position(|(held, _)| *held == id)
    }

    /// The TATs of `limits` (the first [`MAX_LIMITS`]), in their order; 0
    /// (a full bucket) for a limit this state holds nothing for.
    pub fn tats_for(&self, limits: &[Limit]) -> PerLimit<u64> {
        limits
            .iter()
            .map(
                |limit| match self.entries().iter().find(|(id, _)| *id == limit.id) {
                    Some((_, held)) => *held,
                    None => 0,
                },
            )
            .collect()
    }

    /// The state after `limits` moved to `tats`: those first, then the
    /// entries of other limits that still hold debt at `now`, latest TAT
    /// first, as long as there is room.
    pub fn with_tats(&self, limits: &[Limit], tats: &[u64], now: u64) -> KeyState {
        let mut next = KeyState {
            guard: self.guard,
            ..KeyState::fresh(self.fingerprint)
        };
        for (limit, tat) in limits.iter().zip(tats) {
            next.push(limit.id, *tat);
        }
        let mut others: PerLimit<(u64, u64)> = self
            .entries()
            .iter()
            .filter(|(id, tat)| *tat > now && !limits.iter().any(|l| l.id == *id))
            .copied()
            .collect();
        others
            .as_mut_slice()
            .sort_unstable_by_key(|entry| std::cmp::Reverse(entry.1));
        for (id, tat) in &others {
            next.push(*id, *tat);
        }
        next
    }

    /// Adds an entry unless its limit has one, or the state is full.
    fn push(&mut self, id: u64, tat: u64) {
        if self.position(id).is_none() {
            self.entries.push((id, tat));
        }
    }

    /// Every bucket is full at `now`: the same as a fresh state.
    pub fn is_idle(&self, now: u64) -> bool {
        gcra::is_idle(self.entries().iter().map(|(_, tat)| *tat), now)
    }

    /// The latest TAT held (0 when none): how long the state lives on.
    pub fn latest_tat(&self) -> u64 {
        self.entries()
            .iter()
            .map(|(_, tat)| *tat)
            .max()
            .unwrap_or(0)
    }

    /// Until when a request of this key is denied by one of `limits` (the
    /// latest `TAT - tolerance`; GCRA admits at `now >= TAT - tolerance`; a
    /// spent quota, its period's end), counting entries of other limits,
    /// whose tolerance is unknown here, as throttled until their TAT. Before
    /// the result the key is throttled.
    pub fn throttled_until(&self, limits: &[Limit]) -> u64 {
        self.entries()
            .iter()
            .map(|(id, tat)| match limits.iter().find(|l| l.id == *id) {
                Some(limit) if limit.period.is_some() => quota::throttled_until(limit, *tat),
                Some(limit) => tat.saturating_sub(limit.tolerance_nanos()),
                None => *tat,
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{named_limit as named, S};

    #[test]
    fn a_state_round_trips_and_garbage_is_not_a_state() {
        let limits = [named("a", 1, 1, 1), named("b", 5, 60, 5)];
        let state = KeyState::fresh(42).with_tats(&limits, &[7, 9], 0);
        let mut buf = [0; MAX_VALUE];
        let bytes = state.encode(&mut buf).to_vec();
        assert_eq!(bytes.len(), HEADER + 2 * ENTRY);
        assert_eq!(KeyState::decode(&bytes), Some(state));
        assert_eq!(state.tats_for(&limits).as_slice(), &[7, 9]);
        assert!(KeyState::decode(&[]).is_none());
        assert!(KeyState::decode(&[0; HEADER + 3]).is_none());
        assert!(KeyState::decode(&[0; MAX_VALUE + ENTRY]).is_none());
        // An entry with id 0, or the same id twice, is not a state we wrote.
        assert!(KeyState::decode(&[0; HEADER + ENTRY]).is_none());
        let twice = [bytes.clone(), bytes[HEADER..HEADER + ENTRY].to_vec()].concat();
        assert!(KeyState::decode(&twice).is_none());
    }

    #[test]
    fn adding_a_limit_keeps_the_other_limits_debt() {
        let one = [named("1/s", 1, 1, 1)];
        let two = [named("1/s", 1, 1, 1), named("1000/day", 1000, 86_400, 1000)];
        let state = KeyState::fresh(1).with_tats(&one, &[50], 10);
        assert_eq!(state.tats_for(&two).as_slice(), &[50, 0]);
        let after = state.with_tats(&two, &[60, 70], 10);
        // Back to one limit: the daily entry is kept while it holds debt.
        let back = after.with_tats(&one, &[80], 10);
        assert_eq!(back.entries(), &[(one[0].id, 80), (two[1].id, 70)]);
        assert_eq!(back.with_tats(&one, &[90], 75).entries().len(), 1);
    }

    #[test]
    fn foreign_entries_never_push_out_current_ones() {
        let many: Vec<Limit> = (0..MAX_LIMITS)
            .map(|i| named(&format!("l{i}"), 1, 60, 1))
            .collect();
        let full = KeyState::fresh(1).with_tats(&many, &[100; MAX_LIMITS], 0);
        let other = [named("new", 1, 1, 1)];
        let next = full.with_tats(&other, &[5], 0);
        assert_eq!(next.entries().len(), MAX_LIMITS);
        assert_eq!(next.entries()[0], (other[0].id, 5));
    }

    #[test]
    fn throttled_until_is_when_the_next_request_fits() {
        let limits = [named("x", 1, 10, 2)];
        // TAT 30 s ahead with tolerance 10 s: throttled until 20 s.
        let mut tats = [30 * S];
        let state = KeyState::fresh(1).with_tats(&limits, &tats, 0);
        let until = state.throttled_until(&limits);
        assert_eq!(until, 20 * S);
        assert!(!gcra::decide(&limits, &mut tats, until - 1).allowed);
        assert!(gcra::decide(&limits, &mut tats, until).allowed);
        // Unknown limits count as throttled until their TAT.
        assert_eq!(state.throttled_until(&[]), 30 * S);
        assert_eq!(KeyState::fresh(1).throttled_until(&limits), 0);
    }
}
