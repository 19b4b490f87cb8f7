//! The compiled policy: a validated configuration in the shape the hot path
//! needs. Built once in `on_configure`; per request it only looks things up.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::config::{
    Config, ConfigError, FailureMode, KeySourceConfig, LimitConfig, LocalStoreConfig, MissingKey,
    ResponseHeadersConfig, StoreConfig, WebdisStoreConfig,
};
use crate::gcra::{Limit, LimitSet};
use crate::hash::{KeyHash, KeyHasher};
use crate::key::{self, KeyError, KeySource, RequestHeaders};
use crate::per_limit::MAX_LIMITS;
use crate::rate::{MAX_CAPACITY_NANOS, MAX_CAPACITY_SECONDS, MAX_COUNT};
use crate::response::{self, Replies};
use crate::slots::{SlotTable, PROBES};
use crate::time::SECONDS_PER_YEAR;

/// Bounds on user-supplied sizes.
pub const MAX_KEY_LENGTH: usize = 4096;
pub const MAX_SLOTS: u32 = 1 << 22;
pub const MAX_CAS_RETRIES: u32 = 1000;
const MAX_NAME_LENGTH: usize = 64;

/// Which limit set applies to a request, or why none does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A key, its hash, and the index of its limit set.
    Key {
        key: Cow<'a, [u8]>,
        hash: KeyHash,
        set: usize,
    },
    /// No key, counted in the shared anonymous bucket.
    Anonymous { hash: KeyHash, set: usize },
    /// No key, and `missing_key: allow`.
    MissingAllowed,
    /// No key, and `missing_key: reject` (the default): answer 401.
    MissingRejected,
    /// A key that cannot be used: answer 400.
    Invalid(KeyError),
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub sources: Vec<KeySource>,
    pub max_key_length: usize,
    pub missing_key: MissingKey,
    pub shadow_mode: bool,
    pub headers: ResponseHeadersConfig,
    pub failure_mode: FailureMode,
    pub store: StoreConfig,
    pub sets: Vec<LimitSet>,
    anonymous_set: usize,
    /// Plain-text overrides by 128-bit hash, with the key to confirm a match.
    plain_overrides: HashMap<u128, (Box<[u8]>, usize)>,
    /// `sha256:` overrides; hashing a key with SHA-256 happens only if any.
    sha256_overrides: HashMap<[u8; 32], usize>,
    /// The keyed hash of keys in the stores; the filter seeds it with the
    /// process's secret after compiling (see `hash`).
    hasher: Cell<KeyHasher>,
    /// The 401 and 400 bodies, which name the key sources.
    pub replies: Replies,
}

const DEFAULT_SET: usize = 0;

