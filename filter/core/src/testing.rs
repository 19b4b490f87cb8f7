//! Helpers shared by the crate's tests: policies, limits, keys, request
//! headers and in-memory CAS stores. Compiled only for tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::applied::Applied;
use crate::gcra::{limit_id, Limit, LimitName};
use crate::hash::{KeyHash, KeyHasher};
use crate::header_map::{serialize, HeaderMap};
use crate::policy::Policy;
use crate::rate::Rate;
use crate::slots::{CasStore, Written};

/// One second, in the nanoseconds the core's clocks count.
pub(crate) const S: u64 = crate::time::NANOS_PER_SECOND;

/// A policy from JSON configuration that must be valid.
pub(crate) fn policy(json: &str) -> Policy {
    Policy::from_json(json.as_bytes()).unwrap()
}

/// What applies to a request of a key on the default plan, no rule
/// matching (`/`).
pub(crate) fn default_applied(p: &Policy) -> Applied {
    p.applied(0, &Headers::path("/").map()).unwrap()
}

/// What applies to `/?api_key=<key>` (a key with a plan or limits).
pub(crate) fn applied_of(p: &Policy, key: &str) -> Applied {
    let headers = Headers::path(&format!("/?api_key={key}"));
    match crate::pipeline::start(p, &headers.map()) {
        crate::pipeline::Start::Decide { applied, .. } => applied,
        other => panic!("{other:?}"),
    }
}

/// The default plan's limits.
pub(crate) fn default_limits(p: &Policy) -> Vec<Limit> {
    p.limits(&default_applied(p)).as_slice().to_vec()
}

/// `count` per `window_seconds`, burst `burst`, named `"<count>/<window>s"`.
pub(crate) fn limit(count: u64, window_seconds: u64, burst: u64) -> Limit {
    let rate = Rate {
        count,
        window_seconds,
    };
    Limit::new(&format!("{count}/{window_seconds}s"), rate, burst).unwrap()
}

/// The same, under another name (and so another identity in a state).
pub(crate) fn named_limit(name: &str, count: u64, window_seconds: u64, burst: u64) -> Limit {
    Limit {
        name: LimitName::new(name).unwrap(),
        id: limit_id(name),
        ..limit(count, window_seconds, burst)
    }
}

/// A calendar quota of `count` per `kind` at `offset_minutes` (weeks from
/// Monday), named `name`.
pub(crate) fn quota_limit(
    name: &str,
    count: u64,
    kind: crate::calendar::PeriodKind,
    offset_minutes: i16,
) -> Limit {
    let period = crate::calendar::Period {
        kind,
        offset_minutes,
        week_start: crate::calendar::Weekday::MONDAY,
    };
    Limit::quota(name, count, period).unwrap()
}

/// `s` with every `%XX` decoded, as webdis reads a call's arguments.
pub(crate) fn url_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The unseeded hash of `key`.
pub(crate) fn key_hash(key: &[u8]) -> KeyHash {
    KeyHasher::unseeded().hash(key)
}

/// Request headers, serialized as the host hands them over.
pub(crate) struct Headers(Vec<u8>);

impl Headers {
    pub(crate) fn of(pairs: &[(&str, &[u8])]) -> Headers {
        let pairs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        Headers(serialize(&pairs))
    }

    /// Only a `:path`.
    pub(crate) fn path(path: &str) -> Headers {
        Headers::of(&[(":path", path.as_bytes())])
    }

    pub(crate) fn map(&self) -> HeaderMap<'_> {
        HeaderMap::parse(&self.0).unwrap()
    }
}

/// Slot -> (bytes, CAS token); an absent slot reads as empty with token 1.
type SlotMap = HashMap<u32, (Vec<u8>, u32)>;

/// An in-memory CAS store; `conflicts` makes the next N writes fail as if
/// another worker had written first.
#[derive(Default)]
pub(crate) struct MemStore {
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

/// One [`MemStore`] shared by threads, as Envoy's workers share data.
#[derive(Clone, Default)]
pub(crate) struct SharedStore(Arc<Mutex<MemStore>>);

impl CasStore for SharedStore {
    type Value = Vec<u8>;
    type Error = ();
    fn read(&mut self, slot: u32) -> Result<(Vec<u8>, u32), ()> {
        self.0.lock().unwrap().read(slot)
    }
    fn write(&mut self, slot: u32, value: &[u8], cas: u32) -> Result<Written, ()> {
        self.0.lock().unwrap().write(slot, value, cas)
    }
}
