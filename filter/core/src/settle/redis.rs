//! Settlements in global mode: one call of `apikey_ratelimit_settle` (see
//! `gcra.lua`) carries those of many requests, sent by the root context.

use std::fmt::Write;

use super::Adjust;
use crate::batch::wire::{check_nonce, set_bytes, write_set};
use crate::gcra::Limit;
use crate::per_limit::PerLimit;
use crate::webdis::{encode_into, fcall_integers, BackendError};

/// The function (registered by the library, checked by a test).
pub const FUNCTION: &str = "apikey_ratelimit_settle";

/// The largest amount one entry carries (the function reads amounts as
/// Lua doubles, exact to 2^53; its caps bind long before this).
pub const MAX_AMOUNT: u64 = 1 << 50;

/// One request's settlement of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub redis_key: String,
    pub adjust: Adjust,
    /// The rule's limits, each costing 1.
    pub limits: PerLimit<Limit>,
}

/// The `:path` of call `nonce` settling `entries`:
/// `/FCALL/<fn>/<m>/<key>.../<nonce>/[<op>/<amount>/<set>] x m`, op 0 a
/// refund, 1 a charge.
pub fn path(nonce: u64, entries: &[Entry]) -> String {
    let mut path = format!("/FCALL/{FUNCTION}/{}", entries.len());
    for entry in entries {
        path.push('/');
        encode_into(&mut path, entry.redis_key.as_bytes());
    }
    let _ = write!(path, "/{nonce}");
    for entry in entries {
        let (op, amount) = match entry.adjust {
            Adjust::Refund(n) => (0, n),
            Adjust::Charge(n) => (1, n),
        };
        let _ = write!(path, "/{op}/{amount}");
        // The function's unit is one interval (a quota's unit): each limit
        // is sent costing 1, whatever it cost the request.
        let units: PerLimit<Limit> = entry.limits.iter().map(|l| l.costing(1)).collect();
        write_set(&mut path, units.as_slice());
    }
    path
}

/// A call's entries, gathered within its bounds: at most `max_keys`, and
/// a `:path` of at most `max_path_bytes` (webdis reads no more). The first
/// entry always goes, so that none is stuck.
#[derive(Debug)]
pub struct Gather {
    entries: Vec<Entry>,
    bytes: usize,
    max_keys: usize,
    max_path_bytes: usize,
}

impl Gather {
    pub fn new(max_keys: usize, max_path_bytes: usize) -> Gather {
        Gather {
            entries: Vec::new(),
            bytes: FUNCTION.len() + 2 * 24,
            max_keys: max_keys.max(1),
            max_path_bytes,
        }
    }

    /// Adds `adjust` to an entry of the call on the same key, limits and
    /// direction, if there is one (`false` if not). Two refunds of `a` and
    /// `b` leave the state exactly as one of `a + b` does (each stops at a
    /// full bucket, or at nothing used), and so do two charges (each stops
    /// at the same caps): under a flood on one key, Redis reads and writes
    /// the key once a call, not once a request.
    pub fn merge(&mut self, redis_key: &str, adjust: Adjust, limits: &[Limit]) -> bool {
        let same = self.entries.iter_mut().find(|e| {
            e.redis_key == redis_key
                && matches!(
                    (e.adjust, adjust),
                    (Adjust::Refund(_), Adjust::Refund(_)) | (Adjust::Charge(_), Adjust::Charge(_))
                )
                && e.limits.as_slice() == limits
        });
        let Some(entry) = same else {
            return false;
        };
        entry.adjust = match (entry.adjust, adjust) {
            (Adjust::Refund(a), Adjust::Refund(b)) => {
                Adjust::Refund(a.saturating_add(b).min(MAX_AMOUNT))
            }
            (Adjust::Charge(a), Adjust::Charge(b)) => {
                Adjust::Charge(a.saturating_add(b).min(MAX_AMOUNT))
            }
            (other, _) => other,
        };
        true
    }

    /// Whether an entry for `redis_key` on `limits` fits the call.
    pub fn fits(&self, redis_key: &str, limits: &[Limit]) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < self.max_keys
                && self.bytes + entry_bytes(redis_key, limits) <= self.max_path_bytes)
    }

    /// Adds `entry` (check [`Gather::fits`] first).
    pub fn push(&mut self, entry: Entry) {
        self.bytes += entry_bytes(&entry.redis_key, entry.limits.as_slice());
        self.entries.push(entry);
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

/// At most what an entry adds to a call's `:path`: "/<key>" encoded (3
/// bytes a byte at most), "/<op>/<amount>", the set.
fn entry_bytes(redis_key: &str, limits: &[Limit]) -> usize {
    1 + 3 * redis_key.len() + 14 + set_bytes(limits)
}

/// Whether the answer is this call's: `{nonce, now_us}`.
pub fn check(status: Option<u32>, body: &[u8], nonce: u64) -> Result<(), BackendError> {
    let numbers = fcall_integers(status, body)?;
    check_nonce(&numbers, nonce)
}