impl Policy {
    /// Parses and validates JSON configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::compile(Config::from_json(bytes)?)
    }

    pub fn compile(config: Config) -> Result<Policy, ConfigError> {
        in_range(
            "max_key_length",
            config.max_key_length,
            1..=MAX_KEY_LENGTH,
            "",
        )?;
        let sources = compile_sources(&config.key_sources)?;
        check_store(&config.store)?;

        let mut sets = vec![compile_set("limits", &config.limits, false)?];
        let anonymous_set = match &config.anonymous_limits {
            Some(limits) => {
                if config.missing_key != MissingKey::Anonymous {
                    return Err(ConfigError::new(
                        "anonymous_limits",
                        "only applies with \"missing_key\": \"anonymous\"",
                    ));
                }
                sets.push(compile_set("anonymous_limits", limits, false)?);
                sets.len() - 1
            }
            None => DEFAULT_SET,
        };

        let mut plain_overrides = HashMap::new();
        let mut sha256_overrides = HashMap::new();
        // Every override by the SHA-256 of its key, whichever way it was
        // given: a key twice would leave which limits apply to chance.
        let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
        for (i, o) in config.overrides.iter().enumerate() {
            let field = format!("overrides[{i}]");
            sets.push(compile_set(&format!("{field}.limits"), &o.limits, true)?);
            let set = sets.len() - 1;
            let digest = match o.key.strip_prefix("sha256:") {
                Some(hex) => {
                    let digest = parse_sha256(hex).ok_or_else(|| {
                        ConfigError::new(
                            format!("{field}.key"),
                            "a \"sha256:\" key must be followed by 64 hexadecimal digits",
                        )
                    })?;
                    sha256_overrides.insert(digest, set);
                    digest
                }
                None => {
                    let key = o.key.as_bytes();
                    if key.is_empty() || key.len() > config.max_key_length {
                        return Err(ConfigError::new(
                            format!("{field}.key"),
                            format!(
                                "must be 1 to {} bytes (max_key_length), or \"sha256:<hex>\"",
                                config.max_key_length
                            ),
                        ));
                    }
                    plain_overrides.insert(xxh3_128(key), (key.into(), set));
                    Sha256::digest(key).into()
                }
            };
            if let Some(first) = seen.insert(digest, i) {
                return Err(ConfigError::new(
                    format!("{field}.key"),
                    format!("this key already has an override, overrides[{first}] (as plain text or \"sha256:\")"),
                ));
            }
        }

        let replies = Replies::new(&sources, config.max_key_length);
        Ok(Policy {
            sources,
            max_key_length: config.max_key_length,
            missing_key: config.missing_key,
            shadow_mode: config.shadow_mode,
            headers: config.response_headers,
            failure_mode: config.failure_mode,
            store: config.store,
            sets,
            anonymous_set,
            plain_overrides,
            sha256_overrides,
            hasher: Cell::new(KeyHasher::unseeded()),
            replies,
        })
    }

    /// Finds the key in the request headers and the limits that apply to it.
    pub fn identify<'a>(&self, headers: &impl RequestHeaders<'a>) -> Identity<'a> {
        match key::extract(&self.sources, headers, self.max_key_length) {
            Err(e) => Identity::Invalid(e),
            Ok(Some(key)) => {
                let hash = self.hasher.get().hash(&key);
                let set = self.set_for(&key);
                Identity::Key { key, hash, set }
            }
            Ok(None) => match self.missing_key {
                MissingKey::Reject => Identity::MissingRejected,
                MissingKey::Allow => Identity::MissingAllowed,
                MissingKey::Anonymous => Identity::Anonymous {
                    hash: self.hasher.get().anonymous(),
                    set: self.anonymous_set,
                },
            },
        }
    }

    fn set_for(&self, key: &[u8]) -> usize {
        if !self.plain_overrides.is_empty() {
            if let Some((stored, set)) = self.plain_overrides.get(&xxh3_128(key)) {
                if **stored == *key {
                    return *set;
                }
            }
        }
        if !self.sha256_overrides.is_empty() {
            let digest: [u8; 32] = Sha256::digest(key).into();
            if let Some(set) = self.sha256_overrides.get(&digest) {
                return *set;
            }
        }
        DEFAULT_SET
    }

    /// Keys the store hashes with `hasher` from now on.
    pub fn reseed(&self, hasher: KeyHasher) {
        self.hasher.set(hasher);
    }

    /// The keyed hash in use.
    pub fn hasher(&self) -> KeyHasher {
        self.hasher.get()
    }

    pub fn set(&self, index: usize) -> Option<&LimitSet> {
        self.sets.get(index)
    }

    /// The limits of a set (none for an index no set has).
    pub fn limits(&self, index: usize) -> &[Limit] {
        self.sets.get(index).map_or(&[], |s| &s.limits)
    }

    /// The local store's table, when the store is local.
    pub fn slot_table(&self) -> Option<SlotTable> {
        match &self.store {
            StoreConfig::Local(LocalStoreConfig {
                slots,
                max_cas_retries,
            }) => Some(SlotTable::new(*slots, *max_cas_retries)),
            StoreConfig::Webdis(_) => None,
        }
    }

    /// The global store's settings, when the store is webdis.
    pub fn webdis(&self) -> Option<&WebdisStoreConfig> {
        match &self.store {
            StoreConfig::Webdis(w) => Some(w),
            StoreConfig::Local(_) => None,
        }
    }
}

