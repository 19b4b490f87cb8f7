//! The admin epoch: how a reset or grant reaches every replica's deny cache.
//!
//! A replica that cached a key's denial answers 429 itself until the
//! denial's time, whatever Redis says meanwhile; after an operator's reset
//! that is wrong. So `apikey_ratelimit_admin` counts every reset and grant in
//! `<key_prefix>epoch` (a plain Redis counter), each worker polls it
//! ([`path`], [`reading`]) every `store.webdis.admin_sync_ms`, and its deny
//! cache entries are written and looked up under the key's fingerprint
//! mixed with the epoch the worker knows ([`Poller::cache_key`]). When the
//! epoch moves, every entry learnt before is a miss, the key asks Redis
//! (always safe: the cache only saves calls), and nothing has to be cleared.
//! Epoch 0 leaves fingerprints as they are: without resets, nothing changes.
//!
//! An answer to a call sent before the worker learnt the epoch may predate
//! the reset: it is not remembered ([`Poller::remembered_key`]). A call sent
//! after it reached Redis after the poll read the epoch, so after the
//! `INCR`: its answer is as new as the epoch it is filed under.
//!
//! A worker starts from the epoch its process last learnt (kept in shared
//! data by the glue; 0 in a new process, whose cache is empty), so a root
//! made by a reload never trusts entries its predecessors had stopped
//! trusting, and the cache works from the first request, as before epochs.

use crate::batch::wire::check_nonce;
use crate::hash::KeyHash;
use crate::time::NANOS_PER_MILLI;
use crate::webdis::{encode_into, fcall_integers, parse_error, BackendError};

/// The function (registered by the library, checked by a test).
pub const FUNCTION: &str = "apikey_ratelimit_epoch";

/// The Redis key of the epoch of plugins with `key_prefix` (no API key's
/// hash can be it: those are 64 hex digits).
pub fn key(key_prefix: &str) -> String {
    format!("{key_prefix}epoch")
}

/// The `:path` of poll `nonce` reading `epoch_key`.
pub fn path(nonce: u64, epoch_key: &str) -> String {
    let mut path = format!("/FCALL/{FUNCTION}/1/");
    encode_into(&mut path, epoch_key.as_bytes());
    path.push('/');
    path.push_str(&nonce.to_string());
    path
}

/// The epoch in an answer, `{nonce, epoch}` (0 when Redis holds none).
pub fn reading(status: Option<u32>, body: &[u8], nonce: u64) -> Result<u64, BackendError> {
    let numbers = fcall_integers(status, body)?;
    check_nonce(&numbers, nonce)?;
    match numbers.as_slice() {
        [_, epoch] => Ok(*epoch),
        _ => Err(parse_error(
            "the epoch function answered other than {nonce, epoch}",
        )),
    }
}

/// What the fingerprints of epoch `epoch` are XORed with: 0 for epoch 0,
/// and a bijection (SplitMix64's finalizer), so each later epoch has its own
/// non-zero mask and an entry of one epoch never matches under another.
pub fn mix(epoch: u64) -> u64 {
    let mut z = epoch;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One worker's view of the epoch, and its polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poller {
    /// Nanoseconds between polls; 0: no polls, the first epoch for good.
    every: u64,
    next_at: u64,
    /// The poll out: its token and nonce.
    out: Option<(u32, u64)>,
    /// The epoch the cache files entries under.
    known: u64,
    /// When `known` last changed (the monotonic clock); `None` while it is
    /// the one given at the start.
    learnt_at: Option<u64>,
}

impl Default for Poller {
    /// No polls (local mode, the admin plugin, `admin_sync_ms: 0`).
    fn default() -> Poller {
        Poller::new(0, 0)
    }
}

/// What an answer to a poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// The epoch, and whether it differs from the one known before.
    Read { epoch: u64, changed: bool },
    /// The call failed: the old epoch stays.
    Failed(BackendError),
}

impl Poller {
    /// Polls every `admin_sync_ms` (0: never), starting from `epoch`, the
    /// one the process last learnt (0 if none: the cache then works as
    /// before epochs existed).
    pub fn new(admin_sync_ms: u32, epoch: u64) -> Poller {
        Poller {
            every: u64::from(admin_sync_ms) * NANOS_PER_MILLI,
            next_at: 0,
            out: None,
            known: epoch,
            learnt_at: None,
        }
    }

    /// The epoch the cache files entries under now.
    pub fn epoch(&self) -> u64 {
        self.known
    }

    /// Whether a poll should be sent at `now`: one out at most.
    pub fn due(&self, now: u64) -> bool {
        self.every > 0 && self.out.is_none() && now >= self.next_at
    }

