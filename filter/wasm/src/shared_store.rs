//! The local store: the slot table in Envoy shared data.
//!
//! Shared data is one map per `vm_id`, shared by every worker of the Envoy
//! process, with a CAS token per key: what `ratelimit_core::slots` needs to
//! count exactly across workers. Keys are
//! `<stable plugin name>/<table>/<index>` (`slot` for the local store, `deny`
//! for the global store's cache), built on the stack per call, so a lookup
//! allocates nothing but the value the host returns.

use ratelimit_core::slots::{CasStore, Written};

use crate::host::{self, Status, CAS_MISMATCH};

/// Room for the prefix and a slot index; prefixes are capped to fit.
const KEY_CAPACITY: usize = 288;
const MAX_PREFIX: usize = KEY_CAPACITY - 10;

/// The key prefix of one of a plugin's tables. Plugin names longer than
/// fits (no real one is) are replaced by a hash of the name, still unique.
pub fn table_prefix(plugin_name: &str, table: &str) -> Vec<u8> {
    let readable = format!("{plugin_name}/{table}/");
    if readable.len() <= MAX_PREFIX {
        readable.into_bytes()
    } else {
        let hash = xxh3_hex(plugin_name.as_bytes());
        format!("{hash}/{table}/").into_bytes()
    }
}

/// Calls `f` with the shared-data key of slot `slot` under `prefix`.
pub fn with_slot_key<T>(prefix: &[u8], slot: u32, f: impl FnOnce(&[u8]) -> T) -> T {
    let mut buf = [0u8; KEY_CAPACITY];
    let mut len = 0;
    for (dst, src) in buf.iter_mut().zip(prefix.iter().take(MAX_PREFIX)) {
        *dst = *src;
        len += 1;
    }
    let mut digits = [0u8; 10];
    let mut n = slot;
    let mut count = 0;
    loop {
        if let Some(d) = digits.get_mut(count) {
            *d = b'0' + (n % 10) as u8;
        }
        count += 1;
        n /= 10;
        if n == 0 || count == digits.len() {
            break;
        }
    }
    for d in digits.iter().take(count).rev() {
        if let Some(dst) = buf.get_mut(len) {
            *dst = *d;
            len += 1;
        }
    }
    f(buf.get(..len).unwrap_or(&[]))
}

fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", ratelimit_core::hash::name_hash(bytes))
}

pub struct SharedStore<'a> {
    prefix: &'a [u8],
}

impl<'a> SharedStore<'a> {
    pub fn new(prefix: &'a [u8]) -> SharedStore<'a> {
        SharedStore { prefix }
    }

    fn with_key<T>(&self, slot: u32, f: impl FnOnce(&[u8]) -> T) -> T {
        with_slot_key(self.prefix, slot, f)
    }

    /// Creates the slot if it does not exist yet. Never overwrites: a VM
    /// that restarts or reconfigures must not wipe live counters.
    pub fn ensure(&self, slot: u32) -> Result<(), Status> {
        self.with_key(slot, |key| match host::get_shared_data(key)? {
            Some(_) => Ok(()),
            None => host::set_shared_data(key, &[], 0),
        })
    }
}

impl CasStore for SharedStore<'_> {
    type Value = Vec<u8>;
    type Error = Status;

    fn read(&mut self, slot: u32) -> Result<(Vec<u8>, u32), Status> {
        // An absent slot reads as empty with CAS 0 (an unconditional write):
        // slots are made at start-up, so this only happens if that failed.
        self.with_key(slot, |key| {
            Ok(host::get_shared_data(key)?.unwrap_or_default())
        })
    }

    fn write(&mut self, slot: u32, value: &[u8], cas: u32) -> Result<Written, Status> {
        self.with_key(slot, |key| match host::set_shared_data(key, value, cas) {
            Ok(()) => Ok(Written::Ok),
            Err(CAS_MISMATCH) => Ok(Written::Conflict),
            Err(other) => Err(other),
        })
    }
}