fn compile_sources(sources: &[KeySourceConfig]) -> Result<Vec<KeySource>, ConfigError> {
    if sources.is_empty() || sources.len() > 8 {
        return Err(ConfigError::new("key_sources", "must list 1 to 8 sources"));
    }
    let mut out: Vec<KeySource> = Vec::with_capacity(sources.len());
    for (i, s) in sources.iter().enumerate() {
        let field = format!("key_sources[{i}]");
        let source = match (&s.query, &s.header, &s.prefix) {
            (Some(name), None, None) => {
                key::check_query_name(name)
                    .map_err(|why| ConfigError::new(format!("{field}.query"), why))?;
                KeySource::Query { name: name.clone() }
            }
            (None, Some(name), prefix) if is_header_name(name) => KeySource::Header {
                name: name.to_ascii_lowercase(),
                prefix: prefix.clone().filter(|p| !p.is_empty()),
            },
            (Some(_), None, Some(_)) => {
                return Err(ConfigError::new(field, "\"prefix\" only applies to a \"header\" source"))
            }
            (None, Some(name), _) => {
                return Err(ConfigError::new(
                    format!("{field}.header"),
                    format!("\"{name}\" is not a valid header name"),
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    field,
                    "give exactly one of {\"query\": \"<parameter>\"} or {\"header\": \"<name>\"}, not empty",
                ))
            }
        };
        if out.contains(&source) {
            return Err(ConfigError::new(field, "this source is listed twice"));
        }
        out.push(source);
    }
    Ok(out)
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn compile_set(
    field: &str,
    limits: &[LimitConfig],
    may_be_empty: bool,
) -> Result<LimitSet, ConfigError> {
    if limits.len() > MAX_LIMITS || (limits.is_empty() && !may_be_empty) {
        let least = if may_be_empty { 0 } else { 1 };
        return Err(ConfigError::new(
            field,
            format!("must list {least} to {MAX_LIMITS} rates, e.g. [\"10/s\", \"1000/day\"]"),
        ));
    }
    let mut compiled: Vec<Limit> = Vec::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let name = l.name.clone().unwrap_or_else(|| l.rate_text.clone());
        if name.is_empty()
            || name.len() > MAX_NAME_LENGTH
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
        {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!(
                    "\"{name}\" must be 1 to {MAX_NAME_LENGTH} characters of A-Z a-z 0-9 - _ . / :"
                ),
            ));
        }
        if compiled.iter().any(|c| c.name == name) {
            return Err(ConfigError::new(
                at,
                format!("two limits are named \"{name}\"; give each a distinct \"name\""),
            ));
        }
        let burst = l.burst.unwrap_or(l.rate.count);
        let limit = (1..=MAX_COUNT)
            .contains(&burst)
            .then(|| Limit::new(name, l.rate, burst))
            .flatten()
            .filter(|limit| limit.capacity_nanos <= MAX_CAPACITY_NANOS)
            .ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.burst"),
                    format!(
                        "must be from 1 to {MAX_COUNT}, and burst x (window / count) at most {} years, the longest both stores compute exactly; got {burst}",
                        MAX_CAPACITY_SECONDS / SECONDS_PER_YEAR
                    ),
                )
            })?;
        compiled.push(limit);
    }
    let policy_header = response::policy_header(&compiled);
    Ok(LimitSet {
        limits: compiled,
        policy_header,
    })
}

/// Longest accepted Redis key prefix.
pub const MAX_KEY_PREFIX: usize = 64;
/// Longest accepted per-decision timeout.
pub const MAX_TIMEOUT_MS: u32 = 60_000;
/// Most keys one batch call may carry (each costs Redis about 12 µs).
pub const MAX_KEYS_PER_CALL: u32 = 256;
/// Most batch calls one worker may have out at once.
pub const MAX_CALLS_IN_FLIGHT: u32 = 64;
/// Most requests one worker may keep waiting for webdis.
pub const MAX_WAITING: u32 = 1_000_000;