    /// A poll went out under `token`; the next is due a period later.
    pub fn sent(&mut self, token: u32, nonce: u64, now: u64) {
        self.out = Some((token, nonce));
        self.next_at = now.saturating_add(self.every);
    }

    /// The host refused the poll: try again a period later.
    pub fn not_sent(&mut self, now: u64) {
        self.next_at = now.saturating_add(self.every);
    }

    /// Polls sent and not answered (0 or 1).
    pub fn outstanding(&self) -> usize {
        usize::from(self.out.is_some())
    }

    /// The answer to `token` at `now`, if it is the poll's (else `None`).
    pub fn answered(
        &mut self,
        token: u32,
        status: Option<u32>,
        body: &[u8],
        now: u64,
    ) -> Option<Polled> {
        let (_, nonce) = self.out.filter(|(t, _)| *t == token)?;
        self.out = None;
        Some(match reading(status, body, nonce) {
            Ok(epoch) => {
                let changed = self.known != epoch;
                if changed {
                    self.known = epoch;
                    self.learnt_at = Some(now);
                }
                Polled::Read { epoch, changed }
            }
            Err(error) => Polled::Failed(error),
        })
    }

    /// The identity of `key` in the deny cache under the epoch this worker
    /// knows (its own slot: the spread is kept).
    pub fn cache_key(&self, key: KeyHash) -> KeyHash {
        KeyHash {
            fingerprint: key.fingerprint ^ mix(self.known),
            spread: key.spread,
        }
    }