fn check_store(store: &StoreConfig) -> Result<(), ConfigError> {
    match store {
        StoreConfig::Webdis(w) => {
            if w.cluster.is_empty() || w.cluster.len() > 256 {
                return Err(ConfigError::new(
                    "store.webdis.cluster",
                    "must name the Envoy cluster that reaches webdis (1 to 256 characters)",
                ));
            }
            if let Some(authority) = &w.authority {
                if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        "store.webdis.authority",
                        "must be a host name (printable ASCII, no spaces)",
                    ));
                }
            }
            in_range(
                "store.webdis.timeout_ms",
                w.timeout_ms,
                1..=MAX_TIMEOUT_MS,
                " (Envoy reads 0 as no timeout at all)",
            )?;
            let prefix = w.key_prefix.as_deref().unwrap_or_default();
            if prefix.len() > MAX_KEY_PREFIX
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b))
            {
                return Err(ConfigError::new(
                    "store.webdis.key_prefix",
                    format!(
                        "must be at most {MAX_KEY_PREFIX} characters of A-Z a-z 0-9 - _ . : {{ }}"
                    ),
                ));
            }
            if w.key_hash_secret.as_deref() == Some("") {
                return Err(ConfigError::new(
                    "store.webdis.key_hash_secret",
                    "must not be empty (leave it out for a plain SHA-256)",
                ));
            }
            in_range(
                "store.webdis.max_keys_per_call",
                w.max_keys_per_call,
                1..=MAX_KEYS_PER_CALL,
                "",
            )?;
            in_range(
                "store.webdis.max_calls_in_flight",
                w.max_calls_in_flight,
                1..=MAX_CALLS_IN_FLIGHT,
                "",
            )?;
            in_range(
                "store.webdis.max_waiting",
                w.max_waiting,
                1..=MAX_WAITING,
                "",
            )?;
            if w.cache_slots != 0 && !(PROBES as u32..=MAX_SLOTS).contains(&w.cache_slots) {
                return Err(ConfigError::new(
                    "store.webdis.cache_slots",
                    format!(
                        "must be 0 (off) or from {PROBES} to {MAX_SLOTS}, got {}",
                        w.cache_slots
                    ),
                ));
            }
        }
        StoreConfig::Local(local) => {
            in_range(
                "store.local.slots",
                local.slots,
                PROBES as u32..=MAX_SLOTS,
                "",
            )?;
            in_range(
                "store.local.max_cas_retries",
                local.max_cas_retries,
                1..=MAX_CAS_RETRIES,
                "",
            )?;
        }
    }
    Ok(())
}

/// An error naming `field` unless `value` is in `range`: "must be from A to
/// B<note>, got V".
fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    note: &str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        field,
        format!(
            "must be from {} to {}{note}, got {value}",
            range.start(),
            range.end()
        ),
    ))
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod load_refusals;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyErrorKind;
    use crate::testing::{policy, Headers};

    fn error(json: &str) -> ConfigError {
        Policy::from_json(json.as_bytes()).unwrap_err()
    }

    fn identify(p: &Policy, path: &str) -> Identity<'static> {
        match p.identify(&Headers::path(path).map()) {
            Identity::Key { key, hash, set } => Identity::Key {
                key: Cow::Owned(key.into_owned()),
                hash,
                set,
            },
            Identity::Anonymous { hash, set } => Identity::Anonymous { hash, set },
            Identity::MissingAllowed => Identity::MissingAllowed,
            Identity::MissingRejected => Identity::MissingRejected,
            Identity::Invalid(e) => Identity::Invalid(e),
        }
    }

    fn set_of(identity: Identity) -> usize {
        match identity {
            Identity::Key { set, .. } | Identity::Anonymous { set, .. } => set,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tutorial_policy_compiles() {
        let p = policy(r#"{"limits": ["1/s"]}"#);
        assert_eq!(p.sets.len(), 1);
        assert_eq!(p.sets[0].limits[0].burst, 1);
        assert_eq!(p.sets[0].limits[0].name, "1/s");
        assert_eq!(p.sets[0].policy_header, "\"1/s\";q=1;w=1");
        assert_eq!(p.slot_table().unwrap().slots(), 65_536);
    }

    #[test]
    fn overrides_apply_by_plain_key_or_sha256() {
        let digest = "03ac674216f3e15c761ee1a5e255f067953623c8b388b4459e13f978d7c846f4"; // sha256("1234")
        let p = policy(&format!(
            r#"{{"limits": ["1/s"], "overrides": [
                {{"key": "gold", "limits": ["100/s"]}},
                {{"key": "sha256:{}", "limits": ["5/s"]}},
                {{"key": "internal", "limits": []}}]}}"#,
            digest.to_uppercase()
        ));
        let gold = set_of(identify(&p, "/?api_key=gold"));
        assert_eq!(p.sets[gold].limits[0].rate.count, 100);
        let hashed = set_of(identify(&p, "/?api_key=1234"));
        assert_eq!(p.sets[hashed].limits[0].rate.count, 5);
        let internal = set_of(identify(&p, "/?api_key=internal"));
        assert!(p.sets[internal].limits.is_empty());
        assert_eq!(set_of(identify(&p, "/?api_key=other")), DEFAULT_SET);
    }

    #[test]
    fn missing_key_policies() {
        assert_eq!(
            identify(&policy(r#"{"limits": ["1/s"]}"#), "/"),
            Identity::MissingRejected
        );
        assert_eq!(
            identify(
                &policy(r#"{"limits": ["1/s"], "missing_key": "allow"}"#),
                "/"
            ),
            Identity::MissingAllowed
        );
        let anon = policy(
            r#"{"limits": ["1/s"], "missing_key": "anonymous", "anonymous_limits": ["5/min"]}"#,
        );
        match identify(&anon, "/") {
            Identity::Anonymous { hash, set } => {
                assert_eq!(hash, KeyHasher::unseeded().anonymous());
                assert_eq!(anon.sets[set].limits[0].rate.count, 5);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            identify(&anon, "/?api_key=%zz"),
            Identity::Invalid(KeyError::Source {
                source: 0,
                kind: KeyErrorKind::BadEncoding
            })
        ));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let cases = [
            (r#"{"limits": []}"#, "limits"),
            (
                r#"{"limits": ["1/s","2/s","3/s","4/s","5/s","6/s","7/s","8/s","9/s"]}"#,
                "limits",
            ),
            (r#"{"limits": ["1/s", "1/s"]}"#, "limits[1]"),
            (
                r#"{"limits": [{"rate": "1/s", "burst": 0}]}"#,
                "limits[0].burst",
            ),
            (
                r#"{"limits": [{"rate": "1/365d", "burst": 1000000000}]}"#,
                "limits[0].burst",
            ),
            (
                r#"{"limits": [{"rate": "1/s", "name": "a b"}]}"#,
                "limits[0].name",
            ),
            (
                r#"{"limits": ["1/s"], "max_key_length": 0}"#,
                "max_key_length",
            ),
            (
                r#"{"limits": ["1/s"], "max_key_length": 5000}"#,
                "max_key_length",
            ),
            (r#"{"limits": ["1/s"], "key_sources": []}"#, "key_sources"),
            (
                r#"{"limits": ["1/s"], "key_sources": [{}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"query": "a", "header": "b"}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"query": "a", "prefix": "b"}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"header": "x y"}]}"#,
                "key_sources[0].header",
            ),
            (
                r#"{"limits": ["1/s"], "key_sources": [{"query": "a"}, {"query": "a"}]}"#,
                "key_sources[1]",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "", "limits": []}]}"#,
                "overrides[0].key",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "sha256:abc", "limits": []}]}"#,
                "overrides[0].key",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "a", "limits": []}, {"key": "a", "limits": ["1/s"]}]}"#,
                "overrides[1].key",
            ),
            (
                r#"{"limits": ["1/s"], "overrides": [{"key": "a", "limits": ["1/q"]}]}"#,
                "overrides[0].limits[0]",
            ),
            (
                r#"{"limits": ["1/s"], "anonymous_limits": ["1/s"]}"#,
                "anonymous_limits",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"slots": 3}}}"#,
                "store.local.slots",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"slots": 99999999}}}"#,
                "store.local.slots",
            ),
            (
                r#"{"limits": ["1/s"], "store": {"local": {"max_cas_retries": 0}}}"#,
                "store.local.max_cas_retries",
            ),
        ];
        for (json, field) in cases {
            let e = error(json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn out_of_range_numbers_are_refused_with_the_bounds_and_the_value() {
        let message = |json: &str| error(json).message;
        assert_eq!(
            message(r#"{"limits": ["1/s"], "max_key_length": 0}"#),
            "must be from 1 to 4096, got 0"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"webdis": {"timeout_ms": 0}}}"#),
            "must be from 1 to 60000 (Envoy reads 0 as no timeout at all), got 0"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"local": {"slots": 3}}}"#),
            "must be from 4 to 4194304, got 3"
        );
        assert_eq!(
            message(r#"{"limits": ["1/s"], "store": {"local": {"max_cas_retries": 1001}}}"#),
            "must be from 1 to 1000, got 1001"
        );
    }

    #[test]
    fn header_sources_are_lower_cased() {
        let p = policy(r#"{"limits": ["1/s"], "key_sources": [{"header": "X-API-Key"}]}"#);
        assert_eq!(
            p.sources,
            vec![KeySource::Header {
                name: "x-api-key".into(),
                prefix: None
            }]
        );
    }
}