    /// Where to remember what an answer to a call sent at `sent_at` says of
    /// `key`: `None` if the call went out before this worker learnt its
    /// epoch (at the same instant too), as it may predate a reset.
    pub fn remembered_key(&self, key: KeyHash, sent_at: u64) -> Option<KeyHash> {
        let after = self.learnt_at.is_none_or(|at| sent_at > at);
        after.then(|| self.cache_key(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deny_cache::{self, Answer};
    use crate::gcra::LimitState;
    use crate::state::MAX_VALUE;
    use crate::testing::{key_hash, limit, S};

    const MS: u64 = NANOS_PER_MILLI;

    fn answer(epoch: u64, nonce: u64) -> Vec<u8> {
        format!(r#"{{"FCALL":[{nonce},{epoch}]}}"#).into_bytes()
    }

    /// A poller that has read `epoch` at `at`.
    fn knowing(epoch: u64, at: u64) -> Poller {
        let mut p = Poller::new(200, 0);
        p.sent(4, 9, at);
        let read = p.answered(4, Some(200), &answer(epoch, 9), at);
        assert!(matches!(read, Some(Polled::Read { .. })));
        p
    }

    #[test]
    fn a_poll_names_the_function_key_and_nonce_and_its_answer_is_read_back() {
        assert_eq!(key("apikey_ratelimit:api:"), "apikey_ratelimit:api:epoch");
        assert_eq!(
            path(7, "apikey_ratelimit:api:epoch"),
            "/FCALL/apikey_ratelimit_epoch/1/apikey_ratelimit%3Aapi%3Aepoch/7"
        );
        assert_eq!(reading(Some(200), &answer(3, 7), 7), Ok(3));
        // Another call's reply, a short or long one, an error, a timeout.
        assert!(reading(Some(200), &answer(3, 8), 7).is_err());
        assert!(reading(Some(200), br#"{"FCALL":[7]}"#, 7).is_err());
        assert!(reading(Some(200), br#"{"FCALL":[7,1,2]}"#, 7).is_err());
        assert!(reading(Some(200), br#"{"FCALL":[false,"ERR x"]}"#, 7).is_err());
        assert!(reading(Some(504), b"", 7).is_err());
        assert!(reading(None, b"", 7).is_err());
    }

    #[test]
    fn the_library_registers_the_function_read_only() {
        assert!(crate::webdis::LIBRARY.contains(&format!(
            "redis.register_function{{function_name = '{FUNCTION}', callback = epoch, flags = {{'no-writes'}}}}"
        )));
    }

    #[test]
    fn epoch_0_keeps_fingerprints_and_every_other_epoch_masks_them_apart() {
        assert_eq!(mix(0), 0);
        let masks: std::collections::HashSet<u64> = (1..10_000).map(mix).collect();
        assert_eq!(masks.len(), 9_999);
        assert!(!masks.contains(&0));
        let k = key_hash(b"k");
        assert_eq!(Poller::default().cache_key(k), k);
        assert_eq!(knowing(0, S).cache_key(k), k);
        let under_3 = knowing(3, S).cache_key(k);
        assert_ne!(under_3.fingerprint, k.fingerprint);
        assert_eq!(under_3.spread, k.spread, "the same slot");
    }

    #[test]
    fn a_denial_cached_under_one_epoch_is_a_miss_under_the_next() {
        let limits = [limit(2, 10, 2)];
        let k = key_hash(b"k");
        let states = [LimitState {
            reset_nanos: 10 * S,
            ..LimitState::default()
        }];
        let before = knowing(4, S);
        let at = before.remembered_key(k, 2 * S).unwrap();
        let mut buf = [0; MAX_VALUE];
        let answer = Answer {
            sent_at: 2 * S,
            received_at: 2 * S,
            states: &states,
        };
        let entry = deny_cache::entry(&mut buf, &[], at, &limits, answer).to_vec();
        let lookup = |p: &Poller| deny_cache::lookup(&limits, &entry, p.cache_key(k), 3 * S, None);
        assert!(lookup(&before).is_some());
        assert!(lookup(&knowing(5, 3 * S)).is_none());
        // A root made later starts from the epoch its process last learnt,
        // never from an older one whose entries it would trust again.
        assert!(lookup(&Poller::new(200, 4)).is_some());
        assert!(lookup(&Poller::new(200, 5)).is_none());
    }

    #[test]
    fn an_answer_to_a_call_sent_before_the_epoch_was_learnt_is_not_remembered() {
        let k = key_hash(b"k");
        let mut p = knowing(1, S);
        assert!(p.remembered_key(k, 2 * S).is_some());
        // A reset: the next poll reads epoch 2 at 3 s. A call sent at 2.5 s
        // may have been decided before the reset; one sent at 3 s too (same
        // instant); one sent later was decided after it.
        p.sent(8, 10, 2 * S);
        p.answered(8, Some(200), &answer(2, 10), 3 * S);
        assert_eq!(p.remembered_key(k, 2 * S + S / 2), None);
        assert_eq!(p.remembered_key(k, 3 * S), None);
        assert_eq!(p.remembered_key(k, 3 * S + 1), Some(p.cache_key(k)));
        // Reading the same epoch again moves nothing.
        p.sent(12, 11, 4 * S);
        p.answered(12, Some(200), &answer(2, 11), 5 * S);
        assert!(p.remembered_key(k, 4 * S).is_some());
        // Without polls, epoch 0 and every answer, as before epochs; from
        // the epoch given at the start, every answer too.
        assert_eq!(Poller::new(0, 0).remembered_key(k, 0), Some(k));
        let given = Poller::new(200, 3);
        assert_eq!(given.remembered_key(k, S), Some(given.cache_key(k)));
    }

    #[test]
    fn one_poll_is_out_at_most_and_a_failed_one_keeps_the_epoch() {
        let mut p = knowing(6, 0);
        assert!(!p.due(199 * MS));
        assert!(p.due(200 * MS));
        p.sent(20, 30, 200 * MS);
        assert_eq!(p.outstanding(), 1);
        assert!(!p.due(10 * S), "one out at most");
        // Another token is not the poll's.
        assert_eq!(p.answered(21, Some(200), &answer(7, 30), 250 * MS), None);
        let failed = p.answered(20, Some(504), b"", 250 * MS);
        assert!(matches!(failed, Some(Polled::Failed(_))));
        assert_eq!(p.outstanding(), 0);
        assert_eq!(p.epoch(), 6);
        // A reply of another call (its nonce) fails the poll too.
        p.sent(24, 31, 400 * MS);
        let stray = p.answered(24, Some(200), &answer(7, 99), 450 * MS);
        assert!(matches!(stray, Some(Polled::Failed(_))));
        assert_eq!(p.epoch(), 6);
        p.not_sent(600 * MS);
        assert!(!p.due(799 * MS) && p.due(800 * MS));
        p.sent(28, 32, 800 * MS);
        let read = p.answered(28, Some(200), &answer(7, 32), 850 * MS);
        assert_eq!(
            read,
            Some(Polled::Read {
                epoch: 7,
                changed: true
            })
        );
        // Off: never due.
        assert!(!Poller::new(0, 0).due(u64::MAX));
        // Reading the epoch it started from is no change.
        let mut fresh = Poller::new(50, 4);
        fresh.sent(1, 2, 0);
        let first = fresh.answered(1, Some(200), &answer(4, 2), 1);
        assert_eq!(
            first,
            Some(Polled::Read {
                epoch: 4,
                changed: false
            })
        );
    }
}
